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

Loss memory, in place vs not (``--inplace both``, the default, runs every variant with
``inplace_logits_grad`` on and off; ``DistillationLossConfig.inplace_logits_grad``). After
the timed steps each run takes two more steps, each measuring one window per microbatch
(max over microbatches), as bytes above the window's start:

* "loss extra": from the objective's call (the logits already exist) to the moment the
  gradient w.r.t. the logits is complete — the loss's own extra peak (its gradient buffer,
  unless in place, plus scratch);
* "head window": from the output layer's forward to the completed gradient w.r.t. its input
  (hidden states) — the logits themselves, Megatron's ``[s, b] → [b, s]`` copy, the fp32
  upcast of bf16 logits (Float16Module), the loss, and the output layer's backward (whose
  ``grad_output.contiguous()`` copies a transposed gradient when micro-batch > 1).

Both are reported as a ratio to the logits' size (the ``[b, s, V/TP]`` tensor the loss gets,
in its dtype). Issue 7's target: loss extra ≤ 0.10×. Measured on CUDA with
``torch.cuda.max_memory_allocated`` (reset at the window's start); on CPU with
``torch.profiler`` (``profile_memory=True``): the window is a ``record_function`` range and the
peak is the largest "Total Allocated" of the allocator's memory events inside it minus the
value just before it — live bytes of tensors allocated since profiling started, so exact for
anything the window allocates and frees (the logits are allocated inside the head window).

With ``--repeat R`` the variant list runs R times round-robin and each variant reports its
median-time run (other jobs on a shared machine slow whichever variant runs beside them).
Ratios are against ``sft``. The issue's target: KD ≤ 1.05× the SFT step time. On CPU the
fused variants run in Triton's interpreter (``TRITON_INTERPRET=1``): a correctness smoke,
their times mean nothing; they are left out unless ``--cpu-fused``.

    python benchmarks/bench_train_step.py                      # CPU, small (~5 min: in place on and off)
    python benchmarks/bench_train_step.py --repeat 1 --cpu-fused --variants sft topk-torch topk-fused online-fused
    python benchmarks/bench_train_step.py --repeat 1 --inplace on --projection both --chunk-tokens 64  # deferred projection
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
    p.add_argument("--online-loss", choices=("forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl", "akl"),
                   default="forward_kl")
    p.add_argument("--sft-weight", type=float, default=1.0, help="SFT weight of the KD variants")
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=None)
    p.add_argument("--inplace", choices=("both", "on", "off"), default="both",
                   help="inplace_logits_grad of every variant (both: run each variant with it on and off)")
    p.add_argument("--projection", choices=("materialised", "deferred", "both"), default="materialised",
                   help="output projection: Megatron's output layer (materialised logits) or deferred into the loss "
                        "(kd.fuse_output_layer, chunks of --chunk-tokens); both: run each variant both ways")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="output_layer_chunk_tokens of the deferred runs")
    p.add_argument("--repeat", type=int, default=None,
                   help="run the variant list this many times round-robin and report the median (shared machines)")
    p.add_argument("--cpu-threads", type=int, default=1, help="OMP threads of each CPU run")
    p.add_argument("--cpu-fused", action="store_true", help="on CPU, also run the fused variants (interpreter)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--child", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-inplace", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    p.add_argument("--child-projection", choices=("materialised", "deferred"), default="materialised",
                   help=argparse.SUPPRESS)
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


class _Window:
    """Peak memory above its start of a code window opened / closed from hooks (module docstring)."""

    def __init__(self, name, cuda):
        self.name, self.cuda, self.peaks, self._rf = name, cuda, [], None

    def open(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._rf = torch.autograd.profiler.record_function(self.name)
            self._rf.__enter__()

    def close(self, *_):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peaks.append(torch.cuda.max_memory_allocated() - self.base)
        elif self._rf is not None:
            self._rf.__exit__(None, None, None)
            self._rf = None

    def peaks_from_trace(self, path):
        """CPU: per window range, max "Total Allocated" inside it minus the last value before it."""
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        mem = sorted((e["ts"], e["args"]["Total Allocated"]) for e in events
                     if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
        for r in (e for e in events if e.get("name") == self.name and e.get("ph") == "X"):
            start, end = float(r["ts"]), float(r["ts"]) + float(r["dur"])
            before = [v for t, v in mem if t < start]
            base = before[-1] if before else 0
            inside = [v for t, v in mem if start <= t <= end]
            self.peaks.append(max(inside, default=base) - base)


def _loss_memory(engine, mbs, cuda):
    """One extra step per window ("loss", "head"; module docstring): max peak over microbatches."""
    import tempfile

    import torch

    from nemo_kd.losses.projection import ProjectedLogits

    gpt = next(m for m in engine.module.modules() if hasattr(m, "output_layer"))  # GPTModel in Float16Module
    objective = engine.objective
    info = {}
    result = {}
    for name in ("loss", "head"):
        win = _Window("nemo_kd_" + name + "_window", cuda)

        def probe(logits, batch, norms, win=win, name=name):
            deferred = isinstance(logits, ProjectedLogits)
            # Deferred projection: the loss's input is the hidden states; its gradient is complete once
            # the chunked projection's backward is done (the loss window then holds it all).
            watched = logits.hidden if deferred else logits
            if name == "loss" and torch.is_grad_enabled():
                win.open()
                watched.register_hook(win.close)  # fires once ∂L/∂(loss input) is complete
            v_local = logits.shape[-1]
            n = logits.shape[0] if deferred else logits.numel() // v_local
            info.update(logits_bytes=n * v_local * watched.element_size(),
                        inplace="deferred" if deferred else
                        (objective.inplace_blocker(logits.reshape(-1, v_local), batch) or "yes"))
            return objective(logits, batch, norms)

        def head_pre(module, inputs, win=win, name=name):
            if name == "head" and torch.is_grad_enabled():
                win.open()
                inputs[0].register_hook(win.close)  # fires once ∂L/∂hidden (the head's backward) is done

        handle = gpt.output_layer.register_forward_pre_hook(head_pre)
        engine.objective = probe
        try:
            if cuda:
                engine.train_step(mbs)
            else:
                from torch.profiler import ProfilerActivity, profile

                with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                    engine.train_step(mbs)
                with tempfile.NamedTemporaryFile(suffix=".json") as f:
                    prof.export_chrome_trace(f.name)
                    win.peaks_from_trace(f.name)
        finally:
            engine.objective = objective
            handle.remove()
        result[name] = max(win.peaks) if win.peaks else float("nan")
    return dict(logits_bytes=info["logits_bytes"], loss_extra=result["loss"], head_window=result["head"],
                inplace_used=info["inplace"])


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
    common = dict(inplace_logits_grad=a.child_inplace == "on", fuse_output_layer=a.child_projection == "deferred",
                  output_layer_chunk_tokens=a.chunk_tokens)
    if v == "sft":
        loss_cfg = DistillationLossConfig(kd_loss_weight=0.0, sft_loss_weight=1.0, **common)
    else:
        loss_cfg = DistillationLossConfig(kd_loss_type=a.online_loss if online else a.kd_loss, kd_loss_weight=1.0,
                                          sft_loss_weight=a.sft_weight, topk_convention=a.topk_convention,
                                          kd_kernel=kernel, **common)
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
        mem = _loss_memory(engine, mbs, cuda)  # after the timed steps: its hooks / profiler cost no time there
        return dict(variant=v, inplace=a.child_inplace, projection=a.child_projection, ms=ms, peak=peak, extra=peak - base, loss=losses[-1],
                    device=torch.cuda.get_device_name() if cuda else "CPU", **mem)
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
    inplace_modes = ("on", "off") if a.inplace == "both" else (a.inplace,)
    projections = ("materialised", "deferred") if a.projection == "both" else (a.projection,)
    jobs = [(v, m, p) for p in projections for v in variants for m in inplace_modes]
    runs = {j: [] for j in jobs}
    for _ in range(a.repeat):
        for v, m, p in jobs:
            t = time.perf_counter()
            cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", v, "--child-inplace", m,
                   "--child-projection", p]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                print(f"{v} (in place {m}, {p}): failed (rc {proc.returncode})\n{proc.stderr[-3000:]}",
                      file=sys.stderr, flush=True)
                continue
            runs[(v, m, p)].append(json.loads(line[-1][len("RESULT "):]))
            print(f"  {v} (in place {m}, {p}): {runs[(v, m, p)][-1]['ms']:.1f} ms/step "
                  f"(run {time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    results = []
    for v, m, p in jobs:
        if not runs[(v, m, p)]:
            results.append(dict(variant=v, inplace=m, projection=p, error=True))
            continue
        ordered = sorted(runs[(v, m, p)], key=lambda r: r["ms"])
        med = dict(ordered[(len(ordered) - 1) // 2])  # the lower median: a real run's numbers
        results.append(med)
    ok = [r for r in results if not r.get("error")]
    # Ratios against SFT in the same modes (in place, projection).
    sfts = {(r["inplace"], r["projection"]): r for r in ok if r["variant"] == "sft"}
    dev = ok[0]["device"] if ok else ("CUDA" if cuda else "CPU")
    mem_kind = "torch.cuda.max_memory_allocated" if cuda else "peak RSS (VmHWM)"
    rows = [
        f"# Megatron training step, {dev}: GPT {a.layers}L h{a.hidden} ffn{a.ffn} heads {a.heads}/{a.query_groups}, "
        f"V={a.vocab}, seq {a.seq}, micro-batch {a.micro_batch}, global batch {a.global_batch}, {a.dtype}",
        "",
        f"top-k: k={a.topk} {a.topk_convention} {a.kd_loss}; online: {a.online_loss} vs a teacher of "
        f"{a.teacher_layers or a.layers}L h{a.teacher_hidden or a.hidden} (its forward is in the step); KD variants "
        f"add SFT × {a.sft_weight}. {a.steps} timed steps after {a.warmup} warm-up, the run with the median "
        f"time of {a.repeat} (round-robin); memory: {mem_kind} over the timed steps; step extra = peak − before "
        f"them. "
        f"Loss extra / head window: peak above the window's start over the logits' size "
        f"({'torch.cuda.max_memory_allocated' if cuda else 'torch.profiler memory events'}; module docstring); "
        f"'in place' is what the objective did (or why not); 'deferred': kd.fuse_output_layer (the loss projects "
        f"the hidden states {a.chunk_tokens} tokens at a time; the logits never exist whole).",
        "",
        "| variant | projection | in place | ms/step | × SFT | peak GiB | × SFT | step extra GiB | logits MiB "
        "| loss extra × logits | head window × logits | last loss |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.get("error"):
            rows.append(f"| {r['variant']} | {r['projection']} | {r['inplace']} | failed | | | | | | | | |")
            continue
        sft = sfts.get((r["inplace"], r["projection"]))
        rt = f"{r['ms'] / sft['ms']:.3f}" if sft else ""
        rm = f"{r['peak'] / sft['peak']:.3f}" if sft else ""
        lb = r["logits_bytes"]
        used = r["inplace_used"] if r["inplace_used"] in ("yes", "deferred") else f"no ({r['inplace_used']})"
        rows.append(f"| {r['variant']} | {r['projection']} | {used} | {r['ms']:.1f} | {rt} | {r['peak'] / 2**30:.3f} | {rm} | "
                    f"{r['extra'] / 2**30:.3f} | {lb / 2**20:.1f} | {r['loss_extra'] / lb:.3f} | "
                    f"{r['head_window'] / lb:.3f} | {r['loss']:.4f} |")
    if not cuda and not a.cpu_fused:
        rows.append("")
        rows.append("(fused variants left out on CPU: Triton's interpreter times mean nothing; --cpu-fused runs them)")
    print("\n".join(rows), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
