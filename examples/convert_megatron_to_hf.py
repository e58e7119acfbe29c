#!/usr/bin/env python
"""Export a nemo_kd Megatron checkpoint (e.g. the distilled student) as a Hugging Face directory.

    python examples/convert_megatron_to_hf.py --megatron-dir /ckpt/student --out /export/student-hf

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (tokenizer files and chat template are copied from the
checkpoint's ``tokenizer/`` or --tokenizer-dir). Runs in one process: peak host memory is
the full model plus one output shard (--max-shard-size). Also installed as the console
script ``nemo-kd-convert-megatron-to-hf``.
"""

import sys

from nemo_kd.convert.cli import megatron_to_hf_main

if __name__ == "__main__":
    sys.exit(megatron_to_hf_main())
