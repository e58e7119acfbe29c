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

# Names resolved on first use (PEP 562): `from nemo_kd.convert.cli import ...` and the CLIs' `--help`
# must not import Megatron (seconds) through this package's __init__.
_LAZY = {
    "LoadedModel": "nemo_kd.convert.checkpoint_io",
    "build_and_load": "nemo_kd.convert.checkpoint_io",
    "build_model_chunks": "nemo_kd.convert.checkpoint_io",
    "convert_hf_to_megatron": "nemo_kd.convert.checkpoint_io",
    "convert_megatron_to_hf": "nemo_kd.convert.checkpoint_io",
    "copy_tokenizer_files": "nemo_kd.convert.checkpoint_io",
    "ensure_parallel": "nemo_kd.convert.checkpoint_io",
    "is_megatron_checkpoint": "nemo_kd.convert.checkpoint_io",
    "load_megatron_checkpoint": "nemo_kd.convert.checkpoint_io",
    "read_checkpoint_architecture": "nemo_kd.convert.checkpoint_io",
    "save_megatron_checkpoint": "nemo_kd.convert.checkpoint_io",
    "FAMILIES": "nemo_kd.convert.hf_config",
    "HFArchitecture": "nemo_kd.convert.hf_config",
    "RopeScaling": "nemo_kd.convert.hf_config",
    "UnsupportedHFConfigError": "nemo_kd.convert.hf_config",
    "architecture_to_hf_config": "nemo_kd.convert.hf_config",
    "hf_config_to_architecture": "nemo_kd.convert.hf_config",
    "read_hf_config": "nemo_kd.convert.hf_config",
    "CorruptCheckpointError": "nemo_kd.convert.hf_weights",
    "SafetensorsReader": "nemo_kd.convert.hf_weights",
    "SafetensorsWriter": "nemo_kd.convert.hf_weights",
    "iter_hf_tensors": "nemo_kd.convert.hf_weights",
    "load_hf_weights": "nemo_kd.convert.hf_weights",
    "weight_rules": "nemo_kd.convert.hf_weights",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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
