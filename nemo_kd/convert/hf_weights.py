"""Tensor names and layouts between Hugging Face checkpoints and Megatron GPT models.

One :class:`TensorRule` per tensor of the *full* (TP=1, PP=1) Megatron state dict says
which HF tensors it is made of and how (``layout``):

* ``copy`` -- same tensor (norms, embeddings, o_proj/down_proj, biases);
* ``transpose`` -- GPT-2 ``Conv1D`` weights are stored ``[in, out]``, Megatron ``[out, in]``;
* ``qkv`` -- separate q/k/v projections -> Megatron's per-query-group interleaved
  ``linear_qkv`` (for each KV group: its query heads, then its key head, then its value
  head), the layout :mod:`nemo_kd.models.sharding` splits over TP;
* ``fused_qkv`` / ``fused_qkv_conv1d`` -- GPT-2's ``c_attn`` ``[q; k; v]`` (bias / Conv1D weight);
* ``gate_up`` -- SwiGLU ``gate_proj``, ``up_proj`` -> ``linear_fc1 = [gate; up]``.
* gpt-oss's experts are stacked per layer (``experts.gate_up_proj [E, H, 2I]``, ``gate_up_proj_bias [E, 2I]``,
  ``down_proj [E, I, H]``, ``down_proj_bias [E, H]``, stored ``[in, out]``): a rule with ``expert = e``
  reads row ``e`` of the stacked tensor (only its bytes, :meth:`SafetensorsReader.get_row`), and
  ``expert_gate_up`` turns ``gate_up_proj[e]``, whose columns interleave gate and up (``gate = [:, 0::2]``,
  ``up = [:, 1::2]``), into ``linear_fc1 = [gate^T; up^T]`` (its bias likewise), ``expert_down`` is a
  transpose. Export stacks the E experts back. An MXFP4 checkpoint stores ``gate_up_proj`` /
  ``down_proj`` as ``*_blocks`` + ``*_scales`` (:mod:`nemo_kd.convert.mxfp4`), dequantised on read.

Vocabulary rows are *not* padded here: the full tensor has the HF ``vocab_size`` rows and
:func:`nemo_kd.models.sharding.shard_state_dict` pads it to Megatron's multiple; export
trims back to ``vocab_size``. All layouts are pure reshapes/concatenations, so
HF -> Megatron -> HF is bit-identical when the dtype is kept.

Streaming: :class:`SafetensorsReader` memory-maps the checkpoint and reads one tensor at a
time; :func:`load_hf_weights` fills a live model's TP/PP shard tensor by tensor (peak: the
shard plus one full tensor); :class:`SafetensorsWriter` writes HF-style shards with
``model.safetensors.index.json``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from nemo_kd.convert.hf_config import HFArchitecture
from nemo_kd.convert.mxfp4 import dequantize_mxfp4
from nemo_kd.models.config import GPTModelConfig
from nemo_kd.models.sharding import expert_index, layer_offset, shard_state_dict

__all__ = [
    "TensorRule",
    "weight_rules",
    "hf_to_megatron_tensor",
    "megatron_to_hf_tensors",
    "CorruptCheckpointError",
    "SafetensorsReader",
    "SafetensorsWriter",
    "load_hf_weights",
    "iter_hf_tensors",
    "read_rule_sources",
    "unwrap_model",
]

COPY, TRANSPOSE, QKV, FUSED_QKV, FUSED_QKV_CONV1D, GATE_UP = (
    "copy", "transpose", "qkv", "fused_qkv", "fused_qkv_conv1d", "gate_up")
# gpt-oss's interleaved [in, 2 * out] gate/up columns (weight or bias) of one stacked expert
EXPERT_GATE_UP = "expert_gate_up"
_WORD_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT_LAYER = "output_layer.weight"
_VOCAB_KEYS = (_WORD_EMBEDDING, _OUTPUT_LAYER)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Full Megatron tensor ``megatron_key`` = ``layout`` applied to the HF tensors ``hf_keys``
    (with ``expert = e``: to row ``e`` of each, HF tensors that stack every expert of a layer)."""

    megatron_key: str
    hf_keys: Tuple[str, ...]
    layout: str = COPY
    expert: Optional[int] = None


def weight_rules(arch: HFArchitecture) -> List[TensorRule]:
    """Every tensor of the full Megatron model of ``arch``, in HF checkpoint order."""
    if arch.family == "gpt2":
        return _gpt2_rules(arch.model)
    if arch.family == "gpt_oss":
        return _gpt_oss_rules(arch.model)
    return _llama_rules(arch.model, arch.family)


def _gpt_oss_rules(m: GPTModelConfig) -> List[TensorRule]:
    """gpt-oss: Llama-style names with biases, per-head sinks, a biased router and stacked experts."""
    rules = [TensorRule(_WORD_EMBEDDING, ("model.embed_tokens.weight",))]
    for i in range(m.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, moe = hf + "self_attn.", hf + "mlp."
        rules += [
            TensorRule(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",)),
            TensorRule(mg + "self_attention.linear_qkv.weight", tuple(f"{attn}{p}_proj.weight" for p in "qkv"), QKV),
            TensorRule(mg + "self_attention.linear_qkv.bias", tuple(f"{attn}{p}_proj.bias" for p in "qkv"), QKV),
            TensorRule(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
            TensorRule(mg + "self_attention.linear_proj.bias", (attn + "o_proj.bias",)),
            TensorRule(mg + "self_attention.core_attention.softmax_offset", (attn + "sinks",)),
            TensorRule(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)),
            TensorRule(mg + "mlp.router.weight", (moe + "router.weight",)),
            TensorRule(mg + "mlp.router.bias", (moe + "router.bias",)),
        ]
        experts = moe + "experts."
        for e in range(m.num_moe_experts):
            expert = f"{mg}mlp.experts.local_experts.{e}."
            rules += [
                TensorRule(expert + "linear_fc1.weight", (experts + "gate_up_proj",), EXPERT_GATE_UP, e),
                TensorRule(expert + "linear_fc1.bias", (experts + "gate_up_proj_bias",), EXPERT_GATE_UP, e),
                TensorRule(expert + "linear_fc2.weight", (experts + "down_proj",), TRANSPOSE, e),
                TensorRule(expert + "linear_fc2.bias", (experts + "down_proj_bias",), COPY, e),
            ]
    rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not m.share_embeddings_and_output_weights:
        rules.append(TensorRule(_OUTPUT_LAYER, ("lm_head.weight",)))
    return rules


# HF names inside a sparse layer: (block prefix, router, expert e's (gate, up, down) projections).
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe.", "gate.weight", ("experts.{e}.w1.weight", "experts.{e}.w3.weight",
                                                     "experts.{e}.w2.weight")),
    "qwen3_moe": ("mlp.", "gate.weight", ("experts.{e}.gate_proj.weight", "experts.{e}.up_proj.weight",
                                          "experts.{e}.down_proj.weight")),
}


def _moe_rules(m: GPTModelConfig, family: str, hf: str, mg: str) -> List[TensorRule]:
    """A sparse layer: the router (``mlp.router.weight`` = HF ``gate``) and every routed expert under its
    global index (the local spec's ``SequentialMLP`` names; EP ranks renumber them on load)."""
    if m.add_bias_linear:
        raise ValueError(f"{family}: expert biases are not converted (add_bias_linear)")
    block, router, (gate, up, down) = _MOE_NAMES[family]
    rules = [TensorRule(mg + "mlp.router.weight", (hf + block + router,))]
    for e in range(m.num_moe_experts):
        expert = f"{mg}mlp.experts.local_experts.{e}."
        rules.append(TensorRule(expert + "linear_fc1.weight",
                                (hf + block + gate.format(e=e), hf + block + up.format(e=e)), GATE_UP))
        rules.append(TensorRule(expert + "linear_fc2.weight", (hf + block + down.format(e=e),)))
    return rules


def _llama_rules(m: GPTModelConfig, family: Optional[str] = None) -> List[TensorRule]:
    rules = [TensorRule(_WORD_EMBEDDING, ("model.embed_tokens.weight",))]
    has_qkv_bias = m.add_qkv_bias or m.add_bias_linear
    moe_pattern = m.moe_layer_pattern()
    if any(moe_pattern) and family not in _MOE_NAMES:
        raise ValueError(f"a mixture-of-experts model has no {family} tensor names; MoE families: {sorted(_MOE_NAMES)}")
    for i in range(m.num_layers):
        hf, mg = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn, mlp = hf + "self_attn.", hf + "mlp."
        rules.append(TensorRule(mg + "input_layernorm.weight", (hf + "input_layernorm.weight",)))
        rules.append(TensorRule(mg + "self_attention.linear_qkv.weight",
                                tuple(f"{attn}{p}_proj.weight" for p in "qkv"), QKV))
        if has_qkv_bias:
            rules.append(TensorRule(mg + "self_attention.linear_qkv.bias",
                                    tuple(f"{attn}{p}_proj.bias" for p in "qkv"), QKV))
        if m.qk_layernorm:
            rules.append(TensorRule(mg + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",)))
            rules.append(TensorRule(mg + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",)))
        rules.append(TensorRule(mg + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)))
        if m.add_bias_linear:
            rules.append(TensorRule(mg + "self_attention.linear_proj.bias", (attn + "o_proj.bias",)))
        rules.append(TensorRule(mg + "pre_mlp_layernorm.weight", (hf + "post_attention_layernorm.weight",)))
        if moe_pattern[i]:
            rules += _moe_rules(m, family, hf, mg)
            continue
        rules.append(TensorRule(mg + "mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), GATE_UP))
        if m.add_bias_linear:
            rules.append(TensorRule(mg + "mlp.linear_fc1.bias", (mlp + "gate_proj.bias", mlp + "up_proj.bias"), GATE_UP))
        rules.append(TensorRule(mg + "mlp.linear_fc2.weight", (mlp + "down_proj.weight",)))
        if m.add_bias_linear:
            rules.append(TensorRule(mg + "mlp.linear_fc2.bias", (mlp + "down_proj.bias",)))
    rules.append(TensorRule("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not m.share_embeddings_and_output_weights:
        rules.append(TensorRule(_OUTPUT_LAYER, ("lm_head.weight",)))
    return rules


def _gpt2_rules(m: GPTModelConfig) -> List[TensorRule]:
    t = "transformer."
    rules = [TensorRule(_WORD_EMBEDDING, (t + "wte.weight",)),
             TensorRule("embedding.position_embeddings.weight", (t + "wpe.weight",))]
    for i in range(m.num_layers):
        hf, mg = f"{t}h.{i}.", f"decoder.layers.{i}."
        for suffix in ("weight", "bias"):
            rules.append(TensorRule(mg + f"input_layernorm.{suffix}", (hf + f"ln_1.{suffix}",)))
        rules += [
            TensorRule(mg + "self_attention.linear_qkv.weight", (hf + "attn.c_attn.weight",), FUSED_QKV_CONV1D),
            TensorRule(mg + "self_attention.linear_qkv.bias", (hf + "attn.c_attn.bias",), FUSED_QKV),
            TensorRule(mg + "self_attention.linear_proj.weight", (hf + "attn.c_proj.weight",), TRANSPOSE),
            TensorRule(mg + "self_attention.linear_proj.bias", (hf + "attn.c_proj.bias",)),
        ]
        for suffix in ("weight", "bias"):
            rules.append(TensorRule(mg + f"pre_mlp_layernorm.{suffix}", (hf + f"ln_2.{suffix}",)))
        rules += [
            TensorRule(mg + "mlp.linear_fc1.weight", (hf + "mlp.c_fc.weight",), TRANSPOSE),
            TensorRule(mg + "mlp.linear_fc1.bias", (hf + "mlp.c_fc.bias",)),
            TensorRule(mg + "mlp.linear_fc2.weight", (hf + "mlp.c_proj.weight",), TRANSPOSE),
            TensorRule(mg + "mlp.linear_fc2.bias", (hf + "mlp.c_proj.bias",)),
        ]
    for suffix in ("weight", "bias"):
        rules.append(TensorRule(f"decoder.final_layernorm.{suffix}", (t + f"ln_f.{suffix}",)))
    if not m.share_embeddings_and_output_weights:
        rules.append(TensorRule(_OUTPUT_LAYER, ("lm_head.weight",)))
    return rules


# ---------------------------------------------------------------- per-tensor layout transforms
def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: GPTModelConfig) -> torch.Tensor:
    groups = m.num_query_groups
    # [heads * hn, ...] -> [groups, heads_per_group * hn, ...]: trailing dims (hidden, or none for biases) ride along.
    parts = [t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def _deinterleave_qkv(qkv: torch.Tensor, m: GPTModelConfig) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hn = m.num_query_groups, m.kv_channels
    q_rows = m.num_attention_heads // groups * hn
    per_group = qkv.reshape(groups, q_rows + 2 * hn, *qkv.shape[1:])
    q, k, v = per_group.split([q_rows, hn, hn], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


def hf_to_megatron_tensor(rule: TensorRule, hf_tensors: Sequence[torch.Tensor], m: GPTModelConfig) -> torch.Tensor:
    """The full Megatron tensor of ``rule`` from its HF tensors (vocabulary rows unpadded)."""
    if rule.layout == COPY:
        return hf_tensors[0]
    if rule.layout == TRANSPOSE:
        return hf_tensors[0].t().contiguous()
    if rule.layout == QKV:
        return _interleave_qkv(*hf_tensors, m)
    if rule.layout in (FUSED_QKV, FUSED_QKV_CONV1D):
        fused = hf_tensors[0].t() if rule.layout == FUSED_QKV_CONV1D else hf_tensors[0]
        return _interleave_qkv(*fused.chunk(3, dim=0), m)
    if rule.layout == GATE_UP:
        return torch.cat(list(hf_tensors), dim=0)
    if rule.layout == EXPERT_GATE_UP:  # [in, 2 out] (weight) / [2 out] (bias), gate and up interleaved
        gate_up = hf_tensors[0]
        return torch.cat([gate_up[..., 0::2].t(), gate_up[..., 1::2].t()] if gate_up.dim() == 2
                         else [gate_up[0::2], gate_up[1::2]], dim=0).contiguous()
    raise ValueError(f"unknown layout {rule.layout!r}")


def megatron_to_hf_tensors(rule: TensorRule, tensor: torch.Tensor, m: GPTModelConfig) -> Dict[str, torch.Tensor]:
    """HF tensors of ``rule`` from the full Megatron tensor (inverse of :func:`hf_to_megatron_tensor`)."""
    if rule.megatron_key in _VOCAB_KEYS:
        tensor = tensor[: m.vocab_size]  # drop Megatron's padding rows
    if rule.layout == COPY:
        return {rule.hf_keys[0]: tensor.contiguous()}
    if rule.layout == TRANSPOSE:
        return {rule.hf_keys[0]: tensor.t().contiguous()}
    if rule.layout == QKV:
        return dict(zip(rule.hf_keys, _deinterleave_qkv(tensor, m)))
    if rule.layout in (FUSED_QKV, FUSED_QKV_CONV1D):
        fused = torch.cat(_deinterleave_qkv(tensor, m), dim=0)
        return {rule.hf_keys[0]: fused.t().contiguous() if rule.layout == FUSED_QKV_CONV1D else fused}
    if rule.layout == GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        return dict(zip(rule.hf_keys, (gate.contiguous(), up.contiguous())))
    if rule.layout == EXPERT_GATE_UP:
        gate, up = tensor.chunk(2, dim=0)
        if tensor.dim() == 2:  # [2 out, in] -> [in, 2 out] with gate / up columns interleaved
            gate, up = gate.t(), up.t()
        return {rule.hf_keys[0]: torch.stack((gate, up), dim=-1).flatten(-2).contiguous()}
    raise ValueError(f"unknown layout {rule.layout!r}")


# ---------------------------------------------------------------- safetensors I/O
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class CorruptCheckpointError(ValueError):
    """An HF checkpoint file that is missing, unreadable or inconsistent with its config/index."""


class SafetensorsReader:
    """Random access to the tensors of an HF checkpoint directory, one tensor at a time.

    Handles a single ``model.safetensors`` or shards listed in ``model.safetensors.index.json``.
    Headers are validated with ``safe_open`` when the reader opens; each tensor is then
    read on its own with ``pread`` (see :meth:`get`), so memory grows by one tensor at a time.
    GPT-2 checkpoints saved without the ``transformer.`` prefix (the original hub layout)
    are resolved transparently.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index_path = os.path.join(hf_dir, "model.safetensors.index.json")
        single_path = os.path.join(hf_dir, "model.safetensors")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    self._file_of = dict(json.load(f)["weight_map"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CorruptCheckpointError(f"corrupt {index_path}: {e!r}") from e
            files = sorted(set(self._file_of.values()))
        elif os.path.isfile(single_path):
            files = ["model.safetensors"]
            self._file_of = None  # filled from the file's header below
        else:
            found = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".pth")))
            raise FileNotFoundError(
                f"{hf_dir!r} has no model.safetensors or model.safetensors.index.json"
                + (f" (found {found}: re-save with save_pretrained(..., safe_serialization=True))" if found else ""))
        self._headers: Dict[str, tuple] = {}
        self._handles = {name: self._open(name) for name in files}
        keys_in = {name: frozenset(handle.keys()) for name, handle in self._handles.items()}
        if self._file_of is None:
            self._file_of = {key: files[0] for key in keys_in[files[0]]}
        for key, name in self._file_of.items():
            if key not in keys_in[name]:
                raise CorruptCheckpointError(f"{name} does not contain {key!r} although the index lists it there")

    def _open(self, name: str):
        from safetensors import safe_open

        path = os.path.join(self.hf_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint shard {path} (listed in the index) is missing")
        try:
            return safe_open(path, framework="pt")
        except Exception as e:  # SafetensorError: bad header, truncated file
            raise CorruptCheckpointError(f"corrupt safetensors file {path}: {e}") from e

    def keys(self) -> List[str]:
        return list(self._file_of)

    def resolve(self, key: str) -> Optional[str]:
        """The stored name of ``key`` (None if absent)."""
        if key in self._file_of:
            return key
        if key.startswith("transformer.") and key[len("transformer."):] in self._file_of:
            return key[len("transformer."):]
        return None

    def __contains__(self, key: str) -> bool:
        return self.resolve(key) is not None

    def get(self, key: str) -> torch.Tensor:
        """A fresh tensor with ``key``'s data, read with ``pread`` into its own buffer.

        Not through the memory map: file pages touched through a map count towards this
        process's resident set until the map closes, so mapped reads would grow RSS by the
        whole checkpoint over an import. ``safe_open`` has validated the header.
        """
        return self._read(key, None)

    def get_row(self, key: str, index: int) -> torch.Tensor:
        """``get(key)[index]``, reading only that row's bytes (a stacked expert of a gpt-oss layer)."""
        return self._read(key, index)

    def _read(self, key: str, index: Optional[int]) -> torch.Tensor:
        stored = self.resolve(key)
        if stored is None:
            raise CorruptCheckpointError(f"tensor {key!r} is missing from the checkpoint in {self.hf_dir}")
        name = self._file_of[stored]
        path = os.path.join(self.hf_dir, name)
        header, data_start = self._header(name)
        entry = header[stored]
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CorruptCheckpointError(f"{stored!r} in {path}: unsupported dtype {entry['dtype']!r}")
        begin, end = entry["data_offsets"]
        shape = list(entry["shape"])
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise CorruptCheckpointError(f"{stored!r} in {path} has shape {shape}: no row {index}")
            row_bytes = (end - begin) // shape[0]
            begin, end, shape = begin + index * row_bytes, begin + (index + 1) * row_bytes, shape[1:]
        buffer = bytearray(end - begin)
        with open(path, "rb") as f:
            read = os.preadv(f.fileno(), [buffer], data_start + begin) if buffer else 0
        if read != len(buffer):
            raise CorruptCheckpointError(f"{path} is truncated: {stored!r} needs bytes {begin}..{end}")
        flat = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
        return flat.reshape(shape)

    def _header(self, name: str):
        """(tensor entries, byte offset of the data section) of one safetensors file."""
        if name not in self._headers:
            with open(os.path.join(self.hf_dir, name), "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            self._headers[name] = (header, 8 + length)
        return self._headers[name]


class SafetensorsWriter:
    """Writes tensors into HF-style safetensors shards of at most ``max_shard_bytes`` each.

    Tensors are buffered until a shard is full, then written: peak extra memory is one
    shard. ``close()`` names the files ``model-0000i-of-0000N.safetensors`` and writes
    ``model.safetensors.index.json`` (or a single ``model.safetensors`` when everything
    fits in one shard), like ``save_pretrained``.
    """

    def __init__(self, out_dir: str, max_shard_bytes: int = 5 * 1024**3):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.max_shard_bytes = out_dir, max_shard_bytes
        self._buffer: Dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: List[List[str]] = []  # names per written shard
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # clone views (e.g. trimmed vocab rows) so no two saved tensors share storage with a param
        self._buffer[name] = tensor if tensor.untyped_storage().nbytes() == nbytes else tensor.clone()
        self._buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self._buffer, self._tmp_name(len(self._shards)), metadata={"format": "pt"})
        self._shards.append(list(self._buffer))
        self._buffer, self._buffer_bytes = {}, 0

    def _tmp_name(self, i: int) -> str:
        return os.path.join(self.out_dir, f".shard-{i:05d}.safetensors.tmp")

    def close(self) -> List[str]:
        """Finish writing; returns the file names written."""
        if self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            names = ["model.safetensors"]
        else:
            names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for i, name in enumerate(names):
            os.replace(self._tmp_name(i), os.path.join(self.out_dir, name))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {key: names[i] for i, keys in enumerate(self._shards) for key in keys}}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        return names


# ---------------------------------------------------------------- import into live models / export
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside Float16Module / DDP wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _global_key(local_key: str, offset: int, first_expert: int = 0) -> str:
    """The full model's name of a stage's tensor: layer ``i`` is global layer ``i + offset``; a routed
    expert's local index ``j`` (this EP rank's) is global expert ``first_expert + j``."""
    if local_key.startswith("decoder.layers."):
        index, rest = local_key[len("decoder.layers."):].split(".", 1)
        local_key = f"decoder.layers.{int(index) + offset}.{rest}"
    expert = expert_index(local_key)
    if expert is not None and first_expert:
        prefix, j, suffix = expert
        local_key = f"{prefix}{first_expert + j}{suffix}"
    return local_key


def read_rule_sources(reader: SafetensorsReader, rule: TensorRule) -> List[torch.Tensor]:
    """The HF tensors of ``rule`` (row ``rule.expert`` of stacked expert tensors).

    A stacked expert weight absent under its own name but present as MXFP4 ``<name>_blocks`` +
    ``<name>_scales`` (gpt-oss's shipped checkpoints) is dequantised to fp32 (exact: see
    :mod:`nemo_kd.convert.mxfp4`) and transposed to the HF parameter's ``[in, out]`` layout.
    """
    if rule.expert is None:
        return [reader.get(k) for k in rule.hf_keys]
    out = []
    for key in rule.hf_keys:
        if key in reader or not (key + "_blocks" in reader and key + "_scales" in reader):
            out.append(reader.get_row(key, rule.expert))  # a missing tensor is reported under its own name
            continue
        try:
            dense = dequantize_mxfp4(reader.get_row(key + "_blocks", rule.expert),
                                     reader.get_row(key + "_scales", rule.expert), name=key)
        except ValueError as e:
            raise CorruptCheckpointError(f"{reader.hf_dir}: expert {rule.expert}: {e}") from e
        out.append(dense.t())
    return out


def load_hf_weights(
    model_chunks: Sequence[torch.nn.Module],
    arch: HFArchitecture,
    reader: SafetensorsReader,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    vpp_size: Optional[int] = None,
    progress: bool = False,
    ep_rank: int = 0,
    ep_size: int = 1,
    etp_rank: Optional[int] = None,
    etp_size: Optional[int] = None,
) -> None:
    """Fill this rank's model chunks (one per virtual pipeline stage) from an HF checkpoint.

    Mixture-of-experts layers: EP rank ``r`` of ``ep_size`` reads only its experts
    ``[r E / ep_size, (r + 1) E / ep_size)``; each is split over the expert tensor-parallel ranks
    (``etp_rank`` of ``etp_size``; None: the TP ones, Megatron's default) like a dense MLP.

    Streams: for each tensor the chunk holds, the HF source tensors are read, laid out as
    the full Megatron tensor, cut to this rank's shard with
    :func:`nemo_kd.models.sharding.shard_state_dict` and copied into the parameter. Peak
    extra memory is one full tensor (the largest is the embedding) and its shard.

    Raises:
        CorruptCheckpointError: a tensor is missing, unreadable or has the wrong shape.
    """
    cfg = arch.model
    rules = {r.megatron_key: r for r in weight_rules(arch)}
    first_expert = ep_rank * (cfg.num_moe_experts // ep_size) if cfg.is_moe else 0
    work = []
    for vp_stage, chunk in enumerate(model_chunks):
        vp = vp_stage if vpp_size else None
        offset = layer_offset(cfg, pp_rank, pp_size, vp, vpp_size)
        for local_key, target in unwrap_model(chunk).state_dict().items():
            if not torch.is_tensor(target) or local_key.endswith("_extra_state"):
                continue
            global_key = _global_key(local_key, offset, first_expert)
            if global_key == _OUTPUT_LAYER and cfg.share_embeddings_and_output_weights:
                global_key = _WORD_EMBEDDING  # the last stage's copy of the tied embedding
            if global_key not in rules:
                raise KeyError(f"no Hugging Face source for Megatron tensor {global_key!r} ({arch.family})")
            work.append((vp, local_key, global_key, target))
    iterator = work
    if progress:
        from tqdm import tqdm

        iterator = tqdm(work, desc="import HF tensors", unit="tensor")
    for vp, local_key, global_key, target in iterator:
        rule = rules[global_key]
        hf_tensors = read_rule_sources(reader, rule)
        _check_shapes(rule, hf_tensors, cfg)
        full = hf_to_megatron_tensor(rule, hf_tensors, cfg)
        del hf_tensors
        shard = shard_state_dict({global_key: full}, cfg, tp_rank, tp_size, pp_rank, pp_size, vp, vpp_size,
                                 ep_rank, ep_size, etp_rank, etp_size)[local_key]
        del full
        if shard.shape != target.shape:
            raise CorruptCheckpointError(
                f"{rule.hf_keys} give Megatron {local_key!r} of shape {tuple(shard.shape)}, the model expects "
                f"{tuple(target.shape)}: config.json and the weights disagree")
        with torch.no_grad():
            target.copy_(shard)


def _expected_hf_shapes(rule: TensorRule, m: GPTModelConfig) -> List[Optional[Tuple[int, ...]]]:
    """HF shapes a rule's inputs must have (None: not checked here; the shard check catches the rest)."""
    h, hn = m.hidden_size, m.kv_channels
    q_rows, kv_rows = m.num_attention_heads * hn, m.num_query_groups * hn
    is_bias = rule.megatron_key.endswith(".bias")
    if rule.layout == QKV:
        return [(q_rows,), (kv_rows,), (kv_rows,)] if is_bias else [(q_rows, h), (kv_rows, h), (kv_rows, h)]
    if rule.layout == FUSED_QKV:
        return [(q_rows + 2 * kv_rows,)]
    if rule.layout == FUSED_QKV_CONV1D:
        return [(h, q_rows + 2 * kv_rows)]
    ffn = m.moe_ffn_hidden_size if expert_index(rule.megatron_key) is not None else m.ffn_hidden_size
    if rule.expert is not None:  # one row of gpt-oss's stacked experts, HF [in, out] layout
        shapes = {"linear_fc1.weight": (h, 2 * ffn), "linear_fc1.bias": (2 * ffn,), "linear_fc2.weight": (ffn, h),
                  "linear_fc2.bias": (h,)}
        return [shapes[".".join(rule.megatron_key.split(".")[-2:])]]
    if rule.megatron_key.endswith(".core_attention.softmax_offset"):
        return [(m.num_attention_heads,)]
    if rule.megatron_key.endswith(".mlp.router.bias"):
        return [(m.num_moe_experts,)]
    if rule.layout == GATE_UP:
        shape = (ffn,) if is_bias else (ffn, h)
        return [shape, shape]
    if rule.megatron_key.endswith(".mlp.router.weight"):
        return [(m.num_moe_experts, h)]
    if expert_index(rule.megatron_key) is not None and rule.megatron_key.endswith("linear_fc2.weight"):
        return [(h, ffn)]
    if rule.megatron_key in _VOCAB_KEYS:
        return [(m.vocab_size, h)]
    return [None] * len(rule.hf_keys)


def _check_shapes(rule: TensorRule, tensors: Sequence[torch.Tensor], m: GPTModelConfig) -> None:
    for key, tensor, shape in zip(rule.hf_keys, tensors, _expected_hf_shapes(rule, m)):
        if shape is not None and tuple(tensor.shape) != shape:
            raise CorruptCheckpointError(
                f"HF tensor {key!r} has shape {tuple(tensor.shape)}, config.json implies {shape}")


def iter_hf_tensors(full_state: Mapping[str, torch.Tensor], arch: HFArchitecture) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs of a full (TP=1, PP=1) Megatron state dict, in checkpoint order.

    Tensors are converted one rule at a time (vocabulary padding trimmed), so a caller
    that writes them out as it goes holds at most one converted tensor besides the model.
    """
    stacks: Dict[str, List[torch.Tensor]] = {}  # gpt-oss: a layer's experts, stacked once all are converted
    for rule in weight_rules(arch):
        if rule.megatron_key not in full_state:
            raise KeyError(f"Megatron state dict has no {rule.megatron_key!r} ({arch.family} export)")
        tensors = megatron_to_hf_tensors(rule, full_state[rule.megatron_key], arch.model)
        if rule.expert is None:
            yield from tensors.items()
            continue
        for name, tensor in tensors.items():
            rows = stacks.setdefault(name, [])
            if len(rows) != rule.expert:
                raise ValueError(f"{arch.family} export: expert rows of {name!r} out of order at expert {rule.expert}")
            rows.append(tensor)
            if len(rows) == arch.model.num_moe_experts:
                yield name, torch.stack(stacks.pop(name))
