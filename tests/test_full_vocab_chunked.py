"""The chunked torch full-vocabulary KD path (nemo_kd.losses.full_vocab) against float64 references.

Every divergence, values and gradients w.r.t. the student logits: against a float64 naive
reference (``log_softmax`` both sides, the divergence by its definition, autograd), at chunk
boundaries (N not a multiple of the chunk, N < chunk, chunk = 1), with masked rows and padded
columns, on bf16 inputs, at ±1e4 logits, TP=2 over gloo against TP=1, and against the old
autograd path (:func:`reference_full_kd_loss`). Plus what is kept for backward (the gradient
alone), the values-only path, and ``full_kd_loss``'s dispatch to it.
"""

import io

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from nemo_kd.losses.divergences import LOSS_TYPES
from nemo_kd.losses.full_vocab import FullVocabDivergence, chunked_full_kd_loss, reference_full_kd_loss
from nemo_kd.losses.kd import KDSettings, full_kd_loss
from nemo_kd.losses.objective import DistillationLossConfig
from test_divergences import ref_divergence

PARAMS = dict(jsd_beta=0.3, skew_alpha=0.2, akl_mu=0.5)
REF_PARAMS = dict(beta=0.3, alpha=0.2, mu=0.5)
NEG_INF = float("-inf")
# (N, chunk): N a multiple of the chunk, not a multiple, N < chunk, one row per chunk.
CHUNKS = [(12, 4), (13, 5), (7, 64), (5, 1)]


def _case(n, v, seed, scale=3.0, pad=3):
    """Student and teacher float64 logits; the last ``pad`` columns are padding (−inf on both
    sides, so reverse-type divergences stay finite) and row 1 has no teacher (all −inf)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    if pad:
        student[:, v - pad:] = NEG_INF
        teacher[:, v - pad:] = NEG_INF
    teacher[1] = NEG_INF
    return student, teacher


def _ref(student, teacher, loss_type, s=1.0, t=1.0):
    """Float64 naive reference; rows without a teacher are 0."""
    live = torch.isfinite(teacher.double().amax(-1))
    teacher = torch.where(live[:, None], teacher.double(), 0.0)
    log_p = torch.log_softmax(teacher * t, -1)
    log_q = torch.log_softmax(student.double() * s, -1)
    return torch.where(live, ref_divergence(loss_type, log_p, log_q, **REF_PARAMS), 0.0)


def _value_and_grad(fn, student, g_out):
    x = student.detach().clone().requires_grad_(True)
    out = fn(x)
    (out.double() * g_out).sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("n,chunk", CHUNKS)
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.8, 1.25)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_values_and_grads_match_float64_reference(loss_type, scales, n, chunk):
    s, t = scales
    student, teacher = _case(n, 40, seed=n + chunk)
    g_out = torch.randn(n, dtype=torch.float64)
    ref, ref_grad = _value_and_grad(lambda x: _ref(x, teacher, loss_type, s, t), student, g_out)
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 2e-5)):
        settings = KDSettings(loss_type=loss_type, logits_scale=s, target_logits_scale=t, **PARAMS)
        out, grad = _value_and_grad(lambda x: chunked_full_kd_loss(x, teacher.to(dtype), settings, chunk_tokens=chunk),
                                    student.to(dtype), g_out)
        assert out.dtype == dtype and grad.dtype == dtype
        assert out[1] == 0 and (grad[1] == 0).all()  # the row without a teacher
        assert (grad[:, -3:] == 0).all()  # padded columns: q = p = 0
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_old_path_equals_new_path(loss_type):
    student, teacher = _case(13, 40, seed=3)
    g_out = torch.randn(13, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        settings = KDSettings(loss_type=loss_type, logits_scale=0.8, target_logits_scale=1.25, **PARAMS)
        new = _value_and_grad(lambda x: chunked_full_kd_loss(x, teacher.to(dtype), settings, chunk_tokens=4),
                              student.to(dtype), g_out)
        old = _value_and_grad(lambda x: reference_full_kd_loss(x, teacher.to(dtype), settings), student.to(dtype),
                              g_out)
        torch.testing.assert_close(new[0], old[0], atol=tol, rtol=tol)
        torch.testing.assert_close(new[1], old[1], atol=tol, rtol=tol)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_bf16_inputs(loss_type):
    """bf16 logits: fp32 accumulation, a bf16 gradient; the reference sees the same bf16 values upcast."""
    student, teacher = _case(11, 64, seed=4)
    sb, tb = student.to(torch.bfloat16), teacher.to(torch.bfloat16)
    g_out = torch.randn(11, dtype=torch.float64)
    out, grad = _value_and_grad(lambda x: chunked_full_kd_loss(x, tb, KDSettings(loss_type=loss_type, **PARAMS),
                                                               chunk_tokens=4),
                                sb, g_out)
    ref, ref_grad = _value_and_grad(lambda x: _ref(x, tb, loss_type), sb.double(), g_out)
    assert out.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # The gradient is rounded to bf16 twice (stored, then scaled): ~2 bf16 ulps.
    torch.testing.assert_close(grad.double(), ref_grad, atol=1e-2 * ref_grad.abs().max().item(), rtol=2e-2)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_large_logits_near_converged(loss_type):
    """±1e4 logits, student a small perturbation of the teacher: log-probs relative to the row max
    keep the O(1e-3) differences that ``z − logsumexp(z)`` would round away (ulp(1e4) ≈ 1e-3)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(6, 48, generator=g, dtype=torch.float64) * 3 + 1e4
    teacher = base.float()
    student = (base + torch.randn(6, 48, generator=g, dtype=torch.float64) * 0.05).float()
    g_out = torch.randn(6, dtype=torch.float64)
    out, grad = _value_and_grad(lambda x: chunked_full_kd_loss(x, teacher, KDSettings(loss_type=loss_type, **PARAMS),
                                                               chunk_tokens=4), student, g_out)
    ref, ref_grad = _value_and_grad(lambda x: _ref(x, teacher, loss_type), student.double(), g_out)
    assert (ref > 1e-5).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-7, rtol=2e-3)
    torch.testing.assert_close(grad.double(), ref_grad, atol=2e-6, rtol=2e-3)


def test_dead_student_rows_give_zero():
    """A row whose student logits are all −inf gives 0 with zero gradient (the fused kernel's rule)."""
    student, teacher = _case(5, 20, seed=6, pad=0)
    student[2] = NEG_INF
    for loss_type in LOSS_TYPES:
        out, grad = _value_and_grad(lambda x: chunked_full_kd_loss(x, teacher.float(),
                                                                   KDSettings(loss_type=loss_type, **PARAMS),
                                                                   chunk_tokens=2),
                                    student.float(), torch.ones(5, dtype=torch.float64))
        assert out[2] == 0 and (grad[2] == 0).all() and torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_end_points_are_exact():
    """JSD at β = 0 / 1 and skew KL at α = 0 are exactly FKL / RKL; skew KL at α = 1 is exactly 0."""
    assert FullVocabDivergence.of(KDSettings("jsd", jsd_beta=0.0)).kind == "forward_kl"
    assert FullVocabDivergence.of(KDSettings("jsd", jsd_beta=1.0)).kind == "reverse_kl"
    assert FullVocabDivergence.of(KDSettings("skew_fkl", skew_alpha=0.0)).kind == "forward_kl"
    assert FullVocabDivergence.of(KDSettings("skew_rkl", skew_alpha=0.0)).kind == "reverse_kl"
    student, teacher = _case(6, 20, seed=7)
    for loss_type in ("skew_fkl", "skew_rkl"):
        out, grad = _value_and_grad(lambda x: chunked_full_kd_loss(x, teacher,
                                                                   KDSettings(loss_type=loss_type, skew_alpha=1.0)),
                                    student, torch.ones(6, dtype=torch.float64))
        assert (out == 0).all() and (grad == 0).all()
    with pytest.raises(ValueError, match="jsd beta"):
        KDSettings("jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="skew alpha"):
        KDSettings("skew_rkl", skew_alpha=-0.1)


def test_only_the_gradient_is_kept_for_backward():
    """What the autograd graph saves: the gradient in the logits' dtype and a [N] row mask, nothing
    fp32 [N, V] (the old path saves several)."""
    student, teacher = _case(13, 40, seed=8)

    def saved_bytes(fn, x):
        sizes = []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x.detach().clone().requires_grad_(True))
        return sum(sizes)

    for loss_type in LOSS_TYPES:
        sb = student.to(torch.bfloat16)
        new = saved_bytes(lambda x: chunked_full_kd_loss(x, teacher.bfloat16(),
                                                         KDSettings(loss_type=loss_type, **PARAMS), chunk_tokens=4), sb)
        old = saved_bytes(lambda x: reference_full_kd_loss(x, teacher.bfloat16(),
                                                           KDSettings(loss_type=loss_type, **PARAMS)), sb)
        assert new == sb.numel() * 2 + 13, loss_type  # bf16 gradient + bool row mask
        assert old >= 2 * sb.numel() * 4, loss_type


def test_values_only_without_grad_and_single_backward():
    student, teacher = _case(9, 30, seed=9)
    with_grad = chunked_full_kd_loss(student.clone().requires_grad_(True), teacher, KDSettings(loss_type="jsd"),
                                     chunk_tokens=4)
    with torch.no_grad():
        plain = chunked_full_kd_loss(student.clone().requires_grad_(True), teacher, KDSettings(loss_type="jsd"),
                                     chunk_tokens=4)
    assert not plain.requires_grad
    torch.testing.assert_close(plain, with_grad.detach(), atol=0, rtol=0)
    # Backward twice through one graph would scale the stored gradient twice: refused.
    x = student.clone().requires_grad_(True)
    out = chunked_full_kd_loss(x, teacher, KDSettings(), chunk_tokens=4).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.backward()


def test_teacher_gets_no_gradient():
    student, teacher = _case(6, 20, seed=10)
    t = teacher.clone().requires_grad_(True)
    x = student.clone().requires_grad_(True)
    full_kd_loss(x, t, KDSettings(loss_type="reverse_kl")).sum().backward()
    assert t.grad is None and x.grad is not None


@pytest.mark.parametrize("impl", ["torch", "auto"])
def test_full_kd_loss_dispatches_to_the_chunked_path(impl):
    """On CPU ``torch`` and ``auto`` run the chunked path: the T² factor, labels and errors as before."""
    student, teacher = _case(10, 30, seed=11)
    labels = torch.randint(0, 27, (10,))
    for loss_type in LOSS_TYPES:
        kw = dict(loss_type=loss_type, logits_scale=0.5, target_logits_scale=0.5, **PARAMS)
        out, label_lp = full_kd_loss(student.float(), teacher.float(), KDSettings(temperature_squared=True, **kw),
                                     impl=impl, label_ids=labels)
        torch.testing.assert_close(out, 4.0 * chunked_full_kd_loss(student.float(), teacher.float(), KDSettings(**kw)))
        torch.testing.assert_close(label_lp.double(), torch.log_softmax(student, -1).gather(-1, labels[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inplace_backward"):
        full_kd_loss(student.float().requires_grad_(True), teacher.float(), KDSettings(), impl=impl,
                     inplace_backward=True)


def test_kd_kernel_defaults_to_auto():
    assert DistillationLossConfig().kd_kernel == "auto"


# ----------------------------------------------------------------------------- TP=2 == TP=1


def _tp_losses(student, teacher, g_out, group, shard=None):
    v_local = student.shape[1] if shard is None else student.shape[1] // 2
    sl = slice(None) if shard is None else slice(shard * v_local, (shard + 1) * v_local)
    results = {}
    for loss_type in LOSS_TYPES:
        for chunk in (4, 64):
            settings = KDSettings(loss_type=loss_type, logits_scale=0.8, target_logits_scale=1.25, **PARAMS)
            results[f"{loss_type}/{chunk}"] = _value_and_grad(lambda x: chunked_full_kd_loss(
                x, teacher[:, sl].clone(), settings, group=group, chunk_tokens=chunk), student[:, sl], g_out)
    return results


def _tp2_body(rank, world, student, teacher, g_out):
    buf = io.BytesIO()  # plain bytes through the result queue
    torch.save(_tp_losses(student, teacher, g_out, dist.group.WORLD, shard=rank), buf)
    return buf.getvalue()


@pytest.mark.distributed
def test_tp2_equals_tp1():
    student, teacher = _case(13, 48, seed=12)
    student, teacher = student.float(), teacher.float()
    # Rows whose teacher top-1 lives on rank 1's shard, and a row whose student shard 0 is all −inf.
    teacher[::2, 30] = 20.0
    student[4, :24] = NEG_INF
    g_out = torch.randn(13, dtype=torch.float64)
    tp1 = _tp_losses(student, teacher, g_out, None)
    ranks = [torch.load(io.BytesIO(r)) for r in run_distributed(_tp2_body, 2, student, teacher, g_out)]
    for name, (out, grad) in tp1.items():
        for r in ranks:  # replicated loss
            torch.testing.assert_close(r[name][0], out, atol=1e-5, rtol=1e-5, msg=name)
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks], dim=1), grad, atol=1e-5, rtol=1e-5,
                                   msg=name)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    for loss_type in LOSS_TYPES:  # and TP=1 tied to the float64 reference
        torch.testing.assert_close(tp1[f"{loss_type}/4"][0].double(), _ref(student, teacher, loss_type, 0.8, 1.25),
                                   atol=2e-5, rtol=2e-5)
