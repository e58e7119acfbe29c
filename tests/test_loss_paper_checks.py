"""Issue 14's outside checks, each against a float64 reference written from the definitions:

* AKL's head follows ONE rule on every path (top-k, full-vocabulary torch, the fused kernel's
  fast path and its bisection fallback), ties included, at TP=1 and TP=2;
* the ``exact_tail`` buckets are exact in their inputs on peaked teachers;
* log-probs, divergences and gradients do not change when every logit is offset by 1e4;
* every preference form runs at its paper's defaults from an unconfigured objective.

The fused kernels run through the Triton interpreter on CPU (TRITON_INTERPRET=1, conftest.py).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

from dist_utils import run_distributed  # noqa: E402
from nemo_kd.losses import kd  # noqa: E402
from nemo_kd.losses.divergences import LOSS_TYPES  # noqa: E402
from nemo_kd.losses.kd import KDSettings, full_kd_loss, topk_kd_loss  # noqa: E402
from nemo_kd.losses.objective import (  # noqa: E402
    PREFERENCE_TYPES,
    ROLE_NEGATIVE,
    ROLE_POSITIVE,
    DistillationLossConfig,
    DistillationObjective,
    ObjectiveBatch,
    objective_normalisers,
)
from nemo_kd.losses.vocab_parallel import vocab_parallel_logprobs_at  # noqa: E402
from test_divergences import ref_akl_head, ref_divergence  # noqa: E402
from test_kd_losses import ref_topk  # noqa: E402

try:
    from nemo_kd.kernels import full_kd_triton as fk
    from nemo_kd.kernels import logprobs_triton as lt
except ImportError:  # the torch paths are still checked
    fk = lt = None
IMPLS = ("torch", "fused") if fk is not None else ("torch",)

# Masked lanes of a row evaluate -inf - -inf / log(0) inside where-guarded branches (interpreter).
pytestmark = pytest.mark.filterwarnings("ignore:(invalid value|divide by zero) encountered:RuntimeWarning")

PARAMS = dict(jsd_beta=0.3, skew_alpha=0.2, akl_mu=0.5)
REF_PARAMS = dict(beta=0.3, alpha=0.2, mu=0.5)


def _value_and_grad(fn, x, g_out):
    x = x.clone().requires_grad_(True)
    out = fn(x)
    (out.double() * g_out).sum().backward()
    return out.detach().double(), x.grad.double()


# ----------------------------------------------------------------------------- 1. AKL: one head rule

P_TIE, MU_TIE = [0.316, 0.192, 0.192] + [0.043] * 7, 0.55


def _tie_case():
    """Issue 14's constructed teacher, p = [.316, .192, .192, 7 × .043] (μ = 0.55 falls inside the tied pair),
    its columns permuted per row so the ties sit anywhere (and on both TP shards); varied students."""
    g = torch.Generator().manual_seed(0)
    log_p = torch.tensor(P_TIE, dtype=torch.float64).log()
    perms = [torch.arange(10)] + [torch.randperm(10, generator=g) for _ in range(5)]
    teacher = torch.stack([log_p[perm] for perm in perms]).float()
    student = torch.randn(6, 10, generator=g)
    student[0] = 0.0  # uniform
    student[1] = torch.linspace(1.0, -1.0, 10)
    return student, teacher


def _bf16_tie_case(seed=1, n=64, v=96):
    """A bf16 teacher on a 1/4 grid (about 50 distinct values per row: ties everywhere), fp32 students."""
    g = torch.Generator().manual_seed(seed)
    teacher = (torch.round(torch.randn(n, v, generator=g) * 8) / 4).to(torch.bfloat16)
    student = teacher.float() + torch.randn(n, v, generator=g) * 0.5
    return student, teacher


def _akl_reference(student, teacher, mu, g_out):
    log_p = torch.log_softmax(teacher.double(), -1)
    return _value_and_grad(lambda x: ref_divergence("akl", log_p, torch.log_softmax(x, -1), mu=mu),
                           student.double(), g_out)


def _tie_margin(teacher, mu):
    """Smallest |F − μ| over the group boundaries of each row (F: float64 mass at or above a value):
    decisions closer to μ than fp32 rounding would not be a test of the tie rule."""
    p = torch.softmax(teacher.double(), -1)
    at_or_above = torch.where(p[:, None, :] >= p[:, :, None], p[:, None, :], 0 * p[:, None, :]).sum(-1)
    return (at_or_above - mu).abs().min().item()


def _akl_paths(student, teacher, mu, g_out, group=None, shard=None):
    """AKL per token and its student gradient on every path: {path: (value [N], grad of this shard)}."""
    n, v = student.shape
    v_local = v if shard is None else v // 2
    cols = slice(None) if shard is None else slice(shard * v_local, (shard + 1) * v_local)
    x, t = student[:, cols].contiguous(), teacher[:, cols].contiguous()
    # The top-k path over the whole vocabulary in a per-row shuffled order: equal to full-vocab AKL.
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(v, generator=g) for _ in range(n)])
    vals = teacher.float().gather(-1, ids)
    akl = KDSettings(loss_type="akl", akl_mu=mu)
    out = {"topk": _value_and_grad(lambda z: topk_kd_loss(z, vals, ids, akl, group=group), x, g_out),
           "full/torch": _value_and_grad(lambda z: full_kd_loss(z, t, akl, impl="torch", group=group), x, g_out)}
    if fk is not None:
        out["full/fused"] = _value_and_grad(lambda z: full_kd_loss(z, t, akl, impl="fused", group=group), x, g_out)
        saved, fk.AKL_TOPK = fk.AKL_TOPK, 1  # every row whose top-1 is below μ takes the bisection
        try:
            out["full/fused-bisection"] = _value_and_grad(lambda z: full_kd_loss(z, t, akl, impl="fused", group=group),
                                                          x, g_out)
        finally:
            fk.AKL_TOPK = saved
    return out


def _check_paths(paths, ref, cols=slice(None)):
    for name, (value, grad) in paths.items():
        torch.testing.assert_close(value, ref[0], atol=2e-6, rtol=2e-5, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(grad, ref[1][:, cols], atol=2e-6, rtol=2e-5, msg=lambda m: f"{name} grad: {m}")


def test_akl_constructed_tie_case_is_the_head_of_the_rule():
    """p = [.316, .192, .192, 7 × .043], μ = 0.55: the mass above the tied pair is .316 < μ, so both are in
    (head mass .700); the sort paths used to take one of them, the set path neither."""
    _, teacher = _tie_case()
    p = torch.softmax(teacher.double(), -1)
    head = ref_akl_head(p, MU_TIE)
    assert (head.sum(-1) == 3).all()
    torch.testing.assert_close(torch.where(head, p, 0 * p).sum(-1), torch.full((6,), 0.7 / 1.001, dtype=torch.float64))
    # Each paper prefix M (cumsum reaching μ) without ties: the set rule is the paper's where nothing ties.
    assert torch.equal(ref_akl_head(torch.tensor([[0.5, 0.3, 0.2]]), 0.55), torch.tensor([[True, True, False]]))


def test_akl_every_path_follows_the_rule_on_the_constructed_ties(small_blocks):
    student, teacher = _tie_case()
    g_out = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)
    ref = _akl_reference(student, teacher, MU_TIE, g_out)
    _check_paths(_akl_paths(student, teacher, MU_TIE, g_out), ref)


@pytest.mark.parametrize("mu", [0.3, 0.55, 0.8])
def test_akl_every_path_follows_the_rule_on_a_bf16_tied_teacher(small_blocks, mu):
    student, teacher = _bf16_tie_case()
    assert _tie_margin(teacher, mu) > 1e-5
    p = torch.softmax(teacher.double(), -1)
    # The rule is exercised: in many rows a tied group straddles μ (mass above it < μ ≤ mass at or above it).
    head = ref_akl_head(p, mu)
    t_star = torch.where(head, p, torch.ones_like(p)).min(-1, keepdim=True).values
    assert ((p == t_star).sum(-1) > 1).sum() >= 10
    g_out = torch.linspace(0.5, 1.5, student.shape[0], dtype=torch.float64)
    ref = _akl_reference(student, teacher, mu, g_out)
    _check_paths(_akl_paths(student, teacher, mu, g_out), ref)


# ----------------------------------------------------------------------------- 2. exact_tail tails

def _peaked_case(peak, n=64, v=4096, k=32, seed=0):
    """fp32 teacher / student logits of spread 0.3·peak (×20: tails 1e-4 … 1e-2 beyond the top 32), the
    teacher's top-k and its LSE stored in fp32, as the logits store keeps them."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 0.3 * peak
    s = t + torch.randn(n, v, generator=g, dtype=torch.float64) * 0.05 * peak
    t, s = t.float(), s.float()
    vals, ids = t.topk(k, dim=-1)
    return s, vals, ids, torch.logsumexp(t.double(), -1).float()


def _buckets_seen(monkeypatch, *args, **kw):
    """The (teacher, student) log-buckets ``[N, k+1]`` that topk_kd_loss hands to the divergence."""
    seen = {}
    real = kd.divergence

    def spy(loss_type, log_p, log_q, *a, **k):
        seen["p"], seen["q"] = log_p.detach(), log_q.detach()
        return real(loss_type, log_p, log_q, *a, **k)

    monkeypatch.setattr(kd, "divergence", spy)
    topk_kd_loss(*args, **kw)
    return seen["p"], seen["q"]


@pytest.mark.parametrize("peak", [1, 20])
def test_exact_tail_buckets_are_exact_in_their_inputs(monkeypatch, peak):
    s, vals, ids, lse = _peaked_case(peak)
    log_p, log_q = _buckets_seen(monkeypatch, s, vals, ids, KDSettings(topk_convention="exact_tail"), teacher_lse=lse)
    # Teacher: float64 of the stored values (fp32 top-k logits and LSE) — exact up to the fp32 log.
    tail_p = 1 - torch.exp(vals.double() - lse.double()[:, None]).sum(-1)
    err_p = (log_p[:, -1].double().exp() / tail_p - 1).abs()
    assert err_p.max() < 1e-6, err_p.max()
    # Student: against its exact distribution; its fp32 log-probs (one shared rounding of log Σ) are the limit.
    tail_q = 1 - torch.log_softmax(s.double(), -1).gather(-1, ids).exp().sum(-1)
    err_q = (log_q[:, -1].double().exp() / tail_q - 1).abs()
    assert err_q.max() < 1e-3 and err_q.median() < 1e-5, (err_q.max(), err_q.median())
    if peak == 20:
        assert tail_p.min() < 1e-3 and tail_q.min() < 1e-3  # the peaked regime is reached


@pytest.mark.parametrize("loss_type,kw", [("reverse_kl", {}), ("jsd", dict(jsd_beta=1.0)), ("akl", dict(akl_mu=0.5)),
                                          ("forward_kl", {})])
def test_exact_tail_losses_on_a_peaked_teacher_match_float64(loss_type, kw):
    """Reverse-type losses weigh the tail bucket by the student: tail errors showed in value and gradient."""
    s, vals, ids, lse = _peaked_case(20)
    g_out = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)
    settings = KDSettings(loss_type=loss_type, topk_convention="exact_tail", **kw)
    out, grad = _value_and_grad(lambda x: topk_kd_loss(x, vals, ids, settings, teacher_lse=lse), s, g_out)
    ref_type = "reverse_kl" if loss_type == "jsd" else loss_type  # JSD at β = 1 is reverse KL exactly
    ref, ref_grad = _value_and_grad(lambda x: ref_topk(x, vals, ids, "exact_tail", ref_type, teacher_lse=lse),
                                    s.double(), g_out)
    assert ((out - ref).abs() / ref).max() < 3e-5
    assert ((grad - ref_grad).norm(dim=-1) / ref_grad.norm(dim=-1)).max() < 2e-4


# ----------------------------------------------------------------------------- 3. |logits| ~ 1e4

SHIFT = 1e4


def _grid(x):
    """Round to multiples of 2^-10 = ulp(1e4) in fp32, so x + 1e4 is exact and both cases see the same logits."""
    return torch.round(x * 1024) / 1024


def _big_case(n=8, v=100, seed=0):
    """Teacher logits and students: rows 0–3 nearly converged (a few logits off by 2^-6 … 5·2^-6), 4–7 not."""
    g = torch.Generator().manual_seed(seed)
    t = _grid(torch.randn(n, v, generator=g) * 3)
    s = t.clone()
    s[:4, :5] += 2.0**-6 * torch.arange(1, 6)
    s[4:] = _grid(t[4:] + torch.randn(n - 4, v, generator=g) * 0.5)
    return s, t


def _assert_shift_invariant(fn, s, shifted_s, g_out, ref=None, value_atol=2e-7):
    a, b = _value_and_grad(fn[0], s, g_out), _value_and_grad(fn[1], shifted_s, g_out)
    torch.testing.assert_close(b[0], a[0], atol=value_atol, rtol=1e-6)  # the fp32 rounding of the unshifted case
    torch.testing.assert_close(b[1], a[1], atol=1e-8, rtol=1e-6)
    if ref is not None:
        torch.testing.assert_close(b[0], ref[0], atol=5e-7, rtol=1e-4)
        torch.testing.assert_close(b[1], ref[1], atol=5e-7, rtol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_vocab_divergences_ignore_a_1e4_offset(small_blocks, impl, loss_type):
    s, t = _big_case()
    g_out = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)
    log_p = torch.log_softmax(t.double(), -1)
    ref = _value_and_grad(lambda x: ref_divergence(loss_type, log_p, torch.log_softmax(x, -1), **REF_PARAMS),
                          s.double(), g_out)
    assert (ref[0][:4] > 1e-8).all()  # nearly converged, but not zero: fp32 must not read it as 0
    settings = KDSettings(loss_type=loss_type, **PARAMS)
    _assert_shift_invariant((lambda x: full_kd_loss(x, t, settings, impl=impl),
                             lambda x: full_kd_loss(x, t + SHIFT, settings, impl=impl)),
                            s, s + SHIFT, g_out, ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprobs_at_ignore_a_1e4_offset(small_blocks, impl):
    s, _ = _big_case()
    ids = torch.randint(0, s.shape[1], (s.shape[0], 6), generator=torch.Generator().manual_seed(4))
    w = torch.linspace(0.5, 1.5, 6, dtype=torch.float64)  # Σ w ≠ 0: an error shared by a row's log-probs shows
    g_out = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)

    def lp(x):
        return vocab_parallel_logprobs_at(x, ids, impl=impl)[0] @ w.to(torch.float32)

    ref = _value_and_grad(lambda x: torch.log_softmax(x, -1).gather(-1, ids) @ w, s.double(), g_out)
    _assert_shift_invariant((lp, lp), s, s + SHIFT, g_out, ref, value_atol=1e-6)


@pytest.mark.parametrize("convention", ["renormalized", "exact_tail"])
@pytest.mark.parametrize("loss_type", ["forward_kl", "reverse_kl", "akl"])
def test_topk_losses_ignore_a_1e4_offset(convention, loss_type):
    s, t = _big_case()
    vals, ids = t.topk(20, dim=-1)
    lse = torch.logsumexp(t.double(), -1)
    g_out = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)
    # The teacher's top-k are shifted too where the convention allows it (a stored LSE has its own ulp).
    t_shift = SHIFT if convention == "renormalized" else 0.0
    settings = KDSettings(loss_type=loss_type, topk_convention=convention, akl_mu=0.5)
    ref = _value_and_grad(lambda x: ref_topk(x, vals, ids, convention, loss_type, teacher_lse=lse), s.double(), g_out)
    _assert_shift_invariant((lambda x: topk_kd_loss(x, vals, ids, settings, teacher_lse=lse.float()),
                             lambda x: topk_kd_loss(x, vals + t_shift, ids, settings, teacher_lse=lse.float())),
                            s, s + SHIFT, g_out, ref)


# ----------------------------------------------------------------------------- TP=2 (gloo): AKL ties and 1e4

def _tp2_body(rank, world, cases, big):
    group = dist.group.WORLD
    out = {}
    for name, (student, teacher, mu, g_out) in cases.items():
        # numpy pickles by value (tensors would cross as file descriptors that vanish with the worker)
        paths = _akl_paths(student, teacher, mu, g_out, group=group, shard=rank)
        out[name] = {path: (value.numpy(), grad.numpy()) for path, (value, grad) in paths.items()}
    s, t, g_out = big
    v_local = s.shape[1] // 2
    cols = slice(rank * v_local, (rank + 1) * v_local)
    for impl in IMPLS:
        for loss_type in ("forward_kl", "reverse_kl", "akl"):
            value, grad = _value_and_grad(lambda x: full_kd_loss(x, t[:, cols] + SHIFT,
                                                                 KDSettings(loss_type=loss_type, **PARAMS), impl=impl,
                                                                 group=group), s[:, cols] + SHIFT, g_out)
            out[f"1e4/{impl}/{loss_type}"] = (value.numpy(), grad.numpy())
    return out


@pytest.mark.distributed
def test_tp2_akl_ties_and_1e4_offsets_match_tp1_references():
    """Sharded vocabulary: the head threshold by bisection over TP, the fused top-k / bisection over TP,
    and the global row max by all-reduce MAX give the TP=1 float64 references."""
    cases = {}
    for name, (student, teacher), mu in (("constructed", _tie_case(), MU_TIE), ("bf16", _bf16_tie_case(n=16), 0.55)):
        cases[name] = (student, teacher, mu, torch.linspace(0.5, 1.5, student.shape[0], dtype=torch.float64))
    s, t = _big_case()
    g_out = torch.linspace(0.5, 1.5, s.shape[0], dtype=torch.float64)
    ranks = run_distributed(_tp2_body, 2, cases, (s, t, g_out))
    for name, (student, teacher, mu, g) in cases.items():
        ref = _akl_reference(student, teacher, mu, g)
        for path in ranks[0][name]:
            value = torch.from_numpy(ranks[0][name][path][0])
            grad = torch.cat([torch.from_numpy(r[name][path][1]) for r in ranks], dim=1)
            torch.testing.assert_close(torch.from_numpy(ranks[1][name][path][0]), value)  # replicated
            _check_paths({f"tp2/{name}/{path}": (value, grad)}, ref)
    log_p = torch.log_softmax(t.double(), -1)
    for impl in IMPLS:
        for loss_type in ("forward_kl", "reverse_kl", "akl"):
            ref = _value_and_grad(lambda x: ref_divergence(loss_type, log_p, torch.log_softmax(x, -1), **REF_PARAMS),
                                  s.double(), g_out)
            key = f"1e4/{impl}/{loss_type}"
            value = torch.from_numpy(ranks[0][key][0])
            grad = torch.cat([torch.from_numpy(r[key][1]) for r in ranks], dim=1)
            torch.testing.assert_close(value, ref[0], atol=1e-6, rtol=1e-4, msg=lambda m: f"{key}: {m}")
            torch.testing.assert_close(grad, ref[1], atol=2e-7, rtol=1e-4, msg=lambda m: f"{key} grad: {m}")


# ----------------------------------------------------------------------------- 4. preference defaults

B, T, V = 4, 7, 19


def _pref_data(seed=0):
    """Two pairs (rows 0/1 and 2/3, positive first in one, negative first in the other), float64 logits."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for row, length in enumerate((7, 3, 5, 2)):  # unequal lengths: length normalisation shows
        mask[row, T - length:] = 1
    roles = torch.tensor([ROLE_POSITIVE, ROLE_NEGATIVE, ROLE_NEGATIVE, ROLE_POSITIVE])
    pairs = torch.tensor([0, 0, 1, 1])
    t_seq = torch.randn(B, generator=g, dtype=torch.float64) * 3 - 10
    return logits, labels, mask, roles, pairs, t_seq


def _paper_loss(form, logits, labels, mask, t_seq):
    """Mean over the pairs of each paper's equation at its default settings, in float64."""
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    seq, length = (lp * mask).sum(-1), mask.sum(-1).double()
    w, l_ = torch.tensor([0, 3]), torch.tensor([1, 2])  # (positive, negative) rows per pair
    h = (seq[w] - t_seq[w]) - (seq[l_] - t_seq[l_])
    if form == "dpo":  # Rafailov et al. Eq. 7, β = 0.1, sequence sums
        losses = -F.logsigmoid(0.1 * h)
    elif form == "ipo":  # Azar et al. Eq. 17, τ = 0.1, sequence sums
        losses = (h - 1 / (2 * 0.1)) ** 2
    elif form == "dpkd":  # Li et al. Eq. 9, β = 0.1, length-normalised
        losses = -F.logsigmoid(0.1 * (seq[w] - t_seq[w]) / length[w] - 0.1 * (seq[l_] - t_seq[l_]) / length[l_])
    elif form == "cpo":  # Xu et al. Eq. 6, β = 0.1, NLL weight 1 as a per-token mean (released code, TRL)
        losses = -F.logsigmoid(0.1 * seq[w] - 0.1 * seq[l_]) - seq[w] / length[w]
    elif form == "simpo":  # Meng et al. Eq. 6, β = 2, γ = β/2
        losses = -F.logsigmoid(2.0 * seq[w] / length[w] - 2.0 * seq[l_] / length[l_] - 1.0)
    else:
        raise ValueError(form)
    return losses.mean()


def _objective_pref(cfg, logits, labels, mask, roles, pairs, t_seq):
    batch = ObjectiveBatch(labels, mask, None, roles, pairs, t_seq)
    x = logits.clone().requires_grad_(True)
    out = DistillationObjective(cfg)(x, batch, objective_normalisers(cfg, [batch]))
    out.loss.backward()
    return out.metrics["preference_loss"], x.grad


@pytest.mark.parametrize("form", PREFERENCE_TYPES)
def test_each_preference_form_runs_at_its_papers_defaults(form):
    data = _pref_data()
    cfg = DistillationLossConfig(kd_loss_weight=0.0, dpo_loss_weight=1.0, preference_loss_type=form)
    value, grad = _objective_pref(cfg, *data)
    logits = data[0].clone().requires_grad_(True)
    ref = _paper_loss(form, logits, data[1], data[2], data[5])
    ref.backward()
    torch.testing.assert_close(value, ref.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, logits.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("form,settings,equation", [
    ("dpo", dict(preference_beta=0.3, length_normalize=True),
     lambda sw, sl, tw, tl, nw, nl: -F.logsigmoid(0.3 * ((sw - tw) / nw - (sl - tl) / nl))),
    ("ipo", dict(ipo_tau=0.5, length_normalize=True),
     lambda sw, sl, tw, tl, nw, nl: ((sw - tw) / nw - (sl - tl) / nl - 1.0) ** 2),
    ("dpkd", dict(preference_beta=0.5, length_normalize=False),
     lambda sw, sl, tw, tl, nw, nl: -F.logsigmoid(0.5 * ((sw - tw) - (sl - tl)))),
    ("cpo", dict(preference_beta=0.2, cpo_nll_weight=0.5, cpo_nll_length_normalize=False),
     lambda sw, sl, tw, tl, nw, nl: -F.logsigmoid(0.2 * (sw - sl)) - 0.5 * sw),
    ("simpo", dict(preference_beta=2.5),  # γ follows β: 1.25
     lambda sw, sl, tw, tl, nw, nl: -F.logsigmoid(2.5 * (sw / nw - sl / nl) - 1.25)),
    ("simpo", dict(preference_beta=2.5, simpo_gamma=0.3),
     lambda sw, sl, tw, tl, nw, nl: -F.logsigmoid(2.5 * (sw / nw - sl / nl) - 0.3)),
])
def test_explicit_preference_settings_are_used_as_set(form, settings, equation):
    logits, labels, mask, roles, pairs, t_seq = _pref_data(1)
    cfg = DistillationLossConfig(kd_loss_weight=0.0, dpo_loss_weight=1.0, preference_loss_type=form, **settings)
    value, _ = _objective_pref(cfg, logits, labels, mask, roles, pairs, t_seq)
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    seq, length = (lp * mask).sum(-1), mask.sum(-1).double()
    w, l_ = torch.tensor([0, 3]), torch.tensor([1, 2])
    ref = equation(seq[w], seq[l_], t_seq[w], t_seq[l_], length[w], length[l_]).mean()
    torch.testing.assert_close(value, ref, atol=1e-12, rtol=1e-10)


def test_preference_config_leaves_the_per_form_defaults_to_the_forms():
    conf = os.path.join(os.path.dirname(__file__), "..", "conf", "gpt_kd_preference.yaml")
    with open(conf) as f:
        kd_cfg = yaml.safe_load(f)["model"]["kd"]
    cfg = DistillationLossConfig.from_dict(kd_cfg)
    assert cfg.preference_beta is None and cfg.length_normalize is None and cfg.simpo_gamma is None
    assert cfg.cpo_nll_length_normalize is None
    with pytest.raises(ValueError, match="preference_beta must be > 0"):
        DistillationLossConfig(preference_beta=0.0).validate()
