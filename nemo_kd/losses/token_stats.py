"""Token statistics of a vocab-parallel logits shard: top-k, log-sum-exp, label log-prob, log tail.

What extraction and the teacher server store per completion token (:func:`teacher_token_stats`),
and what online cross-tokenizer KD (:mod:`nemo_kd.align.loss`) computes from a co-located
teacher's logits so that it feeds the loss the same inputs: statistics teachers and losses
share, hence here in :mod:`nemo_kd.losses` (it was ``nemo_kd.teacher.topk``).

Top-k over vocab-parallel logits, without gathering the vocabulary.

The teacher's output layer leaves each tensor-parallel (TP) rank a shard
``[N, V/TP]`` of the logits, rank ``r`` owning global ids ``[r·V/TP, (r+1)·V/TP)``
(see :mod:`nemo_kd.losses.vocab_parallel`). The global top-k is in the union of the
per-shard top-k's, so each rank takes its local top-k, one all-gather exchanges the
``k·TP`` candidates, and every rank takes the top-k of those.

Determinism. Ties are broken by the lower global id, so TP=1 and TP=2 (or any TP)
return identical ids. Rather than trusting ``torch.topk``'s unspecified tie order,
each logit is packed with its id into one int64 key whose signed order is
"value descending, then id ascending"::

    key = ordered_bits(float32(value)) << 32  |  (2**32 - 1 - id)

``ordered_bits`` maps an fp32 to an int32 with the same ordering (flip the low 31
bits of negatives). Keys are unique, so any top-k over them is exact and the
all-gather only moves keys: values (exact, bf16/fp16 logits are exactly fp32) and
ids are decoded from the winners.

Values are the teacher's *raw* logits (no temperature / ``logits_scale``); the
log-sum-exp is of the raw logits too, computed in fp32 by the shared vocab-parallel
primitive. Non-finite teacher logits are an error naming the sample: the check is
all-reduced first so every TP rank raises together instead of hanging in the next
collective.

The log tail mass (:func:`vocab_parallel_log_tail`, the store's ``teacher_log_tail``
extension) is the teacher's log-probability outside its top-k,
``log Σ_{v ∉ top-k} p_v``, formed as a direct sum so that no ``1 − Σ_k p`` cancellation
and no rounding of the LSE enter it (``exact_tail`` on a peaked teacher needs it to ~1e-6
relative where the tail is 1e-4 of the mass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from nemo_kd.losses.vocab_parallel import (
    DEFAULT_TOKEN_CHUNK,
    accumulation_dtype,
    ProcessGroup,
    all_gather_vocab,
    all_reduce_no_grad,
    tp_world_size,
    valid_vocab_columns,
    vocab_parallel_logprobs_at,
    vocab_shard_range,
)

__all__ = [
    "NonFiniteLogitsError",
    "TeacherTokenStats",
    "check_finite_logits",
    "teacher_token_stats",
    "vocab_parallel_log_tail",
    "vocab_parallel_logsumexp",
    "vocab_parallel_topk",
]

# Elements (rows × V/TP) per chunk of the log-tail pass's float64 scratch: 32 MiB on CPU (the
# CPU_TOKEN_CHUNK_ELEMENTS of the log-prob primitive), 256 MiB on a GPU.
LOG_TAIL_CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**25}

_LOW32 = (1 << 32) - 1

RowSamples = Union[None, int, Sequence[int], torch.Tensor]


class NonFiniteLogitsError(ValueError):
    """The teacher produced NaN/Inf logits; the message names the sample and token."""


def _row_location(row: int, row_sample_index: RowSamples, row_positions: Optional[torch.Tensor]) -> str:
    if row_sample_index is None:
        where = f"row {row}"
    elif isinstance(row_sample_index, int):
        where = f"sample {row_sample_index} (row {row})"
    else:
        where = f"sample {int(row_sample_index[row])} (row {row})"
    if row_positions is not None:
        where += f", token position {int(row_positions[row])}"
    return where


def check_finite_logits(
    logits_shard: torch.Tensor,
    group: ProcessGroup = None,
    row_sample_index: RowSamples = None,
    row_positions: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
) -> None:
    """Raise :class:`NonFiniteLogitsError` on every TP rank if any rank's shard has NaN/Inf.

    Args:
        row_sample_index: the dataset sample each row belongs to (an int for all
            rows, or one per row), used in the error message.
        row_positions: optional token position of each row, for the message.
        vocab_size: true vocabulary size; padded columns beyond it are not checked.
    """
    n, v_local = logits_shard.shape
    valid = valid_vocab_columns(v_local, vocab_shard_range(v_local, group)[0], vocab_size)
    # A row's sum is finite iff all its values are (NaN and ±inf propagate; +inf with −inf gives
    # NaN), short of overflowing the accumulator, which takes |logits| ~ 1e33: one reduction pass,
    # instead of isfinite's [N, V] mask (2.3x slower than the rest of the statistics on CPU).
    row_sums = logits_shard[:, :valid].sum(dim=-1, dtype=accumulation_dtype(logits_shard.dtype))
    bad = (~torch.isfinite(row_sums)).to(torch.int32)
    all_reduce_no_grad(bad, dist.ReduceOp.MAX, group)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise NonFiniteLogitsError(
            f"non-finite (NaN/Inf) teacher logits in {_row_location(rows[0], row_sample_index, row_positions)}"
            + (f" and {len(rows) - 1} more row(s)" if len(rows) > 1 else "")
        )


def _ordered_keys(z: torch.Tensor, global_ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered by (fp32 value desc, id asc) – see the module docstring."""
    z = z.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0: one key for both zeros
    bits = z.view(torch.int32)
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << 32) | (_LOW32 - global_ids.to(torch.int64))


def _decode_keys(keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    ordered = (keys >> 32).to(torch.int32)  # arithmetic shift keeps the sign
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.view(torch.float32), _LOW32 - (keys & _LOW32)


def vocab_parallel_topk(
    logits_shard: torch.Tensor,
    k: int,
    group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
    token_chunk: int = DEFAULT_TOKEN_CHUNK,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of TP-sharded logits: raw fp32 values and global int64 ids.

    Args:
        logits_shard: ``[N, V/TP]`` this rank's vocabulary shard (any float dtype).
        k: how many entries per row (``k <= vocab``).
        group: the TP process group (``None``: single rank, full vocabulary).
        vocab_size: true vocabulary size if the shards include padding columns
            (ids ``>= vocab_size`` are never returned).
        token_chunk: rows per step, bounding the fp32 scratch to ``token_chunk × V/TP``
            (and the int64 key scratch of rows with ties at the k-th value).

    Returns:
        ``(values [N, k] fp32, ids [N, k] int64)`` identical on every TP rank, sorted
        by value descending, ties by lower id. Values are the raw logits.
        NaN logits are not checked here: call :func:`check_finite_logits` first
        (:func:`teacher_token_stats` does).
    """
    if logits_shard.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab_shard], got shape {tuple(logits_shard.shape)}")
    n, v_local = logits_shard.shape
    vocab_start = vocab_shard_range(v_local, group)[0]
    total_vocab = v_local * tp_world_size(group) if vocab_size is None else vocab_size
    if not 1 <= k <= total_vocab:
        raise ValueError(f"k={k} must be in [1, vocab size {total_vocab}]")
    valid = valid_vocab_columns(v_local, vocab_start, vocab_size)
    # Every rank must contribute the same number of candidates to the all-gather.
    k_local = min(k, v_local)
    ids_row = torch.arange(vocab_start, vocab_start + v_local, device=logits_shard.device)
    values = torch.empty(n, k, dtype=torch.float32, device=logits_shard.device)
    ids = torch.empty(n, k, dtype=torch.int64, device=logits_shard.device)
    k_valid = min(k_local, valid)
    for s in range(0, n, token_chunk):
        e = min(n, s + token_chunk)
        # Fast path: a float top-2k on the real columns holds the exact top-k under the
        # (value desc, id asc) order whenever the run of values equal to the k-th value
        # ends inside it (always for fp32 logits, almost always for bf16): order those
        # 2k candidates by int64 key. Rows whose tie run reaches past 2k use keys over
        # the whole shard.
        local = torch.full((e - s, k_local), torch.iinfo(torch.int64).min, dtype=torch.int64,
                           device=logits_shard.device)  # padding columns never win (k <= vocab_size)
        if k_valid > 0:
            z = logits_shard[s:e, :valid].to(torch.float32)
            top = torch.topk(z, min(2 * k_valid, valid), dim=-1, sorted=True)
            keys = _ordered_keys(top.values, top.indices + vocab_start)
            local[:, :k_valid] = torch.topk(keys, k_valid, dim=-1, sorted=False).values
            width = top.values.shape[1]
            if width < valid:
                unsure = torch.nonzero(top.values[:, width - 1] == top.values[:, k_valid - 1]).flatten()
                if unsure.numel():
                    keys = _ordered_keys(z[unsure], ids_row[:valid].expand(unsure.numel(), valid))
                    local[unsure, :k_valid] = torch.topk(keys, k_valid, dim=-1, sorted=False).values
        candidates = all_gather_vocab(local, group)
        best = torch.topk(candidates, k, dim=-1, sorted=True).values
        values[s:e], ids[s:e] = _decode_keys(best)
    return values, ids


def vocab_parallel_logsumexp(
    logits_shard: torch.Tensor, group: ProcessGroup = None, vocab_size: Optional[int] = None
) -> torch.Tensor:
    """fp32 ``[N]`` log-sum-exp of the raw logits over the TP-sharded vocabulary (no grad)."""
    ids = torch.zeros(logits_shard.shape[0], dtype=torch.int64, device=logits_shard.device)
    return _logprobs_and_lse(logits_shard, ids, group, vocab_size)[1].float()


def _logprobs_and_lse(logits_shard, ids, group, vocab_size):
    """Reuse the shared primitive (max all-reduce + sum-exp all-reduce, fp32, chunked)."""
    v_local = logits_shard.shape[-1]
    valid = valid_vocab_columns(v_local, vocab_shard_range(v_local, group)[0], vocab_size)
    with torch.no_grad():
        if valid < v_local:
            if tp_world_size(group) == 1:  # a view of the real columns (global ids still start at 0)
                logits_shard = logits_shard[:, :valid]
            else:  # narrowing would move this rank's global ids: mask a copy instead
                logits_shard = logits_shard.clone()
                logits_shard[:, valid:] = float("-inf")
        return vocab_parallel_logprobs_at(logits_shard, ids, scale=1.0, group=group)


@torch.no_grad()
def vocab_parallel_log_tail(
    logits_shard: torch.Tensor,
    topk_values: torch.Tensor,
    topk_ids: torch.Tensor,
    group: ProcessGroup = None,
    vocab_size: Optional[int] = None,
    compute_dtype: torch.dtype = torch.float64,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """``log Σ_{v ∉ top-k} p_v`` ``[N]`` fp32: the teacher's log-probability outside its top-k.

    With ``m = max_v z_v`` (the top-1 value, identical on every TP rank) and
    ``e_v = exp(z_v − m)`` over the real vocabulary (padded columns, ids ``>= vocab_size``,
    excluded)::

        log_tail = log Σ_{v ∉ top-k} e_v − log(Σ_{v ∉ top-k} e_v + Σ_{v ∈ top-k} e_v)

    Both sums are of positive terms only (the denominator is tail + head, never
    ``full − head``), so the result is as accurate as the terms: relative error ~1e-16 per term
    in ``compute_dtype=float64``; in float32 the rounding of ``z_v − m`` alone (ulp of 20–40)
    costs up to 2e-6 relative (``benchmarks/bench_tail_precision.py``), hence float64. Each TP
    rank sums its own columns, masking the top-k ids it owns; one ``[N, 2]`` SUM all-reduce
    completes both sums. ``−inf`` where the top-k hold all the mass (``k = V``, or the rest
    underflows float64). Rows are processed ``chunk_elements // (V/TP)`` at a time (default
    :data:`LOG_TAIL_CHUNK_ELEMENTS`) to bound the float64 scratch.

    Args:
        logits_shard: ``[N, V/TP]`` this rank's shard of the raw logits (any float dtype, finite).
        topk_values / topk_ids: ``[N, k]`` the global top-k of :func:`vocab_parallel_topk`
            (values descending: column 0 is the row max).
    """
    n, v_local = logits_shard.shape
    vocab_start = vocab_shard_range(v_local, group)[0]
    valid = valid_vocab_columns(v_local, vocab_start, vocab_size)
    device = logits_shard.device
    sums = torch.zeros(n, 2, dtype=compute_dtype, device=device)  # [tail, head]
    if chunk_elements is None:
        chunk_elements = LOG_TAIL_CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    rows_per_chunk = max(1, chunk_elements // max(1, valid))
    if valid > 0:
        local = topk_ids.to(device) - vocab_start
        owned = (local >= 0) & (local < valid)
        local = local.clamp(0, valid - 1)
        row_max = topk_values[:, 0].to(device=device, dtype=compute_dtype)
        for s in range(0, n, rows_per_chunk):
            e = min(n, s + rows_per_chunk)
            exp = logits_shard[s:e, :valid].to(compute_dtype, copy=True)  # never the logits themselves
            exp.sub_(row_max[s:e, None]).exp_()
            own = owned[s:e]
            sums[s:e, 1] = torch.where(own, exp.gather(1, local[s:e]), torch.zeros((), dtype=compute_dtype,
                                                                                   device=device)).sum(-1)
            rows = torch.arange(e - s, device=device)[:, None].expand_as(own)
            exp[rows[own], local[s:e][own]] = 0.0  # the top-k columns this rank owns leave the tail sum
            sums[s:e, 0] = exp.sum(-1)
    all_reduce_no_grad(sums, dist.ReduceOp.SUM, group)
    tail, head = sums[:, 0], sums[:, 1]
    return (torch.log(tail) - torch.log(tail + head)).clamp(max=0.0).float()


@dataclass
class TeacherTokenStats:
    """Per-token teacher statistics for the logits store (identical on all TP ranks)."""

    values: torch.Tensor  # [N, k] fp32 raw logits, descending
    ids: torch.Tensor  # [N, k] int64 global token ids
    lse: torch.Tensor  # [N] fp32 log-sum-exp of the raw logits
    label_logprobs: Optional[torch.Tensor]  # [N] fp32 log p(label) or None without labels
    log_tail: Optional[torch.Tensor] = None  # [N] fp32 log Σ_{v ∉ top-k} p_v (with_log_tail), else None


def teacher_token_stats(
    logits_shard: torch.Tensor,
    k: int,
    labels: Optional[torch.Tensor] = None,
    group: ProcessGroup = None,
    row_sample_index: RowSamples = None,
    row_positions: Optional[torch.Tensor] = None,
    vocab_size: Optional[int] = None,
    with_log_tail: bool = False,
) -> TeacherTokenStats:
    """Everything the store keeps per completion token, in one call.

    Checks the logits are finite (error naming ``row_sample_index``), then the top-k,
    the log-sum-exp and, given ``labels`` ``[N]`` (the reference completion's next
    tokens), the teacher's log-prob of each label; a sample's sequence log-prob is the
    sum of its rows' ``label_logprobs`` (sum in float64). ``with_log_tail``: also the log
    tail mass outside the top-k (:func:`vocab_parallel_log_tail`, one more pass over the shard).
    """
    check_finite_logits(logits_shard, group, row_sample_index, row_positions, vocab_size)
    values, ids = vocab_parallel_topk(logits_shard, k, group, vocab_size)
    label_ids = labels if labels is not None else torch.zeros(logits_shard.shape[0], dtype=torch.int64, device=logits_shard.device)
    label_lp, lse = _logprobs_and_lse(logits_shard, label_ids.to(torch.int64), group, vocab_size)
    log_tail = vocab_parallel_log_tail(logits_shard, values, ids, group, vocab_size) if with_log_tail else None
    return TeacherTokenStats(values, ids, lse.float(), label_lp.float() if labels is not None else None, log_tail)
