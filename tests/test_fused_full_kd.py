"""The fused full-vocabulary (online-teacher) KD kernel equals the torch path, and kd_kernel routes it.

Runs on CPU through the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py
before anything imports triton). References are the torch ``full_kd_loss`` /
``vocab_parallel_logprobs_at`` evaluated in float64 on the same (fp32/bf16-rounded)
values; shapes are tiny and blocks are patched small so that rows span several
vocabulary blocks with a ragged last one.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

pytest.importorskip("triton", reason="triton is not importable: the fused kernels cannot be tested")

from dist_utils import run_distributed  # noqa: E402
from nemo_kd.kernels import full_kd_triton as fk  # noqa: E402
from nemo_kd.kernels import logprobs_triton as lt  # noqa: E402
from nemo_kd.losses.kd import KDSettings, full_kd_loss  # noqa: E402
from nemo_kd.losses.objective import (  # noqa: E402
    DistillationLossConfig,
    DistillationObjective,
    FullTeacher,
    ObjectiveBatch,
    TopKTeacher,
    objective_normalisers,
)
from nemo_kd.losses.vocab_parallel import resolve_impl  # noqa: E402

# Masked lanes of a row evaluate -inf - -inf / log(0) inside where-guarded branches.
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

NEG_INF = float("-inf")
# (loss_type, its parameter: jsd_beta for jsd, skew_alpha for skew_*; unused otherwise)
LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("skew_fkl", 0.1), ("skew_rkl", 0.25),
          ("akl", 0.5)]


def _param(loss_type, value):
    if loss_type == "akl":
        return dict(akl_mu=value)
    return dict(skew_alpha=value) if loss_type.startswith("skew") else dict(jsd_beta=value)


def _small_blocks():
    fk.FWD_BLOCK_V = fk.BWD_BLOCK_V = 32
    lt.FWD_BLOCK_V, lt.BWD_BLOCK_V, lt.BLOCK_J = 32, 32, 4


@pytest.fixture
def small_blocks(monkeypatch):
    for mod, names in ((fk, ("FWD_BLOCK_V", "BWD_BLOCK_V")), (lt, ("FWD_BLOCK_V", "BWD_BLOCK_V", "BLOCK_J"))):
        for name in names:
            monkeypatch.setattr(mod, name, getattr(mod, name))
    _small_blocks()


def _inputs(n, v, dtype, seed, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=g) * spread).to(dtype)
    # A teacher correlated with the student, so the KLs are O(1) rather than dominated by noise.
    teacher = (student.float() + torch.randn(n, v, generator=g) * spread).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    g_kd, g_lp = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return student, teacher, labels, g_kd, g_lp


def _run(student, teacher, labels, g_kd, g_lp, impl, inplace=False, **kw):
    """(kd, label log-prob, ∂(Σ g_kd·kd + Σ g_lp·lp)/∂student) through a non-leaf, as from an lm_head."""
    leaf = student.clone().requires_grad_(True)
    x = leaf * 1
    if impl == "fused" and inplace:
        kd, lp = fk.fused_full_kd_loss(x, teacher, KDSettings(**kw), label_ids=labels, inplace_backward=True)
    else:
        kd, lp = full_kd_loss(x, teacher, KDSettings(**kw), impl=impl, label_ids=labels)
    ((kd * g_kd.to(kd.dtype)).sum() + (lp * g_lp.to(lp.dtype)).sum()).backward()
    return kd.detach(), lp.detach(), leaf.grad


def _reference(student, teacher, labels, g_kd, g_lp, **kw):
    """The torch path in float64 on the same values."""
    return _run(student.double(), teacher.double(), labels, g_kd.double(), g_lp.double(), "torch", **kw)


def _check(out, ref, dtype, rows=slice(None), value_tol=2e-5, lp_atol=2e-5, grad_rtol=None):
    torch.testing.assert_close(out[0][rows].double(), ref[0][rows], atol=value_tol, rtol=value_tol)
    torch.testing.assert_close(out[1][rows].double(), ref[1][rows], atol=lp_atol, rtol=2e-5)
    assert out[2].dtype == dtype
    # The gradient is rounded once to the logits' dtype: half an ulp of bf16 (2^-9 relative).
    tol = {torch.float32: 1e-6, torch.bfloat16: 4e-3}[dtype]
    torch.testing.assert_close(out[2][rows].double(), ref[2][rows], atol=tol, rtol=grad_rtol or tol)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
@pytest.mark.parametrize("dtype,scales,t2", [
    (torch.float32, (1.0, 1.0), False),  # s = 1: the label log-prob comes from the kernel's own pass
    (torch.float32, (0.7, 1.6), True),   # temperatures (+ Hinton's T²): the label takes a separate pass
    (torch.bfloat16, (1.0, 0.5), False),
])
def test_matches_float64_torch(small_blocks, loss_type, beta, dtype, scales, t2):
    student, teacher, labels, g_kd, g_lp = _inputs(5, 101, dtype, seed=0)  # 101 = 3 blocks of 32 + 5
    kw = dict(loss_type=loss_type, **_param(loss_type, beta), logits_scale=scales[0],
              target_logits_scale=scales[1], temperature_squared=t2)
    ref = _reference(student, teacher, labels, g_kd, g_lp, **kw)
    assert ref[0].min() > 0.01  # a non-trivial divergence on every row
    _check(_run(student, teacher, labels, g_kd, g_lp, "fused", **kw), ref, dtype)


@pytest.mark.parametrize("kw,equals", [(dict(loss_type="jsd", jsd_beta=0.0), "forward_kl"),
                                       (dict(loss_type="jsd", jsd_beta=1.0), "reverse_kl"),
                                       (dict(loss_type="skew_fkl", skew_alpha=0.0), "forward_kl"),
                                       (dict(loss_type="skew_rkl", skew_alpha=0.0), "reverse_kl")])
def test_mixture_end_points_are_the_kls(small_blocks, kw, equals):
    student, teacher, labels, g_kd, g_lp = _inputs(3, 70, torch.float32, seed=1)
    ref = _reference(student, teacher, labels, g_kd, g_lp, loss_type=equals)
    _check(_run(student, teacher, labels, g_kd, g_lp, "fused", **kw), ref, torch.float32)


@pytest.mark.parametrize("mu", [0.0, 0.3, 0.7, 0.9])
def test_akl_head_from_top_k_and_by_bisection(small_blocks, monkeypatch, mu):
    """AKL's head from the teacher's top-k equals the sorted reference; a flat teacher whose head
    runs past the top-k (AKL_TOPK = 4 here) takes the bisection and still matches."""
    student, teacher, labels, g_kd, g_lp = _inputs(4, 70, torch.float32, seed=7)
    teacher[1] = teacher[1] * 0.01  # nearly flat: the head holds most of the vocabulary
    kw = dict(loss_type="akl", akl_mu=mu, logits_scale=1.0, target_logits_scale=1.1)
    ref = _reference(student, teacher, labels, g_kd, g_lp, **kw)
    monkeypatch.setattr(fk, "AKL_BISECTION_ROWS", 1)  # the fallback's row chunks
    for topk in (64, 4):
        monkeypatch.setattr(fk, "AKL_TOPK", topk)
        _check(_run(student, teacher, labels, g_kd, g_lp, "fused", **kw), ref, torch.float32)


@pytest.mark.parametrize("loss_type", ["skew_fkl", "skew_rkl"])
def test_skew_at_alpha_one_is_zero(small_blocks, loss_type):
    """α = 1: the mixture is the reference itself, D = 0 and no KD gradient (the CE's remains)."""
    student, teacher, labels, g_kd, g_lp = _inputs(3, 70, torch.float32, seed=4)
    kd, lp, grad = _run(student, teacher, labels, g_kd, g_lp, "fused", loss_type=loss_type, skew_alpha=1.0)
    ref = _reference(student, teacher, labels, torch.zeros_like(g_kd), g_lp, loss_type=loss_type, skew_alpha=1.0)
    assert kd.abs().max() < 1e-6
    torch.testing.assert_close(grad.double(), ref[2], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_type,beta", LOSSES)
def test_masks_large_logits_and_fully_masked_rows(small_blocks, loss_type, beta):
    student, teacher, labels, g_kd, g_lp = _inputs(7, 90, torch.float32, seed=2)
    student[:, 85:] = NEG_INF  # padded vocabulary columns, masked on both sides
    teacher[:, 85:] = NEG_INF
    teacher[0, ::4] = NEG_INF  # teacher-only zeros (RKL: masked in the student too, so it stays finite)
    if loss_type in ("reverse_kl", "akl"):  # (AKL weighs in the reverse KL)
        student[0, ::4] = NEG_INF
    labels[0] = 8  # ... a label at one of them
    student[1, 40:64] = NEG_INF  # whole blocks masked, different ones on each side
    teacher[1, :64] = NEG_INF
    student[2] = torch.linspace(-1e4, 1e4, 90)  # huge logits: no exp overflow, no cancellation
    teacher[2] = torch.linspace(1e4, -1e4, 90).roll(3)
    teacher[2, 85:] = NEG_INF
    student[2, 85:] = NEG_INF
    teacher[3] = NEG_INF  # teacher fully masked: KD 0 with no gradient, the CE still counts
    student[4] = NEG_INF  # padding row: everything masked on both sides
    teacher[4] = NEG_INF
    student[5, :] = 1e4  # a flat row far from 0, on both sides
    teacher[5, :85] = -1e4
    if loss_type in ("reverse_kl", "akl"):  # q > 0 = p would make RKL +inf: mask the student wherever the teacher is
        keep = torch.tensor([False, True, True, False, False, True, True])
        student = torch.where(keep[:, None] & torch.isinf(teacher), NEG_INF, student)
    if loss_type == "forward_kl":
        student[6, 10] = NEG_INF  # teacher mass where the student has none: FKL = +inf, as in the torch path
    kw = dict(loss_type=loss_type, **_param(loss_type, beta), logits_scale=1.0, target_logits_scale=0.8)
    out = _run(student, teacher, labels, g_kd, g_lp, "fused", **kw)
    ref = _reference(student, teacher, labels, g_kd, g_lp, **kw)
    live = [0, 1, 2, 3, 5, 6]
    assert torch.isfinite(ref[0][live[:-1]]).all()
    # Row 2: disjoint modes; the KLs are huge (not NaN), JSD_β is near its bound H(β) = 0.611.
    # (skew KLs are bounded by −log α: ~2.3 / 1.4 here)
    assert ref[0][2] > {"jsd": 0.6, "skew_fkl": 2.0, "skew_rkl": 1.2}.get(loss_type, 100)
    assert torch.isfinite(ref[0][6]) == (loss_type != "forward_kl")
    # Logits near 1e4 leave the fp32 LSE good to ~ulp(1e4) ≈ 1e-3: log-probs to 1e-3 absolute,
    # probabilities (the gradient) to 1e-3 relative; the torch fp32 path is no better.
    _check(out, ref, torch.float32, rows=live, value_tol=2e-5 if loss_type == "jsd" else 1e-4,
           lp_atol=2e-3,
           grad_rtol=1e-3)
    assert out[0][3] == 0 and (out[2][3, :85] != 0).all()  # teacher-less row: only the CE gradient
    # The padding row: KD and label log-prob 0, gradient exactly 0 (the torch path gives NaN there).
    assert out[0][4] == 0 and out[1][4] == 0 and (out[2][4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_same_gradient(small_blocks, dtype):
    student, teacher, labels, g_kd, g_lp = _inputs(4, 75, dtype, seed=3)
    for loss_type, beta in LOSSES:
        # logits_scale 1: full_kd_loss's label log-prob (temperature 1) is then the kernel's own.
        kw = dict(loss_type=loss_type, **_param(loss_type, beta), logits_scale=1.0, target_logits_scale=0.9)
        out = _run(student, teacher, labels, g_kd, g_lp, "fused", **kw)
        out_inplace = _run(student, teacher, labels, g_kd, g_lp, "fused", inplace=True, **kw)
        torch.testing.assert_close(out_inplace[2], out[2], atol=0, rtol=0)


def test_dispatch_and_errors():
    student, teacher, labels, _, _ = _inputs(3, 40, torch.float32, seed=4)
    assert resolve_impl("auto", student) == "torch"  # CPU: the interpreter is for tests only
    torch.testing.assert_close(full_kd_loss(student, teacher, KDSettings(loss_type="akl"), impl="auto"),
                               full_kd_loss(student, teacher, KDSettings(loss_type="akl")))
    with pytest.raises(ValueError, match="impl must be one of"):
        full_kd_loss(student, teacher, KDSettings(), impl="cuda")
    with pytest.raises(TypeError, match="fp64"):
        full_kd_loss(student.double(), teacher.double(), KDSettings(), impl="fused")
    with pytest.raises(ValueError, match="kd_kernel='triton' is not one of"):
        DistillationLossConfig(kd_kernel="triton").validate()


def _tp2_body(rank, world, student, teacher, labels, g_kd, g_lp, kw, inplace):
    _small_blocks()
    v_local = student.shape[1] // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    leaf = student[:, cols].clone().requires_grad_(True)
    if inplace:
        kd, lp = fk.fused_full_kd_loss(leaf * 1, teacher[:, cols], KDSettings(**kw), label_ids=labels,
                                       group=dist.group.WORLD, inplace_backward=True)
    else:
        kd, lp = full_kd_loss(leaf * 1, teacher[:, cols], KDSettings(**kw), impl="fused", label_ids=labels,
                              group=dist.group.WORLD)
    ((kd * g_kd).sum() + (lp * g_lp).sum()).backward()
    # numpy pickles by value (tensors would cross as fds that vanish with the worker)
    return kd.detach().numpy(), lp.detach().numpy(), leaf.grad.float().numpy()


@pytest.mark.distributed
def test_tp2_fused_equals_tp1_float64():
    """Both TP ranks return the TP=1 values; the concatenated shard gradients equal the TP=1 gradient."""
    student, teacher, labels, g_kd, g_lp = _inputs(5, 2 * 45, torch.bfloat16, seed=5)
    student[0, 45:] = NEG_INF  # rank 1 holds nothing of row 0 on either side
    teacher[0, 45:] = NEG_INF
    labels[0] = 3
    labels[1] = 60  # a label on rank 1's shard
    teacher[2, :45] = NEG_INF  # rank 0 holds no teacher mass for row 2
    student[3] *= 2e3  # large logits
    teacher[4] = NEG_INF  # teacher fully masked
    cases = [(dict(loss_type="jsd", jsd_beta=0.3, logits_scale=1.0, target_logits_scale=1.2), False),
             (dict(loss_type="skew_fkl", skew_alpha=0.1, logits_scale=1.0, target_logits_scale=1.2), True),
             (dict(loss_type="skew_rkl", skew_alpha=0.2, logits_scale=0.9, target_logits_scale=1.0), False),
             (dict(loss_type="akl", akl_mu=0.5, logits_scale=1.0, target_logits_scale=0.8), True),
             (dict(loss_type="forward_kl", logits_scale=1.0, target_logits_scale=0.7), True),
             (dict(loss_type="reverse_kl", logits_scale=1.0, target_logits_scale=0.7), False)]
    for kw, inplace in cases:
        if kw["loss_type"] in ("reverse_kl", "akl"):  # keep RKL finite: mask the student where the teacher is masked
            student = torch.where(torch.isinf(teacher) & (torch.arange(5) != 4)[:, None], NEG_INF, student)
        ref = _reference(student, teacher, labels, g_kd, g_lp, **kw)
        outs = run_distributed(_tp2_body, 2, student, teacher, labels, g_kd, g_lp, kw, inplace)
        outs = [[torch.from_numpy(a) for a in o] for o in outs]
        grad = torch.cat([o[2] for o in outs], dim=1).to(torch.bfloat16)
        for kd, lp, _ in outs:
            _check((kd, lp, grad), ref, torch.bfloat16)


# --------------------------------------------------------------------------- the objective's kd_kernel

B, T, V, K = 3, 4, 70, 5


def _objective_case(seed=6):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=g) * 2).to(torch.bfloat16)
    t_logits = (logits.float() + torch.randn(B, T, V, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1
    vals, ids = t_logits.float().topk(K, dim=-1)
    return logits, labels, mask, t_logits, vals, ids, torch.logsumexp(t_logits.float(), -1)


@pytest.mark.parametrize("mode,loss_type,scale", [
    ("topk", "forward_kl", 1.0), ("topk", "jsd", 0.8), ("online", "forward_kl", 1.0), ("online", "jsd", 1.0),
    ("online", "reverse_kl", 0.8),
])
def test_objective_fused_equals_torch(small_blocks, mode, loss_type, scale):
    logits, labels, mask, t_logits, vals, ids, lse = _objective_case()
    teacher = FullTeacher(t_logits) if mode == "online" else TopKTeacher(vals, ids, lse)
    results = {}
    for kernel in ("torch", "fused"):
        # a stored top-k teacher's LSE is at temperature 1: exact_tail takes no teacher temperature there
        cfg = DistillationLossConfig(kd_loss_type=loss_type, topk_convention="exact_tail", kd_loss_weight=1.0,
                                     sft_loss_weight=0.5, logits_scale=scale,
                                     target_logits_scale=1.1 if mode == "online" else 1.0, kd_kernel=kernel)
        batch = ObjectiveBatch(labels=labels, loss_mask=mask, teacher=teacher)
        x = logits.clone().requires_grad_(True)
        out = DistillationObjective(cfg)(x * 1, batch, objective_normalisers(cfg, [batch]))
        out.loss.backward()
        results[kernel] = (out.loss.detach(), out.metrics, x.grad)
    (l_t, m_t, g_t), (l_f, m_f, g_f) = results["torch"], results["fused"]
    torch.testing.assert_close(l_f, l_t, atol=2e-5, rtol=2e-5)
    for key in ("kd_loss", "sft_loss"):
        torch.testing.assert_close(m_f[key], m_t[key], atol=2e-5, rtol=2e-5)
    assert g_f.dtype == torch.bfloat16
    torch.testing.assert_close(g_f.float(), g_t.float(), atol=1e-4, rtol=1e-2)


def test_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile every variant to a cubin (no GPU needed)."""
    code = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nemo_kd.kernels import full_kd_triton as fk
from nemo_kd.kernels import logprobs_triton as lt
types = {"zs_ptr": "*bf16", "zt_ptr": "*bf16", "grad_ptr": "*bf16", "z_ptr": "*bf16", "label_ptr": "*i64",
         "ids_ptr": "*i64", "V": "i32", "M": "i32", "vocab_start": "i32"}
def build(fn, **cx):
    sig = {}
    for a in fn.arg_names:  # pointers to fp32 statistics, i64 strides, fp32 scalars
        default = "*fp32" if a.endswith("_ptr") else "i64" if a.startswith("stride") else "fp32"
        sig[a] = "constexpr" if a in cx else types.get(a, default)
    triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx), target=GPUTarget("cuda", 90, 32))
for loss in (0, 1, 2, 3, 4, 5):
    for has_label in (True, False):
        build(fk._stats_kernel, LOSS=loss, HAS_LABEL=has_label, BLOCK_V=fk.FWD_BLOCK_V)
    build(fk._bwd_kernel, LOSS=loss, BLOCK_V=fk.BWD_BLOCK_V, EMULATE_RTNE_BF16=False)
    if loss >= 2:
        build(fk._second_pass_kernel, LOSS=loss, BLOCK_V=fk.FWD_BLOCK_V)
build(lt._fwd_kernel, BLOCK_V=lt.FWD_BLOCK_V, BLOCK_J=lt.BLOCK_J)  # the primitive shares store_out
build(lt._bwd_dense_kernel, BLOCK_V=lt.BWD_BLOCK_V, EMULATE_RTNE_BF16=False)
build(lt._bwd_ids_kernel, BLOCK_J=lt.BLOCK_J, EMULATE_RTNE_BF16=False)
print("COMPILED")
"""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    if res.returncode != 0 and ("ptxas" in res.stderr.lower() and "not found" in res.stderr.lower()):
        pytest.skip("no ptxas in this triton install")
    assert "COMPILED" in res.stdout, res.stdout + res.stderr[-3000:]
