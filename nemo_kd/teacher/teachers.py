"""Teachers for top-k logits extraction: a TP/PP-sharded Megatron GPT, or a Hugging Face causal LM.

A teacher turns a padded batch of token ids into this rank's vocabulary shard of
the logits, handed to a callback on the ranks that own logits::

    teacher.run(tokens [B, S] int64, callback, micro_batch_size)
    # callback(first_row, logits_shard [b, S, V/TP], tp_group) is called once per
    # micro-batch, rows first_row..first_row+b-1 of ``tokens``, on the last pipeline stage.

Why a callback instead of returning logits: the stats (top-k, LSE, label log-prob)
are computed *inside* Megatron's ``loss_func`` on the last pipeline stage, one
micro-batch at a time, so a rank never holds more than one micro-batch's
``[b, S, V/TP]`` logits (at V=128k that is what bounds memory), and the other
stages run the unchanged forward-only pipeline schedule.

* :class:`MegatronTeacher` builds this rank's GPT chunk with
  :func:`nemo_kd.models.build_gpt_model` and runs Megatron's
  ``get_forward_backward_func()(forward_only=True)``, so PP (and TP, and DP over the
  data) work exactly as in training. Weights come from a *loader*:
  ``loader(path, tp_rank, tp_size, pp_rank, pp_size) -> (model_chunk, GPTModelConfig)``
  (:data:`CheckpointLoader`). The default loader, :func:`load_megatron_teacher`,
  reads converted Megatron checkpoints and Hugging Face directories through
  :func:`nemo_kd.convert.checkpoint_io.build_and_load`, and the local format of
  :func:`save_full_checkpoint` (``gpt_config.json`` + ``full_state_dict.pt``,
  a full TP=1/PP=1 state dict loaded with ``torch.load(weights_only=True)`` and cut
  with :func:`nemo_kd.models.shard_state_dict`).
* :class:`HFTeacher` wraps ``transformers.AutoModelForCausalLM`` (``trust_remote_code``
  off unless asked): full-vocabulary logits, i.e. a TP=1 shard (group ``None``).

:func:`teacher_hash` fingerprints a checkpoint cheaply and stably: sha256 over the
*contents* of its small config files (``*.json``, ``*.yaml``, ``*.yml``, ``*.txt``
under 1 MiB) and the *relative names and byte sizes* of every other file (weights),
walked in sorted order. It does not read weight bytes (a 70B checkpoint would take
minutes), so it changes when a config, a file name or a file size changes – the
usual signature of another checkpoint – but not for an in-place edit of weights
that keeps sizes; the store's teacher name records the path for humans.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

__all__ = [
    "CheckpointLoader",
    "HFTeacher",
    "LogitsCallback",
    "MegatronTeacher",
    "Teacher",
    "TeacherSpec",
    "build_teacher",
    "load_full_checkpoint",
    "load_megatron_teacher",
    "load_megatron_teacher_chunks",
    "save_full_checkpoint",
    "teacher_hash",
]

# callback(first_row, logits_shard [b, S, V/TP], tp_group)
LogitsCallback = Callable[[int, torch.Tensor, Any], None]
# loader(path, tp_rank, tp_size, pp_rank, pp_size) -> (this rank's GPT chunk, its GPTModelConfig)
CheckpointLoader = Callable[[str, int, int, int, int], Tuple[torch.nn.Module, Any]]

FULL_CONFIG_FILE = "gpt_config.json"
FULL_WEIGHTS_FILE = "full_state_dict.pt"
_SMALL_CONFIG_EXT = (".json", ".yaml", ".yml", ".txt")
_SMALL_CONFIG_MAX = 1 << 20
_HASH_DOMAIN = b"nemo_kd.teacher_hash.v1\n"


def teacher_hash(path: str) -> str:
    """``sha256:<hex>`` of a checkpoint file or directory (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such teacher checkpoint: {path}")
    h = hashlib.sha256(_HASH_DOMAIN)
    if os.path.isfile(path):
        files = [(os.path.basename(path), path)]
    else:
        files = []
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(root, name)
                files.append((os.path.relpath(full, path).replace(os.sep, "/"), full))
        files.sort()
    for rel, full in files:
        size = os.path.getsize(full)
        h.update(f"{rel}\0{size}\0".encode())
        if rel.endswith(_SMALL_CONFIG_EXT) and size <= _SMALL_CONFIG_MAX:
            with open(full, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return "sha256:" + h.hexdigest()


class Teacher:
    """Interface of an extraction teacher (see the module docstring)."""

    name: str = ""
    hash: str = ""
    vocab_size: int = 0  # the real vocabulary (ids >= this are padding columns, never returned)
    max_seq_length: Optional[int] = None  # longest sequence the model accepts (None: unknown)
    packs_sequences = False  # run() takes packed rows (position_ids, segment_ids)

    @property
    def tp_group(self):
        return None

    @property
    def owns_logits(self) -> bool:
        """Whether this rank receives logits (the last pipeline stage)."""
        return True

    def run(self, tokens: torch.Tensor, callback: LogitsCallback, micro_batch_size: Optional[int] = None,
            output_chunk_tokens: Optional[int] = None) -> None:
        """Forward ``tokens`` ``[B, S]``; ``callback(first_row, logits [mbs, S, V/TP], tp_group)`` per
        micro-batch on the last stage. ``output_chunk_tokens``: defer the output projection — the
        callback gets a :class:`~nemo_kd.losses.projection.ProjectedLogits` of the final hidden
        states ``[mbs·S, H]`` (row ``r·S + p``) and projects only the rows it needs, in chunks."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- Megatron


def save_full_checkpoint(path: str, full_state_dict, cfg) -> None:
    """Write the local teacher format: ``gpt_config.json`` + ``full_state_dict.pt`` (tensors only)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in full_state_dict.items() if torch.is_tensor(v)}
    torch.save(tensors, os.path.join(path, FULL_WEIGHTS_FILE))
    with open(os.path.join(path, FULL_CONFIG_FILE), "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")


def _read_full_checkpoint(path: str):
    """``(GPTModelConfig, full state dict)`` of the local format (:func:`save_full_checkpoint`)."""
    from nemo_kd.models import GPTModelConfig

    with open(os.path.join(path, FULL_CONFIG_FILE)) as f:
        cfg = GPTModelConfig.from_dict(json.load(f))
    return cfg, torch.load(os.path.join(path, FULL_WEIGHTS_FILE), map_location="cpu", weights_only=True)


def load_full_checkpoint(path: str, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int):
    """Local fallback loader: build this rank's chunk and load its shard of a full state dict."""
    from nemo_kd.convert.checkpoint_io import build_from_full_state_dict

    cfg, full = _read_full_checkpoint(path)
    # the chunk is built for the initialised parallel state: the loader's ranks must be its ranks
    if (tp_rank, tp_size, pp_rank, pp_size) != (state_ranks := _current_ranks()):
        raise ValueError(f"{path}: asked for TP/PP ranks {(tp_rank, tp_size, pp_rank, pp_size)} but the parallel "
                         f"state is {state_ranks}")
    return build_from_full_state_dict(cfg, full, path), cfg


def _current_ranks():
    from nemo_kd.parallel import state

    return state.tp_rank(), state.tp_size(), state.pp_rank(), state.pp_size()


def load_megatron_teacher(path: str, tp_rank: int, tp_size: int, pp_rank: int, pp_size: int):
    """Default :data:`CheckpointLoader`.

    The local full-state-dict format (:func:`save_full_checkpoint`), else a ``.nemo`` of a
    distilled student, a converted
    nemo_kd Megatron checkpoint (dist-checkpoint, any TP/PP) or a Hugging Face model
    directory streamed straight into this rank's shard
    (:func:`nemo_kd.convert.checkpoint_io.build_and_load`, which reads TP/PP from the
    initialised parallel state).
    """
    if os.path.isdir(path) and os.path.exists(os.path.join(path, FULL_CONFIG_FILE)):
        return load_full_checkpoint(path, tp_rank, tp_size, pp_rank, pp_size)
    chunks, cfg = load_megatron_teacher_chunks(path)
    if len(chunks) != 1:
        raise ValueError(f"{path}: one teacher chunk per rank asked for, and the parallel state has virtual pipeline "
                         "stages (load_megatron_teacher_chunks loads one per stage)")
    return chunks[0], cfg


def load_megatron_teacher_chunks(path: str):
    """``(this rank's model chunks, GPTModelConfig)`` of a teacher at the initialised layout, one chunk per virtual
    pipeline stage (an online teacher beside a student with them): every format :func:`load_megatron_teacher`
    reads."""
    from nemo_kd.convert.checkpoint_io import build_and_load, build_chunks_from_full_state_dict

    if os.path.isdir(path) and os.path.exists(os.path.join(path, FULL_CONFIG_FILE)):
        cfg, full = _read_full_checkpoint(path)
        return build_chunks_from_full_state_dict(cfg, full, path), cfg
    loaded = build_and_load(path)
    return list(loaded.model_chunks), loaded.arch.model


class MegatronTeacher(Teacher):
    """This rank's TP/PP chunk of a Megatron-core GPT teacher, run forward-only.

    Requires :func:`nemo_kd.parallel.initialize_parallel` first. ``loader`` defaults
    to :func:`load_megatron_teacher`.
    """

    packs_sequences = True

    def __init__(self, path: str, loader: Optional[CheckpointLoader] = None, name: Optional[str] = None):
        from nemo_kd.parallel import state

        if not state.is_initialized():
            raise RuntimeError("initialize_parallel(...) must run before MegatronTeacher")
        self.path = os.fspath(path)
        self.name = name or self.path
        self.hash = teacher_hash(self.path)
        self.model, self.model_config = (loader or load_megatron_teacher)(
            self.path, state.tp_rank(), state.tp_size(), state.pp_rank(), state.pp_size()
        )
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.vocab_size = int(self.model_config.vocab_size)
        self.max_seq_length = int(self.model_config.max_position_embeddings)
        self._state = state
        self._device = state.device()

    @property
    def tp_group(self):
        return self._state.tp_group() if self._state.tp_size() > 1 else None

    @property
    def owns_logits(self) -> bool:
        return self._state.is_pipeline_last_stage()

    def run(self, tokens: torch.Tensor, callback: LogitsCallback, micro_batch_size: Optional[int] = None,
            output_chunk_tokens: Optional[int] = None, position_ids: Optional[torch.Tensor] = None,
            segment_ids: Optional[torch.Tensor] = None) -> None:
        """Forward ``tokens`` ``[B, S]`` in micro-batches; ``callback(first_row, logits, tp_group)`` on the
        last stage. Packed rows (:mod:`nemo_kd.data.packing`): ``position_ids`` and ``segment_ids``
        ``[B, S]``, attention kept inside each segment."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from nemo_kd.data.packing import ModelInputs, schedule_shape

        from nemo_kd.losses.projection import ProjectedLogits
        from nemo_kd.models.deferred_projection import DeferredOutputProjection, run_model

        deferred = DeferredOutputProjection(self.model) if output_chunk_tokens else None
        b, s = tokens.shape
        mbs = min(micro_batch_size or b, b)
        if b % mbs:
            raise ValueError(f"batch of {b} rows is not a multiple of micro_batch_size {mbs}")
        tokens = tokens.to(self._device)
        if position_ids is None:
            position_ids = torch.arange(s, device=self._device)[None].expand(b, s)
        position_ids = position_ids.to(self._device)
        segment_ids = segment_ids.to(self._device) if segment_ids is not None else None
        group = self.tp_group
        starts = list(range(0, b, mbs))
        micro = iter(starts)

        def forward_step(data_iterator, model):
            first = next(data_iterator)
            rows = slice(first, first + mbs)
            # packed rows: Megatron's THD layout (packed_seq_params), the output back in rows
            x = ModelInputs.of(tokens[rows], position_ids[rows], segment_ids[rows] if segment_ids is not None else None)
            output, weight = run_model(model, deferred, *x.args, **x.kwargs)

            def loss_func(logits):
                logits = x.rows(logits)
                if weight is not None:  # deferred: the final hidden states [mbs, S, H]
                    logits = ProjectedLogits.of_hidden_states(logits, weight, output_chunk_tokens)
                callback(first, logits, group)
                return torch.zeros(1, device=logits.device), {}

            return output, loss_func

        seq_length, schedule_mbs = schedule_shape(mbs, s, packed=segment_ids is not None)
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=micro,
                model=[self.model],
                num_microbatches=len(starts),
                seq_length=seq_length,
                micro_batch_size=schedule_mbs,
                forward_only=True,
            )


# ----------------------------------------------------------------------------- Hugging Face


_HF_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}


class HFTeacher(Teacher):
    """A ``transformers`` causal LM teacher (TP=1, PP=1; DP over the data still works)."""

    def __init__(self, path: str, trust_remote_code: bool = False, dtype: str = "float32",
                 device: Optional[torch.device] = None, name: Optional[str] = None, model=None):
        self.path = os.fspath(path)
        self.name = name or self.path
        if dtype not in _HF_DTYPES:
            raise ValueError(f"teacher dtype must be one of {sorted(_HF_DTYPES)}, got {dtype!r}")
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(
                self.path, trust_remote_code=bool(trust_remote_code), dtype=_HF_DTYPES[dtype]
            )
        self.hash = teacher_hash(self.path)
        self._device = device or (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                  else torch.device("cpu"))
        self.model = model.to(self._device).eval()
        cfg = self.model.config
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self.max_seq_length = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    def run(self, tokens: torch.Tensor, callback: LogitsCallback, micro_batch_size: Optional[int] = None,
            output_chunk_tokens: Optional[int] = None) -> None:
        if output_chunk_tokens:
            raise ValueError("fuse_output_layer needs a Megatron teacher (a transformers model computes its own "
                             "logits); set fuse_output_layer=false for teacher.type=hf")
        b, s = tokens.shape
        mbs = min(micro_batch_size or b, b)
        tokens = tokens.to(self._device)
        with torch.no_grad():
            for first in range(0, b, mbs):
                # Right padding + causal attention: padded positions never influence real ones,
                # so no attention mask is needed (and none changes the kernels between runs).
                logits = self.model(input_ids=tokens[first:first + mbs], use_cache=False).logits
                callback(first, logits, None)


# ----------------------------------------------------------------------------- factory


@dataclass
class TeacherSpec:
    type: str = "megatron"  # megatron | hf
    path: str = ""
    trust_remote_code: bool = False
    dtype: str = "float32"  # HF only; a Megatron teacher's dtype is its GPTModelConfig.params_dtype
    name: Optional[str] = None


def build_teacher(spec: TeacherSpec, loader: Optional[CheckpointLoader] = None) -> Teacher:
    if not spec.path:
        raise ValueError("teacher.path is required")
    if spec.type == "megatron":
        return MegatronTeacher(spec.path, loader=loader, name=spec.name)
    if spec.type == "hf":
        if not os.path.isdir(spec.path):  # transformers' own error for a file reads "not a valid JSON file"
            kind = "a .nemo file" if spec.path.endswith(".nemo") else ("a file" if os.path.exists(spec.path) else
                                                                       "missing")
            raise ValueError(f"teacher.type=hf needs a Hugging Face model directory (config.json + weights); "
                             f"teacher.path={spec.path} is {kind}"
                             + (": use teacher.type=megatron, which loads .nemo files" if kind == "a .nemo file"
                                else ""))
        from nemo_kd.parallel import state

        if state.is_initialized() and (state.tp_size() > 1 or state.pp_size() > 1):
            raise ValueError("a Hugging Face teacher runs at TP=1, PP=1 (DP over the data only); "
                             "convert it to Megatron for tensor/pipeline parallelism")
        return HFTeacher(spec.path, trust_remote_code=spec.trust_remote_code, dtype=spec.dtype, name=spec.name)
    raise ValueError(f"teacher.type must be 'megatron' or 'hf', got {spec.type!r}")
