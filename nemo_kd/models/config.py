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

__all__ = ["GPTModelConfig", "DTYPES", "dtype_name"]

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
    position_embedding_type: str = "rope"  # rope | learned_absolute
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
        _check_choice("position_embedding_type", self.position_embedding_type, ("rope", "learned_absolute"))
        _check_choice("normalization", self.normalization, ("RMSNorm", "LayerNorm"))
        _check_choice("activation", self.activation, ("swiglu", "gelu"))
        _check_choice("params_dtype", self.params_dtype, tuple(DTYPES))
        _check_choice("transformer_impl", self.transformer_impl, ("local", "transformer_engine"))
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rotary_percent must be in (0, 1], got {self.rotary_percent}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

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
                          virtual_pipeline_model_parallel_size: Optional[int] = None) -> None:
        """Raise ``ValueError`` if this architecture cannot be split over the given layout."""
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
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
        return dataclasses.asdict(self)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"GPTModelConfig.{name} must be one of {list(choices)}, got {value!r}")
