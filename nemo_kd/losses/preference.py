"""Sequence-level preference losses: DPO, DPKD, IPO, CPO, SimPO.

Pure functions on per-sequence tensors ``[B]`` (one entry per preference pair):
log-probability *sums* ``log π(y) = Σ_t log π(y_t | x, y_<t)`` of the chosen
(``y_w``) and rejected (``y_l``) completions under the policy (the student) and,
where used, a reference, plus the completion lengths ``|y|`` (see
:mod:`nemo_kd.losses.sequence`). Each returns a :class:`PreferenceOutput` with
per-pair losses ``[B]`` — reduce them with :mod:`nemo_kd.losses.reduction`.

One core serves every form. A *reward* is a (optionally length-normalised)
log-probability, or log-ratio to the reference, times ``β``::

    r(y) = β · score(y),   score(y) = ℓ(y) / |y| if length_normalize else ℓ(y)

and the pair's *margin* is ``r(y_w) − r(y_l)``. The sigmoid (Bradley–Terry) forms
share :func:`sigmoid_preference_loss`,
``−(1 − ε)·log σ(u) − ε·log σ(−u)`` of ``u = margin − γ`` (the conservative DPO
form with label smoothing ``ε``: the label is flipped with probability ``ε``);
IPO squares ``margin − 1/(2τ)`` instead.

Defaults are each paper's (a caller that passes a value gets that value;
:class:`~nemo_kd.losses.objective.DistillationLossConfig` passes only what the user set)::

    form   β      length-normalised reward      other
    dpo    0.1    no  (Eq. 7; TRL: no)
    ipo    —      no  (Eq. 17; TRL: yes)        τ = 0.1
    dpkd   0.1    yes (Eq. 9)
    cpo    0.1    no  (Eq. 6)                   NLL weight 1, per-token mean NLL (released code, TRL)
    simpo  2.0    yes (Eq. 6, always)           γ = β/2 (γ/β ≈ 0.5)

Rewards and margins are returned detached, for logging.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PreferenceOutput:
    """Per-pair results, each ``[B]``.

    ``losses`` (differentiable); ``chosen_rewards`` ``r(y_w)``, ``rejected_rewards``
    ``r(y_l)`` and ``margins`` ``r(y_w) − r(y_l)`` (detached; the implicit rewards
    of DPO-style forms).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


def sequence_score(
    logps: torch.Tensor, lengths: Optional[torch.Tensor] = None, length_normalize: bool = False
) -> torch.Tensor:
    """``ℓ / |y|`` when ``length_normalize`` (a zero length counts as 1, giving 0/1 = 0 for an empty sum), else ``ℓ``."""
    if not length_normalize:
        return logps
    if lengths is None:
        raise ValueError("length_normalize=True needs the sequence lengths")
    return logps / lengths.clamp(min=1).to(logps.dtype)


def sigmoid_preference_loss(logits: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """``−(1 − ε)·log σ(u) − ε·log σ(−u)`` elementwise (``ε`` = ``label_smoothing``, ``u`` = ``logits``)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    loss = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-logits)
    return loss


def _rewards(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    chosen_lengths: Optional[torch.Tensor],
    rejected_lengths: Optional[torch.Tensor],
    length_normalize: bool,
):
    r_w = beta * sequence_score(chosen, chosen_lengths, length_normalize)
    r_l = beta * sequence_score(rejected, rejected_lengths, length_normalize)
    return r_w, r_l


def _output(losses: torch.Tensor, r_w: torch.Tensor, r_l: torch.Tensor) -> PreferenceOutput:
    r_w, r_l = r_w.detach(), r_l.detach()
    return PreferenceOutput(losses=losses, chosen_rewards=r_w, rejected_rewards=r_l, margins=r_w - r_l)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    length_normalize: bool = False,
) -> PreferenceOutput:
    """DPO (Rafailov et al., arXiv 2305.18290, Eq. 7) with conservative label smoothing.

    ::

        h = log[π(y_w)/π_ref(y_w)] − log[π(y_l)/π_ref(y_l)]      (each log-ratio / |y| if length_normalize)
        L = −(1 − ε)·log σ(β·h) − ε·log σ(−β·h)

    Implicit rewards ``r(y) = β·log[π(y)/π_ref(y)]`` (length-normalised alike).
    ``length_normalize=False`` is the paper's form. The reference log-probs are
    treated as constants only if the caller passes them detached.
    """
    r_w, r_l = _rewards(
        policy_chosen_logps - reference_chosen_logps,
        policy_rejected_logps - reference_rejected_logps,
        beta,
        chosen_lengths,
        rejected_lengths,
        length_normalize,
    )
    return _output(sigmoid_preference_loss(r_w - r_l, label_smoothing), r_w, r_l)


def dpkd_loss(
    student_logps_teacher_output: torch.Tensor,
    student_logps_student_output: torch.Tensor,
    teacher_logps_teacher_output: torch.Tensor,
    teacher_logps_student_output: torch.Tensor,
    teacher_output_lengths: Optional[torch.Tensor] = None,
    student_output_lengths: Optional[torch.Tensor] = None,
    beta: float = 0.1,
    length_normalize: bool = True,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """DPKD (Li et al., "Direct Preference Knowledge Distillation", arXiv 2406.19774, Eq. 9).

    DPO with the teacher ``p`` as reference, the teacher's output ``y_t`` preferred
    over the student's own output ``y_s`` (``q`` = student)::

        L = −log σ( (β/|y_t|)·log[q(y_t)/p(y_t)] − (β/|y_s|)·log[q(y_s)/p(y_s)] )

    ``length_normalize=False`` drops the ``1/|y|`` (plain sums; the paper's ablation
    without normalisation loses ~1.8 ROUGE-L). ``label_smoothing`` ``ε`` gives the
    conservative form ``−(1−ε)·log σ(u) − ε·log σ(−u)`` of the released code
    (microsoft/LMOps ``dpkd/``, ``β = 0.1`` there). The paper's total objective adds
    ``λ·L_pt`` (an LM loss on pre-training text): that term belongs to the
    training loop. Teacher log-probs must be passed detached.
    """
    return dpo_loss(
        student_logps_teacher_output,
        student_logps_student_output,
        teacher_logps_teacher_output,
        teacher_logps_student_output,
        beta=beta,
        label_smoothing=label_smoothing,
        chosen_lengths=teacher_output_lengths,
        rejected_lengths=student_output_lengths,
        length_normalize=length_normalize,
    )


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    tau: float = 0.1,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    length_normalize: bool = False,
) -> PreferenceOutput:
    """IPO (Azar et al., arXiv 2310.12036, Eq. 17, empirical IPO loss)::

        h = log[π(y_w)/π_ref(y_w)] − log[π(y_l)/π_ref(y_l)]      (each / |y| if length_normalize)
        L = (h − 1/(2τ))²

    ``length_normalize=False`` is the paper's form (TRL's ``loss_type="ipo"``
    length-normalises). DPKD's code uses ``τ = β``. Rewards are the (unscaled,
    ``β = 1``) log-ratios, so ``margins = h``.
    """
    r_w, r_l = _rewards(
        policy_chosen_logps - reference_chosen_logps,
        policy_rejected_logps - reference_rejected_logps,
        1.0,
        chosen_lengths,
        rejected_lengths,
        length_normalize,
    )
    return _output((r_w - r_l - 1.0 / (2.0 * tau)) ** 2, r_w, r_l)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    nll_weight: float = 1.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    length_normalize_nll: bool = True,
) -> PreferenceOutput:
    """CPO (Xu et al., "Contrastive Preference Optimization", arXiv 2401.08417, Eq. 6; no reference model)::

        L = −log σ(β·log π(y_w) − β·log π(y_l))  +  w·NLL(y_w),    NLL(y_w) = −log π(y_w) / |y_w|

    The preference term uses sequence *sums* (not length-normalised), as in the
    paper (β = 0.1 there). The NLL term (weight ``w`` = ``nll_weight``, paper: 1) is the
    per-token mean by default (needs ``chosen_lengths``): Eq. 6 writes ``−log π(y_w)``,
    but the authors' released code and TRL's ``CPOTrainer`` (``cpo_alpha = 1``) take the
    token-mean cross-entropy, which keeps it on the preference term's scale (a sequence
    sum is ~|y_w| times larger). ``length_normalize_nll=False`` gives the literal sum.
    Rewards ``β·log π(y)``.
    """
    r_w, r_l = _rewards(policy_chosen_logps, policy_rejected_logps, beta, None, None, False)
    nll = -sequence_score(policy_chosen_logps, chosen_lengths, length_normalize_nll)
    losses = sigmoid_preference_loss(r_w - r_l, label_smoothing) + nll_weight * nll
    return _output(losses, r_w, r_l)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float = 2.0,
    gamma: Optional[float] = None,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """SimPO (Meng et al., arXiv 2405.14734, Eq. 6; no reference model)::

        L = −log σ( (β/|y_w|)·log π(y_w) − (β/|y_l|)·log π(y_l) − γ )

    Defaults follow the paper's recommendation, β in 2–2.5 and γ/β ≈ 0.5: ``β = 2`` and
    ``gamma=None`` meaning ``γ = β/2`` (the official code sets γ through ``gamma_beta_ratio``;
    TRL's ``CPOTrainer(loss_type="simpo")`` defaults to β = 0.1, γ = 0.5, far from them).
    Rewards ``(β/|y|)·log π(y)``; ``margins`` exclude ``γ``.
    """
    gamma = 0.5 * beta if gamma is None else gamma
    r_w, r_l = _rewards(policy_chosen_logps, policy_rejected_logps, beta, chosen_lengths, rejected_lengths, True)
    return _output(sigmoid_preference_loss(r_w - r_l - gamma, label_smoothing), r_w, r_l)
