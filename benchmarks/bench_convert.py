"""Conversion time and peak host memory for a ~1B-parameter Llama-style model (random weights).

    python benchmarks/bench_convert.py --workdir /tmp/bench_convert [--dtype bf16]

Each step runs in its own process so its peak RSS (``ru_maxrss``) is its own:

1. ``make``: build the HF model from a config (random init, no download) and ``save_pretrained``
   it in 2 GB shards (not a conversion cost; reported for scale);
2. ``import``: ``convert_hf_to_megatron`` at TP=1/PP=1 (one process holds the whole model);
3. ``export``: ``convert_megatron_to_hf``, then a bit-exactness check of every tensor.

Expected peaks (see ``nemo_kd/convert/checkpoint_io.py``): import ~ model bytes + one
tensor; export ~ model bytes + one output shard.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
    max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
)


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _step(name: str, workdir: str, dtype: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    hf_dir, mg_dir, out_dir = (os.path.join(workdir, d) for d in ("hf", "megatron", "hf_out"))
    start = time.perf_counter()
    result = {"step": name}
    if name == "make":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        config = LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("architectures", "model_type")})
        torch.set_default_dtype(torch_dtype)  # initialise directly in the target dtype: one copy
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
        result["params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(hf_dir, max_shard_size="2GB")
    elif name == "import":
        from nemo_kd.convert import convert_hf_to_megatron

        convert_hf_to_megatron(hf_dir, mg_dir, progress=False)
    elif name == "export":
        from nemo_kd.convert import SafetensorsReader, convert_megatron_to_hf

        convert_megatron_to_hf(mg_dir, out_dir, progress=False, max_shard_bytes=2 * 1024**3)
        result["seconds_without_check"] = time.perf_counter() - start
        result["peak_rss_gib_without_check"] = _peak_rss_gib()
        a, b = SafetensorsReader(hf_dir), SafetensorsReader(out_dir)
        result["bit_identical"] = sorted(a.keys()) == sorted(b.keys()) and all(
            torch.equal(a.get(k), b.get(k)) for k in a.keys())
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


def _dir_gib(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1024**3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/nemo_kd_bench_convert")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--step", choices=["make", "import", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    args = parser.parse_args()
    if args.step:
        print("RESULT " + json.dumps(_step(args.step, args.workdir, args.dtype)), flush=True)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    results = []
    for step in ("make", "import", "export"):
        proc = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--dtype", args.dtype,
                               "--step", step], capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"step {step} failed:\n{proc.stderr[-4000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
        print(json.dumps(results[-1]), flush=True)
    sizes = {d: round(_dir_gib(os.path.join(args.workdir, d)), 2) for d in ("hf", "megatron", "hf_out")}
    print(json.dumps({"checkpoint_gib": sizes, "dtype": args.dtype, "cpu_count": os.cpu_count()}))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
