"""Benchmark: KD + CE losses from logits (top-k and online full-vocab), naive vs torch vs fused Triton.

Two cases (``--case topk|full|both``).

**topk** (offline teacher).

The loss (per token, teacher top-k ids ``t`` with renormalised log-probs ``log p``,
label ``y``; ``m = k + 1`` student log-probs gathered per token)::

    L = Σ_j p_j (log p_j − log q(t_j)) − log q(y),     averaged over tokens

Variants, each timed forward+backward to ``∂L/∂logits`` (bf16):

* naive      – ``log_softmax(logits.float())`` then gather (the usual PyTorch code)
* torch      – ``vocab_parallel_logprobs_at(impl="torch")`` (token-chunked)
* fused      – ``vocab_parallel_logprobs_at(impl="fused")`` (Triton, 1 pass fwd + 1 pass bwd)
* fused-inpl – fused with ``inplace_backward=True`` (gradient written over the logits)
* with the lm_head (hidden ``--liger-hidden``, time from hidden states to their and the
  weight's gradients): ``lmhead+fused-inpl`` (logits by matmul, fused in-place loss) vs
  ``projected+fused`` (the deferred output projection, ``ProjectedLogits.linear_loss``:
  chunks of ``--projection-chunk`` tokens, the logits never exist whole)
* liger-jsd  – Liger-Kernel ``LigerFusedLinearJSD`` if importable. NOT like-for-like: it
  fuses the lm_head matmuls (hidden ``--liger-hidden``) and computes a full-vocab JSD.

**full** (online teacher: full teacher logits, same vocabulary; ``--full-loss`` forward_kl |
reverse_kl | jsd | skew_fkl | skew_rkl, ``--jsd-beta``, ``--skew-alpha``)::

    L = D(p_teacher ‖ q_student) − log q(y),     averaged over tokens

* naive      – ``log_softmax`` of both in fp32, the divergence over [N, V] (the usual PyTorch code)
* torch      – ``full_kd_loss(impl="torch", label_ids=...)`` (the reference path)
* fused      – ``full_kd_loss(impl="fused", label_ids=...)`` (:mod:`nemo_kd.kernels.full_kd_triton`)
* fused-inpl – ``fused_full_kd_loss(..., inplace_backward=True)``
* on the same hidden states and lm_head weights (``--liger-hidden``), JSD(β = ``--jsd-beta``):
  ``lmhead+fused`` (our fused loss on ``x @ Wᵀ`` logits, backward through the matmul),
  ``projected+fused`` (the deferred output projection: student and teacher logits both
  computed chunk by chunk, never whole) and, with ``liger_kernel`` installed (CUDA only),
  ``liger-fl-jsd`` (``LigerFusedLinearJSD``, chunked) — like for like.

Reported: median time of ≥10 reps (CUDA events, after warm-up); peak extra memory =
``max_memory_allocated`` during one step minus what was allocated before it (the
logits and the teacher tensors), so the bf16 gradient itself counts (100% of the
logits) except for the in-place variants. HBM floor = bytes an exact streaming
algorithm must move / bandwidth: top-k: 2 reads of the logits + 1 write of the
gradient; full: 2 reads of the student's and of the teacher's logits + 1 write
(forward_kl / reverse_kl need the normalisers before any gradient entry), 3 reads of
each for JSD (its mixture needs both normalisers before its sums). Timing is never asserted.

    python benchmarks/bench_fused_kernel.py                 # full grid (H100), both cases
    python benchmarks/bench_fused_kernel.py --case full --full-loss jsd --quick
    python benchmarks/bench_fused_kernel.py --quick --out bench.md
    python benchmarks/bench_fused_kernel.py --tune          # sweep fused block sizes first
    python benchmarks/bench_fused_kernel.py --cpu-smoke     # tiny, CPU, TRITON_INTERPRET=1

Needs only torch (+ triton for the fused rows); no megatron-core or NeMo.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

FULL_SHAPES = [(n, v) for n in (4096, 8192, 16384) for v in (32000, 128256, 151936)]
QUICK_SHAPES = [(8192, 128256), (16384, 151936)]
SMOKE_SHAPES = [(16, 1000), (24, 5000)]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="two shapes only")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU with TRITON_INTERPRET=1")
    p.add_argument("--bandwidth", type=float, default=3.35e12, help="peak HBM bytes/s (H100 SXM: 3.35e12)")
    p.add_argument("--topk", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--liger-hidden", type=int, default=4096, help="hidden size for the Liger fused-linear row")
    p.add_argument("--projection-chunk", type=int, default=2048,
                   help="tokens per chunk of the deferred output projection rows (ProjectedLogits)")
    p.add_argument("--tune", action="store_true", help="sweep fused block sizes / warps on the first shape")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--case", choices=("topk", "full", "both"), default="both")
    p.add_argument("--full-loss", choices=("forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl"),
                   default="forward_kl")
    p.add_argument("--jsd-beta", type=float, default=0.5)
    p.add_argument("--skew-alpha", type=float, default=0.1, help="α of skew_fkl / skew_rkl (DistiLLM's 0.1)")
    return p.parse_args()


args = parse_args()
if args.cpu_smoke:
    # Triton picks interpreter mode when a kernel is decorated: set it before any import.
    os.environ["TRITON_INTERPRET"] = "1"
    import warnings

    # The interpreter evaluates masked lanes (-inf - -inf, log 0) inside where-guarded branches.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nemo_kd.losses.kd import KDSettings, full_kd_loss  # noqa: E402
from nemo_kd.losses.projection import ProjectedLogits  # noqa: E402
from nemo_kd.losses.vocab_parallel import vocab_parallel_logprobs_at  # noqa: E402

try:
    from nemo_kd.kernels import full_kd_triton as fk
    from nemo_kd.kernels import logprobs_triton as lt

    FUSED_ERR = None
except Exception as e:  # triton missing: the fused rows say why
    lt, fk, FUSED_ERR = None, None, f"{type(e).__name__}: {e}"


def kd_ce_from_logprobs(lp, t_logp):
    """Top-k forward KL + CE from student log-probs [N, k+1] (last column: the label)."""
    p = t_logp.exp()
    kd = (p * (t_logp - lp[:, :-1])).sum(-1)
    return (kd - lp[:, -1]).mean()


def loss_naive(logits, ids, t_logp):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return kd_ce_from_logprobs(logp.gather(-1, ids), t_logp)


def loss_torch(logits, ids, t_logp):
    return kd_ce_from_logprobs(vocab_parallel_logprobs_at(logits, ids, impl="torch")[0], t_logp)


def loss_fused(logits, ids, t_logp):
    return kd_ce_from_logprobs(vocab_parallel_logprobs_at(logits, ids, impl="fused")[0], t_logp)


def loss_fused_inplace(logits, ids, t_logp):
    return kd_ce_from_logprobs(lt.fused_logprobs_at(logits, ids, inplace_backward=True)[0], t_logp)


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def make_inputs(n, v, k, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 2).to(device=device, dtype=torch.bfloat16)
    t_ids = torch.randint(0, v, (n, k), generator=g).to(device)
    labels = torch.randint(0, v, (n, 1), generator=g).to(device)
    t_logp = torch.log_softmax(torch.randn(n, k, generator=g) * 2, -1).to(device)
    return logits, torch.cat([t_ids, labels], 1), t_logp


def _variant_rows(emit, n, v, variants, inputs, floor_ms, lbytes, timer, reps, warmup) -> Optional[float]:
    """One table row per variant: time, × naive (the first variant), × floor, extra memory, Δgrad vs naive.
    Returns the naive variant's ms (None if it did not run), the baseline of later rows."""
    naive_ms, ref = None, None
    for name, fn, inplace in variants:
        try:
            ms, peak, grad = run_logits_variant(fn, *inputs, timer, reps, warmup, inplace)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            emit(f"| {n} | {v} | {name} | OOM | | | | | |")
            continue
        if name == "naive":
            naive_ms, ref = ms, grad
        dgrad = f"{(grad - ref).abs().max().item():.2e}" if ref is not None else ""
        mem = f"{peak / 2**30:.3f} | {100 * peak / lbytes:.0f}%" if peak is not None else "n/a | n/a"
        vs_naive = f"{naive_ms / ms:.2f}" if naive_ms else ""
        emit(f"| {n} | {v} | {name} | {ms:.3f} | {vs_naive} | {ms / floor_ms:.2f} | {mem} | {dgrad} |")
        del grad
    return naive_ms


def run_logits_variant(loss_fn, logits0, ids, t_logp, timer, reps, warmup, inplace):
    """(median ms, peak extra bytes, grad as fp32) of ``loss_fn(logits, ids, t_logp)`` + ∂loss/∂logits."""
    logits = logits0.clone().requires_grad_(True)

    def prep():  # untimed: the in-place variant overwrote the logits with its gradient
        if inplace:
            with torch.no_grad():
                logits.copy_(logits0)

    def step():
        return torch.autograd.grad(loss_fn(logits, ids, t_logp), logits)[0]

    peak = None
    prep()
    if logits.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grad = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        grad = step()
    if inplace:
        assert grad.data_ptr() == logits.data_ptr(), "in-place backward allocated a new gradient"
    check = grad.float()
    del grad
    times = []
    for i in range(warmup + reps):
        prep()
        t = timer(step)
        if i >= warmup:
            times.append(t)
    return statistics.median(times), peak, check


def _lmhead_inputs(n, v, hidden, device):
    """Student and teacher hidden states and lm_head weights ``(x, W, x', W')`` in bf16; the
    student's require grad (Liger's fused-linear losses take these, not logits)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(device=device, dtype=torch.bfloat16)  # noqa: E731
    xs, ws, xt, wt = mk(n, hidden), mk(v, hidden), mk(n, hidden), mk(v, hidden)
    xs.requires_grad_(True)
    ws.requires_grad_(True)
    return xs, ws, xt, wt


def _time_and_peak(step, timer, reps, warmup):
    """``(median ms, peak extra bytes)`` of ``step``: the peak from a first call, then timed calls
    (CPU smoke: no peak, NaN)."""
    if not timer.cuda:
        step()
        return statistics.median([timer(step) for _ in range(reps)]), float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for _ in range(warmup):
        step()
    return statistics.median([timer(step) for _ in range(reps)]), peak


def run_liger(n, v, hidden, device, timer, reps, warmup):
    from liger_kernel.transformers import LigerFusedLinearJSD

    xs, ws, xt, wt = _lmhead_inputs(n, v, hidden, device)
    jsd = LigerFusedLinearJSD(jsd_beta=0.0)
    return _time_and_peak(lambda: torch.autograd.grad(jsd(xs, ws, xt, wt), (xs, ws)), timer, reps, warmup)


def run_lmhead_topk(n, v, k, hidden, device, timer, reps, warmup):
    """Top-k FKL + CE including the lm_head: logits by matmul + fused in-place loss + backward through
    the matmul, vs the deferred projection (``ProjectedLogits.linear_loss``, chunks of
    ``--projection-chunk`` tokens, gradient taken per chunk in the forward). ``[(name, ms, peak)]``."""
    xs, ws, _, _ = _lmhead_inputs(n, v, hidden, device)
    ids, t_logp = make_inputs(n, v, k, device)[1:]  # the same teacher ids / log-probs as the logits rows
    p = t_logp.exp()
    # L = mean_n [Σ_j p_j (log p_j − log q_j) − log q(y)]: linear in the log-probs at the k+1 ids.
    coeff = torch.cat([-p, -torch.ones(n, 1, device=device)], 1) / n

    def lmhead():
        return torch.autograd.grad(loss_fused_inplace(xs @ ws.t(), ids, t_logp), (xs, ws))

    def projected():
        def chunk_lp(z, ids_c, differentiate, metrics):
            return (lt.fused_logprobs_at(z, ids_c, inplace_backward=differentiate)[0],)

        const = (p * t_logp).sum() / n
        loss, _ = ProjectedLogits(xs, ws, args.projection_chunk).linear_loss(chunk_lp, (coeff,), ids)
        return torch.autograd.grad(loss + const, (xs, ws))

    rows = [(name, *_time_and_peak(step, timer, reps, warmup), _max_delta(step(), lmhead()))
            for name, step in (("lmhead+fused-inpl", lmhead),
                               (f"projected+fused (chunk {args.projection_chunk})", projected))]
    return rows


def _max_delta(grads, ref):
    """Largest |difference| between two gradient tuples (the Δgrad column of the lm_head rows)."""
    return max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, ref))


_LIGER_NOTED = []


def note_liger_missing():
    if not _LIGER_NOTED:
        _LIGER_NOTED.append(True)
        print("(liger-kernel not installed: Liger rows skipped; `pip install liger-kernel` to compare)", flush=True)


# --------------------------------------------------------------------------- online teacher, full vocab


def full_inputs(n, v, device, seed=0):
    """bf16 student and (correlated) teacher logits [N, V] and labels [N]."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(n, v, generator=g) * 2
    teacher = (student + torch.randn(n, v, generator=g) * 2).to(device=device, dtype=torch.bfloat16)
    return student.to(device=device, dtype=torch.bfloat16), teacher, torch.randint(0, v, (n,), generator=g).to(device)


def full_naive(loss_type, beta):
    def fn(student, teacher, labels):
        logq = torch.log_softmax(student.float(), dim=-1)
        logp = torch.log_softmax(teacher.float(), dim=-1)
        p, q = logp.exp(), logq.exp()
        if loss_type == "forward_kl":
            kd = (p * (logp - logq)).sum(-1)
        elif loss_type == "reverse_kl":
            kd = (q * (logq - logp)).sum(-1)
        elif loss_type == "skew_fkl":  # KL(p ‖ α·p + (1−α)·q), α = beta
            kd = (p * (logp - torch.log(beta * p + (1 - beta) * q))).sum(-1)
        elif loss_type == "skew_rkl":  # KL(q ‖ (1−α)·p + α·q)
            kd = (q * (logq - torch.log((1 - beta) * p + beta * q))).sum(-1)
        else:
            logm = torch.log(beta * p + (1 - beta) * q)
            kd = (beta * p * (logp - logm) + (1 - beta) * q * (logq - logm)).sum(-1)
        return (kd - logq.gather(-1, labels[:, None])[:, 0]).mean()
    return fn


def _settings(loss_type, value):
    """The loss with its parameter ``value``: skew_alpha for skew_*, jsd_beta otherwise."""
    parameter = "skew_alpha" if loss_type.startswith("skew") else "jsd_beta"
    return KDSettings(loss_type=loss_type, **{parameter: value})


def full_lib(impl, loss_type, beta):
    def fn(student, teacher, labels):
        kd, lp = full_kd_loss(student, teacher, _settings(loss_type, beta), impl=impl, label_ids=labels)
        return (kd - lp).mean()
    return fn


def full_fused_inplace(loss_type, beta):
    def fn(student, teacher, labels):
        kd, lp = fk.fused_full_kd_loss(student, teacher, _settings(loss_type, beta), label_ids=labels,
                                       inplace_backward=True)
        return (kd - lp).mean()
    return fn


def run_lmhead_pair(n, v, hidden, beta, device, timer, reps, warmup):
    """Like-for-like with Liger's fused-linear JSD: same x, W (student) and x', W' (teacher), JSD(β).

    Returns ``[(name, ms, peak bytes)]``: ours = logits by matmul + fused JSD + backward
    through the matmul; Liger = ``LigerFusedLinearJSD`` (chunked, logits never materialised).
    """
    xs, ws, xt, wt = _lmhead_inputs(n, v, hidden, device)

    def ours():
        with torch.no_grad():
            t_logits = xt @ wt.t()
        kd, _ = fk.fused_full_kd_loss(xs @ ws.t(), t_logits, KDSettings(loss_type="jsd", jsd_beta=beta))
        return torch.autograd.grad(kd.mean(), (xs, ws))

    def projected():  # the deferred output projection: neither side's logits ever exist whole
        def chunk_jsd(z, xt_c, differentiate, metrics):
            kd, _ = fk.fused_full_kd_loss(z, xt_c @ wt.t(), KDSettings(loss_type="jsd", jsd_beta=beta),
                                          inplace_backward=differentiate)
            return (kd,)

        loss, _ = ProjectedLogits(xs, ws, args.projection_chunk).linear_loss(
            chunk_jsd, (torch.full((n,), 1.0 / n, device=device),), xt)
        return torch.autograd.grad(loss, (xs, ws))

    variants = [("lmhead+fused", ours), (f"projected+fused (chunk {args.projection_chunk})", projected)]
    try:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=beta)
        variants.append(("liger-fl-jsd", lambda: torch.autograd.grad(jsd(xs, ws, xt, wt), (xs, ws))))
    except ImportError:
        note_liger_missing()
    return [(name, *_time_and_peak(step, timer, reps, warmup), _max_delta(step(), ours())) for name, step in variants]


def bench_full(shapes, device, timer, reps, warmup, emit):
    loss_type = args.full_loss
    beta = args.skew_alpha if loss_type.startswith("skew") else args.jsd_beta
    reads = 2 if loss_type in ("forward_kl", "reverse_kl") else 3  # mixtures: a second pass
    variants = [("naive", full_naive(loss_type, beta), False), ("torch", full_lib("torch", loss_type, beta), False)]
    if fk is not None:
        variants += [("fused", full_lib("fused", loss_type, beta), False),
                     ("fused-inpl", full_fused_inplace(loss_type, beta), True)]
    label = f"{loss_type}" + (f"(β={beta})" if loss_type == "jsd" else f"(α={beta})" if loss_type.startswith("skew")
                              else "")
    emit(f"\n# online teacher, full-vocab {label} + CE, fwd+bwd to bf16 grad — {dev_name(device)}\n")
    emit(f"floor = ({reads} reads of student + {reads} of teacher + 1 write) × logits bytes / {args.bandwidth:.3g} B/s; "
         "mem = peak extra allocation as % of the student logits' bytes.\n")
    emit("| N | V | variant | ms | × naive | × floor | extra mem GiB | mem % logits | Δgrad |")
    emit("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, v in shapes:
        student, teacher, labels = full_inputs(n, v, device)
        lbytes = student.numel() * student.element_size()
        floor_ms = (2 * reads + 1) * lbytes / args.bandwidth * 1e3
        emit(f"| {n} | {v} | HBM floor | {floor_ms:.3f} | | 1.00 | | | |")
        _variant_rows(emit, n, v, variants, (student, teacher, labels), floor_ms, lbytes, timer, reps, warmup)
        if fk is None:
            emit(f"| {n} | {v} | fused | n/a ({FUSED_ERR}) | | | | | |")
        del student, teacher, labels
        if fk is not None:
            try:
                # JSD(--jsd-beta) whatever --full-loss is: the like-for-like loss of Liger's fused-linear JSD
                for name, ms, peak, delta in run_lmhead_pair(n, v, args.liger_hidden, args.jsd_beta, device, timer, reps,
                                                             warmup):
                    emit(f"| {n} | {v} | {name} (JSD β={args.jsd_beta}, incl. lm_head H={args.liger_hidden}; Δgrad vs "
                         f"lmhead) | {ms:.3f} | | | {peak / 2**30:.3f} | {100 * peak / lbytes:.0f}% | {delta:.2e} |")
            except torch.cuda.OutOfMemoryError:
                emit(f"| {n} | {v} | lm_head pair | OOM | | | | | |")
            except Exception as e:  # an API drift in liger must not kill the table
                emit(f"| {n} | {v} | lm_head pair | error: {type(e).__name__}: {e} | | | | | |")
            if device.type == "cuda":
                torch.cuda.empty_cache()


def dev_name(device):
    return torch.cuda.get_device_name() if device.type == "cuda" else "CPU (TRITON_INTERPRET=1, smoke only)"


def _sweep(module, blocks, fn, inputs, title, timer, reps, warmup):
    """Time ``fn`` for every block size × warps of a kernel module; leave the fastest set in it."""
    best, lines = None, [title]
    for block in blocks:
        for warps in (4, 8, 16):
            module.FWD_BLOCK_V = module.BWD_BLOCK_V = block
            module.FWD_NUM_WARPS = module.BWD_NUM_WARPS = warps
            ms = run_logits_variant(fn, *inputs, timer, reps, warmup, False)[0]
            lines.append(f"  block={block:5d} warps={warps:2d}: {ms:8.3f}")
            if best is None or ms < best[0]:
                best = (ms, block, warps)
    _, module.FWD_BLOCK_V, module.FWD_NUM_WARPS = best
    module.BWD_BLOCK_V, module.BWD_NUM_WARPS = module.FWD_BLOCK_V, module.FWD_NUM_WARPS
    lines.append(f"  -> using block={module.FWD_BLOCK_V} warps={module.FWD_NUM_WARPS}")
    return lines


def tune(n, v, k, device, timer, reps, warmup):
    """Sweep the fused kernels' block sizes / warps; keep the fastest for the table."""
    lines = _sweep(lt, (2048, 4096, 8192), loss_fused, make_inputs(n, v, k, device),
                   f"\nfused block sweep at N={n} V={v} (fwd+bwd ms):", timer, reps, warmup)
    lines += _sweep(fk, (1024, 2048, 4096), full_lib("fused", args.full_loss, args.skew_alpha if args.full_loss.startswith(
        "skew") else args.jsd_beta), full_inputs(n, v, device),
                    f"full-vocab fused block sweep at N={n} V={v} (fwd+bwd ms):", timer, reps, warmup)
    print("\n".join(lines), flush=True)


def bench_topk(shapes, device, timer, reps, warmup, emit):
    k = args.topk
    variants = [("naive", loss_naive, False), ("torch", loss_torch, False)]
    if lt is not None:
        variants += [("fused", loss_fused, False), ("fused-inpl", loss_fused_inplace, True)]
    emit(f"# top-{k} forward-KL + CE, fwd+bwd to bf16 grad — {dev_name(device)}\n")
    emit(f"floor = 3 × logits bytes / {args.bandwidth:.3g} B/s; mem = peak extra allocation as % of the logits' bytes "
         f"(the bf16 gradient alone is 100%); Δgrad = max |grad − naive grad|; median of {reps} reps.\n")
    emit("| N | V | variant | ms | × naive | × floor | extra mem GiB | mem % logits | Δgrad |")
    emit("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for n, v in shapes:
        logits, ids, t_logp = make_inputs(n, v, k, device)
        lbytes = logits.numel() * logits.element_size()
        floor_ms = 3 * lbytes / args.bandwidth * 1e3
        emit(f"| {n} | {v} | HBM floor | {floor_ms:.3f} | | 1.00 | | | |")
        naive_ms = _variant_rows(emit, n, v, variants, (logits, ids, t_logp), floor_ms, lbytes, timer, reps, warmup)
        if lt is None:
            emit(f"| {n} | {v} | fused | n/a ({FUSED_ERR}) | | | | | |")
        if lt is not None:
            for name, ms, peak, delta in run_lmhead_topk(n, v, k, args.liger_hidden, device, timer, reps, warmup):
                emit(f"| {n} | {v} | {name} (incl. lm_head H={args.liger_hidden}; Δgrad vs lmhead) | {ms:.3f} | | | "
                     f"{peak / 2**30:.3f} | {100 * peak / lbytes:.0f}% | {delta:.2e} |")
        if device.type == "cuda":
            try:
                ms, peak = run_liger(n, v, args.liger_hidden, device, timer, reps, warmup)
                emit(
                    f"| {n} | {v} | liger-jsd (incl. lm_head H={args.liger_hidden}, full-vocab JSD) | {ms:.3f} | "
                    f"{naive_ms / ms:.2f} | {ms / floor_ms:.2f} | {peak / 2**30:.3f} | {100 * peak / lbytes:.0f}% | |"
                    if naive_ms else f"| {n} | {v} | liger-jsd | {ms:.3f} | | | | | |"
                )
            except ImportError:
                note_liger_missing()
            except Exception as e:  # an API drift in liger must not kill the table
                emit(f"| {n} | {v} | liger-jsd | error: {type(e).__name__} | | | | | |")
                torch.cuda.empty_cache()
        del logits, ids, t_logp
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main():
    if args.cpu_smoke:
        device, shapes, reps, warmup = torch.device("cpu"), SMOKE_SHAPES, max(3, min(args.reps, 3)), 1
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --cpu-smoke for a CPU check")
        device, shapes, reps, warmup = torch.device("cuda"), (QUICK_SHAPES if args.quick else FULL_SHAPES), args.reps, args.warmup
    timer = Timer(device)
    if args.tune and lt is not None and device.type == "cuda":
        tune(*shapes[0], args.topk, device, timer, reps, warmup)
    rows = []

    def emit(row):
        rows.append(row)
        print(row, flush=True)

    if args.case in ("topk", "both"):
        bench_topk(shapes, device, timer, reps, warmup, emit)
    if args.case in ("full", "both"):
        bench_full(shapes, device, timer, reps, warmup, emit)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
