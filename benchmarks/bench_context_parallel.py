"""Context parallelism on two devices: CP=2 against CP=1 (DP=2), same student, weights and global batch.

Launched on two ranks (``torchrun --nproc_per_node 2``). Both layouts run on the same two ranks one
after the other: first CP=1 (data parallel over the two: each rank one half of the global batch's rows,
whole), then CP=2 (one data-parallel rank: both ranks read every row and keep their load-balanced half
of its positions, Megatron's ``2·CP`` chunks), starting from the CP=1 run's initial weights. Reported per
layout: the loss and gradient norm of every step, ms/step (median of the steps after the first) and
tokens/s; then the largest differences between the layouts, and ``PASS`` / ``FAIL`` against
``--tolerance`` (relative, on the loss and the gradient norm of every step).

``--impl transformer_engine`` (GPU): Megatron's TE spec, TE's context-parallel attention (``cp_comm_type``
p2p), bf16 by default. ``--impl local-reference`` (CPU smoke, gloo): the local spec with the exact
reference CP attention of ``tests/cp_attention.py`` swapped in, fp32 — checks this script, and is
what tests/test_context_parallel.py checks at its own size.

    torchrun --nproc_per_node 2 benchmarks/bench_context_parallel.py                       # 2 GPUs, TE
    torchrun --nproc_per_node 2 benchmarks/bench_context_parallel.py --impl local-reference --seq 32 \\
        --hidden 32 --layers 2 --heads 4 --vocab 256 --params-dtype fp32 --steps 2          # CPU smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impl", choices=("transformer_engine", "local-reference"), default="transformer_engine")
    p.add_argument("--objective", choices=("kd_sft", "pairs"), default="pairs",
                   help="kd_sft: offline top-k KD + SFT; pairs: that plus DPKD preference pairs (sequence log-probs "
                        "summed over the CP ranks)")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=2, help="rows per microbatch (pairs: even, a pair's two rows "
                                                                   "share one)")
    p.add_argument("--params-dtype", choices=("fp32", "bf16"), default="bf16")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative tolerance on each step's loss and grad norm (default: 1e-5 fp32, 3e-2 bf16)")
    p.add_argument("--json", default=None, help="write the results here (rank 0)")
    return p.parse_args(argv)


def _global_batch(args, step, gbs):
    """Random rows (seeded by step), a loss mask with a prompt and uneven completions, a top-k teacher that
    prefers token (x + 1) mod V; with pairs, rows (2i, 2i+1) are pair i (positive, negative)."""
    g = torch.Generator().manual_seed(100 + step)
    s, v = args.seq, args.vocab
    tokens = torch.randint(0, v, (gbs, s + 1), generator=g)
    mask = torch.ones(gbs, s)
    mask[:, : s // 4] = 0
    mask[1::2, s - s // 8:] = 0
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    vals = torch.randn(gbs, s, args.topk, generator=g).sort(dim=-1, descending=True).values
    vals[..., 0] += 4.0
    ids = torch.randint(0, v, (gbs, s, args.topk), generator=g)
    ids[..., 0] = (inputs + 1) % v
    batch = dict(inputs=inputs, labels=labels, loss_mask=mask, position_ids=torch.arange(s).expand(gbs, s).contiguous(),
                 teacher_values=vals, teacher_ids=ids, teacher_lse=torch.logsumexp(vals, -1) + 1.0)
    if args.objective == "pairs":
        batch.update(roles=torch.tensor([1, 2] * (gbs // 2)), pair_ids=torch.arange(gbs) // 2,
                     teacher_seq_logprob=-2.0 * mask.sum(-1).double())
    return batch


def _microbatches(batch, rows, micro):
    return [{k: v[rows[i:i + micro]] for k, v in batch.items()} for i in range(0, len(rows), micro)]


def _run(args, cp, weights, gbs):
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    local = args.impl == "local-reference"
    model_cfg = GPTModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                               num_query_groups=max(1, args.heads // 2), vocab_size=args.vocab,
                               max_position_embeddings=args.seq, params_dtype=args.params_dtype,
                               transformer_impl="local" if local else "transformer_engine")
    loss_cfg = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5, topk_convention="exact_tail",
                                      dpo_loss_weight=1.0 if args.objective == "pairs" else 0.0)
    batch_cfg = BatchConfig(micro_batch_size=args.micro_batch, global_batch_size=gbs, seq_length=args.seq)
    initialize_parallel(ParallelConfig(context_parallel_size=cp, seed=5))
    swap = contextlib.nullcontext()
    if local:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from cp_attention import reference_cp_attention

        swap = reference_cp_attention()
    try:
        with swap:
            engine = DistillationEngine(model_cfg, loss_cfg, OptimConfig(lr=1e-4, warmup_steps=0), batch_cfg,
                                        max_steps=args.steps)
        if weights is None:
            weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items() if torch.is_tensor(v)}
        else:
            engine.module.load_state_dict(weights, strict=False)
        per_rank = gbs // state.dp_size()
        rows = list(range(state.dp_rank() * per_rank, (state.dp_rank() + 1) * per_rank))
        steps, times = [], []
        for s in range(args.steps):
            mbs = _microbatches(_global_batch(args, s, gbs), rows, args.micro_batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            m = engine.train_step(mbs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            steps.append({k: m[k] for k in ("loss", "grad_norm", "kd_loss", "sft_loss", "preference_loss") if k in m})
        ms = 1e3 * statistics.median(times[1:] if len(times) > 1 else times)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else float("nan")
        return weights, dict(cp=cp, steps=steps, ms_per_step=ms, tokens_per_s=gbs * args.seq / (ms / 1e3),
                             peak_gib=peak)
    finally:
        destroy_parallel()


def main(argv=None):
    args = _args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) != 2:
        raise SystemExit("run on exactly two ranks: torchrun --nproc_per_node 2 benchmarks/bench_context_parallel.py")
    if args.seq % 4:
        raise SystemExit(f"--seq ({args.seq}) must be divisible by 2 x CP = 4")
    if args.objective == "pairs" and args.micro_batch % 2:
        raise SystemExit(f"--objective pairs needs an even --micro-batch (a pair's rows share one), got {args.micro_batch}")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    tolerance = args.tolerance if args.tolerance is not None else (1e-5 if args.params_dtype == "fp32" else 3e-2)
    gbs = 2 * args.micro_batch * 2  # two microbatches a step on each rank at CP=1 (DP=2), four at CP=2 (DP=1)
    import torch.distributed as dist

    # one process group for both layouts (initialize_parallel then leaves it be; re-creating it on torchrun's
    # rendezvous port between the layouts fails)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        weights, dp2 = _run(args, 1, None, gbs)
        _, cp2 = _run(args, 2, weights, gbs)
    finally:
        dist.destroy_process_group()
    worst = {}
    for key in dp2["steps"][0]:
        worst[key] = max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-6) for a, b in zip(cp2["steps"], dp2["steps"]))
    ok = worst["loss"] <= tolerance and worst["grad_norm"] <= tolerance
    if int(os.environ.get("RANK", "0")) == 0:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        print(f"context parallelism, {args.impl}, {args.params_dtype}, {device} x2: seq {args.seq}, hidden "
              f"{args.hidden}, {args.layers} layers, {args.heads} heads, V {args.vocab}, global batch {gbs} rows, "
              f"objective {args.objective}")
        for run in (dp2, cp2):
            print(f"  CP={run['cp']}: {run['ms_per_step']:.1f} ms/step, {run['tokens_per_s']:,.0f} tokens/s, peak "
                  f"{run['peak_gib']:.2f} GiB; loss per step {[round(s['loss'], 6) for s in run['steps']]}, grad norm "
                  f"{[round(s['grad_norm'], 6) for s in run['steps']]}")
        print("  max relative |CP=2 - CP=1| per step: " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items()))
        print(f"{'PASS' if ok else 'FAIL'} (tolerance {tolerance:g} on loss and grad norm)")
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(dict(args=vars(args), cp1=dp2, cp2=cp2, max_relative_difference=worst, ok=ok), f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
