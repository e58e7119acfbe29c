"""bf16 / fp16 students through Megatron's own mixed-precision path, on CPU (issue 12).

The student's weights are bf16/fp16 inside Megatron's ``Float16Module``; Megatron's
``Float16OptimizerWithFloat16Params`` keeps fp32 main params and steps on the fp32 grads that
DDP reduces (``grad_reduce_in_fp32``); fp16 adds Megatron's loss scaling (the schedule scales
each microbatch's loss by ``config.grad_scale_func``, the optimizer unscales, skips a step whose
grads overflow and lowers the scale by the hysteresis rule). References: the same run in fp32
from the same (rounded) weights, hand-computed loss scales, a continuing run for resume, TP=1 for
TP=2, and ``build_gpt_model`` for the teacher's cast.
"""

import math
import os

import pytest
import torch

from dist_utils import WorldOfOne, run_distributed

SEQ, MICRO, GBS, VOCAB, K = 12, 2, 4, 256, 8  # vocab = 128·TP: no padding rows
STEPS = 20

# Measured on this CPU (20 steps of Adam at lr 1e-2 from weights rounded to the student's dtype):
# bf16 vs fp32: max |Δloss|/loss 2.9e-3, final-weights relative error 4.2e-2; fp16 vs fp32 (dynamic
# scaling): 5e-4 and 2.5e-2. The weights differ more than the losses because Adam's first updates
# are about ±lr·sign(g): gradient entries near zero flip sign under bf16/fp16 rounding (after step 1
# the bf16 update already differs by 8%, then the gap stays there). Tolerances: ~2-3x the measured.
BF16_LOSS_RTOL, BF16_WEIGHT_RTOL = 1e-2, 0.08
FP16_LOSS_RTOL, FP16_WEIGHT_RTOL = 2e-3, 0.05


def _model_cfg(dtype, **kw):
    from nemo_kd.models import GPTModelConfig

    return GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ, params_dtype=dtype, **kw)


def _global_batch(step):
    """Two deterministic batches, revisited (the student can fit them); top-k of a random teacher."""
    g = torch.Generator().manual_seed(200 + step % 2)
    tokens = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    mask = torch.ones(GBS, SEQ)
    mask[:, :3] = 0
    mask[2, 8:] = 0
    inputs = tokens[:, :-1]
    t_logits = torch.randn(GBS, SEQ, VOCAB, generator=g)
    t_logits.scatter_add_(-1, ((inputs + 1) % VOCAB)[..., None], torch.full((GBS, SEQ, 1), 6.0))
    vals, ids = t_logits.topk(K, dim=-1)
    return dict(inputs=inputs, labels=tokens[:, 1:], loss_mask=mask, position_ids=torch.arange(SEQ).expand(GBS, SEQ),
                teacher_values=vals, teacher_ids=ids, teacher_lse=torch.logsumexp(t_logits, -1))


def _microbatches(step, dp_rank=0, dp_size=1, online=False):
    batch = _global_batch(step)
    if online:  # the co-located teacher gives the logits
        batch = {k: v for k, v in batch.items() if not k.startswith("teacher_")}
    rows = list(range(dp_rank * GBS // dp_size, (dp_rank + 1) * GBS // dp_size))
    return [{k: v[rows[i:i + MICRO]] for k, v in batch.items()} for i in range(0, len(rows), MICRO)]


def _engine(dtype, steps=STEPS, teacher_cfg=None, teacher_model=None, loss_kw=None, **optim_kw):
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig

    loss = DistillationLossConfig(**(loss_kw or dict(kd_loss_weight=1.0, sft_loss_weight=0.5,
                                                     topk_convention="exact_tail")))
    return DistillationEngine(_model_cfg(dtype), loss, OptimConfig(**{"lr": 1e-2, "clip_grad": 1.0, **optim_kw}),
                              BatchConfig(micro_batch_size=MICRO, global_batch_size=GBS, seq_length=SEQ),
                              max_steps=steps, teacher_cfg=teacher_cfg, teacher_model=teacher_model)


def _gpt(engine):
    from nemo_kd.convert.hf_weights import unwrap_model

    return unwrap_model(engine.module)


def _init_weights(round_to):
    """The fp32 student's random init (this rank's shard), rounded to ``round_to`` and back."""
    engine = _engine("fp32")
    return {k: v.detach().to(round_to).float().clone() for k, v in _gpt(engine).state_dict().items()
            if torch.is_tensor(v) and v.is_floating_point()}


def _load(engine, weights):
    """Load fp32 ``weights`` into the student (cast to its dtype) and refresh the fp32 main params."""
    _gpt(engine).load_state_dict(weights, strict=False)
    engine.optimizer.reload_model_params()


def _weights(engine):
    """The weights the optimizer holds: fp32 main params for bf16/fp16, the params for fp32."""
    return {n: getattr(p, "main_param", p).detach().float().clone() for n, p in _gpt(engine).named_parameters()}


def _relative_error(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    return math.sqrt(num / sum(float(v.double().pow(2).sum()) for v in b.values()))


def _float16_optimizer(engine):
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    (inner,) = engine.optimizer.chained_optimizers
    assert isinstance(inner, Float16OptimizerWithFloat16Params), type(inner)
    return inner


def _record_objective(engine):
    """Wrap the engine's objective: the dtypes of the logits it reads and of the loss it returns."""
    seen, objective = [], engine.objective

    def recording(logits, batch, norms):
        out = objective(logits, batch, norms)
        teacher = getattr(batch.teacher, "logits", None)
        seen.append(dict(logits=logits.dtype, loss=out.loss.dtype,
                         teacher=teacher.dtype if torch.is_tensor(teacher) else None))
        return out

    engine.objective = recording
    return seen


def _compare_with_fp32(dtype, **optim_kw):
    rounded = _init_weights(getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
    runs = {}
    for d in ("fp32", dtype):
        engine = _engine(d, **optim_kw)
        _load(engine, rounded)
        seen = _record_objective(engine)
        history = [engine.train_step(_microbatches(s)) for s in range(STEPS)]
        runs[d] = dict(history=history, weights=_weights(engine), engine=engine, seen=seen)
    loss_err = max(abs(a["loss"] - b["loss"]) / abs(a["loss"])
                   for a, b in zip(runs["fp32"]["history"], runs[dtype]["history"]))
    weight_err = _relative_error(runs[dtype]["weights"], runs["fp32"]["weights"])
    print(f"{dtype} vs fp32 over {STEPS} steps: max loss rel err {loss_err:.2e}, "
          f"final weights rel err {weight_err:.2e}")
    return runs, loss_err, weight_err


def _assert_megatron_mixed_precision(engine, dtype):
    """Model params in ``dtype`` inside Float16Module; fp32 main params and main grads; the torch
    optimizer steps exactly the main params; the model params are the rounded main params."""
    from megatron.core.transformer.module import Float16Module

    assert isinstance(engine.module, Float16Module)
    opt = _float16_optimizer(engine)
    params = list(_gpt(engine).named_parameters())
    assert all(p.dtype == dtype for _, p in params), {n: p.dtype for n, p in params if p.dtype != dtype}
    assert all(p.main_param.dtype == torch.float32 and p.main_grad.dtype == torch.float32 for _, p in params)
    stepped = {id(q) for g in opt.optimizer.param_groups for q in g["params"]}
    assert stepped == {id(p.main_param) for _, p in params}
    assert not any(opt.fp32_from_fp32_groups)
    for n, p in params:
        assert torch.equal(p.detach(), p.main_param.to(dtype)), n


# ------------------------------------------------------------------------------- bf16


def test_bf16_student_tracks_fp32_through_float16_optimizer():
    with WorldOfOne():
        runs, loss_err, weight_err = _compare_with_fp32("bf16")
        bf16 = runs["bf16"]
        _assert_megatron_mixed_precision(bf16["engine"], torch.bfloat16)
        # the loss reads the model's bf16 logits (no fp32 upcast) and is an fp32 number
        assert bf16["seen"] and all(s["logits"] == torch.bfloat16 and s["loss"] == torch.float32 for s in bf16["seen"])
        assert all(s["logits"] == torch.float32 for s in runs["fp32"]["seen"])
        assert all(m["update_skipped"] == 0.0 and m["skipped_steps"] == 0.0 and "loss_scale" not in m
                   for m in bf16["history"])
        assert bf16["history"][-1]["kd_loss"] < 0.7 * bf16["history"][0]["kd_loss"]  # it trains
    assert loss_err < BF16_LOSS_RTOL and weight_err < BF16_WEIGHT_RTOL, (loss_err, weight_err)
    assert weight_err > 1e-5  # really bf16 compute, not an fp32 run in disguise


def _inplace_step(upcast_logits: bool, inplace: bool):
    """Two bf16 steps; whether the gradient reaching the output layer lives in the model's logits."""
    import nemo_kd.models.engine as engine_module

    with WorldOfOne():
        engine = _engine("bf16", loss_kw=dict(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                                              inplace_logits_grad=inplace))
        _load(engine, _init_weights(torch.bfloat16))
        # the logits are kept alive here so that no later tensor can reuse their address
        gpt, logits, same_storage = _gpt(engine), [], []
        gpt.register_forward_hook(lambda mod, inp, out: logits.append(out))

        def on_output_layer(mod, inp, out):
            if torch.is_grad_enabled():
                out[0].register_hook(lambda g: same_storage.append(g.data_ptr() == logits[-1].data_ptr()))

        gpt.output_layer.register_forward_hook(on_output_layer)
        original = engine_module.half_precision_output
        if upcast_logits:  # Megatron's default: Float16Module(...)(x) returns fp32 logits
            engine_module.half_precision_output = lambda model: model
        try:
            history = [engine.train_step(_microbatches(s)) for s in range(2)]
        finally:
            engine_module.half_precision_output = original
        return history, _weights(engine), same_storage


def test_bf16_logits_skip_float16modules_upcast_bit_identically_and_stay_inplace():
    """The loss reads the bf16 logits instead of Float16Module's fp32 copy: same step, bit for bit
    (the fp32 loss reads the same values; the fp32 gradient is rounded to bf16 once either way),
    and the in-place gradient is written over the model's own logits (it was over the fp32 copy)."""
    ref_history, ref_weights, ref_storage = _inplace_step(upcast_logits=True, inplace=True)
    history, weights, storage = _inplace_step(upcast_logits=False, inplace=True)
    off_history, off_weights, off_storage = _inplace_step(upcast_logits=False, inplace=False)
    assert ref_storage and not any(ref_storage)  # the upcast's gradient is a new bf16 tensor
    assert storage and all(storage)
    assert off_storage and not any(off_storage)
    for other_history, other_weights in ((ref_history, ref_weights), (off_history, off_weights)):
        for a, b in zip(history, other_history):
            for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
                assert a[key] == b[key], (key, a[key], b[key])
        for k, w in weights.items():
            assert torch.equal(w, other_weights[k]), k


# ------------------------------------------------------------------------------- fp16


def test_fp16_student_with_dynamic_loss_scaling_tracks_fp32():
    with WorldOfOne():
        runs, loss_err, weight_err = _compare_with_fp32("fp16", initial_loss_scale=2.0 ** 12)
        fp16 = runs["fp16"]
        _assert_megatron_mixed_precision(fp16["engine"], torch.float16)
        assert fp16["engine"].module.config.grad_scale_func == fp16["engine"].optimizer.scale_loss
        assert runs["fp32"]["engine"].module.config.grad_scale_func is None
        assert all(s["logits"] == torch.float16 and s["loss"] == torch.float32 for s in fp16["seen"])
        # no overflow at 2^12: every step taken, the scale constant (growth only after 1000 clean steps)
        assert [m["loss_scale"] for m in fp16["history"]] == [4096.0] * STEPS
        assert all(m["update_skipped"] == 0.0 for m in fp16["history"])
        # the schedule scaled the loss and the optimizer unscaled the grads: the same gradient norm
        # (measured within 1.7%; a missing scale or unscale would be off by 4096x)
        assert all(abs(a["grad_norm"] - b["grad_norm"]) < 0.05 * b["grad_norm"]
                   for a, b in zip(fp16["history"], runs["fp32"]["history"]))
    assert loss_err < FP16_LOSS_RTOL and weight_err < FP16_WEIGHT_RTOL, (loss_err, weight_err)
    assert weight_err > 1e-6


class _InfGradientAt:
    """Makes the gradient entering the output layer inf at the chosen engine steps (loss stays finite)."""

    def __init__(self, engine, steps):
        self.engine, self.steps = engine, set(steps)
        _gpt(engine).output_layer.register_forward_hook(self._hook)

    def _hook(self, mod, inp, out):
        if torch.is_grad_enabled() and self.engine.step in self.steps:
            def poison(g):
                g = g.clone()
                g[(0,) * g.dim()] = float("inf")
                return g

            out[0].register_hook(poison)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale_by_hysteresis():
    """Megatron's DynamicGradScaler, by hand: each overflow decrements the hysteresis tracker
    (2 by default; clean steps do not restore it before ``loss_scale_window`` of them), and an
    overflow that leaves it at <= 0 halves the scale. Overflows at steps 1 and 3 of 6: the scale
    stays 1024 after the first, becomes 512 after the second."""
    with WorldOfOne():
        engine = _engine("fp16", initial_loss_scale=1024.0, hysteresis=2, loss_scale_window=1000)
        _load(engine, _init_weights(torch.float16))
        _InfGradientAt(engine, {1, 3})
        expected_scale = [1024.0, 1024.0, 1024.0, 512.0, 512.0, 512.0]
        history = []
        for s in range(6):
            before, sched_before = _weights(engine), engine.scheduler.num_steps
            params_before = {n: p.detach().clone() for n, p in _gpt(engine).named_parameters()}
            m = engine.train_step(_microbatches(s))
            history.append(m)
            skipped = s in (1, 3)
            assert m["update_skipped"] == float(skipped) and m["loss_scale"] == expected_scale[s], (s, m)
            assert math.isfinite(m["loss"])
            after = _weights(engine)
            if skipped:  # nothing moved: main params, model params, schedule
                assert all(torch.equal(before[k], after[k]) for k in before)
                assert all(torch.equal(p.detach(), params_before[n]) for n, p in _gpt(engine).named_parameters())
                assert engine.scheduler.num_steps == sched_before and math.isnan(m["grad_norm"])
            else:  # later steps train again
                assert not all(torch.equal(before[k], after[k]) for k in before)
                assert engine.scheduler.num_steps == sched_before + 1 and math.isfinite(m["grad_norm"])
        assert [m["skipped_steps"] for m in history] == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]
        assert engine.skipped_steps == 2 and engine.scheduler.num_steps == 4
        scaler = _float16_optimizer(engine).grad_scaler
        assert scaler._hysteresis_tracker == 0 and scaler._growth_tracker == 2


def test_fp16_megatron_default_scale_overflows_until_it_fits():
    """Megatron's default initial scale 2^32 overflows fp16 in the backward of the scaled loss (so
    the schedule does scale it): hysteresis 2 keeps 2^32 after the first overflow, then every
    overflow halves; the first step that fits keeps its scale and trains."""
    with WorldOfOne():
        engine = _engine("fp16")
        _load(engine, _init_weights(torch.float16))
        history = []
        while not history or history[-1]["update_skipped"]:
            history.append(engine.train_step(_microbatches(len(history))))
            assert len(history) < 40, history[-1]
    n = len(history) - 1  # skipped steps
    assert n >= 2 and history[-1]["skipped_steps"] == n and engine.scheduler.num_steps == 1
    expected = [2.0 ** 32] + [2.0 ** (32 - i) for i in range(1, n)] + [2.0 ** (33 - n)]
    assert [m["loss_scale"] for m in history] == expected, [m["loss_scale"] for m in history]


def test_fp16_static_loss_scale_never_changes():
    with WorldOfOne():
        engine = _engine("fp16", loss_scale=256.0)
        _load(engine, _init_weights(torch.float16))
        _InfGradientAt(engine, {1})
        history = [engine.train_step(_microbatches(s)) for s in range(3)]
    assert [m["loss_scale"] for m in history] == [256.0] * 3
    assert [m["update_skipped"] for m in history] == [0.0, 1.0, 0.0] and history[-1]["skipped_steps"] == 1.0


def test_fp16_resume_restores_loss_scale_and_skipped_steps(tmp_path):
    """Save after an overflow (scale halved to 512, one skipped step), resume into a fresh engine
    (initial scale 1024, other weights): the scale, the scaler's trackers and the count come back,
    and the next two steps equal the uninterrupted run's bit for bit."""
    from nemo_kd.models.checkpointing import load_training_checkpoint, save_training_checkpoint

    with WorldOfOne():
        engine = _engine("fp16", initial_loss_scale=1024.0, hysteresis=1)
        _load(engine, _init_weights(torch.float16))
        _InfGradientAt(engine, {1})
        for s in range(3):
            engine.train_step(_microbatches(s))
        assert engine.skipped_steps == 1 and float(engine.optimizer.get_loss_scale()) == 512.0
        saved_scaler = dict(_float16_optimizer(engine).grad_scaler.state_dict())
        save_training_checkpoint(engine, str(tmp_path / "ckpt"))
        continued = [engine.train_step(_microbatches(s)) for s in (3, 4)]

        resumed = _engine("fp16", initial_loss_scale=1024.0, hysteresis=1)
        assert float(resumed.optimizer.get_loss_scale()) == 1024.0 and resumed.skipped_steps == 0
        load_training_checkpoint(resumed, str(tmp_path / "ckpt"))
        scaler = _float16_optimizer(resumed).grad_scaler
        assert float(resumed.optimizer.get_loss_scale()) == 512.0 and resumed.skipped_steps == 1
        assert scaler.scale.dtype == torch.float32 and scaler.scale.device.type == "cpu"
        assert (scaler._growth_tracker, scaler._hysteresis_tracker) == \
            (saved_scaler["growth_tracker"], saved_scaler["hysteresis_tracker"])
        again = [resumed.train_step(_microbatches(s)) for s in (3, 4)]
        final, resumed_final = _weights(engine), _weights(resumed)
    for a, b in zip(continued, again):
        for key in ("loss", "grad_norm", "loss_scale", "skipped_steps", "lr"):
            assert a[key] == b[key], (key, a[key], b[key])
    assert all(torch.equal(final[k], resumed_final[k]) for k in final)


def test_bf16_deferred_output_projection_matches_materialised_logits():
    """kd.fuse_output_layer with a bf16 student: the final hidden states reach the loss in bf16
    (beside the bf16 output weight); 3 steps match the materialised bf16 logits (measured 6e-5)."""
    histories = {}
    with WorldOfOne():
        weights = _init_weights(torch.bfloat16)
        for fuse in (False, True):
            engine = _engine("bf16", loss_kw=dict(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                                                  fuse_output_layer=fuse, output_layer_chunk_tokens=8))
            _load(engine, weights)
            seen = _record_objective(engine)
            histories[fuse] = [engine.train_step(_microbatches(s)) for s in range(3)]
            assert all(s["logits"] == torch.bfloat16 and s["loss"] == torch.float32 for s in seen)
    for a, b in zip(histories[False], histories[True]):
        assert abs(a["loss"] - b["loss"]) < 5e-4 * a["loss"] and abs(a["grad_norm"] - b["grad_norm"]) < 5e-3, (a, b)


# --------------------------------------------------------------------------- the teacher


def _teacher_cfg(dtype):
    from nemo_kd.models import GPTModelConfig

    return GPTModelConfig(num_layers=1, hidden_size=48, num_attention_heads=4, ffn_hidden_size=96, vocab_size=VOCAB,
                          max_position_embeddings=SEQ, params_dtype=dtype)


def test_online_teacher_runs_in_the_students_precision():
    """An fp32-loaded teacher with a bf16 student is cast to bf16 (what build_gpt_model builds for
    bf16: its logits bit-identical), its pipeline dtype too, and its bf16 logits feed the loss."""
    from megatron.core.transformer.module import Float16Module

    from nemo_kd.models import build_gpt_model
    from nemo_kd.models.builder import in_params_dtype

    with WorldOfOne():
        teacher = build_gpt_model(_teacher_cfg("fp32"))
        fp32_weights = {k: v.detach().clone() for k, v in teacher.state_dict().items() if torch.is_tensor(v)}
        reference = build_gpt_model(_teacher_cfg("bf16"))
        reference.module.load_state_dict(fp32_weights, strict=False)
        engine = _engine("bf16", steps=2, teacher_cfg=_teacher_cfg("fp32"), teacher_model=teacher,
                         loss_kw=dict(kd_loss_weight=1.0, sft_loss_weight=0.5))
        assert isinstance(engine.teacher, Float16Module) and engine.teacher.module is teacher
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in engine.teacher.parameters())
        assert teacher.config.pipeline_dtype == torch.bfloat16 and teacher.config.bf16
        mb = _microbatches(0, online=True)[0]
        with torch.no_grad():
            got = engine.teacher(mb["inputs"], mb["position_ids"], None, fp32_output=False)
            want = reference(mb["inputs"], mb["position_ids"], None, fp32_output=False)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
        seen = _record_objective(engine)
        m = engine.train_step(_microbatches(0, online=True))
        assert math.isfinite(m["loss"]) and m["kd_loss"] > 0
        assert seen and all(s["teacher"] == torch.bfloat16 and s["logits"] == torch.bfloat16 for s in seen)
        # and back: a bf16 chunk for an fp32 run is unwrapped and upcast (exactly: bf16 ⊂ fp32)
        up = in_params_dtype(reference, "fp32")
        assert up is reference.module and all(p.dtype == torch.float32 for p in up.parameters())
        assert in_params_dtype(up, "fp32") is up


# ------------------------------------------------------------------------------ TP = 2


def _tp_run(rank, world, tp, weights):
    from nemo_kd.models import shard_state_dict
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    initialize_parallel(ParallelConfig(tensor_model_parallel_size=tp, seed=5))
    try:
        engine = _engine("bf16", steps=6)
        _load(engine, shard_state_dict(weights, _model_cfg("bf16"), state.tp_rank(), tp, 0, 1))
        _float16_optimizer(engine)
        return [engine.train_step(_microbatches(s)) for s in range(6)]
    finally:
        destroy_parallel()


@pytest.mark.distributed
def test_bf16_tp2_matches_tp1():
    """Measured max rel. difference over 6 steps: loss 7.1e-4, grad norm 1.1e-2 (bf16 matmuls
    and sums split over two shards round differently, and Adam amplifies it); tolerances 3e-3
    and 4e-2. fp32 at TP=2 matches TP=1 to 1e-5 (tests/test_engine.py)."""
    with WorldOfOne():
        weights = _init_weights(torch.bfloat16)
    ref = run_distributed(_tp_run, 1, 1, weights)[0]
    got = run_distributed(_tp_run, 2, 2, weights)[0]
    errs = [abs(a["loss"] - b["loss"]) / a["loss"] for a, b in zip(ref, got)]
    print("bf16 TP=2 vs TP=1 loss rel err per step", [f"{e:.1e}" for e in errs])
    assert max(errs) < 3e-3, errs
    gn = [abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"] for a, b in zip(ref, got)]
    print("grad norm rel err", [f"{e:.1e}" for e in gn])
    assert max(gn) < 0.04, gn


# ------------------------------------------------------------------------------ distributed optimizer, DP = 2


def _dp_run(rank, world, distributed, weights, ckpt_dir):
    """bf16 at DP=2: 4 steps, a checkpoint, 2 more; then a fresh engine resumes from the checkpoint
    and runs the same 2 steps. Returns both histories."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from nemo_kd.models.checkpointing import load_training_checkpoint, save_training_checkpoint
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    initialize_parallel(ParallelConfig(seed=5))
    try:
        def steps(engine, which):
            return [engine.train_step(_microbatches(s, state.dp_rank(), state.dp_size())) for s in which]

        engine = _engine("bf16", steps=6, use_distributed_optimizer=distributed)
        assert any(isinstance(o, DistributedOptimizer) for o in engine.optimizer.chained_optimizers) == distributed
        _load(engine, weights)
        history = steps(engine, range(4))
        save_training_checkpoint(engine, ckpt_dir)
        history += steps(engine, (4, 5))
        resumed = _engine("bf16", steps=6, use_distributed_optimizer=distributed)
        load_training_checkpoint(resumed, ckpt_dir)
        again = steps(resumed, (4, 5))
        final, resumed_final = _params_and_main_shards(engine), _params_and_main_shards(resumed)
        return history, again, len(final) == len(resumed_final) and all(map(torch.equal, final, resumed_final))
    finally:
        destroy_parallel()


def _dp_runs(rank, world, weights, ckpt_root):
    """The plain and the distributed optimizer's ``_dp_run`` one after the other in one 2-process launch
    (each sets up and tears down its own parallel state)."""
    return {distributed: _dp_run(rank, world, distributed, weights,
                                 os.path.join(ckpt_root, "distributed" if distributed else "plain"))
            for distributed in (False, True)}


def _params_and_main_shards(engine):
    """The bf16 parameters and this rank's fp32 main params (whole for the plain optimizer, its DP shard for
    the distributed one)."""
    (inner,) = engine.optimizer.chained_optimizers
    main = getattr(inner, "shard_fp32_from_float16_groups", None) or inner.fp32_from_float16_groups
    return [p.detach().clone() for p in _gpt(engine).parameters()] + [t.detach().clone() for g in main for t in g]


@pytest.mark.distributed
def test_bf16_distributed_optimizer_dp2_matches_and_resumes(tmp_path):
    """Megatron's distributed optimizer (what NeMo-Aligner's distributed_fused_adam configs ask for) at
    DP=2 over gloo: the same losses and grad norms as the non-distributed mixed-precision optimizer (the
    fp32 grads of two ranks reduce-scattered instead of all-reduced: the same sums), and its checkpoint
    ('fully_reshardable') resumes bit-identically."""
    with WorldOfOne():
        weights = _init_weights(torch.bfloat16)
    runs = run_distributed(_dp_runs, 2, weights, str(tmp_path))[0]
    (plain, plain_again, plain_same), (dist, dist_again, dist_same) = runs[False], runs[True]
    for a, b in zip(plain, dist):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"], (a["grad_norm"], b["grad_norm"])
    assert plain_same and dist_same
    for a, b in zip(dist[4:], dist_again):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])


# ------------------------------------------------------------------------------ the shim


def test_cpu_shim_mixed_precision_patches():
    """The patches behind bf16/fp16 and the distributed optimizer on CPU are installed, recorded, scoped to
    their call."""
    from megatron.core.optimizer import grad_scaler, optimizer

    from nemo_kd.parallel import cpu_shim

    patched = cpu_shim.install_cpu_shim()
    for name in ("megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
                 "megatron.core.optimizer.grad_scaler.DynamicGradScaler.load_state_dict",
                 "megatron.core.optimizer.grad_scaler.torch",
                 "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.__init__",
                 "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.get_parameter_state_dp_zero",
                 "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states",
                 "megatron.core.optimizer.distrib_optimizer.torch"):
        assert name in patched, name
    assert isinstance(grad_scaler.torch, cpu_shim._CpuTorch)
    assert optimizer.Float16OptimizerWithFloat16Params.__init__.__wrapped__.__qualname__ == \
        "Float16OptimizerWithFloat16Params.__init__"

    original_type = torch.Tensor.type
    seen = cpu_shim._with_cpu_tensors_typed_as_cuda(
        lambda *ts: [t.type() for t in ts] + [ts[0].type(torch.float64).dtype])(
        torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1, dtype=torch.float16), torch.zeros(1))
    assert seen == ["torch.cuda.BFloat16Tensor", "torch.cuda.HalfTensor", "torch.cuda.FloatTensor", torch.float64]
    assert torch.Tensor.type is original_type and torch.zeros(1).type() == "torch.FloatTensor"

    scaler = grad_scaler.DynamicGradScaler(initial_scale=8.0, min_scale=1.0, growth_factor=2.0, backoff_factor=0.5,
                                           growth_interval=3, hysteresis=2)
    assert scaler.scale.device.type == "cpu"
    scaler.load_state_dict({"scale": torch.tensor([2.0]), "growth_tracker": 1, "hysteresis_tracker": 1})
    assert float(scaler.scale) == 2.0 and scaler.scale.device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1).cuda()  # Tensor.cuda is itself again outside the patched call


def test_a_save_removes_what_a_killed_save_left(tmp_path):
    """A process killed while saving leaves ``<name>.ckpt.tmp-<pid>`` (a whole checkpoint) or, between the two
    renames, ``<name>.ckpt.old-<pid>``: the next save in that directory removes them, keeps finished checkpoints
    and other files, and its own checkpoint loads."""
    from nemo_kd.models.checkpointing import load_training_checkpoint, save_training_checkpoint

    ckpts = tmp_path / "checkpoints"
    for leftover in ("gpt_kd--step=3.ckpt.tmp-4242", "gpt_kd--step=3.ckpt.old-4242"):
        os.makedirs(ckpts / leftover / "weights")
        (ckpts / leftover / "weights" / "blob").write_bytes(b"x" * 1000)
    (ckpts / "notes.tmp-1").write_text("a file, not a save's directory")
    with WorldOfOne():
        engine = _engine("fp32", steps=2)
        engine.train_step(_microbatches(0))
        save_training_checkpoint(engine, str(ckpts / "gpt_kd--step=1.ckpt"))
        assert sorted(os.listdir(ckpts)) == ["gpt_kd--step=1.ckpt", "notes.tmp-1"]
        save_training_checkpoint(engine, str(ckpts / "gpt_kd--step=1-last.ckpt"))
        assert sorted(os.listdir(ckpts)) == ["gpt_kd--step=1-last.ckpt", "gpt_kd--step=1.ckpt", "notes.tmp-1"]
        resumed = _engine("fp32", steps=2)
        load_training_checkpoint(resumed, str(ckpts / "gpt_kd--step=1.ckpt"))
        assert resumed.step == engine.step == 1
