"""Vocab-parallel log-probability primitives.

Every loss in :mod:`nemo_kd.losses` sees the student's logits the way Megatron's
``ColumnParallelLinear`` output layer produces them: each tensor-parallel (TP) rank
holds a contiguous vocabulary shard ``[tokens, V / TP]``, rank ``r`` owning global
ids ``[r * V/TP, (r + 1) * V/TP)``. Nothing here gathers the full vocabulary.

Two primitives carry all the vocabulary-sized work:

* :func:`vocab_parallel_logprobs_at` – for each token, the student's log-softmax
  ``log q(v) = s·z_v − LSE_u(s·z_u)`` at a handful of *global* ids (the label, the
  teacher's top-k ids, ...) plus the log-sum-exp itself. Ids may live on any rank's
  shard: each rank contributes the ids it owns and one all-reduce completes them.
  Log-probs are formed relative to the row max, ``(s·z_v − m) − log Σ_u exp(s·z_u − m)``
  (:func:`_global_row_shift`: exact at |logits| ~ 1e4, where ``s·z_v − LSE`` is not).
  It runs in token chunks, accumulates in fp32 whatever the logits' dtype, keeps
  no fp32 copy of ``[tokens, vocab]`` for backward (only the logits and ``[tokens]``
  statistics), and writes its gradient straight into one buffer of the logits'
  dtype::

      ∂L/∂z_v = s · ( Σ_j g_j·[v = id_j] + (g_lse − Σ_j g_j) · softmax(s·z)_v )

  where ``g_j = ∂L/∂log q(id_j)`` and ``g_lse = ∂L/∂LSE``. With
  ``inplace_backward=True`` that buffer is the logits' own storage (no second
  ``[tokens, V/TP]`` tensor); see :func:`logits_overwrite_blocker` for when that is safe.

* :func:`vocab_parallel_log_softmax` – the full log-softmax of the local shard in
  fp32 (differentiable), for losses against a full (online) teacher distribution.

The TP reductions follow Megatron's ``reduce_from_tensor_model_parallel_region``
contract: the forward all-reduces, the backward is the identity. That is right
because every rank then computes the same (replicated) loss from the reduced
value, so ``∂L/∂(local part) = ∂L/∂(total)`` on each rank. Never all-reduce the
final, already replicated loss differentiably: that multiplies gradients by TP
(a known bug class in public trainers; our TP=2 tests check gradients, not only
values).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

# The TP collectives live one layer down (the kernels' launch helpers use them too); imported
# here so that every loss finds the vocab-parallel toolkit in one place.
from nemo_kd.kernels.collectives import (  # noqa: F401  (re-exported)
    ProcessGroup,
    all_gather_vocab,
    all_reduce_no_grad,
    all_reduce_sum,
    tp_rank,
    tp_world_size,
)

# Tokens processed per chunk inside the fused log-prob primitive. Bounds the fp32
# scratch memory to chunk × V/TP floats whatever the sequence length.
DEFAULT_TOKEN_CHUNK = 4096
# On CPU the chunk is sized by elements instead (rows × V/TP): its fp32 scratch (16 MiB, 131 rows at
# V = 32k) stays far below the logits' own size, so the in-place gradient leaves the peak at the logits
# (a 4096-row fp32 copy of bf16 logits was 2× them). Measured at N = 2048, V = 32k, k = 64, forward +
# backward (same process, min of 3): 131-row chunks as fast as 4096 rows (1065 vs 1090 ms
# fp32), 8-row chunks (2^18 elements) 1.5× slower: per-chunk overhead, not cache, sets the pace here.
CPU_TOKEN_CHUNK_ELEMENTS = 2**22


def default_token_chunk(v_local: int, device: torch.device) -> int:
    """Rows per chunk of :func:`vocab_parallel_logprobs_at`'s torch path for a ``[N, v_local]`` shard."""
    if device.type == "cuda":
        return DEFAULT_TOKEN_CHUNK
    return max(1, CPU_TOKEN_CHUNK_ELEMENTS // max(1, v_local))


def vocab_shard_range(local_vocab: int, group: ProcessGroup) -> Tuple[int, int]:
    """Global ``[start, end)`` ids held by this rank for an evenly split vocabulary."""
    start = tp_rank(group) * local_vocab
    return start, start + local_vocab


def valid_vocab_columns(v_local: int, vocab_start: int, vocab_size: Optional[int]) -> int:
    """How many of this shard's columns are real vocabulary (Megatron pads V to a multiple)."""
    if vocab_size is None:
        return v_local
    return max(0, min(v_local, vocab_size - vocab_start))


# The logit of a padded vocabulary column (an id >= the real vocabulary size) in a loss: finite,
# so no inf - inf or 0 * inf arises in any divergence (log-space mixtures, AKL's sort, scaling by
# logits_scale / 1 / T), yet exp(PADDED - max) underflows to exactly 0 in fp16 .. fp64: the
# column carries no probability and gets exactly zero gradient. fp16 takes its own finfo.min.
PADDED_VOCAB_LOGIT = -1e30


def fill_padded_vocab_(logits_shard: torch.Tensor, valid_columns: int) -> torch.Tensor:
    """Write :data:`PADDED_VOCAB_LOGIT` over columns ``valid_columns:`` of ``logits_shard``, in place."""
    if valid_columns < logits_shard.shape[-1]:
        logits_shard[..., valid_columns:] = max(PADDED_VOCAB_LOGIT, torch.finfo(logits_shard.dtype).min)
    return logits_shard


def padded_vocab_valid_columns(v_local: int, vocab_size: Optional[int], group: ProcessGroup) -> Optional[int]:
    """This rank's count of real-vocabulary columns in its ``v_local``-wide shard; None when all are."""
    valid = valid_vocab_columns(v_local, vocab_shard_range(v_local, group)[0], vocab_size)
    return None if valid == v_local else valid


def mask_padded_vocab_(logits_shard: torch.Tensor, vocab_size: Optional[int], group: ProcessGroup) -> torch.Tensor:
    """Megatron pads the vocabulary to a multiple of 128·TP; a model imported from Hugging Face has
    zero rows there (logit 0, real probability mass next to negative logits), one trained by Megatron
    has rows pushed down by the loss. Neither is a token: a loss or a metric over ``[..., V/TP]``
    logits must not see them. In place (autograd records the copy: the gradient there is 0)."""
    valid = padded_vocab_valid_columns(logits_shard.shape[-1], vocab_size, group)
    return fill_padded_vocab_(logits_shard, valid) if valid is not None else logits_shard


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64 inputs (exact references, gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _global_row_shift(z: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``m = max_v z_v`` ``[n]`` over the full (sharded) vocabulary of ``z`` [n, V_local]
    (one MAX all-reduce over TP), 0 on rows with no finite entry.

    Log-probs are formed relative to it, ``(z_v − m) − log Σ_u exp(z_u − m)``, never as
    ``z_v − LSE``: at |z| ~ 1e4 the fp32 LSE is rounded to ulp(1e4) ≈ 1e-3, which ``z_v − LSE``
    carries into every log-prob (a nearly converged token reads KL = 0 with zero gradient),
    while ``z_v − m`` is exact near the top and ``log Σ exp(z − m) ∈ [0, log V]`` is
    accurate to ~1e-7.
    """
    local_max = z.max(dim=-1).values if z.shape[-1] > 0 else z.new_full(z.shape[:1], float("-inf"))
    global_max = all_reduce_no_grad(local_max, dist.ReduceOp.MAX, group)
    return torch.where(torch.isfinite(global_max), global_max, torch.zeros_like(global_max))


def _global_log_sum(exp_x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``log Σ_v exp_x`` ``[n]`` over the full (sharded) vocabulary, given ``exp_x = exp(z − m)``
    [n, V_local] (one SUM all-reduce over TP); −inf on rows that are −inf everywhere."""
    return torch.log(all_reduce_no_grad(exp_x.sum(dim=-1), dist.ReduceOp.SUM, group))


def _local_gather(z: torch.Tensor, ids: torch.Tensor, vocab_start: int) -> torch.Tensor:
    """z at global ``ids`` for the ids this shard owns, 0 elsewhere (fp32)."""
    local_ids = ids - vocab_start
    owned = (local_ids >= 0) & (local_ids < z.shape[-1])
    picked = torch.gather(z, -1, local_ids.clamp(0, z.shape[-1] - 1))
    return torch.where(owned, picked, torch.zeros_like(picked))


def logits_overwrite_blocker(logits: torch.Tensor) -> Optional[str]:
    """Why ``logits``' storage may NOT receive their gradient in place (``None``: it may).

    In-place backward overwrites the logits with ``∂L/∂logits`` while autograd runs, so
    the storage must belong to an autograd intermediate that nothing reads after this
    loss's backward. What can be checked here is checked: the tensor requires grad under
    grad mode, and its storage's root tensor (``_base`` of a view) is not a leaf — a leaf
    is user data or a parameter, never to be overwritten (a slice ``x[s]`` of a leaf ``x``
    counts as the leaf). The rest is the caller's contract: other *autograd* users of the
    storage whose backward runs later fail loudly, because the in-place write bumps the
    shared version counter ("modified by an inplace operation"); plain Python reads of
    the logits after ``backward()`` are not detectable and must not exist.
    """
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return "the logits do not require grad here (no backward to write)"
    root = logits if logits._base is None else logits._base
    if root.is_leaf:
        return "the logits' storage belongs to a leaf tensor (user data or a parameter), never overwritten"
    return None


class _VocabParallelLogProbsAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, ids, scale, group, token_chunk, inplace):
        n, v_local = logits.shape
        vocab_start = vocab_shard_range(v_local, group)[0]
        acc = accumulation_dtype(logits.dtype)
        shift = torch.empty(n, dtype=acc, device=logits.device)
        log_sum = torch.empty(n, dtype=acc, device=logits.device)
        picked = torch.empty(ids.shape, dtype=acc, device=logits.device)
        private = logits.dtype != acc or scale != 1.0  # else z is a view of the logits: never written
        for s in range(0, n, token_chunk):
            e = min(n, s + token_chunk)
            z = logits[s:e].to(acc)
            if scale != 1.0:
                z = z * scale
            shift[s:e] = _global_row_shift(z, group)
            picked[s:e] = _local_gather(z, ids[s:e], vocab_start)
            # exp(s·z − m) in the chunk's one fp32 scratch buffer (the only vocab-sized one)
            x = z.sub_(shift[s:e, None]) if private else z - shift[s:e, None]
            log_sum[s:e] = _global_log_sum(x.exp_(), group)
        all_reduce_no_grad(picked, dist.ReduceOp.SUM, group)
        # Fully masked rows (L = −inf) give log-probs 0 and no gradient, as the fused kernel does;
        # backward reads L = +inf there, so exp((s·z − m) − L) = 0 without a branch.
        live = torch.isfinite(log_sum)
        ctx.save_for_backward(logits, ids, shift, torch.where(live, log_sum, torch.full_like(log_sum, float("inf"))))
        ctx.scale, ctx.token_chunk, ctx.vocab_start, ctx.inplace = scale, token_chunk, vocab_start, inplace
        # Relative to the row max (_global_row_shift): no rounding at the ulp of the largest logit.
        logprobs = (picked - shift[:, None]) - log_sum[:, None]
        return torch.where(live[:, None], logprobs, torch.zeros_like(picked)), shift + log_sum

    @staticmethod
    def backward(ctx, grad_logprobs, grad_lse):
        logits, ids, shift, log_sum = ctx.saved_tensors
        scale, chunk, vocab_start = ctx.scale, ctx.token_chunk, ctx.vocab_start
        n, v_local = logits.shape
        acc = shift.dtype
        if grad_logprobs is None:
            grad_logprobs = torch.zeros(ids.shape, dtype=acc, device=logits.device)
        if grad_lse is None:
            grad_lse = torch.zeros(n, dtype=acc, device=logits.device)
        live = torch.isfinite(log_sum)  # +inf on dead rows
        grad_logprobs = torch.where(live[:, None], grad_logprobs.to(acc), shift.new_zeros(()))
        # ∂L/∂z = s·(coeff·softmax(s·z) + Σ_j g_j·[v = id_j]) with coeff = g_lse − Σ_j g_j;
        # the factor s is folded into both parts so the chunk loop does no extra pass.
        softmax_coeff = (grad_lse.to(acc) - grad_logprobs.sum(dim=-1)) * scale
        local_ids = ids - vocab_start
        owned = (local_ids >= 0) & (local_ids < v_local)
        at_ids = torch.where(owned, grad_logprobs * scale, torch.zeros_like(grad_logprobs))
        local_ids = local_ids.clamp(0, v_local - 1)
        # In place: chunk [s, e) of the logits is read (copied to fp32) before it is overwritten
        # and no later chunk reads it, so the result is bit-identical to the separate buffer;
        # copy_ through the detached alias bumps the shared version counter, so any other
        # autograd node that saved these logits and runs later fails loudly instead of
        # reading gradients as logits.
        grad = logits.detach() if ctx.inplace else torch.empty_like(logits)
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            # One fp32 chunk buffer, updated in place: (s·z − m) − L → exp → ·coeff → + g at ids.
            g = logits[s:e].to(acc, copy=True)
            if scale != 1.0:
                g.mul_(scale)
            g.sub_(shift[s:e, None]).sub_(log_sum[s:e, None]).exp_().mul_(softmax_coeff[s:e, None])
            g.scatter_add_(-1, local_ids[s:e], at_ids[s:e])
            grad[s:e].copy_(g)
        return grad, None, None, None, None, None


IMPLS = ("torch", "fused", "auto")


def resolve_impl(impl: str, logits: torch.Tensor) -> str:
    """``"torch"`` or ``"fused"`` for ``impl`` in :data:`IMPLS` and these logits.

    ``"auto"`` picks ``"fused"`` for fp32/bf16/fp16 CUDA logits when Triton imports, else
    ``"torch"`` (CPU runs, fp64 references): the fused kernels are a GPU optimisation,
    and under the CPU interpreter they are only for tests.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if logits.device.type != "cuda" or logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return "torch"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "torch"
    return "fused"


def vocab_parallel_logprobs_at(
    logits: torch.Tensor,
    ids: torch.Tensor,
    scale: float = 1.0,
    group: ProcessGroup = None,
    token_chunk: Optional[int] = None,
    impl: str = "torch",
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Student log-probs at global ``ids`` and the log-sum-exp, vocab-parallel.

    Args:
        logits: ``[N, V_local]`` this rank's vocabulary shard (any float dtype).
        ids: ``[N, m]`` (or ``[N]``) global token ids, any rank's shard.
        scale: inverse temperature ``s`` applied to the logits (``logits_scale``).
        group: the tensor-parallel process group (``None``: single rank).
        token_chunk: tokens per chunk of the torch path (the fused path streams rows); default
            :func:`default_token_chunk` (CPU: 2^22 elements per chunk; CUDA: 4096 rows).
        impl: ``"torch"`` (this module) or ``"fused"`` (the Triton kernels of
            :mod:`nemo_kd.kernels.logprobs_triton`: one pass forward, one pass
            backward; needs Triton and CUDA logits, or CPU under ``TRITON_INTERPRET=1``;
            fp32/bf16/fp16 logits, positive ``scale``; fully masked rows give
            log-probs 0 instead of NaN) or ``"auto"`` (:func:`resolve_impl`).
        inplace_backward: write ``∂L/∂logits`` over ``logits`` (both impls; no second
            ``[N, V_local]`` buffer). Only when this call is the logits' sole autograd
            consumer and nothing reads them after the backward
            (:func:`logits_overwrite_blocker`); the gradient is the same bits.

    Returns:
        ``(logprobs, lse)``: fp32 (fp64 for fp64 logits) ``[N, m]`` (or ``[N]``) values
        ``s·z_id − LSE(s·z)``, formed as ``(s·z_id − m) − log Σ exp(s·z − m)`` (``m`` the row
        max), and fp32 ``[N]`` ``LSE(s·z) = m + log Σ exp(s·z − m)``; both differentiable.
    """
    impl = resolve_impl(impl, logits)
    if impl == "fused":
        try:
            from nemo_kd.kernels.logprobs_triton import fused_logprobs_at
        except ImportError as e:  # keep the torch path usable without triton
            raise RuntimeError(f"impl='fused' needs triton, which failed to import: {e}") from e
        return fused_logprobs_at(logits, ids, scale=scale, group=group, inplace_backward=inplace_backward)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_shard], got shape {tuple(logits.shape)}")
    squeeze = ids.dim() == 1
    ids2 = ids[:, None] if squeeze else ids
    if ids2.shape[0] != logits.shape[0]:
        raise ValueError(f"ids has {ids2.shape[0]} rows but logits has {logits.shape[0]}")
    if token_chunk is None:
        token_chunk = default_token_chunk(logits.shape[-1], logits.device)
    logprobs, lse = _VocabParallelLogProbsAt.apply(logits, ids2.long(), float(scale), group, int(token_chunk),
                                                   bool(inplace_backward))
    return (logprobs[:, 0] if squeeze else logprobs), lse


class _ShardedLogSumExp(torch.autograd.Function):
    """``L = log Σ_v exp(x_v)`` over the sharded vocabulary of ``x`` (already shifted by the row
    max, so ``L ∈ [0, log V]``), for use inside a *sharded* log-softmax.

    ``L`` is replicated but feeds only this rank's shard of ``x − L``, so each rank's
    incoming gradient is a partial: ``∂L/∂L`` is its all-reduce over TP (Megatron's
    ``copy_to_tensor_model_parallel_region`` pattern). Backward: ``softmax(x)·Σ_ranks g``.
    """

    @staticmethod
    def forward(ctx, x, group):
        log_sum = _global_log_sum(torch.exp(x), group)
        ctx.save_for_backward(x, log_sum)
        ctx.group = group
        return log_sum

    @staticmethod
    def backward(ctx, grad):
        x, log_sum = ctx.saved_tensors
        grad = all_reduce_no_grad(grad.contiguous().clone(), dist.ReduceOp.SUM, ctx.group)
        return torch.exp(x - log_sum[:, None]) * grad[:, None], None


def vocab_parallel_log_softmax(logits: torch.Tensor, scale: float = 1.0, group: ProcessGroup = None) -> torch.Tensor:
    """fp32 (fp64 for fp64 input) log-softmax of ``scale·logits`` over the TP-sharded vocabulary, local shard ``[N, V_local]``.

    ``(z − m) − log Σ exp(z − m)`` with ``m`` the global row max (one MAX all-reduce): relative
    to the max, so |logits| ~ 1e4 lose nothing to the ulp of the LSE (see
    :func:`_global_row_shift`). ``m`` is a constant for autograd, which is exact: the
    log-softmax does not depend on the shift. Differentiable. Materialises ``[N, V_local]``
    fp32: use it for losses that need the whole distribution (online teacher); top-k losses
    use :func:`vocab_parallel_logprobs_at` instead.
    """
    z = logits.to(accumulation_dtype(logits.dtype))
    if scale != 1.0:
        z = z * scale
    with torch.no_grad():
        shift = _global_row_shift(z.detach(), group)
    x = z - shift[:, None]
    return x - _ShardedLogSumExp.apply(x, group)[:, None]
