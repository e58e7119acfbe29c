"""Every divergence, top-k and full-vocabulary KD: nemo_kd against naive PyTorch, TRL and Liger (issue 14).

For each mode (``full``: an online teacher's full logits; ``topk``: a stored teacher's top-k
logits, ids and log-sum-exp, ``exact_tail`` convention), divergence (``forward_kl``,
``reverse_kl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``akl``: ``LOSS_TYPES``) and logits dtype,
one forward + backward to the student logits of the mean per-token loss, by:

* ``naive`` – what a trainer writes: ``log_softmax(logits.float())`` of both sides (top-k: the
  student's full log-softmax gathered at the ids, the teacher's ``z − LSE``, one tail bucket
  ``log(1 − Σ exp)`` each), the divergence by its definition (``F.kl_div`` for the KLs,
  ``log(β·p + (1−β)·q)`` for the mixtures, AKL's head by ``sort`` + ``cumsum``), autograd.
  The baseline of every ratio, measured in the same run.
* ``nemo_kd torch`` – :func:`nemo_kd.losses.kd.full_kd_loss` / :func:`~nemo_kd.losses.kd.topk_kd_loss`
  with ``impl="torch"`` (full: the chunked closed-form path of ``nemo_kd.losses.full_vocab``);
  top-k also with ``inplace_backward=True`` (the training default, ``kd.inplace_logits_grad``:
  the gradient written over the logits).
* ``nemo_kd autograd (old)`` – full only: ``reference_full_kd_loss``, the torch path before
  issue 14 (autograd through ``divergences.py``): the "before" of the chunked path.
* ``nemo_kd fused`` – ``impl="fused"`` (Triton), only with ``--device cuda``.
* ``TRL`` – full: ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd`` in TRL 1.16; β = 0 /
  1 are its forward / reverse KL), on the logits in their own dtype, as its trainer calls it;
  top-k: the student's ``log_softmax`` gathered at the ids, then TRL's own ``_add_tail_bucket`` and
  ``_jsd_divergence`` (``trl.experimental.async_distillation``). Forward KL, reverse KL, JSD only.
* ``Liger JSD`` / ``Liger KLDiv`` – ``liger_kernel.transformers.LigerJSD`` (β = 0 / 1: forward /
  reverse KL) and ``LigerKLDIVLoss`` on fp32 log-softmaxes: Triton kernels with no CPU
  implementation, printed as ``n/a`` on CPU. ``Liger JSD (torch)`` is what Liger runs on
  CPU instead: the torch loss of its chunked fused-linear JSD
  (``LigerFusedLinearJSDFunction.distillation_loss_fn``, uncompiled), on the logits.

TRL and Liger are imported only here, from the benchmark's own environment
(``benchmarks/bench_env.sh``), never by the package.

Each (mode, divergence, dtype) runs in a fresh subprocess, all its formulations on the same
inputs. Memory: each formulation's first forward + backward (also its warm-up), in turn — on
CPU the growth of the process's peak RSS (``VmHWM`` reset through ``/proc/self/clear_refs``)
over its RSS just before, measured after ``malloc_trim(0)`` so that what glibc keeps from the
previous formulation is back with the kernel; on CUDA ``max_memory_allocated`` over
``memory_allocated`` — both minus the bytes of the logits' gradient, which every formulation
produces (the in-place variants write it over the logits: nothing to subtract). Time:
``--reps`` rounds, each timing every formulation's forward + backward once in turn; the time
is the median, ``time / naive`` the median of the per-round ratios (a machine whose speed
drifts slows a whole round alike). ``loss`` is the mean per-token value and ``rel. err`` its
distance to a float64 evaluation of the naive formulation on the same (upcast) inputs.
Prints markdown tables; no assertion (a benchmark, not a test).

    /tmp/nemo_kd_benchenv/bin/python benchmarks/bench_kd_divergences.py                  # CPU, N 2048, V 32000
    /tmp/nemo_kd_benchenv/bin/python benchmarks/bench_kd_divergences.py --modes full --losses jsd --dtypes float32
    python benchmarks/bench_kd_divergences.py --device cuda --tokens 16384 --vocab 128256
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
import torch.nn.functional as F

from bench_kd_loss import _proc_status_bytes  # noqa: E402 (the script's own directory is on sys.path)
from nemo_kd.losses.divergences import LOSS_TYPES

PARAMS = dict(jsd_beta=0.5, skew_alpha=0.1, akl_mu=0.5)  # the library's defaults
TRL_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": PARAMS["jsd_beta"]}  # what TRL / Liger express
MODES = ("full", "topk")


# ----------------------------------------------------------------------------- inputs


def make_inputs(mode, n, v, k, dtype, device, seed=0):
    """Student logits ``[N, V]`` and the teacher: ``(teacher [N, V],)`` (full) or ``(vals, ids, lse)`` (top-k)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    student = torch.randn(n, v, generator=g).mul_(2.0)
    teacher = torch.randn(n, v, generator=g).mul_(2.0).add_(student, alpha=0.5)  # correlated with the student
    student = student.to(dtype=dtype, device=device)
    teacher = teacher.to(dtype=dtype, device=device)
    if mode == "full":
        return student, (teacher,)
    vals, ids = teacher.topk(k, dim=-1)
    lse = torch.logsumexp(teacher.float(), dim=-1)
    del teacher
    return student, (vals, ids, lse)


# ----------------------------------------------------------------------------- naive


def naive_divergence(loss_type, lp, lq):
    """Per-token divergence ``[N]`` of teacher / student log-buckets ``lp`` / ``lq`` ``[N, B]``, by definition."""
    if loss_type == "forward_kl":
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    if loss_type == "reverse_kl":
        return F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    p, q = lp.exp(), lq.exp()
    if loss_type == "jsd":
        b = PARAMS["jsd_beta"]
        lm = torch.log(b * p + (1 - b) * q)
        return b * (p * (lp - lm)).sum(-1) + (1 - b) * (q * (lq - lm)).sum(-1)
    if loss_type == "skew_fkl":
        a = PARAMS["skew_alpha"]
        return (p * (lp - torch.log(a * p + (1 - a) * q))).sum(-1)
    if loss_type == "skew_rkl":
        a = PARAMS["skew_alpha"]
        return (q * (lq - torch.log((1 - a) * p + a * q))).sum(-1)
    if loss_type == "akl":
        # Wu et al. (arXiv 2404.02657): head = the largest p whose cumulative mass reaches μ
        # (sort + cumsum; a tied group at the threshold all in, as nemo_kd's rule), weights detached.
        with torch.no_grad():
            pd, qd = p.detach(), q.detach()
            sp = pd.sort(dim=-1, descending=True).values
            idx = (sp.cumsum(-1) < PARAMS["akl_mu"]).sum(-1, keepdim=True).clamp(max=sp.shape[-1] - 1)
            head = pd >= sp.gather(-1, idx)
            gap = (pd - qd).abs()
            g_head = (gap * head).sum(-1)
            g_all = gap.sum(-1)
            w_head = g_head / g_all
        fkl = F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
        rkl = F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
        return w_head * fkl + (1 - w_head) * rkl
    raise ValueError(loss_type)


def _tail(log_probs):
    """Append ``log(1 − Σ exp)`` (floored at 1e-7, as nemo_kd / TRL) as bucket k+1."""
    mass = log_probs.exp().sum(-1, keepdim=True)
    return torch.cat([log_probs, torch.log((1 - mass).clamp(min=1e-7))], dim=-1)


def naive_loss(mode, loss_type):
    def full(x, teacher):
        lq = torch.log_softmax(x.float() if x.dtype != torch.float64 else x, dim=-1)
        lp = torch.log_softmax(teacher.to(lq.dtype), dim=-1)
        return naive_divergence(loss_type, lp, lq).mean()

    def topk(x, vals, ids, lse):
        lq_full = torch.log_softmax(x.float() if x.dtype != torch.float64 else x, dim=-1)
        lq = _tail(lq_full.gather(-1, ids))
        lp = _tail(vals.to(lq.dtype) - lse.to(lq.dtype)[:, None])
        return naive_divergence(loss_type, lp, lq).mean()

    return full if mode == "full" else topk


# ----------------------------------------------------------------------------- the formulations


def nemo_kd_loss(mode, loss_type, impl, inplace=False, reference=False):
    from nemo_kd.losses.full_vocab import reference_full_kd_loss
    from nemo_kd.losses.kd import KDSettings, full_kd_loss, topk_kd_loss

    if mode == "full":
        settings = KDSettings(loss_type=loss_type, **PARAMS)
        if reference:
            return lambda x, teacher: reference_full_kd_loss(x, teacher, settings).mean()
        return lambda x, teacher: full_kd_loss(x, teacher, settings, impl=impl).mean()
    settings = KDSettings(loss_type=loss_type, topk_convention="exact_tail", **PARAMS)
    return lambda x, vals, ids, lse: topk_kd_loss(x, vals, ids, settings, teacher_lse=lse, impl=impl,
                                                  inplace_backward=inplace).mean()


def trl_loss(mode, loss_type):
    beta = TRL_BETA[loss_type]
    if mode == "full":
        from trl.experimental.gkd.gkd_trainer import GKDTrainer

        return lambda x, teacher: GKDTrainer.generalized_jsd_loss(x, teacher, beta=beta)
    from trl.experimental.async_distillation.async_distillation_trainer import _add_tail_bucket, _jsd_divergence

    def topk(x, vals, ids, lse):
        student = torch.log_softmax(x.float(), dim=-1).gather(-1, ids)
        teacher = vals.float() - lse[:, None]
        mask = torch.ones_like(ids, dtype=torch.bool)
        student, support = _add_tail_bucket(student, mask)
        teacher, _ = _add_tail_bucket(teacher, mask)
        return _jsd_divergence(student, teacher, beta=beta, support_mask=support).sum(-1).mean()

    return topk


def liger_loss(loss_type, which):
    if which == "torch":
        from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

        fn = LigerFusedLinearJSDFunction.distillation_loss_fn
        return lambda x, teacher: fn(x.float(), teacher.float(), beta=TRL_BETA[loss_type]) / x.shape[0]
    if which == "kldiv":
        from liger_kernel.transformers import LigerKLDIVLoss

        kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
        return lambda x, teacher: kl(torch.log_softmax(x.float(), -1), torch.log_softmax(teacher.float(), -1))
    from liger_kernel.transformers import LigerJSD

    jsd = LigerJSD(beta=TRL_BETA[loss_type])
    return lambda x, teacher: jsd(torch.log_softmax(x.float(), -1), torch.log_softmax(teacher.float(), -1))


# (name, modes, losses, devices, builder(mode, loss_type, device)); devices None: any.
FORMULATIONS = [
    ("naive", MODES, LOSS_TYPES, None, lambda m, l, d: naive_loss(m, l)),
    ("nemo_kd torch", MODES, LOSS_TYPES, None, lambda m, l, d: nemo_kd_loss(m, l, "torch")),
    ("nemo_kd torch, in-place grad", ("topk",), LOSS_TYPES, None,
     lambda m, l, d: nemo_kd_loss(m, l, "torch", inplace=True)),
    ("nemo_kd autograd (old torch path)", ("full",), LOSS_TYPES, None,
     lambda m, l, d: nemo_kd_loss(m, l, "torch", reference=True)),
    ("nemo_kd fused", MODES, LOSS_TYPES, ("cuda",), lambda m, l, d: nemo_kd_loss(m, l, "fused")),
    ("nemo_kd fused, in-place grad", MODES, LOSS_TYPES, ("cuda",),
     lambda m, l, d: nemo_kd_loss(m, l, "fused", inplace=True)),
    ("TRL generalized_jsd_loss", ("full",), tuple(TRL_BETA), None, lambda m, l, d: trl_loss(m, l)),
    ("TRL _add_tail_bucket + _jsd_divergence", ("topk",), tuple(TRL_BETA), None, lambda m, l, d: trl_loss(m, l)),
    ("Liger JSD (Triton)", ("full",), tuple(TRL_BETA), None, lambda m, l, d: liger_loss(l, "triton")),
    ("Liger KLDiv (Triton)", ("full",), ("forward_kl",), None, lambda m, l, d: liger_loss(l, "kldiv")),
    ("Liger JSD (torch, chunked_loss)", ("full",), tuple(TRL_BETA), ("cpu",), lambda m, l, d: liger_loss(l, "torch")),
]
INPLACE = {"nemo_kd torch, in-place grad", "nemo_kd fused, in-place grad"}
TRITON_ONLY = {"Liger JSD (Triton)", "Liger KLDiv (Triton)"}


def formulations_for(mode, loss_type, device):
    return [f for f in FORMULATIONS if mode in f[1] and loss_type in f[2] and (f[3] is None or device in f[3])]


# ----------------------------------------------------------------------------- one group (subprocess)


def _release_free_memory():
    """Hand glibc's free heap pages back to the kernel, so the next peak is measured from them."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class _Source(torch.autograd.Function):
    """A fresh copy of ``logits`` as a non-leaf that requires grad (as a model's output: the in-place
    variants overwrite only such logits); its backward drops the incoming gradient (which then lives in
    the copy's storage)."""

    @staticmethod
    def forward(ctx, anchor, logits):
        return logits.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(1, dtype=grad.dtype, device=grad.device), None


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run_group(a):
    """Every formulation of one (mode, divergence, dtype) on the same inputs, in this process.

    Memory: each formulation once, in turn (it is also the warm-up), from a trimmed heap (CPU) or a
    reset peak (CUDA). Time: ``reps`` rounds, each running every formulation once in turn, so that a
    machine whose speed drifts slows all of a round alike (the ratios to naive are taken per round).
    """
    device, dtype = a.device, getattr(torch, a.dtype)
    cuda = device == "cuda"
    student, teacher = make_inputs(a.mode, a.tokens, a.vocab, a.k, dtype, device)
    anchor = torch.zeros(1, dtype=dtype, device=device, requires_grad=True)
    wanted = set(a.formulations.split(";")) if a.formulations else None
    out, fns = {}, {}
    for name, _, _, _, builder in formulations_for(a.mode, a.loss, device):
        if wanted is not None and name not in wanted and name != "naive":
            continue
        try:
            fns[name] = builder(a.mode, a.loss, device)
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run here is reported, not fatal
            out[name] = {"na": f"{type(e).__name__}: {e}"[:120]}

    def prepare(name):  # the logits as the loss receives them (not timed, not counted)
        return _Source.apply(anchor, student) if name in INPLACE else student.detach().requires_grad_(True)

    def once(name, x):
        loss = fns[name](x, *teacher)
        loss.backward()
        return loss.detach(), (0 if name in INPLACE else x.grad.numel() * x.grad.element_size())

    for name in list(fns):
        x = prepare(name)
        _sync(device)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            _release_free_memory()
            with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) back to the current RSS
                f.write("5")
            before = _proc_status_bytes("VmRSS")
        try:
            value, grad_bytes = once(name, x)
        except Exception as e:  # noqa: BLE001 - e.g. a Triton kernel without a GPU
            out[name] = {"na": f"{type(e).__name__}: {e}"[:120]}
            del fns[name]
            continue
        _sync(device)
        peak = torch.cuda.max_memory_allocated() if cuda else _proc_status_bytes("VmHWM")
        out[name] = {"value": value.item(), "extra": peak - before - grad_bytes, "times": []}
        del x, value
    for _ in range(a.reps):
        for name in fns:
            x = prepare(name)
            _sync(device)
            t0 = time.perf_counter()
            once(name, x)
            _sync(device)
            out[name]["times"].append(time.perf_counter() - t0)
            del x
    if "naive" in fns:  # the float64 reference on the same inputs
        with torch.no_grad():
            ref = naive_loss(a.mode, a.loss)(student.double(), *[t.double() if t.is_floating_point() else t
                                                                   for t in teacher])
        out["naive"]["ref"] = ref.item()
    return out


def spawn(args, mode, loss_type, dtype):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "1", "--modes", mode, "--losses", loss_type,
           "--dtypes", dtype, "--tokens", str(args.tokens), "--vocab", str(args.vocab), "--k", str(args.k),
           "--reps", str(args.reps), "--device", args.device]
    if args.formulations:
        cmd += ["--formulations", args.formulations]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode}/{loss_type}/{dtype} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- driver


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--k", type=int, default=64, help="teacher top-k (topk mode)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--losses", default=",".join(LOSS_TYPES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--formulations", default=None, help="names separated by ; (default: all that apply; "
                                                         "naive always runs)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per group (median)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    cuda = a.device == "cuda"
    a.tokens = a.tokens or (16384 if cuda else 2048)
    a.vocab = a.vocab or (128256 if cuda else 32000)
    a.reps = a.reps or (10 if cuda else 5)
    if a.formulations:
        unknown = set(a.formulations.split(";")) - {f[0] for f in FORMULATIONS}
        if unknown:
            p.error(f"unknown formulations {sorted(unknown)}; known: {[f[0] for f in FORMULATIONS]}")
    if a.child:
        a.mode, a.loss, a.dtype = a.modes, a.losses, a.dtypes
        print(json.dumps(run_group(a)))
        return

    modes, losses, dtypes = a.modes.split(","), a.losses.split(","), a.dtypes.split(",")
    results = {}
    for m in modes:
        for l in losses:
            for d in dtypes:
                t0 = time.perf_counter()
                results[(m, l, d)] = spawn(a, m, l, d)
                print(f"{m} / {l} / {d}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({" | ".join(k): v for k, v in results.items()}, f, indent=1)

    import importlib.metadata as md

    def version(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    where = torch.cuda.get_device_name() if cuda else f"{os.cpu_count()} CPU threads"
    print(f"\nKD loss forward + backward of the mean per-token loss | {a.device} ({where}), torch "
          f"{torch.__version__}, trl {version('trl')}, liger-kernel {version('liger-kernel')} | N = {a.tokens}, "
          f"V = {a.vocab}, top-k k = {a.k} (exact_tail) | β = {PARAMS['jsd_beta']}, α = {PARAMS['skew_alpha']}, "
          f"μ = {PARAMS['akl_mu']} | time: median of {a.reps} interleaved rounds; time / naive: median of the "
          f"per-round ratios | memory: peak extra {'CUDA allocated' if cuda else 'RSS from a trimmed heap'} "
          f"beyond the logits' gradient")
    for m in modes:
        print(f"\n**{'full vocabulary (online teacher)' if m == 'full' else f'top-{a.k} (stored teacher)'}**\n")
        print("| divergence | dtype | formulation | loss | rel. err vs fp64 | time (ms) | time / naive "
              "| extra memory (MiB) | memory / naive |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for l in losses:
            for d in dtypes:
                group = results[(m, l, d)]
                base = group.get("naive", {})
                ref = base.get("ref")
                for name, out in group.items():
                    if "na" in out:
                        reason = "Triton kernel, no CPU implementation" if name in TRITON_ONLY and not cuda \
                            else out["na"].replace("|", "/")
                        print(f"| {l} | {d} | {name} | n/a | | n/a ({reason}) | | | |")
                        continue
                    t = statistics.median(out["times"])
                    ratio = statistics.median(x / y for x, y in zip(out["times"], base["times"]))
                    err = abs(out["value"] - ref) / abs(ref) if ref else float("nan")
                    mem = f"{out['extra'] / base['extra']:.2f}×" if base.get("extra", 0) > 0 else "—"
                    print(f"| {l} | {d} | {name} | {out['value']:.6f} | {err:.1e} | {t * 1e3:.0f} | "
                          f"{ratio:.2f}× | {out['extra'] / 2**20:.0f} | {mem} |")


if __name__ == "__main__":
    main()
