"""What a token-level KD loss computes: :class:`KDSettings`, one object every KD entry point takes.

The entry points — :func:`nemo_kd.losses.kd.topk_kd_loss`, :func:`nemo_kd.losses.kd.full_kd_loss`,
:func:`nemo_kd.losses.full_vocab.chunked_full_kd_loss`,
:func:`nemo_kd.kernels.full_kd_triton.fused_full_kd_loss` and the cross-tokenizer
:func:`nemo_kd.align.loss.cross_tokenizer_kd_loss` — take the same settings object and
validate it once, here, instead of each repeating (and re-checking) the same keywords.
:class:`~nemo_kd.losses.objective.DistillationLossConfig` builds it from its keys
(``kd_settings``).

What goes in, and what stays a call keyword:

* In the settings: everything that changes *which number is optimised* — the divergence and
  its parameter, the two inverse temperatures, Hinton's ``T²``, and the top-k loss's
  convention and tail floor (``renormalized`` and ``exact_tail`` are two different losses on
  the same data, not two ways of computing one). The full-vocabulary paths have no top-k, so
  they ignore ``topk_convention`` and ``tail_floor``: one settings object serves a
  configuration whatever teacher (stored top-k or online logits) a batch brings.
* Call keywords: *how to run it* and per-call data — ``impl`` (torch / fused / auto give the
  same loss), ``inplace_backward`` (where the gradient is written), ``chunk_tokens``, the TP
  ``group``, ``label_ids``, the teacher's ``teacher_lse`` / ``teacher_log_tail``.

This module sits in :mod:`nemo_kd.kernels` (layer 2) so that the fused kernel's launch helper
can take the settings while importing only downward; it needs neither Triton nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass

# The divergences of nemo_kd.losses.divergences (p = teacher, q = student).
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl", "akl")
# How a stored top-k teacher becomes a distribution (nemo_kd.losses.kd's module docstring).
TOPK_CONVENTIONS = ("renormalized", "exact_tail")

# Smallest tail bucket under ``exact_tail``: ``tail = max(1 − Σ_k, tail_floor)`` on both
# sides (the same floor as TRL's ``_add_tail_bucket``, which clamps log Σ at −1e-7):
# Σ_k p_i of stored (often bf16) teacher logits can round to ≥ 1. Both tails are formed in
# float64 (``nemo_kd.losses.kd._with_tail_bucket``), so they are exact functions of their inputs;
# what remains is the inputs' own rounding: the stored fp32 ``LSE_T`` (half an ulp, ~1e-6 near
# 20, shifts every ``log p_i`` alike and the tail by that much *absolutely*) and the
# student's fp32 log-probs (relative to its row max, so the top one is accurate to ~1e-7
# relative even when it is ≈ 0).
DEFAULT_TAIL_FLOOR = 1e-7

# The parameter each divergence reads, with the name its range error has always used.
_UNIT_INTERVAL_PARAMETERS = (("jsd_beta", "jsd beta"), ("skew_alpha", "skew alpha"), ("akl_mu", "akl mu"))


@dataclass(frozen=True)
class KDSettings:
    """The token-level KD loss: divergence, temperatures and (top-k only) convention; validated on construction.

    Attributes:
        loss_type: one of :data:`LOSS_TYPES` (``p`` = teacher, ``q`` = student).
        jsd_beta: β of ``jsd`` (TRL's convention: β weights the teacher; 0 / 1 are exactly
            forward / reverse KL).
        skew_alpha: α of ``skew_fkl`` / ``skew_rkl`` (DistiLLM; 0 is exactly forward / reverse KL).
        akl_mu: μ of ``akl``, the head's teacher mass.
            Each of the three is checked to lie in ``[0, 1]`` whichever divergence is chosen
            (a bad value in a config is an error even while unused).
        logits_scale / target_logits_scale: student / teacher inverse temperatures (> 0),
            multiplied into the logits before the loss (NeMo-Aligner's names).
        temperature_squared: multiply the divergence by ``T² = 1/logits_scale²`` (Hinton et al.,
            arXiv 1503.02531); off by default, as in NeMo-Aligner / ModelOpt.
        topk_convention: top-k losses only: ``"renormalized"`` or ``"exact_tail"``
            (:mod:`nemo_kd.losses.kd`); the full-vocabulary paths ignore it.
        tail_floor: ``exact_tail`` (and the cross-tokenizer chain groups) only: both tails are
            ``max(1 − Σ_k, tail_floor)``, in ``(0, 1)``.
    """

    loss_type: str = "forward_kl"
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    akl_mu: float = 0.5
    logits_scale: float = 1.0
    target_logits_scale: float = 1.0
    temperature_squared: bool = False
    topk_convention: str = "renormalized"
    tail_floor: float = DEFAULT_TAIL_FLOOR

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; expected one of {LOSS_TYPES}")
        for name, label in _UNIT_INTERVAL_PARAMETERS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:  # NaN fails too
                raise ValueError(f"{label} must be in [0, 1], got {value} (KDSettings.{name})")
        for name in ("logits_scale", "target_logits_scale"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not isinstance(self.temperature_squared, bool):
            raise TypeError(f"temperature_squared must be a bool, got {self.temperature_squared!r}")
        if self.topk_convention not in TOPK_CONVENTIONS:
            raise ValueError(f"unknown topk_convention {self.topk_convention!r}; expected one of {TOPK_CONVENTIONS}")
        if not 0.0 < self.tail_floor < 1.0:
            raise ValueError(f"tail_floor must be in (0, 1), got {self.tail_floor}")

    @property
    def temperature_factor(self) -> float:
        """Hinton's ``T²`` with ``T = 1/logits_scale`` when ``temperature_squared``, else 1."""
        return 1.0 / self.logits_scale**2 if self.temperature_squared else 1.0


def check_settings(settings) -> KDSettings:
    """``settings`` itself when it is a :class:`KDSettings`; else a TypeError saying what the entry points take."""
    if not isinstance(settings, KDSettings):
        raise TypeError(f"expected a nemo_kd KDSettings (the loss's divergence, temperatures and top-k convention) "
                        f"as the settings argument, got {type(settings).__name__}")
    return settings
