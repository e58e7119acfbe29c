"""Loss normalisation: exact global means under microbatches × data parallelism."""


import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from nemo_kd.losses.cross_entropy import vocab_parallel_cross_entropy
from nemo_kd.losses.reduction import (
    contribution,
    global_count,
    local_count,
    loss_parts,
    mask_count,
    masked_mean,
    masked_sum,
)




# Global batch: 8 sequences × 6 positions, split into DP=2 ranks × M=2 microbatches of 2 sequences.
B, T, H, V = 8, 6, 5, 11
DP, M = 2, 2


def _global_batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 5, 1, 0, 2, 6, 3, 1])  # very unequal completion-token counts per microbatch
    mask = torch.arange(T)[None, :] >= (T - lengths)[:, None]  # completion = the last `length` positions
    weight = torch.randn(H, V, generator=g, dtype=torch.float64)
    return hidden, labels, mask, weight


def _microbatches(rank):
    """Rank r's microbatches: sequences [4r, 4r+2) and [4r+2, 4r+4)."""
    per_rank = B // DP
    per_mb = per_rank // M
    return [slice(rank * per_rank + i * per_mb, rank * per_rank + (i + 1) * per_mb) for i in range(M)]


def _per_token_loss(weight, hidden, labels):
    return vocab_parallel_cross_entropy(hidden @ weight, labels)


def _reference(reduction):
    """Single process, full batch, float64, written out by hand."""
    hidden, labels, mask, weight = _global_batch()
    w = weight.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy((hidden @ w).reshape(-1, V), labels.reshape(-1), reduction="none")
    ce = ce.reshape(B, T)
    m = mask.double()
    if reduction == "token":
        loss = (ce * m).sum() / m.sum()
    elif reduction == "sequence":
        keep = m.sum(-1) > 0
        loss = ((ce * m).sum(-1)[keep] / m.sum(-1)[keep]).mean()
    else:  # "batch": mean over the DP·M microbatches of each one's own token mean
        means = []
        for r in range(DP):
            for s in _microbatches(r):
                means.append((ce[s] * m[s]).sum() / m[s].sum().clamp(min=1))
        loss = torch.stack(means).mean()
    loss.backward()
    return loss.detach(), w.grad


def _dp_body(rank, world):
    return {r: _dp_one_reduction(rank, world, r) for r in ("token", "sequence", "batch")}


def _dp_one_reduction(rank, world, reduction):
    hidden, labels, mask, weight = _global_batch()
    mbs = _microbatches(rank)
    group = dist.group.WORLD

    # Our contract: gradient accumulation of contributions, then a DP all-*sum*.
    normaliser = global_count([mask[s] for s in mbs], reduction, group)
    w = weight.clone().requires_grad_(True)
    loss = torch.zeros((), dtype=torch.float64)
    for s in mbs:
        c = contribution(_per_token_loss(w, hidden[s], labels[s]), mask[s], normaliser, reduction)
        c.backward()
        loss += c.detach()
    dist.all_reduce(w.grad)
    dist.all_reduce(loss)

    # Megatron (A): calculate_per_token_loss=True — loss_func returns (numerator, count);
    # DDP sums grads over DP, finalize_model_grads divides by the all-reduced Σcount.
    wa = weight.clone().requires_grad_(True)
    total = torch.zeros((), dtype=torch.int64)
    for s in mbs:
        parts = loss_parts(_per_token_loss(wa, hidden[s], labels[s]), mask[s], reduction)
        parts.numerator.backward()
        total += parts.count
    dist.all_reduce(wa.grad)
    dist.all_reduce(total)
    grad_a = wa.grad / total

    # Megatron (B): calculate_per_token_loss=False, 2-tuple — return contribution·M·DP;
    # the schedule divides by M, DDP averages over DP.
    wb = weight.clone().requires_grad_(True)
    for s in mbs:
        returned = contribution(_per_token_loss(wb, hidden[s], labels[s]), mask[s], normaliser, reduction) * M * world
        (returned / M).backward()
    dist.all_reduce(wb.grad)
    grad_b = wb.grad / world

    # The bug class: each microbatch's own token mean, averaged over microbatches and DP.
    wn = weight.clone().requires_grad_(True)
    naive = torch.zeros((), dtype=torch.float64)
    for s in mbs:
        mb_mean = masked_mean(_per_token_loss(wn, hidden[s], labels[s]), mask[s]) / M
        mb_mean.backward()
        naive += mb_mean.detach()
    dist.all_reduce(wn.grad)
    dist.all_reduce(naive)
    return loss, w.grad, grad_a, grad_b, naive / world, wn.grad / world, normaliser


@pytest.mark.distributed
def test_microbatch_dp_normalisation_equals_full_batch():
    per_rank_outs = run_distributed(_dp_body, DP)
    outs = {r: [o[r] for o in per_rank_outs] for r in ("token", "sequence", "batch")}
    _, _, mask, _ = _global_batch()
    mb_counts = [int(mask[s].sum()) for r in range(DP) for s in _microbatches(r)]
    assert len(set(mb_counts)) > 2  # the split really is unequal
    for reduction, per_rank in outs.items():
        ref_loss, ref_grad = _reference(reduction)
        for loss, grad, grad_a, grad_b, *_ in per_rank:
            torch.testing.assert_close(loss, ref_loss)
            torch.testing.assert_close(grad, ref_grad)
            torch.testing.assert_close(grad_a, ref_grad)
            torch.testing.assert_close(grad_b, ref_grad)
    assert outs["token"][0][6].item() == int(mask.sum())
    assert outs["sequence"][0][6].item() == int((mask.sum(-1) > 0).sum())
    assert outs["batch"][0][6].item() == DP * M
    # The naive per-microbatch mean is the "batch" reduction and not the global token mean.
    naive_loss, naive_grad = outs["token"][0][4], outs["token"][0][5]
    batch_loss, batch_grad = _reference("batch")
    token_loss, token_grad = _reference("token")
    torch.testing.assert_close(naive_loss, batch_loss)
    torch.testing.assert_close(naive_grad, batch_grad)
    assert abs(naive_loss - token_loss) > 1e-2
    assert (naive_grad - token_grad).abs().max() > 1e-3


def test_masked_helpers_ignore_masked_values_and_empty_selections():
    x = torch.tensor([[1.0, float("nan"), 3.0], [float("-inf"), 2.0, 5.0], [7.0, 8.0, 9.0]], requires_grad=True)
    m = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0]])
    assert masked_sum(x, m).item() == 11.0
    assert masked_sum(x, m, dim=-1).tolist() == [4.0, 7.0, 0.0]
    assert masked_mean(x, m, dim=-1).tolist() == [2.0, 3.5, 0.0]
    assert mask_count(m).item() == 4 and mask_count(m, dim=-1).tolist() == [2, 2, 0]
    masked_mean(x, m, dim=-1).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.tolist() == [[0.5, 0.0, 0.5], [0.0, 0.5, 0.5], [0.0, 0.0, 0.0]]
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_loss_parts_formulas_and_counts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64)
    m = torch.rand(4, 7, generator=g) > 0.5
    m[1] = False
    md = m.double()
    tok = loss_parts(x, m, "token")
    torch.testing.assert_close(tok.numerator, (x * md).sum())
    assert tok.count.item() == m.sum().item() and tok.count.dtype == torch.int64
    seq = loss_parts(x, m, "sequence")
    keep = m.any(-1)
    torch.testing.assert_close(seq.numerator, ((x * md).sum(-1)[keep] / md.sum(-1)[keep]).sum())
    assert seq.count.item() == int(keep.sum())
    bat = loss_parts(x, m, "batch")
    torch.testing.assert_close(bat.numerator, (x * md).sum() / md.sum())
    assert bat.count.item() == 1
    for r in ("token", "sequence", "batch"):
        assert local_count(m, r) == loss_parts(x, m, r).count
    # per-sequence losses [B] (e.g. preference pairs) with a validity mask: "token" averages valid pairs
    pairs, valid = torch.tensor([1.0, 2.0, 6.0]), torch.tensor([True, False, True])
    assert contribution(pairs, valid, global_count(valid)).item() == 3.5
    # an all-masked global batch contributes 0, not NaN
    assert contribution(x, torch.zeros_like(m), global_count(torch.zeros_like(m))).item() == 0.0
    with pytest.raises(ValueError):
        loss_parts(x, m, "mean")
    with pytest.raises(ValueError):
        global_count([])
