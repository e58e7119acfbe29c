"""Benchmark: a KD training step of an MoE student, against a dense student with the same active
parameters, and at expert parallelism 2 against 1.

Variants, each a full :class:`nemo_kd.models.engine.DistillationEngine` step (forward, top-k KD + SFT
loss against an offline teacher, backward, DDP reduction, Adam) on the same global batch:

* ``dense``    – a dense student whose MLP has ``topk * moe_ffn`` hidden units: per token the same
  MLP parameters (and FLOPs) as the MoE student's ``topk`` routed experts (``--experts`` of
  ``--moe-ffn`` each), one process;
* ``moe-ep1``  – the MoE student, one process (every expert local, SequentialMLP);
* ``moe-ep2``  – the MoE student on two processes over the backend (gloo on CPU): EP=2, each rank
  holding half the experts and half the global batch (DP=2), tokens through the all-to-all
  dispatcher.

Each variant runs in fresh processes (``torch.multiprocessing`` spawn), takes ``--warmup`` untimed
steps and reports the mean wall time of ``--steps`` steps (rank 0; with ``--repeat R`` the median of
R rounds run round-robin, which evens out other jobs on a shared machine). The CPU threads are split
evenly over a variant's processes (``--threads`` in all), so EP=2 gets no more cores than EP=1.
Ratios: ``moe-ep1 / dense`` (the routing, dispatch and per-expert GEMM overhead at equal active
parameters) and ``moe-ep2 / moe-ep1`` (expert parallelism on this machine: on CPU two processes on
shared cores plus gloo all-to-alls, so a slowdown is expected; on a GPU node the comparison is
per-GPU throughput).

    python benchmarks/bench_moe.py                 # CPU, small (~2 min)
    python benchmarks/bench_moe.py --hidden 512 --layers 4 --experts 8 --moe-ffn 512 --seq 512 --repeat 3
    # a GPU (scripts/gpu_session.sh moe): TE spec, experts through TE's grouped GEMM, bf16
    python benchmarks/bench_moe.py --transformer-impl transformer_engine --params-dtype bf16 --variants dense moe-ep1
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _student(args, moe: bool):
    from nemo_kd.models import GPTModelConfig

    common = dict(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                  vocab_size=args.vocab, max_position_embeddings=args.seq, params_dtype=args.params_dtype,
                  transformer_impl=args.transformer_impl)
    if not moe:
        return GPTModelConfig(ffn_hidden_size=args.topk * args.moe_ffn, **common)
    return GPTModelConfig(ffn_hidden_size=args.topk * args.moe_ffn, num_moe_experts=args.experts,
                          moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn, moe_aux_loss_coeff=1e-2,
                          moe_token_dispatcher_type=args.dispatcher, **common)


def _batch(args, step):
    g = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, args.vocab, (args.gbs, args.seq + 1), generator=g)
    logits = torch.randn(args.gbs, args.seq, args.vocab, generator=g)
    vals, ids = logits.topk(args.k, dim=-1)
    return dict(inputs=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=torch.ones(args.gbs, args.seq),
                position_ids=torch.arange(args.seq).expand(args.gbs, args.seq), teacher_values=vals,
                teacher_ids=ids, teacher_lse=torch.logsumexp(logits, -1))


def _worker(rank, world, port, args, variant, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.threads // world))
    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel, state

    initialize_parallel(ParallelConfig(expert_model_parallel_size=world if variant == "moe-ep2" else 1, seed=1))
    try:
        engine = DistillationEngine(_student(args, variant != "dense"),
                                    DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=0.5),
                                    OptimConfig(lr=1e-4), BatchConfig(args.mbs, args.gbs, args.seq),
                                    max_steps=args.warmup + args.steps, moe_load_log_interval=0)
        batches = []
        for step in range(args.warmup + args.steps):
            full = _batch(args, step)
            per = args.gbs // state.dp_size()
            rows = slice(state.dp_rank() * per, (state.dp_rank() + 1) * per)
            batches.append([{k: v[rows][i:i + args.mbs] for k, v in full.items()} for i in range(0, per, args.mbs)])
        for step in range(args.warmup):
            engine.train_step(batches[step])
        if dist.is_initialized():
            dist.barrier()
        start = time.perf_counter()
        for step in range(args.warmup, args.warmup + args.steps):
            metrics = engine.train_step(batches[step])
        elapsed = (time.perf_counter() - start) / args.steps
        params = sum(p.numel() for p in engine.module.parameters())
        queue.put((rank, elapsed, params, metrics["loss"]))
    finally:
        destroy_parallel()


def _run(args, variant):
    world = 2 if variant == "moe-ep2" else 1
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, variant, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    while len(results) < world:  # a crashed worker never reports: stop naming it instead of waiting forever
        try:
            results.append(queue.get(timeout=5))
        except queue_module.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"{variant}: worker rank(s) {dead} exited with code(s) "
                                   f"{[procs[r].exitcode for r in dead]} before reporting (see its traceback above)")
    results.sort()
    for p in procs:
        p.join()
    return results[0][1], results[0][2], results[0][3]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--moe-ffn", type=int, default=256)
    ap.add_argument("--dispatcher", default="alltoall", choices=["alltoall", "allgather"])
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--k", type=int, default=16, help="teacher top-k")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--gbs", type=int, default=8)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--variants", nargs="+", default=["dense", "moe-ep1", "moe-ep2"])
    ap.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"],
                    help="transformer_engine: TE layers, the experts as TEGroupedMLP (grouped GEMM; GPU)")
    ap.add_argument("--params-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args(argv)
    times = {v: [] for v in args.variants}
    info = {}
    for _ in range(args.repeat):
        for variant in args.variants:
            t, params, loss = _run(args, variant)
            times[variant].append(t)
            info[variant] = (params, loss)
    print(f"hidden {args.hidden}, layers {args.layers}, {args.experts} experts top-{args.topk} of ffn {args.moe_ffn} "
          f"(dense ffn {args.topk * args.moe_ffn}), seq {args.seq}, gbs {args.gbs}, mbs {args.mbs}, "
          f"{args.threads} threads, {args.dispatcher} dispatcher, {args.transformer_impl} spec, {args.params_dtype}, "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}, median of {args.repeat}")
    med = {v: statistics.median(ts) for v, ts in times.items()}
    for v in args.variants:
        print(f"  {v:8s} {1e3 * med[v]:9.1f} ms/step   params (rank 0) {info[v][0] / 1e6:7.2f} M   "
              f"loss {info[v][1]:.4f}")
    if "dense" in med and "moe-ep1" in med:
        print(f"  moe-ep1 / dense   = {med['moe-ep1'] / med['dense']:.2f}x")
    if "moe-ep1" in med and "moe-ep2" in med:
        print(f"  moe-ep2 / moe-ep1 = {med['moe-ep2'] / med['moe-ep1']:.2f}x")


if __name__ == "__main__":
    main()
