"""Build a Megatron-core ``GPTModel`` (teacher or student) for this rank's pipeline stage."""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_kd.models.config import DTYPES, GPTModelConfig
from nemo_kd.models.layer_spec import get_gpt_block_spec, get_gpt_layer_spec, get_gpt_moe_block_spec
from nemo_kd.models.sequence_parallel import with_sequence_parallel_norms
from nemo_kd.parallel import state

__all__ = ["to_transformer_config", "build_gpt_model", "in_params_dtype", "half_precision_output"]


def to_transformer_config(cfg: GPTModelConfig, **overrides) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for ``cfg`` under the current parallel state.

    Parallel sizes come from :mod:`nemo_kd.parallel.state` (1 when it is not initialised).
    Fusions that need apex/TE kernels are off for ``transformer_impl="local"``; weights are
    initialised on CPU when CUDA is unavailable. ``overrides`` set any other
    ``TransformerConfig`` field (e.g. ``recompute_granularity``).
    """
    tp = state.tp_size() if state.is_initialized() else 1
    pp = state.pp_size() if state.is_initialized() else 1
    cp = state.cp_size() if state.is_initialized() else 1
    parallel_cfg = state.config()
    vpp = parallel_cfg.virtual_pipeline_model_parallel_size if parallel_cfg is not None else None
    sequence_parallel = bool(parallel_cfg.sequence_parallel) if parallel_cfg is not None else False
    ep = state.ep_size() if state.is_initialized() else 1
    etp = state.etp_size() if state.is_initialized() else tp
    cfg.validate_parallel(tp, pp, vpp, ep, etp)
    local = cfg.transformer_impl == "local"
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        add_bias_linear=cfg.add_bias_linear,
        add_qkv_bias=cfg.add_qkv_bias,
        gated_linear_unit=cfg.gated_linear_unit,
        activation_func=F.silu if cfg.gated_linear_unit else F.gelu,
        normalization=cfg.normalization,
        layernorm_epsilon=cfg.layernorm_epsilon,
        qk_layernorm=cfg.qk_layernorm,
        init_method_std=cfg.init_method_std,
        softmax_scale=cfg.softmax_scale,
        params_dtype=cfg.torch_dtype,
        pipeline_dtype=cfg.torch_dtype,
        bf16=cfg.params_dtype == "bf16",
        fp16=cfg.params_dtype == "fp16",
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        sequence_parallel=sequence_parallel,
        # Activation recomputation (None: off); GPTModelConfig checked Megatron's rules already.
        **cfg.recompute_settings,
        # Mixture of experts (nothing for a dense model): the router, dispatcher and expert keys as set,
        # grouped GEMM on the TE path (SequentialMLP on the local one), experts split over EP x expert TP.
        **_moe_kwargs(cfg, local, ep, etp),
        # Sliding window (window_size, window_attn_skip_freq) and attention sinks (softmax_type).
        **cfg.attention_settings,
        # No CUDA: Megatron must build weights with its CPU initialisation path.
        use_cpu_initialization=not torch.cuda.is_available(),
        # These fusions are apex/TE/jit kernels the local spec does not ship.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False if local else cfg.add_bias_linear,
        bias_dropout_fusion=False if local else True,
        masked_softmax_fusion=False if local else True,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
    # Megatron's default scope "full" is its own deprecated spelling of [] (the whole layer, if CUDA
    # graphs are on): it warns on every config built with defaults.
    kwargs.setdefault("cuda_graph_scope", [])
    kwargs.update(overrides)
    tconfig = TransformerConfig(**kwargs)
    # YaRN: GPTModel and the attention's RoPE read these as attributes of the config (no fields in 0.16.1).
    for name, value in cfg.yarn_settings.items():
        setattr(tconfig, name, value)
    return tconfig


def _moe_kwargs(cfg: GPTModelConfig, local: bool, ep: int, etp: int) -> dict:
    if not cfg.is_moe:
        return {}
    return dict(
        cfg.moe_settings,
        # Megatron's grouped GEMM (TEGroupedMLP) on the TE path; the local spec runs SequentialMLP.
        moe_grouped_gemm=not local,
        # These are TE kernels (fused permute / router / aux loss).
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )


def _mark_experts_expert_parallel(model: torch.nn.Module) -> None:
    """Mark every routed expert's parameters expert-parallel (``allreduce=False``), at EP=1 too.

    Megatron marks them only when ``expert_model_parallel_size > 1``; the mark decides where DDP reduces
    their gradients (its expert buffers, over the expert-data-parallel group, scaled by 1/DP: at EP=1 that
    group is the data-parallel group, so the same sums) and which optimizer holds them (Megatron's
    ``ChainedOptimizer`` of the dense and the expert optimizer). Marked at every EP, an MoE student's
    optimizer is the same chain [dense, experts] whatever the layout, and its training checkpoint (whose
    optimizer state is keyed by that chain) resumes at another EP.
    """
    from megatron.core.transformer.moe.moe_layer import MoELayer

    for module in model.modules():
        if isinstance(module, MoELayer):
            for param in module.experts.parameters():
                param.allreduce = False


def build_gpt_model(
    cfg: GPTModelConfig,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    wrap_float16: bool = True,
    **transformer_config_overrides,
) -> torch.nn.Module:
    """Megatron ``GPTModel`` holding this rank's TP shard of this rank's PP stage.

    Args:
        cfg: the architecture.
        pre_process: build the embedding (default: first pipeline stage).
        post_process: build the final norm + output layer (default: last pipeline stage).
        vp_stage: virtual pipeline stage (interleaved schedules), else None.
        wrap_float16: for bf16/fp16 ``params_dtype``, wrap in Megatron's ``Float16Module``
            (casts the remaining fp32 params and the inputs/outputs, as Megatron-LM does).
        transformer_config_overrides: extra ``TransformerConfig`` fields.

    The output layer is vocab-parallel and ``parallel_output=True``: logits are
    ``[s, b, padded_vocab / TP]`` on the last stage, the layout
    :mod:`nemo_kd.losses.vocab_parallel` consumes.
    """
    if not state.is_initialized():
        raise RuntimeError("call nemo_kd.parallel.initialize_parallel(...) before build_gpt_model")
    tconfig = to_transformer_config(cfg, **transformer_config_overrides)
    vpp = state.config().virtual_pipeline_model_parallel_size
    if pre_process is None:
        pre_process = state.is_pipeline_first_stage() and vp_stage in (None, 0)
    if post_process is None:
        post_process = state.is_pipeline_last_stage() and (vp_stage is None or vp_stage == vpp - 1)
    num_layers_here = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    if cfg.is_moe:
        # One spec per layer of this stage: MoE or dense as moe_layer_freq says (global layer index).
        offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage)
        pattern = cfg.moe_layer_pattern()[offset: offset + num_layers_here]
        block_spec = get_gpt_moe_block_spec(pattern, cfg.transformer_impl, cfg.normalization, cfg.qk_layernorm,
                                            cfg.num_moe_experts)
    else:
        layer_spec = get_gpt_layer_spec(cfg.transformer_impl, cfg.normalization, cfg.qk_layernorm)
        block_spec = get_gpt_block_spec(layer_spec, num_layers_here, cfg.transformer_impl)
    if tconfig.sequence_parallel and cfg.transformer_impl == "local":
        block_spec = with_sequence_parallel_norms(block_spec)  # TE's norms handle SP themselves
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=block_spec,
        vocab_size=cfg.padded_vocab_size(tconfig.tensor_model_parallel_size),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        position_embedding_type=cfg.position_embedding_type,
        rotary_percent=cfg.rotary_percent,
        rotary_base=cfg.rotary_base,
        vp_stage=vp_stage,
    )
    if cfg.is_moe:
        _mark_experts_expert_parallel(model)
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if wrap_float16 and cfg.params_dtype != "fp32":
        model = Float16Module(tconfig, model)
    return model


def in_params_dtype(model: torch.nn.Module, params_dtype: str) -> torch.nn.Module:
    """``model`` (a ``GPTModel`` chunk, bare or in ``Float16Module``) computing in ``params_dtype``.

    What :func:`build_gpt_model` would have built for that dtype: the weights cast, the
    ``TransformerConfig``'s ``params_dtype`` / ``pipeline_dtype`` (the dtype of the pipeline's
    p2p buffers) / ``bf16`` / ``fp16`` set alike, and ``Float16Module`` around it for bf16/fp16.
    For a model no optimizer holds yet (an online teacher loaded in its checkpoint's dtype);
    returns ``model`` itself when it already matches.
    """
    dtype = DTYPES[params_dtype]
    inner = model.module if isinstance(model, Float16Module) else model
    if inner.config.params_dtype == dtype and isinstance(model, Float16Module) == (params_dtype != "fp32"):
        return model
    config = inner.config
    config.params_dtype = config.pipeline_dtype = dtype
    config.bf16, config.fp16 = params_dtype == "bf16", params_dtype == "fp16"
    inner.to(dtype)
    return Float16Module(config, inner) if params_dtype != "fp32" else inner


def half_precision_output(model: torch.nn.Module):
    """``model``'s forward returning the last stage's output in the model's own dtype.

    ``Float16Module`` upcasts the last stage's output to fp32 by default (``fp32_output=True``):
    for logits a ``[b, s, V/TP]`` fp32 copy whose gradient is cast back down. The nemo_kd losses
    read bf16/fp16 logits directly and accumulate in fp32 (``losses.vocab_parallel.accumulation_dtype``),
    with the same values and the same once-rounded gradient, so the copy is skipped; the in-place
    logits gradient (``kd.inplace_logits_grad``) then overwrites the model's own logits. A
    bare fp32 model (or DDP around one) is returned unchanged.
    """
    inner = model.module if not isinstance(model, Float16Module) and hasattr(model, "module") else model
    return functools.partial(model, fp32_output=False) if isinstance(inner, Float16Module) else model
