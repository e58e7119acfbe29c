"""Divergences against independent float64 references (probabilities, explicit sorts)."""

import pytest
import torch

from nemo_kd.losses.divergences import (
    LOSS_TYPES,
    BucketSpace,
    adaptive_kl,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
)

SPACES = {"replicated": BucketSpace.replicated(), "sharded": BucketSpace.sharded(None)}


# ----------------------------------------------------------------------------- references (float64)


def ref_kl(log_a, log_b):
    """KL(a‖b) per row from log-probs (float64): Σ a·(log a − log b), with 0·log(0/·) = 0.

    Inputs are replaced where a = 0 so neither the value nor the gradient sees −inf − (−inf).
    """
    pos = log_a > float("-inf")
    la = torch.where(pos, log_a, torch.zeros_like(log_a))
    lb = torch.where(pos, log_b, torch.zeros_like(log_b))
    return torch.where(pos, la.exp() * (la - lb), torch.zeros_like(la)).sum(-1)


def ref_log_mixture(log_a, log_b, w):
    """log(w·a + (1−w)·b), TRL-style logsumexp over a stacked pair."""
    w = torch.tensor(w, dtype=torch.float64)
    empty = (log_a == float("-inf")) & (log_b == float("-inf"))  # keep −inf − (−inf) out of the backward
    log_a, log_b = log_a.masked_fill(empty, 0.0), log_b.masked_fill(empty, 0.0)
    mixed = torch.logsumexp(torch.stack([log_a + torch.log(w), log_b + torch.log(1 - w)]), dim=0)
    return mixed.masked_fill(empty, float("-inf"))


def ref_akl_head(p, mu):
    """AKL's head by its definition, in float64: bucket v is in it iff the teacher mass strictly
    above it is below μ (the paper's top M with cumsum reaching μ, ties kept together), or it is the max."""
    p = p.double()
    above = torch.where(p[:, None, :] > p[:, :, None], p[:, None, :], torch.zeros((), dtype=torch.float64)).sum(-1)
    return (above < mu) | (p == p.max(dim=-1, keepdim=True).values)


def ref_akl_weights(p, q, mu):
    """AKL's head/tail weights from :func:`ref_akl_head` (AKL's `get_ratio` with the paper's head)."""
    gap = (p.double() - q.double()).abs()
    head = ref_akl_head(p, mu)
    g_head, g_total = torch.where(head, gap, 0 * gap).sum(-1), gap.sum(-1)
    return torch.where(g_total > 0, g_head / torch.where(g_total > 0, g_total, 1 + 0 * g_total), 0.5 + 0 * g_total)


def ref_divergence(loss_type, log_p, log_q, beta=0.5, alpha=0.1, mu=0.5):
    """Per-row divergence of teacher p and student q, given as float64 log-probs."""
    if loss_type == "forward_kl":
        return ref_kl(log_p, log_q)
    if loss_type == "reverse_kl":
        return ref_kl(log_q, log_p)
    if loss_type == "jsd":
        if beta == 0:
            return ref_kl(log_p, log_q)
        if beta == 1:
            return ref_kl(log_q, log_p)
        log_m = ref_log_mixture(log_p, log_q, beta)
        return beta * ref_kl(log_p, log_m) + (1 - beta) * ref_kl(log_q, log_m)
    if loss_type == "skew_fkl":
        return ref_kl(log_p, ref_log_mixture(log_p, log_q, alpha))
    if loss_type == "skew_rkl":
        return ref_kl(log_q, ref_log_mixture(log_p, log_q, 1 - alpha))
    if loss_type == "akl":
        w = ref_akl_weights(log_p.detach().exp(), log_q.detach().exp(), mu)
        return w * ref_kl(log_p, log_q) + (1 - w) * ref_kl(log_q, log_p)
    raise ValueError(loss_type)


def _logits(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64) * scale


PARAMS = dict(jsd_beta=0.3, skew_alpha=0.2, akl_mu=0.5)
REF_PARAMS = dict(beta=0.3, alpha=0.2, mu=0.5)


# ----------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("shape", [(7, 13), (3, 64)])
def test_matches_reference_values_and_grads(loss_type, space, shape):
    t, s = _logits(*shape, seed=1), _logits(*shape, seed=2)
    x = s.clone().requires_grad_(True)
    out = divergence(loss_type, torch.log_softmax(t, -1), torch.log_softmax(x, -1), SPACES[space], **PARAMS)
    g_out = torch.randn(shape[0], dtype=torch.float64)
    (out * g_out).sum().backward()

    xr = s.clone().requires_grad_(True)
    ref = ref_divergence(loss_type, torch.log_softmax(t, -1), torch.log_softmax(xr, -1), **REF_PARAMS)
    (ref * g_out).sum().backward()
    torch.testing.assert_close(out, ref.detach(), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("loss_type", [t for t in LOSS_TYPES if t != "akl"])  # AKL: detached weights, no gradcheck
def test_gradcheck(loss_type):
    t = _logits(3, 6, seed=3)
    t[0, 2] = float("-inf")
    t[1, :2] = float("-inf")
    log_p = torch.log_softmax(t, -1)
    x = _logits(3, 6, seed=4).requires_grad_(True)
    fn = lambda z: divergence(loss_type, log_p, torch.log_softmax(z, -1), **PARAMS)  # noqa: E731
    if loss_type == "reverse_kl":  # RKL against a zero-probability teacher bucket is +inf: mask the student too
        fn = lambda z: reverse_kl(log_p, torch.log_softmax(z.masked_fill(t.isinf(), float("-inf")), -1))  # noqa: E731
    torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_zero_probability_buckets_exact_zero_and_finite_grads(loss_type, space):
    t, s = _logits(5, 11, seed=5), _logits(5, 11, seed=6)
    t[:, 8:] = float("-inf")  # padded vocabulary
    t[0, :3] = float("-inf")
    if loss_type in ("reverse_kl", "akl"):  # finite only where the student also gives them zero mass
        s = s.masked_fill(t.isinf(), float("-inf"))
    x = s.clone().requires_grad_(True)
    out = divergence(loss_type, torch.log_softmax(t, -1), torch.log_softmax(x, -1), SPACES[space], **PARAMS)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    ref = ref_divergence(loss_type, torch.log_softmax(t, -1), torch.log_softmax(s, -1), **REF_PARAMS)
    torch.testing.assert_close(out.detach(), ref, atol=1e-12, rtol=1e-10)
    # With the student masked the same way, the padded columns are exact zeros: removing them changes nothing.
    s_masked = s.masked_fill(t[0:1, :].isinf().expand_as(s) & (torch.arange(11) >= 8), float("-inf"))
    masked = divergence(loss_type, torch.log_softmax(t, -1), torch.log_softmax(s_masked, -1), SPACES[space], **PARAMS)
    trimmed = divergence(loss_type, torch.log_softmax(t[:, :8], -1), torch.log_softmax(s[:, :8], -1),
                         SPACES[space], **PARAMS)
    torch.testing.assert_close(masked, trimmed, atol=1e-12, rtol=1e-10)
    if loss_type not in ("reverse_kl", "akl"):
        assert (x.grad[:, 8:].abs() > 0).any()  # the student is pushed off the teacher's empty columns


def test_reverse_kl_against_empty_teacher_bucket_is_inf_not_nan():
    t = torch.tensor([[0.0, float("-inf")]], dtype=torch.float64)
    s = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    out = reverse_kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
    assert out.item() == float("inf")
    assert torch.isfinite(skew_reverse_kl(torch.log_softmax(t, -1), torch.log_softmax(s, -1), 0.1)).all()


def test_limits_are_exact():
    log_p, log_q = torch.log_softmax(_logits(6, 17, 7), -1), torch.log_softmax(_logits(6, 17, 8), -1)
    assert torch.equal(generalized_jsd(log_p, log_q, 0.0), forward_kl(log_p, log_q))
    assert torch.equal(generalized_jsd(log_p, log_q, 1.0), reverse_kl(log_p, log_q))
    assert torch.equal(skew_forward_kl(log_p, log_q, 0.0), forward_kl(log_p, log_q))
    assert torch.equal(skew_reverse_kl(log_p, log_q, 0.0), reverse_kl(log_p, log_q))
    # Near the end points JSD_β tends to 0, not to the KLs (why TRL special-cases them).
    assert (generalized_jsd(log_p, log_q, 1e-6) < 1e-4).all()
    # Sanity: symmetric JSD is bounded by log 2; identical distributions give 0.
    assert (generalized_jsd(log_p, log_q, 0.5) <= torch.log(torch.tensor(2.0, dtype=torch.float64))).all()
    for fn in (forward_kl, reverse_kl, adaptive_kl):
        torch.testing.assert_close(fn(log_p, log_p), torch.zeros(6, dtype=torch.float64))


def test_bad_parameters_raise():
    lp = torch.log_softmax(_logits(2, 3, 0), -1)
    with pytest.raises(ValueError):
        generalized_jsd(lp, lp, 1.5)
    with pytest.raises(ValueError):
        skew_forward_kl(lp, lp, -0.1)
    with pytest.raises(ValueError):
        divergence("kl", lp, lp)


# ----------------------------------------------------------------------------- AKL head


def _ref_head(p, mu):
    """The paper's head by an explicit sort: the top M, M = min{m : Σ_{j≤m} p_(j) ≥ μ} (no ties here)."""
    head = torch.zeros_like(p, dtype=torch.bool)
    for r in range(p.shape[0]):
        cum = 0.0
        for v in sorted(range(p.shape[1]), key=lambda u: -float(p[r, u])):
            head[r, v] = cum < mu or not head[r].any()
            cum += float(p[r, v])
    return head


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mu", [0.3, 0.5, 0.9])
def test_head_mask_sort_and_bisection_match_explicit_sort(mu, dtype):
    logits = _logits(24, 50, seed=9, scale=2.0)
    logits[:4] *= 6  # peaked rows: top-1 > μ, head is the top-1 alone
    logits[4, 10:] = float("-inf")
    p = torch.softmax(logits, -1)
    ref = _ref_head(p, mu)
    assert torch.equal(ref_akl_head(p, mu), ref)  # the order-free rule is the paper's top M where nothing ties
    pd = p.to(dtype)
    assert torch.equal(BucketSpace.replicated().head_mask(pd, mu), ref)
    assert torch.equal(BucketSpace.sharded(None).head_mask(pd, mu), ref)
    # Shuffling buckets permutes the mask the same way (a sorted-order mask applied to unsorted values would not).
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(BucketSpace.sharded(None).head_mask(pd[:, perm], mu), ref[:, perm])
    assert torch.equal(BucketSpace.replicated().head_mask(pd[:, perm], mu), ref[:, perm])


def test_akl_weights_follow_explicit_sort_not_positions():
    # Teacher mass at the *last* positions: a mask built in sorted order but applied unsorted would pick the
    # wrong buckets. Explicit reference: head = {bucket 3} (p=0.6 > μ alone), tail = the rest.
    p = torch.tensor([[0.05, 0.15, 0.2, 0.6]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    w_head = (0.6 - 0.25) / (0.2 + 0.1 + 0.05 + 0.35)
    expected = w_head * ref_kl(p.log(), q.log()) + (1 - w_head) * ref_kl(q.log(), p.log())
    for space in SPACES.values():
        torch.testing.assert_close(adaptive_kl(p.log(), q.log(), 0.5, space), expected, atol=1e-14, rtol=1e-12)
