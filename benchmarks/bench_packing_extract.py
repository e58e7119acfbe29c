"""What sequence packing buys in extraction: ``compute_topk_logits`` tokens/s, packed vs padded, same teacher and data.

The dataset of ``bench_packing.py`` (log-normal token counts: median ~300, p99 ~4k, capped at the row
length), written as JSONL (prompt / response texts of single-token words, so the lengths hold after
tokenisation), and a random Megatron teacher. Both layouts run the real extraction
(:func:`~nemo_kd.teacher.extract.compute_topk_logits`, top-k, store written and verified):

* ``padded`` – each batch right-padded to its longest sample (``pack_sequences=false``);
* ``packed`` – each batch's samples packed into rows of ``max_seq_length`` (``pack_sequences=true``: first-fit
  decreasing, run in Megatron's THD layout: attention inside each sample).

Reported: real tokens/s (prompt + completion tokens of the samples, not padding), completion tokens/s, the
padded positions each layout ran, and the ratio packed / padded from the same run (``--repeat`` alternates
the two, each reporting its median). The stores are compared (values within fp32 rounding of another batch shape; ids
equal but where a near-tie's order flips). No assertion on speed: a benchmark.

    .venv/bin/python benchmarks/bench_packing_extract.py                 # CPU: 64 samples, rows of 4096
    .venv/bin/python benchmarks/bench_packing_extract.py --samples 128 --batch 16 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_packing import PROMPT, lengths  # noqa: E402  (one definition of the skewed lengths)

WORDS = list("abcdefghijklmnopqrstuvwxyz")  # " a" … " z": one token each after BPE training


def write_data(path: str, ns: np.ndarray, seed: int) -> None:
    """Samples whose prompt is ~PROMPT words and whose response makes the total ~n words (one token each)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for i, n in enumerate(ns.tolist()):
            words = rng.choice(WORDS, size=int(n))
            f.write(json.dumps({"id": i, "prompt": " ".join(words[:PROMPT]),
                                "response": " ".join(words[PROMPT:])}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8, help="extraction batch_size (samples per batch)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher.extract import ExtractConfig, compute_topk_logits
    from nemo_kd.teacher.store import StoreReader
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    work = tempfile.mkdtemp(prefix="bench_packing_extract_")
    try:
        ns = lengths(args.samples, args.seq_length - 32, seed=0)  # room for the chat template's tokens
        data = os.path.join(work, "data.jsonl")
        write_data(data, ns, seed=1)
        tok = train_byte_level_bpe([" ".join(WORDS)] * 64, vocab_size=512, save_dir=os.path.join(work, "tok"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        initialize_parallel(ParallelConfig(seed=3))
        cfg = GPTModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                             num_query_groups=2, ffn_hidden_size=4 * args.hidden, vocab_size=len(tok),
                             max_position_embeddings=args.seq_length)
        full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        save_full_checkpoint(os.path.join(work, "teacher"), full, cfg)
        teacher = MegatronTeacher(os.path.join(work, "teacher"))
        times = {"padded": [], "packed": []}
        summaries = {}
        for rep in range(args.repeat):
            for name in (("padded", "packed") if rep % 2 == 0 else ("packed", "padded")):
                out = os.path.join(work, f"{name}-{rep}")
                ecfg = ExtractConfig(data_path=data, output_path=out, top_k=args.k, max_seq_length=args.seq_length,
                                     values_dtype="float32", batch_size=args.batch, progress=False,
                                     pack_sequences=name == "packed")
                start = time.perf_counter()
                summaries[name] = compute_topk_logits(ecfg, teacher, tok)
                times[name].append(time.perf_counter() - start)
                print(f"  pass {rep}: {name} {times[name][-1]:.1f} s", flush=True)
        # the same store either way: ids equal except where two logits tie to fp32 rounding of another batch
        # shape (the order of a near-tie flips), values within that rounding
        with StoreReader(os.path.join(work, "padded-0"), verify_checksums=True) as a, \
                StoreReader(os.path.join(work, "packed-0"), verify_checksums=True) as b:
            worst, rows_differ, rows = 0.0, 0, 0
            for i in range(len(a)):
                (va, ia, la, _), (vb, ib, lb, _) = a.read_numpy(i), b.read_numpy(i)
                rows += len(ia)
                rows_differ += int((ia != ib).any(1).sum())
                worst = max(worst, float(np.abs(np.sort(va, 1) - np.sort(vb, 1)).max(initial=0.0)),
                            float(np.abs(la - lb).max(initial=0.0)))
        # padded positions each layout ran: per batch the longest sample x the batch (padded), rows x row (packed)
        from nemo_kd.data.packing import pack_plan

        real = [int(n) for n in ns]  # approximate: the template adds a few tokens per sample
        padded_pos = sum(max(real[b:b + args.batch]) * len(real[b:b + args.batch])
                         for b in range(0, len(real), args.batch))
        packed_pos = sum(len(pack_plan(real[b:b + args.batch], args.seq_length, window=args.batch, shuffle=False))
                         * args.seq_length for b in range(0, len(real), args.batch))
    finally:
        destroy_parallel()
        shutil.rmtree(work, ignore_errors=True)
    pct = np.percentile(ns, [50, 99])
    total = int(ns.sum())
    print(f"\n{args.samples} samples, tokens: median {pct[0]:.0f}, p99 {pct[1]:.0f}, max {ns.max()}, {total:,} in all; "
          f"batches of {args.batch}, rows of {args.seq_length}; teacher {args.layers} layers, hidden {args.hidden}, "
          f"top-{args.k}; stores: values within {worst:.1e}, top-k ids equal in {rows - rows_differ:,} of {rows:,} "
          f"rows (the others: a near-tie's order)")
    print("| layout | positions run (≈) | padding (≈) | real tokens/s | completion tokens/s |\n|---|---:|---:|---:|---:|")
    rate = {}
    for name, pos in (("padded", padded_pos), ("packed", packed_pos)):
        t = statistics.median(times[name])
        rate[name] = total / t
        print(f"| {name} | {pos:,} | {100 * (1 - total / pos):.0f}% | {rate[name]:,.0f} | "
              f"{summaries[name].num_tokens / t:,.0f} |")
    expected = int((ns - PROMPT).sum())
    print(f"completion tokens stored: {summaries['packed'].num_tokens:,} (the words of the responses: {expected:,})")
    print(f"\npacked / padded real tokens/s: {rate['packed'] / rate['padded']:.2f}x")


if __name__ == "__main__":
    main()
