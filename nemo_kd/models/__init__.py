"""Megatron-core GPT teacher/student: architecture config, layer specs, builder, TP/PP sharding."""

from nemo_kd.models.builder import build_gpt_model, to_transformer_config
from nemo_kd.models.config import GPTModelConfig
from nemo_kd.models.layer_spec import SDPACoreAttention, get_gpt_block_spec, get_gpt_layer_spec
from nemo_kd.models.sharding import gather_state_dict, layer_offset, shard_state_dict, split_kind

__all__ = [
    "GPTModelConfig",
    "build_gpt_model",
    "to_transformer_config",
    "SDPACoreAttention",
    "get_gpt_layer_spec",
    "get_gpt_block_spec",
    "shard_state_dict",
    "gather_state_dict",
    "layer_offset",
    "split_kind",
]
