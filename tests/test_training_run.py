"""The training recipe as users run it (``examples/train_gpt_kd.py`` on ``conf/gpt_kd.yaml``):
strict config checks (unknown keys, NeMo-Aligner keys, precision conflicts), checkpoints without
validation, and a preemption signal -> checkpoint -> resume that ends bit-identical to an
uninterrupted run. The Slurm side of preemption (sbatch, requeue) is tests/test_slurm.py.
"""

import glob
import importlib.util
import io
import os
import signal
import tarfile

import pytest
import torch

from test_distillation_model import MAX_LEN, world  # noqa: F401  (the module-scoped assets fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compose(overrides, config_name="gpt_kd"):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def _prepare(overrides, **kw):
    from nemo_kd.training.run_config import prepare_run_config

    cfg = _compose(overrides)
    return cfg, prepare_run_config(cfg, **kw)


REQUIRED = ["model.data.train_ds.file_path=x.jsonl", "model.data.train_ds.logits_store=store",
            "model.data.train_ds.tokenizer=tok"]


# ---------------------------------------------------------------- strict configs


@pytest.mark.parametrize("override, expected", [
    # NeMo-Aligner keys at their old places: refused, naming the nemo_kd key
    ("+model.tensor_model_parallel_size=2", "model.parallel.tensor_model_parallel_size"),
    ("+model.knowledge_distillation.kd_loss=bwd_kl", "model.kd.kd_loss_type"),
    # typos: refused with the closest valid key
    ("+model.kd.kd_loss_wieght=2", "did you mean 'kd_loss_weight'"),
    ("+model.optim.learning_rate=1e-3", "model.optim"),
    ("+model.data.train_ds.max_seq_len=64", "did you mean 'max_seq_length'"),
    ("+model.student.num_layer=2", "did you mean 'num_layers'"),
    ("+model.parallel.tensor_parallel_size=2", "did you mean 'tensor_model_parallel_size'"),
    ("+trainer.max_step=5", "did you mean 'max_steps'"),
    ("+exp_manager.resume_if_exist=true", "did you mean 'resume_if_exists'"),
    ("+exp_manager.checkpoint_callback_params.every_n_train_step=5", "did you mean 'every_n_train_steps'"),
    ("+model.teacher.checkpoint_path=/t", "did you mean 'checkpoint'"),
    ("+modle.kd.kd_loss_weight=1", "did you mean 'model'"),
])
def test_unknown_and_aligner_keys_are_refused(override, expected):
    from nemo_kd.config_keys import UnknownConfigKeyError

    with pytest.raises(UnknownConfigKeyError) as err:
        _prepare(REQUIRED + [override])
    assert expected in str(err.value), str(err.value)


def test_precision_is_one_setting():
    cfg, run = _prepare(REQUIRED + ["trainer.precision=bf16-mixed"], cuda_available=False)
    assert run.params_dtype == "bf16" and cfg.model.student.params_dtype == "bf16"
    assert cfg.trainer.precision == "32-true"  # Megatron does the mixed precision, Lightning does not cast again
    assert cfg.model.precision == "bf16-mixed"
    _, run = _prepare(REQUIRED + ["trainer.precision=16-mixed"], cuda_available=False)
    assert run.params_dtype == "fp16"
    # auto: bf16 on a GPU with bf16, fp32 on CPU
    cfg, run = _prepare(REQUIRED, cuda_available=False)
    assert (run.accelerator, run.params_dtype, cfg.trainer.accelerator) == ("cpu", "fp32", "cpu")
    _, run = _prepare(REQUIRED, cuda_available=True, cuda_bf16=True)
    assert (run.accelerator, run.params_dtype) == ("gpu", "bf16")
    with pytest.raises(ValueError, match="model.precision='16-mixed' conflicts with trainer.precision"):
        _prepare(REQUIRED + ["trainer.precision=bf16-mixed", "+model.precision=16-mixed"], cuda_available=False)
    _prepare(REQUIRED + ["trainer.precision=bf16-mixed", "+model.precision=bf16"], cuda_available=False)  # agrees
    with pytest.raises(ValueError, match="model.student.params_dtype='bf16' conflicts with trainer.precision"):
        _prepare(REQUIRED + ["trainer.precision=32", "+model.student.params_dtype=bf16"], cuda_available=False)
    with pytest.raises(ValueError, match="bf16-true.*not supported"):
        _prepare(REQUIRED + ["trainer.precision=bf16-true"], cuda_available=False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        _prepare(REQUIRED + ["trainer.accelerator=gpu"], cuda_available=False)


def test_checkpointing_follows_validation():
    cfg, run = _prepare(REQUIRED)
    params = cfg.exp_manager.checkpoint_callback_params
    assert not run.validation and cfg.model.data.validation_ds is None
    assert (params.monitor, params.mode, params.filename, params.every_n_epochs) == ("step", "max", "gpt_kd--{step}",
                                                                                     None)
    assert cfg.trainer.val_check_interval == params.every_n_train_steps == 100
    assert cfg.exp_manager.create_preemption_callback is False
    # validation without `+`: the keys exist in conf/gpt_kd.yaml
    cfg, run = _prepare(REQUIRED + ["model.data.validation_ds.file_path=val.jsonl",
                                    "model.data.validation_ds.logits_store=val_store"])
    params = cfg.exp_manager.checkpoint_callback_params
    assert run.validation and (params.monitor, params.mode) == ("val_loss", "min")
    assert params.filename == "gpt_kd--{val_loss:.4f}-{step}"
    # saved after each validation (every_n_train_steps steps unless val_check_interval says otherwise)
    assert (params.every_n_train_steps, params.every_n_epochs, cfg.trainer.val_check_interval) == (None, 1, 100)
    assert cfg.model.data.validation_ds.tokenizer == "tok"  # follows train_ds
    with pytest.raises(ValueError, match="no validation set"):
        _prepare(REQUIRED + ["exp_manager.checkpoint_callback_params.monitor=val_loss"])


# ---------------------------------------------------------------- the recipe, run


def _recipe():
    spec = importlib.util.spec_from_file_location("train_gpt_kd", os.path.join(ROOT, "examples", "train_gpt_kd.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _run_cfg(world, log_dir, steps, every, resume=False):  # noqa: F811
    arch = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                vocab_size=world["vocab"], max_position_embeddings=64)
    return _compose([
        f"model.data.train_ds.file_path={world['data']}", f"model.data.train_ds.logits_store={world['store']}",
        f"model.data.train_ds.tokenizer={world['tok_dir']}", f"model.data.train_ds.max_seq_length={MAX_LEN}",
        "model.data.train_ds.micro_batch_size=2", "model.data.train_ds.global_batch_size=4",
        "model.kd.topk_convention=exact_tail", "model.kd.sft_loss_weight=0.5", "model.optim.lr=1e-2",
        "model.optim.warmup_steps=1", "model.parallel.seed=7",
        *[f"model.student.{k}={v}" for k, v in arch.items()],
        f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false",
        f"exp_manager.explicit_log_dir={log_dir}", "exp_manager.create_tensorboard_logger=false",
        f"exp_manager.checkpoint_callback_params.every_n_train_steps={every}",
        f"exp_manager.resume_if_exists={str(resume).lower()}",
    ])


def _as_a_new_process():
    """Each run of the recipe starts from its seed, as a new process would (the parallel state is shared here)."""
    from nemo_kd.parallel.state import seed_model_parallel_rng

    seed_model_parallel_rng(7)


def _nemo_weights(path):
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("model_weights.ckpt"))
        return torch.load(io.BytesIO(tar.extractfile(member).read()), map_location="cpu", weights_only=True)


def _checkpoint_step(path):
    common = torch.load(os.path.join(path, "common.pt"), map_location="cpu", weights_only=True)
    return common["extra"]["global_step"]


def test_checkpoints_without_validation_then_preempt_and_resume_bit_identical(world, tmp_path, monkeypatch):  # noqa: F811
    from nemo_kd.training.preemption import PreemptionCheckpoint

    main = _recipe()
    # Uninterrupted: 8 steps, a checkpoint every 3 and at the end (8 is no multiple of 3), no validation set.
    full = tmp_path / "full"
    _as_a_new_process()
    main(_run_cfg(world, full, steps=8, every=3))
    names = sorted(os.path.basename(p) for p in glob.glob(str(full / "checkpoints" / "*.ckpt")))
    assert names == ["gpt_kd--step=3.ckpt", "gpt_kd--step=6.ckpt", "gpt_kd--step=8-last.ckpt"], names
    assert _checkpoint_step(str(full / "checkpoints" / "gpt_kd--step=8-last.ckpt")) == 8
    reference = _nemo_weights(str(full / "student.nemo"))

    # Preempted: a real SIGUSR1 to this process before step 4 -> that step finishes, the -last
    # checkpoint is written at step 4, the fit stops, no student.nemo.
    def raise_signal(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(PreemptionCheckpoint, "on_train_batch_start", raise_signal, raising=False)
    part = tmp_path / "part"
    _as_a_new_process()
    main(_run_cfg(world, part, steps=8, every=3))
    assert not (part / "student.nemo").exists()
    last = glob.glob(str(part / "checkpoints" / "*-last.ckpt"))
    assert [os.path.basename(p) for p in last] == ["gpt_kd--step=4-last.ckpt"]
    assert _checkpoint_step(last[0]) == 4
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handler is released after the fit
    monkeypatch.undo()

    # The same command with resume_if_exists: continues at step 4 and ends where the uninterrupted run did.
    _as_a_new_process()
    main(_run_cfg(world, part, steps=8, every=3, resume=True))
    resumed = _nemo_weights(str(part / "student.nemo"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():
        if torch.is_tensor(value):
            assert torch.equal(resumed[key], value), key


def test_every_sample_that_does_not_train_is_named(world, tmp_path, caplog):  # noqa: F811
    """skip_bad_samples and overlong=drop: a bad line, an over-long sample and one whose prompt alone is over
    max_seq_length are each named (file:line, sample, reason) in the log and in dropped.jsonl of the run, the
    first step's metrics count them, and lines in = samples trained + named drops."""
    import json

    lines = open(world["data"]).read().splitlines()
    lines.insert(2, '{"prompt": "a bad line", "response": 7}')
    lines.append(json.dumps({"id": "long", "prompt": "what is 1 plus 3?", "response": " plus" * 3 * MAX_LEN}))
    lines.append(json.dumps({"id": "long-prompt", "prompt": " plus" * 3 * MAX_LEN, "response": "4"}))
    data = tmp_path / "with_drops.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = _run_cfg(world, tmp_path / "run", steps=1, every=1)
    cfg.model.teacher.mode = "none"  # SFT only: no store for this file
    cfg.model.kd.kd_loss_weight = 0.0
    cfg.model.data.train_ds.logits_store = None
    cfg.model.data.train_ds.file_path = str(data)
    cfg.model.data.train_ds.skip_bad_samples = True
    cfg.model.data.train_ds.overlong = "drop"
    seen = {}

    from nemo_kd.models.distillation_model import GPTDistillationModel

    original = GPTDistillationModel.training_step

    def recording(self, batch, batch_idx):
        out = original(self, batch, batch_idx)
        seen.update({k: float(v) for k, v in self.trainer.callback_metrics.items()})
        seen["trained"] = len(self._train_dl.dataset.dataset)
        return out

    GPTDistillationModel.training_step = recording
    try:
        _as_a_new_process()
        _recipe()(cfg)
    finally:
        GPTDistillationModel.training_step = original
    drops = [json.loads(line) for line in (tmp_path / "run" / "dropped.jsonl").read_text().splitlines()]
    n = len(lines)
    import re

    assert [(d["line"], d.get("id")) for d in drops] == [(3, None), (n - 1, "long"), (n, "long-prompt")]
    assert drops[0]["reason"] == "wrong type for field 'response': expected string, got int"
    long, long_prompt = (re.fullmatch(rf"(\d+) tokens > max_seq_length={MAX_LEN} \(overlong=drop\)", drops[1]["reason"]),
                         re.fullmatch(rf"the prompt alone is (\d+) tokens, max_seq_length={MAX_LEN}", drops[2]["reason"]))
    assert long and int(long.group(1)) > MAX_LEN and long_prompt and int(long_prompt.group(1)) > MAX_LEN, drops
    assert [d["sample"] for d in drops[1:]] == [n - 3, n - 2]  # indices among the valid records (the bad line is none)
    assert all(d["file"] == str(data) and d["split"] == "train" for d in drops)
    assert f"{data}: 3 of {n} samples will not train: {data}:3: wrong type" in caplog.text
    assert f"(all listed in {tmp_path / 'run' / 'dropped.jsonl'})" in caplog.text
    assert seen["dropped_samples"] == 3.0
    assert seen["trained"] + len(drops) == n  # every line: trained or named
