"""Command-line conversions (console scripts ``nemo-kd-convert-hf-to-megatron`` and
``nemo-kd-convert-megatron-to-hf``; ``examples/convert_*.py`` call the same functions).

Arguments are parsed before anything heavy is imported (torch, Megatron: seconds), so
``--help`` and usage errors answer at once; ``tests/test_cli_startup.py`` checks it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile

__all__ = ["hf_to_megatron_main", "megatron_to_hf_main"]

_HF_TO_MEGATRON_DOC = """Import a Hugging Face causal LM (Llama, Mistral, Qwen2, Qwen3, GPT-2) as a nemo_kd Megatron checkpoint.

    python examples/convert_hf_to_megatron.py --hf-dir meta-llama/Llama-3.2-1B-local --out /ckpt/llama1b
    torchrun --nproc-per-node 4 examples/convert_hf_to_megatron.py --hf-dir ... --out ... --tp 2 --pp 2

The output (dist_checkpointing + model_config.json + tokenizer/) loads at any TP/PP, so a
single process is enough; running under torchrun with --tp/--pp only splits the host
memory: each process holds its shard plus one full tensor. Also installed as the console
script ``nemo-kd-convert-hf-to-megatron``.
"""

_MEGATRON_TO_HF_DOC = """Export a nemo_kd Megatron checkpoint (e.g. the distilled student) as a Hugging Face directory.

    python examples/convert_megatron_to_hf.py --megatron-dir /ckpt/student --out /export/student-hf

    python examples/convert_megatron_to_hf.py --megatron-dir runs/student.nemo --out /export/student-hf --family llama

The result loads with ``transformers.AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` (tokenizer files and chat template are copied from
--tokenizer-dir, else the checkpoint's ``tokenizer/``, else the tokenizer packed inside the
``.nemo``). Runs in one process: peak host memory is the full model plus one output shard
(--max-shard-size). Also installed as the console script ``nemo-kd-convert-megatron-to-hf``.
"""


def hf_to_megatron_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=_HF_TO_MEGATRON_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors + tokenizer)")
    parser.add_argument("--out", required=True, help="output Megatron checkpoint directory")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                        help="parameter dtype (default: the checkpoint's torch_dtype; keeps the round trip exact)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument("--sliding-window", choices=["window", "truncate", "error"], default="window",
                        help="sliding-window attention: 'window' (default) converts it (window_size); 'truncate' "
                             "caps max_position_embeddings at the window (full attention, exact); 'error' refuses")
    parser.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size of this (torchrun) job")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size of this (torchrun) job")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from nemo_kd.convert import CorruptCheckpointError, UnsupportedHFConfigError, convert_hf_to_megatron, ensure_parallel
    from nemo_kd.parallel import ParallelConfig

    try:
        with ensure_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp)):
            arch = convert_hf_to_megatron(
                args.hf_dir, args.out, params_dtype=args.dtype,
                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, sliding_window=args.sliding_window,
                transformer_impl=args.transformer_impl, progress=not args.no_progress)
    except (UnsupportedHFConfigError, CorruptCheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {arch.family} model ({arch.model.num_layers} layers, hidden {arch.model.hidden_size}, "
          f"vocab {arch.model.vocab_size}) to {args.out}")
    return 0


def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}
    text = text.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def megatron_to_hf_main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=_MEGATRON_TO_HF_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron-dir", required=True,
                        help="checkpoint written by save_megatron_checkpoint, or a distilled student's .nemo")
    parser.add_argument("--out", required=True, help="output HF model directory")
    parser.add_argument("--family", default=None,
                        help="HF model family, e.g. llama, qwen2, gpt2 (needed when the model was not imported "
                             "from HF; an unknown name lists the valid ones)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="take tokenizer files / chat template from here (default: the checkpoint's own)")
    parser.add_argument("--max-shard-size", type=_size, default="5GB", help="e.g. 2GB, 500MB")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from nemo_kd.convert import FAMILIES, convert_megatron_to_hf

    families = sorted(set(FAMILIES.values()))
    if args.family is not None and args.family not in families:
        parser.error(f"argument --family: invalid choice {args.family!r} (choose from {', '.join(families)})")
    try:
        with _nemo_tokenizer(args.megatron_dir, args.tokenizer_dir) as tokenizer_dir:
            files = convert_megatron_to_hf(args.megatron_dir, args.out, family=args.family, tokenizer_dir=tokenizer_dir,
                                           max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(files)} weight file(s) and config.json to {args.out}")
    return 0


@contextlib.contextmanager
def _nemo_tokenizer(path: str, tokenizer_dir):
    """``tokenizer_dir`` if given; for a ``.nemo``, else, its packed tokenizer in a temporary directory."""
    if tokenizer_dir is not None or not path.endswith(".nemo"):
        yield tokenizer_dir
        return
    from nemo_kd.models.nemo_artifacts import extract_nemo_tokenizer

    with tempfile.TemporaryDirectory(prefix="nemo_kd_tokenizer_") as tmp:
        yield tmp if extract_nemo_tokenizer(path, tmp) else None  # none packed (older .nemo): the export warns
