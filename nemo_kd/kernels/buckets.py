"""Where the buckets of a divergence live, and how to sum them: :class:`BucketSpace`.

A divergence of :mod:`nemo_kd.losses.divergences` compares a teacher ``p`` and a student
``q`` over the last dim of ``[N, B]`` tensors, its *buckets*: vocabulary entries, a
teacher's top-k ids, or the tail outside them. :meth:`BucketSpace.replicated` (every rank
holds all ``B``: top-k losses) sums them locally; :meth:`BucketSpace.sharded` (the
tensor-parallel vocabulary shard ``[N, V/TP]``: full-vocab losses) adds one all-reduce over
the TP group. It also holds AKL's head rule (:meth:`BucketSpace.head_mask`), which every
path implements, the fused kernel's fallback included.

A data type both the losses and the kernels' launch helpers
(:mod:`nemo_kd.kernels.full_kd_triton`) need, so it lives here, below :mod:`nemo_kd.losses`
(torch only: no Triton).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_kd.kernels.collectives import (
    ProcessGroup,
    all_gather_vocab,
    all_reduce_no_grad,
    all_reduce_sum,
    tp_world_size,
)

# AKL's head threshold is read off each row's top-HEAD_TOPK probabilities when their mass reaches μ
# (a top-1024 costs about one pass over a 32k row on CPU, as a top-64 does; it covers flat teachers too)
# (BucketSpace.mass_threshold); flatter rows take the bisection. The fused kernel's AKL_TOPK likewise.
HEAD_TOPK = 1024


@dataclass(frozen=True)
class BucketSpace:
    """Where the buckets (last dim) of ``log_p`` / ``log_q`` live, i.e. how to sum them.

    Use :meth:`replicated` (all buckets on every rank) or :meth:`sharded` (buckets
    split across the TP ``group`` as the vocabulary is).
    """

    is_sharded: bool = False
    group: ProcessGroup = None

    @classmethod
    def replicated(cls) -> "BucketSpace":
        return cls(is_sharded=False, group=None)

    @classmethod
    def sharded(cls, group: ProcessGroup) -> "BucketSpace":
        return cls(is_sharded=True, group=group)

    @property
    def _distributed(self) -> bool:
        return self.is_sharded and tp_world_size(self.group) > 1

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Differentiable sum over all buckets (last dim), ``[..., B] -> [...]``."""
        local = x.sum(dim=-1)
        return all_reduce_sum(local, self.group) if self._distributed else local

    def sum_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over all buckets of a statistic (no autograd)."""
        local = x.detach().sum(dim=-1)
        return all_reduce_no_grad(local, dist.ReduceOp.SUM, self.group) if self._distributed else local

    def max_no_grad(self, x: torch.Tensor) -> torch.Tensor:
        """Max over all buckets of a statistic (no autograd)."""
        local = x.detach().max(dim=-1).values
        return all_reduce_no_grad(local, dist.ReduceOp.MAX, self.group) if self._distributed else local

    @torch.no_grad()
    def head_mask(self, p: torch.Tensor, mu: float) -> torch.Tensor:
        """AKL's head: the fewest largest teacher probabilities whose cumulative mass reaches ``mu``.

        The paper (Wu et al., arXiv 2404.02657, §4) sorts ``p`` descending and takes the
        top ``M`` tokens, ``M = min{m : Σ_{j≤m} p_(j) ≥ μ}``. A sort order is arbitrary among
        tied probabilities (bf16 teachers tie often), so the rule used on every path — top-k,
        full vocabulary torch, the fused kernel's fast path and its bisection fallback — is
        the order-free form of that definition: a token is in the head iff the teacher mass
        strictly above it is below μ::

            head = {v : Σ_{u: p_u > p_v} p_u < μ}  ∪  {v : p_v = max p}
                 = {v : p_v ≥ t*},   t* = max{t : F(t) ≥ μ},   F(t) = Σ_{u: p_u ≥ t} p_u

        Without ties this is exactly the paper's top ``M``; a group of tied probabilities
        that straddles μ is entirely in the head (the group's first member is in by the
        paper's rule, and its members are indistinguishable). The union with the argmax only
        matters at μ = 0 (the paper's ``M ≥ 1``). (The authors' released ``get_ratio`` uses
        ``cumsum ≤ μ`` with the top-1 forced in, i.e. it leaves out the token that reaches
        μ; the paper's text is followed here.)

        Returns a bool mask ``[N, B]`` in the bucket order of ``p`` (this rank's buckets when
        sharded). ``t*`` comes from :meth:`mass_threshold` (the top-:data:`HEAD_TOPK` prefix, else a bisection).
        """
        return (p >= self.mass_threshold(p, mu)[:, None]) | (p >= self.max_no_grad(p)[:, None])

    def mass_threshold(self, p: torch.Tensor, mu: float) -> torch.Tensor:
        """``t* = max{t ≥ 0 : F(t) ≥ μ}``, ``F(t) = Σ_{u: p_u ≥ t} p_u``, per row of ``p`` ``[N, B]``.

        ``F`` is non-increasing and constant between consecutive values of ``p``, so ``t*`` is
        the probability of the token whose mass reaches μ (:meth:`head_mask`). Read off the
        row's (global) top-:data:`HEAD_TOPK` values, sorted descending ``s_1 ≥ s_2 ≥ …``:
        ``t* = s_j`` for the first ``j`` whose prefix mass (float64) reaches μ — every value
        above ``s_j`` sits before ``j``, so ``F(t) < μ`` for ``t > s_j``, and ``F(s_j)`` holds the
        prefix, ties included, however a sort ordered them (the fused kernel's fast path).
        Rows whose top-k mass stays below μ take :meth:`_mass_threshold_bisection` (same answer).
        """
        n, b = p.shape
        k = min(HEAD_TOPK, b * (tp_world_size(self.group) if self._distributed else 1))
        top = p.detach().topk(min(k, b), dim=-1).values
        if self._distributed:  # the global top-k is among the ranks' top-k
            top = all_gather_vocab(top.contiguous(), self.group).topk(k, dim=-1).values
        before = (torch.cumsum(top.to(torch.float64), dim=-1) < mu).sum(-1)  # replicated on the ranks
        t = top.gather(-1, before.clamp(max=k - 1)[:, None])[:, 0]
        open_rows = torch.nonzero(before >= k).flatten()
        if open_rows.numel():
            t = t.clone()
            t[open_rows] = self._mass_threshold_bisection(p[open_rows], mu)
        return t

    def _mass_threshold_bisection(self, p: torch.Tensor, mu: float) -> torch.Tensor:
        """:meth:`mass_threshold` by bisection on the *bit pattern* of the non-negative float ``t``
        (monotone in its value): ~30 (fp32) or ~62 (fp64) steps, each one ``[N]`` all-reduce when
        sharded, give the exact float. ``F`` is accumulated in float64, so whether the mass reaches
        μ does not depend on a path's summation order. A row whose whole mass is below μ
        gets ``t* = 0`` (every token's mass above is below μ: all in).
        """
        int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[p.dtype]
        one_bits = int(torch.tensor(1.0, dtype=p.dtype).view(int_dtype))
        n = p.shape[0]
        # Invariant: F(float(lo)) ≥ μ (or lo = bits(0.0)), F(float(hi)) < μ (hi > bits(1.0) ≥ bits(max p): F = 0);
        # the answer is lo once hi − lo = 1.
        lo = torch.zeros((n,), dtype=torch.int64, device=p.device)
        hi = torch.full((n,), one_bits + 1, dtype=torch.int64, device=p.device)
        zero = torch.zeros((), dtype=p.dtype, device=p.device)
        for _ in range(math.ceil(math.log2(one_bits + 1))):
            mid = (lo + hi) // 2
            t = mid.to(int_dtype).view(p.dtype)
            ok = self.sum_no_grad(torch.where(p >= t[:, None], p, zero).to(torch.float64)) >= mu
            active = hi - lo > 1  # rows already converged keep [lo, hi)
            lo = torch.where(active & ok, mid, lo)
            hi = torch.where(active & ~ok, mid, hi)
        return lo.to(int_dtype).view(p.dtype)
