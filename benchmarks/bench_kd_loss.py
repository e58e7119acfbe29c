"""Top-k KD + CE loss: nemo_kd's loss library against a naive PyTorch formulation.

Both compute, per completion token, forward KL(p_T‖q_S) over the teacher's top-k
ids (renormalised convention) plus the SFT cross-entropy at the label, mean over
tokens, then backward to the student logits. Measured in the same run:

* ``naive``  – what most trainers write: ``log_softmax(logits.float())`` over the full
  vocabulary (an fp32 [N, V] copy kept for backward), ``gather`` at the ids.
* ``nemo_kd`` – ``nemo_kd.losses.kd.topk_kd_loss(..., label_ids=labels)``: KD and CE
  from one pass of the vocab-parallel log-prob primitive over the logits (chunked fp32
  statistics, a custom backward writing one gradient buffer of the logits' dtype),
  ``--impl fused`` for the Triton kernel.

Prints a markdown table: time of forward+backward (median), peak extra memory (peak
minus what was held before the loss, not counting the logits' gradient buffer that
every formulation must produce), and ratios nemo_kd / naive. No assertion on time:
this is a benchmark, not a test.

Every divergence, top-k and full vocabulary, against naive PyTorch, TRL and Liger:
``benchmarks/bench_kd_divergences.py``.

    python benchmarks/bench_kd_loss.py                      # CPU, small
    python benchmarks/bench_kd_loss.py --device cuda --tokens 16384 --vocab 128256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from nemo_kd.losses.kd import KDSettings, topk_kd_loss


def make_inputs(n, v, k, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = torch.randn(n, v, generator=g, dtype=dtype).mul_(2).to(device)  # no [N, V] temporaries
    teacher_vals = torch.randn(n, k, generator=g).sort(dim=-1, descending=True).values.to(device) * 3
    teacher_ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(min(n, 64))])
    teacher_ids = teacher_ids.repeat((n + 63) // 64, 1)[:n].to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    return logits, teacher_vals, teacher_ids, labels


def naive_loss(logits, teacher_vals, teacher_ids, labels):
    logq = torch.log_softmax(logits.float(), dim=-1)
    logq_k = torch.gather(logq, -1, teacher_ids)
    logq_k = logq_k - torch.logsumexp(logq_k, dim=-1, keepdim=True)  # renormalise over the k ids
    logp_k = torch.log_softmax(teacher_vals.float(), dim=-1)
    kd = (logp_k.exp() * (logp_k - logq_k)).sum(-1)
    ce = -torch.gather(logq, -1, labels[:, None])[:, 0]
    return (kd + ce).mean()


def nemo_kd_loss(impl):
    def loss(logits, teacher_vals, teacher_ids, labels):
        # KD and CE share one pass over the vocabulary (log-probs at top-k ids ∪ label),
        # as DistillationObjective does.
        kd, label_logprobs = topk_kd_loss(logits, teacher_vals, teacher_ids,
                                          KDSettings(loss_type="forward_kl", topk_convention="renormalized"),
                                          impl=impl, label_ids=labels)
        return (kd - label_logprobs).mean()

    return loss


def variants(impl):
    return {"naive": naive_loss, "nemo_kd": nemo_kd_loss(impl)}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_fwd_bwd(fn, inputs, device, repeats, warmup=2):
    logits = inputs[0]
    times = []
    for i in range(warmup + repeats):
        x = logits.detach().requires_grad_(True)
        _sync(device)
        t0 = time.perf_counter()
        fn(x, *inputs[1:]).backward()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        del x
    return statistics.median(times)


def peak_extra_bytes_cuda(fn, inputs):
    x = inputs[0].detach().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x, *inputs[1:]).backward()
    torch.cuda.synchronize()
    # The gradient buffer of the logits' own shape/dtype is unavoidable for any
    # formulation; count it as part of the baseline so "extra" is the loss's overhead.
    return torch.cuda.max_memory_allocated() - base - x.grad.numel() * x.grad.element_size()


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child_peak_cpu(args):
    """Runs in a fresh process: peak RSS growth of one fwd+bwd of one variant (bytes)."""
    inputs = make_inputs(args.tokens, args.vocab, args.k, getattr(torch, args.dtype), "cpu")
    fn = variants(args.impl)[args.child]
    x = inputs[0].detach().requires_grad_(True)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _proc_status_bytes("VmRSS")
    fn(x, *inputs[1:]).backward()
    peak = _proc_status_bytes("VmHWM")
    grad_bytes = x.grad.numel() * x.grad.element_size()
    print(json.dumps({"extra": peak - before - grad_bytes}))


def peak_extra_bytes_cpu(name, args):
    cmd = [sys.executable, __file__, "--child", name, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
           "--k", str(args.k), "--dtype", args.dtype, "--impl", args.impl]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["extra"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--dtype", default=None, help="bfloat16 | float32 | float16")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--impl", default="torch", help="log-prob primitive: torch | fused (Triton)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.tokens = args.tokens or (16384 if cuda else 2048)
    args.vocab = args.vocab or (128256 if cuda else 32000)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.repeats = args.repeats or (10 if cuda else 3)
    if args.child:
        return _child_peak_cpu(args)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    inputs = make_inputs(args.tokens, args.vocab, args.k, dtype, args.device)
    logits_bytes = inputs[0].numel() * inputs[0].element_size()
    # Same loss value from both: otherwise the comparison means nothing.
    ref = naive_loss(*[t.double() if t.is_floating_point() else t for t in inputs]).item()
    results = {}
    for name, fn in variants(args.impl).items():
        val = fn(*inputs).item()
        t = time_fwd_bwd(fn, inputs, args.device, args.repeats)
        mem = peak_extra_bytes_cuda(fn, inputs) if cuda else peak_extra_bytes_cpu(name, args)
        results[name] = (val, t, mem)
    print(f"\nTop-{args.k} forward-KL + CE, fwd+bwd | device={args.device} "
          f"({torch.cuda.get_device_name() if cuda else os.cpu_count()} {'GPU' if cuda else 'CPU threads'}) "
          f"tokens={args.tokens} vocab={args.vocab} dtype={args.dtype} impl={args.impl}; "
          f"logits = {logits_bytes / 2**30:.2f} GiB; float64 reference loss {ref:.6f}\n")
    print("| formulation | loss | time (ms, median) | peak extra memory (GiB) | time / naive | memory / naive |")
    print("|---|---|---|---|---|---|")
    naive_t, naive_m = results["naive"][1], results["naive"][2]
    for name, (val, t, mem) in results.items():
        print(f"| {name} | {val:.6f} | {t * 1e3:.1f} | {mem / 2**30:.3f} | {t / naive_t:.2f}x | "
              f"{mem / naive_m if naive_m > 0 else float('nan'):.2f}x |")


if __name__ == "__main__":
    main()
