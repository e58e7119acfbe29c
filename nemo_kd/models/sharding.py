"""Go between a full (TP=1, PP=1) Megatron GPT state dict and one rank's TP/PP shard.

The full state dict is what a TP=1, PP=1 ``GPTModel.state_dict()`` holds (also the
canonical form the Hugging Face converter reads and writes). Layout rules (Megatron-core
``GPTModel``, local and TE specs):

* column-parallel, split on dim 0: ``linear_qkv`` (weight, bias), ``linear_fc1`` (weight,
  bias), ``embedding.word_embeddings.weight`` and ``output_layer.weight`` (vocab-parallel).
  ``linear_qkv`` is stored in Megatron's per-query-group interleaved layout
  ``[ng * (q_per_group + 2) * hn, h]`` (for each group: its query heads, then k, then v),
  so a contiguous dim-0 split hands each TP rank whole query groups. For SwiGLU,
  ``linear_fc1`` is ``[gate; up]``: each half is split separately and rank ``r`` holds
  ``[gate_r; up_r]``.
* row-parallel, split on dim 1: ``linear_proj.weight``, ``linear_fc2.weight`` (their
  biases are replicated: added after the all-reduce).
* learnable attention sinks (``self_attention.core_attention.softmax_offset``, one logit per query
  head) split on dim 0 like the heads themselves.
* everything else (norms, q/k norms, learned position embeddings, ``_extra_state``) is
  replicated.
* mixture-of-experts layers: the router (``mlp.router.weight``, ``expert_bias``) and the shared
  experts' gate are replicated; the shared experts split like a dense MLP; every routed expert's
  ``linear_fc1`` / ``linear_fc2`` splits like a dense MLP's over TP, and the experts themselves
  are split over the expert-parallel ranks: EP rank ``r`` of ``ep`` holds global experts
  ``[r * E / ep, (r + 1) * E / ep)``, renumbered from 0 (``mlp.experts.local_experts.{i}`` on the
  local spec, ``mlp.experts.linear_fc{1,2}.weight{i}`` for TE's grouped GEMM).
  :func:`merge_expert_shards` puts the EP ranks' experts back together under their global indices.
* the vocabulary dimension is resized to ``cfg.padded_vocab_size(tp_size)`` before the
  split (trailing rows trimmed or zero-padded; the real ``vocab_size`` rows are never touched).
* pipeline stages hold layers ``[offset, offset + n)`` renumbered from 0
  (``decoder.layers.{i - offset}``); the first stage holds the embedding, the last the
  final norm and output layer. With ``share_embeddings_and_output_weights`` a single-stage
  model has no ``output_layer.weight`` and a multi-stage model's last stage holds a copy
  of the word embedding as ``output_layer.weight``.
"""

from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence

import torch

from nemo_kd.models.config import GPTModelConfig

__all__ = [
    "split_kind",
    "layer_offset",
    "shard_state_dict",
    "gather_state_dict",
    "merge_expert_shards",
    "expert_index",
    "COLUMN",
    "ROW",
    "REPLICATED",
]

COLUMN, ROW, REPLICATED = "column", "row", "replicated"

_LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# A routed expert's tensor: SequentialMLP (local spec) or TEGroupedMLP (one weight{i} per local expert).
_SEQUENTIAL_EXPERT = re.compile(r"^(.*\.mlp\.experts\.local_experts\.)(\d+)(\..*)$")
_GROUPED_EXPERT = re.compile(r"^(.*\.mlp\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")
_WORD_EMBEDDING = "embedding.word_embeddings.weight"
_OUTPUT_LAYER = "output_layer.weight"
_VOCAB_KEYS = (_WORD_EMBEDDING, _OUTPUT_LAYER)


def split_kind(key: str) -> str:
    """How parameter ``key`` is split over TP: ``COLUMN`` (dim 0), ``ROW`` (dim 1) or ``REPLICATED``."""
    if key.endswith("_extra_state"):
        return REPLICATED
    if key in _VOCAB_KEYS or re.search(r"\.(linear_qkv|linear_fc1)\.(weight|bias)$", key):
        return COLUMN
    if key.endswith(".core_attention.softmax_offset"):  # learnable attention sinks: one per head
        return COLUMN
    if re.search(r"\.(linear_proj|linear_fc2)\.weight$", key):
        return ROW
    if _GROUPED_EXPERT.match(key):  # TE grouped GEMM: linear_fc1.weight3 is expert 3's fc1
        return COLUMN if ".linear_fc1." in key else (ROW if ".weight" in key else REPLICATED)
    return REPLICATED


def expert_index(key: str):
    """``(prefix, index, suffix)`` of a routed expert's tensor key (``index``: the expert number in the
    key), or None for every other key."""
    match = _SEQUENTIAL_EXPERT.match(key) or _GROUPED_EXPERT.match(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2)), match.group(3) if match.re is _SEQUENTIAL_EXPERT else ""


def _is_gated_fc1(key: str, cfg: GPTModelConfig) -> bool:
    return cfg.gated_linear_unit and re.search(r"\.linear_fc1\.(weight|bias)\d*$", key) is not None


def layer_offset(cfg: GPTModelConfig, pp_rank: int, pp_size: int, vp_stage: Optional[int] = None,
                 vpp_size: Optional[int] = None) -> int:
    """Global index of this stage's first layer (Megatron's uniform split, incl. interleaving)."""
    vpp = vpp_size or 1
    if cfg.num_layers % (pp_size * vpp):
        raise ValueError(f"num_layers ({cfg.num_layers}) not divisible by pp_size ({pp_size}) * vpp ({vpp})")
    per_chunk = cfg.num_layers // (pp_size * vpp)
    return (vp_stage or 0) * (cfg.num_layers // vpp) + pp_rank * per_chunk


def _resize_vocab(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        return t[:rows]
    pad = torch.zeros((rows - t.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    return torch.cat([t, pad], dim=0)


def _split(t: torch.Tensor, key: str, cfg: GPTModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    kind = split_kind(key)
    if key in _VOCAB_KEYS:
        t = _resize_vocab(t, cfg.padded_vocab_size(tp_size))
    if tp_size == 1 or kind == REPLICATED:
        return t.clone()
    dim = 0 if kind == COLUMN else 1
    if t.shape[dim] % tp_size:
        raise ValueError(f"{key}: dim {dim} of shape {tuple(t.shape)} is not divisible by tp_size {tp_size}")
    if _is_gated_fc1(key, cfg):
        gate, up = t.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]], dim=0).clone()
    return t.chunk(tp_size, dim=dim)[tp_rank].clone()


def _merge(parts: Sequence[torch.Tensor], key: str, cfg: GPTModelConfig) -> torch.Tensor:
    kind = split_kind(key)
    if len(parts) == 1 or kind == REPLICATED:
        return parts[0].clone()
    if _is_gated_fc1(key, cfg):
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(parts), dim=0 if kind == COLUMN else 1)


def _stage_has(key: str, cfg: GPTModelConfig, first: bool, last: bool, single_stage: bool) -> bool:
    if key.startswith("embedding."):
        return first
    if key.startswith("decoder.final_layernorm.") or key.startswith("output_layer."):
        if key == _OUTPUT_LAYER and cfg.share_embeddings_and_output_weights:
            return last and not single_stage
        return last
    return True


def shard_state_dict(
    full: Mapping[str, torch.Tensor],
    cfg: GPTModelConfig,
    tp_rank: int = 0,
    tp_size: int = 1,
    pp_rank: int = 0,
    pp_size: int = 1,
    vp_stage: Optional[int] = None,
    vpp_size: Optional[int] = None,
    ep_rank: int = 0,
    ep_size: int = 1,
    etp_rank: Optional[int] = None,
    etp_size: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """This rank's shard of a full (TP=1, PP=1, EP=1) GPT state dict.

    The result loads with ``GPTModel.load_state_dict`` into the model that
    :func:`nemo_kd.models.builder.build_gpt_model` builds on rank (``tp_rank``, ``pp_rank``
    [, ``vp_stage``], ``ep_rank``). Tensors are fresh copies. Routed experts split over the expert
    tensor-parallel ranks (``etp_rank`` of ``etp_size``; None: TP, Megatron's default).
    """
    if etp_size is None:
        etp_rank, etp_size = tp_rank, tp_size
    cfg.validate_parallel(tp_size, pp_size, vpp_size, ep_size, etp_size)
    per_rank = cfg.num_moe_experts // ep_size if cfg.is_moe else 0
    chunks = pp_size * (vpp_size or 1)
    layers_here = cfg.num_layers // chunks
    offset = layer_offset(cfg, pp_rank, pp_size, vp_stage, vpp_size)
    first = pp_rank == 0 and (vp_stage or 0) == 0
    last = pp_rank == pp_size - 1 and (vp_stage is None or vp_stage == (vpp_size or 1) - 1)
    full = dict(full)
    if cfg.share_embeddings_and_output_weights and _OUTPUT_LAYER not in full and _WORD_EMBEDDING in full:
        full[_OUTPUT_LAYER] = full[_WORD_EMBEDDING]  # tied: the last stage holds a copy
    out: Dict[str, torch.Tensor] = {}
    for key, tensor in full.items():
        match = _LAYER_KEY.match(key)
        if match:
            index = int(match.group(1))
            if not offset <= index < offset + layers_here:
                continue
            local_key = f"decoder.layers.{index - offset}.{match.group(2)}"
            expert = expert_index(local_key)
            if expert is not None:  # expert g lives on EP rank g // per_rank as local expert g % per_rank
                prefix, g, suffix = expert
                if g // per_rank != ep_rank:
                    continue
                local_key = f"{prefix}{g % per_rank}{suffix}"
                out[local_key] = _split(tensor, key, cfg, etp_rank, etp_size) if torch.is_tensor(tensor) else tensor
                continue
        else:
            if not _stage_has(key, cfg, first, last, single_stage=chunks == 1):
                continue
            local_key = key
        out[local_key] = _split(tensor, key, cfg, tp_rank, tp_size) if torch.is_tensor(tensor) else tensor
    return out


def merge_expert_shards(ep_shards: Sequence[Mapping[str, torch.Tensor]], cfg: GPTModelConfig) -> Dict[str, torch.Tensor]:
    """One state dict holding every expert from the state dicts of the ``EP`` ranks at one (TP, PP)
    position (``ep_shards[ep_rank]``): local expert ``i`` of EP rank ``r`` becomes expert ``r * E / EP + i``;
    every other tensor is taken from EP rank 0 (the EP ranks hold the same copies of them). The result is
    what an EP=1 rank at that position holds, ready for :func:`gather_state_dict`."""
    ep = len(ep_shards)
    if ep == 1:
        return dict(ep_shards[0])
    if not cfg.is_moe or cfg.num_moe_experts % ep:
        raise ValueError(f"{ep} expert-parallel shards for num_moe_experts={cfg.num_moe_experts}")
    per_rank = cfg.num_moe_experts // ep
    out: Dict[str, torch.Tensor] = {}
    for rank, shard in enumerate(ep_shards):
        for key, value in shard.items():
            expert = expert_index(key)
            if expert is None:
                if rank == 0:
                    out[key] = value
                continue
            prefix, i, suffix = expert
            out[f"{prefix}{rank * per_rank + i}{suffix}"] = value
    return out


def gather_state_dict(
    shards: Sequence[Sequence[Mapping[str, torch.Tensor]]],
    cfg: GPTModelConfig,
    vocab_rows: Optional[int] = None,
    expert_tp_size: Optional[int] = None,
) -> Dict[str, torch.Tensor]:
    """Full (TP=1, PP=1) state dict from ``shards[stage][tp_rank]``, the stages in layer order.

    Args:
        shards: every rank's ``GPTModel.state_dict()``, indexed by pipeline then tensor rank. With virtual
            pipeline stages, every model chunk's, in layer order: virtual stage ``v`` of pipeline rank ``r`` is
            stage ``v * PP + r`` of a non-interleaved pipeline of ``PP * VPP`` stages (:func:`layer_offset`).
        cfg: the architecture.
        vocab_rows: rows of the vocabulary matrices in the result (trimmed or zero-padded);
            None keeps ``cfg.padded_vocab_size(tp_size)``, ``cfg.vocab_size`` unpads.
        expert_tp_size: how the routed experts were split (None: over TP, Megatron's default);
            1: every tensor-parallel rank holds them whole (gpt-oss's biased experts), taken once.

    The inverse of :func:`shard_state_dict`: ``gather(shard(full)) == full`` when the full
    state dict's vocabulary rows equal ``vocab_rows``.
    """
    pp_size, tp_size = len(shards), len(shards[0])
    if any(len(row) != tp_size for row in shards):
        raise ValueError("every pipeline stage needs the same number of tensor-parallel shards")
    if expert_tp_size not in (None, 1, tp_size):
        raise ValueError(f"expert_tp_size={expert_tp_size} with {tp_size} tensor-parallel shards: the experts' "
                         "shards are gathered over TP or held whole (1)")
    cfg.validate_parallel(tp_size, pp_size, expert_tensor_parallel_size=expert_tp_size)
    out: Dict[str, torch.Tensor] = {}
    for pp_rank, stage in enumerate(shards):
        offset = layer_offset(cfg, pp_rank, pp_size)
        for key in stage[0]:
            match = _LAYER_KEY.match(key)
            global_key = f"decoder.layers.{int(match.group(1)) + offset}.{match.group(2)}" if match else key
            if key == _OUTPUT_LAYER and cfg.share_embeddings_and_output_weights:
                continue  # the tied copy: the full model keeps only the embedding
            parts = [stage[t][key] for t in range(tp_size)]
            if expert_tp_size == 1 and expert_index(key) is not None:
                parts = parts[:1]  # whole on every TP rank: one copy, not TP of them concatenated
            out[global_key] = _merge(parts, key, cfg) if torch.is_tensor(parts[0]) else parts[0]
    if vocab_rows is not None:
        for key in _VOCAB_KEYS:
            if key in out:
                out[key] = _resize_vocab(out[key], vocab_rows)
    return out
