"""Hugging Face ``config.json`` <-> :class:`~nemo_kd.models.GPTModelConfig`, per model family.

The HF config is read as plain JSON (never ``trust_remote_code``): its ``architectures``
entry picks a family from :data:`FAMILIES`, and each family's reader maps the fields the
Megatron GPT spec can express and raises :class:`UnsupportedHFConfigError` -- naming the
field -- for anything it cannot (a RoPE scaling type Megatron has no equivalent for,
an output-projection bias without MLP biases, ...). Sliding-window attention (Mistral's
``sliding_window``, Qwen2/Qwen3's ``use_sliding_window`` on the layers ``layer_types`` /
``max_window_layers`` name) becomes ``GPTModelConfig.window_size = [sliding_window - 1, 0]`` (HF's
window of W keys counts the query itself) and, when only some layers slide,
``window_attn_skip_freq`` as a 0/1 list per layer. Silently
dropping such a field would give a model that loads but computes something else.

Two properties of HF models are not fields of ``GPTModelConfig`` and travel next to it
in :class:`HFArchitecture`:

* ``rope_scaling``: Llama-3 ("llama3") and linear RoPE scaling. Megatron-core's
  ``RotaryEmbedding`` implements both (``_apply_scaling``, ``seq_len_interpolation_factor``)
  but :func:`nemo_kd.models.build_gpt_model` does not pass them; :meth:`HFArchitecture.apply_to_model`
  sets them on the built model.
* ``gelu_approximation="tanh"``: GPT-2's ``gelu_new``; Megatron takes it as the
  ``activation_func`` override of ``TransformerConfig`` (:meth:`HFArchitecture.transformer_config_overrides`).
* ``swiglu_limit``: gpt-oss's clamped SwiGLU, likewise ``TransformerConfig`` overrides (``quick_gelu``,
  ``glu_linear_offset=1``, ``activation_func_clamp_value``).

Build models for an :class:`HFArchitecture` with
:func:`nemo_kd.convert.checkpoint_io.build_model_chunks`, which applies both.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn.functional as F

from nemo_kd.models.config import GPTModelConfig

__all__ = [
    "FAMILIES",
    "UnsupportedHFConfigError",
    "RopeScaling",
    "HFArchitecture",
    "read_hf_config",
    "hf_config_to_architecture",
    "architecture_to_hf_config",
    "MOE_FAMILIES",
]

# HF ``architectures`` class name -> our family name.
FAMILIES: Dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GPT2LMHeadModel": "gpt2",
    "MixtralForCausalLM": "mixtral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
}
_ARCHITECTURE_OF = {family: arch for arch, family in FAMILIES.items()}
# HF ``model_type`` per family (written on export, checked on import).
_MODEL_TYPE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gpt2": "gpt2",
               "mixtral": "mixtral", "qwen3_moe": "qwen3_moe", "gpt_oss": "gpt_oss"}
# Mixture-of-experts families and the dense family whose attention / window rules they share.
MOE_FAMILIES = ("mixtral", "qwen3_moe", "gpt_oss")
_ATTENTION_FAMILY = {"mixtral": "mistral", "qwen3_moe": "qwen3"}
# gpt-oss's clamped SwiGLU: the sigmoid gain Megatron's quick_gelu has built in.
GPT_OSS_SWIGLU_ALPHA = 1.702
_HF_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_HF_DTYPE_NAME = {v: k for k, v in _HF_DTYPE.items()}


class UnsupportedHFConfigError(ValueError):
    """A Hugging Face config the converter (or Megatron's GPT spec) cannot express."""

    def __init__(self, field: str, value: Any, reason: str):
        self.field, self.value = field, value
        super().__init__(f"config.json field {field!r} = {value!r}: {reason}")


@dataclasses.dataclass
class RopeScaling:
    """RoPE frequency scaling Megatron-core can apply: ``"llama3"`` (Llama 3.1+) or ``"linear"``."""

    rope_type: str
    factor: float
    # llama3 only (HF's names and Llama 3.1's values as defaults).
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict:
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.factor}
        return {"rope_type": "llama3", "factor": self.factor, "low_freq_factor": self.low_freq_factor,
                "high_freq_factor": self.high_freq_factor,
                "original_max_position_embeddings": self.original_max_position_embeddings}


@dataclasses.dataclass
class HFArchitecture:
    """Everything needed to build the Megatron twin of an HF model and to write it back.

    Attributes:
        family: key of the family table (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``, ``"gpt2"``),
            or None for a Megatron model of no HF family (export then needs one named).
        model: the Megatron architecture.
        rope_scaling: RoPE scaling applied to the built model (None: plain RoPE).
        gelu_approximation: ``"none"`` (erf GELU, Megatron's default) or ``"tanh"`` (GPT-2's ``gelu_new``).
        swiglu_limit: None (plain SwiGLU ``silu(gate) * up``) or gpt-oss's clamped SwiGLU with this limit
            ``L``: ``g = min(gate, L)``, ``u = clamp(up, -L, L)``, ``g * sigmoid(1.702 g) * (u + 1)``.
            Megatron's local MLP computes ``activation_func(min(x_glu, L)) * (clamp(x_linear, -L, L) +
            glu_linear_offset)`` when ``activation_func_clamp_value = L``: with ``quick_gelu`` (``x *
            sigmoid(1.702 x)``) and ``glu_linear_offset = 1`` that is the same expression.
        hf_config: the original ``config.json`` (export starts from it, so token ids and
            fields Megatron does not model survive the round trip); empty for a model
            that never came from HF.
    """

    family: Optional[str]
    model: GPTModelConfig
    rope_scaling: Optional[RopeScaling] = None
    gelu_approximation: str = "none"
    hf_config: Dict[str, Any] = dataclasses.field(default_factory=dict)
    swiglu_limit: Optional[float] = None

    def __post_init__(self):
        if self.family is not None and self.family not in _ARCHITECTURE_OF:
            raise ValueError(f"unknown family {self.family!r}; supported: {sorted(_ARCHITECTURE_OF)}")
        if self.gelu_approximation not in ("none", "tanh"):
            raise ValueError(f"gelu_approximation must be 'none' or 'tanh', got {self.gelu_approximation!r}")
        if self.swiglu_limit is not None:
            if not self.model.gated_linear_unit:
                raise ValueError("swiglu_limit clamps a SwiGLU: GPTModelConfig.activation must be 'swiglu'")
            if not (isinstance(self.swiglu_limit, (int, float)) and self.swiglu_limit > 0):
                raise ValueError(f"swiglu_limit must be a positive number, got {self.swiglu_limit!r}")

    def transformer_config_overrides(self) -> Dict[str, Any]:
        """Extra ``TransformerConfig`` fields for :func:`nemo_kd.models.build_gpt_model`."""
        if self.gelu_approximation == "tanh":
            return {"activation_func": _gelu_tanh}
        if self.swiglu_limit is not None:
            activation = _quick_gelu
            if self.model.transformer_impl == "transformer_engine":
                # TE's path fuses bias + activation, which Megatron allows with glu_linear_offset only for
                # its own quick_gelu (the same formula, wrapped in torch.compile: not used on the local path)
                from megatron.core.fusions.fused_bias_geglu import quick_gelu as activation
            return {"activation_func": activation, "glu_linear_offset": 1.0,
                    "activation_func_clamp_value": float(self.swiglu_limit)}
        return {}

    def apply_to_model(self, model: torch.nn.Module) -> None:
        """Apply what ``build_gpt_model`` cannot pass to ``GPTModel`` (RoPE scaling).

        Must run before the first forward: Megatron's ``RotaryEmbedding.forward`` caches
        its output per sequence length.
        """
        if self.rope_scaling is None:
            return
        module = model
        while not hasattr(module, "rotary_pos_emb") and hasattr(module, "module"):
            module = module.module  # Float16Module / DDP wrappers
        rotary = getattr(module, "rotary_pos_emb", None)
        if rotary is None:
            return  # not a RoPE model stage (cannot happen for rope families)
        s = self.rope_scaling
        if s.rope_type == "llama3":
            rotary.inv_freq = rotary._apply_scaling(
                rotary.inv_freq, factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor, original_max_position_embeddings=s.original_max_position_embeddings)
        else:  # linear: positions divided by factor
            rotary.seq_len_interpolation_factor = s.factor
        if hasattr(rotary.forward, "cache_clear"):  # drop embeddings cached before scaling
            rotary.forward.cache_clear()

    # ---- (de)serialisation: model_config.json of a converted Megatron checkpoint ----
    def to_dict(self) -> dict:
        out = {
            "family": self.family,
            "model": self.model.to_dict(),
            "rope_scaling": dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None,
            "gelu_approximation": self.gelu_approximation,
            "hf_config": self.hf_config,
        }
        if self.swiglu_limit is not None:  # absent otherwise: the dict dense families always had
            out["swiglu_limit"] = self.swiglu_limit
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HFArchitecture":
        return cls(
            family=d.get("family"),
            model=GPTModelConfig.from_dict(d["model"]),
            rope_scaling=RopeScaling(**d["rope_scaling"]) if d.get("rope_scaling") else None,
            gelu_approximation=d.get("gelu_approximation", "none"),
            hf_config=dict(d.get("hf_config") or {}),
            swiglu_limit=d.get("swiglu_limit"),
        )


# A named module-level function (not a lambda/partial in a config) so TransformerConfig stays picklable.
def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(1.702 x)``: Megatron's ``quick_gelu`` and gpt-oss's ``gate * sigmoid(gate * alpha)``."""
    return x * torch.sigmoid(GPT_OSS_SWIGLU_ALPHA * x)


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    """``config.json`` of an HF model directory as a dict (clear errors for missing/corrupt files)."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{hf_dir!r} is not a Hugging Face model directory: no config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt {path}: {e}") from e


# How hf_config_to_architecture takes active sliding-window attention.
SLIDING_WINDOW_MODES = ("window", "truncate", "error")


def hf_config_to_architecture(
    hf_config: Mapping[str, Any],
    params_dtype: Optional[str] = None,
    make_vocab_size_divisible_by: int = 128,
    transformer_impl: str = "local",
    sliding_window: str = "window",
) -> HFArchitecture:
    """The Megatron architecture of an HF causal LM config.

    Args:
        hf_config: ``config.json`` contents.
        params_dtype: ``fp32``/``bf16``/``fp16``; None takes the checkpoint's
            ``torch_dtype``/``dtype`` (fp32 when absent), which keeps the round trip bit-exact.
        make_vocab_size_divisible_by: Megatron's vocabulary padding multiple (times TP).
        transformer_impl: ``local`` or ``transformer_engine``.
        sliding_window: ``"window"`` (default) converts active sliding-window attention to
            ``window_size`` / ``window_attn_skip_freq``; ``"truncate"`` instead sets
            ``max_position_embeddings`` to the window (full attention, exact because a causal window
            at least as long as the sequence is full attention); ``"error"`` refuses such a config.

    Raises:
        UnsupportedHFConfigError: unknown architecture or a field Megatron cannot express.
    """
    hf_config = dict(hf_config)
    architectures = hf_config.get("architectures") or []
    family = next((FAMILIES[a] for a in architectures if a in FAMILIES), None)
    if family is None:
        raise UnsupportedHFConfigError(
            "architectures", architectures,
            f"unsupported architecture; supported: {sorted(FAMILIES)} (trust_remote_code models are never loaded)")
    model_type = hf_config.get("model_type")
    if model_type is not None and model_type != _MODEL_TYPE[family]:
        raise UnsupportedHFConfigError("model_type", model_type,
                                       f"does not match architecture {_ARCHITECTURE_OF[family]} "
                                       f"(expected {_MODEL_TYPE[family]!r})")
    if sliding_window not in SLIDING_WINDOW_MODES:
        raise ValueError(f"sliding_window must be one of {list(SLIDING_WINDOW_MODES)}, got {sliding_window!r}")
    common = dict(
        params_dtype=params_dtype or _checkpoint_dtype(hf_config),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        transformer_impl=transformer_impl,
        init_method_std=float(hf_config.get("initializer_range", 0.02)),
    )
    if family == "gpt2":
        reader = _read_gpt2
    else:
        reader = functools.partial(_read_gpt_oss if family == "gpt_oss" else _read_llama_like,
                                   sliding_window=sliding_window)
    fields, extras = reader(hf_config, family)
    try:
        model = GPTModelConfig(**fields, **common)
    except ValueError as e:  # e.g. heads not divisible by kv heads: name the HF side too
        raise UnsupportedHFConfigError("config.json", {k: fields[k] for k in sorted(fields)}, str(e)) from e
    return HFArchitecture(family=family, model=model, hf_config=hf_config, **extras)


def _checkpoint_dtype(hf_config: Mapping[str, Any]) -> str:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    name = str(name).replace("torch.", "")
    if name not in _HF_DTYPE:
        raise UnsupportedHFConfigError("torch_dtype", name, f"supported: {sorted(_HF_DTYPE)}")
    return _HF_DTYPE[name]


def _rope_settings(hf_config: Mapping[str, Any]):
    """(rope_theta, RopeScaling or None) from either config style: transformers 5's
    ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    params = hf_config.get("rope_parameters")
    if params:
        theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        scaling, field = params, "rope_parameters"
    else:
        theta = hf_config.get("rope_theta", 10000.0)
        scaling, field = hf_config.get("rope_scaling") or {}, "rope_scaling"
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if float(theta) != int(theta):
        raise UnsupportedHFConfigError("rope_theta", theta, "GPTModelConfig.rotary_base is an integer")
    if rope_type == "default":
        return int(theta), None
    if rope_type == "linear":
        return int(theta), RopeScaling("linear", float(scaling["factor"]))
    if rope_type == "llama3":
        return int(theta), RopeScaling(
            "llama3", float(scaling["factor"]), float(scaling.get("low_freq_factor", 1.0)),
            float(scaling.get("high_freq_factor", 4.0)), int(scaling.get("original_max_position_embeddings", 8192)))
    if rope_type == "yarn":
        return int(theta), _yarn_fields(hf_config, scaling, field)
    raise UnsupportedHFConfigError(f"{field}.rope_type", rope_type,
                                   "Megatron supports 'default', 'linear', 'llama3' and 'yarn' RoPE scaling only")


def _yarn_fields(hf_config: Mapping[str, Any], scaling: Mapping[str, Any], field: str) -> Dict[str, Any]:
    """HF ``rope_type: yarn`` as ``GPTModelConfig`` keys (Megatron's ``YarnRotaryEmbedding``).

    transformers (``_compute_yarn_parameters``): ``factor`` (default ``max_position_embeddings /
    original_max_position_embeddings``), ``beta_fast`` / ``beta_slow`` (32 / 1 when absent or 0), ``truncate``
    (default true: Megatron's ``yarn_correction_range_round_to_int``), and the attention factor on cos/sin:
    ``attention_factor`` if given, else ``m(f, mscale) / m(f, mscale_all_dim)`` when both are non-zero, else
    ``m(f, 1)``, with ``m(f, s) = 0.1 s ln f + 1``. Megatron computes the same from ``yarn_mscale`` /
    ``yarn_mscale_all_dim`` (both set: the ratio; else ``m(f, 1)``), so an explicit ``attention_factor`` is
    accepted only when it equals what these give.
    """
    import math

    original = scaling.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise UnsupportedHFConfigError(f"{field}.original_max_position_embeddings", original,
                                       "YaRN needs the pre-extension context as a positive integer")
    factor = scaling.get("factor")
    factor = float(factor if factor is not None else hf_config.get("max_position_embeddings", original) / original)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if not (mscale and mscale_all_dim):
        mscale = mscale_all_dim = None  # transformers ignores one without the other

    def m(s):
        return 1.0 if factor <= 1 else 0.1 * s * math.log(factor) + 1.0

    implied = m(mscale) / m(mscale_all_dim) if mscale is not None else m(1.0)
    given = scaling.get("attention_factor")
    if given is not None and not math.isclose(float(given), implied, rel_tol=1e-9):
        raise UnsupportedHFConfigError(f"{field}.attention_factor", given,
                                       f"Megatron's YaRN derives it from factor / mscale / mscale_all_dim ({implied!r} "
                                       "here); an independent attention factor is not expressible")
    return dict(yarn_rotary_scaling_factor=factor,
                yarn_original_max_position_embeddings=original,
                yarn_beta_fast=float(scaling.get("beta_fast") or 32.0), yarn_beta_slow=float(scaling.get("beta_slow") or 1.0),
                yarn_mscale=None if mscale is None else float(mscale),
                yarn_mscale_all_dim=None if mscale_all_dim is None else float(mscale_all_dim),
                yarn_correction_range_round_to_int=bool(scaling.get("truncate", True)))


def _read_llama_like(hf: Mapping[str, Any], family: str, sliding_window: str):
    """Llama, Mistral, Qwen2, Qwen3: RMSNorm, SwiGLU, RoPE, GQA."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedHFConfigError("hidden_act", act, "the SwiGLU MLP needs 'silu'")
    heads = hf["num_attention_heads"]
    partial_rotary = hf.get("partial_rotary_factor", 1.0)
    if partial_rotary != 1.0:
        raise UnsupportedHFConfigError("partial_rotary_factor", partial_rotary, "only full rotary embeddings are converted")
    max_positions = hf.get("max_position_embeddings", 4096)
    attention_family = _ATTENTION_FAMILY.get(family, family)  # Mixtral windows as Mistral, Qwen3-MoE as Qwen3
    window_active = {
        "mistral": hf.get("sliding_window") is not None,
        "qwen2": bool(hf.get("use_sliding_window", False)),
        "qwen3": bool(hf.get("use_sliding_window", False)),
    }.get(attention_family, False)
    layer_types = hf.get("layer_types")
    window_fields = {}
    if window_active:
        window = hf.get("sliding_window")
        sliding = _sliding_layers(hf, attention_family)
        max_positions, window_fields = _window_settings(window, sliding, sliding_window, max_positions)
    elif layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedHFConfigError("layer_types", sorted(set(layer_types)), "only 'full_attention' layers are converted")

    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    if family == "qwen2":
        # Qwen2 always has q/k/v biases and no o_proj / MLP biases (not a config field).
        add_qkv_bias, add_bias_linear = True, False
    else:
        # Megatron's add_bias_linear covers every linear (qkv, proj, fc1, fc2) at once;
        # HF's attention_bias covers q/k/v/o and mlp_bias the MLP: only "both" or "neither" map.
        if attention_bias != mlp_bias:
            field = "attention_bias" if attention_bias else "mlp_bias"
            raise UnsupportedHFConfigError(
                field, True, "Megatron's add_bias_linear puts biases on attention and MLP linears together; "
                             "attention_bias and mlp_bias must be equal")
        add_qkv_bias = add_bias_linear = attention_bias
    rotary_base, rope_scaling = _rope_settings(hf)
    yarn = {}
    if isinstance(rope_scaling, dict):  # YaRN: GPTModelConfig keys, not a RopeScaling applied after the build
        yarn, rope_scaling = rope_scaling, None
    # Mixtral's intermediate_size is its experts' size; Qwen3-MoE's its dense layers'
    fields = dict(
        _rope_rmsnorm_swiglu_fields(hf, heads, max_positions, rotary_base, yarn, default_eps=1e-6),
        add_bias_linear=add_bias_linear,
        add_qkv_bias=add_qkv_bias,
        qk_layernorm=attention_family == "qwen3",
        **window_fields,
        **(_read_moe(hf, family) if family in MOE_FAMILIES else {}),
    )
    return fields, {"rope_scaling": rope_scaling}


def _rope_rmsnorm_swiglu_fields(hf: Mapping[str, Any], heads: int, max_positions: int, rotary_base: float,
                                yarn: Dict[str, Any], default_eps: float) -> Dict[str, Any]:
    """The GPTModelConfig fields every RoPE + RMSNorm + SwiGLU family (Llama, Mistral, Qwen, Mixtral,
    Qwen3-MoE, gpt-oss) reads the same way from its HF config; each family adds its biases, norms, windows
    and experts."""
    return dict(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        ffn_hidden_size=hf["intermediate_size"],
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=max_positions,
        position_embedding_type="yarn" if yarn else "rope",
        rotary_base=rotary_base,
        **yarn,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", default_eps)),
        activation="swiglu",
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )


def _read_moe(hf: Mapping[str, Any], family: str) -> Dict[str, Any]:
    """The ``moe_*`` fields of Mixtral / Qwen3-MoE.

    Both route with a softmax over the experts' logits ``z`` and keep the top ``k``. Mixtral (and
    Qwen3-MoE with ``norm_topk_prob``) renormalises the kept probabilities, ``p_i / sum_{j in top-k} p_j``,
    which equals a softmax over the top-k logits alone: Megatron's ``moe_router_pre_softmax=False``.
    Qwen3-MoE without ``norm_topk_prob`` keeps ``softmax(z)_i`` unnormalised: ``moe_router_pre_softmax=True``.
    Qwen3-MoE's layer ``i`` is sparse iff ``i`` is not in ``mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0`` (transformers' rule), the others dense MLPs of
    ``intermediate_size``: ``moe_layer_freq`` as a 0/1 list.
    """
    n = hf["num_hidden_layers"]
    experts = hf.get("num_local_experts", hf.get("num_experts"))
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise UnsupportedHFConfigError("num_local_experts", experts, "must be a positive integer (routed experts)")
    topk = hf.get("num_experts_per_tok", 2)
    jitter = hf.get("router_jitter_noise", 0.0)
    if jitter:
        raise UnsupportedHFConfigError("router_jitter_noise", jitter, "router input jitter is not converted (set 0)")
    out = dict(num_moe_experts=experts, moe_router_topk=topk,
               # the HF forward adds its load-balancing loss only with output_router_logits
               moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0)
    if family in ("mixtral", "gpt_oss"):  # every layer sparse, softmax over the top-k logits
        out.update(moe_ffn_hidden_size=hf["intermediate_size"], moe_router_pre_softmax=False)
        return out
    for field in ("shared_expert_intermediate_size",):  # Qwen2-MoE's shared expert has no Qwen3-MoE counterpart
        if hf.get(field):
            raise UnsupportedHFConfigError(field, hf[field], "Qwen3MoeForCausalLM has no shared expert")
    step = hf.get("decoder_sparse_step", 1)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(step, int) or step < 1:
        raise UnsupportedHFConfigError("decoder_sparse_step", step, "must be a positive integer")
    if any(not isinstance(i, int) or not 0 <= i < n for i in dense):
        raise UnsupportedHFConfigError("mlp_only_layers", dense, f"must list layer indices in [0, {n})")
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(n)]
    out.update(moe_ffn_hidden_size=hf["moe_intermediate_size"],
               moe_router_pre_softmax=not bool(hf.get("norm_topk_prob", False)),
               moe_layer_freq=1 if all(pattern) else pattern)
    return out


def _read_gpt_oss(hf: Mapping[str, Any], family: str, sliding_window: str):
    """gpt-oss: GQA with q/k/v/o biases and learnable sinks (``softmax_type=learnable``), sliding-window
    and full-attention layers as ``layer_types`` says (default: alternating, sliding first), YaRN RoPE,
    every layer an MoE whose router has a bias and keeps the top-k logits' softmax (Megatron's
    ``moe_router_pre_softmax=False``), experts with biases and the clamped SwiGLU (:class:`HFArchitecture`'s
    ``swiglu_limit``).

    Refused by name: ``swiglu_alpha`` other than 1.702 (Megatron's ``quick_gelu`` has that gain built
    in), ``attention_bias=false`` (the experts and router always have biases and Megatron's
    ``add_bias_linear`` covers attention too), partial rotary embeddings.
    """
    alpha = hf.get("swiglu_alpha", GPT_OSS_SWIGLU_ALPHA)
    if alpha != GPT_OSS_SWIGLU_ALPHA:
        raise UnsupportedHFConfigError("swiglu_alpha", alpha, f"Megatron's quick_gelu has the sigmoid gain "
                                                              f"{GPT_OSS_SWIGLU_ALPHA} built in")
    limit = hf.get("swiglu_limit", 7.0)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0:
        raise UnsupportedHFConfigError("swiglu_limit", limit, "must be a positive number (the SwiGLU clamp)")
    if not hf.get("attention_bias", True):
        raise UnsupportedHFConfigError("attention_bias", False,
                                       "GptOssForCausalLM's router and experts always have biases and Megatron's "
                                       "add_bias_linear puts them on the attention linears too")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedHFConfigError("partial_rotary_factor", hf["partial_rotary_factor"],
                                       "only full rotary embeddings are converted")
    quant = hf.get("quantization_config")
    if quant and quant.get("quant_method") != "mxfp4":
        raise UnsupportedHFConfigError("quantization_config.quant_method", quant.get("quant_method"),
                                       "only MXFP4 expert weights are dequantised on import")
    n, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    max_positions = hf.get("max_position_embeddings", 131072)
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if len(layer_types) != n or set(layer_types) - {"full_attention", "sliding_attention"}:
        raise UnsupportedHFConfigError("layer_types", layer_types,
                                       f"needs one 'full_attention' / 'sliding_attention' per layer ({n})")
    sliding = [t == "sliding_attention" for t in layer_types]
    max_positions, window_fields = _window_settings(hf.get("sliding_window", 128), sliding, sliding_window,
                                                    max_positions)
    rotary_base, rope_scaling = _rope_settings(hf)
    yarn = {}
    if isinstance(rope_scaling, dict):
        yarn, rope_scaling = rope_scaling, None
    moe = _read_moe(hf, family)
    fields = dict(
        _rope_rmsnorm_swiglu_fields(hf, heads, max_positions, rotary_base, yarn, default_eps=1e-5),
        add_bias_linear=True,
        add_qkv_bias=True,
        softmax_type="learnable",
        **window_fields,
        **moe,
    )
    return fields, {"rope_scaling": rope_scaling, "swiglu_limit": float(limit)}


def _window_settings(window, sliding: list, sliding_window: str, max_positions: int):
    """``(max_position_embeddings, window fields)`` for an HF ``sliding_window`` on the layers ``sliding`` marks,
    as ``sliding_window`` (the converter's mode) asks: ``window`` -> ``GPTModelConfig.window_size`` (and
    ``window_attn_skip_freq`` when only some layers slide), ``truncate`` -> the context capped at the window
    (exact), ``error`` -> refused. No window, or one covering every position: full attention, unchanged."""
    if window is None or window >= max_positions or not any(sliding):
        return max_positions, {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise UnsupportedHFConfigError("sliding_window", window, "must be a positive integer")
    if sliding_window == "truncate":
        return window, {}
    if sliding_window == "window":
        return max_positions, dict(window_size=[window - 1, 0],
                                   window_attn_skip_freq=None if all(sliding) else [int(v) for v in sliding])
    raise UnsupportedHFConfigError(
        "sliding_window", window,
        "refused (sliding_window='error'); the default 'window' converts it to GPTModelConfig.window_size, "
        "'truncate' caps max_position_embeddings at the window, which is exact")


def _sliding_layers(hf: Mapping[str, Any], family: str) -> list:
    """Per layer, whether it has the sliding window: Mistral every layer; Qwen2/Qwen3 their ``layer_types``
    (transformers 5), else layers from ``max_window_layers`` on (transformers' own default)."""
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if layer_types:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown or len(layer_types) != n:
            raise UnsupportedHFConfigError("layer_types", layer_types,
                                           f"needs one 'full_attention' / 'sliding_attention' per layer ({n})")
        if family == "mistral" and "full_attention" in layer_types:
            raise UnsupportedHFConfigError("layer_types", sorted(set(layer_types)),
                                           "MistralForCausalLM slides every layer (alternating layers are Ministral)")
        return [t == "sliding_attention" for t in layer_types]
    if family == "mistral":
        return [True] * n
    first = hf.get("max_window_layers", 28)
    return [i >= first for i in range(n)]


def _read_gpt2(hf: Mapping[str, Any], family: str):
    """GPT-2: learned positions, LayerNorm, GELU, biases everywhere, Conv1D weights."""
    for field in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(field, False):
            raise UnsupportedHFConfigError(field, True, "not expressible in Megatron's GPT spec")
    act = hf.get("activation_function", "gelu_new")
    approximations = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
    if act not in approximations:
        raise UnsupportedHFConfigError("activation_function", act, f"supported: {sorted(approximations)}")
    hidden = hf["n_embd"]
    heads = hf["n_head"]
    fields = dict(
        num_layers=hf["n_layer"],
        hidden_size=hidden,
        num_attention_heads=heads,
        num_query_groups=heads,
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden,
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("n_positions", 1024),
        position_embedding_type="learned_absolute",
        normalization="LayerNorm",
        layernorm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation="gelu",
        add_bias_linear=True,
        add_qkv_bias=True,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", True)),
        attention_dropout=float(hf.get("attn_pdrop", 0.0)),
        hidden_dropout=float(hf.get("resid_pdrop", 0.0)),
        # scale_attn_weights=False: raw q.k scores (HF skips the 1/sqrt(d) division).
        softmax_scale=None if hf.get("scale_attn_weights", True) else 1.0,
    )
    return fields, {"gelu_approximation": approximations[act]}


def architecture_to_hf_config(arch: HFArchitecture) -> Dict[str, Any]:
    """``config.json`` for exporting ``arch``.

    Starts from ``arch.hf_config`` (the imported teacher/student config: token ids,
    fields Megatron does not model) and overwrites the shape fields from ``arch.model``,
    so a student whose shape differs from the config it was derived from is described
    correctly. Without an original config, a complete one is generated.
    """
    if arch.family is None:
        raise ValueError("this Megatron model has no Hugging Face family; name one (family=..., --family)")
    _check_family_fits(arch)
    m = arch.model
    out = copy.deepcopy(arch.hf_config)
    out["architectures"] = [_ARCHITECTURE_OF[arch.family]]
    out["model_type"] = _MODEL_TYPE[arch.family]
    out["tie_word_embeddings"] = m.share_embeddings_and_output_weights
    out["vocab_size"] = m.vocab_size
    dtype_key = "dtype" if "dtype" in out or "torch_dtype" not in out else "torch_dtype"
    out[dtype_key] = _HF_DTYPE_NAME[m.params_dtype]
    fresh = not arch.hf_config
    if arch.family == "gpt2":
        out.update(n_layer=m.num_layers, n_embd=m.hidden_size, n_head=m.num_attention_heads,
                   n_inner=m.ffn_hidden_size if m.ffn_hidden_size != 4 * m.hidden_size else None)
        if fresh:
            out.update(n_positions=m.max_position_embeddings, layer_norm_epsilon=m.layernorm_epsilon,
                       activation_function="gelu_new" if arch.gelu_approximation == "tanh" else "gelu",
                       scale_attn_weights=m.softmax_scale is None, attn_pdrop=m.attention_dropout,
                       resid_pdrop=m.hidden_dropout, embd_pdrop=m.hidden_dropout,
                       initializer_range=m.init_method_std)
        return out
    out.update(num_hidden_layers=m.num_layers, hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
               num_key_value_heads=m.num_query_groups, intermediate_size=m.ffn_hidden_size, head_dim=m.kv_channels)
    if fresh:
        out.update(max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.layernorm_epsilon,
                   hidden_act="silu", rope_theta=float(m.rotary_base), attention_dropout=m.attention_dropout,
                   initializer_range=m.init_method_std)
        if arch.rope_scaling is not None:
            out["rope_scaling"] = arch.rope_scaling.to_hf()
        if m.position_embedding_type == "yarn":
            out["rope_scaling"] = _yarn_to_hf(m)
        if arch.family in ("llama", "qwen3", "qwen3_moe", "gpt_oss"):
            out.update(attention_bias=m.add_bias_linear, **({"mlp_bias": m.add_bias_linear} if arch.family == "llama" else {}))
    if arch.family in MOE_FAMILIES:
        _write_moe(out, m, arch.family)
    if arch.family == "gpt_oss":
        _write_gpt_oss_attention(out, m, arch)
        return out
    attention_family = _ATTENTION_FAMILY.get(arch.family, arch.family)
    if m.window_size is not None:  # the sliding window as the family spells it
        pattern = _window_pattern(m)
        sliding = any(pattern)
        if attention_family == "mistral":
            out["sliding_window"] = m.window_size[0] + 1 if sliding else None
        else:  # qwen2 / qwen3: transformers 4 reads max_window_layers, 5 layer_types: both written
            out.update(use_sliding_window=sliding, sliding_window=m.window_size[0] + 1,
                       max_window_layers=pattern.index(1) if sliding else m.num_layers)
        if "layer_types" in out or attention_family != "mistral":
            out["layer_types"] = ["sliding_attention" if v else "full_attention" for v in pattern]
    elif "layer_types" in out:  # per-layer list (transformers 5): must match the layer count
        out["layer_types"] = ["full_attention"] * m.num_layers
    return out


def _yarn_to_hf(m: GPTModelConfig) -> Dict[str, Any]:
    """HF ``rope_scaling`` of a YaRN model (inverse of :func:`_yarn_fields`)."""
    out = {"rope_type": "yarn", "factor": m.yarn_rotary_scaling_factor,
           "original_max_position_embeddings": m.yarn_original_max_position_embeddings,
           "beta_fast": m.yarn_beta_fast, "beta_slow": m.yarn_beta_slow,
           "truncate": m.yarn_correction_range_round_to_int}
    if m.yarn_mscale is not None and m.yarn_mscale_all_dim is not None:
        out.update(mscale=m.yarn_mscale, mscale_all_dim=m.yarn_mscale_all_dim)
    return out


def _write_gpt_oss_attention(out: Dict[str, Any], m: GPTModelConfig, arch: HFArchitecture) -> None:
    """gpt-oss's per-layer ``layer_types`` / ``sliding_window`` and SwiGLU clamp; the weights are written
    dense (bf16 when the model is), so an MXFP4 ``quantization_config`` is dropped."""
    out.pop("quantization_config", None)
    out.update(swiglu_limit=arch.swiglu_limit, swiglu_alpha=GPT_OSS_SWIGLU_ALPHA)
    if m.window_size is None:
        out["layer_types"] = ["full_attention"] * m.num_layers
    else:
        out["sliding_window"] = m.window_size[0] + 1
        out["layer_types"] = ["sliding_attention" if v else "full_attention" for v in _window_pattern(m)]


def _write_moe(out: Dict[str, Any], m: GPTModelConfig, family: str) -> None:
    """The MoE fields of ``config.json`` (inverse of :func:`_read_moe`)."""
    experts_key = "num_experts" if "num_experts" in out and "num_local_experts" not in out else "num_local_experts"
    out.update({experts_key: m.num_moe_experts, "num_experts_per_tok": m.moe_router_topk})
    if family in ("mixtral", "gpt_oss"):
        out["intermediate_size"] = m.moe_ffn_hidden_size
        if family == "mixtral":
            out.setdefault("router_jitter_noise", 0.0)
        return
    pattern = m.moe_layer_pattern()
    out.update(moe_intermediate_size=m.moe_ffn_hidden_size, norm_topk_prob=not m.moe_router_pre_softmax)
    step, dense = out.get("decoder_sparse_step", 1), out.get("mlp_only_layers") or []
    if [int(i not in dense and (i + 1) % step == 0) for i in range(m.num_layers)] != pattern:
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i, v in enumerate(pattern) if not v])  # any pattern
    else:  # the original spelling still says the same: keep it (config.json round-trips unchanged)
        out.update(decoder_sparse_step=step, mlp_only_layers=list(dense))


def _window_pattern(m: GPTModelConfig) -> list:
    """Per layer, 1 if it has the sliding window (Megatron's ``is_layer_window_attention``)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    window = tuple(m.window_size) if m.window_size is not None else None
    return [int(is_layer_window_attention(window, m.window_attn_skip_freq, n)) for n in range(1, m.num_layers + 1)]


def _check_family_fits(arch: HFArchitecture) -> None:
    """Refuse to export a Megatron model as a family whose HF class cannot hold it."""
    m = arch.model
    _check_moe_fits(arch)
    attention_family = _ATTENTION_FAMILY.get(arch.family, arch.family)
    if arch.family == "gpt2":
        required = dict(normalization="LayerNorm", activation="gelu", position_embedding_type="learned_absolute",
                        add_bias_linear=True, qk_layernorm=False)
    else:
        if m.position_embedding_type not in ("rope", "yarn"):
            raise ValueError(f"cannot export as {arch.family}: GPTModelConfig.position_embedding_type is "
                             f"{m.position_embedding_type!r}, the HF {_ARCHITECTURE_OF[arch.family]} needs 'rope' / 'yarn'")
        required = dict(normalization="RMSNorm", activation="swiglu",
                        qk_layernorm=attention_family == "qwen3")
        if arch.family == "qwen2":
            required.update(add_qkv_bias=True, add_bias_linear=False)
        elif arch.family == "gpt_oss":  # biases everywhere, learnable sinks
            required.update(add_qkv_bias=True, add_bias_linear=True, softmax_type="learnable")
            if arch.swiglu_limit is None:
                raise ValueError("cannot export as gpt_oss: its experts' SwiGLU is clamped (HFArchitecture."
                                 "swiglu_limit) and this model's is the plain one")
        elif attention_family == "mistral" or arch.family == "qwen3_moe":  # no linear biases in these classes
            required.update(add_qkv_bias=False, add_bias_linear=False)
        elif m.add_qkv_bias != m.add_bias_linear:
            raise ValueError(f"{arch.family} export: add_qkv_bias ({m.add_qkv_bias}) must equal add_bias_linear "
                             f"({m.add_bias_linear}) (HF attention_bias covers q/k/v/o together)")
    if arch.family != "gpt_oss" and arch.swiglu_limit is not None:
        raise ValueError(f"cannot export as {arch.family}: HFArchitecture.swiglu_limit={arch.swiglu_limit} (gpt-oss's "
                         f"clamped SwiGLU); the HF {_ARCHITECTURE_OF[arch.family]} has the plain SwiGLU")
    if m.softmax_type != "vanilla" and arch.family != "gpt_oss":
        raise ValueError(f"cannot export as {arch.family}: GPTModelConfig.softmax_type is {m.softmax_type!r} "
                         "(attention sinks); the HF class has none")
    if m.window_size is not None and arch.family != "gpt_oss":  # gpt-oss: any per-layer pattern (layer_types)
        if attention_family not in ("mistral", "qwen2", "qwen3"):
            raise ValueError(f"cannot export as {arch.family}: GPTModelConfig.window_size is {m.window_size} and "
                             f"the HF {_ARCHITECTURE_OF[arch.family]} has no sliding window")
        freq = m.window_attn_skip_freq
        if attention_family == "mistral" and freq is not None:
            raise ValueError(f"cannot export as mistral: window_attn_skip_freq={freq!r}; MistralForCausalLM slides "
                             "every layer")
        if attention_family != "mistral":
            pattern = _window_pattern(m)
            first = pattern.index(1) if any(pattern) else m.num_layers
            if pattern != [0] * first + [1] * (m.num_layers - first):
                raise ValueError(f"cannot export as {arch.family}: its sliding layers are the last ones (layers "
                                 f"from max_window_layers on), not window_attn_skip_freq={freq!r}")
    for name, value in required.items():
        if getattr(m, name) != value:
            raise ValueError(f"cannot export as {arch.family}: GPTModelConfig.{name} is {getattr(m, name)!r}, "
                             f"the HF {_ARCHITECTURE_OF[arch.family]} needs {value!r}")


def _check_moe_fits(arch: HFArchitecture) -> None:
    """Refuse an MoE model as a dense family (and the reverse), and router / expert settings the HF MoE
    class cannot hold, naming the ``GPTModelConfig`` key."""
    m, family = arch.model, arch.family
    if family not in MOE_FAMILIES:
        if m.is_moe:
            raise ValueError(f"cannot export as {family}: GPTModelConfig.num_moe_experts is {m.num_moe_experts} (a "
                             f"mixture of experts); the HF {_ARCHITECTURE_OF[family]} is dense "
                             f"(MoE families: {list(MOE_FAMILIES)})")
        return
    if not m.is_moe:
        raise ValueError(f"cannot export as {family}: GPTModelConfig.num_moe_experts is null (a dense model); "
                         f"the HF {_ARCHITECTURE_OF[family]} is a mixture of experts")
    required = dict(moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
                    moe_router_enable_expert_bias=False, moe_shared_expert_intermediate_size=None,
                    moe_shared_expert_gate=False, moe_expert_capacity_factor=None)
    if family in ("mixtral", "gpt_oss"):  # renormalised top-k, every layer sparse
        required.update(moe_router_pre_softmax=False)
        if not all(m.moe_layer_pattern()):
            raise ValueError(f"cannot export as {family}: GPTModelConfig.moe_layer_freq={m.moe_layer_freq!r} has dense "
                             f"layers; every {_ARCHITECTURE_OF[family]} layer is sparse (Qwen3-MoE has mlp_only_layers)")
    for name, value in required.items():
        if getattr(m, name) != value:
            raise ValueError(f"cannot export as {family}: GPTModelConfig.{name} is {getattr(m, name)!r}, "
                             f"the HF {_ARCHITECTURE_OF[family]} needs {value!r}")
