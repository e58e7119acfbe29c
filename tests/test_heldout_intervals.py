"""Held-out CE / KL per sample and their token-weighted bootstrap intervals (issue 18): the weighted bootstrap
against hand computations and its coverage; per-sample terms against a float64 reference of the same student
and against the batched :func:`heldout_metrics`."""

import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_utils import WorldOfOne  # noqa: E402

SEQ, VOCAB, K, N = 12, 256, 8, 10  # vocab = 128·TP: no padding rows


def test_weighted_bootstrap_hand_values_and_equal_weights():
    from nemo_kd.evaluation.stats import bootstrap_interval

    x, w = [1.0, 2.0, 4.0], [1.0, 1.0, 2.0]
    iv = bootstrap_interval(x, weights=w, num_resamples=500)
    assert iv.mean == pytest.approx((1 + 2 + 8) / 4, abs=1e-15) and iv.n == 3
    assert 1.0 <= iv.low <= iv.mean <= iv.high <= 4.0
    rng = np.random.default_rng(3)
    v = rng.normal(size=50)
    plain, equal = bootstrap_interval(v, seed=7), bootstrap_interval(v, seed=7, weights=np.full(50, 3.0))
    assert equal.mean == pytest.approx(plain.mean, abs=1e-12)
    assert equal.low == pytest.approx(plain.low, abs=1e-12) and equal.high == pytest.approx(plain.high, abs=1e-12)
    with pytest.raises(ValueError, match="weights must be > 0"):
        bootstrap_interval([1.0, 2.0], weights=[1.0, 0.0])
    with pytest.raises(ValueError, match="2 weights for 3 values"):
        bootstrap_interval([1.0, 2.0, 3.0], weights=[1.0, 1.0])


def test_weighted_bootstrap_covers_the_per_token_mean():
    """Samples of 1..20 tokens, each token ~ N(mu, 1), sample value = its tokens' mean: the token-weighted mean
    estimates mu; its 95% interval covers mu at about the stated rate (400 draws, fixed seed, margin)."""
    from nemo_kd.evaluation.stats import bootstrap_interval

    rng, mu, hits, trials = np.random.default_rng(0), 0.7, 0, 400
    for t in range(trials):
        tokens = rng.integers(1, 21, size=60)
        values = np.array([rng.normal(mu, 1.0, size=n).mean() for n in tokens])
        iv = bootstrap_interval(values, weights=tokens, num_resamples=400, seed=t)
        hits += iv.low <= mu <= iv.high
    assert 0.90 <= hits / trials <= 0.99, hits / trials


def _samples():
    from nemo_kd.data.kd_dataset import DistillationSample
    from nemo_kd.teacher.store import TeacherTopK

    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(N):
        length = int(torch.randint(6, SEQ + 1, (1,), generator=g))
        prompt = int(torch.randint(2, 4, (1,), generator=g))
        ids = torch.randint(0, VOCAB, (length,), generator=g)
        mask = np.zeros(length, dtype=np.int8)
        mask[prompt:] = 1
        t_logits = 2.0 * torch.randn(length - prompt, VOCAB, generator=g)
        values, top = t_logits.topk(K, dim=-1)
        teacher = TeacherTopK(i, values, top, torch.logsumexp(t_logits, -1), 0.0)
        out.append(DistillationSample(i, ids.numpy().astype(np.int64), mask, teacher=teacher))
    return out


def _reference(model, smp):
    """Float64 per-token CE, forward / reverse KL over the teacher's top-k plus one tail bucket, agreement."""
    ids = torch.from_numpy(smp.input_ids)
    with torch.no_grad():
        logits = model(ids[None, :-1], torch.arange(len(ids) - 1)[None], None)[0].double()
    logq = torch.log_softmax(logits[:, :VOCAB], -1)
    pos = torch.nonzero(torch.from_numpy(smp.loss_mask[1:])).flatten()  # label t predicts token t + 1
    t = smp.teacher
    ce = -logq[pos, ids[pos + 1]].mean()
    p = torch.exp(t.values.double() - t.lse.double()[:, None])
    q = torch.exp(logq[pos].gather(-1, t.ids))
    p_tail, q_tail = 1 - p.sum(-1), 1 - q.sum(-1)
    kl = (p * (p.log() - q.log())).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    rkl = (q * (q.log() - p.log())).sum(-1) + q_tail * (q_tail.log() - p_tail.log())
    agree = (logq[pos].argmax(-1) == t.ids[:, 0]).double()
    return dict(tokens=float(len(pos)), loss=float(ce), kl=float(kl.mean()), reverse_kl=float(rkl.mean()),
                token_agreement=float(agree.mean()))


def test_heldout_per_sample_matches_float64_and_batched_terms():
    from nemo_kd.data.kd_dataset import collate
    from nemo_kd.evaluation.metrics import heldout_intervals, heldout_metrics, heldout_per_sample
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig

    samples = _samples()
    with WorldOfOne():
        cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                             vocab_size=VOCAB, max_position_embeddings=SEQ)
        engine = DistillationEngine(cfg, DistillationLossConfig(topk_convention="exact_tail"), OptimConfig(),
                                    BatchConfig(micro_batch_size=4, global_batch_size=4, seq_length=SEQ), max_steps=1)
        per = heldout_per_sample(engine, samples, SEQ, pad_id=0)
        model = engine.module
        model.eval()
        refs = [_reference(model, s) for s in samples]
        batches = [[collate(samples[s:s + 4], SEQ, 0)] for s in range(0, N, 4)]
        forward = heldout_metrics(engine, batches)
        reverse = heldout_metrics(engine, batches, "reverse_kl")
    for name in ("tokens", "loss", "kl", "reverse_kl", "token_agreement"):
        assert per[name] == pytest.approx([r[name] for r in refs], rel=2e-5, abs=1e-6), name
    intervals = heldout_intervals(per)
    batched = dict(forward, reverse_kl=reverse["kl"])
    tokens = np.array(per["tokens"])
    for name, iv in intervals.items():
        weighted = float((np.array(per[name]) * tokens).sum() / tokens.sum())
        assert iv["mean"] == pytest.approx(weighted, abs=1e-12)
        assert iv["mean"] == pytest.approx(batched[name], rel=1e-5, abs=1e-7), name  # the batched pass's number
        assert iv["low"] <= iv["mean"] <= iv["high"] and iv["n"] == N, (name, iv)
        assert iv["high"] > iv["low"] or name == "token_agreement"
    assert not any(math.isnan(v) for v in per["kl"])
