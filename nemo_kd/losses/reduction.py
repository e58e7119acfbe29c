"""Loss normalisation that stays exact under microbatches, gradient accumulation and DP.

The bug class this module exists to avoid: a training step sees a *global batch*
split into ``M`` microbatches on each of ``DP`` data-parallel ranks. If every
microbatch returns its own token mean ``Σ_t m·ℓ / n_mb`` and the framework averages
those over microbatches and ranks, tokens in a microbatch with few completion
tokens weigh more than tokens in a long one: the result is *not* the token mean
of the global batch (and it changes with the microbatch split).

The fix is to write every reduction as one global ratio::

    L = Σ_{dp ranks} Σ_{microbatches} numerator_mb  /  Σ_{dp ranks} Σ_{microbatches} count_mb

:func:`loss_parts` returns ``(numerator_mb, count_mb)`` for one microbatch;
:func:`global_count` is the denominator (all local microbatches' counts,
all-reduced over DP outside autograd); :func:`contribution` is
``numerator_mb / global_count``, so summing contributions over microbatches and
DP ranks gives exactly ``L`` — values and gradients. The three reductions:

``"token"``
    mean over every loss token of the global batch:
    ``numerator = Σ_{b,t} m_bt·ℓ_bt``, ``count = Σ_{b,t} m_bt``.
``"sequence"``
    mean over sequences of each sequence's token mean; sequences with no loss
    token are skipped (they are in neither sum):
    ``numerator = Σ_{b: n_b>0} (Σ_t m_bt·ℓ_bt)/n_b``, ``count = #{b: n_b > 0}``.
    For per-sequence losses (preference pairs, ``[B]`` values with a ``[B]``
    validity mask) use ``"token"`` on the ``[B]`` tensor: it averages over the
    valid sequences.
``"batch"``
    the legacy per-microbatch mean: the mean over *all* microbatches of the
    global batch (every DP rank, empty ones included, contributing 0) of each
    microbatch's own token mean:
    ``numerator = (Σ m·ℓ)/max(Σ m, 1)``, ``count = 1``.
    This is what Megatron computes when ``loss_func`` returns
    ``(loss_sum, num_tokens, ...)`` with ``calculate_per_token_loss=False`` and
    what NeMo-Aligner's KD does; it depends on how the batch is split. Use it
    only to reproduce such runs.

Megatron-core 0.16.1 contract (``pipeline_parallel/schedules.py::forward_step_calc_loss``,
``distributed/finalize_model_grads.py::finalize_model_grads``,
``distributed/distributed_data_parallel.py``) — how a ``loss_func`` must return
these so the final gradient is the gradient of ``L``:

(A) **Recommended: ``TransformerConfig.calculate_per_token_loss=True``.**
    ``loss_func`` returns the 3-tuple ``(parts.numerator, parts.count.int(), logs)``.
    The schedule then applies no scaling to the loss; DDP sums gradients over the
    DP×CP group (``gradient_scaling_factor = 1``; ``average_in_collective`` must be
    off); the schedule sums ``count`` over the local microbatches, and
    ``finalize_model_grads`` broadcasts it from the last PP stage, all-reduces it
    over DP×CP and multiplies every gradient by ``1 / Σcount``. The result is
    ``∇L`` exactly, for any reduction above, without knowing the global count in
    advance. (MoE aux / MTP losses are then scaled by the framework differently:
    see ``forward_step_calc_loss``.)

(B) ``calculate_per_token_loss=False`` with a **2-tuple** ``(loss, logs)``.
    The schedule multiplies the loss by the CP size and divides it by
    ``num_microbatches`` ``M``; DDP then averages gradients over DP×CP
    (``1/(DP·CP)``). Net factor per microbatch: ``1/(M·DP)``. So return
    ``contribution(per_token, mask, global_count(all_local_masks, reduction, dp_group), reduction)
    * M * DP`` (``DP`` without CP; with CP the counts of all CP ranks must be in
    ``global_count``, i.e. pass the DP×CP group). This needs the masks of all of
    this step's local microbatches *before* the first backward (peek the data
    iterator).

(C) ``calculate_per_token_loss=False`` with a **3-tuple** ``(loss_sum, num_tokens, logs)``:
    the schedule divides by ``max(num_tokens, 1)`` and by ``M``, and DDP averages
    over DP: that is ``reduction="batch"`` — do not use it for a token mean.

Context parallelism shards each sequence over CP ranks: ``"token"`` stays exact
under (A)/(B) (partial sums add up; :func:`global_count` over the DP×CP group), but
``"sequence"`` needs each sequence's full sum and length, which a CP rank does not
have; it is refused under CP. A per-sequence quantity that a nonlinear loss reads
(a sample's log-prob in a preference pair) is summed over the CP group with
:func:`sum_over_ranks`, whose backward suits a loss that every CP rank computes
alike and adds ``1/CP`` of (:mod:`nemo_kd.losses.objective`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence, Union

import torch
import torch.distributed as dist

from nemo_kd.losses.vocab_parallel import ProcessGroup

Reduction = Literal["token", "sequence", "batch"]
REDUCTIONS = ("token", "sequence", "batch")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: Optional[Union[int, tuple]] = None) -> torch.Tensor:
    """``Σ mask·values`` over ``dim`` (all dims when ``None``).

    Masked positions are *selected away* (``torch.where``), not multiplied by 0,
    so a ``-inf``/``NaN`` value at a masked position neither poisons the sum nor
    its gradient. ``mask`` is bool or 0/1 of ``values``' shape.
    """
    kept = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def mask_count(mask: torch.Tensor, dim: Optional[Union[int, tuple]] = None) -> torch.Tensor:
    """Number of kept positions (int64), over ``dim`` (all dims when ``None``)."""
    m = mask.bool()
    return m.sum(dtype=torch.int64) if dim is None else m.sum(dim=dim, dtype=torch.int64)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: Optional[Union[int, tuple]] = None) -> torch.Tensor:
    """``Σ mask·values / Σ mask`` over ``dim``; an empty selection gives 0 (zero gradient), not NaN."""
    count = mask_count(mask, dim).clamp(min=1).to(values.dtype)
    return masked_sum(values, mask, dim) / count


@dataclass(frozen=True)
class LossParts:
    """One microbatch's share of a globally normalised loss ``Σ numerator / Σ count``.

    ``numerator``: differentiable scalar. ``count``: int64 scalar, outside autograd.
    """

    numerator: torch.Tensor
    count: torch.Tensor


def loss_parts(per_token: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "token") -> LossParts:
    """``(numerator, count)`` of one microbatch for ``reduction`` (see module docstring).

    Args:
        per_token: ``[B, T]`` per-token losses (or ``[B]`` per-sequence losses with
            ``reduction="token"``).
        mask: same shape, which positions enter the loss.
    """
    _check_reduction(reduction)
    if reduction == "token":
        return LossParts(masked_sum(per_token, mask), mask_count(mask))
    if reduction == "sequence":
        if per_token.dim() != 2:
            raise ValueError(f"reduction='sequence' needs [B, T] per-token values, got {tuple(per_token.shape)}")
        lengths = mask_count(mask, dim=-1)
        seq_means = masked_mean(per_token, mask, dim=-1)  # 0 for empty rows
        return LossParts(seq_means.sum(), (lengths > 0).sum(dtype=torch.int64))
    # "batch": this microbatch's own token mean, one unit of the count.
    return LossParts(masked_mean(per_token, mask), torch.ones((), dtype=torch.int64, device=per_token.device))


def local_count(mask: torch.Tensor, reduction: Reduction = "token") -> torch.Tensor:
    """The ``count`` of :func:`loss_parts` from the mask alone (int64 scalar)."""
    _check_reduction(reduction)
    if reduction == "token":
        return mask_count(mask)
    if reduction == "sequence":
        return (mask_count(mask, dim=-1) > 0).sum(dtype=torch.int64)
    return torch.ones((), dtype=torch.int64, device=mask.device)


@torch.no_grad()
def global_count(
    masks: Union[torch.Tensor, Sequence[torch.Tensor]],
    reduction: Reduction = "token",
    dp_group: ProcessGroup = None,
) -> torch.Tensor:
    """The global denominator: counts of all local microbatches, summed over ``dp_group``.

    Args:
        masks: the loss masks of *every* microbatch this rank processes in the
            step (a single tensor means one microbatch).
        dp_group: the data-parallel group (DP×CP under context parallelism);
            ``None``: no reduction (one DP rank) — as for the TP ``group`` elsewhere,
            ``None`` never means the world group, which would also count TP/PP peers.

    Returns:
        int64 scalar, identical on every DP rank; no autograd.
    """
    if isinstance(masks, torch.Tensor):
        masks = [masks]
    if len(masks) == 0:
        raise ValueError("global_count needs the masks of at least one microbatch")
    total = torch.zeros((), dtype=torch.int64, device=masks[0].device)
    for m in masks:
        total += local_count(m, reduction)
    if dp_group is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=dp_group)
    return total


def contribution(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    global_normaliser: torch.Tensor,
    reduction: Reduction = "token",
) -> torch.Tensor:
    """This microbatch's share ``numerator_mb / global_normaliser`` of the global loss.

    Summed over all microbatches and DP ranks (e.g. gradient accumulation, then the
    DP gradient all-*sum*) it equals the global ``reduction`` mean exactly. A zero
    global normaliser (nothing to learn from in the whole batch) gives 0.
    """
    parts = loss_parts(per_token, mask, reduction)
    denom = torch.as_tensor(global_normaliser, device=parts.numerator.device).clamp(min=1)
    return parts.numerator / denom.to(parts.numerator.dtype)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward is an all-reduce (sum) of the ranks' upstream gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_over_ranks(partial: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``Σ_r partial_r`` over ``group`` (the CP group), the same total on every rank, differentiable.

    For a loss ``ℓ(total)`` of which every rank of ``group`` adds ``1/n`` (so that their losses sum to
    ``ℓ``): the backward sums the ranks' upstream gradients ``∂ℓ/∂total / n`` into the whole
    ``∂ℓ/∂total`` at each rank's partial sum, which carries it into that rank's own positions; the
    gradient all-reduce over the group (DDP's, over DP×CP) then makes it ``∂ℓ/∂θ``. (An identity
    backward, :func:`~nemo_kd.losses.vocab_parallel.all_reduce_sum`, would give ``1/n`` of it.) Every
    rank must call it alike, forward and backward: two collectives. ``None`` or one rank: ``partial``."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return partial
    return _SumOverRanks.apply(partial, group)
