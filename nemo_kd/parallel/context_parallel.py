"""Context parallelism's layout: which positions of a row each context-parallel (CP) rank holds.

Megatron-core splits every row of ``S`` positions over the ``CP`` ranks of a context-parallel group
in ``2·CP`` equal chunks and gives CP rank ``r`` chunks ``r`` and ``2·CP − 1 − r``
(``megatron.core.utils.get_batch_on_this_cp_rank``): under a causal mask the early chunks are cheap
and the late ones dear, so each rank gets one of each and the attention work is balanced. The
model's RoPE follows the same split by itself (``RotaryEmbedding.forward`` builds the embedding of
the ``S = S_local · CP`` global positions and keeps this rank's chunks,
``rope_utils.get_pos_emb_on_this_cp_rank``), and TE's context-parallel attention exchanges keys and
values in that layout.

:func:`slice_for_cp_rank` is Megatron's split of one tensor along its sequence dimension,
:func:`gather_from_cp_ranks` its inverse (the ranks' slices back into whole rows) and
:func:`positions_on_cp_rank` the global positions a rank holds. No process group is needed: they are
pure functions of ``(cp_rank, cp_size)``. What a microbatch's tensors are (per position or not) is the
data layer's business (:mod:`nemo_kd.data.context_parallel`).

Reductions over the CP group (token counts, a sample's log-prob held by several ranks) are the
objective's (:mod:`nemo_kd.losses.reduction`, :mod:`nemo_kd.losses.objective`).
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["cp_chunks", "positions_on_cp_rank", "slice_for_cp_rank", "gather_from_cp_ranks", "check_cp_divisible"]


def cp_chunks(cp_rank: int, cp_size: int) -> tuple:
    """The two chunk numbers (of ``2·cp_size``) CP rank ``cp_rank`` holds, in the order it holds them."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must lie in [0, {cp_size}), got {cp_rank}")
    return cp_rank, 2 * cp_size - 1 - cp_rank


def check_cp_divisible(seq_length: int, cp_size: int, what: str = "the row length") -> None:
    """Megatron's split needs rows of a multiple of ``2·cp_size`` positions."""
    if seq_length % (2 * cp_size):
        raise ValueError(f"context_parallel_size={cp_size} cuts every row in 2 x {cp_size} = {2 * cp_size} equal "
                         f"chunks: {what} ({seq_length}) must be divisible by {2 * cp_size}")


def positions_on_cp_rank(seq_length: int, cp_rank: int, cp_size: int, device=None) -> torch.Tensor:
    """``[seq_length / cp_size]`` int64: the global positions CP rank ``cp_rank`` holds, in its order."""
    check_cp_divisible(seq_length, cp_size)
    chunk = seq_length // (2 * cp_size)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in cp_chunks(cp_rank, cp_size)])


def slice_for_cp_rank(tensor: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """``tensor``'s positions on CP rank ``cp_rank`` along ``dim`` (Megatron's ``get_batch_on_this_cp_rank``
    for one tensor): ``[..., S, ...]`` -> ``[..., S / cp_size, ...]``, chunks ``r`` then ``2·CP − 1 − r``."""
    if cp_size == 1:
        return tensor
    dim = dim % tensor.dim()
    s = tensor.shape[dim]
    check_cp_divisible(s, cp_size, f"dimension {dim} of a {tuple(tensor.shape)} tensor")
    chunked = tensor.reshape(*tensor.shape[:dim], 2 * cp_size, s // (2 * cp_size), *tensor.shape[dim + 1:])
    index = torch.tensor(cp_chunks(cp_rank, cp_size), device=tensor.device)
    kept = chunked.index_select(dim, index)
    return kept.reshape(*tensor.shape[:dim], s // cp_size, *tensor.shape[dim + 1:])


def gather_from_cp_ranks(slices: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`slice_for_cp_rank`: ``slices[r]`` is CP rank ``r``'s share (all of them, in rank
    order); returns the whole rows, every chunk back at its place."""
    cp_size = len(slices)
    if cp_size == 1:
        return slices[0]
    dim = dim % slices[0].dim()
    chunks = [None] * (2 * cp_size)
    for r, part in enumerate(slices):
        if part.shape != slices[0].shape:
            raise ValueError(f"CP rank {r}'s slice {tuple(part.shape)} differs from rank 0's {tuple(slices[0].shape)}")
        first, second = part.chunk(2, dim=dim)
        a, b = cp_chunks(r, cp_size)
        chunks[a], chunks[b] = first, second
    return torch.cat(chunks, dim=dim)

