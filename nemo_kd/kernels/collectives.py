"""Tensor-parallel collectives over a vocabulary-sharded tensor, shared by the kernels and the losses.

Rank ``r`` of a TP group of size ``TP`` holds vocabulary columns ``[r·V/TP, (r+1)·V/TP)``
(Megatron's ``ColumnParallelLinear`` output layer; :mod:`nemo_kd.losses.vocab_parallel`).
``group=None`` (or torch.distributed not initialised) is one rank holding the whole vocabulary.

These live below :mod:`nemo_kd.losses` because the Triton launch helpers of
:mod:`nemo_kd.kernels` need them too, and outside :mod:`nemo_kd.parallel` because that
package imports Megatron when it is imported (process-group bootstrap), which the losses
must not: this module needs torch.distributed only (no Megatron, no Triton).

The differentiable sum follows Megatron's ``reduce_from_tensor_model_parallel_region``
contract: the forward all-reduces, the backward is the identity (every rank then computes
the same replicated loss from the reduced value, so ``∂L/∂(local part) = ∂L/∂(total)``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

ProcessGroup = Optional[dist.ProcessGroup]


def tp_world_size(group: ProcessGroup) -> int:
    """Ranks in the TP ``group`` (1 for ``None`` or without torch.distributed)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def tp_rank(group: ProcessGroup) -> int:
    """This rank's index in the TP ``group`` (0 for ``None`` or without torch.distributed)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def all_gather_vocab(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """The vocab shards ``[..., V/TP]`` of every rank, concatenated in rank order ``[..., V]``
    (no gradient: for small tensors such as one position's logits or top-k candidates)."""
    world = tp_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def all_reduce_no_grad(x: torch.Tensor, op=dist.ReduceOp.SUM, group: ProcessGroup = None) -> torch.Tensor:
    """In-place all-reduce over ``group`` of a tensor outside autograd (a statistic)."""
    if tp_world_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


class _AllReduceSumIdentityBackward(torch.autograd.Function):
    """Sum a per-rank partial over ``group``; identity backward (see module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def all_reduce_sum(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """Differentiable sum of per-rank partials (forward all-reduce, identity backward)."""
    if tp_world_size(group) == 1:
        return x
    return _AllReduceSumIdentityBackward.apply(x, group)
