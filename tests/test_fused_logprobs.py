"""The fused Triton log-prob primitive equals the torch path (values and gradients).

Runs on CPU through the Triton interpreter, which Triton switches on at kernel
decoration time, so TRITON_INTERPRET must be set before anything imports triton.
Shapes are tiny (the interpreter is slow); small block sizes are patched in where a
test needs several vocabulary blocks and a ragged last block.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not importable: the fused kernels cannot be tested")

from dist_utils import run_distributed  # noqa: E402
from nemo_kd.kernels import logprobs_triton as lt  # noqa: E402
from nemo_kd.kernels import fused_logprobs_at  # noqa: E402
from nemo_kd.losses.vocab_parallel import vocab_parallel_logprobs_at  # noqa: E402

NEG_INF = float("-inf")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 columns / 4 ids so small shapes exercise the loops and ragged tails."""
    monkeypatch.setattr(lt, "FWD_BLOCK_V", 64)
    monkeypatch.setattr(lt, "BWD_BLOCK_V", 64)
    monkeypatch.setattr(lt, "BLOCK_J", 4)


def _run(logits, ids, scale, g_lp, g_lse, impl, inplace=False):
    """Values and d(Σ g_lp·lp + Σ g_lse·lse)/d logits through a non-leaf, as from an lm_head."""
    leaf = logits.clone().requires_grad_(True)
    x = leaf * 1  # non-leaf, like the output of the output layer: in-place backward is legal on it
    if impl == "fused":
        lp, lse = fused_logprobs_at(x, ids, scale=scale, inplace_backward=inplace)
    else:
        lp, lse = vocab_parallel_logprobs_at(x, ids, scale=scale, token_chunk=4)
    loss = 0
    if g_lp is not None:
        loss = loss + (lp * g_lp).sum()
    if g_lse is not None:
        loss = loss + (lse * g_lse).sum()
    loss.backward()
    return lp.detach(), lse.detach(), leaf.grad


def _grad_tol(dtype):
    # Both paths round the same fp32 value once (RTNE); exp() implementations may differ in
    # the last fp32 bit, which can flip one output ulp on rare elements.
    return {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]


def _assert_grad_same(out, ref, dtype):
    tol = _grad_tol(dtype)
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    if dtype != torch.float32:
        # A one-ulp tolerance would hide systematic double rounding or truncation: bits must match
        # almost everywhere.
        assert (out != ref).float().mean().item() < 0.01


def _assert_same(ref, out, dtype):
    torch.testing.assert_close(out[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], ref[1], atol=1e-5, rtol=1e-5)
    assert out[2].dtype == dtype
    _assert_grad_same(out[2], ref[2], dtype)


def _inputs(n, v, m, dtype, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * spread).to(dtype)
    ids = torch.randint(0, v, (n, m), generator=g)
    ids[:, 1] = ids[:, 0]  # duplicated ids: their gradients add up
    g_lp, g_lse = torch.randn(n, m, generator=g), torch.randn(n, generator=g)
    return logits, ids, g_lp, g_lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_fused_matches_torch(small_blocks, dtype, scale):
    logits, ids, g_lp, g_lse = _inputs(5, 203, 6, dtype, seed=0)  # 203 = 3 blocks of 64 + 11
    ref = _run(logits, ids, scale, g_lp, g_lse, "torch")
    _assert_same(ref, _run(logits, ids, scale, g_lp, g_lse, "fused"), dtype)


def test_fused_matches_float64_default_blocks():
    """Production block sizes (V_local not a multiple of 4096) against exact float64."""
    logits, ids, g_lp, g_lse = _inputs(3, 5000, 5, torch.bfloat16, seed=1)
    lp, lse, grad = _run(logits, ids, 0.7, g_lp, g_lse, "fused")
    z = logits.double().requires_grad_(True)
    ref_lp = torch.log_softmax(z * 0.7, -1).gather(-1, ids)
    ref_lse = torch.logsumexp(z * 0.7, -1)
    ((ref_lp * g_lp.double()).sum() + (ref_lse * g_lse.double()).sum()).backward()
    torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad.double(), z.grad, atol=8e-3, rtol=8e-3)


def test_masks_large_logits_and_fully_masked_row(small_blocks):
    logits, ids, g_lp, g_lse = _inputs(5, 150, 4, torch.float32, seed=2)
    logits[0, ::3] = NEG_INF  # masked columns, one of them at an id
    ids[0, 2] = 3
    logits[1, :] = NEG_INF
    logits[1, 140] = 5.0  # a single finite column, in the ragged last block
    logits[2] = torch.linspace(-1e4, 1e4, 150)  # huge logits: exp would overflow without the max shift
    logits[3, 70:] = NEG_INF  # whole vocabulary blocks masked
    logits[4, :] = NEG_INF  # fully masked row
    for scale in (0.5, 2.0):
        ref = _run(logits, ids, scale, g_lp, g_lse, "torch")
        out = _run(logits, ids, scale, g_lp, g_lse, "fused")
        live = slice(0, 4)
        torch.testing.assert_close(out[0][live], ref[0][live], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1][live], ref[1][live], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[2][live], ref[2][live], atol=1e-6, rtol=1e-6)
        # Fully masked row: lse = -inf (as torch), log-probs 0 and a finite gradient (torch: NaN).
        assert out[1][4] == NEG_INF and (out[0][4] == 0).all()
        assert torch.isfinite(out[2][4]).all()


def test_ids_outside_the_shard_contribute_zero(small_blocks):
    """At TP=1 ids beyond V_local stand for other ranks' shards: the torch path gives lp = -lse there."""
    logits, ids, g_lp, g_lse = _inputs(4, 100, 5, torch.float32, seed=3)
    ids[:, 3] = 100 + torch.arange(4)
    ids[:, 4] = -5
    ref = _run(logits, ids, 1.0, g_lp, g_lse, "torch")
    _assert_same(ref, _run(logits, ids, 1.0, g_lp, g_lse, "fused"), torch.float32)


@pytest.mark.parametrize("which", ["logprobs_only", "lse_only"])
def test_one_sided_gradients(small_blocks, which):
    logits, ids, g_lp, g_lse = _inputs(3, 90, 3, torch.bfloat16, seed=4)
    g_lp, g_lse = (g_lp, None) if which == "logprobs_only" else (None, g_lse)
    ref = _run(logits, ids, 1.0, g_lp, g_lse, "torch")
    _assert_same(ref, _run(logits, ids, 1.0, g_lp, g_lse, "fused"), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_same_gradient(small_blocks, dtype):
    logits, ids, g_lp, g_lse = _inputs(4, 130, 5, dtype, seed=5)
    out = _run(logits, ids, 2.0, g_lp, g_lse, "fused")
    out_inplace = _run(logits, ids, 2.0, g_lp, g_lse, "fused", inplace=True)
    torch.testing.assert_close(out_inplace[2], out[2], atol=0, rtol=0)


def test_1d_ids_and_dispatch_errors():
    logits, ids, g_lp, g_lse = _inputs(3, 40, 2, torch.float32, seed=6)
    lp, lse = vocab_parallel_logprobs_at(logits, ids[:, 0], impl="fused")
    ref_lp, ref_lse = vocab_parallel_logprobs_at(logits, ids[:, 0])
    torch.testing.assert_close(lp, ref_lp)
    torch.testing.assert_close(lse, ref_lse)
    with pytest.raises(ValueError, match="impl"):
        vocab_parallel_logprobs_at(logits, ids, impl="cuda")
    with pytest.raises(TypeError, match="fp64"):
        vocab_parallel_logprobs_at(logits.double(), ids, impl="fused")


def test_cpu_without_interpreter_raises_clear_error():
    code = (
        "import torch\n"
        "from nemo_kd.losses.vocab_parallel import vocab_parallel_logprobs_at as f\n"
        "try:\n"
        "    f(torch.randn(2, 8), torch.zeros(2, 1, dtype=torch.long), impl='fused')\n"
        "except RuntimeError as e:\n"
        "    print('ERR', e)\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def _tp2_body(rank, world, logits, ids, scale, g_lp, g_lse, inplace):
    lt.FWD_BLOCK_V, lt.BWD_BLOCK_V, lt.BLOCK_J = 64, 64, 4
    v_local = logits.shape[1] // world
    leaf = logits[:, rank * v_local:(rank + 1) * v_local].clone().requires_grad_(True)
    lp, lse = vocab_parallel_logprobs_at(leaf * 1, ids, scale=scale, group=dist.group.WORLD, impl="fused") \
        if not inplace else fused_logprobs_at(leaf * 1, ids, scale=scale, group=dist.group.WORLD, inplace_backward=True)
    ((lp * g_lp).sum() + (lse * g_lse).sum()).backward()
    # numpy pickles by value: torch tensors cross the queue as shared-memory fds that can vanish
    # with the exiting worker (FileNotFoundError in the parent).
    return lp.detach().numpy(), lse.detach().numpy(), leaf.grad.detach().float().numpy()


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp2_fused_equals_tp1_torch(dtype):
    inplace = dtype == torch.bfloat16  # cover the in-place backward under TP too
    logits, ids, g_lp, g_lse = _inputs(6, 2 * 75, 5, dtype, seed=7)
    ids[:, 2] = torch.arange(6) % 2 * 75 + 7  # alternate shards explicitly
    logits[0, 75:] = NEG_INF  # rank 1's shard fully masked for this row: rank 1 contributes 0
    ids[0, 3] = 80  # ... with an id in that masked shard: lp = -inf
    logits[1, :75] = NEG_INF
    logits[2] *= 3e3  # large logits
    ref = _run(logits, ids, 0.8, g_lp, g_lse, "torch")
    outs = run_distributed(_tp2_body, 2, logits, ids, 0.8, g_lp, g_lse, inplace)
    outs = [[torch.from_numpy(a) for a in o] for o in outs]
    grad = torch.cat([o[2] for o in outs], dim=1)
    for lp, lse, _ in outs:
        torch.testing.assert_close(lp, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref[1], atol=1e-5, rtol=1e-5)
    _assert_grad_same(grad.to(dtype), ref[2], dtype)
