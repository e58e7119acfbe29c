"""Hugging Face checkpoints in and out of Megatron-core GPT models (Llama, Mistral, Qwen2, Qwen3, GPT-2).

* :mod:`~nemo_kd.convert.hf_config`: ``config.json`` <-> :class:`HFArchitecture` (a
  ``GPTModelConfig`` plus family, RoPE scaling, GELU flavour), with errors naming the field
  Megatron cannot express.
* :mod:`~nemo_kd.convert.hf_weights`: per-family tensor names/layouts, streaming safetensors
  reader/writer, loading an HF checkpoint straight into a TP/PP shard.
* :mod:`~nemo_kd.convert.checkpoint_io`: the Megatron side (dist_checkpointing + model_config.json,
  loadable at any TP/PP) and the directory conversions used by
  ``examples/convert_hf_to_megatron.py`` / ``examples/convert_megatron_to_hf.py``.
"""

from nemo_kd.convert.checkpoint_io import (
    LoadedModel,
    build_and_load,
    build_model_chunks,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    copy_tokenizer_files,
    ensure_parallel,
    is_megatron_checkpoint,
    load_megatron_checkpoint,
    read_checkpoint_architecture,
    save_megatron_checkpoint,
)
from nemo_kd.convert.hf_config import (
    FAMILIES,
    HFArchitecture,
    RopeScaling,
    UnsupportedHFConfigError,
    architecture_to_hf_config,
    hf_config_to_architecture,
    read_hf_config,
)
from nemo_kd.convert.hf_weights import (
    CorruptCheckpointError,
    SafetensorsReader,
    SafetensorsWriter,
    iter_hf_tensors,
    load_hf_weights,
    weight_rules,
)

__all__ = [
    "FAMILIES",
    "HFArchitecture",
    "RopeScaling",
    "UnsupportedHFConfigError",
    "CorruptCheckpointError",
    "LoadedModel",
    "read_hf_config",
    "hf_config_to_architecture",
    "architecture_to_hf_config",
    "weight_rules",
    "SafetensorsReader",
    "SafetensorsWriter",
    "load_hf_weights",
    "iter_hf_tensors",
    "ensure_parallel",
    "build_model_chunks",
    "save_megatron_checkpoint",
    "load_megatron_checkpoint",
    "read_checkpoint_architecture",
    "build_and_load",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "copy_tokenizer_files",
    "is_megatron_checkpoint",
]
