"""Build a Megatron-core ``GPTModel`` (teacher or student) for this rank's pipeline stage."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from nemo_kd.models.config import GPTModelConfig
from nemo_kd.models.layer_spec import get_gpt_block_spec, get_gpt_layer_spec
from nemo_kd.parallel import state

__all__ = ["to_transformer_config", "build_gpt_model"]


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
    cfg.validate_parallel(tp, pp, vpp)
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
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


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
    layer_spec = get_gpt_layer_spec(cfg.transformer_impl, cfg.normalization, cfg.qk_layernorm)
    num_layers_here = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    model = GPTModel(
        config=tconfig,
        transformer_layer_spec=get_gpt_block_spec(layer_spec, num_layers_here, cfg.transformer_impl),
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
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if wrap_float16 and cfg.params_dtype != "fp32":
        model = Float16Module(tconfig, model)
    return model

