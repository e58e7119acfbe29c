"""Token-level divergences between a teacher ``p`` and a student ``q``, written once.

Every divergence here takes teacher log-probs ``log_p`` and student log-probs
``log_q`` of the same shape ``[N, B]`` (``N`` tokens, ``B`` "buckets" in the last
dim) and returns per-token values ``[N]``. A bucket is one outcome of the
distribution being compared: a vocabulary entry, one of the teacher's top-k ids,
or the aggregated "tail" of everything outside the top-k. *How* the buckets are
summed is the only thing that depends on where they live, so it is a parameter,
:class:`~nemo_kd.kernels.buckets.BucketSpace` (defined below the losses, as the fused
kernel's launch helper uses it too):

* ``BucketSpace.replicated()`` – every rank holds all ``B`` buckets (top-k losses):
  a plain sum over the last dim;
* ``BucketSpace.sharded(group)`` – the buckets are the tensor-parallel vocabulary
  shard ``[N, V/TP]`` (full-vocab losses): a local sum, then one differentiable
  :func:`~nemo_kd.kernels.collectives.all_reduce_sum` over ``group`` (forward
  all-reduce, identity backward; see :mod:`nemo_kd.losses.vocab_parallel`).

Numerics. All terms have the form ``a·(log a − log b)``; they are computed by
:func:`_plogratio`, which returns an *exact* 0 (with a finite, zero gradient) where
``a = 0`` (``log a = −inf``: a teacher −inf logit, a padded vocabulary column, an
empty top-k slot), the ``0·log 0 = 0`` convention of ``torch.xlogy``. Where
``a > 0`` but ``b = 0`` the value is the true ``+inf`` (e.g. reverse KL against a
teacher that gives a bucket zero mass that the student does not): mask those
columns in the student too (then both sides are 0 and the term is exactly 0), or
use a divergence whose reference is a mixture (JSD with 0<β<1, skew KL with α>0).
Mixtures ``log(w·a + (1−w)·b)`` are formed in log space (:func:`_log_mix`), so no
probability underflows before the log. Inputs are used in their own dtype: callers
pass fp32 (fp64 for fp64 inputs), see ``accumulation_dtype``.
"""

from __future__ import annotations

import torch

from nemo_kd.kernels.buckets import BucketSpace
from nemo_kd.kernels.kd_settings import LOSS_TYPES

# --------------------------------------------------------------------------- numerics


def _plogratio(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-bucket ``a·(log a − log b)`` with ``a = exp(log_a)``; exactly 0 where ``a = 0``.

    The ``torch.where`` guards both branches so a −inf input never produces a NaN
    value or gradient (xlogy convention ``0·log 0 = 0``).
    """
    alive = log_a > float("-inf")
    zero = torch.zeros_like(log_a)
    la = torch.where(alive, log_a, zero)
    lb = torch.where(alive, log_b, zero)
    return torch.where(alive, torch.exp(la) * (la - lb), zero)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w·a + (1−w)·b)`` from log-probs, stable, NaN-free where ``a = b = 0``.

    ``w = 1`` / ``w = 0`` return ``log_a`` / ``log_b`` exactly (so β- and α-limits of
    JSD and skew KL are exact, not merely close).
    """
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    top = torch.maximum(log_a, log_b)
    empty = top == float("-inf")
    zero = torch.zeros_like(top)
    shift = torch.where(empty, zero, top)
    la = torch.where(empty, zero, log_a) - shift
    lb = torch.where(empty, zero, log_b) - shift
    mixed = shift + torch.log(w * torch.exp(la) + (1.0 - w) * torch.exp(lb))
    return torch.where(empty, torch.full_like(top, float("-inf")), mixed)


# --------------------------------------------------------------------------- divergences

_REPLICATED = BucketSpace.replicated()


def forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, space: BucketSpace = _REPLICATED) -> torch.Tensor:
    """Forward KL ``KL(p‖q) = Σ_v p(v)·(log p(v) − log q(v))``, per token ``[N]``.

    Word-level KD (Hinton et al., 2015, arXiv 1503.02531; Kim & Rush, 2016); mean
    seeking. MiniLLM's "KD" baseline (arXiv 2306.08543).
    """
    return space.sum(_plogratio(log_p, log_q))


def reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, space: BucketSpace = _REPLICATED) -> torch.Tensor:
    """Reverse KL ``KL(q‖p) = Σ_v q(v)·(log q(v) − log p(v))``, per token ``[N]``.

    Mode seeking (MiniLLM, arXiv 2306.08543, optimises its sequence-level form; the
    token-level form is DistiLLM's, arXiv 2402.03898). ``+inf`` where ``p(v) = 0 <
    q(v)`` (see the module docstring).
    """
    return space.sum(_plogratio(log_q, log_p))


def generalized_jsd(
    log_p: torch.Tensor, log_q: torch.Tensor, beta: float = 0.5, space: BucketSpace = _REPLICATED
) -> torch.Tensor:
    """Generalised Jensen–Shannon divergence ``JSD_β`` (GKD, Agarwal et al., arXiv 2306.13649).

    With the mixture ``m = (1−β)·q + β·p`` (TRL's convention: β weights the
    *teacher*)::

        JSD_β = β·KL(p‖m) + (1−β)·KL(q‖m)

    As β→0 or β→1 this expression itself tends to 0; following TRL's
    ``generalized_jsd_loss``, the end points are special-cased to the KLs GKD
    interpolates between: ``β = 0`` is exactly forward KL(p‖q) and ``β = 1`` exactly
    reverse KL(q‖p).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(log_p, log_q, space)
    if beta == 1.0:
        return reverse_kl(log_p, log_q, space)
    log_m = _log_mix(log_p, log_q, beta)
    return space.sum(beta * _plogratio(log_p, log_m) + (1.0 - beta) * _plogratio(log_q, log_m))


def skew_forward_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, alpha: float = 0.1, space: BucketSpace = _REPLICATED
) -> torch.Tensor:
    """Skew forward KL ``SKL_α = KL(p ‖ α·p + (1−α)·q)`` (DistiLLM, Ko et al., arXiv 2402.03898).

    ``α = 0`` is exactly forward KL; the mixture keeps the log-ratio bounded by
    ``−log α`` where the student puts no mass. DistiLLM's default ``α = 0.1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    return space.sum(_plogratio(log_p, _log_mix(log_p, log_q, alpha)))


def skew_reverse_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, alpha: float = 0.1, space: BucketSpace = _REPLICATED
) -> torch.Tensor:
    """Skew reverse KL ``SRKL_α = KL(q ‖ (1−α)·p + α·q)`` (DistiLLM, arXiv 2402.03898).

    ``α = 0`` is exactly reverse KL; for ``α > 0`` it stays finite where the teacher
    gives a bucket zero mass. DistiLLM's default ``α = 0.1``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    return space.sum(_plogratio(log_q, _log_mix(log_p, log_q, 1.0 - alpha)))


@torch.no_grad()
def akl_weights(p: torch.Tensor, q: torch.Tensor, mu: float, space: BucketSpace = _REPLICATED):
    """AKL's ``(w_head, w_tail)`` ``[N]`` from teacher / student probabilities ``[N, B]`` (:func:`adaptive_kl`).

    ``w_head = g_head / (g_head + g_tail)`` (½ where the gaps are both 0), ``w_tail = 1 − w_head``;
    constants for autograd. Shared by :func:`adaptive_kl` and the chunked full-vocabulary path
    (:mod:`nemo_kd.losses.full_vocab`).
    """
    gap = (p - q).abs()
    head = space.head_mask(p, mu)
    g = space.sum_no_grad(torch.stack([torch.where(head, gap, torch.zeros_like(gap)), gap]))
    g_head, g_total = g[0], g[1]
    w_head = torch.where(g_total > 0, g_head / torch.where(g_total > 0, g_total, torch.ones_like(g_total)),
                         torch.full_like(g_total, 0.5))
    return w_head, 1.0 - w_head


def adaptive_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, mu: float = 0.5, space: BucketSpace = _REPLICATED
) -> torch.Tensor:
    """Adaptive KL (AKL, Wu et al., "Rethinking KL Divergence in KD for LLMs", arXiv 2404.02657).

    Split the teacher's buckets into a *head* (the fewest largest probabilities whose
    cumulative mass reaches μ, tied probabilities kept together: a bucket is in the head
    iff the teacher mass strictly above it is below μ; :meth:`BucketSpace.head_mask`) and
    a *tail* (the rest), measure how far the student is on each, with the student detached::

        g_head = Σ_{v∈head} |p(v) − q(v)|,    g_tail = Σ_{v∉head} |p(v) − q(v)|
        AKL    = g_head/(g_head+g_tail) · KL(p‖q) + g_tail/(g_head+g_tail) · KL(q‖p)

    The weights are constants for autograd. Where ``p = q`` exactly (``g_head +
    g_tail = 0``, both KLs 0) the weights are set to ½ to avoid 0/0.
    """
    with torch.no_grad():
        w_head, w_tail = akl_weights(torch.exp(log_p), torch.exp(log_q), mu, space)
    kls = space.sum(torch.stack([_plogratio(log_p, log_q), _plogratio(log_q, log_p)]))
    # A zero weight must not turn an infinite KL into NaN.
    fkl = torch.where(w_head > 0, w_head * kls[0], torch.zeros_like(w_head))
    rkl = torch.where(w_tail > 0, w_tail * kls[1], torch.zeros_like(w_tail))
    return fkl + rkl


def divergence(
    loss_type: str,
    log_p: torch.Tensor,
    log_q: torch.Tensor,
    space: BucketSpace = _REPLICATED,
    *,
    jsd_beta: float = 0.5,
    skew_alpha: float = 0.1,
    akl_mu: float = 0.5,
) -> torch.Tensor:
    """Dispatch by name (one of :data:`LOSS_TYPES`) to the divergence above, ``[N]``."""
    if loss_type == "forward_kl":
        return forward_kl(log_p, log_q, space)
    if loss_type == "reverse_kl":
        return reverse_kl(log_p, log_q, space)
    if loss_type == "jsd":
        return generalized_jsd(log_p, log_q, jsd_beta, space)
    if loss_type == "skew_fkl":
        return skew_forward_kl(log_p, log_q, skew_alpha, space)
    if loss_type == "skew_rkl":
        return skew_reverse_kl(log_p, log_q, skew_alpha, space)
    if loss_type == "akl":
        return adaptive_kl(log_p, log_q, akl_mu, space)
    raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
