"""Top-k and full-vocabulary KD losses against float64 references, and TP=2 against TP=1."""

import dataclasses
import io

import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from nemo_kd.losses.divergences import LOSS_TYPES
from nemo_kd.losses.full_vocab import chunked_full_kd_loss, reference_full_kd_loss
from nemo_kd.losses.kd import DEFAULT_TAIL_FLOOR, KDSettings, full_kd_loss, token_agreement, topk_kd_loss
from nemo_kd.losses.objective import DistillationLossConfig
from test_divergences import ref_divergence

PARAMS = dict(jsd_beta=0.3, skew_alpha=0.2, akl_mu=0.5)
REF_PARAMS = dict(beta=0.3, alpha=0.2, mu=0.5)
CONVENTIONS = ("renormalized", "exact_tail")
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- data and references


def make_case(n, v, k, seed, scale=3.0):
    """Student logits, full teacher logits, the teacher's top-k (values, ids) — ids on every shard."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    vals, ids = teacher.topk(k, dim=-1)
    return student, teacher, vals, ids


def ref_topk(student, vals, ids, convention, loss_type, s=1.0, t=1.0, teacher_lse=None, floor=DEFAULT_TAIL_FLOOR):
    """Float64 reference: full-vocabulary log_softmax of the student, explicit buckets; −inf slots are empty."""
    slot = torch.isfinite(vals)
    logq_full = torch.log_softmax(student.double() * s, dim=-1)
    logq_at = torch.where(slot, logq_full.gather(-1, ids), NEG_INF)
    z = torch.where(slot, vals.double() * t, NEG_INF)
    if convention == "renormalized":
        log_p = torch.log_softmax(z, -1)
        log_q = logq_at - torch.logsumexp(logq_at, -1, keepdim=True)
    else:
        logp_at = z - teacher_lse.double()[:, None]
        tail = lambda lp: torch.log((1 - lp.exp().sum(-1, keepdim=True)).clamp(min=floor))  # noqa: E731
        log_p = torch.cat([logp_at, tail(logp_at)], -1)
        log_q = torch.cat([logq_at, tail(logq_at)], -1)
    return ref_divergence(loss_type, log_p, log_q, **REF_PARAMS)


def ref_full(student, teacher, loss_type, s=1.0, t=1.0):
    log_p = torch.log_softmax(teacher.double() * t, -1)
    log_q = torch.log_softmax(student.double() * s, -1)
    return ref_divergence(loss_type, log_p, log_q, **REF_PARAMS)


def value_and_grad(fn, student, g_out):
    x = student.clone().requires_grad_(True)
    out = fn(x)
    (out.double() * g_out).sum().backward()
    return out.detach(), x.grad


# ----------------------------------------------------------------------------- top-k vs reference


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.5)])
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_topk_matches_reference(loss_type, convention, scales):
    s, t = scales
    student, teacher, vals, ids = make_case(11, 40, 6, seed=0)
    lse = torch.logsumexp(teacher * t, -1)
    vals[2, 4:] = NEG_INF  # empty slots
    g_out = torch.randn(11, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
        out, grad = value_and_grad(
            lambda x: topk_kd_loss(x, vals, ids,
                                   KDSettings(loss_type=loss_type, topk_convention=convention, logits_scale=s,
                                              target_logits_scale=t, **PARAMS),
                                   teacher_lse=lse),
            student.to(dtype), g_out)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        ref, ref_grad = value_and_grad(
            lambda x: ref_topk(x, vals, ids, convention, loss_type, s, t, lse), student, g_out)
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
        torch.testing.assert_close(grad.double(), ref_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_topk_gradcheck(convention):
    student, teacher, vals, ids = make_case(4, 9, 3, seed=1)
    lse = torch.logsumexp(teacher * 0.7, -1)
    for loss_type in ("forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl"):
        torch.autograd.gradcheck(
            lambda x: topk_kd_loss(x, vals, ids,
                                   KDSettings(loss_type=loss_type, topk_convention=convention, logits_scale=1.3,
                                              target_logits_scale=0.7, **PARAMS),
                                   teacher_lse=lse),
            (student.clone().requires_grad_(True),))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_topk_bf16_and_large_logits(convention):
    student, teacher, vals, ids = make_case(9, 32, 5, seed=2)
    student[0], teacher[0] = student[0] * 3e3, teacher[0] * 3e3  # logits of order ±1e4
    student[1, ids[1, 0]] = 1e4
    vals, ids = teacher.topk(5, dim=-1)
    lse = torch.logsumexp(teacher, -1)
    g_out = torch.randn(9, dtype=torch.float64)
    for loss_type in LOSS_TYPES:
        # bf16 student logits: the reference sees the same bf16 values upcast, so only accumulation differs.
        sb = student.to(torch.bfloat16)
        out, grad = value_and_grad(lambda x: topk_kd_loss(x, vals.float(), ids,
                                                          KDSettings(loss_type=loss_type, topk_convention=convention,
                                                                     **PARAMS),
                                                          teacher_lse=lse.float()), sb, g_out)
        assert grad.dtype == torch.bfloat16 and torch.isfinite(out).all() and torch.isfinite(grad).all()
        ref, ref_grad = value_and_grad(lambda x: ref_topk(x, vals, ids, convention, loss_type, teacher_lse=lse),
                                       sb.double(), g_out)
        torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(grad.double(), ref_grad, atol=2e-2, rtol=2e-2)
        # fp64 end to end: exact.
        out64 = topk_kd_loss(student, vals, ids, KDSettings(loss_type=loss_type, topk_convention=convention, **PARAMS),
                             teacher_lse=lse)
        torch.testing.assert_close(out64, ref_topk(student, vals, ids, convention, loss_type, teacher_lse=lse),
                                   atol=1e-9, rtol=1e-9)


def test_exact_tail_lower_bounds_full_vocab_forward_kl():
    student, teacher, vals, ids = make_case(16, 50, 4, seed=3)
    lse = torch.logsumexp(teacher, -1)
    tail = topk_kd_loss(student, vals, ids, KDSettings(loss_type="forward_kl", topk_convention="exact_tail"),
                        teacher_lse=lse)
    full = full_kd_loss(student, teacher, KDSettings(loss_type="forward_kl"))
    assert (tail <= full + 1e-12).all() and (tail > 0).all()
    # k = V: the k buckets are the whole vocabulary, the tail is the floor on both sides, so tail ≈ full.
    vals_all, ids_all = teacher.topk(50, dim=-1)
    torch.testing.assert_close(topk_kd_loss(student, vals_all, ids_all, KDSettings(topk_convention="exact_tail"),
                                            teacher_lse=lse), full,
                               atol=1e-6, rtol=1e-6)


def test_exact_tail_clamps_tail_when_teacher_mass_rounds_above_one():
    student, teacher, vals, ids = make_case(5, 20, 20, seed=4)
    lse = torch.logsumexp(teacher, -1) - 1e-3  # stored lse slightly low: Σ p_i > 1
    x = student.clone().requires_grad_(True)
    out = topk_kd_loss(x, vals, ids, KDSettings(loss_type="reverse_kl", topk_convention="exact_tail"), teacher_lse=lse)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out, ref_topk(student, vals, ids, "exact_tail", "reverse_kl", teacher_lse=lse))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_garbage_rows_are_zero_with_zero_grad(convention):
    student, teacher, vals, ids = make_case(4, 16, 3, seed=5)
    lse = torch.logsumexp(teacher, -1)
    vals[1] = NEG_INF  # no teacher information (padding)
    ids[1] = -1  # and ids that are garbage
    if convention == "exact_tail":
        lse[2] = float("nan")
    x = student.clone().requires_grad_(True)
    for loss_type in LOSS_TYPES:
        x.grad = None
        out = topk_kd_loss(x, vals, ids, KDSettings(loss_type=loss_type, topk_convention=convention), teacher_lse=lse)
        out.sum().backward()
        bad = [1, 2] if convention == "exact_tail" else [1]
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
        assert (out[bad] == 0).all() and (x.grad[bad] == 0).all() and (out[0] > 0)


def test_topk_errors():
    student, teacher, vals, ids = make_case(3, 8, 2, seed=6)
    with pytest.raises(ValueError, match="teacher_lse"):
        topk_kd_loss(student, vals, ids, KDSettings(topk_convention="exact_tail"))
    with pytest.raises(ValueError, match="outside"):
        topk_kd_loss(student, vals, ids + 8, KDSettings())
    with pytest.raises(ValueError, match="loss_type"):
        topk_kd_loss(student, vals, ids, KDSettings(loss_type="kl"))
    with pytest.raises(ValueError, match="topk_convention"):
        topk_kd_loss(student, vals, ids, KDSettings(topk_convention="tail"))


def test_settings_refuse_bad_values_by_name():
    """KDSettings carries the checks the four entry points each made, with their messages, and only it is taken."""
    bad = [
        (dict(loss_type="kl"), r"unknown loss_type 'kl'; expected one of \('forward_kl'"),
        (dict(jsd_beta=1.5), r"jsd beta must be in \[0, 1\], got 1.5 \(KDSettings.jsd_beta\)"),
        (dict(skew_alpha=-0.1), r"skew alpha must be in \[0, 1\], got -0.1"),
        (dict(loss_type="forward_kl", akl_mu=float("nan")), r"akl mu must be in \[0, 1\], got nan"),  # checked unused
        (dict(logits_scale=0.0), r"^logits_scale must be > 0, got 0.0$"),
        (dict(target_logits_scale=-1.0), r"^target_logits_scale must be > 0, got -1.0$"),
        (dict(topk_convention="tail"), r"unknown topk_convention 'tail'; expected one of \('renormalized'"),
        (dict(tail_floor=1.0), r"tail_floor must be in \(0, 1\), got 1.0"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            KDSettings(**kwargs)
    with pytest.raises(TypeError, match="temperature_squared must be a bool"):
        KDSettings(temperature_squared="false")
    for edge in (dict(jsd_beta=0.0), dict(jsd_beta=1.0), dict(skew_alpha=1.0), dict(akl_mu=0.0), dict(tail_floor=0.5)):
        KDSettings(**edge)  # the closed ends are the exact KLs, not errors
    with pytest.raises(dataclasses.FrozenInstanceError):
        KDSettings().loss_type = "jsd"
    student, teacher, vals, ids = make_case(3, 8, 2, seed=6)
    lse = torch.logsumexp(teacher, -1)
    old_style = [lambda: topk_kd_loss(student, vals, ids, lse),  # the old 4th positional (teacher_lse)
                 lambda: full_kd_loss(student, teacher, "forward_kl"),
                 lambda: chunked_full_kd_loss(student, teacher, None),
                 lambda: reference_full_kd_loss(student, teacher, {"loss_type": "jsd"})]
    for call in old_style:
        with pytest.raises(TypeError, match="KDSettings"):
            call()
    # DistillationLossConfig builds the settings from its keys, and refuses a bad one when loaded
    cfg = DistillationLossConfig(kd_loss_type="akl", akl_mu=0.3, jsd_beta=0.2, skew_alpha=0.4, logits_scale=0.5,
                                 target_logits_scale=0.8, temperature_squared=True, topk_convention="exact_tail")
    assert cfg.kd_settings == KDSettings(loss_type="akl", akl_mu=0.3, jsd_beta=0.2, skew_alpha=0.4, logits_scale=0.5,
                                         target_logits_scale=0.8, temperature_squared=True,
                                         topk_convention="exact_tail")
    with pytest.raises(ValueError, match=r"jsd beta must be in \[0, 1\], got 2.0"):
        DistillationLossConfig.from_dict({"kd_loss_type": "forward_kl", "jsd_beta": 2.0})


# ----------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_temperature_squared_is_one_over_logits_scale_squared(convention):
    student, teacher, vals, ids = make_case(6, 24, 4, seed=7)
    s = 0.5  # T = 2: a correct factor is 4 (s² = 0.25, 1/s = 2 and T = 1 would all fail)
    lse = torch.logsumexp(teacher * s, -1)
    kw = dict(topk_convention=convention, logits_scale=s, target_logits_scale=s)
    plain = topk_kd_loss(student, vals, ids, KDSettings(**kw), teacher_lse=lse)
    hinton = topk_kd_loss(student, vals, ids, KDSettings(temperature_squared=True, **kw), teacher_lse=lse)
    ref = ref_topk(student, vals, ids, convention, "forward_kl", s, s, lse)
    torch.testing.assert_close(plain, ref)
    torch.testing.assert_close(hinton, 4.0 * ref)
    full = full_kd_loss(student, teacher, KDSettings(logits_scale=s, target_logits_scale=s, temperature_squared=True))
    torch.testing.assert_close(full, 4.0 * ref_full(student, teacher, "forward_kl", s, s))


# ----------------------------------------------------------------------------- full vocabulary


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_matches_reference(loss_type, scales):
    s, t = scales
    student, teacher, _, _ = make_case(9, 30, 1, seed=8)
    teacher[:, 27:] = NEG_INF  # padded teacher vocabulary
    if loss_type in ("reverse_kl", "akl"):  # finite only if the student's padded columns are masked too
        student[:, 27:] = NEG_INF
    teacher[3] = NEG_INF  # fully masked row → 0
    g_out = torch.randn(9, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, None)):
        x_in = student.to(dtype)
        out, grad = value_and_grad(lambda x: full_kd_loss(x, teacher.to(dtype),
                                                          KDSettings(loss_type=loss_type, logits_scale=s,
                                                                     target_logits_scale=t, **PARAMS)), x_in, g_out)
        ref, ref_grad = value_and_grad(lambda x: ref_full(x, teacher.to(dtype), loss_type, s, t), x_in.double(), g_out)
        assert torch.isfinite(out).all() and torch.isfinite(grad).all() and out[3] == 0 and (grad[3] == 0).all()
        ref[3], ref_grad[3] = 0, 0
        vtol, gtol = (tol, tol) if tol else (1e-4, 2e-2)
        torch.testing.assert_close(out.double(), ref, atol=vtol, rtol=vtol)
        torch.testing.assert_close(grad.double(), ref_grad, atol=gtol, rtol=gtol)


def test_full_large_logits():
    student, teacher, _, _ = make_case(5, 20, 1, seed=9, scale=5e3)
    for loss_type in LOSS_TYPES:
        out = full_kd_loss(student.float(), teacher.float(), KDSettings(loss_type=loss_type, **PARAMS))
        ref = ref_full(student.float(), teacher.float(), loss_type)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-4)


def test_token_agreement_single_rank():
    student, teacher, vals, ids = make_case(50, 20, 3, seed=10)
    expected = (student.argmax(-1) == teacher.argmax(-1)).double().mean().float()
    torch.testing.assert_close(token_agreement(student, teacher), expected)
    torch.testing.assert_close(token_agreement(student, ids), expected)
    shuffled = torch.randperm(3)
    by_logits = token_agreement(student, ids[:, shuffled], teacher_topk_logits=vals[:, shuffled])
    torch.testing.assert_close(by_logits, expected)
    mask = torch.arange(50) < 10
    torch.testing.assert_close(token_agreement(student, teacher, mask=mask),
                               (student.argmax(-1) == teacher.argmax(-1))[:10].float().mean())


# ----------------------------------------------------------------------------- TP=2 == TP=1


def _all_losses(student, teacher, vals, ids, lse, g_out, group, shard=None):
    """Every (top-k convention × loss type) and full-vocab loss: values and the student shard's gradients."""
    results = {}
    v_local = student.shape[1] if shard is None else student.shape[1] // 2
    sl = slice(None) if shard is None else slice(shard * v_local, (shard + 1) * v_local)
    scales = dict(logits_scale=0.8, target_logits_scale=1.25, **PARAMS)
    cases = [(f"topk/{c}/{lt}", lambda x, c=c, lt=lt: topk_kd_loss(
        x, vals, ids, KDSettings(loss_type=lt, topk_convention=c, **scales), teacher_lse=lse, group=group))
        for c in CONVENTIONS for lt in LOSS_TYPES]
    cases += [(f"full/{lt}", lambda x, lt=lt: full_kd_loss(
        x, teacher[:, sl].clone(), KDSettings(loss_type=lt, **scales), group=group)) for lt in LOSS_TYPES]
    for name, fn in cases:
        results[name] = value_and_grad(fn, student[:, sl].clone(), g_out)
    results["agreement"] = (token_agreement(student[:, sl], teacher[:, sl].clone(), group),
                            token_agreement(student[:, sl], ids, group))
    return results


def _tp2_body(rank, world, student, teacher, vals, ids, lse, g_out):
    buf = io.BytesIO()  # plain bytes: many tensors through the result queue would need shared-memory handles
    torch.save(_all_losses(student, teacher, vals, ids, lse, g_out, dist.group.WORLD, shard=rank), buf)
    return buf.getvalue()


def _tp2_case():
    student, teacher, vals, ids = make_case(12, 48, 5, seed=11)
    teacher, student = teacher.float(), student.float()
    ids[::2, 0], ids[1::2, 0] = 30, 7  # top-1 ids alternate between rank 1's and rank 0's shards
    teacher[::2, 30], teacher[1::2, 7] = 20.0, 20.0
    vals = teacher.gather(-1, ids)
    vals[5, 3:] = NEG_INF
    lse = torch.logsumexp(teacher * 1.25, -1)
    return student, teacher, vals, ids, lse, torch.randn(12, dtype=torch.float64)


@pytest.mark.distributed
def test_tp2_equals_tp1_values_and_grads():
    case = _tp2_case()
    tp1 = _all_losses(*case, group=None)
    ranks = [torch.load(io.BytesIO(r)) for r in run_distributed(_tp2_body, 2, *case)]
    for name, (out, grad) in tp1.items():
        if name == "agreement":
            for r in ranks:
                torch.testing.assert_close(r[name][0], out)
                torch.testing.assert_close(r[name][1], grad)
            continue
        for r in ranks:  # the loss is replicated on every TP rank
            torch.testing.assert_close(r[name][0], out, atol=1e-5, rtol=1e-5, msg=name)
        tp2_grad = torch.cat([r[name][1] for r in ranks], dim=1)  # each rank's shard, concatenated
        torch.testing.assert_close(tp2_grad, grad, atol=1e-5, rtol=1e-5, msg=name)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # And TP=1 against the float64 references, so TP=2 is tied to the math too.
    student, teacher, vals, ids, lse, _ = case
    for lt in LOSS_TYPES:
        torch.testing.assert_close(tp1[f"full/{lt}"][0].double(), ref_full(student, teacher, lt, 0.8, 1.25),
                                   atol=2e-5, rtol=2e-5)
        for c in CONVENTIONS:
            torch.testing.assert_close(tp1[f"topk/{c}/{lt}"][0].double(),
                                       ref_topk(student, vals, ids, c, lt, 0.8, 1.25, lse), atol=2e-5, rtol=2e-5)
