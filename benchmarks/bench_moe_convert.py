"""Conversion time and peak host memory for a ~1B-parameter gpt-oss-shaped checkpoint with MXFP4 experts.

    python benchmarks/bench_moe_convert.py --workdir /tmp/nemo_kd_bench_moe_convert

The checkpoint is built locally from random bytes, never downloaded: gpt-oss's shape scaled down (hidden
1024, 12 layers alternating a 128-token sliding window and full attention, 16 experts top-4 of FFN 1024,
16 query / 4 KV heads of 64, attention sinks, YaRN, gpt-oss's 201,088-token vocabulary; ~1.05B parameters,
60% of them in the experts). As the released gpt-oss checkpoints ship them, every layer's expert weights are
MXFP4 ``*_blocks`` / ``*_scales`` tensors (the layout transformers' ``integrations/mxfp4.py`` reads, see
:mod:`nemo_kd.convert.mxfp4`; random codes and scales 2^-9..2^-4), everything else bf16, in ~1 GB shards with
an index. Each step runs in its own process, so its peak RSS (``ru_maxrss``) is its own:

1. ``make``: write the MXFP4 checkpoint (not a conversion cost; reported for scale);
2. ``load`` (baseline): every tensor of the same checkpoint read into memory (``safe_open`` / ``get_tensor``, a
   copy each, not left memory-mapped): the plainest read of it;
3. ``import``: ``convert_hf_to_megatron`` of the MXFP4 checkpoint at TP=1 (experts dequantised to bf16 one
   expert row at a time, the model built whole in this process, then dist-checkpointed);
4. ``export``: ``convert_megatron_to_hf`` to bf16 (dense experts), 1 GiB output shards;
5. ``import_bf16`` (baseline): ``convert_hf_to_megatron`` of that export, the dense-expert (bf16) version of
   the same model: what the MXFP4 import costs beyond a plain bf16 import;
6. ``check``: every exported tensor equals the source (bf16 tensors) or transformers' own MXFP4
   dequantisation of the source blocks/scales (``convert_moe_packed_tensors``, the experts), one tensor at a
   time.

Printed: each step's JSON (seconds, peak RSS, RSS before the step's work: the interpreter with torch /
Megatron imported; for import the peak once every tensor is streamed in, before dist-checkpointing writes,
for export the peak once the model is loaded, before the HF shards are written), the checkpoint sizes, and
the ratios: import / load and import / import_bf16 (time and peak RSS), and the streaming's footprint:
(peak RSS - RSS before) / the bf16 model, i.e. the one whole model an in-process TP=1 conversion holds plus
what streaming adds (one tensor: the largest is the 0.39 GiB embedding; see
``nemo_kd/convert/checkpoint_io.py``). Disk: at most three checkpoints at once (~5.4 GB), all deleted at
the end unless ``--keep`` (then ~7.5 GB stay).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_convert import _dir_gib, _peak_rss_gib  # noqa: E402 (the script's own directory is on sys.path)

CONFIG = dict(
    hidden_size=1024, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
    head_dim=64, num_local_experts=16, num_experts_per_tok=4, vocab_size=201088, max_position_embeddings=131072,
    sliding_window=128, swiglu_limit=7.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    layer_types=["sliding_attention", "full_attention"] * 6,
    rope_parameters={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096, "rope_theta": 150000.0},
)
EXPERT_WEIGHTS = ("experts.gate_up_proj", "experts.down_proj")  # stored MXFP4, output rows first
SHARD_BYTES = 1 << 30


def _rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    raise RuntimeError("no VmRSS in /proc/self/status")


def _hf_shapes():
    """(name, shape) of every parameter of the HF model, in its order (built on the meta device: no memory)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, GptOssConfig

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(GptOssConfig(**CONFIG))
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _random_tensors(name, shape, g):
    """The checkpoint's tensors for HF parameter ``name``: MXFP4 blocks/scales for the expert weights (random
    codes, scales 2^-9..2^-4), bf16 otherwise (norms around 1, the rest N(0, 0.02))."""
    import torch

    if name.endswith(EXPERT_WEIGHTS):
        experts, cols, rows = shape  # HF [E, in, out]; stored [E, out, in / 32, 16] and [E, out, in / 32]
        blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(127 - 9, 127 - 4 + 1, (experts, rows, cols // 32), dtype=torch.uint8, generator=g)
        return {name + "_blocks": blocks, name + "_scales": scales}
    if "norm" in name:
        return {name: (1 + 0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)}
    return {name: (0.02 * torch.randn(shape, generator=g, dtype=torch.bfloat16))}


def _make(hf_dir: str) -> dict:
    """Write the MXFP4 checkpoint shard by shard (one shard in memory), its index and config.json."""
    import torch
    from safetensors.torch import save_file
    from transformers import GptOssConfig

    os.makedirs(hf_dir)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, files, params = {}, {}, 0, [], 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, os.path.join(hf_dir, name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({key: name for key in shard})
        shard, shard_bytes = {}, 0

    for name, shape in _hf_shapes():
        params += int(torch.Size(shape).numel())
        for key, tensor in _random_tensors(name, shape, g).items():
            nbytes = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + nbytes > SHARD_BYTES:
                flush()
            shard[key], shard_bytes = tensor, shard_bytes + nbytes
    flush()
    total = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in files)
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = {**GptOssConfig(**CONFIG).to_dict(), "architectures": ["GptOssForCausalLM"], "dtype": "bfloat16",
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
                  "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}
    config.pop("torch_dtype", None)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return {"params": params, "shards": len(files)}


def _check(hf_dir: str, out_dir: str) -> dict:
    """Every exported tensor = the source's (bf16) or transformers' dequantisation of its MXFP4 blocks/scales."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from nemo_kd.convert import SafetensorsReader, read_hf_config

    source, exported = SafetensorsReader(hf_dir), SafetensorsReader(out_dir)
    names = [name for name, _ in _hf_shapes()]
    if sorted(exported.keys()) != sorted(names):
        return {"bit_identical": False, "why": "exported names differ from the HF model's parameters"}
    mismatched = []
    for name in names:
        got = exported.get(name)
        if name.endswith(EXPERT_WEIGHTS):  # transformers reads [E, out, in] blocks into the [E, in, out] parameter
            want = convert_moe_packed_tensors(source.get(name + "_blocks"), source.get(name + "_scales"),
                                              dtype=torch.bfloat16)
        else:
            want = source.get(name)
        if not (got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)):
            mismatched.append(name)
    return {"bit_identical": not mismatched, "mismatched": mismatched[:5],
            "quantization_config_dropped": "quantization_config" not in read_hf_config(out_dir)}


def _record_peak_before(module, name: str, result: dict, key: str) -> None:
    """Wrap ``module.name`` (a function or class the conversion calls by that global name) so that the process's
    peak RSS when it is first called goes to ``result[key]``: the phases' peaks, not only the whole step's."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        result.setdefault(key, _peak_rss_gib())
        return original(*args, **kwargs)

    setattr(module, name, wrapped)


def _step(name: str, workdir: str) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (imported before "rss_before": the interpreter's own footprint)

    from nemo_kd.convert import checkpoint_io

    hf_dir, mg_dir, out_dir, mg_bf16_dir = (os.path.join(workdir, d) for d in ("hf_mxfp4", "megatron", "hf_bf16",
                                                                               "megatron_from_bf16"))
    result = {"step": name, "rss_before_gib": _rss_gib()}
    start = time.perf_counter()
    if name == "make":
        result.update(_make(hf_dir))
    elif name == "load":  # every tensor read into this process's memory (not left memory-mapped)
        from safetensors import safe_open

        with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for file in files:
            with safe_open(os.path.join(hf_dir, file), framework="pt") as shard:
                for key in shard.keys():
                    state[key] = shard.get_tensor(key).clone()
        result["tensors"] = len(state)
        result["gib"] = sum(t.numel() * t.element_size() for t in state.values()) / 1024**3
    elif name in ("import", "import_bf16"):
        from nemo_kd.convert import convert_hf_to_megatron

        # the peak before dist-checkpointing writes: the model built and every tensor streamed in
        _record_peak_before(checkpoint_io, "save_megatron_checkpoint", result, "peak_rss_streamed_gib")
        src, dst = (hf_dir, mg_dir) if name == "import" else (out_dir, mg_bf16_dir)
        arch = convert_hf_to_megatron(src, dst, progress=False)
        result["params_dtype"] = arch.model.params_dtype
    elif name == "export":
        from nemo_kd.convert import convert_megatron_to_hf

        # the peak before the HF tensors are written: the model loaded whole
        _record_peak_before(checkpoint_io, "SafetensorsWriter", result, "peak_rss_loaded_gib")
        result["files"] = len(convert_megatron_to_hf(mg_dir, out_dir, progress=False, max_shard_bytes=SHARD_BYTES))
    elif name == "check":
        result.update(_check(hf_dir, out_dir))
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_gib"] = _peak_rss_gib()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/nemo_kd_bench_moe_convert")
    parser.add_argument("--step", choices=["make", "load", "import", "export", "import_bf16", "check"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    args = parser.parse_args()
    if args.step:
        print("RESULT " + json.dumps(_step(args.step, args.workdir)), flush=True)
        return
    shutil.rmtree(args.workdir, ignore_errors=True)
    os.makedirs(args.workdir)
    results, sizes = {}, {}
    # (step, the directory it writes: measured after it, and deleted once no later step reads it, unless --keep;
    # so at most three checkpoints, ~5.4 GB, are on disk at once)
    plan = (("make", "hf_mxfp4", None), ("load", None, None), ("import", "megatron", None),
            ("export", "hf_bf16", "megatron"), ("import_bf16", "megatron_from_bf16", "megatron_from_bf16"),
            ("check", None, None))
    try:
        for step, written, done_with in plan:
            proc = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--step", step],
                                  capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"step {step} failed:\n{proc.stderr[-4000:]}")
            results[step] = json.loads(lines[-1][len("RESULT "):])
            print(json.dumps(results[step]), flush=True)
            if written:
                sizes[written] = round(_dir_gib(os.path.join(args.workdir, written)), 3)
            if done_with and not args.keep:
                shutil.rmtree(os.path.join(args.workdir, done_with))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    model_gib = results["make"]["params"] * 2 / 1024**3  # bf16, as the Megatron model holds it
    r = results

    def extra(step):  # what the step's work added to the interpreter's footprint
        return r[step]["peak_rss_gib"] - r[step]["rss_before_gib"]

    print(json.dumps({
        "checkpoint_gib": sizes, "model_bf16_gib": round(model_gib, 3), "cpu_count": os.cpu_count(),
        "import_over_load": {"seconds": round(r["import"]["seconds"] / r["load"]["seconds"], 2),
                             "peak_rss": round(r["import"]["peak_rss_gib"] / r["load"]["peak_rss_gib"], 2)},
        "import_over_import_bf16": {"seconds": round(r["import"]["seconds"] / r["import_bf16"]["seconds"], 2),
                                    "peak_rss": round(r["import"]["peak_rss_gib"] / r["import_bf16"]["peak_rss_gib"],
                                                      2)},
        "export_over_import_bf16_seconds": round(r["export"]["seconds"] / r["import_bf16"]["seconds"], 2),
        "step_rss_over_model_bf16": {s: round(extra(s) / model_gib, 2)
                                     for s in ("load", "import", "export", "import_bf16")},
        "import_rss_beyond_model_gib": {"streaming": round(r["import"]["peak_rss_streamed_gib"]
                                                           - r["import"]["rss_before_gib"] - model_gib, 3),
                                        "whole step": round(extra("import") - model_gib, 3)},
        "export_rss_beyond_model_gib": {"loaded": round(r["export"]["peak_rss_loaded_gib"]
                                                        - r["export"]["rss_before_gib"] - model_gib, 3),
                                        "whole step": round(extra("export") - model_gib, 3)},
    }))


if __name__ == "__main__":
    main()
