"""Megatron's scale features through the distillation engine: activation recomputation and sequence
parallelism give the same losses and gradients, step by step, as the run without them; bad settings
are refused at construction with the key named.

Every run of a comparison starts from the same weights (the first run's, loaded into the others),
trains 3 steps of 2 microbatches (offline top-k KD + SFT, ``test_engine``'s data) and records after
each step the loss, the gradient norm and every parameter's reduced gradient (DDP's ``main_grad``,
this rank's shard: both runs of a pair share the TP layout). Hooks count what ran, so a feature
that silently did nothing fails: recompute runs layers (or core attention) twice per microbatch,
sequence parallelism feeds the norms ``seq / TP`` positions.
"""

import os
from dataclasses import replace

import pytest
import torch

from dist_utils import run_distributed

import test_engine as te

STEPS = 3
DROPOUT = dict(hidden_dropout=0.1, attention_dropout=0.1)  # recompute must replay the same dropout masks
FULL_UNIFORM = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
FULL_BLOCK = dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
SELECTIVE = dict(recompute_granularity="selective")


def _count_calls(module, counts):
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from nemo_kd.models.layer_spec import SDPACoreAttention

    handles = []
    for m in module.modules():
        if isinstance(m, TransformerLayer):
            handles.append(m.register_forward_pre_hook(lambda *_: counts.__setitem__("layer", counts["layer"] + 1)))
            norm = m.input_layernorm

            def record(_, args):
                counts["norm_positions"].add(args[0].shape[0])

            handles.append(norm.register_forward_pre_hook(record))
        if isinstance(m, SDPACoreAttention):
            handles.append(m.register_forward_pre_hook(lambda *_: counts.__setitem__("attn", counts["attn"] + 1)))
    return handles


def _grads(module):
    """Every parameter's reduced gradient, keyed by its place in the whole model (``layer<global index>.``
    for a transformer layer's, the module path without a chunk index for the rest): the same keys for any
    pipeline / virtual-stage layout."""
    from megatron.core.transformer.transformer_layer import TransformerLayer

    layer_key = {}
    for m in module.modules():
        if isinstance(m, TransformerLayer):
            for n, p in m.named_parameters():
                layer_key[id(p)] = f"layer{m.layer_number - 1}.{n}"
    return {layer_key.get(id(p), n.split(".", 1)[1] if n[0].isdigit() else n): p.main_grad.detach().clone().numpy()
            for n, p in module.named_parameters()}


def _full_weights(student_cfg, online):
    """Full (TP=1, PP=1) weights, built alike on every rank (same seed, pipeline rank 0)."""
    from nemo_kd.models import build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(seed=5))
    try:
        out = {"student": build_gpt_model(student_cfg).state_dict()}
        if online:
            out["teacher"] = build_gpt_model(_teacher_cfg(student_cfg)).state_dict()
        return {k: {n: v.detach().clone() for n, v in sd.items() if torch.is_tensor(v)} for k, sd in out.items()}
    finally:
        destroy_parallel()


def _teacher_cfg(student_cfg):
    return replace(te._teacher_cfg(), num_layers=student_cfg.num_layers)  # splits over the student's layout


def _load(chunks, full, cfg):
    from nemo_kd.parallel import state

    vpp = state.config().virtual_pipeline_model_parallel_size
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state_dict=shard_for(full, cfg, i if vpp else None, vpp), strict=False)


def shard_for(full, cfg, vp_stage, vpp):
    from nemo_kd.models import shard_state_dict
    from nemo_kd.parallel import state

    return shard_state_dict(full, cfg, state.tp_rank(), state.tp_size(), state.pp_rank(), state.pp_size(),
                            vp_stage, vpp)


def _variants(rank, world, variants, arch=None):
    """Each variant ``(name, parallel kwargs, student overrides, loss overrides, online)`` trained from the
    same full weights (sharded for its layout); returns per variant: per-step (loss, grad_norm, grads),
    the call counts, the parameters marked for sequence parallelism."""
    from nemo_kd.convert.checkpoint_io import build_model_chunks
    from nemo_kd.models.engine import DistillationEngine
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    base_cfg = replace(te._cfgs()[0], **(arch or {}))
    full = _full_weights(base_cfg, any(v[4] for v in variants))
    out = {}
    for name, par, student, loss, online in variants:
        _, loss_cfg, optim_cfg, batch_cfg = te._cfgs()
        model_cfg, loss_cfg = replace(base_cfg, **student), replace(loss_cfg, **loss)
        initialize_parallel(ParallelConfig(seed=5, **par))
        try:
            teacher_cfg = teacher = None
            if online:
                teacher_cfg = _teacher_cfg(base_cfg)
                teacher = build_model_chunks(teacher_cfg)
                _load(teacher, full["teacher"], teacher_cfg)
            engine = DistillationEngine(model_cfg, loss_cfg, optim_cfg, batch_cfg, max_steps=STEPS,
                                        teacher_cfg=teacher_cfg, teacher_model=teacher)
            _load(engine.chunks, full["student"], model_cfg)
            counts = {"layer": 0, "attn": 0, "norm_positions": set()}
            handles = _count_calls(engine.module, counts)
            steps = []
            for s in range(STEPS):
                mbs = te._microbatches(s)
                if online:
                    mbs = [{k: v for k, v in mb.items() if not k.startswith("teacher_")} for mb in mbs]
                m = engine.train_step(mbs)
                steps.append((m["loss"], m["grad_norm"], _grads(engine.module)))
            for h in handles:
                h.remove()
            marked = sorted(n for n, p in engine.module.named_parameters() if getattr(p, "sequence_parallel", False))
            out[name] = dict(steps=steps, counts=counts, sp_marked=marked, chunks=len(engine.chunks))
        finally:
            destroy_parallel()
    return out


def _max_diffs(a, b):
    dloss = max(abs(x[0] - y[0]) for x, y in zip(a["steps"], b["steps"]))
    dnorm = max(abs(x[1] - y[1]) for x, y in zip(a["steps"], b["steps"]))
    dgrad = max(float(abs(x[2][k] - y[2][k]).max()) for x, y in zip(a["steps"], b["steps"]) for k in x[2])
    scale = max(float(abs(g).max()) for x in b["steps"] for g in x[2].values())
    return dloss, dnorm, dgrad, scale


def _assert_same(runs, name, base, label):
    dloss, dnorm, dgrad, scale = _max_diffs(runs[name], runs[base])
    print(f"{label} {name} vs {base}: max|dloss|={dloss:.2e} max|dgrad_norm|={dnorm:.2e} "
          f"max|dgrad|={dgrad:.2e} (max|grad| {scale:.2e})")
    assert runs[name]["steps"][0][2].keys() == runs[base]["steps"][0][2].keys()
    assert dloss < 1e-5 and dnorm < 1e-5, (name, dloss, dnorm)
    assert dgrad < 1e-5 * max(1.0, scale), (name, dgrad)
    losses = [s[0] for s in runs[base]["steps"]]
    assert len(set(losses)) == STEPS  # the steps train: each loss is another number


def _check_recompute_ran(runs, suffix=""):
    micro = STEPS * te.GBS // te.MICRO  # microbatches with a backward
    layers = te._cfgs()[0].num_layers
    assert runs["off" + suffix]["counts"]["layer"] == layers * micro
    assert runs["full_uniform" + suffix]["counts"]["layer"] == 2 * layers * micro  # every layer again in backward
    assert runs["full_block" + suffix]["counts"]["layer"] == (layers + 1) * micro  # the first layer only
    assert runs["selective" + suffix]["counts"]["layer"] == layers * micro
    assert runs["selective" + suffix]["counts"]["attn"] == 2 * layers * micro  # core attention again
    assert runs["off" + suffix]["counts"]["attn"] == layers * micro


def _recompute_variants(par, suffix=""):
    return [("off" + suffix, par, DROPOUT, {}, False),
            ("selective" + suffix, par, dict(DROPOUT, **SELECTIVE), {}, False),
            ("full_uniform" + suffix, par, dict(DROPOUT, **FULL_UNIFORM), {}, False),
            ("full_block" + suffix, par, dict(DROPOUT, **FULL_BLOCK), {}, False)]


def test_recompute_equals_no_recompute_tp1():
    """TP=1 (one process): selective, full/uniform and full/block recompute, with dropout, == off."""
    runs = run_distributed(_variants, 1, _recompute_variants({}))[0]
    _check_recompute_ran(runs)
    for name in ("selective", "full_uniform", "full_block"):
        _assert_same(runs, name, "off", "TP=1")


@pytest.mark.distributed
def test_tp2_recompute_and_sequence_parallel_equal_plain_tp2():
    """TP=2 over gloo, one spawn: recompute on == off (dropout on); sequence parallelism on == off with the
    materialised logits, with full recompute, and with an online teacher and the deferred output projection
    of both models (dropout off: SP draws dropout masks from another generator, as Megatron does)."""
    tp2, sp = dict(tensor_model_parallel_size=2), dict(tensor_model_parallel_size=2, sequence_parallel=True)
    deferred = dict(fuse_output_layer=True, output_layer_chunk_tokens=8)
    variants = _recompute_variants(tp2, "_tp2") + [
        ("tp2", tp2, {}, {}, False),
        ("sp", sp, {}, {}, False),
        ("sp_full_recompute", sp, dict(recompute_granularity="full", recompute_method="uniform",
                                      recompute_num_layers=2), {}, False),
        ("tp2_online_deferred", tp2, {}, deferred, True),
        ("sp_online_deferred", sp, {}, deferred, True),
    ]
    runs = run_distributed(_variants, 2, variants)
    for rank, rank_runs in enumerate(runs):
        _check_recompute_ran(rank_runs, "_tp2")
        for name in ("selective", "full_uniform", "full_block"):
            _assert_same(rank_runs, f"{name}_tp2", "off_tp2", f"TP=2 rank {rank}")
        _assert_same(rank_runs, "sp", "tp2", f"TP=2 rank {rank}")
        _assert_same(rank_runs, "sp_full_recompute", "tp2", f"TP=2 rank {rank}")
        _assert_same(rank_runs, "sp_online_deferred", "tp2_online_deferred", f"TP=2 rank {rank}")
        # the recompute runs draw dropout masks (other losses than without dropout), which recompute replays
        assert all(abs(a[0] - b[0]) > 1e-4 for a, b in zip(rank_runs["off_tp2"]["steps"], rank_runs["tp2"]["steps"]))
        # SP really split the sequence: the norms saw SEQ / TP positions (SEQ without SP) ...
        assert rank_runs["sp"]["counts"]["norm_positions"] == {te.SEQ // 2}
        assert rank_runs["tp2"]["counts"]["norm_positions"] == {te.SEQ}
        # ... and every norm weight is marked for finalize_model_grads' all-reduce over TP
        marked = rank_runs["sp"]["sp_marked"]
        assert len(marked) == 2 * te._cfgs()[0].num_layers + 1 and all("layernorm" in n for n in marked), marked
        assert any("final_layernorm" in n for n in marked) and rank_runs["tp2"]["sp_marked"] == []


def _merged(rank_runs, name):
    """The per-step gradients of all ranks in one dict (each rank holds its stages' layers)."""
    steps = []
    for i in range(STEPS):
        grads = {}
        for r in rank_runs:
            grads.update(r[name]["steps"][i][2])
        steps.append((rank_runs[0][name]["steps"][i][0], rank_runs[0][name]["steps"][i][1], grads))
    return {"steps": steps}


@pytest.mark.distributed
def test_virtual_pipeline_stages_equal_plain_pipeline():
    """PP=2 with VPP=2 (4 layers: rank 0 holds layers 0 and 2, rank 1 layers 1 and 3; Megatron's interleaved
    schedule) == PP=2 (layers 0-1 | 2-3), step by step: offline top-k KD + SFT, and an online teacher (chunked
    alike) with the deferred output projection of both models."""
    pp2, vpp2 = dict(pipeline_model_parallel_size=2), dict(pipeline_model_parallel_size=2,
                                                           virtual_pipeline_model_parallel_size=2)
    deferred = dict(fuse_output_layer=True, output_layer_chunk_tokens=8)
    variants = [("pp2", pp2, {}, {}, False), ("vpp2", vpp2, {}, {}, False),
                ("pp2_online_deferred", pp2, {}, deferred, True), ("vpp2_online_deferred", vpp2, {}, deferred, True)]
    runs = run_distributed(_variants, 2, variants, dict(num_layers=4))
    merged = {name: _merged(runs, name) for name, *_ in variants}
    assert len(merged["pp2"]["steps"][0][2]) == 4 * 6 + 3  # every layer's 6 tensors, embedding, final norm, output
    _assert_same(merged, "vpp2", "pp2", "PP=2")
    _assert_same(merged, "vpp2_online_deferred", "pp2_online_deferred", "PP=2")
    # the interleaved layout really ran: each rank ran two chunks of one layer each (4 layers per step per
    # microbatch over the two ranks, as without VPP)
    micro = STEPS * te.GBS // te.MICRO
    for r in runs:
        assert (r["vpp2"]["chunks"], r["pp2"]["chunks"]) == (2, 1)
        assert r["vpp2"]["counts"]["layer"] == r["pp2"]["counts"]["layer"] == 2 * micro


def _vpp_checkpoint(rank, world, tmp):
    """PP=2 + VPP=2: one step, a training checkpoint, then two more steps three ways: on in the same engine,
    in a fresh VPP engine resumed from the checkpoint, in a fresh PP=2 engine (no VPP) resumed from it."""
    from nemo_kd.models.checkpointing import load_training_checkpoint, save_training_checkpoint
    from nemo_kd.models.engine import DistillationEngine
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    model_cfg, loss_cfg, optim_cfg, batch_cfg = te._cfgs()
    model_cfg = replace(model_cfg, num_layers=4)
    path, second = os.path.join(tmp, "ckpt"), {}
    for name, vpp, resume in [("uninterrupted", 2, False), ("resumed_vpp", 2, True), ("resumed_pp", None, True)]:
        initialize_parallel(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp,
                                           seed=5))
        try:
            engine = DistillationEngine(model_cfg, loss_cfg, optim_cfg, batch_cfg, max_steps=2)
            if resume:
                load_training_checkpoint(engine, path)
            else:
                engine.train_step(te._microbatches(0))
                save_training_checkpoint(engine, path)
            # two steps after the checkpoint: the second one's loss depends on the restored Adam moments
            after = [engine.train_step(te._microbatches(s)) for s in (1, 2)]
            second[name] = ([m["loss"] for m in after], [m["grad_norm"] for m in after], len(engine.chunks))
        finally:
            destroy_parallel()
    return second


@pytest.mark.distributed
def test_virtual_pipeline_training_checkpoints_resume_with_and_without_virtual_stages(tmp_path):
    second = run_distributed(_vpp_checkpoint, 2, str(tmp_path))[0]
    ref = second["uninterrupted"]
    assert ref[2] == second["resumed_vpp"][2] == 2 and second["resumed_pp"][2] == 1
    for name in ("resumed_vpp", "resumed_pp"):
        losses, norms, _ = second[name]
        dloss = max(abs(a - b) for a, b in zip(losses, ref[0]))
        dnorm = max(abs(a - b) for a, b in zip(norms, ref[1]))
        print(f"{name}: max|dloss|={dloss:.2e} max|dgrad_norm|={dnorm:.2e}")
        assert dloss < 1e-6 and dnorm < 1e-6, (name, second[name], ref)


# ------------------------------------------------------------------ settings refused at construction
def test_recompute_settings_refused_with_their_names():
    from nemo_kd.models import GPTModelConfig

    arch = dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=256)
    for bad, match in [
        (dict(recompute_granularity="everything"), r"recompute_granularity must be one of \['selective', 'full'\]"),
        (dict(recompute_granularity="full"), "recompute_granularity=full needs recompute_method"),
        (dict(recompute_granularity="full", recompute_method="uniform"), "needs recompute_num_layers"),
        (dict(recompute_granularity="full", recompute_method="sideways", recompute_num_layers=1),
         r"recompute_method must be one of \['uniform', 'block'\]"),
        (dict(recompute_granularity="selective", recompute_num_layers=2), "recompute_num_layers .2. must be null"),
        (dict(recompute_method="block", recompute_num_layers=1), "recompute_granularity is not"),
    ]:
        with pytest.raises(ValueError, match=match):
            GPTModelConfig(**arch, **bad)
    uniform3 = GPTModelConfig(**arch, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=3)
    with pytest.raises(ValueError, match=r"recompute_num_layers \(3\) must divide the layers per pipeline stage \(4"):
        uniform3.validate_parallel(1, 1)
    block3 = GPTModelConfig(**arch, recompute_granularity="full", recompute_method="block", recompute_num_layers=3)
    block3.validate_parallel(1, 1)
    with pytest.raises(ValueError, match=r"block: recompute_num_layers \(3\) must be at most the layers per pipeline "
                                         r"stage \(2 = num_layers 4 / 2\)"):
        block3.validate_parallel(1, 2)
    assert GPTModelConfig(**arch, **SELECTIVE).without_recompute().recompute_granularity is None


def test_layout_refusals_name_the_key():
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.parallel import ParallelConfig

    arch = GPTModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=256)
    with pytest.raises(ValueError, match=r"sequence_parallel=true .* needs tensor_model_parallel_size >= 2, got 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ValueError, match=r"context_parallel_size=2 needs transformer_impl=transformer_engine"):
        arch.validate_layout(ParallelConfig(context_parallel_size=2))
    with pytest.raises(ValueError, match=r"context_parallel_size=2 cuts every row in 2 x 2 chunks: the row length "
                                         r"\(max_seq_length=14\) must be divisible by 4"):  # test_context_parallel: the rest
        replace(arch, transformer_impl="transformer_engine").validate_layout(ParallelConfig(context_parallel_size=2),
                                                                             seq_length=14)
    sp = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    arch.validate_layout(sp, seq_length=12)
    with pytest.raises(ValueError, match=r"max_seq_length=13\) must be divisible by tensor_model_parallel_size \(2\)"):
        arch.validate_layout(sp, seq_length=13)
    with pytest.raises(ValueError, match=r"num_layers \(4\) must be divisible by pipeline_model_parallel_size \(2\) "
                                         r"\* virtual_pipeline_model_parallel_size \(3\)"):
        arch.validate_layout(ParallelConfig(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3))


def test_interleaving_needs_microbatches_in_groups_of_pp():
    from nemo_kd.models.engine import check_interleaving

    check_interleaving(4, 2, 2)
    check_interleaving(3, 2, None)  # no virtual stages: any count
    with pytest.raises(ValueError, match=r"microbatches per step .* = 3\) to be a multiple of pipeline_model_parallel"):
        check_interleaving(3, 2, 2)


def test_run_config_accepts_the_scale_keys():
    """The strict checker knows the new keys (they come from the dataclasses) and still refuses typos."""
    from omegaconf import OmegaConf

    from nemo_kd.config_keys import UnknownConfigKeyError
    from nemo_kd.training.run_config import check_model_config

    good = dict(student=dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1),
                parallel=dict(tensor_model_parallel_size=2, sequence_parallel=True))
    check_model_config(OmegaConf.create(good))
    with pytest.raises(UnknownConfigKeyError, match="did you mean 'sequence_parallel'"):
        check_model_config(OmegaConf.create(dict(parallel=dict(sequence_paralel=True))))


def test_cpu_shim_patches_only_the_tp_linear_backward_for_sequence_parallel():
    import importlib

    from nemo_kd.parallel import cpu_shim

    patched = cpu_shim.install_cpu_shim()
    layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    name = "megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication.backward"
    assert patched.count(name) == 1 and "megatron.core.tensor_parallel.layers.torch" not in patched
    assert layers.torch is torch  # the CPU view only inside that backward


def test_the_nemo_model_refuses_bad_scale_settings_before_building_anything():
    """GPTDistillationModel checks the layout before the parallel state or any model exists."""
    from omegaconf import OmegaConf

    from nemo_kd.models.distillation_model import GPTDistillationModel

    def cfg(**over):
        c = OmegaConf.create(dict(
            student=dict(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=256, max_position_embeddings=64),
            teacher=dict(mode="none"), kd=dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
            data=dict(train_ds=dict(max_seq_length=32))))
        for key, value in over.items():
            OmegaConf.update(c, key, value, merge=False)
        return c

    for over, match in [
        ({"parallel": {"sequence_parallel": True}}, "needs tensor_model_parallel_size >= 2"),
        ({"parallel": {"tensor_model_parallel_size": 2, "sequence_parallel": True}, "data.train_ds.max_seq_length": 31},
         r"max_seq_length=31\) must be divisible by tensor_model_parallel_size \(2\)"),
        ({"parallel": {"context_parallel_size": 2}}, "context_parallel_size=2 needs transformer_impl=transformer_engine"),
        ({"parallel": {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 3}},
         r"num_layers \(4\) must be divisible by pipeline_model_parallel_size \(2\) \* virtual"),
        ({"student.recompute_granularity": "full"}, "recompute_granularity=full needs recompute_method"),
        ({"teacher": {"mode": "online", "checkpoint": "/nonexistent", "model": {"recompute_granularity": "full"}}},
         "teacher.model.recompute_.*forward-only under no_grad"),
    ]:
        with pytest.raises(ValueError, match=match):
            GPTDistillationModel(cfg(**over))


def test_recompute_is_no_architecture_for_checkpoints(tmp_path):
    """A training checkpoint saved without recompute resumes with it (and one saved before the recompute
    keys existed resumes too): the same weights come back; another architecture is still refused."""
    from dist_utils import WorldOfOne

    from nemo_kd.models.checkpointing import (COMMON_FILE, CheckpointLayoutError, load_training_checkpoint,
                                              save_training_checkpoint)
    from nemo_kd.models.engine import DistillationEngine

    model_cfg, loss_cfg, optim_cfg, batch_cfg = te._cfgs()
    path = str(tmp_path / "ckpt")
    with WorldOfOne():
        engine = DistillationEngine(model_cfg, loss_cfg, optim_cfg, batch_cfg, max_steps=2)
        engine.train_step(te._microbatches(0))
        save_training_checkpoint(engine, path)
        saved = {k: v.clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
        common_file = str(tmp_path / "ckpt" / COMMON_FILE)
        common = torch.load(common_file, weights_only=True)
        for key in ("recompute_granularity", "recompute_method", "recompute_num_layers"):
            del common["student"][key]  # as written before the keys existed
        torch.save(common, common_file)
        for cfg in (replace(model_cfg, **FULL_UNIFORM), model_cfg):
            resumed = DistillationEngine(cfg, loss_cfg, optim_cfg, batch_cfg, max_steps=2)
            load_training_checkpoint(resumed, path)
            for k, v in resumed.module.state_dict().items():
                if torch.is_tensor(v):
                    assert torch.equal(v, saved[k]), k
        other = DistillationEngine(replace(model_cfg, ffn_hidden_size=96), loss_cfg, optim_cfg, batch_cfg, max_steps=2)
        with pytest.raises(CheckpointLayoutError, match=r"another student architecture \(differs in \['ffn_hidden_size'\]"):
            load_training_checkpoint(other, path)
