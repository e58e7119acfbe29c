"""The training run's Hydra config, checked whole and made consistent before anything is built.

``examples/train_gpt_kd.py`` calls :func:`prepare_run_config` first. It:

* refuses every key nobody reads, anywhere under ``model.``, ``trainer.`` and
  ``exp_manager.`` (and unknown top-level sections), naming the closest valid key and, for a
  NeMo-Aligner key at its old place (``model.tensor_model_parallel_size``,
  ``model.knowledge_distillation.kd_loss``), its nemo_kd name
  (:func:`nemo_kd.migrate.aligner_config.aligner_key_hint`);
* makes mixed precision ONE setting, ``trainer.precision`` (NeMo's place for it):
  ``32`` | ``bf16-mixed`` | ``16-mixed`` | ``auto`` (bf16 on a GPU that has it, else 32).
  Megatron does the mixed precision (bf16/fp16 model, fp32 main parameters, loss scaling
  for fp16: :class:`~nemo_kd.models.engine.DistillationEngine`), so the value becomes the
  student's ``params_dtype`` and Lightning runs at ``32-true`` (its own AMP would cast twice).
  A ``model.precision`` or ``model.student.params_dtype`` that says otherwise is a conflict;
* resolves ``trainer.accelerator: auto`` (GPU when CUDA is available, else CPU);
* checkpoints always, and at the end. Without validation: every
  ``exp_manager.checkpoint_callback_params.every_n_train_steps`` steps, keeping the newest
  (``monitor: step``). With validation (``model.data.validation_ds.file_path`` set): after each
  validation, every ``trainer.val_check_interval`` steps (null: ``every_n_train_steps``), ranked
  by ``val_loss``. File names carry the step (``<name>--step=120-last.ckpt``);
* turns NeMo's own preemption callback off (CUDA-only, SIGTERM on rank 0 only): the run's
  ``preemption.signals`` go to :class:`~nemo_kd.training.preemption.PreemptionCheckpoint`.

Everything here is plain config work, no model is built: errors come in seconds.
"""

from __future__ import annotations

import dataclasses
import inspect
import signal
from dataclasses import dataclass
from typing import Dict, List, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_kd.config_keys import check_keys
from nemo_kd.generation.on_policy import OnPolicyConfig
from nemo_kd.losses.objective import DistillationLossConfig
from nemo_kd.migrate.aligner_config import aligner_key_hint
from nemo_kd.models.config import GPTModelConfig, dtype_name
from nemo_kd.models.engine import OptimConfig
from nemo_kd.parallel.state import ParallelConfig
from nemo_kd.teacher.served import ServedTeacherConfig

__all__ = ["DATA_KEYS", "TEACHER_KEYS", "MODEL_KEYS", "RunSettings", "check_model_config", "prepare_run_config",
           "resolve_precision", "validation_configured"]

DATA_KEYS = frozenset({"file_path", "logits_store", "tokenizer", "prompt_format", "max_seq_length", "overlong",
                       "micro_batch_size", "global_batch_size", "seed", "shuffle", "top_k", "skip_bad_samples",
                       "split", "num_workers", "defer_setup", "verify_logits_store", "pack_sequences",
                       "pack_length", "pack_window"})
# online: checkpoint, model (its architecture), tokenizer, prompt_format, top_k; served: ServedTeacherConfig's
# keys (url, model: the server's model id, dialect, api_key_env, concurrency, timeouts, ...) and top_k
TEACHER_KEYS = frozenset({"mode", "checkpoint", "model", "tokenizer", "prompt_format", "top_k",
                          *ServedTeacherConfig.field_names()})

# The sections of ``model`` and what each holds (None: a leaf, or a free-form mapping written by
# the model itself). ``target``/``nemo_version`` are added by NeMo's ModelPT; ``tokenizer`` by the
# .nemo packing of the student's tokenizer; ``precision`` is accepted NeMo-style when it agrees.
_MODEL_SECTIONS: Dict[str, Optional[frozenset]] = {
    "student": frozenset(f.name for f in dataclasses.fields(GPTModelConfig)),
    "student_init": None, "student_hf_architecture": None,
    "teacher": TEACHER_KEYS,
    "kd": frozenset(f.name for f in dataclasses.fields(DistillationLossConfig)),
    "optim": None,  # OptimConfig's fields, read when checked (they may grow)
    "parallel": frozenset(f.name for f in dataclasses.fields(ParallelConfig)),
    "on_policy": frozenset(f.name for f in dataclasses.fields(OnPolicyConfig)),
    "data": frozenset({"train_ds", "validation_ds"}),
    "max_steps": None, "precision": None, "tokenizer": None, "target": None, "nemo_version": None,
    "moe_load_log_interval": None,
}
MODEL_KEYS = frozenset(_MODEL_SECTIONS)
# "hydra": Hydra's own settings; a recipe never sees them (Hydra takes the node), a YAML loaded without
# Hydra (a migrated config checked as a file) does.
_TOP_LEVEL = frozenset({"name", "trainer", "exp_manager", "model", "preemption", "hydra"})
_PREEMPTION_KEYS = frozenset({"signals"})

# trainer.precision -> the student's params_dtype (Megatron's mixed precision).
_PRECISIONS = {"32": "fp32", "32-true": "fp32", "bf16-mixed": "bf16", "bf16": "bf16",
               "16-mixed": "fp16", "16": "fp16"}
_PRECISION_NAMES = {"fp32": "32", "bf16": "bf16-mixed", "fp16": "16-mixed"}


def _flat_keys(mapping: dict, prefix: str) -> List[str]:
    out = []
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}"
        out.extend(_flat_keys(value, dotted) if isinstance(value, dict) else [dotted])
    return out


def _hint(section: str, values: Optional[dict] = None):
    """Hints for unknown keys of ``section``: a NeMo-Aligner key's nemo_kd name; for an unknown
    mapping (``model.knowledge_distillation``), the names of the Aligner keys inside it."""

    def hint(key: str) -> Optional[str]:
        dotted = f"{section}.{key}" if section else key
        child = (values or {}).get(key)
        inner = _flat_keys(child, dotted) if isinstance(child, dict) else []
        hints = [h for h in (aligner_key_hint(k) for k in [dotted, *inner]) if h]
        return "; ".join(hints) or None

    return hint


def _plain(node) -> dict:
    if node is None:
        return {}
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node)


def check_model_config(model: DictConfig) -> None:
    """Refuse unknown keys anywhere in the model config (``model.*``), with the closest key."""
    model = _plain(model)
    check_keys("model", model, MODEL_KEYS, _hint("model", model))
    for name, valid in _MODEL_SECTIONS.items():
        section = model.get(name)
        if name == "optim":
            valid = frozenset(f.name for f in dataclasses.fields(OptimConfig))
        if valid is None or not isinstance(section, dict):
            continue
        check_keys(f"model.{name}", section, valid, _hint(f"model.{name}", section))
    for split in ("train_ds", "validation_ds"):
        ds = (model.get("data") or {}).get(split)
        if isinstance(ds, dict):
            check_keys(f"model.data.{split}", ds, DATA_KEYS, _hint(f"model.data.{split}", ds))


def validation_configured(model: DictConfig) -> bool:
    """Validation runs when ``model.data.validation_ds.file_path`` names a dataset."""
    ds = (_plain(model).get("data") or {}).get("validation_ds") or {}
    return bool(ds.get("file_path"))


def resolve_precision(precision, cuda_bf16: bool) -> str:
    """``trainer.precision`` -> ``params_dtype`` (``fp32`` | ``bf16`` | ``fp16``).

    ``auto``: bf16 where the GPU supports it (``cuda_bf16``), else fp32 (a CPU run: bf16
    works there too, set it explicitly). Lightning's ``*-true`` variants (no fp32 master
    weights) are refused: Megatron always keeps fp32 main parameters.
    """
    value = str(precision)
    if value == "auto":
        return "bf16" if cuda_bf16 else "fp32"
    if value not in _PRECISIONS:
        raise ValueError(f"trainer.precision={value!r} is not supported: use 32, bf16-mixed, 16-mixed or auto "
                         "(Megatron keeps fp32 main parameters; pure bf16/fp16 training is not offered)")
    return _PRECISIONS[value]


@dataclass
class RunSettings:
    """What the recipe needs beyond the config: resolved choices, for logging and callbacks."""

    accelerator: str
    params_dtype: str
    validation: bool
    preemption_signals: List[signal.Signals]


def _signal(name) -> signal.Signals:
    try:
        return signal.Signals[str(name)] if not isinstance(name, int) else signal.Signals(name)
    except (KeyError, ValueError):
        raise ValueError(f"preemption.signals: {name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)") from None


def _check_trainer(trainer: dict) -> None:
    import lightning.pytorch as pl

    valid = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "strategy"}
    check_keys("trainer", trainer, valid, _hint("trainer", trainer))
    if trainer.get("gradient_clip_val"):
        raise ValueError("trainer.gradient_clip_val: clipping is model.optim.clip_grad (Megatron's optimizer "
                         "clips the global norm over all TP/PP shards); set trainer.gradient_clip_val=null")


def _check_exp_manager(exp: dict) -> None:
    from nemo.utils.exp_manager import CallbackParams, ExpManagerConfig

    check_keys("exp_manager", exp, {f.name for f in dataclasses.fields(ExpManagerConfig)}, _hint("exp_manager", exp))
    params = exp.get("checkpoint_callback_params") or {}
    check_keys("exp_manager.checkpoint_callback_params", params, {f.name for f in dataclasses.fields(CallbackParams)})


def prepare_run_config(cfg: DictConfig, cuda_available: Optional[bool] = None,
                       cuda_bf16: Optional[bool] = None) -> RunSettings:
    """Check ``cfg`` whole and resolve it in place (precision, accelerator, checkpointing).

    ``cuda_available``/``cuda_bf16``: for tests; default from ``torch.cuda``.
    """
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_bf16 is None:
        cuda_bf16 = cuda_available and torch.cuda.is_bf16_supported()
    OmegaConf.resolve(cfg)  # the saved model config must not point at trainer.* any more
    trainer, exp, model = _plain(cfg.get("trainer")), _plain(cfg.get("exp_manager")), _plain(cfg.get("model"))
    check_keys("run config", cfg, _TOP_LEVEL, _hint("", _plain(cfg)))
    _check_trainer(trainer)
    _check_exp_manager(exp)
    check_model_config(cfg.model)
    preemption = _plain(cfg.get("preemption"))
    check_keys("preemption", preemption, _PREEMPTION_KEYS)
    signals = [_signal(s) for s in preemption.get("signals", ["SIGUSR1", "SIGTERM"])]

    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "auto":
        accelerator = "gpu" if cuda_available else "cpu"
    elif accelerator in ("gpu", "cuda") and not cuda_available:
        raise ValueError(f"trainer.accelerator={accelerator} but CUDA is not available on this machine; use "
                         "trainer.accelerator=auto (or cpu)")
    elif accelerator not in ("cpu", "gpu", "cuda"):
        raise ValueError(f"trainer.accelerator={accelerator!r}: use auto, gpu or cpu")

    params_dtype = resolve_precision(trainer.get("precision", "auto"), cuda_bf16 and accelerator != "cpu")
    declared = _PRECISION_NAMES[params_dtype]
    if "precision" in model and resolve_precision(model["precision"], cuda_bf16) != params_dtype:
        raise ValueError(f"model.precision={model['precision']!r} conflicts with trainer.precision="
                         f"{trainer.get('precision', 'auto')!r} (= {declared}): mixed precision is one setting, "
                         "trainer.precision; drop model.precision")
    student_dtype = (model.get("student") or {}).get("params_dtype")
    if student_dtype is not None:
        if dtype_name(student_dtype) != params_dtype:
            raise ValueError(f"model.student.params_dtype={student_dtype!r} conflicts with trainer.precision="
                             f"{trainer.get('precision', 'auto')!r} (= {declared}): the student's dtype follows "
                             "trainer.precision; drop model.student.params_dtype")

    validation = validation_configured(cfg.model)
    with open_dict(cfg):
        cfg.trainer.accelerator = accelerator
        cfg.trainer.precision = "32-true"  # Megatron does the mixed precision (see the module docstring)
        cfg.trainer.use_distributed_sampler = False
        cfg.model.student.params_dtype = params_dtype
        cfg.model.precision = declared
        if not validation:
            cfg.model.data.validation_ds = None
            cfg.trainer.limit_val_batches = 0
        if cfg.get("exp_manager") is not None:
            _resolve_checkpointing(cfg, validation)
    return RunSettings(accelerator=accelerator, params_dtype=params_dtype, validation=validation,
                       preemption_signals=signals)


def _resolve_checkpointing(cfg: DictConfig, validation: bool) -> None:
    exp = cfg.exp_manager
    exp.create_preemption_callback = False  # PreemptionCheckpoint replaces it (any device, any rank, our signals)
    if not exp.get("create_checkpoint_callback", True):
        return
    if exp.get("checkpoint_callback_params") is None:
        exp.checkpoint_callback_params = {}
    params = exp.checkpoint_callback_params
    every = params.get("every_n_train_steps")
    if not every or int(every) <= 0:
        raise ValueError("exp_manager.checkpoint_callback_params.every_n_train_steps must be a positive number of "
                         f"steps (got {every!r}): checkpoints are written every N steps and at the end")
    params.every_n_epochs = None  # step-based only: epochs are an artefact of our step sampler
    if params.get("monitor") is None:
        params.monitor = "val_loss" if validation else "step"
        params.mode = "min" if validation else "max"
    elif params.monitor.startswith("val_") and not validation:
        raise ValueError(f"exp_manager.checkpoint_callback_params.monitor={params.monitor!r} but no validation set "
                         "is configured (model.data.validation_ds.file_path); leave monitor null")
    if params.get("filename") is None:
        name = exp.get("name") or cfg.get("name") or "gpt_kd"
        params.filename = f"{name}--{{val_loss:.4f}}-{{step}}" if params.monitor == "val_loss" else f"{name}--{{step}}"
    params.save_last = True
    cfg.trainer.check_val_every_n_epoch = None  # intervals count steps over the whole run
    if validation:
        # Saved after each validation, so that the checkpoint is ranked by the val_loss of its own
        # step (a save at the train-batch end would precede that step's validation).
        interval = int(cfg.trainer.get("val_check_interval") or every)
        cfg.trainer.val_check_interval = interval
        params.every_n_train_steps = None
        params.every_n_epochs = 1
    else:
        # NeMo's end-of-training save of the -last checkpoint keys on val_check_interval: align it
        # with the checkpoint interval so a run whose length is not a multiple still ends saved.
        cfg.trainer.val_check_interval = int(every)
