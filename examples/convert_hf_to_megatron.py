#!/usr/bin/env python
"""Import a Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3, GPT-2) as a nemo_kd Megatron checkpoint.

    python examples/convert_hf_to_megatron.py --hf-dir meta-llama/Llama-3.2-1B-local --out /ckpt/llama1b
    torchrun --nproc-per-node 4 examples/convert_hf_to_megatron.py --hf-dir ... --out ... --tp 2 --pp 2

The output (dist_checkpointing + model_config.json + tokenizer/) loads at any TP/PP, so a
single process is enough; running under torchrun with --tp/--pp only splits the host
memory: each process holds its shard plus one full tensor. Also installed as the console
script ``nemo-kd-convert-hf-to-megatron``.
"""

import sys

from nemo_kd.convert.cli import hf_to_megatron_main

if __name__ == "__main__":
    sys.exit(hf_to_megatron_main())
