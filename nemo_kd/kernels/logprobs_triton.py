"""Fused Triton implementation of the vocab-parallel log-prob primitive.

Computes exactly what :func:`nemo_kd.losses.vocab_parallel.vocab_parallel_logprobs_at`
computes, for logits ``z`` ``[N, V_local]`` (this rank's shard, global ids
``[r·V_local, (r+1)·V_local)``), global ids ``[N, m]`` and inverse temperature ``s``::

    lse_n      = LSE_v(s·z_nv) = m_n + L_n     over the whole (sharded) vocabulary
    logprob_nj = (s·z_{n,id_nj} − m_n) − L_n   (m_n the row max, L_n = log Σ_v exp(s·z_nv − m_n))

    ∂L/∂z_nv   = s · ( Σ_j g_nj·[v = id_nj] + (g_lse_n − Σ_j g_nj) · exp(s·z_nv − lse_n) )

(relative to the row max, as the torch path: at |logits| ~ 1e4 ``s·z − lse`` would carry the
fp32 LSE's rounding, ulp(1e4) ≈ 1e-3, into every log-prob and softmax), but touches
``[N, V_local]`` the minimum number of times:

* forward: ONE pass over each row (one program per row, vector-wise online
  max / sum-exp in fp32), plus a gather of ``s·z`` at the ids this shard owns
  (ids owned by another rank contribute 0 here). TP combination is two small
  all-reduces: MAX of the local maxima ``[N]``, then SUM of
  ``[picked | sum-exp rescaled to the global max]`` ``[N, m + 1]``.
* backward: ONE pass over ``[N, V_local]`` writing ``s·coeff·exp(s·z − lse)``
  straight in the logits' dtype (into a fresh buffer, or over the logits
  themselves with ``inplace_backward=True``), then a tiny ``[N, m]`` pass that
  rewrites the entries at the owned ids with the exact value
  ``s·(coeff·exp(s·z_id − lse) + Σ_{j: id_j = id} g_j)``. That fix-up reads
  ``s·z_id`` from the fp32 values saved by the forward, not from the logits, so it
  is correct after the dense pass has overwritten them in place, and each entry
  is rounded to the output dtype once, as in the torch path.

Memory: besides the gradient buffer itself (none with ``inplace_backward``), the
extra memory is O(N·m) fp32 (the gathered values, the ``[N]`` statistics and the
small ``[N, m]`` loss-side tensors); rows are streamed by the kernels, so no token
chunking and no fp32 ``[N, V]`` copy is ever made.

Fully masked rows (every logit ``-inf`` on every rank): ``lse = -inf`` as in the
torch path, but the log-probs are defined as 0 and the softmax part of the
gradient as 0, so a fully masked (padding) row yields no NaN (the torch path
yields NaN there). ``scale`` must be positive. This module imports without
megatron-core or NeMo; on CPU tensors it needs ``TRITON_INTERPRET=1`` set before
it is first imported (Triton decides at decoration time).
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from nemo_kd.kernels.collectives import tp_rank, tp_world_size
from nemo_kd.kernels.common import check_fused_supported  # noqa: F401  (re-exported)
from nemo_kd.kernels.common import is_interpreted as _is_interpreted
from nemo_kd.kernels.common import store_out as _store_out

# Columns per program-iteration. 4096 fp32 lanes over 8 warps is 16 per thread: enough
# loads in flight per SM to saturate HBM on H100 without spilling the two online
# accumulators. Env overrides exist for tuning sweeps on the lent GPU.
FWD_BLOCK_V = int(os.environ.get("NEMO_KD_FUSED_FWD_BLOCK", 4096))
FWD_NUM_WARPS = int(os.environ.get("NEMO_KD_FUSED_FWD_WARPS", 8))
BWD_BLOCK_V = int(os.environ.get("NEMO_KD_FUSED_BWD_BLOCK", 4096))
BWD_NUM_WARPS = int(os.environ.get("NEMO_KD_FUSED_BWD_WARPS", 8))
# Most ids handled per vector in the gather / fix-up (a [BLOCK_J, BLOCK_J] compare sums
# duplicated ids). 64 measured slightly faster than 128 for m = 65 on H100 (0.21 vs 0.23 ms
# at N = 8192).
BLOCK_J = 64


@triton.jit
def _fwd_kernel(
    z_ptr, ids_ptr, max_ptr, sumexp_ptr, picked_ptr,
    V, M, stride_z, stride_ids, stride_picked, vocab_start, scale,
    BLOCK_V: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Per row: local max and sum-exp of s·z (relative to that max) and s·z at owned ids."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK_V)
    # Per-lane running max / sum: a lane-wise online softmax needs no cross-lane
    # reduction inside the loop; the lanes are merged once at the end.
    m_vec = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_vec = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        x = tl.load(z_row + c, mask=c < V, other=float("-inf")).to(tl.float32) * scale
        new_m = tl.maximum(m_vec, x)
        # Shift by 0 while a lane has only seen -inf, so exp(-inf - -inf) never appears.
        shift = tl.where(new_m == float("-inf"), 0.0, new_m)
        s_vec = s_vec * tl.exp(m_vec - shift) + tl.exp(x - shift)
        m_vec = new_m
    row_max = tl.max(m_vec, axis=0)
    row_shift = tl.where(row_max == float("-inf"), 0.0, row_max)
    row_sum = tl.sum(s_vec * tl.exp(m_vec - row_shift), axis=0)
    tl.store(max_ptr + row, row_max)
    tl.store(sumexp_ptr + row, row_sum)

    # Gather s·z at the ids this shard owns (0 for ids on other ranks' shards).
    js = tl.arange(0, BLOCK_J)
    for j0 in range(0, M, BLOCK_J):
        j = j0 + js
        jmask = j < M
        local = tl.load(ids_ptr + row * stride_ids + j, mask=jmask, other=-1) - vocab_start
        owned = jmask & (local >= 0) & (local < V)
        zj = tl.load(z_row + local, mask=owned, other=0.0).to(tl.float32) * scale
        tl.store(picked_ptr + row * stride_picked + j, tl.where(owned, zj, 0.0), mask=jmask)


@triton.jit
def _bwd_dense_kernel(
    z_ptr, grad_ptr, shift_ptr, ls_ptr, coeff_ptr,
    V, stride_z, stride_g, scale,
    BLOCK_V: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr,
):
    """grad[n, v] = s · coeff_n · exp((s·z_nv − m_n) − L_n), stored in grad's dtype (may alias z)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = c < V
    shift = tl.load(shift_ptr + row)
    ls = tl.load(ls_ptr + row)  # +inf for fully masked rows: the softmax part is 0 there
    coeff = tl.load(coeff_ptr + row)
    x = tl.load(z_ptr + row * stride_z + c, mask=mask, other=float("-inf")).to(tl.float32) * scale
    g = tl.exp((x - shift) - ls) * coeff
    g = g * scale
    _store_out(grad_ptr + row * stride_g + c, g, mask, EMULATE_RTNE_BF16)


@triton.jit
def _bwd_ids_kernel(
    grad_ptr, ids_ptr, gids_ptr, picked_ptr, shift_ptr, ls_ptr, coeff_ptr,
    V, M, stride_g, stride_ids, stride_gids, stride_picked, vocab_start, scale,
    BLOCK_J: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr,
):
    """Rewrite grad at owned ids: s·(coeff·exp((s·z_id − m) − L) + Σ_{j': id_j' = id_j} g_j').

    Duplicated ids get their g summed and the same value stored by each duplicate.
    Runs after the dense kernel (stream order), and never reads the logits.
    """
    row = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = j < M
    ids_row = ids_ptr + row * stride_ids
    gids_row = gids_ptr + row * stride_gids
    local = tl.load(ids_row + j, mask=jmask, other=-1) - vocab_start
    owned = jmask & (local >= 0) & (local < V)
    gsum = tl.zeros([BLOCK_J], tl.float32)
    k_base = tl.arange(0, BLOCK_J)
    for k0 in range(0, M, BLOCK_J):
        k = k0 + k_base
        kmask = k < M
        local_k = tl.load(ids_row + k, mask=kmask, other=-1) - vocab_start
        g_k = tl.load(gids_row + k, mask=kmask, other=0.0)
        same = (local[:, None] == local_k[None, :]) & kmask[None, :]
        gsum += tl.sum(tl.where(same, g_k[None, :], 0.0), axis=1)
    shift = tl.load(shift_ptr + row)
    ls = tl.load(ls_ptr + row)
    coeff = tl.load(coeff_ptr + row)
    x = tl.load(picked_ptr + row * stride_picked + j, mask=owned, other=float("-inf"))
    val = tl.exp((x - shift) - ls) * coeff + gsum
    val = val * scale
    _store_out(grad_ptr + row * stride_g + local, val, owned, EMULATE_RTNE_BF16)


class FusedVocabParallelLogProbsAt(torch.autograd.Function):
    """Autograd wrapper of the kernels; the TP reductions follow Megatron's
    ``reduce_from_tensor_model_parallel_region`` contract (forward all-reduce,
    identity backward), as in the torch path."""

    @staticmethod
    def forward(ctx, logits, ids, scale, group, inplace_backward):
        n, v_local = logits.shape
        m = ids.shape[1]
        block_j = min(BLOCK_J, triton.next_power_of_2(max(m, 1)))
        dev = logits.device
        tp = tp_world_size(group)
        vocab_start = tp_rank(group) * v_local
        row_max = torch.empty(n, dtype=torch.float32, device=dev)
        sumexp = torch.empty(n, dtype=torch.float32, device=dev)
        # picked and the rescaled sum-exp share one buffer so TP needs a single SUM all-reduce.
        packed = torch.empty(n, m + 1, dtype=torch.float32, device=dev)
        picked = packed[:, :m]
        if n > 0:
            _fwd_kernel[(n,)](
                logits, ids, row_max, sumexp, picked,
                v_local, m, logits.stride(0), ids.stride(0), packed.stride(0), vocab_start, scale,
                BLOCK_V=FWD_BLOCK_V, BLOCK_J=block_j, num_warps=FWD_NUM_WARPS,
            )
        if tp > 1:
            global_max = row_max.clone()
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
            shift = torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))
            # exp(-inf - shift) = 0 rescales the sum of a rank whose shard is all -inf.
            packed[:, m] = sumexp * torch.exp(row_max - shift)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
            sumexp = packed[:, m]
        else:
            shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        log_sum = torch.log(sumexp)
        dead = torch.isneginf(log_sum)  # fully masked rows: no distribution at all
        # Relative to the row max: (s·z_id − m) − L, not s·z_id − LSE (module docstring).
        logprobs = torch.where(dead[:, None], torch.zeros_like(picked), (picked - shift[:, None]) - log_sum[:, None])
        # The backward uses L = +inf on dead rows so exp((s·z − m) − L) = 0 without a branch.
        ls_bwd = torch.where(dead, torch.full_like(log_sum, float("inf")), log_sum)
        ctx.save_for_backward(logits, ids, picked, shift, ls_bwd)
        ctx.scale, ctx.vocab_start, ctx.inplace = scale, vocab_start, inplace_backward
        return logprobs, shift + log_sum

    @staticmethod
    def backward(ctx, grad_logprobs, grad_lse):
        logits, ids, picked, shift, ls_bwd = ctx.saved_tensors
        n, v_local = logits.shape
        m = ids.shape[1]
        block_j = min(BLOCK_J, triton.next_power_of_2(max(m, 1)))
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(n, m, dtype=torch.float32, device=logits.device)
        grad_logprobs = grad_logprobs.float().contiguous()
        coeff = -grad_logprobs.sum(dim=-1)
        if grad_lse is not None:
            coeff = coeff + grad_lse.float()
        coeff = coeff.contiguous()
        if ctx.inplace:
            grad = logits.detach()  # same storage: the caller promised the logits are dead
            # Triton's stores bypass autograd's version counter: bump it by hand so another node
            # that saved these logits (and runs later) fails loudly instead of reading gradients.
            torch.autograd.graph.increment_version(grad)
        else:
            grad = torch.empty((n, v_local), dtype=logits.dtype, device=logits.device)
        rtne = grad.dtype == torch.bfloat16 and _is_interpreted()
        if n > 0 and v_local > 0:
            _bwd_dense_kernel[(n, triton.cdiv(v_local, BWD_BLOCK_V))](
                logits, grad, shift, ls_bwd, coeff,
                v_local, logits.stride(0), grad.stride(0), ctx.scale,
                BLOCK_V=BWD_BLOCK_V, EMULATE_RTNE_BF16=rtne, num_warps=BWD_NUM_WARPS,
            )
        if n > 0 and m > 0:
            _bwd_ids_kernel[(n, triton.cdiv(m, block_j))](
                grad, ids, grad_logprobs, picked, shift, ls_bwd, coeff,
                v_local, m, grad.stride(0), ids.stride(0), grad_logprobs.stride(0), picked.stride(0),
                ctx.vocab_start, ctx.scale,
                BLOCK_J=block_j, EMULATE_RTNE_BF16=rtne, num_warps=4,
            )
        return grad, None, None, None, None


def fused_logprobs_at(
    logits: torch.Tensor,
    ids: torch.Tensor,
    scale: float = 1.0,
    group: Optional[dist.ProcessGroup] = None,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused ``(s·z_id − LSE(s·z) [N, m] fp32, LSE(s·z) [N] fp32)`` over the TP-sharded vocabulary.

    Same contract as ``vocab_parallel_logprobs_at`` (ids ``[N, m]`` or ``[N]``, any
    rank's shard). ``inplace_backward=True`` writes the gradient over ``logits``
    (which must then not be used by anything else after this backward); the version
    counter is bumped, so another autograd node that saved the logits fails loudly.
    """
    check_fused_supported(logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_shard], got shape {tuple(logits.shape)}")
    if not scale > 0:
        raise ValueError(f"impl='fused' needs a positive scale, got {scale}")
    squeeze = ids.dim() == 1
    ids2 = ids[:, None] if squeeze else ids
    if ids2.shape[0] != logits.shape[0]:
        raise ValueError(f"ids has {ids2.shape[0]} rows but logits has {logits.shape[0]}")
    if logits.stride(-1) != 1:
        if inplace_backward:
            raise ValueError("inplace_backward=True needs logits with unit column stride")
        logits = logits.contiguous()
    ids2 = ids2.to(device=logits.device, dtype=torch.int64).contiguous()
    logprobs, lse = FusedVocabParallelLogProbsAt.apply(logits, ids2, float(scale), group, bool(inplace_backward))
    return (logprobs[:, 0] if squeeze else logprobs), lse
