"""Benchmark: one Megatron training step of the same student, SFT only vs KD + SFT.

Variants (``--variants``), each a full :class:`nemo_kd.models.engine.DistillationEngine`
step (forward, loss, backward, DDP gradient reduction, Adam step) on the same student
architecture, initialisation and data:

* ``sft``          – SFT cross-entropy only (``kd_loss_weight=0``), the baseline;
* ``topk-torch``   – offline teacher: top-k KD (``--topk``, ``--topk-convention``) + SFT,
  ``kd_kernel="torch"``;
* ``topk-fused``   – the same with ``kd_kernel="fused"`` (Triton log-prob primitive);
* ``online-torch`` – online teacher (a co-located frozen GPT, ``--teacher-*`` sizes, default the
  student's), full-vocabulary KD (``--online-loss``) + SFT, ``kd_kernel="torch"``; the step
  includes the teacher's forward;
* ``online-fused`` – the same with the fused full-vocab kernel.

Each variant runs in its own subprocess (clean allocator state and peak counters), builds
the engine, runs ``--warmup`` untimed steps, then times ``--steps`` steps. Reported per
variant: ms/step (mean over the timed steps, synchronised) and peak memory measured over
the timed steps in the same run:

* CUDA: ``torch.cuda.max_memory_allocated()`` (peak of live tensors, weights and optimizer
  state included) after ``reset_peak_memory_stats()``; "step extra" = peak − allocated
  before the timed steps.
* CPU: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
  before the timed steps); "step extra" = VmHWM − VmRSS before them. RSS includes the
  allocator's cached pages, so it over-states live tensors; compare variants, not absolutes.

With ``--repeat R`` the variant list runs R times round-robin and each variant reports its
median-time run (other jobs on a shared machine slow whichever variant runs beside them).
Ratios are against ``sft``. The issue's target: KD ≤ 1.05× the SFT step time. On CPU the
fused variants run in Triton's interpreter (``TRITON_INTERPRET=1``): a correctness smoke,
their times mean nothing; they are left out unless ``--cpu-fused``.

    python benchmarks/bench_train_step.py                      # CPU, small (< 3 min)
    python benchmarks/bench_train_step.py --gpu                # issue's size: ~1.7B GPT, V=128256, seq 2048, mbs 4
    python benchmarks/bench_train_step.py --gpu --layers 16 --micro-batch 2 --variants sft topk-fused
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("sft", "topk-torch", "topk-fused", "online-torch", "online-fused")

# name: (layers, hidden, heads, query groups, ffn, vocab, seq, micro batch, global batch, params dtype)
PRESETS = {
    # ~1.75B parameters (untied 128256-vocab embeddings: 0.53B), Llama-3-style GQA + SwiGLU.
    "gpu": dict(layers=24, hidden=2048, heads=16, query_groups=8, ffn=5632, vocab=128256, seq=2048, micro_batch=4,
                global_batch=4, dtype="bf16", steps=10, warmup=3, repeat=1),
    "cpu": dict(layers=2, hidden=128, heads=4, query_groups=2, ffn=352, vocab=16384, seq=128, micro_batch=2,
                global_batch=4, dtype="fp32", steps=5, warmup=2, repeat=3),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="the issue's size (preset 'gpu'); default: small CPU preset")
    for name in ("layers", "hidden", "heads", "query_groups", "ffn", "vocab", "seq", "micro_batch", "global_batch",
                 "steps", "warmup"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="override the preset")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None)
    p.add_argument("--teacher-layers", type=int, default=None, help="online teacher depth (default: the student's)")
    p.add_argument("--teacher-hidden", type=int, default=None, help="online teacher width (default: the student's)")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--topk-convention", choices=("renormalized", "exact_tail"), default="exact_tail")
    p.add_argument("--kd-loss", default="forward_kl", help="top-k divergence")
    p.add_argument("--online-loss", choices=("forward_kl", "reverse_kl", "jsd"), default="forward_kl")
    p.add_argument("--sft-weight", type=float, default=1.0, help="SFT weight of the KD variants")
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--repeat", type=int, default=None,
                   help="run the variant list this many times round-robin and report the median (shared machines)")
    p.add_argument("--cpu-threads", type=int, default=1, help="OMP threads of each CPU run")
    p.add_argument("--cpu-fused", action="store_true", help="on CPU, also run the fused variants (interpreter)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    preset = PRESETS["gpu" if a.gpu else "cpu"]
    for key, value in preset.items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    return a


# --------------------------------------------------------------------------- child: one variant


def _rss_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch(a, seed=0):
    """Random tokens (SFT labels = next token), prompt positions masked, and a top-k teacher."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n, s = a.global_batch, a.seq
    tokens = torch.randint(0, a.vocab, (n, s + 1), generator=g)
    mask = torch.ones(n, s)
    mask[:, : s // 8] = 0
    batch = dict(inputs=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask, position_ids=torch.arange(s).expand(n, s))
    # A teacher top-k without materialising [n, s, V] on the host: random ids/logits, a plausible LSE.
    batch["teacher_ids"] = torch.randint(0, a.vocab, (n, s, a.topk), generator=g)
    vals = torch.randn(n, s, a.topk, generator=g).sort(dim=-1, descending=True).values * 2 + 10
    batch["teacher_values"] = vals
    batch["teacher_lse"] = torch.logsumexp(vals, -1) + 0.5  # top-k holds ~60% of the mass
    return batch


def _microbatches(a, batch, online):
    keys = [k for k in batch if not (online and k.startswith("teacher_"))]
    m = a.micro_batch
    return [{k: batch[k][i:i + m] for k in keys} for i in range(0, a.global_batch, m)]


def run_child(a):
    import torch

    from nemo_kd.losses.objective import DistillationLossConfig
    from nemo_kd.models import GPTModelConfig
    from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    os.environ["MASTER_PORT"] = str(_free_port())
    v = a.child
    online = v.startswith("online")
    kernel = "fused" if v.endswith("fused") else "torch"
    model_cfg = GPTModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                               num_query_groups=a.query_groups, ffn_hidden_size=a.ffn, vocab_size=a.vocab,
                               max_position_embeddings=a.seq, params_dtype=a.dtype, transformer_impl=a.transformer_impl)
    teacher_cfg = None
    if online:
        t_hidden = a.teacher_hidden or a.hidden
        teacher_cfg = GPTModelConfig(num_layers=a.teacher_layers or a.layers, hidden_size=t_hidden,
                                     num_attention_heads=a.heads, num_query_groups=a.query_groups,
                                     ffn_hidden_size=a.ffn * t_hidden // a.hidden, vocab_size=a.vocab,
                                     max_position_embeddings=a.seq, params_dtype=a.dtype,
                                     transformer_impl=a.transformer_impl)
    if v == "sft":
        loss_cfg = DistillationLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0)
    else:
        loss_cfg = DistillationLossConfig(kd_loss_type=a.online_loss if online else a.kd_loss, kd_loss_weight=1.0,
                                          sft_loss_weight=a.sft_weight, topk_convention=a.topk_convention,
                                          kd_kernel=kernel)
    initialize_parallel(ParallelConfig(seed=1234))
    try:
        engine = DistillationEngine(model_cfg, loss_cfg, OptimConfig(lr=1e-5, clip_grad=1.0),
                                    BatchConfig(micro_batch_size=a.micro_batch, global_batch_size=a.global_batch,
                                                seq_length=a.seq),
                                    max_steps=a.warmup + a.steps, teacher_cfg=teacher_cfg)
        mbs = _microbatches(a, _global_batch(a), online)
        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        for _ in range(a.warmup):
            engine.train_step(mbs)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _rss_kib("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
        t0 = time.perf_counter()
        losses = [engine.train_step(mbs)["loss"] for _ in range(a.steps)]
        sync()
        ms = (time.perf_counter() - t0) / a.steps * 1e3
        peak = torch.cuda.max_memory_allocated() if cuda else _rss_kib("VmHWM") * 1024
        return dict(variant=v, ms=ms, peak=peak, extra=peak - base, loss=losses[-1],
                    device=torch.cuda.get_device_name() if cuda else "CPU")
    finally:
        destroy_parallel()


# --------------------------------------------------------------------------- parent: table


def main():
    a = parse_args()
    if a.child:
        print("RESULT " + json.dumps(run_child(a)), flush=True)
        return
    import torch

    cuda = torch.cuda.is_available()
    if a.gpu and not cuda:
        sys.exit("--gpu needs a CUDA device")
    variants = a.variants or [v for v in VARIANTS if cuda or a.cpu_fused or not v.endswith("fused")]
    if "sft" not in variants:
        variants = ["sft"] + variants
    env = dict(os.environ)
    if not cuda:
        env["TRITON_INTERPRET"] = "1"  # fused variants on CPU: interpreter (smoke only)
        # One thread by default: on a shared machine, OpenMP threads spinning against other jobs
        # make step times swing by 10× (seen with 2 threads on 2 busy cores).
        env["OMP_NUM_THREADS"] = str(a.cpu_threads)
    argv = [x for x in sys.argv[1:]]
    runs = {v: [] for v in variants}
    for _ in range(a.repeat):
        for v in variants:
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--child", v], env=env, cwd=ROOT,
                                  capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{v}: failed (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
                continue
            runs[v].append(json.loads(line[-1][len("RESULT "):]))
            print(f"  {v}: {runs[v][-1]['ms']:.1f} ms/step (run {time.perf_counter() - t:.0f} s)", file=sys.stderr,
                  flush=True)
    results = []
    for v in variants:
        if not runs[v]:
            results.append(dict(variant=v, error=True))
            continue
        ordered = sorted(runs[v], key=lambda r: r["ms"])
        med = dict(ordered[(len(ordered) - 1) // 2])  # the lower median: a real run's numbers
        results.append(med)
    ok = [r for r in results if not r.get("error")]
    sft = next((r for r in ok if r["variant"] == "sft"), None)
    dev = ok[0]["device"] if ok else ("CUDA" if cuda else "CPU")
    mem_kind = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    rows = [
        f"# Megatron training step, {dev}: GPT {a.layers}L h{a.hidden} ffn{a.ffn} heads {a.heads}/{a.query_groups}, "
        f"V={a.vocab}, seq {a.seq}, micro-batch {a.micro_batch}, global batch {a.global_batch}, {a.dtype}",
        "",
        f"top-k: k={a.topk} {a.topk_convention} {a.kd_loss}; online: {a.online_loss} vs a teacher of "
        f"{a.teacher_layers or a.layers}L h{a.teacher_hidden or a.hidden} (its forward is in the step); KD variants "
        f"add SFT × {a.sft_weight}. {a.steps} timed steps after {a.warmup} warm-up, the run with the median "
        f"time of {a.repeat} (round-robin); memory: {mem_kind} over the timed steps; step extra = peak − before them.",
        "",
        "| variant | ms/step | × SFT | peak GiB | × SFT | step extra GiB | last loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("error"):
            rows.append(f"| {r['variant']} | failed | | | | | |")
            continue
        rt = f"{r['ms'] / sft['ms']:.3f}" if sft else ""
        rm = f"{r['peak'] / sft['peak']:.3f}" if sft else ""
        rows.append(f"| {r['variant']} | {r['ms']:.1f} | {rt} | {r['peak'] / 2**30:.3f} | {rm} | "
                    f"{r['extra'] / 2**30:.3f} | {r['loss']:.4f} |")
    if not cuda and not a.cpu_fused:
        rows.append("")
        rows.append("(fused variants left out on CPU: Triton's interpreter times mean nothing; --cpu-fused runs them)")
    print("\n".join(rows), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
