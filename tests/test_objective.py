"""The joint objective (KD + SFT + preference, L_dpo + L_pos + L_neg) against a float64 hand reference."""

import pytest
import torch
import torch.nn.functional as F

from nemo_kd.losses.objective import (
    ROLE_NEGATIVE,
    ROLE_POSITIVE,
    ROLE_SINGLE,
    DistillationLossConfig,
    DistillationObjective,
    ObjectiveBatch,
    TopKTeacher,
    objective_normalisers,
)

B, T, V, K = 6, 5, 23, 4


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.3).long()
    mask[:, 0] = 1  # every row has at least one completion token
    t_logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    vals, ids = t_logits.topk(K, dim=-1)
    lse = torch.logsumexp(t_logits, -1)
    # rows: 0 single, (1,2) pair 0, 3 single, (4,5) pair 1 — positive first in pair 0, negative first in pair 1
    roles = torch.tensor([ROLE_SINGLE, ROLE_POSITIVE, ROLE_NEGATIVE, ROLE_SINGLE, ROLE_NEGATIVE, ROLE_POSITIVE])
    pairs = torch.tensor([-1, 0, 0, -1, 1, 1])
    t_seq = torch.randn(B, generator=g, dtype=torch.float64) * 3 - 10
    return logits, labels, mask, vals, ids, lse, roles, pairs, t_seq


def _reference(logits, labels, mask, vals, ids, roles, t_seq, cfg):
    """Independent float64 formula of the whole global-batch objective."""
    logq = torch.log_softmax(logits * cfg.logits_scale, -1)
    # KD: forward KL over the renormalised top-k.
    logq_k = logq.gather(-1, ids)
    logq_k = logq_k - torch.logsumexp(logq_k, -1, keepdim=True)
    logp_k = torch.log_softmax(vals * cfg.target_logits_scale, -1)
    kd = (logp_k.exp() * (logp_k - logq_k)).sum(-1)
    w = torch.tensor([1.0 if r == ROLE_SINGLE else cfg.positive_kd_weight if r == ROLE_POSITIVE else cfg.negative_kd_weight
                      for r in roles.tolist()], dtype=torch.float64)
    m = mask.double()
    kd_mask = m * (w > 0).double()[:, None]
    l_kd = (kd * w[:, None] * kd_mask).sum() / kd_mask.sum()
    # SFT on non-negative rows at temperature 1.
    lp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    sft_mask = m * (roles != ROLE_NEGATIVE).double()[:, None]
    l_sft = (-lp * sft_mask).sum() / sft_mask.sum()
    # DPKD per pair, length-normalised, teacher as the reference.
    seq = (lp * m).sum(-1)
    length = m.sum(-1)
    losses = []
    for pid in (0, 1):
        pos = [i for i in range(B) if roles[i] == ROLE_POSITIVE and [-1, 0, 0, -1, 1, 1][i] == pid][0]
        neg = [i for i in range(B) if roles[i] == ROLE_NEGATIVE and [-1, 0, 0, -1, 1, 1][i] == pid][0]
        beta = 0.1 if cfg.preference_beta is None else cfg.preference_beta  # DPKD's default
        h = beta * ((seq[pos] - t_seq[pos]) / length[pos] - (seq[neg] - t_seq[neg]) / length[neg])
        losses.append(-F.logsigmoid(h))
    l_pref = torch.stack(losses).mean()
    return cfg.kd_loss_weight * l_kd + cfg.sft_loss_weight * l_sft + cfg.dpo_loss_weight * l_pref


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)])
def test_joint_objective_over_microbatches_equals_reference(scales):
    logits, labels, mask, vals, ids, lse, roles, pairs, t_seq = _data()
    cfg = DistillationLossConfig(kd_loss_weight=0.7, sft_loss_weight=0.4, dpo_loss_weight=0.9, preference_loss_type="dpkd",
                                 positive_kd_weight=1.5, negative_kd_weight=0.25, logits_scale=scales[0],
                                 target_logits_scale=scales[1])
    z = logits.clone().requires_grad_(True)
    ref = _reference(z, labels, mask, vals, ids, roles, t_seq, cfg)
    ref.backward()

    # Same data as 2 microbatches of 3 rows (pairs stay within a microbatch).
    x = logits.clone().requires_grad_(True)
    split = [slice(0, 3), slice(3, 6)]
    mbs = [ObjectiveBatch(labels[s], mask[s], TopKTeacher(vals[s], ids[s], lse[s]), roles[s], pairs[s], t_seq[s]) for s in split]
    norms = objective_normalisers(cfg, mbs)
    assert norms.kd.item() == mask.sum().item() and norms.pairs.item() == 2
    assert norms.sft.item() == mask[roles != ROLE_NEGATIVE].sum().item()
    objective = DistillationObjective(cfg)
    total = sum(objective(x[s], mb, norms).loss for s, mb in zip(split, mbs))
    total.backward()
    torch.testing.assert_close(total.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, z.grad, rtol=1e-9, atol=1e-10)


def test_negative_rows_never_get_sft_and_zero_weight_drops_their_kd():
    logits, labels, mask, vals, ids, lse, roles, pairs, t_seq = _data(1)
    cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=1.0, negative_kd_weight=0.0)
    x = logits.clone().requires_grad_(True)
    mb = ObjectiveBatch(labels, mask, TopKTeacher(vals, ids, lse), roles, pairs, t_seq)
    out = DistillationObjective(cfg)(x, mb, objective_normalisers(cfg, [mb]))
    out.loss.backward()
    neg_rows = (roles == ROLE_NEGATIVE).nonzero().flatten()
    assert torch.count_nonzero(x.grad[neg_rows]) == 0
    assert torch.count_nonzero(x.grad[roles != ROLE_NEGATIVE]) > 0


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="kd_loss_type='kl_fancy'"):
        DistillationLossConfig(kd_loss_type="kl_fancy").validate()
    with pytest.raises(ValueError, match="unknown loss config keys \\['kd_weight'\\]"):
        DistillationLossConfig.from_dict({"kd_weight": 1.0})
    with pytest.raises(ValueError, match="nothing to train"):
        DistillationLossConfig(kd_loss_weight=0.0).validate()
    with pytest.raises(ValueError, match="logits_scale must be > 0"):
        DistillationLossConfig(logits_scale=0.0).validate()


def test_unpaired_rows_are_an_error():
    logits, labels, mask, vals, ids, lse, roles, pairs, t_seq = _data(2)
    cfg = DistillationLossConfig(dpo_loss_weight=1.0)
    mb = ObjectiveBatch(labels[:2], mask[:2], TopKTeacher(vals[:2], ids[:2], lse[:2]), roles[:2], pairs[:2], t_seq[:2])
    with pytest.raises(ValueError, match="exactly one positive and one negative"):
        objective_normalisers(cfg, [mb])


def test_exact_tail_with_a_teacher_temperature_is_refused_for_stored_teachers():
    """Stored top-k keeps the teacher's LSE at temperature 1: exact_tail at another teacher temperature
    would divide by the wrong normaliser, so it fails with a message instead of a wrong loss."""
    logits, labels, mask, vals, ids, lse, roles, pairs, t_seq = _data()
    batch = ObjectiveBatch(labels, mask, TopKTeacher(vals, ids, lse))
    for scale, ok in ((2.0, False), (1.0, True)):
        cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.0, topk_convention="exact_tail",
                                     target_logits_scale=scale)
        objective = DistillationObjective(cfg)
        norms = objective_normalisers(cfg, [batch])
        if ok:
            assert torch.isfinite(objective(logits, batch, norms).loss)
        else:
            with pytest.raises(ValueError, match="renormalized"):
                objective(logits, batch, norms)


def test_online_teacher_is_the_dpkd_reference():
    """With an online (full-logits) teacher the DPKD reference log p(y|x) comes from its logits:
    the objective equals the reference formula fed the float64 teacher sequence log-probs."""
    from nemo_kd.losses.objective import FullTeacher

    logits, labels, mask, _, _, _, roles, pairs, _ = _data(2)
    t_logits = torch.randn(B, T, V, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2
    t_seq = (torch.log_softmax(t_logits, -1).gather(-1, labels[..., None])[..., 0] * mask).sum(-1)
    cfg = DistillationLossConfig(kd_loss_weight=0.0, sft_loss_weight=0.3, dpo_loss_weight=1.0,
                                 preference_loss_type="dpkd", preference_beta=0.5)
    z = logits.clone().requires_grad_(True)
    ref = _reference(z, labels, mask, t_logits.topk(K, -1).values, t_logits.topk(K, -1).indices, roles, t_seq, cfg)
    ref.backward()
    x = logits.clone().requires_grad_(True)
    mb = ObjectiveBatch(labels, mask, FullTeacher(t_logits), roles, pairs)  # no stored sequence log-probs
    out = DistillationObjective(cfg)(x, mb, objective_normalisers(cfg, [mb]))
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, z.grad, rtol=1e-9, atol=1e-10)
    with pytest.raises(ValueError, match="needs teacher_seq_logprobs"):
        DistillationObjective(cfg)(x.detach(), ObjectiveBatch(labels, mask, None, roles, pairs), objective_normalisers(cfg, [mb]))
