"""NeMo-Aligner's knowledge-distillation config, key by key, in nemo_kd's layout.

``nemo-kd-migrate-aligner-config IN.yaml OUT.yaml [--report REPORT.yaml]`` turns an Aligner KD
config into a ``conf/gpt_kd.yaml``-shaped one and says, for every key it did not carry over, its
value and why.

Where Aligner keeps things (read from NeMo-Aligner's ``examples/nlp/gpt/conf/
gpt_knowledge_distillation.yaml``, ``train_gpt_knowledge_distillation.py`` and the KD user guide):

* the parallel layout, batch sizes and seed at the top of ``model``
  (``model.tensor_model_parallel_size``, ``model.micro_batch_size``, ``model.seed``), usually
  given as ``++`` overrides or inherited from the student checkpoint's own config;
* the KD settings under ``model.knowledge_distillation``: ``kd_loss: fwd_kl | bwd_kl``, the two
  weights, ``logits_scale`` / ``target_logits_scale`` (inverse temperatures, nemo_kd uses the same
  names) and, in the script's ``use_k_add_1_logits`` variant, the teacher's full-vocabulary
  log-sum-exp as a (k+1)-th bucket: nemo_kd's ``topk_convention: exact_tail`` (without it Aligner
  softmaxes the k stored logits: ``renormalized``);
* the run length and intervals under ``trainer.knowledge_distillation`` (the plain
  ``trainer.max_steps`` / ``max_epochs`` interpolate them), the start checkpoint under
  ``pretrained_checkpoint.restore_from_path``;
* the data under ``model.data``: ``data_prefix`` (``{train: [...], validation: [...], test:
  [...]}`` of chunked JSONL files ``..._CHUNK_ID.jsonl``), which are the *teacher top-k files* of
  Aligner's ``compute_topk_logits.py``: in nemo_kd they become a logits store
  (``nemo-kd-import-aligner-logits``, :mod:`nemo_kd.migrate.aligner_logits`) beside the records
  file the teacher read, which the Aligner config does not name (``file_path: ???``);
* ``model.optim``: NeMo's ``betas``, ``sched: {name: CosineAnnealing, warmup_steps,
  constant_steps, min_lr, max_steps}``; nemo_kd's Megatron scheduler takes ``decay_steps``
  counted from step 0 (warmup included), so NeMo's ``constant_steps`` at ``min_lr`` at the end
  become ``decay_steps = max_steps - constant_steps``.

Hydra interpolations (``${.val_check_interval}``, ``${model.tensor_model_parallel_size}``) are
resolved within the file; one that points outside it (Aligner fills ``model.encoder_seq_length``
from the student checkpoint) is reported with its text, and a required value that could not be
found is written as ``???`` so that Hydra asks for it.

:data:`ALIGNER_RENAMES` and :func:`aligner_key_hint` also serve the strict config check
(:mod:`nemo_kd.training.run_config`), which names the new place of an Aligner key met at its
old one. This module imports only the standard library at import time (OmegaConf/PyYAML when
converting), so any layer may use the tables and ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["ALIGNER_RENAMES", "ALIGNER_VALUE_NOTES", "ALIGNER_DROPPED", "MigrationResult", "aligner_key_hint",
           "migrate_aligner_config", "main"]

MISSING = "???"  # Hydra/OmegaConf's "mandatory value, not set"

# Aligner dotted key -> nemo_kd dotted key (sections too: the strict check hints on a whole
# unknown mapping such as ``model.knowledge_distillation``).
ALIGNER_RENAMES: Dict[str, str] = {
    "model.knowledge_distillation": "model.kd",
    "model.knowledge_distillation.kd_loss": "model.kd.kd_loss_type",
    "model.knowledge_distillation.kd_loss_weight": "model.kd.kd_loss_weight",
    "model.knowledge_distillation.sft_loss_weight": "model.kd.sft_loss_weight",
    "model.knowledge_distillation.logits_scale": "model.kd.logits_scale",
    "model.knowledge_distillation.target_logits_scale": "model.kd.target_logits_scale",
    "model.knowledge_distillation.use_k_add_1_logits": "model.kd.topk_convention",
    "model.tensor_model_parallel_size": "model.parallel.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size": "model.parallel.pipeline_model_parallel_size",
    "model.virtual_pipeline_model_parallel_size": "model.parallel.virtual_pipeline_model_parallel_size",
    "model.context_parallel_size": "model.parallel.context_parallel_size",
    "model.seed": "model.parallel.seed",
    "model.micro_batch_size": "model.data.train_ds.micro_batch_size",
    "model.global_batch_size": "model.data.train_ds.global_batch_size",
    "model.encoder_seq_length": "model.data.train_ds.max_seq_length",
    "model.data.seq_length": "model.data.train_ds.max_seq_length",
    "model.data.max_seq_length": "model.data.train_ds.max_seq_length",
    "model.data.data_prefix": "model.data.train_ds.logits_store (and model.data.validation_ds.logits_store)",
    "model.data.top_k": "model.data.train_ds.top_k",
    "model.data.num_workers": "model.data.train_ds.num_workers",
    "model.optim": "model.optim",
    "model.optim.name": "model.optim.use_distributed_optimizer",
    "model.optim.betas": "model.optim.adam_beta1 / model.optim.adam_beta2",
    "model.optim.eps": "model.optim.adam_eps",
    "model.optim.sched": "model.optim (warmup_steps, min_lr, decay_style, decay_steps)",
    "model.optim.sched.name": "model.optim.decay_style",
    "model.optim.sched.warmup_steps": "model.optim.warmup_steps",
    "model.optim.sched.min_lr": "model.optim.min_lr",
    "model.optim.sched.max_steps": "model.optim.decay_steps",
    "model.optim.sched.constant_steps": "model.optim.decay_steps",
    "model.restore_from_path": "model.student_init",
    "pretrained_checkpoint": "model.student_init",
    "pretrained_checkpoint.restore_from_path": "model.student_init",
    "trainer.knowledge_distillation": "trainer (max_steps, val_check_interval, ...) and exp_manager",
    "trainer.knowledge_distillation.max_steps": "trainer.max_steps",
    "trainer.knowledge_distillation.max_epochs": "trainer.max_epochs",
    "trainer.knowledge_distillation.val_check_interval": "trainer.val_check_interval",
    "trainer.knowledge_distillation.save_interval": "exp_manager.checkpoint_callback_params.every_n_train_steps",
    "trainer.knowledge_distillation.limit_val_batches": "trainer.limit_val_batches",
    "trainer.knowledge_distillation.limit_train_batches": "trainer.limit_train_batches",
    "trainer.knowledge_distillation.gradient_clip_val": "model.optim.clip_grad",
    "model.gradient_clip_val": "model.optim.clip_grad",
}

# How values change on the way (for the hint and the report).
ALIGNER_VALUE_NOTES: Dict[str, str] = {
    "model.knowledge_distillation": "kd_loss: fwd_kl|bwd_kl becomes kd_loss_type: forward_kl|reverse_kl",
    "model.knowledge_distillation.kd_loss": "kd_loss: fwd_kl -> forward_kl, bwd_kl -> reverse_kl",
    "model.knowledge_distillation.use_k_add_1_logits": "true -> exact_tail (top-k + the tail bucket from the "
                                                       "teacher's log-sum-exp), false -> renormalized",
    "model.data.data_prefix": "Aligner's top-k JSONL files: import them with nemo-kd-import-aligner-logits",
    "model.optim.name": "distributed_fused_adam -> true (Megatron's distributed optimizer), fused_adam/adam -> false",
    "model.optim.betas": "[b1, b2] -> adam_beta1: b1, adam_beta2: b2",
    "model.optim.sched.name": "CosineAnnealing -> cosine, WarmupAnnealing -> linear",
    "model.optim.sched.constant_steps": "decay_steps = max_steps - constant_steps (Megatron counts from step 0)",
    "trainer.precision": "bf16 -> bf16-mixed, 16 -> 16-mixed (Megatron mixed precision, fp32 main parameters)",
}

# Aligner keys nemo_kd has no place for, and why (a key under a listed section inherits its reason).
ALIGNER_DROPPED: Dict[str, str] = {
    "model.mcore_gpt": "nemo_kd always builds Megatron-core GPT models",
    "model.megatron_amp_O2": "nemo_kd always keeps fp32 main parameters (Megatron's mixed precision, "
                             "set by trainer.precision)",
    "model.peft": "nemo_kd trains the whole student (no PEFT/LoRA adapters)",
    "model.overwrite_base_config": "Aligner merges the checkpoint's own model config; nemo_kd takes the "
                                   "architecture from model.student_init",
    "model.data.data_impl": "nemo_kd reads the teacher top-k from its store (nemo-kd-import-aligner-logits), "
                            "not from chunked JSONL",
    "model.data.n_chunks": "every chunk file goes into one store (pass them all to "
                           "nemo-kd-import-aligner-logits --aligner-jsonl)",
    "model.data.n_examples_per_chunk": "every chunk file goes into one store (nemo-kd-import-aligner-logits)",
    "model.data.splits_string": "nemo_kd takes one file per split (train_ds / validation_ds)",
    "model.data.skip_warmup": "a Megatron indexed-dataset setting; nemo_kd's store is indexed by sample",
    "model.data.index_mapping_dir": "a Megatron indexed-dataset setting; nemo_kd's store is indexed by sample",
    "model.data.dataloader_type": "nemo_kd's GlobalBatchSampler (Megatron's global-batch arithmetic, resumable)",
    "model.data.reset_position_ids": "nemo_kd trains one sample per row: positions start at 0",
    "model.data.reset_attention_mask": "nemo_kd trains one sample per row with a causal mask",
    "model.data.eod_mask_loss": "nemo_kd's loss mask is the completion (chat template), EOD included as rendered",
    "model.data.test": "nemo_kd trains and validates; evaluate on a test set with nemo_kd.evaluation",
    "trainer.knowledge_distillation.inference_metrics": "no generation metrics during training; use "
                                                        "nemo_kd.evaluation after training",
    "exp_manager.checkpoint_callback_params.filename": "nemo_kd names checkpoints itself (<name>--step=N, with "
                                                       "validation <name>--val_loss=X-step=N); Aligner's pattern "
                                                       "uses consumed_samples, which nemo_kd does not log",
    "exp_manager.checkpoint_callback_params.model_parallel_size": "nemo_kd's distributed checkpoints record their "
                                                                  "own layout (resharded on load)",
    "exp_manager.checkpoint_callback_params.save_best_model": "left at NeMo's default (false), which Aligner's "
                                                              "config also asks",
}

# Aligner keys carried over under the same name (NeMo's exp_manager / Lightning's Trainer).
_SAME_NAME_PREFIXES = (
    "name", "trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.logger",
    "trainer.enable_checkpointing", "trainer.use_distributed_sampler", "trainer.max_time",
    "trainer.log_every_n_steps", "trainer.num_sanity_val_steps",
    "exp_manager.explicit_log_dir", "exp_manager.exp_dir", "exp_manager.name", "exp_manager.create_wandb_logger",
    "exp_manager.wandb_logger_kwargs", "exp_manager.create_tensorboard_logger", "exp_manager.resume_if_exists",
    "exp_manager.resume_ignore_no_checkpoint", "exp_manager.create_checkpoint_callback",
    "exp_manager.max_time_per_run", "exp_manager.checkpoint_callback_params.save_top_k",
    "exp_manager.checkpoint_callback_params.save_last", "exp_manager.checkpoint_callback_params.always_save_nemo",
    "exp_manager.checkpoint_callback_params.save_nemo_on_train_end",
    "exp_manager.checkpoint_callback_params.every_n_train_steps",
)

_KD_LOSS = {"fwd_kl": "forward_kl", "bwd_kl": "reverse_kl"}
_PRECISION = {"bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed", "16": "16-mixed", "16-mixed": "16-mixed",
              "32": 32, "32-true": 32}
_SCHEDULES = {"CosineAnnealing": "cosine", "WarmupAnnealing": "linear"}
_OPTIMIZERS = {"distributed_fused_adam": True, "fused_adam": False, "adam": False}


def _lookup(table: Dict[str, str], dotted_key: str) -> Tuple[Optional[str], Optional[str]]:
    """``(matched key, entry)`` for ``dotted_key`` or its closest listed parent section."""
    parts = dotted_key.split(".")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in table:
            return key, table[key]
    return None, None


def aligner_key_hint(dotted_key: str) -> Optional[str]:
    """One sentence for a NeMo-Aligner key found at its old place, ``None`` for other keys.

    ``"NeMo-Aligner key model.knowledge_distillation.kd_loss; nemo_kd calls it
    model.kd.kd_loss_type (kd_loss: fwd_kl -> forward_kl, bwd_kl -> reverse_kl)"``; for an Aligner
    key without a counterpart, why (``model.megatron_amp_O2``).
    """
    new = ALIGNER_RENAMES.get(dotted_key)
    if new is not None:
        note = ALIGNER_VALUE_NOTES.get(dotted_key)
        return f"NeMo-Aligner key {dotted_key}; nemo_kd calls it {new}" + (f" ({note})" if note else "")
    matched, why = _lookup(ALIGNER_DROPPED, dotted_key)
    if why is not None and not matched.startswith(("model.data.test", "exp_manager.")):
        return f"NeMo-Aligner key {dotted_key}; nemo_kd has no counterpart: {why}"
    return None


# ----------------------------------------------------------------------------- conversion


@dataclass
class MigrationResult:
    """The nemo_kd config (``config``: plain data, ``???`` where a value is needed) and the report."""

    config: Dict[str, Any]
    carried: List[Dict[str, Any]] = field(default_factory=list)  # {aligner, nemo_kd, value, [aligner_value]}
    dropped: List[Dict[str, Any]] = field(default_factory=list)  # {key, value, why}
    unresolved: List[Dict[str, Any]] = field(default_factory=list)  # {key, text, why}
    needs_value: List[Dict[str, Any]] = field(default_factory=list)  # {key, why}
    conflicts: List[Dict[str, Any]] = field(default_factory=list)  # {nemo_kd, kept: {...}, other: {...}}
    next_steps: List[str] = field(default_factory=list)

    def report(self) -> Dict[str, Any]:
        return {"carried": self.carried, "dropped": self.dropped, "unresolved_interpolations": self.unresolved,
                "needs_value": self.needs_value, "conflicts": self.conflicts, "next_steps": self.next_steps}

    def dropped_keys(self) -> List[str]:
        return [d["key"] for d in self.dropped]


class _Migration:
    """One conversion: the Aligner leaves (resolved), what each became, what is left over."""

    def __init__(self, leaves: Dict[str, Any], unresolved: Dict[str, str]):
        self.leaves = leaves  # dotted key -> resolved value (lists/data_prefix whole)
        self.unresolved = unresolved  # dotted key -> its interpolation text
        self.used: set = set()
        self.out: Dict[str, Tuple[Any, str]] = {}  # nemo_kd key -> (value, Aligner source)
        self.result = MigrationResult(config={})

    # -- bookkeeping

    def has(self, key: str) -> bool:
        return key in self.leaves

    def take(self, key: str) -> Any:
        self.used.add(key)
        return self.leaves[key]

    def put(self, target: str, value: Any, source: str, aligner_value: Any = None) -> None:
        entry = {"aligner": source, "nemo_kd": target, "value": value}
        if aligner_value is not None and aligner_value != value:
            entry["aligner_value"] = aligner_value
        if target in self.out:
            kept, kept_source = self.out[target]
            if kept != value:
                self.result.conflicts.append({"nemo_kd": target, "kept": {kept_source: kept},
                                              "ignored": {source: value}})
                return
        else:
            self.out[target] = (value, source)
        self.result.carried.append(entry)

    def drop(self, key: str, why: str) -> None:
        self.used.add(key)
        self.result.dropped.append({"key": key, "value": self.leaves.get(key), "why": why})

    def need(self, target: str, why: str) -> None:
        if target not in self.out:
            self.out[target] = (MISSING, "")
            self.result.needs_value.append({"key": target, "why": why})

    def rename(self, source: str, target: str, transform: Optional[Callable[[Any], Any]] = None) -> None:
        if not self.has(source):
            return
        value = self.take(source)
        new = value
        if transform is not None:
            try:
                new = transform(value)
            except (KeyError, ValueError, TypeError) as e:
                self.result.dropped.append({"key": source, "value": value,
                                            "why": f"value {value!r} has no nemo_kd counterpart ({e})"})
                return
        self.put(target, new, source, value)


def _split_paths(value: Any) -> List[str]:
    """Files of one ``data_prefix`` entry: a path, a list of paths, or NeMo's blend [w, path, ...]."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    items = list(value)
    if len(items) >= 2 and all(isinstance(w, (int, float)) for w in items[0::2]):
        return [str(p) for p in items[1::2]]
    return [str(p) for p in items]


def _store_path(jsonl: str) -> str:
    """Where ``nemo-kd-import-aligner-logits`` is told to write a split's store (next to its JSONL)."""
    stem = jsonl[:-len(".jsonl")] if jsonl.endswith(".jsonl") else jsonl
    stem = stem.replace("_CHUNK_ID", "").replace("CHUNK_ID", "")
    return stem + ".nemo_kd_store"


def _rules(m: _Migration) -> None:
    """Every Aligner key nemo_kd has a place for (the order decides conflicts: the first wins)."""
    kd = "model.knowledge_distillation."
    m.rename(kd + "kd_loss", "model.kd.kd_loss_type", lambda v: _KD_LOSS[str(v)])
    for name in ("kd_loss_weight", "sft_loss_weight", "logits_scale", "target_logits_scale"):
        m.rename(kd + name, f"model.kd.{name}", float)
    m.rename(kd + "use_k_add_1_logits", "model.kd.topk_convention",
             lambda v: "exact_tail" if _bool(v) else "renormalized")

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                 "virtual_pipeline_model_parallel_size", "context_parallel_size"):
        m.rename(f"model.{name}", f"model.parallel.{name}", lambda v: None if v is None else int(v))
    if m.has("model.seed"):
        seed = int(m.take("model.seed"))
        m.put("model.parallel.seed", seed, "model.seed")  # Aligner seeds the model and the data with it
        m.put("model.data.train_ds.seed", seed, "model.seed")
    m.rename("model.micro_batch_size", "model.data.train_ds.micro_batch_size", int)
    m.rename("model.global_batch_size", "model.data.train_ds.global_batch_size", int)
    m.rename("model.data.top_k", "model.data.train_ds.top_k", lambda v: None if v is None else int(v))
    m.rename("model.data.num_workers", "model.data.train_ds.num_workers", int)

    # Sequence length: what Aligner's script reads (model.data.seq_length), then the alternatives.
    for key in ("model.data.seq_length", "model.data.max_seq_length", "model.encoder_seq_length"):
        m.rename(key, "model.data.train_ds.max_seq_length", int)
    if "model.data.train_ds.max_seq_length" not in m.out:
        m.need("model.data.train_ds.max_seq_length",
               "Aligner takes it from model.encoder_seq_length of the student checkpoint's config; it must equal "
               "the --max-seq-length the store was imported with")

    _data_prefix(m)

    for key in ("pretrained_checkpoint.restore_from_path", "model.restore_from_path"):
        if m.has(key) and m.leaves[key] is None:
            m.take(key)  # null in the file: Aligner's script is given it on the command line
        else:
            m.rename(key, "model.student_init")
    if "model.student_init" not in m.out:
        # nemo_kd's student_init: null means a randomly initialised student, never what an Aligner run did.
        m.need("model.student_init", "the student checkpoint to start from (Aligner's pretrained_checkpoint."
               "restore_from_path is null here: its command line gives it); a .nemo, a converted Megatron or a "
               "Hugging Face checkpoint")

    _optim(m)
    _trainer(m)
    _exp_manager(m)


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if str(v).lower() in ("true", "1"):
        return True
    if str(v).lower() in ("false", "0", "none", "null"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


def _data_prefix(m: _Migration) -> None:
    key = "model.data.data_prefix"
    n_chunks = m.leaves.get("model.data.n_chunks")
    has_validation = False
    if m.has(key):
        prefix = m.take(key)
        splits = prefix if isinstance(prefix, dict) else {"train": prefix}
        if not isinstance(prefix, dict) and prefix is not None:
            m.result.next_steps.append("model.data.data_prefix is one dataset Aligner split by splits_string; "
                                       "nemo_kd takes one file per split: all of it is training data here, give "
                                       "a validation file as model.data.validation_ds")
        for split, value in splits.items():
            files = _split_paths(value)
            where = f"{key}.{split}"
            if split == "test":
                m.result.dropped.append({"key": where, "value": value, "why": ALIGNER_DROPPED["model.data.test"]})
                continue
            if split not in ("train", "validation"):
                m.result.dropped.append({"key": where, "value": value, "why": f"unknown data_prefix split {split!r}"})
                continue
            if not files:
                continue
            chunks = []
            for f in files:
                if "CHUNK_ID" in f:
                    count = int(n_chunks) if n_chunks else 1
                    chunks.extend(f.replace("CHUNK_ID", str(i)) for i in range(count))
                else:
                    chunks.append(f)
            ds = "train_ds" if split == "train" else "validation_ds"
            store = _store_path(files[0])
            m.put(f"model.data.{ds}.logits_store", store, where, value)
            m.need(f"model.data.{ds}.file_path",
                   f"the records file (prompt/response or messages JSONL) Aligner's compute_topk_logits read for "
                   f"{', '.join(chunks)}; the Aligner config does not name it")
            seq_len = m.out.get("model.data.train_ds.max_seq_length", (MISSING, ""))[0]
            top_k = m.out.get("model.data.train_ds.top_k", (None, ""))[0]
            m.result.next_steps.append(
                "nemo-kd-import-aligner-logits " + " ".join(f"--aligner-jsonl {c}" for c in chunks)
                + f" --data <model.data.{ds}.file_path> --tokenizer <student tokenizer dir> --output {store}"
                + " --max-seq-length " + ("<model.data.train_ds.max_seq_length>" if seq_len == MISSING else str(seq_len))
                + (f" --top-k {top_k}" if top_k is not None else ""))
            if split == "validation" and top_k is not None:
                m.put("model.data.validation_ds.top_k", top_k, "model.data.top_k")
            has_validation |= split == "validation"
    if "model.data.train_ds.logits_store" not in m.out:
        m.need("model.data.train_ds.logits_store", "no model.data.data_prefix.train: a teacher logits store "
               "(nemo-kd-import-aligner-logits or nemo-kd-compute-topk-logits)")
        m.need("model.data.train_ds.file_path", "the training records file (prompt/response or messages JSONL)")
    m.need("model.data.train_ds.tokenizer", "the student's Hugging Face tokenizer directory (Aligner takes the "
           ".nemo's own tokenizer)")
    m.has_validation = has_validation


def _optim(m: _Migration) -> None:
    p = "model.optim."
    m.rename(p + "lr", "model.optim.lr", float)
    m.rename(p + "weight_decay", "model.optim.weight_decay", float)
    m.rename(p + "eps", "model.optim.adam_eps", float)
    m.rename(p + "name", "model.optim.use_distributed_optimizer", lambda v: _OPTIMIZERS[str(v)])
    if m.has(p + "betas"):
        betas = m.take(p + "betas")
        if isinstance(betas, (list, tuple)) and len(betas) == 2:
            m.put("model.optim.adam_beta1", float(betas[0]), p + "betas", betas)
            m.put("model.optim.adam_beta2", float(betas[1]), p + "betas", betas)
        else:
            m.result.dropped.append({"key": p + "betas", "value": betas, "why": "expected [beta1, beta2]"})
    s = p + "sched."
    m.rename(s + "name", "model.optim.decay_style", lambda v: _SCHEDULES[str(v)])
    m.rename(s + "warmup_steps", "model.optim.warmup_steps", int)
    m.rename(s + "min_lr", "model.optim.min_lr", float)
    # decay_steps (Megatron: from step 0, warmup included) = NeMo's max_steps - constant_steps.
    constant = int(m.take(s + "constant_steps") or 0) if m.has(s + "constant_steps") else 0
    total = m.take(s + "max_steps") if m.has(s + "max_steps") else None
    total_source = s + "max_steps"
    for source in ("trainer.knowledge_distillation.max_steps", "trainer.max_steps"):
        if total is None:
            total, total_source = m.leaves.get(source), source
    if constant:
        if total is not None and int(total) > 0:
            warmup = int(m.leaves.get(s + "warmup_steps") or 0)
            decay = int(total) - constant
            if decay <= warmup:
                # NeMo then warms up and holds min_lr; Megatron's scheduler needs decay_steps > warmup_steps.
                m.result.next_steps.append(
                    f"model.optim.sched.constant_steps={constant} leaves no decay phase in max_steps={int(total)} after "
                    f"warmup_steps={warmup} (NeMo warms up, then holds min_lr): decay_steps is set to "
                    f"warmup_steps + 1 = {warmup + 1}; set model.optim.decay_steps yourself for another schedule")
                decay = warmup + 1
            m.put("model.optim.decay_steps", decay, f"{s}constant_steps + {total_source}",
                  {"constant_steps": constant, "max_steps": int(total)})
        else:
            # decay_steps: null would decay over the whole run, not hold min_lr for constant_steps as Aligner did.
            m.need("model.optim.decay_steps", f"Aligner holds min_lr for the last model.optim.sched.constant_steps="
                   f"{constant} steps, which needs the run's step count (max_steps is -1/unset here): "
                   "decay_steps = max_steps - constant_steps")
    elif m.has(s + "max_steps") and total is not None and int(total) > 0:
        m.put("model.optim.decay_steps", int(total), s + "max_steps")
    for key in [k for k in m.leaves if k.startswith(s) and k not in m.used]:
        m.drop(key, "no counterpart in nemo_kd's warmup + decay schedule (OptimConfig)")


def _trainer(m: _Migration) -> None:
    t = "trainer.knowledge_distillation."
    for source in (t + "max_steps", "trainer.max_steps"):
        if m.has(source):
            steps = m.take(source)
            if steps is None or int(steps) < 0:
                m.result.dropped.append({"key": source, "value": steps, "why": "-1 means 'run max_epochs'; "
                                         "nemo_kd's LR schedule needs the step count"})
                m.need("trainer.max_steps", "Aligner ran max_epochs; nemo_kd counts steps: epochs × samples // "
                       "global_batch_size")
            else:
                m.put("trainer.max_steps", int(steps), source)
    for source in (t + "max_epochs", "trainer.max_epochs"):
        m.rename(source, "trainer.max_epochs", lambda v: None if v is None else int(v))
    m.rename(t + "val_check_interval", "trainer.val_check_interval")
    m.rename(t + "limit_val_batches", "trainer.limit_val_batches")
    m.rename(t + "limit_train_batches", "trainer.limit_train_batches")
    m.rename(t + "save_interval", "exp_manager.checkpoint_callback_params.every_n_train_steps", int)
    for source in (t + "gradient_clip_val", "model.gradient_clip_val", "trainer.gradient_clip_val"):
        m.rename(source, "model.optim.clip_grad", lambda v: 0.0 if v is None else float(v))
    m.rename("trainer.precision", "trainer.precision", lambda v: _PRECISION[str(v)])
    if m.has("model.megatron_amp_O2") and not _bool(m.leaves["model.megatron_amp_O2"]):
        m.drop("model.megatron_amp_O2", "False (O1: fp16/bf16 autocast over fp32 weights) has no nemo_kd "
                                        "counterpart: nemo_kd runs Megatron's mixed precision (bf16/fp16 model, "
                                        "fp32 main parameters)")


def _exp_manager(m: _Migration) -> None:
    c = "exp_manager.checkpoint_callback_params."
    for key in (c + "monitor", c + "mode"):
        if m.has(key):
            if m.has_validation:
                m.rename(key, key)
            else:
                m.drop(key, "no validation set: nemo_kd ranks checkpoints by step (monitor: null) and refuses "
                            "val_loss without validation data")


def _flatten(raw: Any, prefix: str, whole: Sequence[str]) -> List[str]:
    if isinstance(raw, dict) and prefix not in whole:
        if not raw and prefix:
            return [prefix]
        keys: List[str] = []
        for k, v in raw.items():
            keys.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k), whole))
        return keys
    return [prefix]


def _leaves(cfg) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Resolved leaves of an OmegaConf config; interpolations that cannot be resolved, as text."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(cfg, resolve=False)
    leaves, unresolved = {}, {}
    for key in _flatten(raw, "", whole=("model.data.data_prefix",)):
        text = _raw_at(raw, key)
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True, throw_on_missing=True)
        except OmegaConfBaseException as e:
            unresolved[key] = f"{text} ({type(e).__name__}: {str(e).splitlines()[0]})"
            continue
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True)
        leaves[key] = value
    return leaves, unresolved


def _raw_at(raw: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        raw = raw[part] if isinstance(raw, dict) else raw
    return raw


def _register_aligner_resolvers() -> None:
    """The resolvers Aligner's scripts register (``multiply``, ``int_div``), if nobody has."""
    from omegaconf import OmegaConf

    for name, fn in (("multiply", lambda x, y: x * y), ("int_div", lambda x, y: x // y)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def default_base_config() -> Optional[str]:
    """``conf/gpt_kd.yaml`` of the source checkout (``None`` in an installed package without it)."""
    path = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "conf",
                                         "gpt_kd.yaml"))
    return path if os.path.exists(path) else None


def migrate_aligner_config(aligner, base=None) -> MigrationResult:
    """Convert an Aligner KD config (a path, a dict or an OmegaConf config) onto ``base``.

    ``base``: nemo_kd's config to fill in (a path, dict or OmegaConf config; default
    :func:`default_base_config`, ``False`` for none: only the migrated keys). Returns the config
    as plain data (the base's own interpolations kept) and the report.
    """
    from omegaconf import OmegaConf

    _register_aligner_resolvers()
    cfg = OmegaConf.load(aligner) if isinstance(aligner, (str, os.PathLike)) else OmegaConf.create(aligner)
    leaves, unresolved = _leaves(cfg)
    m = _Migration(leaves, unresolved)
    m.has_validation = False
    _rules(m)

    for key, text in unresolved.items():
        target = ALIGNER_RENAMES.get(key) or next((v for k, v in ALIGNER_RENAMES.items() if key.startswith(k + ".")),
                                                  None)
        m.result.unresolved.append({"key": key, "text": text, "why": "the interpolation points outside this file "
                                    "(Aligner fills it from the checkpoint's config or the command line)"
                                    + (f"; it would have set {target}" if target else "")})
    for key, value in leaves.items():
        if key in m.used:
            continue
        matched, why = _lookup(ALIGNER_DROPPED, key)
        if why is not None:
            m.drop(key, why)
        elif any(key == p or key.startswith(p + ".") for p in _SAME_NAME_PREFIXES):
            m.used.add(key)
            m.put(key, value, key)
        else:
            m.drop(key, "unknown NeMo-Aligner key: nemo_kd has no counterpart known to this migration; check it "
                        "by hand")

    if base is None:
        base = default_base_config()
    if base is False or base is None:
        out = OmegaConf.create({})
    elif isinstance(base, (str, os.PathLike)):
        out = OmegaConf.load(base)
    else:
        out = OmegaConf.create(base)
    for target, (value, _) in sorted(m.out.items()):
        OmegaConf.update(out, target, value, merge=False, force_add=True)
    m.result.config = OmegaConf.to_container(out, resolve=False)
    return m.result


# ----------------------------------------------------------------------------- CLI


def _summary(result: MigrationResult, source: str, output: str) -> str:
    lines = [f"{source} -> {output}: {len(result.carried)} value(s) carried over"]
    for title, items, fmt in (
        ("dropped (no nemo_kd counterpart)", result.dropped, lambda d: f"{d['key']} = {d['value']!r}: {d['why']}"),
        ("unresolved interpolations", result.unresolved, lambda d: f"{d['key']} = {d['text']}"),
        ("needs a value (written as ???)", result.needs_value, lambda d: f"{d['key']}: {d['why']}"),
        ("conflicts (first kept)", result.conflicts, lambda d: f"{d['nemo_kd']}: kept {d['kept']}, ignored "
                                                               f"{d['ignored']}"),
        ("next steps", result.next_steps, str),
    ):
        if items:
            lines.append(f"{title}:")
            lines.extend(f"  - {fmt(item)}" for item in items)
    return "\n".join(lines)


def _write_yaml_atomic(path: str, data: Any) -> None:
    import yaml

    from nemo_kd.teacher.store import _atomic_write

    text = yaml.safe_dump(data, sort_keys=False, default_flow_style=False, allow_unicode=True)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, text.encode(), f"p{os.getpid()}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nemo-kd-migrate-aligner-config",
        description="Turn a NeMo-Aligner knowledge-distillation YAML into nemo_kd's config (conf/gpt_kd.yaml "
                    "layout) and report every key without a counterpart.")
    p.add_argument("input", help="the NeMo-Aligner YAML (e.g. gpt_knowledge_distillation.yaml with your overrides)")
    p.add_argument("output", help="where to write the nemo_kd YAML (atomically)")
    p.add_argument("--report", help="also write the report (carried / dropped / unresolved / needs_value) as YAML")
    p.add_argument("--base", help="the nemo_kd config to fill in (default: conf/gpt_kd.yaml of this checkout)")
    p.add_argument("--no-base", action="store_true", help="write only the migrated keys")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``nemo-kd-migrate-aligner-config`` (argument parsing before any import)."""
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.input):
        print(f"nemo-kd-migrate-aligner-config: {args.input}: no such file", file=sys.stderr)
        return 2
    base = False if args.no_base else (args.base or None)
    result = migrate_aligner_config(args.input, base)
    # Bare `???` must stay a string OmegaConf reads as MISSING: PyYAML writes it plain, as wanted.
    _write_yaml_atomic(args.output, result.config)
    if args.report:
        _write_yaml_atomic(args.report, dict(source=os.path.abspath(args.input), output=os.path.abspath(args.output),
                                             **result.report()))
    print(_summary(result, args.input, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
