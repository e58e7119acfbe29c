"""What every data-pipeline stage shares: loading a model to sample from, data-parallel
sharding of the prompts, and resumable, atomic stage outputs.

* :func:`load_policy` – a Megatron-core GPT from any checkpoint a teacher loads from
  (:func:`nemo_kd.teacher.teachers.load_megatron_teacher`: nemo_kd checkpoint, ``.nemo``, Hugging
  Face directory) (``backend: megatron``, TP-sharded under the current parallel state), or a
  Hugging Face model run by ``transformers`` (``backend: hf``), with its
  :class:`~nemo_kd.data.tokenization.ConversationTokenizer`.
* :func:`run_stage` – runs a stage over this data-parallel rank's contiguous block of
  prompts, gathers the blocks on global rank 0 and writes the output JSON Lines atomically
  with a ``.meta.json`` beside it recording the stage's settings. A rerun with the same
  settings skips a finished stage; different settings against an existing output are
  refused (delete it to redo the stage), so an interrupted pipeline resumes stage by stage
  and never mixes outputs of different settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from nemo_kd.config_keys import check_keys
from nemo_kd.generation.responses import shard_range, write_jsonl_atomic


def known_keys(cls, d, what: str) -> dict:
    """``d`` as a plain dict, refusing keys that are not fields of the dataclass ``cls``
    (a typo in a YAML config fails naming the section, not silently)."""
    d = dict(d or {})
    check_keys(what, d, cls.__dataclass_fields__)
    return d


@dataclass
class PolicySpec:
    """A model to sample from (teacher or student)."""

    checkpoint: str = "???"
    tokenizer: Optional[str] = None  # default: the checkpoint directory
    prompt_format: str = "chat"
    backend: str = "megatron"  # megatron | hf
    trust_remote_code: bool = False  # hf only, never on unless asked
    num_samples: int = 1
    sampling: Dict[str, Any] = field(default_factory=dict)  # SamplingConfig fields

    @classmethod
    def from_dict(cls, d) -> "PolicySpec":
        spec = cls(**known_keys(cls, d, "model"))
        if spec.checkpoint in (None, "???"):
            raise ValueError("a model needs `checkpoint`")
        if spec.backend not in ("megatron", "hf"):
            raise ValueError(f"backend must be 'megatron' or 'hf', got {spec.backend!r}")
        return spec

    def sampling_config(self):
        from nemo_kd.generation.sampling import SamplingConfig

        return SamplingConfig(**dict(self.sampling))


@dataclass
class PipelineConfig:
    """What every data pipeline's config has (``conf/build_*.yaml``); the pipelines add their own."""

    prompts: str = "???"
    output_dir: str = "???"
    teacher: PolicySpec = field(default_factory=PolicySpec)
    student: PolicySpec = field(default_factory=PolicySpec)
    response_filter: Dict[str, Any] = field(default_factory=dict)  # ResponseFilterConfig fields
    max_seq_length: int = 2048  # prompt + response tokens (sampling and scoring)
    batch_size: int = 64  # sequences per forward (per data-parallel rank)
    parallel: Dict[str, Any] = field(default_factory=dict)  # ParallelConfig fields
    progress: bool = True

    def check_required(self) -> None:
        for name in ("prompts", "output_dir"):
            if getattr(self, name) in (None, "???"):
                raise ValueError(f"`{name}` is required")


@dataclass
class Policy:
    model: torch.nn.Module
    ctok: object  # ConversationTokenizer
    vocab_size: int  # the tokenizer's size: ids sampled and scored are below it


def load_policy(spec: PolicySpec, max_seq_length: int) -> Policy:
    """The model (eval mode) and its conversation tokenizer; parallel state must be initialised."""
    from transformers import AutoTokenizer

    from nemo_kd.data.tokenization import ConversationTokenizer

    from nemo_kd.models.nemo_artifacts import checkpoint_tokenizer_dir

    tok_path = checkpoint_tokenizer_dir(spec.checkpoint, spec.tokenizer)  # a .nemo: its packed tokenizer
    if os.path.isfile(tok_path):
        raise ValueError(f"{spec.checkpoint}: give `tokenizer` (a tokenizer directory) for a checkpoint file")
    tok = AutoTokenizer.from_pretrained(tok_path, trust_remote_code=spec.trust_remote_code)
    ctok = ConversationTokenizer(tok, spec.prompt_format, max_seq_length, "truncate")
    if spec.backend == "hf":
        from nemo_kd.generation.sampling import HFCausalLM

        model = HFCausalLM.from_pretrained(spec.checkpoint, trust_remote_code=spec.trust_remote_code)
        vocab = model.vocab_size
    else:  # every format a teacher loads from (local full state dict, converted, .nemo, HF directory)
        from nemo_kd.parallel import state
        from nemo_kd.teacher.teachers import load_megatron_teacher

        if state.pp_size() > 1:
            raise ValueError("sampling needs pipeline_model_parallel_size=1 (TP and DP are fine)")
        model, arch = load_megatron_teacher(spec.checkpoint, state.tp_rank(), state.tp_size(), 0, 1)
        vocab = arch.vocab_size
    if len(tok) > vocab:
        raise ValueError(f"tokenizer {tok_path} has {len(tok)} tokens, more than the model's vocabulary ({vocab})")
    model.eval()
    # Rows past the tokenizer (an HF embedding padded to a round size, e.g. Qwen's 152,064 for
    # 151,665 tokens) are no tokens: never sample them, and leave them out of every softmax.
    return Policy(model, ctok, len(tok))


def _settings_hash(settings: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_done(path: str, settings: Dict[str, Any]) -> bool:
    """True if ``path`` holds this stage's finished output for ``settings``; refuses other settings."""
    meta = path + ".meta.json"
    if not os.path.exists(path):
        return False
    if not os.path.exists(meta):
        raise FileExistsError(f"{path} exists but was not written by this pipeline (no {meta}); move it away")
    with open(meta) as f:
        old = json.load(f)
    if old.get("settings_hash") != _settings_hash(settings):
        raise FileExistsError(f"{path} was written with other settings ({old.get('settings')}); delete it (and the "
                              f"stages after it) to redo the stage with {settings}")
    return True


def _write_meta(path: str, settings: Dict[str, Any], extra: Dict[str, Any]) -> None:
    tmp = f"{path}.meta.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"settings": settings, "settings_hash": _settings_hash(settings), **extra}, f, indent=1, default=str)
    os.replace(tmp, path + ".meta.json")


def run_stage(path: str, settings: Dict[str, Any], num_items: int,
              work: Callable[[range], List[Dict[str, Any]]]) -> Optional[List[Dict[str, Any]]]:
    """Run ``work`` on this DP rank's block of ``range(num_items)``; global rank 0 writes all rows.

    Returns the rows on global rank 0 (``None`` elsewhere), read back from ``path`` when the
    stage was already done with the same ``settings``.
    """
    import torch.distributed as dist

    from nemo_kd.parallel import state

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank0 = not distributed or dist.get_rank() == 0
    # on the collective backend's device (NCCL broadcasts CUDA tensors only)
    device = state.device() if state.is_initialized() else torch.device("cpu")
    done = torch.tensor([int(stage_done(path, settings)) if rank0 else 0], device=device)
    if distributed:
        dist.broadcast(done, src=0)
    if bool(done):
        if not rank0:
            return None
        with open(path) as f:
            return [json.loads(line) for line in f]
    dp_rank, dp_size = (state.dp_rank(), state.dp_size()) if state.is_initialized() else (0, 1)
    block = shard_range(num_items, dp_rank, dp_size)
    rows = work(block) if len(block) else []
    if distributed:
        gathered: List[Optional[List[Dict[str, Any]]]] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows if state.tp_rank() == 0 else [])
        rows = [r for part in gathered for r in part]
    if rank0:
        write_jsonl_atomic(path, rows)
        _write_meta(path, settings, {"rows": len(rows)})
    if distributed:
        dist.barrier()
    return rows if rank0 else None

