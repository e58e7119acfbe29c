"""GPTDistillationModel with virtual pipeline stages (PP=2 x VPP=2, 4 layers: rank 0 holds layers 0 and 2,
rank 1 layers 1 and 3) under Lightning, 2 CPU processes over gloo, against the same model at PP=2 without them
(layers 0-1 | 2-3), both started from the same full weights:

* the fit: every step's loss, the validation loss and the final weights (the .nemo files, tensor by tensor);
* the .nemo holds the full student under global layer numbers (the PP=2 run's keys), restores at PP=1 in one
  process to the VPP run's logits, at VPP into the same process to identical logits, and starts a VPP student
  (``student_init``);
* a Lightning checkpoint saved at step 2 of the VPP run resumes to the uninterrupted run's losses of steps 3-4;
* an online teacher runs chunked like the student (the same losses as at PP=2);
* what cannot run with model chunks is refused at construction, by name: a validation batch of fewer
  microbatches than the interleaved schedule needs, a teacher whose layers do not split into the chunks,
  on-policy sampling (PP=1 only).

Data and helpers: tests/test_distillation_model.py (tokenizer, 16 samples, the teacher's top-k store).
"""

import os

import pytest
import torch

from test_distillation_model import _arch, _cfg, _trainer, world  # noqa: F401  (world: the module's data fixture)

STEPS = 4
PP2 = {"student.num_layers": 4, "parallel.pipeline_model_parallel_size": 2, "max_steps": STEPS}
VPP2 = {**PP2, "parallel.virtual_pipeline_model_parallel_size": 2}


def _load_full(model, full):
    """Every chunk of ``model`` gets its shard of the full (TP=1, PP=1) weights."""
    from nemo_kd.models import GPTModelConfig, shard_state_dict
    from nemo_kd.parallel import state

    cfg = GPTModelConfig.from_dict(dict(model.cfg.student))
    vpp = state.config().virtual_pipeline_model_parallel_size
    for i, chunk in enumerate(model.engine.chunks):
        chunk.load_state_dict(shard_state_dict(full, cfg, state.tp_rank(), state.tp_size(), state.pp_rank(),
                                               state.pp_size(), i if vpp else None, vpp), strict=False)


def _fit(world, tmp, over, steps, init=None, checkpoint_dir=None, resume=None):
    import lightning.pytorch as pl

    from nemo_kd.models.distillation_model import GPTDistillationModel

    callbacks = [pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=2, save_top_k=-1)] \
        if checkpoint_dir else []
    trainer, rec = _trainer(tmp, steps, callbacks, devices=2)
    model = GPTDistillationModel(_cfg(world, **over), trainer=trainer)
    if init is not None:
        _load_full(model, init)
    trainer.fit(model, ckpt_path=resume)
    assert trainer.global_step == steps
    if "val_loss" in trainer.callback_metrics:  # validated after the last step
        rec.rows[-1]["val_loss"] = float(trainer.callback_metrics["val_loss"])
    return model, rec.rows


def _runs(rank, world_size, world, tmp, init, x):
    from nemo_kd.data.kd_dataset import DataConfigError
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel import destroy_parallel

    out = {}
    # an online teacher (4 layers: chunked like the student), 2 steps at PP=2 and at PP=2 x VPP=2
    online = {"teacher": {"mode": "online", "checkpoint": os.path.join(tmp, "teacher4")},
              "data.train_ds.logits_store": None, "data.validation_ds": None}
    for name, over in (("pp2_online", PP2), ("vpp2_online", VPP2)):
        try:
            model, rows = _fit(world, os.path.join(tmp, name), {**over, **online}, 2, init)
            out[name] = dict(rows=rows, teacher_chunks=len(model.engine.teacher_chunks))
        finally:
            destroy_parallel()
    try:  # PP=2: the reference
        model, rows = _fit(world, os.path.join(tmp, "pp2"), PP2, STEPS, init)
        out["pp2"] = dict(rows=rows, logits=model(x))
        model.save_to(os.path.join(tmp, "pp2.nemo"))
    finally:
        destroy_parallel()
    try:  # PP=2 x VPP=2: a checkpoint at step 2, the .nemo at the end
        ckpt_dir = os.path.join(tmp, "ckpt")
        model, rows = _fit(world, os.path.join(tmp, "vpp2"), VPP2, STEPS, init, checkpoint_dir=ckpt_dir)
        assert len(model.engine.chunks) == 2 and isinstance(model.student, torch.nn.ModuleList)
        assert {k.split(".")[1] for k in model.state_dict()} == {"0", "1"}  # student.<chunk>.*
        logits = model(x)
        out["vpp2"] = dict(rows=rows, logits=logits)
        path = os.path.join(tmp, "vpp2.nemo")
        model.save_to(path)
        model.eval()
        # restores at this layout (VPP) to the same logits, and the PP=2 run's .nemo restores into it too
        for name in ("vpp2", "pp2"):
            restored = GPTDistillationModel.restore_from(os.path.join(tmp, f"{name}.nemo"),
                                                         map_location=torch.device("cpu"))
            restored.eval()
            assert len(restored.engine.chunks) == 2 and restored.cfg.parallel.virtual_pipeline_model_parallel_size == 2
            out[f"{name}_restored_at_vpp2"] = restored(x)
        # the PP=2 run's .nemo starts a VPP student (student_init reads it chunk by chunk)
        started = GPTDistillationModel(_cfg(world, **VPP2, **{"student_init": os.path.join(tmp, "pp2.nemo"),
                                                                "data.validation_ds": None}))
        started.eval()
        out["pp2_started_at_vpp2"] = started(x)
        # refused at construction: a validation batch of one microbatch (the interleaved schedule runs PP)
        with pytest.raises(DataConfigError, match=r"data.validation_ds: virtual_pipeline_model_parallel_size=2: "
                                                  r"Megatron's interleaved schedule needs .* = 1\) to be a multiple of "
                                                  r"pipeline_model_parallel_size \(2\)"):
            GPTDistillationModel(_cfg(world, **VPP2, **{"data.validation_ds.global_batch_size": 2}))
        # ... and an online teacher whose layers do not split into PP x VPP chunks (2 layers), named
        with pytest.raises(ValueError, match=r"teacher.checkpoint .*: num_layers \(2\) must be divisible by "
                                             r"pipeline_model_parallel_size \(2\) \* virtual_pipeline_model"):
            GPTDistillationModel(_cfg(world, **VPP2, **{**online, "teacher.checkpoint": world["teacher"]}))
        (name,) = [f for f in os.listdir(ckpt_dir) if "step=2" in f]
        out["checkpoint"] = os.path.join(ckpt_dir, name)
    finally:
        destroy_parallel()
    try:  # resumed from the VPP checkpoint of step 2
        _, rows = _fit(world, os.path.join(tmp, "resumed"), VPP2, STEPS, resume=out["checkpoint"])
        out["resumed"] = dict(rows=rows)
    finally:
        destroy_parallel()
    return out


@pytest.mark.distributed
@pytest.mark.slow
def test_virtual_pipeline_stages_fit_nemo_and_resume_like_plain_pipeline(world, tmp_path):
    from dist_utils import run_distributed

    from nemo_kd.convert.checkpoint_io import read_nemo_archive
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.teacher.teachers import save_full_checkpoint

    vocab = world["vocab"]
    init = {k: v.detach().clone() for k, v in build_gpt_model(
        GPTModelConfig(**{**_arch(vocab), "num_layers": 4})).state_dict().items() if torch.is_tensor(v)}
    teacher = dict(init, **{"output_layer.weight": init["output_layer.weight"] * 40})  # peaked, as world's
    save_full_checkpoint(str(tmp_path / "teacher4"), teacher, GPTModelConfig(**{**_arch(vocab), "num_layers": 4}))
    x = torch.randint(0, vocab, (3, 16), generator=torch.Generator().manual_seed(2))  # 3 rows: not a multiple of PP
    first, last = run_distributed(_runs, 2, world, str(tmp_path), init, x)
    # the online teacher: chunked like the student, the same losses (KD against its full logits) step by step
    assert (last["vpp2_online"]["teacher_chunks"], last["pp2_online"]["teacher_chunks"]) == (2, 1)
    for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
        got, want = [r[key] for r in last["vpp2_online"]["rows"]], [r[key] for r in last["pp2_online"]["rows"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (key, got, want)
    assert first["pp2"]["logits"] is None and first["vpp2"]["logits"] is None  # logits live on the last stage
    pp2, vpp2 = last["pp2"], last["vpp2"]

    # step by step: the losses, the validation loss (the interleaved schedule, forward only)
    for key in ("loss", "kd_loss", "sft_loss", "grad_norm"):
        got, want = [r[key] for r in vpp2["rows"]], [r[key] for r in pp2["rows"]]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), (key, got, want)
    assert vpp2["rows"][-1]["val_loss"] == pytest.approx(pp2["rows"][-1]["val_loss"], rel=1e-5)
    assert pp2["rows"][-1]["loss"] < pp2["rows"][0]["loss"]  # it trained

    # the .nemo files: the full student under global layer numbers, the same tensors as the PP=2 run's
    arch_v, nemo_v = read_nemo_archive(str(tmp_path / "vpp2.nemo"))
    arch_p, nemo_p = read_nemo_archive(str(tmp_path / "pp2.nemo"))
    assert arch_v.model == arch_p.model and sorted(nemo_v) == sorted(nemo_p) == sorted(init)
    for k in nemo_p:
        assert nemo_v[k].shape == nemo_p[k].shape, k
        torch.testing.assert_close(nemo_v[k], nemo_p[k], rtol=1e-5, atol=1e-6, msg=k)
        assert not torch.equal(nemo_v[k], init[k]) or "norm" in k, k  # trained (norm weights may stay at 1)

    # the pipeline forward (rows padded to the schedule's groups and dropped) and the restores
    torch.testing.assert_close(vpp2["logits"], pp2["logits"], rtol=1e-5, atol=1e-5)
    assert torch.equal(last["vpp2_restored_at_vpp2"], vpp2["logits"])
    torch.testing.assert_close(last["pp2_restored_at_vpp2"], pp2["logits"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(last["pp2_started_at_vpp2"], pp2["logits"], rtol=1e-6, atol=1e-6)
    restored = GPTDistillationModel.restore_from(str(tmp_path / "vpp2.nemo"), map_location=torch.device("cpu"))
    assert restored.cfg.parallel.pipeline_model_parallel_size == 1
    assert restored.cfg.parallel.virtual_pipeline_model_parallel_size is None
    restored.eval()
    with torch.no_grad():
        at_pp1 = restored(x)
    torch.testing.assert_close(at_pp1[..., :vocab], vpp2["logits"][..., :vocab], rtol=1e-5, atol=1e-5)

    # resumed from the VPP Lightning checkpoint of step 2: the uninterrupted run's steps 3-4
    got = [r["loss"] for r in last["resumed"]["rows"]]
    want = [r["loss"] for r in vpp2["rows"][2:]]

    def dloss(a, b):
        return max(abs(r["loss"] - q["loss"]) for r, q in zip(a["rows"], b["rows"]))

    print(f"VPP vs PP=2: max|dloss| {dloss(vpp2, pp2):.1e}"
          f" (online {dloss(last['vpp2_online'], last['pp2_online']):.1e}),"
          f" .nemo max|dw| {max((nemo_v[k] - nemo_p[k]).abs().max().item() for k in nemo_p):.1e},"
          f" logits at PP=1 max|d| {(at_pp1[..., :vocab] - vpp2['logits'][..., :vocab]).abs().max().item():.1e},"
          f" resumed max|dloss| {max(abs(a - b) for a, b in zip(got, want)):.1e}")
    assert got == pytest.approx(want, rel=1e-6, abs=1e-7), (got, want)


def test_on_policy_sampling_with_virtual_stages_is_refused_at_construction(world):
    from nemo_kd.models.distillation_model import GPTDistillationModel

    with pytest.raises(ValueError, match=r"on_policy sampling needs pipeline_model_parallel_size=1"):
        GPTDistillationModel(_cfg(world, **VPP2, **{"teacher": {"mode": "online", "checkpoint": world["teacher"]},
                                                    "on_policy": {"fraction": 0.5}}))


def test_bf16_student_nemo_restores(world, tmp_path):
    """A bf16 student sits in Megatron's Float16Module, whose state_dict leaves its ``module.`` out (the .nemo holds
    the GPTModel's keys, as at any layout) while torch's load_state_dict walks into it by name: the restore loads
    every tensor there (it failed on missing ``student.module.*`` keys before), and build_and_load reads the same
    .nemo (a teacher / student_init)."""
    from nemo_kd.convert.checkpoint_io import build_and_load, read_nemo_archive
    from nemo_kd.models.distillation_model import GPTDistillationModel

    cfg = _cfg(world, **{"student.params_dtype": "bf16", "teacher.mode": "none", "kd.kd_loss_weight": 0.0,
                         "data.train_ds.logits_store": None, "data.validation_ds": None})
    model = GPTDistillationModel(cfg)
    assert model._chunk_prefixes() == ["student.module."]
    path = str(tmp_path / "bf16.nemo")
    model.save_to(path)
    _, full = read_nemo_archive(path)
    want = {k: v for k, v in model.student.module.state_dict().items() if torch.is_tensor(v)}
    assert sorted(k for k, v in full.items() if torch.is_tensor(v)) == sorted(want)
    for k, v in want.items():
        assert full[k].dtype == torch.bfloat16 and torch.equal(full[k], v), k
    x = torch.randint(0, world["vocab"], (2, 12), generator=torch.Generator().manual_seed(5))
    restored = GPTDistillationModel.restore_from(path, map_location=torch.device("cpu"))
    [loaded] = build_and_load(path).model_chunks
    model.eval(), restored.eval(), loaded.eval()
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(restored(x), logits)
        assert torch.equal(loaded(x, torch.arange(12).expand(2, 12), None), logits)
