"""Deferred output projection (``kd.fuse_output_layer``): the logits computed chunk by chunk.

References: the same objective on the materialised logits ``hidden · Wᵀ`` (float64), the
TP=1 full-vocabulary result for TP=2 shards over gloo, and an engine step with the
projection in the output layer vs deferred (TP=1, TP=2, PP=2).
"""

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_utils import run_distributed  # noqa: E402

from nemo_kd.losses.objective import (  # noqa: E402
    ROLE_NEGATIVE,
    ROLE_POSITIVE,
    DistillationLossConfig,
    DistillationObjective,
    FullTeacher,
    ObjectiveBatch,
    TopKTeacher,
    objective_normalisers,
)
from nemo_kd.losses.projection import ProjectedLogits  # noqa: E402
from nemo_kd.losses.vocab_parallel import mask_padded_vocab_, vocab_parallel_logprobs_at  # noqa: E402

B, T, H, V, K = 4, 6, 16, 48, 5


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
def test_map_rows_equals_the_materialised_logits(chunk):
    g = torch.Generator().manual_seed(0)
    n = 11
    hidden = torch.randn(n, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, V, (n, 3), generator=g)
    c_lp, c_lse = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def fn(z, ids, differentiate, metrics):
        arg = z.detach().argmax(-1) if metrics else None
        lp, lse = vocab_parallel_logprobs_at(z, ids, scale=0.7, inplace_backward=differentiate)
        return lp, None, lse, arg

    lp, none, lse, arg = ProjectedLogits(hidden, weight, chunk).map_rows(fn, ids)
    assert none is None and not arg.is_floating_point()
    z = hidden @ weight.t()
    lp_ref, lse_ref = vocab_parallel_logprobs_at(z, ids, scale=0.7)
    torch.testing.assert_close(lp, lp_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref, rtol=0, atol=1e-12)
    assert torch.equal(arg, z.argmax(-1))
    got = _grads((lp * c_lp).sum() + (lse * c_lse).sum(), hidden, weight)
    ref = _grads((lp_ref * c_lp).sum() + (lse_ref * c_lse).sum(), hidden, weight)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _batch(kind, dtype, g, vocab=V, vocab_slice=slice(None)):
    """A microbatch with two preference pairs; teacher top-k (``kind='topk'``) or full logits."""
    labels = torch.randint(0, vocab, (B, T), generator=g)
    mask = torch.ones(B, T)
    mask[:, 0] = 0
    mask[2, 4:] = 0
    roles = torch.tensor([ROLE_POSITIVE, ROLE_NEGATIVE, ROLE_POSITIVE, ROLE_NEGATIVE])
    pair_ids = torch.tensor([0, 0, 1, 1])
    t = torch.randn(B, T, vocab, generator=g, dtype=torch.float64) * 3
    seq_ref = torch.randn(B, generator=g, dtype=torch.float64) * 5 - 20
    if kind == "topk":
        values, ids = t.topk(K, dim=-1)
        teacher = TopKTeacher(values.to(dtype), ids, torch.logsumexp(t, -1).to(dtype))
    else:
        teacher = FullTeacher(t[..., vocab_slice].to(dtype))
    return ObjectiveBatch(labels, mask, teacher, roles, pair_ids, seq_ref)


OBJECTIVE_CASES = {
    "topk_exact_kd_sft_dpkd": ("topk", dict(topk_convention="exact_tail", sft_loss_weight=0.5, dpo_loss_weight=1.0)),
    "topk_renorm_kd_only_rkl": ("topk", dict(kd_loss_type="reverse_kl")),
    "topk_scale2_with_labels": ("topk", dict(logits_scale=2.0, target_logits_scale=0.5, sft_loss_weight=0.3)),
    "online_jsd_sft": ("full", dict(kd_loss_type="jsd", sft_loss_weight=0.5)),
    "online_akl_simpo": ("full", dict(kd_loss_type="akl", dpo_loss_weight=0.5, preference_loss_type="simpo")),
    "label_smoothing_kd": ("topk", dict(sft_loss_weight=1.0, sft_label_smoothing=0.1)),
    "sft_only": ("topk", dict(kd_loss_weight=0.0, sft_loss_weight=1.0)),
}


def _objective_both_ways(cfg, batch, hidden, weight, chunk, group=None):
    """(loss, metrics, grads) from ProjectedLogits and from the materialised logits."""
    obj = DistillationObjective(cfg, group=group)
    norms = objective_normalisers(cfg, [batch])
    out = []
    for projected in (True, False):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        logits = ProjectedLogits(h, w, chunk) if projected else (h @ w.t()).reshape(B, T, -1)
        res = obj(logits, batch, norms)
        out.append((res.loss.detach(), {k: v.detach() for k, v in res.metrics.items()},
                    _grads(res.loss, h, w)))
    return out


@pytest.mark.parametrize("name", list(OBJECTIVE_CASES))
def test_objective_on_projected_logits_equals_materialised(name):
    kind, kw = OBJECTIVE_CASES[name]
    g = torch.Generator().manual_seed(1)
    batch = _batch(kind, torch.float64, g)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    cfg = DistillationLossConfig(**kw)
    (loss, metrics, grads), (loss_ref, metrics_ref, grads_ref) = _objective_both_ways(cfg, batch, hidden, weight, 5)
    assert loss_ref.abs() > 0.1
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
    assert metrics.keys() == metrics_ref.keys()
    for key in metrics_ref:
        torch.testing.assert_close(metrics[key].double(), metrics_ref[key].double(), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, grads_ref):
        assert b.abs().max() > 1e-4
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(OBJECTIVE_CASES))
def test_padded_vocabulary_columns_are_not_tokens(name):
    """Megatron pads the vocabulary (here 48 real + 16 padding rows); an HF-imported model has zero rows there
    (logit 0). An objective told the real ``vocab_size`` masks them (materialised logits in place, the projection
    per chunk): every term, label smoothing included, equals the same objective on the real vocabulary alone
    (float64), and the padding rows get exactly zero gradient. Unmasked, the zero rows change the loss."""
    kind, kw = OBJECTIVE_CASES[name]
    g = torch.Generator().manual_seed(5)
    pad = 16
    batch = _batch(kind, torch.float64, g)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5 - 0.1
    padded_w = torch.cat([weight, torch.zeros(pad, H, dtype=torch.float64)])
    padded_batch = batch
    if kind == "full":  # the online teacher's logits are padded and masked the same way (the engine does it)
        t = torch.cat([batch.teacher.logits, torch.zeros(B, T, pad, dtype=torch.float64)], -1)
        padded_batch = dataclasses.replace(batch, teacher=FullTeacher(mask_padded_vocab_(t, V, None)))
    cfg = DistillationLossConfig(**kw)
    norms = objective_normalisers(cfg, [batch])

    def run(obj, logits_of, w0, b):
        h, w = hidden.clone().requires_grad_(), w0.clone().requires_grad_()
        res = obj(logits_of(h, w), b, norms)
        return res.loss.detach(), _grads(res.loss, h, w)

    def materialised(h, w):
        return (h @ w.t()).reshape(B, T, -1)

    loss_ref, (gh_ref, gw_ref) = run(DistillationObjective(cfg), materialised, weight, batch)
    unmasked, _ = run(DistillationObjective(cfg), materialised, padded_w, padded_batch)
    if name != "topk_renorm_kd_only_rkl":  # renormalised top-k KD alone never reads the student's full LSE
        assert (unmasked - loss_ref).abs() > 1e-3  # the zero rows matter when nothing masks them
    told = DistillationObjective(cfg, vocab_size=V)
    for logits_of in (materialised, lambda h, w: ProjectedLogits(h, w, 5)):
        loss, (gh, gw) = run(told, logits_of, padded_w, padded_batch)
        torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gh, gh_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gw[:V], gw_ref, rtol=1e-9, atol=1e-12)
        assert torch.equal(gw[V:], torch.zeros_like(gw[V:]))


@pytest.mark.parametrize("dpo_weight,matmuls_per_chunk", [(0.0, 3), (1.0, 4)])
def test_output_layer_matmuls_per_chunk(monkeypatch, dpo_weight, matmuls_per_chunk):
    """Without a sequence-level term the loss is linear in the per-token terms and the projection
    takes each chunk's gradient in the forward: 3 matmuls per chunk, as Megatron's output layer
    (forward, input and weight gradients); the preference term needs the recompute (4)."""
    g = torch.Generator().manual_seed(5)
    batch = _batch("topk", torch.float64, g)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = DistillationLossConfig(topk_convention="exact_tail", sft_loss_weight=0.5, dpo_loss_weight=dpo_weight)
    calls = []
    real = torch.matmul
    real_addmm_ = torch.Tensor.addmm_
    monkeypatch.setattr(torch, "matmul", lambda a, b: calls.append(1) or real(a, b))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda self, a, b: calls.append(1) or real_addmm_(self, a, b))
    out = DistillationObjective(cfg)(ProjectedLogits(hidden, weight, 7), batch, objective_normalisers(cfg, [batch]))
    out.loss.backward()
    chunks = -(-B * T // 7)
    assert len(calls) == matmuls_per_chunk * chunks
    with torch.no_grad():  # evaluation: the forward only
        calls.clear()
        DistillationObjective(cfg)(ProjectedLogits(hidden, weight, 7), batch, objective_normalisers(cfg, [batch]))
        assert len(calls) == chunks


@pytest.mark.parametrize("kw", [
    dict(kd_loss_type="jsd", sft_loss_weight=0.5),
    dict(kd_loss_type="skew_rkl", dpo_loss_weight=1.0, preference_loss_type="dpkd"),  # teacher as DPKD reference
], ids=["jsd_sft", "skew_rkl_dpkd"])
def test_deferred_online_teacher_equals_its_logits(kw):
    """An online teacher given as its hidden states + output weight (never projected whole)."""
    import dataclasses

    g = torch.Generator().manual_seed(6)
    batch = _batch("topk", torch.float64, g)  # labels, masks, pairs; the teacher is replaced below
    t_hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64)
    t_weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    cfg = DistillationLossConfig(**kw)
    deferred = dataclasses.replace(batch, teacher=FullTeacher(ProjectedLogits(t_hidden, t_weight, 5)),
                                   teacher_seq_logprobs=None)
    whole = dataclasses.replace(batch, teacher=FullTeacher((t_hidden @ t_weight.t()).reshape(B, T, V)),
                                teacher_seq_logprobs=None)
    results = []
    for b, projected in ((deferred, True), (whole, False), (deferred, False)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logits = ProjectedLogits(h, w, 5) if projected else (h @ w.t()).reshape(B, T, V)
        out = DistillationObjective(cfg)(logits, b, objective_normalisers(cfg, [b]))
        results.append((out.loss.detach(), out.metrics, _grads(out.loss, h, w)))
    ref = results[1]
    assert ref[1]["kd_loss"] > 0.1 and 0 < ref[1]["token_agreement"] <= 1
    for got in (results[0], results[2]):  # student deferred or whole, teacher deferred
        torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
        for key in ref[1]:
            torch.testing.assert_close(got[1][key].double(), ref[1][key].double(), rtol=1e-12, atol=1e-12)
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def _triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton not installed")


@pytest.mark.parametrize("kind,kw", [
    ("topk", dict(topk_convention="exact_tail", sft_loss_weight=0.5, kd_kernel="fused")),
    ("full", dict(kd_loss_type="forward_kl", sft_loss_weight=0.5, kd_kernel="fused")),
])
def test_projected_fused_kernels_equal_materialised(kind, kw):
    _triton()
    g = torch.Generator().manual_seed(2)
    batch = _batch(kind, torch.float32, g)
    hidden = torch.randn(B * T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    (loss, _, grads), (loss_ref, _, grads_ref) = _objective_both_ways(DistillationLossConfig(**kw), batch, hidden,
                                                                      weight, 7)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_weight_gradient_is_accumulated_in_fp32():
    """bf16 weight: each chunk's ∂W in bf16, summed over chunks in fp32 — at least as close to the
    float64 gradient as the materialised bf16 path (one bf16 matmul over all tokens)."""
    g = torch.Generator().manual_seed(3)
    n = 64
    hidden = torch.randn(n, H, generator=g)
    weight = (torch.randn(V, H, generator=g) * 0.5).bfloat16()
    ids = torch.randint(0, V, (n,), generator=g)

    def loss_of(logits_lp):
        return -logits_lp.sum()

    def grad_w(projected, w):
        h = hidden.clone().requires_grad_()
        w = w.detach().clone().requires_grad_()
        if projected:
            (lp,) = ProjectedLogits(h, w, 8).map_rows(
                lambda z, ids, differentiate, metrics: (vocab_parallel_logprobs_at(z, ids)[0],), ids)
        else:
            lp = vocab_parallel_logprobs_at(h.to(w.dtype) @ w.t(), ids)[0]
        return torch.autograd.grad(loss_of(lp), w)[0]

    exact = grad_w(False, weight.double()).double()
    err_projected = (grad_w(True, weight).double() - exact).abs().max()
    err_materialised = (grad_w(False, weight).double() - exact).abs().max()
    assert err_projected <= err_materialised * 1.5 + 1e-6, (err_projected, err_materialised)
    assert err_projected < 0.05 * exact.abs().max()


def test_cross_tokenizer_is_refused():
    from nemo_kd.align.loss import CrossTokenizerTeacher

    batch = ObjectiveBatch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                           CrossTokenizerTeacher.__new__(CrossTokenizerTeacher))
    obj = DistillationObjective(DistillationLossConfig())
    with pytest.raises(ValueError, match="cross-tokenizer"):
        obj(ProjectedLogits(torch.zeros(2, H), torch.zeros(V, H)), batch, None)


# ---------------------------------------------------------------- TP = 2 over gloo


def _tp2_body(rank, world, kind, kw):
    import torch.distributed as dist

    g = torch.Generator().manual_seed(4)
    v_local = V // world
    shard = slice(rank * v_local, (rank + 1) * v_local)
    batch_full = _batch(kind, torch.float64, g)
    g = torch.Generator().manual_seed(4)
    batch_shard = _batch(kind, torch.float64, g, vocab_slice=shard)
    hidden = torch.randn(B * T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5
    cfg = DistillationLossConfig(**kw)
    group = dist.group.WORLD
    obj = DistillationObjective(cfg, group=group)
    h = hidden.clone().requires_grad_()
    w = weight[shard].clone().requires_grad_()
    res = obj(ProjectedLogits(h, w, 5), batch_shard, objective_normalisers(cfg, [batch_shard]))
    gh, gw = _grads(res.loss, h, w)
    dist.all_reduce(gh)  # Megatron's copy_to_tensor_model_parallel_region backward
    (ref_loss, ref_metrics, (ref_gh, ref_gw)), _ = _objective_both_ways(cfg, batch_full, hidden, weight, 64)
    return dict(loss=float(res.loss), ref_loss=float(ref_loss), gh=gh, ref_gh=ref_gh, gw=gw, ref_gw=ref_gw[shard],
                agreement=float(res.metrics.get("token_agreement", -1)),
                ref_agreement=float(ref_metrics.get("token_agreement", -1)))


@pytest.mark.distributed
@pytest.mark.parametrize("name", ["topk_exact_kd_sft_dpkd", "online_jsd_sft"])
def test_projected_objective_tp2_equals_tp1(name):
    kind, kw = OBJECTIVE_CASES[name]
    for r in run_distributed(_tp2_body, 2, kind, kw):
        assert abs(r["loss"] - r["ref_loss"]) < 1e-10
        assert r["agreement"] == r["ref_agreement"]
        torch.testing.assert_close(r["gh"], r["ref_gh"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(r["gw"], r["ref_gw"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- engine step

SEQ, MICRO, GBS, EVOCAB, HIDDEN = 8, 2, 4, 256, 32


def _engine_data():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, EVOCAB, (GBS, SEQ + 1), generator=g)
    mask = torch.ones(GBS, SEQ)
    mask[:, :2] = 0
    mask[1, 6:] = 0
    t = torch.randn(GBS, SEQ, EVOCAB, generator=g) * 2
    values, ids = t.topk(8, dim=-1)
    batch = dict(inputs=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                 position_ids=torch.arange(SEQ).expand(GBS, SEQ), teacher_values=values, teacher_ids=ids,
                 teacher_lse=torch.logsumexp(t, -1))
    return [{k: v[i:i + MICRO] for k, v in batch.items()} for i in range(0, GBS, MICRO)]


def _engine_body(rank, world, tp, pp, loss_kw, model_kw, steps, online=False):
    """``steps`` engine steps with the projection in the output layer, then deferred, same weights
    (``online``: a co-located teacher, deferred too)."""
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    model_cfg = GPTModelConfig(num_layers=2, hidden_size=HIDDEN, num_attention_heads=4, num_query_groups=2,
                               ffn_hidden_size=64, vocab_size=EVOCAB, max_position_embeddings=SEQ, **model_kw)
    teacher_cfg = GPTModelConfig(num_layers=1, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96,
                                 vocab_size=EVOCAB, max_position_embeddings=SEQ) if online else None
    out, init = {}, None
    for fuse in (False, True):
        initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5))
        try:
            teacher = build_gpt_model(teacher_cfg) if online else None  # same seed: same teacher both times
            engine = DistillationEngine(model_cfg, DistillationLossConfig(**loss_kw, fuse_output_layer=fuse,
                                                                          output_layer_chunk_tokens=5),
                                        OptimConfig(lr=1e-2, clip_grad=1.0),
                                        BatchConfig(micro_batch_size=MICRO, global_batch_size=GBS, seq_length=SEQ),
                                        max_steps=steps, teacher_cfg=teacher_cfg, teacher_model=teacher)
            if init is None:
                init = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
            engine.module.load_state_dict(init, strict=False)
            widths = []
            engine.module.register_forward_hook(lambda mod, inp, o: widths.append(o.shape[-1]))
            if online:
                teacher.register_forward_hook(lambda mod, inp, o: widths.append(o.shape[-1]))
            data = _engine_data()
            if online:
                data = [{k: v for k, v in mb.items() if not k.startswith("teacher_")} for mb in data]
            history = [engine.train_step(data) for _ in range(steps)]
            weights = {k: v.detach().double().numpy().copy() for k, v in engine.module.state_dict().items()
                       if torch.is_tensor(v) and v.is_floating_point()}
            out[fuse] = dict(history=history, weights=weights, widths=widths,
                             last_stage=state.is_pipeline_last_stage())
        finally:
            destroy_parallel()
    return out


def _assert_same_training(results, v_local, rtol):
    for r in results:
        off, on = r[False], r[True]
        if r[True]["last_stage"]:
            assert set(off["widths"]) == {v_local} and set(on["widths"]) <= {HIDDEN, 48}, (off["widths"], on["widths"])
        for a, b in zip(off["history"], on["history"]):
            for key in ("loss", "kd_loss", "sft_loss", "grad_norm", "token_agreement"):
                assert abs(a[key] - b[key]) <= rtol * max(1.0, abs(a[key])), (key, a[key], b[key])
        moved = 0
        for k, w in off["weights"].items():
            import numpy as np

            np.testing.assert_allclose(on["weights"][k], w, rtol=rtol, atol=rtol, err_msg=k)
            moved += 1
        assert moved


LOSS = dict(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail")
ONLINE_LOSS = dict(kd_loss_weight=1.0, sft_loss_weight=0.5, kd_loss_type="jsd")
# The one-process engine cases: (loss settings, student settings, online teacher).
ONE_PROCESS_CASES = {"plain": (LOSS, {}, False), "tied": (LOSS, dict(share_embeddings_and_output_weights=True), False),
                     "online": (ONLINE_LOSS, {}, True)}


def _one_process_bodies(rank, world):
    return {name: _engine_body(rank, world, 1, 1, loss_kw, model_kw, 2, online)
            for name, (loss_kw, model_kw, online) in ONE_PROCESS_CASES.items()}


@pytest.fixture(scope="module")
def one_process_runs():
    """Every one-process case in one launch (each ``_engine_body`` sets up and tears down its own parallel
    state): the tests below check one case each, as a one-rank result list."""
    return {name: [result] for name, result in run_distributed(_one_process_bodies, 1)[0].items()}


def test_engine_step_with_deferred_projection_matches(one_process_runs):
    _assert_same_training(one_process_runs["plain"], EVOCAB, 1e-5)


def test_engine_step_with_deferred_projection_tied_embeddings(one_process_runs):
    _assert_same_training(one_process_runs["tied"], EVOCAB, 1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_engine_step_with_deferred_projection_parallel(tp, pp):
    _assert_same_training(run_distributed(_engine_body, tp * pp, tp, pp, LOSS, {}, 2), EVOCAB // tp, 1e-5)


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.distributed)])
def test_engine_step_online_teacher_deferred(request, tp):
    """Online teacher: its hidden states, not its logits, kept for the loss; same training."""
    results = (request.getfixturevalue("one_process_runs")["online"] if tp == 1
               else run_distributed(_engine_body, tp, tp, 1, ONLINE_LOSS, {}, 2, True))
    _assert_same_training(results, EVOCAB // tp, 1e-5)
