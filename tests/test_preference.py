"""Preference losses against float64 hand formulas written from the papers."""

import math

import pytest
import torch
import torch.nn.functional as F

from nemo_kd.losses.preference import (
    PreferenceOutput,
    cpo_loss,
    dpkd_loss,
    dpo_loss,
    ipo_loss,
    sigmoid_preference_loss,
    simpo_loss,
)
from nemo_kd.losses.sequence import sequence_logprobs


def _batch(seed, b=16):
    g = torch.Generator().manual_seed(seed)
    logps = [-(torch.rand(b, generator=g) * 60 + 1) for _ in range(4)]  # pc, pr, rc, rr: log-prob sums
    lengths = [torch.randint(1, 40, (b,), generator=g) for _ in range(2)]
    return logps, lengths


def _check(ours_fn, ref_fn, logps, n_grad, rewards_ref=None):
    """Compare values and gradients (w.r.t. the first n_grad inputs) of ours (fp32) vs ref (fp64)."""
    ours_in = [x.clone().float().requires_grad_(i < n_grad) for i, x in enumerate(logps)]
    ref_in = [x.clone().double().requires_grad_(i < n_grad) for i, x in enumerate(logps)]
    out = ours_fn(*ours_in)
    assert isinstance(out, PreferenceOutput)
    ref = ref_fn(*ref_in)
    w = torch.linspace(0.5, 1.5, ref.shape[0], dtype=torch.float64)
    (out.losses.double() * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(out.losses.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for a, r in zip(ours_in[:n_grad], ref_in[:n_grad]):
        torch.testing.assert_close(a.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
    assert not out.margins.requires_grad and not out.chosen_rewards.requires_grad
    torch.testing.assert_close(out.margins, out.chosen_rewards - out.rejected_rewards)
    if rewards_ref is not None:
        rw, rl = rewards_ref(*[x.double() for x in logps])
        torch.testing.assert_close(out.chosen_rewards.double(), rw, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.rejected_rewards.double(), rl, atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("length_normalize", [False, True])
def test_dpo(eps, length_normalize):
    (pc, pr, rc, rr), (lc, lr) = _batch(0)
    beta = 0.3
    nc, nr = (lc.double(), lr.double()) if length_normalize else (1.0, 1.0)

    def ref(pc, pr, rc, rr):
        u = beta * ((pc - rc) / nc - (pr - rr) / nr)
        return -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)

    _check(
        lambda *x: dpo_loss(*x, beta=beta, label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr,
                            length_normalize=length_normalize),
        ref, [pc, pr, rc, rr], n_grad=2,
        rewards_ref=lambda pc, pr, rc, rr: (beta * (pc - rc) / nc, beta * (pr - rr) / nr),
    )


def test_dpo_known_values():
    z = torch.zeros(3)
    torch.testing.assert_close(dpo_loss(z, z, z, z).losses, torch.full((3,), math.log(2.0)))
    one = torch.ones(1)
    # β·h = 0.5·(1 − 0) → −log σ(0.5)
    torch.testing.assert_close(dpo_loss(one, 0 * one, 0 * one, 0 * one, beta=0.5).losses,
                               torch.tensor([math.log1p(math.exp(-0.5))]))


@pytest.mark.parametrize("length_normalize", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpkd_paper_eq9(length_normalize, eps):
    (q_t, q_s, p_t, p_s), (len_t, len_s) = _batch(1)
    beta = 0.1

    def ref(q_t, q_s, p_t, p_s):  # arXiv 2406.19774 Eq. 9 (+ the released code's ε smoothing)
        nt, ns = (len_t.double(), len_s.double()) if length_normalize else (1.0, 1.0)
        u = (beta / nt) * (q_t - p_t) - (beta / ns) * (q_s - p_s)
        return -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)

    _check(
        lambda *x: dpkd_loss(*x, teacher_output_lengths=len_t, student_output_lengths=len_s, beta=beta,
                             length_normalize=length_normalize, label_smoothing=eps),
        ref, [q_t, q_s, p_t, p_s], n_grad=2,
    )


def test_dpkd_end_to_end_from_logits():
    """Student log-probs from logits → sequence sums → DPKD; gradient vs float64 autograd."""
    g = torch.Generator().manual_seed(7)
    b, t, v = 4, 9, 23
    s_logits_t, s_logits_s = (torch.randn(b, t, v, generator=g) for _ in range(2))
    y_t, y_s = (torch.randint(0, v, (b, t), generator=g) for _ in range(2))
    m_t, m_s = (torch.rand(b, t, generator=g) > 0.3 for _ in range(2))
    p_t, p_s = (-(torch.rand(b, generator=g) * 20) for _ in range(2))

    def run(logits_t, logits_s, ours):
        def seq(logits, y, m):
            lp = torch.log_softmax(logits.double(), -1).gather(-1, y[..., None])[..., 0]
            return sequence_logprobs(lp, m) if ours else (torch.where(m, lp, 0 * lp).sum(-1), m.sum(-1))
        a, b_ = seq(logits_t, y_t, m_t), seq(logits_s, y_s, m_s)
        if ours:
            return dpkd_loss(a.sum, b_.sum, p_t, p_s, a.length, b_.length, beta=0.5).losses
        u = 0.5 * (a[0] - p_t.double()) / a[1] - 0.5 * (b_[0] - p_s.double()) / b_[1]
        return -F.logsigmoid(u)

    grads = []
    for ours in (True, False):
        x_t, x_s = s_logits_t.clone().requires_grad_(True), s_logits_s.clone().requires_grad_(True)
        loss = run(x_t, x_s, ours)
        loss.sum().backward()
        grads.append((loss.detach().double(), x_t.grad, x_s.grad))
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_ipo(length_normalize):
    (pc, pr, rc, rr), (lc, lr) = _batch(2)
    tau = 0.25
    nc, nr = (lc.double(), lr.double()) if length_normalize else (1.0, 1.0)

    def ref(pc, pr, rc, rr):
        h = (pc - rc) / nc - (pr - rr) / nr
        return (h - 1 / (2 * tau)) ** 2

    out = _check(
        lambda *x: ipo_loss(*x, tau=tau, chosen_lengths=lc, rejected_lengths=lr, length_normalize=length_normalize),
        ref, [pc, pr, rc, rr], n_grad=2,
    )
    h = ((pc - rc) / (lc if length_normalize else 1) - (pr - rr) / (lr if length_normalize else 1)).double()
    torch.testing.assert_close(out.margins.double(), h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nll_weight,normalize_nll", [(1.0, False), (0.5, True), (0.0, False)])
def test_cpo(nll_weight, normalize_nll):
    (pc, pr, _, _), (lc, _) = _batch(3)
    beta = 0.1

    def ref(pc, pr):
        nll = -pc / lc.double() if normalize_nll else -pc
        return -F.logsigmoid(beta * pc - beta * pr) + nll_weight * nll

    _check(
        lambda pc, pr: cpo_loss(pc, pr, beta=beta, nll_weight=nll_weight, chosen_lengths=lc,
                                length_normalize_nll=normalize_nll),
        ref, [pc, pr], n_grad=2, rewards_ref=lambda pc, pr: (beta * pc, beta * pr),
    )


@pytest.mark.parametrize("beta,gamma", [(2.0, 1.0), (2.5, 0.0)])
def test_simpo(beta, gamma):
    (pc, pr, _, _), (lc, lr) = _batch(4)

    def ref(pc, pr):
        return -F.logsigmoid(beta / lc.double() * pc - beta / lr.double() * pr - gamma)

    _check(
        lambda pc, pr: simpo_loss(pc, pr, lc, lr, beta=beta, gamma=gamma),
        ref, [pc, pr], n_grad=2, rewards_ref=lambda pc, pr: (beta * pc / lc, beta * pr / lr),
    )


def test_zero_length_and_extreme_margins_are_finite():
    z = torch.zeros(2)
    zero_len = torch.zeros(2, dtype=torch.long)
    out = dpkd_loss(z, z, z, z, zero_len, zero_len)  # empty outputs: 0/1, no NaN
    assert torch.isfinite(out.losses).all()
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    loss = sigmoid_preference_loss(big, label_smoothing=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(big.grad).all()
    with pytest.raises(ValueError):
        sigmoid_preference_loss(big, label_smoothing=0.5)
    with pytest.raises(ValueError):
        dpo_loss(z, z, z, z, length_normalize=True)
