"""``GPTModelConfig``: the architecture of a teacher or student GPT, independent of parallelism.

A plain dataclass (OmegaConf/Hydra friendly: ``GPTModelConfig.from_dict(cfg.model)``)
that :func:`nemo_kd.models.builder.build_gpt_model` converts to Megatron's
``TransformerConfig`` for a given parallel layout. Validation happens twice: the
architecture alone in ``__post_init__`` and against a parallel layout in
:meth:`GPTModelConfig.validate_parallel`, both with messages naming the offending values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import torch

from nemo_kd.config_keys import check_keys

__all__ = ["GPTModelConfig", "DTYPES", "MOE_KEYS", "TRAINING_ONLY_KEYS", "dtype_name"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {
    "float32": "fp32", "32": "fp32", "torch.float32": "fp32",
    "bfloat16": "bf16", "bf16-mixed": "bf16", "torch.bfloat16": "bf16",
    "float16": "fp16", "16": "fp16", "half": "fp16", "torch.float16": "fp16",
}


def dtype_name(name) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` for any of their usual spellings (others returned as given)."""
    return _DTYPE_ALIASES.get(str(name), str(name))


@dataclasses.dataclass
class GPTModelConfig:
    """Architecture of a Megatron-core ``GPTModel`` (teacher or student)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    # None: multi-head attention (= num_attention_heads). Fewer: GQA/MQA.
    num_query_groups: Optional[int] = None
    # None: 4 * hidden_size.
    ffn_hidden_size: Optional[int] = None
    # None: hidden_size / num_attention_heads.
    kv_channels: Optional[int] = None
    # Megatron pads the vocabulary to a multiple of this * TP (see padded_vocab_size).
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    position_embedding_type: str = "rope"  # rope | yarn | learned_absolute
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    layernorm_epsilon: float = 1e-5
    activation: str = "swiglu"  # swiglu | gelu
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    share_embeddings_and_output_weights: bool = False
    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    transformer_impl: str = "local"  # local | transformer_engine
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    # None: 1 / sqrt(kv_channels).
    softmax_scale: Optional[float] = None
    # ---- attention of the modern families (Megatron's TransformerConfig fields of the same names) ----
    # Sliding-window attention: [left, right] (Megatron's / TE's convention: query i attends keys
    # i - left .. i + right). GPT is causal, so right is 0; Hugging Face's sliding_window W (W keys,
    # the query's own included: Mistral, Qwen2, gpt-oss) is [W - 1, 0]. None: full attention.
    window_size: Optional[list] = None
    # Which layers slide (window_size set): N = every N-th layer (N, 2N, ..., counting from 1) has full
    # attention and the others the window (gpt-oss: 2, sliding first), or a list of 0/1 per layer
    # (1 = sliding window). None: every layer slides.
    window_attn_skip_freq: Any = None
    # vanilla | off-by-one (a zero logit beside the keys) | learnable (gpt-oss's per-head sinks: a learned
    # logit per head in the softmax's denominator, the parameter core_attention.softmax_offset, split by head
    # over TP).
    softmax_type: str = "vanilla"
    # YaRN RoPE scaling (position_embedding_type=yarn; Megatron's YarnRotaryEmbedding, HF rope_type "yarn"):
    # the scaling factor, the pre-extension context, the beta_fast/beta_slow rotation bounds, the
    # attention (concentration) factor's mscale / mscale_all_dim (None: 0.1 ln(factor) + 1, HF's
    # default), and whether the correction range is rounded to integers (HF's truncate).
    yarn_rotary_scaling_factor: float = 1.0
    yarn_original_max_position_embeddings: Optional[int] = None
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: Optional[float] = None
    yarn_mscale_all_dim: Optional[float] = None
    yarn_correction_range_round_to_int: bool = True
    # Activation recomputation (Megatron's TransformerConfig fields; training only: a teacher runs
    # forward-only in eval mode, where Megatron never recomputes). None: keep every activation.
    # "selective": recompute the core attention of every layer (Megatron's default recompute_modules);
    # "full": recompute whole layers, which ones set by recompute_method / recompute_num_layers.
    recompute_granularity: Optional[str] = None  # None | selective | full
    # full only: "uniform" checkpoints the input of every group of recompute_num_layers layers of a
    # stage (the group size must divide the stage's layers); "block" recomputes the first
    # recompute_num_layers layers of each stage and keeps the rest.
    recompute_method: Optional[str] = None  # None | uniform | block
    recompute_num_layers: Optional[int] = None
    # ---- mixture of experts (Megatron's TransformerConfig fields of the same names) ----
    # None: a dense model (every other moe_* key is then ignored and left out of to_dict()).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    # FFN size of one routed expert. None: ffn_hidden_size.
    moe_ffn_hidden_size: Optional[int] = None
    # Shared experts (always active, beside the routed ones): their total FFN size, None = none;
    # moe_shared_expert_gate: a learned sigmoid gate on their output (Qwen2-MoE).
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_shared_expert_gate: bool = False
    moe_router_score_function: str = "softmax"  # softmax | sigmoid
    # softmax: top-k of the logits, then softmax over those k (False, Mixtral/Qwen3-MoE), or softmax
    # over every expert then top-k of the probabilities (True, unnormalised weights).
    moe_router_pre_softmax: bool = False
    # Multiplies the top-k routing weights (DeepSeek-V3's routed_scaling_factor). None: 1.
    moe_router_topk_scaling_factor: Optional[float] = None
    # Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the sigmoid scores for the
    # top-k choice only, moved by moe_router_bias_update_rate toward balance after every step.
    moe_router_enable_expert_bias: bool = False
    moe_router_bias_update_rate: float = 1e-3
    # Load-balancing loss: aux_loss (per microbatch, Switch/GShard), seq_aux_loss (per sequence,
    # DeepSeek), global_aux_loss (over the global batch), none. Weight moe_aux_loss_coeff (0: off).
    moe_router_load_balancing_type: str = "aux_loss"
    moe_aux_loss_coeff: float = 0.0
    # Router z-loss weight (ST-MoE; None: off).
    moe_z_loss_coeff: Optional[float] = None
    # Router logits and combine weights in this dtype (None: the model's).
    moe_router_dtype: Optional[str] = None  # None | fp32 | fp64
    moe_token_dispatcher_type: str = "alltoall"  # alltoall | allgather
    # Token dropping: each expert takes at most capacity_factor * tokens * topk / experts tokens of a
    # microbatch (None: no dropping); drop policy by routing weight ("probs") or position;
    # pad_to_capacity pads every expert's input to its capacity.
    moe_expert_capacity_factor: Optional[float] = None
    moe_token_drop_policy: str = "probs"  # probs | position
    moe_pad_expert_input_to_capacity: bool = False
    # Which layers are MoE: N = every N-th layer from the first (1: all), or a list of 0/1, one per layer.
    moe_layer_freq: Any = 1

    def __post_init__(self):
        self.params_dtype = dtype_name(self.params_dtype)
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                     "vocab_size", "make_vocab_size_divisible_by", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTModelConfig.{name} must be a positive integer, got {value!r}")
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                    f"({self.num_attention_heads}), or set kv_channels explicitly"
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_query_groups "
                f"({self.num_query_groups})"
            )
        _check_choice("position_embedding_type", self.position_embedding_type, ("rope", "yarn", "learned_absolute"))
        _check_choice("normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _check_choice("activation", self.activation, ("swiglu", "gelu"))
        _check_choice("params_dtype", self.params_dtype, tuple(DTYPES))
        _check_choice("transformer_impl", self.transformer_impl, ("local", "transformer_engine"))
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        self._check_recompute()
        self._check_moe()
        self._check_attention()

    # ---- mixture of experts ----
    @property
    def is_moe(self) -> bool:
        return self.num_moe_experts is not None

    def moe_layer_pattern(self) -> list:
        """One 0/1 per layer: 1 = an MoE layer (Megatron's reading of ``moe_layer_freq``); all 0 when dense."""
        if not self.is_moe:
            return [0] * self.num_layers
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            return [1 if i % freq == 0 else 0 for i in range(self.num_layers)]
        return [int(v) for v in freq]

    def _check_moe(self) -> None:
        """Megatron's MoE rules (``TransformerConfig.__post_init__``, its router), worded with the keys here,
        plus the ones Megatron leaves to a shape error or a silent misroute."""
        if not self.is_moe:
            return
        n, k = self.num_moe_experts, self.moe_router_topk
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"GPTModelConfig.num_moe_experts must be a positive integer or null (dense), got {n!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"GPTModelConfig.moe_router_topk must be a positive integer, got {k!r}")
        if k > n:
            raise ValueError(f"GPTModelConfig.moe_router_topk ({k}) must be at most num_moe_experts ({n}): "
                             "a token cannot be routed to more experts than there are")
        if self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"GPTModelConfig.{name} must be a positive integer, got {value!r}")
        if self.moe_shared_expert_gate and self.moe_shared_expert_intermediate_size is None:
            raise ValueError("GPTModelConfig.moe_shared_expert_gate gates the shared experts: set "
                             "moe_shared_expert_intermediate_size (their FFN size) too, or drop the gate")
        _check_choice("moe_router_score_function", self.moe_router_score_function, ("softmax", "sigmoid"))
        _check_choice("moe_router_load_balancing_type", self.moe_router_load_balancing_type,
                      ("aux_loss", "seq_aux_loss", "global_aux_loss", "none"))
        _check_choice("moe_token_dispatcher_type", self.moe_token_dispatcher_type, ("alltoall", "allgather"))
        _check_choice("moe_token_drop_policy", self.moe_token_drop_policy, ("probs", "position"))
        if self.moe_router_dtype is not None:
            _check_choice("moe_router_dtype", self.moe_router_dtype, ("fp32", "fp64"))
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ValueError("GPTModelConfig.moe_router_enable_expert_bias (aux-loss-free balancing) needs "
                             "moe_router_score_function=sigmoid (Megatron adds the bias to sigmoid scores only)")
        if k == 1 and self.moe_router_score_function == "softmax" and not self.moe_router_pre_softmax:
            raise ValueError("GPTModelConfig.moe_router_topk=1 with the softmax router needs moe_router_pre_softmax="
                             "true (a softmax over the single chosen logit is always 1: the router would get no "
                             "gradient)")
        if not (isinstance(self.moe_aux_loss_coeff, (int, float)) and self.moe_aux_loss_coeff >= 0):
            raise ValueError(f"GPTModelConfig.moe_aux_loss_coeff must be a number >= 0, got {self.moe_aux_loss_coeff!r}")
        if self.moe_aux_loss_coeff > 0 and self.moe_router_load_balancing_type == "none":
            raise ValueError(f"GPTModelConfig.moe_aux_loss_coeff={self.moe_aux_loss_coeff} with "
                             "moe_router_load_balancing_type=none: choose aux_loss / seq_aux_loss / global_aux_loss, "
                             "or set the coefficient to 0")
        if self.moe_z_loss_coeff is not None and not self.moe_z_loss_coeff >= 0:
            raise ValueError(f"GPTModelConfig.moe_z_loss_coeff must be null or >= 0, got {self.moe_z_loss_coeff!r}")
        if not self.moe_router_bias_update_rate >= 0:
            raise ValueError("GPTModelConfig.moe_router_bias_update_rate must be >= 0, got "
                             f"{self.moe_router_bias_update_rate!r}")
        cf = self.moe_expert_capacity_factor
        if cf is not None:
            if not (isinstance(cf, (int, float)) and cf > 0):
                raise ValueError(f"GPTModelConfig.moe_expert_capacity_factor must be null (no token dropping) or "
                                 f"> 0, got {cf!r}")
            if self.moe_router_load_balancing_type not in ("aux_loss", "seq_aux_loss", "none"):
                raise ValueError("GPTModelConfig.moe_expert_capacity_factor (token dropping) works with "
                                 "moe_router_load_balancing_type aux_loss, seq_aux_loss or none (Megatron's rule), "
                                 f"got {self.moe_router_load_balancing_type!r}")
        if self.moe_pad_expert_input_to_capacity and cf is None:
            raise ValueError("GPTModelConfig.moe_pad_expert_input_to_capacity pads to the expert capacity: set "
                             "moe_expert_capacity_factor too")
        freq = self.moe_layer_freq
        if isinstance(freq, bool) or not (isinstance(freq, int) and freq >= 1 or isinstance(freq, (list, tuple))):
            raise ValueError(f"GPTModelConfig.moe_layer_freq must be a positive integer (every N-th layer is MoE) or "
                             f"a list of 0/1 per layer, got {freq!r}")
        if isinstance(freq, (list, tuple)):
            if len(freq) != self.num_layers or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
                raise ValueError(f"GPTModelConfig.moe_layer_freq as a list needs one 0 (dense) or 1 (MoE) per layer "
                                 f"({self.num_layers}), got {list(freq)!r}")
            self.moe_layer_freq = list(freq)
        if not any(self.moe_layer_pattern()):
            raise ValueError(f"GPTModelConfig.moe_layer_freq={freq!r} leaves no MoE layer: set num_moe_experts=null "
                             "for a dense model")

    @property
    def moe_settings(self) -> dict:
        """The MoE keys as ``TransformerConfig`` fields (empty for a dense model: Megatron's defaults)."""
        if not self.is_moe:
            return {}
        return {name: getattr(self, name) for name in MOE_KEYS}

    # ---- attention: sliding window, sinks, YaRN ----
    def _check_attention(self) -> None:
        """The attention keys' rules, worded with their names (Megatron checks none of them: a bad window
        is a wrong mask, a bad YaRN key a wrong frequency)."""
        w = self.window_size
        if w is not None:
            if (not isinstance(w, (list, tuple)) or len(w) != 2
                    or any(not isinstance(v, int) or isinstance(v, bool) for v in w)):
                raise ValueError(f"GPTModelConfig.window_size must be null or [left, right] (two integers), got {w!r}")
            left, right = w
            if right != 0:
                raise ValueError(f"GPTModelConfig.window_size={list(w)}: right must be 0 (a GPT is causal: no query "
                                 "sees keys after it)")
            if left < 0:
                raise ValueError(f"GPTModelConfig.window_size={list(w)}: left must be >= 0 (the keys before the query "
                                 "it sees; Hugging Face's sliding_window W is [W - 1, 0]); for full attention set "
                                 "window_size=null")
            self.window_size = [left, right]
        freq = self.window_attn_skip_freq
        if freq is not None:
            if w is None:
                raise ValueError("GPTModelConfig.window_attn_skip_freq chooses the sliding-window layers: set "
                                 "window_size too, or drop it")
            if isinstance(freq, bool) or not (isinstance(freq, int) and freq >= 2 or isinstance(freq, (list, tuple))):
                raise ValueError("GPTModelConfig.window_attn_skip_freq must be an integer >= 2 (every N-th layer has "
                                 f"full attention) or a list of 0/1 per layer (1 = sliding window), got {freq!r}")
            if isinstance(freq, (list, tuple)):
                if len(freq) != self.num_layers or any(isinstance(v, bool) or v not in (0, 1) for v in freq):
                    raise ValueError("GPTModelConfig.window_attn_skip_freq as a list needs one 0 (full attention) or 1 "
                                     f"(sliding window) per layer ({self.num_layers}), got {list(freq)!r}")
                self.window_attn_skip_freq = list(freq)
        _check_choice("softmax_type", self.softmax_type, ("vanilla", "off-by-one", "learnable"))
        if self.position_embedding_type == "yarn":
            if self.rotary_percent != 1.0:
                raise ValueError(f"position_embedding_type=yarn needs rotary_percent=1.0 (Megatron's YaRN rotates "
                                 f"every channel), got {self.rotary_percent}")
            if not self.yarn_rotary_scaling_factor >= 1.0:
                raise ValueError("GPTModelConfig.yarn_rotary_scaling_factor must be >= 1 (the context extension), "
                                 f"got {self.yarn_rotary_scaling_factor!r}")
            original = self.yarn_original_max_position_embeddings
            if original is None:
                raise ValueError("position_embedding_type=yarn needs yarn_original_max_position_embeddings (the "
                                 "context the model was pre-trained with; HF rope_scaling.original_max_position_"
                                 "embeddings)")
            if not isinstance(original, int) or isinstance(original, bool) or original < 1:
                raise ValueError("GPTModelConfig.yarn_original_max_position_embeddings must be a positive integer, "
                                 f"got {original!r}")
            if not self.yarn_beta_fast > self.yarn_beta_slow > 0:
                raise ValueError(f"GPTModelConfig.yarn_beta_fast ({self.yarn_beta_fast}) must be greater than "
                                 f"yarn_beta_slow ({self.yarn_beta_slow}) > 0")
        elif self.yarn_settings_changed():
            raise ValueError(f"GPTModelConfig yarn_* keys are set but position_embedding_type is "
                             f"{self.position_embedding_type!r}: set position_embedding_type=yarn, or drop them")

    def yarn_settings_changed(self) -> bool:
        """Whether any ``yarn_*`` key differs from its default."""
        return any(getattr(self, f.name) != f.default for f in dataclasses.fields(self) if f.name in YARN_KEYS)

    @property
    def attention_settings(self) -> dict:
        """The sliding-window and sink keys as ``TransformerConfig`` fields (``window_size`` a tuple, as TE
        takes it)."""
        return {"window_size": tuple(self.window_size) if self.window_size is not None else None,
                "window_attn_skip_freq": self.window_attn_skip_freq, "softmax_type": self.softmax_type}

    @property
    def yarn_settings(self) -> dict:
        """The ``yarn_*`` keys with YaRN (else empty): attributes Megatron's ``GPTModel`` (its
        ``YarnRotaryEmbedding``) and its attention (the concentration factor on cos/sin) read off the
        ``TransformerConfig``, which declares no such fields."""
        if self.position_embedding_type != "yarn":
            return {}
        return {name: getattr(self, name) for name in YARN_KEYS}

    def _check_recompute(self) -> None:
        """Megatron's rules for the three recompute keys (``TransformerConfig.__post_init__``), worded
        with their names here, plus what Megatron leaves to an ``IndexError`` at the first step."""
        granularity, method, n = self.recompute_granularity, self.recompute_method, self.recompute_num_layers
        if granularity is not None:
            _check_choice("recompute_granularity", granularity, ("selective", "full"))
        if method is not None:
            _check_choice("recompute_method", method, ("uniform", "block"))
        if granularity is None and (method is not None or n is not None):
            raise ValueError(f"GPTModelConfig.recompute_method ({method!r}) / recompute_num_layers ({n!r}) are set "
                             "but recompute_granularity is not: set recompute_granularity=full, or drop them")
        if granularity == "selective" and (method is not None or n is not None):
            raise ValueError("GPTModelConfig.recompute_granularity=selective recomputes the core attention of every "
                             f"layer: recompute_method ({method!r}) and recompute_num_layers ({n!r}) must be null "
                             "(they choose the layers of recompute_granularity=full)")
        if granularity == "full":
            if method is None:
                raise ValueError("GPTModelConfig.recompute_granularity=full needs recompute_method: 'uniform' or 'block'")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError("GPTModelConfig.recompute_granularity=full needs recompute_num_layers, a positive "
                                 f"integer (layers per recomputed group for 'uniform', recomputed layers per stage "
                                 f"for 'block'), got {n!r}")

    # ---- derived values ----
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    @property
    def gated_linear_unit(self) -> bool:
        return self.activation == "swiglu"

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary rows of the embedding / output layer: ``vocab_size`` rounded up to a
        multiple of ``make_vocab_size_divisible_by * TP`` (Megatron-LM's rule, so every TP
        rank holds an equal shard)."""
        multiple = self.make_vocab_size_divisible_by * tensor_model_parallel_size
        return -(-self.vocab_size // multiple) * multiple

    def validate_parallel(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                          virtual_pipeline_model_parallel_size: Optional[int] = None,
                          expert_model_parallel_size: int = 1,
                          expert_tensor_parallel_size: Optional[int] = None) -> None:
        """Raise ``ValueError`` if this architecture cannot be split over the given layout."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        self._validate_expert_parallel(tp, expert_model_parallel_size, expert_tensor_parallel_size)
        if self.num_attention_heads % tp:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"tensor_model_parallel_size ({tp})"
            )
        if self.num_query_groups % tp:
            raise ValueError(
                f"num_query_groups ({self.num_query_groups}) must be divisible by tensor_model_parallel_size ({tp})"
            )
        if self.ffn_hidden_size % tp:
            raise ValueError(
                f"ffn_hidden_size ({self.ffn_hidden_size}) must be divisible by tensor_model_parallel_size ({tp})"
            )
        stages = pp * (virtual_pipeline_model_parallel_size or 1)
        if self.num_layers % stages:
            raise ValueError(
                f"num_layers ({self.num_layers}) must be divisible by pipeline_model_parallel_size ({pp})"
                + (f" * virtual_pipeline_model_parallel_size ({virtual_pipeline_model_parallel_size})"
                   if virtual_pipeline_model_parallel_size else "")
            )
        if self.recompute_granularity == "full":
            per_chunk = self.num_layers // stages  # the layers one model chunk's block holds
            where = "per pipeline stage" + (" and virtual stage" if virtual_pipeline_model_parallel_size else "")
            n = self.recompute_num_layers
            if self.recompute_method == "uniform" and per_chunk % n:
                raise ValueError(f"recompute_method=uniform: recompute_num_layers ({n}) must divide the layers "
                                 f"{where} ({per_chunk} = num_layers {self.num_layers} / {stages})")
            if self.recompute_method == "block" and n > per_chunk:
                raise ValueError(f"recompute_method=block: recompute_num_layers ({n}) must be at most the layers "
                                 f"{where} ({per_chunk} = num_layers {self.num_layers} / {stages})")

    def _validate_expert_parallel(self, tp: int, ep: int, etp: Optional[int]) -> None:
        etp = tp if etp is None else etp
        if not self.is_moe:
            if ep > 1 or etp != tp:
                raise ValueError(f"expert_model_parallel_size={ep} / expert_tensor_parallel_size={etp} split experts, "
                                 "and this model has none (num_moe_experts=null): set them to 1 / null")
            return
        if self.num_moe_experts % ep:
            raise ValueError(f"num_moe_experts ({self.num_moe_experts}) must be divisible by "
                             f"expert_model_parallel_size ({ep}): every expert-parallel rank holds as many experts")
        if self.moe_ffn_hidden_size % etp:
            raise ValueError(f"moe_ffn_hidden_size ({self.moe_ffn_hidden_size}) must be divisible by "
                             f"expert_tensor_parallel_size ({etp}{' = tensor_model_parallel_size' if etp == tp else ''})")
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and shared % tp:
            raise ValueError(f"moe_shared_expert_intermediate_size ({shared}) must be divisible by "
                             f"tensor_model_parallel_size ({tp})")
        if self.add_bias_linear and etp > 1:
            raise ValueError(f"add_bias_linear with experts needs expert_tensor_parallel_size=1 (Megatron has no "
                             f"biased experts split over tensor-parallel ranks), got {etp}")

    def validate_layout(self, parallel, seq_length: Optional[int] = None, *, packed: bool = False,
                        cross_tokenizer: bool = False, on_policy: bool = False) -> None:
        """:meth:`validate_parallel` for a :class:`~nemo_kd.parallel.state.ParallelConfig`, plus what
        nemo_kd's training supports of it, each refusal naming the key:

        * ``context_parallel_size > 1`` (:mod:`nemo_kd.parallel.context_parallel`): needs
          ``transformer_impl=transformer_engine`` (TE's context-parallel attention; the local spec's
          SDPA attention attends within one rank's positions, unless a CP-capable core attention was
          swapped in, :func:`~nemo_kd.models.layer_spec.local_core_attention`), a row length divisible
          by ``2·CP`` (``2·CP·TP`` with sequence parallelism: Megatron cuts each rank's positions over TP
          too), full attention (no sliding window, no sinks: TE's CP attention has neither for a causal
          GPT) and a dense model (the router terms' reduction over CP is not covered). Of the run,
          ``packed`` rows, ``cross_tokenizer`` KD and ``on_policy`` sampling are refused with CP (the
          caller says which it runs);
        * ``sequence_parallel``: needs TP > 1 (``ParallelConfig``) and a row length
          (``seq_length``) divisible by TP, since Megatron splits every row over the TP ranks.
        """
        tp = parallel.tensor_model_parallel_size
        self.validate_parallel(tp, parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size,
                               getattr(parallel, "expert_model_parallel_size", 1),
                               getattr(parallel, "expert_tensor_parallel_size", None))
        cp = parallel.context_parallel_size
        if cp > 1:
            self._validate_context_parallel(parallel, seq_length, packed, cross_tokenizer, on_policy)
        if getattr(parallel, "sequence_parallel", False) and seq_length is not None and seq_length % tp:
            raise ValueError(f"parallel.sequence_parallel=true splits every row over the {tp} tensor-parallel ranks: "
                             f"the row length (max_seq_length={seq_length}) must be divisible by "
                             f"tensor_model_parallel_size ({tp})")

    def _validate_context_parallel(self, parallel, seq_length, packed, cross_tokenizer, on_policy) -> None:
        cp, tp = parallel.context_parallel_size, parallel.tensor_model_parallel_size
        key = f"parallel.context_parallel_size={cp}"
        if self.transformer_impl != "transformer_engine":
            from nemo_kd.models.layer_spec import local_spec_supports_context_parallel

            if not local_spec_supports_context_parallel():
                raise ValueError(f"{key} needs transformer_impl=transformer_engine (TE's context-parallel "
                                 f"attention); the local spec (transformer_impl={self.transformer_impl!r}, CPU) "
                                 "attends within one rank's positions: set context_parallel_size=1")
        for refused, what in ((packed, "packed rows (data.*.pack_sequences=true; THD with CP is not supported)"),
                              (cross_tokenizer, "cross-tokenizer KD (its alignment groups index whole rows)"),
                              (on_policy, "on-policy sampling (generation grows rows one token at a time, which "
                                          "cannot be cut in 2 x CP chunks)")):
            if refused:
                raise ValueError(f"{key} with {what}: set context_parallel_size=1")
        if self.is_moe:
            raise ValueError(f"{key} with an MoE student (num_moe_experts={self.num_moe_experts}): the router terms' "
                             "reduction over the CP group is not covered; set context_parallel_size=1")
        if self.window_size is not None or self.softmax_type != "vanilla":
            raise ValueError(f"{key} with window_size={self.window_size} / softmax_type={self.softmax_type!r}: "
                             "context parallelism runs full causal attention without sinks here; set "
                             "context_parallel_size=1")
        if seq_length is not None:
            sp = getattr(parallel, "sequence_parallel", False)
            divisor = 2 * cp * (tp if sp else 1)
            if seq_length % divisor:
                raise ValueError(f"{key} cuts every row in 2 x {cp} chunks" + (f", each rank's share over the {tp} "
                                 f"tensor-parallel ranks (sequence_parallel=true)" if sp else "") +
                                 f": the row length (max_seq_length={seq_length}) must be divisible by {divisor}")

    @property
    def recompute_settings(self) -> dict:
        """The recompute keys, as ``TransformerConfig`` fields."""
        return {"recompute_granularity": self.recompute_granularity, "recompute_method": self.recompute_method,
                "recompute_num_layers": self.recompute_num_layers}

    def architecture_dict(self) -> dict:
        """:meth:`to_dict` less the training-only settings (:data:`TRAINING_ONLY_KEYS`): what must agree
        between a checkpoint and the run that resumes or loads it."""
        return {k: v for k, v in self.to_dict().items() if k not in TRAINING_ONLY_KEYS}

    def without_recompute(self) -> "GPTModelConfig":
        """This architecture with activation recomputation off (a forward-only model: an online teacher)."""
        return dataclasses.replace(self, recompute_granularity=None, recompute_method=None, recompute_num_layers=None)

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTModelConfig":
        """From a dict or OmegaConf node; unknown keys are an error (catches typos)."""
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(d, DictConfig):
                d = OmegaConf.to_container(d, resolve=True)
        except ImportError:  # OmegaConf is optional here
            pass
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        check_keys("GPTModelConfig", d, names)
        return cls(**d)

    def to_dict(self) -> dict:
        """Every field; a dense model leaves out the MoE keys (its dict is the one it had before they existed)."""
        d = dataclasses.asdict(self)
        if not self.is_moe:
            for name in MOE_KEYS:
                d.pop(name)
        # The attention keys at their defaults are left out alike (a dict from before they existed); with
        # YaRN every yarn_* key stays.
        for name in ATTENTION_KEYS:
            if d[name] == _DEFAULTS[name] and not (name in YARN_KEYS and self.position_embedding_type == "yarn"):
                d.pop(name)
        return d


# GPTModelConfig fields that change how a model trains, not what it is: a checkpoint saved with them
# resumes without them (and the other way round), a checkpoint made before they existed resumes too.
TRAINING_ONLY_KEYS = ("recompute_granularity", "recompute_method", "recompute_num_layers")


# The mixture-of-experts fields (all TransformerConfig fields of the same names).
MOE_KEYS = tuple(f.name for f in dataclasses.fields(GPTModelConfig) if f.name.startswith(("moe_", "num_moe_")))

# The sliding-window / sink / YaRN keys; to_dict() leaves out those at their defaults.
YARN_KEYS = tuple(f.name for f in dataclasses.fields(GPTModelConfig) if f.name.startswith("yarn_"))
ATTENTION_KEYS = ("window_size", "window_attn_skip_freq", "softmax_type") + YARN_KEYS
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(GPTModelConfig)}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"GPTModelConfig.{name} must be one of {list(choices)}, got {value!r}")
