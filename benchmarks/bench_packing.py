"""What sequence packing buys: training tokens/s, packed vs padded, same student, teacher and samples.

A dataset whose lengths follow the skew of chat / reasoning data (log-normal, median ~300
tokens, p99 ~4k, capped at the row length), each sample a prompt of 16 tokens and a
completion, an offline top-k teacher (random logits' top-k). Both layouts train the same
student from the same weights with :class:`~nemo_kd.models.engine.DistillationEngine`
(Megatron's schedule, DDP, Adam), top-k KD + SFT:

* ``padded`` – one sample per row of ``--seq-length`` (``collate``);
* ``packed`` – :func:`~nemo_kd.data.packing.pack_plan` rows (``collate_packed``), run in Megatron's THD
  layout (``PackedSeqParams``: the local spec's SDPA attends inside each sample, samples bucketed by length).

``padded`` is what the trainer does without packing: Megatron's schedules exchange fixed-shape
activations, so every row is ``--seq-length`` long.

The step count covers the same samples in both (one pass over the dataset in global batches
of ``--rows-per-step`` rows). Reported: real tokens/s (the samples' tokens, not padding), the
padding fraction of the rows, and the ratio packed / padded measured in the same run
(``--repeat`` alternates the two, each reporting its median pass). No assertion: a benchmark.

    .venv/bin/python benchmarks/bench_packing.py                    # CPU: 32 samples, rows of 4096 (~5 min)
    .venv/bin/python benchmarks/bench_packing.py --samples 256 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemo_kd.data.kd_dataset import DistillationSample, collate_rows  # noqa: E402
from nemo_kd.data.packing import pack_plan, sample_positions  # noqa: E402
from nemo_kd.teacher.store import TeacherTopK  # noqa: E402

PROMPT = 16


def lengths(n: int, seq_length: int, seed: int) -> np.ndarray:
    """Log-normal token counts: median exp(μ) = 300, σ = 1.1 puts p99 near 300·e^(2.33·1.1) ≈ 3.9k."""
    x = np.random.default_rng(seed).lognormal(mean=np.log(300.0), sigma=1.1, size=n)
    return np.clip(x.astype(np.int64), PROMPT + 2, seq_length)


def samples(ns: np.ndarray, vocab: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(ns.tolist()):
        ids = torch.randint(0, vocab, (n,), generator=g).numpy()
        mask = np.zeros(n, dtype=np.int8)
        mask[PROMPT:] = 1
        m = n - PROMPT
        vals = torch.randn(m, k, generator=g).sort(dim=-1, descending=True).values * 2
        tid = torch.randint(0, vocab, (m, k), generator=g)
        out.append(DistillationSample(i, ids, mask, TeacherTopK(i, vals, tid, vals[:, 0] + 1.0, 0.0)))
    return out


def steps_of(rows, rows_per_step: int, micro: int):
    """Global batches of ``rows_per_step`` rows (a trailing partial one dropped, as the sampler does)."""
    full = len(rows) // rows_per_step * rows_per_step
    return [[rows[s + m:s + m + micro] for m in range(0, rows_per_step, micro)] for s in range(0, full, rows_per_step)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-length", type=int, default=4096)
    ap.add_argument("--rows-per-step", type=int, default=1)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--window", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                    help="transformer_engine: TE's attention reads the packed rows as THD (cu_seqlens; GPU)")
    ap.add_argument("--params-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()

    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    ns = lengths(args.samples, args.seq_length, seed=0)
    data = samples(ns, args.vocab, args.k, seed=1)
    plan = pack_plan([sample_positions(n) for n in ns.tolist()], args.seq_length, args.window, seed=2)
    layouts = {
        "padded": (steps_of([[s] for s in data], args.rows_per_step, args.micro_batch), False),
        "packed": (steps_of([[data[i] for i in p] for p in plan], args.rows_per_step, args.micro_batch), True),
    }
    if any(not steps for steps, _ in layouts.values()):
        raise SystemExit(f"{len(plan)} packed rows: fewer than --rows-per-step {args.rows_per_step}; use more --samples")
    # what each layout's steps cover (a trailing partial global batch is dropped)
    covered = {name: sum(len(s.input_ids) for step in steps for mb in step for row in mb for s in row)
               for name, (steps, _) in layouts.items()}
    model_cfg = GPTModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4,
                               num_query_groups=2, ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab,
                               max_position_embeddings=args.seq_length, transformer_impl=args.transformer_impl,
                               params_dtype=args.params_dtype)
    loss_cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    initialize_parallel(ParallelConfig(seed=3))
    times = {name: [] for name in layouts}
    try:
        engines = {name: DistillationEngine(model_cfg, loss_cfg, OptimConfig(lr=1e-4),
                                            BatchConfig(micro_batch_size=args.micro_batch,
                                                        global_batch_size=args.rows_per_step,
                                                        seq_length=args.seq_length),
                                            max_steps=10**6) for name in layouts}
        # Same weights, every sample once in each layout: the objective over the whole dataset must agree
        # (packed rows attend within each sample: the local spec's per-sample SDPA, TE's THD attention).
        engines["packed"].module.load_state_dict(engines["padded"].module.state_dict())
        every_row = {"padded": [[s] for s in data], "packed": [[data[i] for i in p] for p in plan]}
        evals = {name: engines[name].eval_step([collate_rows([row], args.seq_length, 0, name == "packed")
                                                for row in rows]) for name, rows in every_row.items()}
        agree = abs(evals["packed"]["loss"] - evals["padded"]["loss"]) / abs(evals["padded"]["loss"])
        print(f"  same weights, every sample: loss padded {evals['padded']['loss']:.6f}, packed "
              f"{evals['packed']['loss']:.6f} (relative difference {agree:.2e})", flush=True)
        for rep in range(args.repeat):
            for name in (("padded", "packed") if rep % 2 == 0 else ("packed", "padded")):
                steps, packed = layouts[name]
                engine = engines[name]
                engine.train_step([collate_rows(mb, args.seq_length, 0, packed) for mb in steps[0]])  # warm-up, untimed
                start = time.perf_counter()
                for step in steps:
                    engine.train_step([collate_rows(mb, args.seq_length, 0, packed) for mb in step])
                times[name].append(time.perf_counter() - start)
                print(f"  pass {rep}: {name} {len(steps)} steps in {times[name][-1]:.1f} s", flush=True)
    finally:
        destroy_parallel()
    pct = np.percentile(ns, [50, 99])
    print(f"\n{args.samples} samples, tokens: median {pct[0]:.0f}, p99 {pct[1]:.0f}, max {ns.max()}; rows of "
          f"{args.seq_length}; {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, top-{args.k} KD + SFT, "
          f"{args.rows_per_step} rows per step, {args.transformer_impl} spec, {args.params_dtype}")
    print("| layout | rows | steps | padding | real tokens/s |\n|---|---|---|---|---|")
    rate = {}
    for name, (steps, _) in layouts.items():
        rows = sum(len(mb) for step in steps for mb in step)
        padding = 1 - sum(min(sample_positions(len(s.input_ids)) if name == "packed" else len(s.input_ids),
                              args.seq_length) for step in steps for mb in step for row in mb for s in row) / (
            rows * args.seq_length)
        rate[name] = covered[name] / statistics.median(times[name])
        print(f"| {name} | {rows} | {len(steps)} | {100 * padding:.1f}% | {rate[name]:,.0f} |")
    print(f"\npacked / padded real tokens/s: {rate['packed'] / rate['padded']:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
