"""Teacher top-k and log-sum-exp over vocab-parallel logits: TP=2 (gloo) == TP=1 == torch."""

import pytest
import torch

from dist_utils import run_distributed
from nemo_kd.losses.token_stats import (
    NonFiniteLogitsError,
    check_finite_logits,
    teacher_token_stats,
    vocab_parallel_logsumexp,
    vocab_parallel_topk,
)


def _reference_topk(logits, k):
    """Top-k by (value desc, id asc), independent of torch.topk's tie order."""
    z = logits.float()
    rows_v, rows_i = [], []
    for row in z.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))[:k]
        rows_v.append([row[j] for j in order])
        rows_i.append(order)
    return torch.tensor(rows_v, dtype=torch.float32), torch.tensor(rows_i, dtype=torch.int64)


def _make_logits(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    n, v = 9, 40
    z = torch.randn(n, v, generator=g) * 3
    z[0] = 1.0  # every entry tied: ids 0..k-1 must win on any TP
    z[1, :] = torch.arange(v, dtype=torch.float32) % 3  # many ties at the top, spread over both shards
    z[2, 25:31] = 50.0  # whole top-k on rank 1's shard
    z[3, 2:8] = 50.0 + torch.arange(6.0)  # whole top-k on rank 0's shard
    z[4, [5, 25]] = 9.0  # a tie across shards
    z[5] = z[5].round()  # coarse values: ties everywhere
    z[6, 10] = -0.0
    z[6, 30] = 0.0
    return z.to(dtype)


def _tp_worker(rank, world, logits, k, bad_logits):
    group = torch.distributed.group.WORLD
    shard = logits.chunk(world, dim=-1)[rank].contiguous()
    values, ids = vocab_parallel_topk(shard, k, group=group, token_chunk=4)
    lse = vocab_parallel_logsumexp(shard, group=group)
    # NaN on one rank's shard only: every rank must raise (none may hang in a collective).
    try:
        teacher_token_stats(bad_logits.chunk(world, dim=-1)[rank].contiguous(), k, group=group, row_sample_index=99)
        nan_error = None
    except NonFiniteLogitsError as e:
        nan_error = str(e)
    # Plain lists: tensors sent through the result queue use shared memory that can
    # vanish when the worker exits before the parent unpickles them.
    return values.tolist(), ids.tolist(), lse.tolist(), nan_error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_tp1_matches_reference(dtype):
    logits = _make_logits(dtype)
    for k in (1, 6, 40):
        values, ids = vocab_parallel_topk(logits, k, token_chunk=4)
        ref_v, ref_i = _reference_topk(logits, k)
        assert values.dtype == torch.float32 and ids.dtype == torch.int64
        assert torch.equal(ids, ref_i)
        assert torch.equal(values, ref_v)  # raw logits, exact
        # Values agree with torch.topk (its ids may differ only inside ties).
        assert torch.equal(values, torch.topk(logits.float(), k).values)


@pytest.mark.distributed
def test_topk_and_lse_tp2_match_tp1_and_nan_raises_on_all_ranks():
    logits = _make_logits()
    k = 6
    bad = logits.clone()
    bad[2, 35] = float("nan")  # only rank 1's shard is bad
    results = run_distributed(_tp_worker, 2, logits, k, bad)
    ref_v, ref_i = vocab_parallel_topk(logits, k)
    assert torch.equal(ref_i, _reference_topk(logits, k)[1])
    ref_lse = torch.logsumexp(logits.double(), dim=-1)
    for values, ids, lse, nan_error in results:  # identical on both ranks and to TP=1
        values, ids, lse = torch.tensor(values), torch.tensor(ids), torch.tensor(lse)
        assert torch.equal(ids, ref_i)
        assert torch.equal(values, ref_v)
        assert ids[2].tolist() == list(range(25, 31)) and ids[3].tolist() == [7, 6, 5, 4, 3, 2]
        assert ids[0].tolist() == list(range(k)) and ids[4, :2].tolist() == [5, 25]
        assert lse.dtype == torch.float32
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
        assert nan_error is not None and "sample 99 (row 2)" in nan_error


def test_lse_and_label_logprobs_match_float64():
    logits = _make_logits()
    labels = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=torch.Generator().manual_seed(1))
    stats = teacher_token_stats(logits, 5, labels=labels)
    ref = torch.log_softmax(logits.double(), dim=-1)
    torch.testing.assert_close(stats.lse.double(), torch.logsumexp(logits.double(), -1), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(stats.label_logprobs.double(), ref.gather(-1, labels[:, None])[:, 0], atol=1e-5, rtol=1e-6)
    assert torch.equal(stats.ids, vocab_parallel_topk(logits, 5)[1])


def test_padded_vocab_is_ignored():
    logits = _make_logits()
    padded = torch.cat([logits, torch.full((logits.shape[0], 8), 1e4)], dim=-1)  # padding would win
    padded[:, -1] = float("nan")  # and is not even checked for finiteness
    stats = teacher_token_stats(padded, 6, vocab_size=logits.shape[1])
    ref_v, ref_i = vocab_parallel_topk(logits, 6)
    assert torch.equal(stats.ids, ref_i) and torch.equal(stats.values, ref_v)
    torch.testing.assert_close(stats.lse, vocab_parallel_logsumexp(logits))


def test_nan_error_names_sample():
    logits = _make_logits()
    logits[4, 3] = float("nan")
    with pytest.raises(NonFiniteLogitsError, match=r"sample 12 \(row 4\), token position 7"):
        teacher_token_stats(logits, 4, row_sample_index=[10, 10, 11, 11, 12, 12, 12, 13, 13], row_positions=torch.arange(3, 12))
    logits[4, 3] = float("inf")
    with pytest.raises(NonFiniteLogitsError, match=r"sample 42 \(row 4\)"):
        check_finite_logits(logits, row_sample_index=42)
