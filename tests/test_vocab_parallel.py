"""The vocab-parallel log-prob primitive against float64 PyTorch, at TP=1 and TP=2."""

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from nemo_kd.losses.vocab_parallel import all_reduce_sum, vocab_parallel_log_softmax, vocab_parallel_logprobs_at


def _reference(logits, ids, scale, g_lp, g_lse):
    z = logits.detach().double().requires_grad_(True)
    logp = torch.log_softmax(z * scale, dim=-1)
    lse = torch.logsumexp(z * scale, dim=-1)
    lp = torch.gather(logp, -1, ids)
    (lp * g_lp).sum().add_((lse * g_lse).sum()).backward()
    return lp.detach(), lse.detach(), z.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0])
def test_logprobs_at_matches_float64(dtype, scale):
    g = torch.Generator().manual_seed(0)
    n, v, m = 37, 101, 5
    logits = (torch.randn(n, v, generator=g) * 3).to(dtype)
    ids = torch.randint(0, v, (n, m), generator=g)
    g_lp, g_lse = torch.randn(n, m, generator=g).double(), torch.randn(n, generator=g).double()
    ref_lp, ref_lse, ref_grad = _reference(logits, ids, scale, g_lp, g_lse)

    x = logits.clone().requires_grad_(True)
    lp, lse = vocab_parallel_logprobs_at(x, ids, scale=scale, token_chunk=8)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert lp.dtype == acc and lse.dtype == acc
    ((lp.double() * g_lp).sum() + (lse.double() * g_lse).sum()).backward()
    assert x.grad.dtype == dtype
    tol = 1e-5 if dtype != torch.bfloat16 else 1e-5  # values are exact in fp32 accumulation of bf16 inputs
    torch.testing.assert_close(lp.double(), ref_lp, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    gtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=gtol, rtol=gtol)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 11, (6, 3), generator=g)
    torch.autograd.gradcheck(lambda x: vocab_parallel_logprobs_at(x, ids, scale=0.7, token_chunk=4), (logits,))
    torch.autograd.gradcheck(lambda x: vocab_parallel_log_softmax(x, scale=1.3), (logits,))


def test_large_logits_and_masked_columns():
    logits = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-float("inf"), 2.0, 3.0, -float("inf")]])
    ids = torch.tensor([[0, 3], [1, 2]])
    lp, lse = vocab_parallel_logprobs_at(logits, ids)
    ref = torch.log_softmax(logits.double(), -1).gather(-1, ids)
    torch.testing.assert_close(lp.double(), ref)
    assert torch.isfinite(lse).all()


def _tp2_body(rank, world, logits, ids, scale, g_lp, g_lse, w_full):
    v_local = logits.shape[1] // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    shard = logits[:, cols].clone().requires_grad_(True)
    group = dist.group.WORLD
    lp, lse = vocab_parallel_logprobs_at(shard, ids, scale=scale, group=group, token_chunk=5)
    ((lp.double() * g_lp).sum() + (lse.double() * g_lse).sum()).backward()
    # The sharded log-softmax feeding a replicated loss (Σ_v w_v·log q_v, summed over TP).
    shard2 = logits[:, cols].clone().requires_grad_(True)
    full = vocab_parallel_log_softmax(shard2, scale=scale, group=group)
    all_reduce_sum((full.double() * w_full[:, cols]).sum(-1), group).sum().backward()
    return lp.detach(), lse.detach(), shard.grad.detach(), full.detach(), shard2.grad.detach()


@pytest.mark.distributed
def test_tp2_equals_tp1_values_and_grads():
    g = torch.Generator().manual_seed(2)
    n, v, m = 13, 64, 4
    logits = torch.randn(n, v, generator=g) * 4
    ids = torch.randint(0, v, (n, m), generator=g)
    ids[:, 0] = torch.arange(n) % 2 * (v // 2) + 3  # alternate shards explicitly
    g_lp, g_lse = torch.randn(n, m, generator=g).double(), torch.randn(n, generator=g).double()
    ref_lp, ref_lse, ref_grad = _reference(logits, ids, 0.8, g_lp, g_lse)
    w_full = torch.randn(n, v, generator=g).double()
    outs = run_distributed(_tp2_body, 2, logits, ids, 0.8, g_lp, g_lse, w_full)
    grad = torch.cat([o[2] for o in outs], dim=1)
    full = torch.cat([o[3] for o in outs], dim=1)
    z = logits.double().requires_grad_(True)
    (torch.log_softmax(z * 0.8, -1) * w_full).sum().backward()
    torch.testing.assert_close(torch.cat([o[4] for o in outs], dim=1).double(), z.grad, atol=1e-5, rtol=1e-5)
    for lp, lse, *_ in outs:
        torch.testing.assert_close(lp.double(), ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.double(), torch.log_softmax(logits.double() * 0.8, -1), atol=1e-5, rtol=1e-5)
