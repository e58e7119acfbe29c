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

__all__ = ["GPTModelConfig", "DTYPES", "TRAINING_ONLY_KEYS", "dtype_name"]

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
        self._check_recompute()

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

    def validate_layout(self, parallel, seq_length: Optional[int] = None) -> None:
        """:meth:`validate_parallel` for a :class:`~nemo_kd.parallel.state.ParallelConfig`, plus what
        nemo_kd's training supports of it, each refusal naming the key:

        * ``context_parallel_size > 1``: refused. The local spec's attention has no context
          parallelism (it needs ``transformer_impl=transformer_engine``), and with TE nothing in
          nemo_kd splits the batch over the CP ranks yet (each rank would train on the whole
          sequence as if it were its chunk);
        * ``sequence_parallel``: needs TP > 1 (``ParallelConfig``) and a row length
          (``seq_length``) divisible by TP, since Megatron splits every row over the TP ranks.
        """
        tp = parallel.tensor_model_parallel_size
        self.validate_parallel(tp, parallel.pipeline_model_parallel_size, parallel.virtual_pipeline_model_parallel_size)
        cp = parallel.context_parallel_size
        if cp > 1:
            if self.transformer_impl != "transformer_engine":
                raise ValueError(f"parallel.context_parallel_size={cp} needs transformer_impl=transformer_engine "
                                 f"(TE's context-parallel attention); the local spec (transformer_impl="
                                 f"{self.transformer_impl!r}, CPU) has none: set context_parallel_size=1")
            raise ValueError(f"parallel.context_parallel_size={cp}: nemo_kd does not split batches over context-"
                             "parallel ranks yet (each rank would train on the whole row as if it were its chunk): "
                             "set context_parallel_size=1")
        if getattr(parallel, "sequence_parallel", False) and seq_length is not None and seq_length % tp:
            raise ValueError(f"parallel.sequence_parallel=true splits every row over the {tp} tensor-parallel ranks: "
                             f"the row length (max_seq_length={seq_length}) must be divisible by "
                             f"tensor_model_parallel_size ({tp})")

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
        return dataclasses.asdict(self)


# GPTModelConfig fields that change how a model trains, not what it is: a checkpoint saved with them
# resumes without them (and the other way round), a checkpoint made before they existed resumes too.
TRAINING_ONLY_KEYS = ("recompute_granularity", "recompute_method", "recompute_num_layers")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"GPTModelConfig.{name} must be one of {list(choices)}, got {value!r}")
