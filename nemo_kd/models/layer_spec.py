"""GPT layer specs that run without transformer-engine and apex (CPU and GPU).

``transformer_impl="local"``: Megatron-core's local spec (``get_gpt_layer_local_spec``:
``ColumnParallelLinear``/``RowParallelLinear``, ``MLP``, bias-dropout-add) with

* core attention replaced by :class:`SDPACoreAttention`, a drop-in for Megatron's
  ``DotProductAttention`` built on ``torch.nn.functional.scaled_dot_product_attention``
  (flash / memory-efficient kernels on GPU, a fused kernel on CPU, no ``[b, h, s, s]``
  fp32 score buffer from Megatron's global memory buffer), and
* every norm (input, pre-MLP, q/k, final) pinned to Megatron's ``WrappedTorchNorm``
  (``torch.nn.LayerNorm`` / ``torch.nn.RMSNorm`` chosen by ``config.normalization``).
  Megatron 0.16.1's local spec picks apex's ``FusedLayerNorm`` when apex is importable
  and flips a module global on the first RMSNorm request; pinning the torch norm makes
  the spec identical on every machine and makes both RMSNorm and LayerNorm work.

``transformer_impl="transformer_engine"``: Megatron's TE spec, if TE is importable.

Context parallelism needs the TE spec (TE's context-parallel attention): ``SDPACoreAttention`` attends
within one rank's positions and refuses ``context_parallel_size > 1``. The local spec's core attention is
a ModuleSpec swap (:func:`local_core_attention`): a class marked ``supports_context_parallel`` that
attends across the CP group (the tests' exact reference, ``tests/cp_attention.py``) lifts the refusal
inside that context only.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import tensor_parallel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide

__all__ = ["SDPACoreAttention", "SegmentBuckets", "bucket_length", "get_gpt_layer_spec", "get_gpt_block_spec", "get_gpt_moe_block_spec", "LOCAL",
           "TRANSFORMER_ENGINE", "local_core_attention", "local_spec_supports_context_parallel"]

LOCAL = "local"
TRANSFORMER_ENGINE = "transformer_engine"

# Mask types whose causal structure the module adds itself (the rest use attention_mask only).
_CAUSAL_TYPES = {AttnMaskType.causal, AttnMaskType.padding_causal}


class SDPACoreAttention(MegatronModule):
    """Megatron core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    Same constructor and ``forward`` signature as Megatron's ``DotProductAttention``:
    query ``[sq, b, np, hn]``, key/value ``[sk, b, ng, hn]`` (this rank's heads; ``ng``
    query groups for GQA), output ``[sq, b, np * hn]``.

    Masks follow Megatron's convention: ``attention_mask`` is boolean, broadcastable to
    ``[b, np, sq, sk]``, ``True`` = *masked out*. For causal mask types
    (``causal``, ``padding_causal``) the causal mask is always applied and combined with
    ``attention_mask`` when given (a padding mask ``[b, 1, 1, sk]`` or a full ``[b, 1, sq, sk]``
    mask). For ``padding``/``arbitrary`` only ``attention_mask`` is used; for ``no_mask`` none.
    A query row whose keys are all masked attends uniformly to all keys, as Megatron's
    ``-10000`` fill does (instead of SDPA's NaN); such rows are padding and their loss is
    masked anyway.

    Sliding window (``config.window_size`` = ``(left, right)``, on the layers
    ``config.window_attn_skip_freq`` picks, as Megatron's ``is_layer_window_attention``): query
    position ``i`` attends keys ``i - left .. i + right`` (``-1``: unbounded), positions
    bottom-right aligned as the causal mask (the queries are the last ``sq`` of ``sk`` keys, so a
    KV-cache decode step sees the window of its own position). The band is intersected with
    whatever else masks (causal, padding, a packed row's block-diagonal mask), for every mask type
    (the decode steps of Megatron's static inference run with ``no_mask``: TE switches those to a
    bottom-right causal window, which is what the band is).

    Attention sinks (``config.softmax_type``): ``learnable`` holds one logit per head of this rank,
    ``softmax_offset`` ``[np]`` (Megatron's name, local and TE specs alike; split by head over TP,
    saved as such in distributed checkpoints), ``off-by-one`` a fixed zero logit: each query's
    softmax gets one more term ``exp(offset_h)`` in its denominator, with no value behind it
    (gpt-oss's sinks). SDPA has no such term, so the sink enters as one extra key: queries and keys
    gain ``pad`` zero channels, the query's first is ``1 / scale`` and the sink key's is
    ``offset_h`` (so its scaled logit is ``offset_h``), its value is zero. The kernels, the masks and
    the gradient (to the offset through the key) stay SDPA's.

    Packed sequences (``packed_seq_params``, Megatron's THD layout: rows flattened to one sequence, the
    segments in ``cu_seqlens_q``): causal attention inside each segment, bucketed by length, so the work is
    ``Σ len²`` rather than ``S²`` a row and no ``[S, S]`` mask is built (:meth:`_forward_segments`).

    Softmax precision is the kernel's (fp32 accumulation in SDPA's fused kernels; the math
    fallback computes in the input dtype).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError(
                f"context_parallel_size={config.context_parallel_size}: the local spec's SDPACoreAttention attends "
                "within this rank's positions only (no exchange of keys and values over the CP group); context "
                "parallelism needs transformer_impl=transformer_engine (TE's context-parallel attention)")
        self.layer_number = max(1, layer_number)
        # Megatron's rule for which layers slide (layer_number counts from 1 over the whole model).
        self.window_size = (
            tuple(config.window_size)
            if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, self.layer_number)
            else None
        )
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type

        if pg_collection is not None:
            tp_world = pg_collection.tp.size()
        else:
            from megatron.core import parallel_state

            tp_world = parallel_state.get_tensor_model_parallel_world_size()
        self.hidden_size_per_attention_head = config.kv_channels
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp_world)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp_world)
        self.hidden_size_per_partition = self.num_attention_heads_per_partition * config.kv_channels
        # Megatron's apply_query_key_layer_scaling divides the scale by layer_number and
        # multiplies it back inside the softmax (an fp16 overflow guard): net scale unchanged.
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.hidden_size_per_attention_head)
        )
        self.attention_dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

        # Attention sinks: Megatron's DotProductAttention's parameter (name, shape [np], init).
        if config.softmax_type == "vanilla":
            self.softmax_offset = None
        elif config.softmax_type == "off-by-one":
            self.register_buffer(
                "softmax_offset", torch.zeros(self.num_attention_heads_per_partition, dtype=config.params_dtype),
                persistent=False,
            )
        elif config.softmax_type == "learnable":
            offset = torch.nn.Parameter(torch.empty(self.num_attention_heads_per_partition, dtype=config.params_dtype))
            if torch.cuda.is_available() and not config.use_cpu_initialization:
                offset.data = offset.data.cuda(torch.cuda.current_device())
            # One logit per head: split by head over TP (grad norm counts every rank's share once).
            tensor_parallel.set_tensor_model_parallel_attributes(offset, is_parallel=True, dim=0, stride=1)
            self.softmax_offset = offset
            if config.perform_initialization:
                config.init_method(self.softmax_offset)
        else:
            raise ValueError(f"softmax_type must be 'vanilla', 'off-by-one' or 'learnable', got {config.softmax_type!r}")
        self.tp_group = pg_collection.tp if pg_collection is not None else None

    def _allowed_mask(self, attention_mask, attention_bias, attn_mask_type, sq, sk, device, dtype):
        """SDPA ``attn_mask`` (bool: True = attend, or an additive float bias) or None."""
        causal = attn_mask_type in _CAUSAL_TYPES
        use_mask = attention_mask is not None and attn_mask_type != AttnMaskType.no_mask
        if not causal and not use_mask and attention_bias is None and self.window_size is None:
            return None
        allowed = torch.ones(1, 1, sq, sk, dtype=torch.bool, device=device)
        if causal:
            # Bottom-right aligned (sq <= sk: queries are the last sq positions), as TE/flash.
            allowed = torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)[None, None]
        if self.window_size is not None:
            allowed = allowed & _window_band(self.window_size, sq, sk, device)
        if use_mask:
            allowed = allowed & ~attention_mask.to(torch.bool)
        # Fully masked query rows: attend to everything (Megatron's -10000 fill gives the
        # same uniform distribution) rather than produce NaN.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        if attention_bias is None:
            return allowed
        bias = attention_bias.to(dtype)
        return bias.masked_fill(~allowed, float("-inf"))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        attn_mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if packed_seq_params is not None:
            return self._forward_segments(query, key, value, attn_mask_type, attention_mask, attention_bias,
                                          packed_seq_params)
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        groups = np_ // k.shape[1]
        if groups > 1:
            # GQA: query heads [g*r, (g+1)*r) share kv head g (Megatron's grouping).
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        mask = self._allowed_mask(attention_mask, attention_bias, attn_mask_type, sq, sk, q.device, q.dtype)
        hv = v.shape[-1]
        if self.softmax_offset is not None:
            q, k, v, mask = self._with_sink(q, k, v, mask)
        context = self._attend(q, k, v, mask)
        # [b, np, sq, hn] -> [sq, b, np * hn] (less the sink's zero channels)
        return context[..., :hv].permute(2, 0, 1, 3).reshape(sq, b, np_ * hv)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool = False) -> Tensor:
        """SDPA with this layer's scale and dropout (dropout forked per TP rank: heads are split over TP)."""
        dropout_p = self.attention_dropout_p if self.training else 0.0

        def attend():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                                  scale=self.softmax_scale)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return attend()
        return attend()

    def _forward_segments(self, query: Tensor, key: Tensor, value: Tensor, attn_mask_type: AttnMaskType,
                          attention_mask: Optional[Tensor], attention_bias: Optional[Tensor],
                          packed_seq_params: PackedSeqParams) -> Tensor:
        """Packed sequences in Megatron's THD layout (``packed_seq_params.qkv_format == 'thd'``: the rows
        flattened to one sequence of ``t`` tokens, query ``[t, np, hn]``, key/value ``[t, ng, hn]``, segment
        ``i`` the tokens ``cu_seqlens_q[i] .. cu_seqlens_q[i+1]``), causal attention inside each segment only.

        Cost ``Σ_b n_b · h · L_b²`` instead of ``h · t²``: the segments are grouped into buckets of one padded
        length ``L_b`` (:class:`SegmentBuckets`, at most 25 % longer than the segment) and each bucket runs as one
        SDPA batch ``[n_b, h, L_b, d]``. A segment is padded on the right with whatever tokens follow it:
        under the causal mask no real query sees a key past its own position, so those keys get weight exactly 0
        (and no gradient), and the padded queries' outputs are dropped. The sliding window and the sinks are
        the dense path's (:meth:`_allowed_mask`, :meth:`_with_sink`) on the ``[L_b, L_b]`` block of a segment,
        whose positions start at 0; no mask is built for plain causal attention (SDPA's ``is_causal``)."""
        if packed_seq_params.qkv_format != "thd":
            raise NotImplementedError(f"SDPACoreAttention: packed_seq_params.qkv_format must be 'thd' (Megatron's "
                                      f"packed layout), got {packed_seq_params.qkv_format!r}")
        if attn_mask_type not in _CAUSAL_TYPES:
            raise NotImplementedError(f"SDPACoreAttention: packed sequences are causal only (attn_mask_type "
                                      f"{attn_mask_type.name} asks for keys past a query inside its segment)")
        if attention_bias is not None or attention_mask is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences take their segments from "
                                      "packed_seq_params; pass attention_mask=None and no attention_bias")
        cu = packed_seq_params.cu_seqlens_q
        for name in ("cu_seqlens_kv", "cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
            other = getattr(packed_seq_params, name)
            if other is not None and other is not cu and not torch.equal(other, cu):
                raise NotImplementedError(f"SDPACoreAttention: packed self-attention needs {name} == cu_seqlens_q "
                                          "(no cross-attention, no padded segments)")
        if query.dim() == 4:  # [t, 1, np, hn] if a caller did not squeeze Megatron's dummy batch
            query, key, value = (x.squeeze(1) for x in (query, key, value))
        t, np_, _ = query.shape
        if int(cu[-1]) != t:
            raise ValueError(f"SDPACoreAttention: cu_seqlens_q ends at {int(cu[-1])}, the packed sequence has {t} "
                             "tokens (with sequence parallelism the segments are of the gathered sequence)")
        buckets = SegmentBuckets.of(cu, query.device)
        groups = np_ // key.shape[1]
        hv = value.shape[-1]
        pieces = []
        for bucket in buckets.buckets:
            n, length = bucket.index.shape
            flat = bucket.index.reshape(-1)
            # [n * L, heads, d] -> [n, heads, L, d]
            q, k, v = (x.index_select(0, flat).view(n, length, x.shape[1], x.shape[2]).transpose(1, 2)
                       for x in (query, key, value))
            if groups > 1:  # GQA, as the dense path
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            if self.window_size is None and self.softmax_offset is None:
                context = self._attend(q, k, v, None, is_causal=True)
            else:
                mask = self._allowed_mask(None, None, AttnMaskType.causal, length, length, q.device, q.dtype)
                if self.softmax_offset is not None:
                    q, k, v, mask = self._with_sink(q, k, v, mask)
                context = self._attend(q, k, v, mask)
            # [n, np, L, hv] -> [n * L, np * hv], then the segments' own positions
            context = context[..., :hv].transpose(1, 2).reshape(n * length, np_ * hv)
            pieces.append(context.index_select(0, bucket.real))
        # the buckets' real rows in bucket order -> token order
        return torch.cat(pieces, dim=0).index_select(0, buckets.token_order)

    def _with_sink(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]):
        """``q, k, v, mask`` with the sink as one more key (see the class docstring): ``pad`` zero channels
        (8, so the head dim stays a multiple of 8 for the flash kernels), the query's first ``1 / scale``,
        the sink key's ``softmax_offset[h]``, a zero value; the mask gains an always-open column."""
        b, h, sq, _ = q.shape
        sk = k.shape[2]
        pad = 8
        offset = self.softmax_offset.to(k.dtype)
        q_extra = q.new_zeros(b, h, sq, pad)
        q_extra[..., 0] = 1.0 / self.softmax_scale
        q = torch.cat([q, q_extra], dim=-1)
        k = torch.cat([k, k.new_zeros(b, h, sk, pad)], dim=-1)
        sink_key = torch.cat([k.new_zeros(1, h, 1, k.shape[-1] - pad), offset.view(1, h, 1, 1),
                              k.new_zeros(1, h, 1, pad - 1)], dim=-1).expand(b, h, 1, k.shape[-1])
        k = torch.cat([k, sink_key], dim=2)
        v = torch.cat([v, v.new_zeros(b, h, 1, v.shape[-1])], dim=2)
        v = torch.cat([v, v.new_zeros(b, h, sk + 1, pad)], dim=-1)  # same head dim as q/k (flash kernels)
        if mask is not None:
            if mask.dtype == torch.bool:
                column = mask.new_ones(mask.shape[:-1] + (1,))
            else:
                column = mask.new_zeros(mask.shape[:-1] + (1,))
            mask = torch.cat([mask.expand(mask.shape[0], mask.shape[1], sq, sk), column], dim=-1)
        return q, k, v, mask

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata: Optional[dict] = None):
        """The learnable sinks split by head over TP (axis 0), as Megatron's ``DotProductAttention``."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state_dict = self.state_dict(prefix="", keep_vars=True) if self.config.softmax_type == "learnable" else {}
        return make_sharded_tensors_for_checkpoint(
            state_dict, prefix, {"softmax_offset": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )


@dataclass(frozen=True)
class SegmentBucket:
    """Segments of one padded length ``L``: ``index`` ``[n, L]`` the token positions each reads (its own, then
    the tokens after it, clamped to the sequence); ``real`` the rows of the flattened ``[n * L]`` that are
    the segments' own tokens, in token order within the bucket."""

    index: Tensor
    real: Tensor


@dataclass(frozen=True)
class SegmentBuckets:
    """A packed sequence's segments (``cu_seqlens``) grouped by padded length (:func:`bucket_length`);
    ``token_order`` puts the buckets' real rows, concatenated, back in token order."""

    buckets: Tuple[SegmentBucket, ...]
    token_order: Tensor

    @staticmethod
    def of(cu_seqlens: Tensor, device) -> "SegmentBuckets":
        """Built once per ``cu_seqlens`` tensor (a forward's layers share it, and backward reuses it)."""
        cached = _BUCKETS.get(id(cu_seqlens))
        if cached is not None and cached[0]() is cu_seqlens and cached[1] == device:
            return cached[2]
        bounds = cu_seqlens.tolist()
        t = bounds[-1]
        by_length: Dict[int, List[Tuple[int, int]]] = {}
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end > start:
                by_length.setdefault(bucket_length(end - start), []).append((start, end))
        buckets, sources = [], []
        for length in sorted(by_length):
            segs = by_length[length]
            starts = torch.tensor([s for s, _ in segs], dtype=torch.long)
            sizes = torch.tensor([e - s for s, e in segs], dtype=torch.long)
            offsets = torch.arange(length, dtype=torch.long)
            index = (starts[:, None] + offsets[None, :]).clamp_(max=t - 1)
            keep = (offsets[None, :] < sizes[:, None]).reshape(-1)
            buckets.append(SegmentBucket(index.to(device), keep.nonzero().squeeze(1).to(device)))
            sources.append(index.reshape(-1)[keep])
        token_order = torch.empty(t, dtype=torch.long)
        token_order[torch.cat(sources)] = torch.arange(t)
        result = SegmentBuckets(tuple(buckets), token_order.to(device))
        for key in [key for key, (ref, _, _) in _BUCKETS.items() if ref() is None]:
            del _BUCKETS[key]
        _BUCKETS[id(cu_seqlens)] = (weakref.ref(cu_seqlens), device, result)
        return result


# id(cu_seqlens) -> (a weak reference to it, device, its buckets). Not a WeakKeyDictionary: a weak
# reference's == compares live tensors elementwise.
_BUCKETS: Dict[int, tuple] = {}


def bucket_length(n: int) -> int:
    """The padded length of a segment of ``n`` tokens: ``n`` rounded up to a multiple of ``2^(k−2)`` for
    ``2^k <= n < 2^(k+1)`` (four lengths per octave: at most 25 % longer, 56 % more attention work) and of 8
    below 64, so that a batch of uneven lengths makes few SDPA calls."""
    step = max(8, 1 << max(0, n.bit_length() - 3))
    return -(-n // step) * step


def _window_band(window_size, sq: int, sk: int, device) -> Tensor:
    """``[1, 1, sq, sk]`` bool: key ``j`` within ``(left, right)`` of query ``i``, the queries being the last
    ``sq`` of the ``sk`` positions (``-1``: unbounded on that side)."""
    left, right = window_size
    qpos = torch.arange(sk - sq, sk, device=device)[:, None]
    kpos = torch.arange(sk, device=device)[None, :]
    band = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        band &= kpos >= qpos - left
    if right >= 0:
        band &= kpos <= qpos + right
    return band[None, None]


# The local spec's core attention (a ModuleSpec swap). SDPACoreAttention attends within one rank's
# positions, so the local spec refuses context parallelism; a class with ``supports_context_parallel = True``
# that attends across the CP group (the tests' exact reference, tests/cp_attention.py) may take its place
# through :func:`local_core_attention`, and the local spec then runs CP > 1.
_LOCAL_CORE_ATTENTION = [SDPACoreAttention]


@contextlib.contextmanager
def local_core_attention(module_class):
    """The local spec builds ``module_class`` as its core attention inside this context (see above)."""
    _LOCAL_CORE_ATTENTION.append(module_class)
    try:
        yield module_class
    finally:
        _LOCAL_CORE_ATTENTION.pop()


def local_spec_supports_context_parallel() -> bool:
    """Whether the local spec's core attention attends across context-parallel ranks (SDPACoreAttention: no)."""
    return bool(getattr(_LOCAL_CORE_ATTENTION[-1], "supports_context_parallel", False))


def _local_spec(normalization: str, qk_layernorm: bool, num_experts: Optional[int] = None) -> ModuleSpec:
    # num_experts: Megatron's MoELayer (TopKRouter, token dispatcher, SequentialMLP experts) as the MLP.
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False, normalization=normalization,
                                    qk_layernorm=qk_layernorm)
    layer = spec.submodules
    layer.input_layernorm = WrappedTorchNorm
    layer.pre_mlp_layernorm = WrappedTorchNorm
    attention = layer.self_attention.submodules
    attention.core_attention = _LOCAL_CORE_ATTENTION[-1]
    attention.q_layernorm = WrappedTorchNorm if qk_layernorm else IdentityOp
    attention.k_layernorm = WrappedTorchNorm if qk_layernorm else IdentityOp
    return spec


def _te_spec(normalization: str, qk_layernorm: bool, num_experts: Optional[int] = None) -> ModuleSpec:
    try:
        import transformer_engine  # noqa: F401

        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    except ImportError as e:
        raise ImportError(
            "transformer_impl='transformer_engine' needs transformer-engine (pip install "
            "'nemo_kd[gpu]' on a CUDA machine); use transformer_impl='local' on CPU"
        ) from e
    # num_experts: MoELayer with TEGroupedMLP experts (grouped GEMM) as the MLP.
    return get_gpt_layer_with_transformer_engine_spec(num_experts=num_experts, moe_grouped_gemm=num_experts is not None,
                                                      qk_layernorm=qk_layernorm)


def get_gpt_layer_spec(
    transformer_impl: str = LOCAL, normalization: str = "RMSNorm", qk_layernorm: bool = False
) -> ModuleSpec:
    """One GPT transformer layer spec (``TransformerLayer`` ModuleSpec).

    Args:
        transformer_impl: ``"local"`` (torch SDPA + torch norms, runs anywhere) or
            ``"transformer_engine"`` (Megatron's TE spec; requires TE).
        normalization: ``"RMSNorm"`` or ``"LayerNorm"`` (the module reads
            ``TransformerConfig.normalization``; this picks the spec variant).
        qk_layernorm: normalise queries and keys per head before attention.
    """
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {normalization!r}")
    if transformer_impl == LOCAL:
        return _local_spec(normalization, qk_layernorm)
    if transformer_impl == TRANSFORMER_ENGINE:
        return _te_spec(normalization, qk_layernorm)
    raise ValueError(f"transformer_impl must be {LOCAL!r} or {TRANSFORMER_ENGINE!r}, got {transformer_impl!r}")


def get_gpt_block_spec(layer_spec: ModuleSpec, num_layers: int, transformer_impl: str = LOCAL):
    """What ``GPTModel(transformer_layer_spec=...)`` receives for ``num_layers`` layers of this stage.

    For the local impl: ``TransformerBlockSubmodules`` with the torch final norm (Megatron
    would otherwise pick apex's ``FusedLayerNorm`` when apex is installed, which has no RMSNorm).
    For TE: the layer spec itself (Megatron pairs it with ``TENorm``).
    """
    if transformer_impl == TRANSFORMER_ENGINE:
        return layer_spec
    return TransformerBlockSubmodules(layer_specs=[layer_spec] * num_layers, layer_norm=WrappedTorchNorm)


def get_gpt_moe_block_spec(pattern, transformer_impl: str = LOCAL, normalization: str = "RMSNorm",
                           qk_layernorm: bool = False, num_experts: int = 2) -> TransformerBlockSubmodules:
    """The block spec of a mixture-of-experts stage: ``pattern`` holds one 0 (dense MLP) or 1 (MoE) per
    layer of the stage (``GPTModelConfig.moe_layer_pattern()`` cut to it), as Megatron's
    ``get_gpt_decoder_block_spec`` builds it from ``moe_layer_freq``.

    Local: each MoE layer's MLP is Megatron's ``MoELayer`` with ``SequentialMLP`` experts (one
    ``MLP`` per local expert, ColumnParallel/RowParallel linears: runs on CPU) and the torch norms
    and SDPA attention of the dense local spec. TE: Megatron's TE layer spec with ``TEGroupedMLP``
    experts (grouped GEMM), ``TENorm`` as the final norm. The experts' count comes from the
    ``TransformerConfig`` (``num_moe_experts``); ``num_experts`` only selects the MoE variant.
    """
    if normalization not in ("RMSNorm", "LayerNorm"):
        raise ValueError(f"normalization must be 'RMSNorm' or 'LayerNorm', got {normalization!r}")
    _router_gemm_without_te()
    if transformer_impl == LOCAL:
        build, final_norm = _local_spec, WrappedTorchNorm
    elif transformer_impl == TRANSFORMER_ENGINE:
        build = _te_spec
        from megatron.core.extensions.transformer_engine import TENorm as final_norm
    else:
        raise ValueError(f"transformer_impl must be {LOCAL!r} or {TRANSFORMER_ENGINE!r}, got {transformer_impl!r}")
    dense = moe = None
    specs = []
    for is_moe in pattern:
        if is_moe:
            moe = moe or build(normalization, qk_layernorm, num_experts)
            specs.append(moe)
        else:
            dense = dense or build(normalization, qk_layernorm)
            specs.append(dense)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)


def _router_gemm_without_te() -> None:
    """Megatron-core 0.16.1's router gate (``moe_utils.RouterGatingLinearFunction``) tests
    ``te_general_gemm is not None`` for its TE GEMM, a name ``moe_utils`` binds only when TE imports:
    without TE (every CPU run, a GPU without TE) the first routed token raises ``NameError``. Bind it
    to None there, which selects the ``torch.mm`` branch the function already has; with TE, nothing."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
