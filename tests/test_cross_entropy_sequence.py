"""Vocab-parallel cross-entropy, the next-token label shift and sequence log-probs.

References: float64 ``torch.nn.functional.cross_entropy`` / ``log_softmax`` and
Megatron-core's own ``tensor_parallel.vocab_parallel_cross_entropy`` (TP=1 and TP=2).
"""

import os


import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_utils import _free_port, run_distributed
from nemo_kd.losses.cross_entropy import vocab_parallel_cross_entropy
from nemo_kd.losses.sequence import (
    SequenceLogProbs,
    sequence_logprobs,
    shift_for_next_token,
    vocab_parallel_sequence_logprobs,
    vocab_parallel_token_logprobs,
)





def _torch_smoothing(eps: float, vocab: int) -> float:
    """Megatron's ε (mass on the non-target ids) as PyTorch's ``label_smoothing``."""
    return eps * vocab / (vocab - 1)


def _reference_ce(logits, labels, eps, scale, grad_out):
    z = logits.detach().double().requires_grad_(True)
    v = z.shape[-1]
    loss = F.cross_entropy(
        (z * scale).reshape(-1, v), labels.reshape(-1), reduction="none", label_smoothing=_torch_smoothing(eps, v)
    ).reshape(labels.shape)
    (loss * grad_out).sum().backward()
    return loss.detach(), z.grad


# --------------------------------------------------------------------------- cross-entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("eps,scale", [(0.0, 1.0), (0.1, 1.0), (0.2, 0.7)])
def test_cross_entropy_matches_float64_torch(dtype, eps, scale):
    g = torch.Generator().manual_seed(0)
    b, t, v = 3, 11, 97
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    grad_out = torch.randn(b, t, generator=g, dtype=torch.float64)
    ref, ref_grad = _reference_ce(logits, labels, eps, scale, grad_out)

    x = logits.clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(x, labels, label_smoothing=eps, logits_scale=scale, token_chunk=7)
    assert loss.shape == (b, t)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (loss.double() * grad_out).sum().backward()
    assert x.grad.dtype == dtype
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    gtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(x.grad.double(), ref_grad, atol=gtol, rtol=gtol)


def test_cross_entropy_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (4,), generator=g)
    torch.autograd.gradcheck(
        lambda x: vocab_parallel_cross_entropy(x, labels, label_smoothing=0.15, logits_scale=1.3, token_chunk=2),
        (logits,),
    )


def test_cross_entropy_keeps_no_float32_vocab_copy_for_backward():
    n, v = 16, 64
    logits = torch.randn(n, v).to(torch.bfloat16).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = vocab_parallel_cross_entropy(logits, torch.randint(0, v, (n,)), label_smoothing=0.1, token_chunk=4)
    loss.sum().backward()
    big = [d for d, numel in saved if numel >= n * v]
    assert big == [torch.bfloat16]  # only the logits themselves


def test_cross_entropy_rejects_bad_arguments():
    with pytest.raises(ValueError):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), label_smoothing=1.0)
    with pytest.raises(ValueError):
        vocab_parallel_cross_entropy(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def _megatron_ce(logits, labels, eps):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy as megatron_ce

    x = logits.clone().requires_grad_(True)  # Megatron writes into fp32 inputs in place: give it a copy
    loss = megatron_ce(x.clone(), labels, eps)
    return loss, x


def _ours_and_megatron(logits, labels, eps, grad_out, group):
    x = logits.clone().requires_grad_(True)
    ours = vocab_parallel_cross_entropy(x, labels, label_smoothing=eps, group=group)
    (ours * grad_out).sum().backward()
    theirs, y = _megatron_ce(logits, labels, eps)
    (theirs * grad_out).sum().backward()
    return ours.detach(), x.grad, theirs.detach(), y.grad


@pytest.fixture
def megatron_tp1():
    from megatron.core import parallel_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_megatron_tp1(megatron_tp1, eps):
    g = torch.Generator().manual_seed(3)
    t, b, v = 9, 2, 50  # Megatron's [s, b, V] layout
    logits = torch.randn(t, b, v, generator=g) * 2
    labels = torch.randint(0, v, (t, b), generator=g)
    grad_out = torch.randn(t, b, generator=g)
    ours, our_grad, theirs, their_grad = _ours_and_megatron(logits, labels, eps, grad_out, None)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_grad, their_grad, atol=1e-6, rtol=1e-5)


def _tp2_body(rank, world, logits, labels, grad_out):
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    try:
        group = parallel_state.get_tensor_model_parallel_group()
        v_local = logits.shape[-1] // world
        shard = logits[..., rank * v_local:(rank + 1) * v_local].contiguous()
        out = {}
        out["megatron_eps0"] = _ours_and_megatron(shard, labels, 0.0, grad_out, group)
        # Megatron's smoothing term uses the local shard (size and mean) at TP > 1; ours the global vocabulary.
        out["megatron_eps0.1_loss"] = _megatron_ce(shard, labels, 0.1)[0].detach()
        x = shard.clone().requires_grad_(True)
        smoothed = vocab_parallel_cross_entropy(x, labels, label_smoothing=0.1, logits_scale=0.8, group=group)
        (smoothed * grad_out).sum().backward()
        out["ours_eps0.1"] = (smoothed.detach(), x.grad)
        return out
    finally:
        parallel_state.destroy_model_parallel()


@pytest.mark.distributed
def test_cross_entropy_tp2_equals_tp1_and_megatron():
    g = torch.Generator().manual_seed(4)
    t, b, v = 7, 3, 64
    logits = torch.randn(t, b, v, generator=g) * 3
    labels = torch.randint(0, v // 2, (t, b), generator=g)
    labels[::2] += v // 2  # labels on both shards
    grad_out = torch.randn(t, b, generator=g)
    outs = run_distributed(_tp2_body, 2, logits, labels, grad_out)

    ref0, ref0_grad = _reference_ce(logits, labels, 0.0, 1.0, grad_out.double())
    ref1, ref1_grad = _reference_ce(logits, labels, 0.1, 0.8, grad_out.double())
    for key, ref, ref_grad in (("megatron_eps0", ref0, ref0_grad), ("ours_eps0.1", ref1, ref1_grad)):
        for o in outs:
            torch.testing.assert_close(o[key][0].double(), ref, atol=1e-5, rtol=1e-5)
        grad = torch.cat([o[key][1] for o in outs], dim=-1)
        torch.testing.assert_close(grad.double(), ref_grad, atol=1e-5, rtol=1e-5)
    # Megatron at TP=2, no smoothing: same values and (sharded) gradient as ours.
    torch.testing.assert_close(outs[0]["megatron_eps0"][2], ref0.float(), atol=1e-5, rtol=1e-5)
    megatron_grad = torch.cat([o["megatron_eps0"][3] for o in outs], dim=-1)
    torch.testing.assert_close(megatron_grad.double(), ref0_grad, atol=1e-5, rtol=1e-5)
    # The documented Megatron TP>1 smoothing discrepancy: ranks disagree with each other.
    assert not torch.allclose(outs[0]["megatron_eps0.1_loss"], outs[1]["megatron_eps0.1_loss"])


# --------------------------------------------------------------------------- label shift


def test_shift_for_next_token_hand_written():
    # prompt = [10, 11, 12], completion = [20, 21], then padding 0.
    tokens = torch.tensor([[10, 11, 12, 20, 21, 0], [30, 40, 41, 42, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 1, 1, 1, 0, 0]])
    inputs, labels, label_mask = shift_for_next_token(tokens, loss_mask)
    assert inputs.tolist() == [[10, 11, 12, 20, 21], [30, 40, 41, 42, 0]]
    assert labels.tolist() == [[11, 12, 20, 21, 0], [40, 41, 42, 0, 0]]
    # position 2 (input 12, last prompt token) predicts 20, the first completion token.
    assert label_mask.tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert labels[label_mask.bool()].tolist() == [20, 21, 40, 41, 42]  # only completion tokens are targets
    with pytest.raises(ValueError):
        shift_for_next_token(tokens, loss_mask[:, :-1])


# --------------------------------------------------------------------------- sequence log-probs


def _reference_sequence(token_logprobs, mask):
    lp = token_logprobs.double()
    s = torch.stack([lp[b][mask[b].bool()].sum() for b in range(lp.shape[0])])
    n = mask.bool().sum(-1)
    mean = torch.stack([s[b] / n[b] if n[b] > 0 else torch.zeros((), dtype=torch.float64) for b in range(len(n))])
    return s, mean, n


def test_sequence_logprobs_values_grads_and_empty_rows():
    g = torch.Generator().manual_seed(5)
    lp = (-torch.rand(4, 8, generator=g, dtype=torch.float64) * 5).requires_grad_(True)
    mask = torch.rand(4, 8, generator=g) > 0.4
    mask[2] = False  # zero-length sequence
    with torch.no_grad():
        lp[3, ~mask[3]] = -float("inf")  # masked positions may hold anything
    out = sequence_logprobs(lp, mask)
    assert isinstance(out, SequenceLogProbs)
    ref_sum, ref_mean, ref_len = _reference_sequence(lp.detach(), mask)
    torch.testing.assert_close(out.sum, ref_sum)
    torch.testing.assert_close(out.mean, ref_mean)
    assert out.length.tolist() == ref_len.tolist()
    assert out.sum[2] == 0 and out.mean[2] == 0
    (out.sum * 2 + out.mean * 3).sum().backward()
    n = mask.sum(-1, keepdim=True).clamp(min=1).double()
    expected = mask.double() * (2 + 3 / n)
    torch.testing.assert_close(lp.grad, expected)
    assert torch.isfinite(lp.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sequence_first", [False, True])
def test_vocab_parallel_sequence_logprobs_matches_log_softmax(dtype, sequence_first):
    g = torch.Generator().manual_seed(6)
    b, t, v = 3, 10, 41
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[1] = False
    labels[~mask] = -100  # padding ids are harmless where masked
    weights = torch.randn(2, b, generator=g, dtype=torch.float64)

    z = logits.detach().double().requires_grad_(True)
    ref_tok = torch.log_softmax(z * 0.9, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    ref_tok = torch.where(mask, ref_tok, torch.zeros_like(ref_tok))
    ref_sum = ref_tok.sum(-1)
    ref_mean = ref_sum / mask.sum(-1).clamp(min=1)
    (ref_sum * weights[0] + ref_mean * weights[1]).sum().backward()

    x_in = logits.transpose(0, 1).contiguous() if sequence_first else logits.clone()
    x = x_in.requires_grad_(True)
    out = vocab_parallel_sequence_logprobs(x, labels, mask, logits_scale=0.9, sequence_first=sequence_first, token_chunk=4)
    (out.sum.double() * weights[0] + out.mean.double() * weights[1]).sum().backward()
    grad = x.grad.transpose(0, 1) if sequence_first else x.grad
    torch.testing.assert_close(out.sum.double(), ref_sum.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.mean.double(), ref_mean.detach(), atol=1e-5, rtol=1e-5)
    assert out.length.tolist() == mask.sum(-1).tolist()
    gtol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.double(), z.grad, atol=gtol, rtol=gtol)

    tok = vocab_parallel_token_logprobs(x_in.detach(), labels, logits_scale=0.9, sequence_first=sequence_first)
    assert tok.shape == (b, t)
    torch.testing.assert_close(tok.double()[mask], ref_tok.detach()[mask], atol=1e-5, rtol=1e-5)
