"""Full-vocabulary KD against an online teacher in torch: chunked over tokens, fused in autograd.

:func:`chunked_full_kd_loss` is the torch path of :func:`nemo_kd.losses.kd.full_kd_loss`
(``impl="torch"``, and ``"auto"`` off CUDA). Per token ``n`` (row), with this rank's
vocabulary shards ``z`` (student) and ``u`` (teacher) ``[N, V/TP]`` and inverse temperatures
``s`` (``logits_scale``) and ``t`` (``target_logits_scale``)::

    a_v = s·z_v,  log q_v = a_v − M_a − log Σ_u e^{a_u − M_a}      (student, M_a = max_v a_v)
    b_v = t·u_v,  log p_v = b_v − M_b − log Σ_u e^{b_u − M_b}      (teacher)

(log-probs relative to the row maxima, so ±1e4 logits keep their small differences; the
maxima and sums are over the whole sharded vocabulary: one ``[2, n]`` MAX and one ``[2, n]``
SUM all-reduce per chunk over the TP group). The divergences are those of
:mod:`nemo_kd.losses.divergences` (same definitions, the same ``0·log 0 = 0`` convention,
``+inf`` where reverse KL puts student mass on a zero-probability teacher column), with
their gradients w.r.t. ``a`` in closed form (the teacher is never differentiated)::

    FKL  = Σ p (log p − log q)                          ∂/∂a_v = q_v − p_v
    RKL  = Σ q (log q − log p)                          ∂/∂a_v = q_v·(h_v − RKL),  h = log q − log p

    mixtures  m = β·p + (1−β)·q,   D = w_p·KL(p‖m) + w_q·KL(q‖m)
      JSD_β:  (β, w_p, w_q) = (β, β, 1−β)     skew FKL_α: (α, 1, 0)     skew RKL_α: (1−α, 0, 1)
      ∂D/∂q_v = w_q·(log q_v − log m_v) − (1−β)·(w_p·p_v + w_q·q_v)/m_v  (+ a constant)
      ∂/∂a_v  = q_v·(h_v − Σ_u q_u·h_u),  h = ∂D/∂q         (JSD: h = (1−β)·(log q − log m))

    AKL_μ = w_h·FKL + w_t·RKL  (weights from BucketSpace.head_mask, constants for autograd)
      ∂/∂a_v = w_h·(q_v − p_v) + w_t·q_v·(log q_v − log p_v − RKL)

(the softmax Jacobian ``∂q_u/∂a_v = q_u·([u = v] − q_v)`` turns any ``∂D/∂q`` into
``q·(h − Σ q·h)``). JSD at β = 0 / 1 is exactly FKL / RKL and skew KL at α = 0 exactly
FKL / RKL, as in :mod:`nemo_kd.losses.divergences` and the fused kernel.

Why not autograd through :func:`~nemo_kd.losses.divergences.divergence`: that graph (the old
torch path, kept as :func:`reference_full_kd_loss`) keeps several fp32 ``[N, V]`` tensors
for backward and runs ~20 elementwise passes; it measured 2.9× the time and 1.85× the memory
of a naive ``F.kl_div(log_softmax(·), log_softmax(·))`` (issue 14). Here the rows are
processed ``chunk_tokens`` at a time, all of a chunk's work (both log-softmaxes, the value,
the gradient) runs while the chunk's few ``[chunk, V/TP]`` fp32 buffers are cache-resident,
and the only thing kept for backward is the gradient itself, ``∂D_n/∂z``, in the logits'
dtype: backward multiplies it in place by ``s·∂L/∂D_n`` and returns it, so the stored
buffer *becomes* the logits' gradient (no second ``[N, V/TP]`` tensor). Extra memory is
therefore bounded by the chunk's scratch whatever N; the gradient buffer every formulation
must produce is simply allocated in the forward. For bf16/fp16 logits the gradient is
rounded to the logits' dtype twice (stored, then scaled): at most one extra ulp.

Rows whose teacher logits are all −inf (or non-finite anywhere: max not finite) give
exactly 0 with zero gradient, as before; so do rows whose *student* logits are all −inf
(the fused kernel's rule; the autograd reference gives NaN there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from nemo_kd.kernels.buckets import BucketSpace
from nemo_kd.kernels.kd_settings import KDSettings, check_settings
from nemo_kd.losses.divergences import akl_weights, divergence
from nemo_kd.losses.vocab_parallel import (
    ProcessGroup,
    accumulation_dtype,
    all_reduce_no_grad,
    tp_world_size,
    vocab_parallel_log_softmax,
)

# Elements (rows × V/TP) per chunk. On CPU the chunk's ~6 fp32 buffers should stay in the
# last-level cache: 2^18 elements (1 MiB per buffer, 8 rows at V = 32k) measured fastest on a
# 2-core EPYC (8 MiB L3), within a few % from 2^17 to 2^19. On CUDA the opposite: few, large
# kernels (launch overhead, occupancy), 2^26 elements = 256 MiB per fp32 buffer.
CPU_CHUNK_ELEMENTS = 2**18
CUDA_CHUNK_ELEMENTS = 2**26
_TINY = {dtype: torch.finfo(dtype).tiny for dtype in (torch.float32, torch.float64)}


def default_chunk_tokens(v_local: int, device: torch.device) -> int:
    """Rows per chunk for a ``[N, v_local]`` shard on ``device`` (:data:`CPU_CHUNK_ELEMENTS`)."""
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, budget // max(1, v_local))


@dataclass(frozen=True)
class FullVocabDivergence:
    """A divergence of :data:`~nemo_kd.losses.divergences.LOSS_TYPES` in the form the chunk loop computes.

    ``kind``: ``"forward_kl"``, ``"reverse_kl"``, ``"mixture"`` (``m = β·p + (1−β)·q``,
    ``D = w_p·KL(p‖m) + w_q·KL(q‖m)``) or ``"akl"`` (``mu``). Build with :meth:`of` from the
    (already validated) :class:`~nemo_kd.kernels.kd_settings.KDSettings`.
    """

    kind: str
    beta: float = 0.0
    w_p: float = 0.0
    w_q: float = 0.0
    mu: float = 0.5

    @classmethod
    def of(cls, settings: KDSettings) -> "FullVocabDivergence":
        loss_type, jsd_beta, skew_alpha = settings.loss_type, settings.jsd_beta, settings.skew_alpha
        if loss_type in ("forward_kl", "reverse_kl"):
            return cls(loss_type)
        if loss_type == "akl":
            return cls("akl", mu=float(settings.akl_mu))
        if loss_type == "jsd":
            if jsd_beta in (0.0, 1.0):  # TRL's end points: exactly FKL / RKL
                return cls("forward_kl" if jsd_beta == 0.0 else "reverse_kl")
            return cls("mixture", beta=float(jsd_beta), w_p=float(jsd_beta), w_q=1.0 - float(jsd_beta))
        if skew_alpha == 0.0:  # the mixture is the student (skew FKL) / teacher (skew RKL) itself
            return cls("forward_kl" if loss_type == "skew_fkl" else "reverse_kl")
        if loss_type == "skew_fkl":
            return cls("mixture", beta=float(skew_alpha), w_p=1.0, w_q=0.0)
        return cls("mixture", beta=1.0 - float(skew_alpha), w_p=0.0, w_q=1.0)

    @property
    def is_jsd(self) -> bool:
        return self.kind == "mixture" and self.w_p == self.beta and self.w_q == 1.0 - self.beta


# --------------------------------------------------------------------------- per-chunk numerics


_INF = float("inf")


def _xlogratio(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``a·(log a − log b)``, exactly 0 where ``a = 0`` (the xlogy convention of ``_plogratio``).

    On live rows the log-probs are finite or −inf, never NaN, so a NaN product is exactly
    ``0·(±inf)`` (a zero-probability bucket): ``nan_to_num_`` maps it to 0 and keeps a true
    ``+inf`` (``a > 0``, ``b = 0``). That is ~4× faster on CPU than ``torch.where(a > 0, …)``.
    """
    return (log_a - log_b).mul_(a).nan_to_num_(nan=0.0, posinf=_INF, neginf=-_INF)


def _row_sums(space: BucketSpace, *xs: torch.Tensor) -> torch.Tensor:
    """``[len(xs), r]``: each ``[r, V/TP]`` summed over the (sharded) vocabulary, one all-reduce for all."""
    return all_reduce_no_grad(torch.stack([x.sum(-1) for x in xs]), dist.ReduceOp.SUM,
                              space.group if space.is_sharded else None)


def _log_softmax_pair(a: torch.Tensor, b: torch.Tensor, max_a: torch.Tensor, max_b: torch.Tensor,
                      group: ProcessGroup) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the chunks ``a``, ``b`` ``[r, V/TP]`` over the sharded vocabulary.

    ``max_a`` / ``max_b``: the global (finite) row maxima. One rank: ``torch.log_softmax``
    (itself relative to the row max). TP: ``x − M − log Σ_ranks Σ_v e^{x−M}`` in place, the two
    sums in one all-reduce. ``a`` and ``b`` are scratch copies (overwritten under TP).
    """
    if tp_world_size(group) == 1:
        return torch.log_softmax(a, dim=-1), torch.log_softmax(b, dim=-1)
    a.sub_(max_a[:, None])
    b.sub_(max_b[:, None])
    sums = all_reduce_no_grad(torch.stack([torch.exp(a).sum(-1), torch.exp(b).sum(-1)]), dist.ReduceOp.SUM, group)
    log_sums = torch.log(sums)
    return a.sub_(log_sums[0][:, None]), b.sub_(log_sums[1][:, None])


def _chunk_value_and_grad(log_q: torch.Tensor, log_p: torch.Tensor, div: FullVocabDivergence, space: BucketSpace,
                          need_grad: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(D [r] summed over the TP group, ∂D/∂a [r, V/TP] or None)`` for one chunk (module docstring).

    ``log_q`` is consumed (its buffer may become the gradient).
    """
    if div.kind == "forward_kl":
        p = torch.exp(log_p)
        value = space.sum_no_grad(_xlogratio(p, log_p, log_q))
        return value, (log_q.exp_().sub_(p) if need_grad else None)
    if div.kind == "reverse_kl":
        q = torch.exp(log_q)
        qh = _xlogratio(q, log_q, log_p)  # q·h, h = log q − log p
        value = space.sum_no_grad(qh)
        return value, (qh.sub_(q * value[:, None]) if need_grad else None)
    if div.kind == "akl":
        p, q = torch.exp(log_p), torch.exp(log_q)
        w_head, w_tail = akl_weights(p, q, div.mu, space)
        qh = _xlogratio(q, log_q, log_p)  # q·(log q − log p)
        kls = _row_sums(space, _xlogratio(p, log_p, log_q), qh)
        # A zero weight must not turn an infinite KL into NaN (as adaptive_kl).
        value = torch.where(w_head > 0, w_head * kls[0], 0.0) + torch.where(w_tail > 0, w_tail * kls[1], 0.0)
        if not need_grad:
            return value, None
        rkl = torch.where(w_tail > 0, kls[1], 0.0)
        grad = qh.sub_(q * rkl[:, None]).mul_(w_tail[:, None])
        return value, grad.add_((q - p).mul_(w_head[:, None]))
    beta = div.beta
    p, q = torch.exp(log_p), torch.exp(log_q)
    if beta == 1.0:  # skew KL at α = 1: m is p (skew FKL) or q (skew RKL) exactly, D = 0
        log_m = log_p
    elif beta == 0.0:
        log_m = log_q
    else:
        # log m = log(β·p + (1−β)·q) from the probabilities: a sum of positives (no cancellation,
        # relative error ~ulp) and 2.5× faster than torch.logaddexp on CPU. m is floored at the
        # smallest normal float, so a denormal p or q whose mixture rounds to 0 cannot read
        # log m = −inf (its own term is < 1e-36 either way); p = q = 0 columns are then 0·(−inf).
        log_m = torch.log(torch.add(p, q, alpha=(1.0 - beta) / beta).mul_(beta).clamp_(min=_TINY[p.dtype]))
    terms, weights = [], []
    if div.w_p > 0:
        terms.append(_xlogratio(p, log_p, log_m))
        weights.append(div.w_p)
    tq = _xlogratio(q, log_q, log_m) if div.w_q > 0 else None  # q·(log q − log m)
    if tq is not None:
        terms.append(tq)
        weights.append(div.w_q)
    kls = _row_sums(space, *terms)  # KL(p‖m), KL(q‖m) as present
    value = kls[0] * weights[0] if len(terms) == 1 else kls[0] * weights[0] + kls[1] * weights[1]
    if not need_grad:
        return value, None
    # q·h with h = ∂D/∂q (module docstring); for JSD the ratio term is the constant 1 − β.
    qh = tq.mul_(div.w_q) if tq is not None else torch.zeros_like(q)
    if not div.is_jsd:
        # p/m or q/m (the w's are 0/1 here): finite, as log m ≥ log β + log p (≥ log(1−β) + log q).
        ratio = torch.exp((log_p if div.w_p > 0 else log_q) - log_m)
        qh.sub_(ratio.mul_(q).mul_(1.0 - beta))
    return value, qh.sub_(q * space.sum_no_grad(qh)[:, None])


def _chunked_forward(student: torch.Tensor, teacher: torch.Tensor, div: FullVocabDivergence, s: float, t: float,
                     group: ProcessGroup, chunk: int, need_grad: bool):
    """``(loss [N] acc, live rows [N] bool, ∂D_n/∂(s·z) [N, V/TP] in the logits' dtype or None)``."""
    n, v_local = student.shape
    acc = accumulation_dtype(student.dtype)
    space = BucketSpace.sharded(group)
    tp = tp_world_size(group)
    loss = torch.empty(n, dtype=acc, device=student.device)
    live = torch.empty(n, dtype=torch.bool, device=student.device)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else None
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        zs, zt = student[lo:hi], teacher[lo:hi]
        # Row maxima (global): the live-row test and, under TP, the log-softmax shift.
        maxima = all_reduce_no_grad(torch.stack([zs.amax(-1).to(acc), zt.amax(-1).to(acc)]),
                                    dist.ReduceOp.MAX, group)
        ok = torch.isfinite(maxima).all(0)
        all_ok = bool(ok.all())
        # Scratch copies in acc (scaled); a read-only view where nothing would change it.
        a = zs.to(acc, copy=tp > 1 or s != 1.0 or not all_ok)
        b = zt.to(acc, copy=tp > 1 or t != 1.0 or not all_ok)
        if s != 1.0:
            a.mul_(s)
        if t != 1.0:
            b.mul_(t)
        if not all_ok:  # a finite stand-in for dead rows (zeroed below)
            a.masked_fill_(~ok[:, None], 0.0)
            b.masked_fill_(~ok[:, None], 0.0)
        mx = torch.where(ok[None], maxima, 0.0) * torch.tensor([[s], [t]], dtype=acc, device=maxima.device)
        log_q, log_p = _log_softmax_pair(a, b, mx[0], mx[1], group)
        value, g = _chunk_value_and_grad(log_q, log_p, div, space, need_grad)
        loss[lo:hi] = torch.where(ok, value, 0.0)
        live[lo:hi] = ok
        if need_grad:
            grad[lo:hi].copy_(g)
    return loss, live, grad


class _ChunkedFullKD(torch.autograd.Function):
    """Values from the chunk loop; backward scales the gradient stored in the forward (in place)."""

    @staticmethod
    def forward(ctx, student, teacher, div, s, t, group, chunk):
        loss, live, grad = _chunked_forward(student, teacher, div, s, t, group, chunk, need_grad=True)
        ctx.save_for_backward(grad, live)
        ctx.scale = s
        ctx.used = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.used:  # the stored buffer was handed out (and scaled) by the first backward
            raise RuntimeError("chunked_full_kd_loss: backward through the same graph twice is not supported "
                               "(the stored gradient becomes the logits' gradient)")
        ctx.used = True
        grad, live = ctx.saved_tensors
        # ∂L/∂z = ∂L/∂D_n · s · ∂D_n/∂a; dead rows get exactly 0 (their stand-in gradient is finite).
        factor = torch.where(live, grad_loss * ctx.scale, 0.0)
        if grad.dtype == factor.dtype:
            return grad.mul_(factor[:, None]), None, None, None, None, None, None
        # bf16/fp16 gradient, fp32 factor: ``grad.mul_(factor)`` would go through an fp32 temporary of
        # the whole [N, V/TP] (the in-place op's type promotion); scale chunk by chunk instead.
        chunk = default_chunk_tokens(grad.shape[-1], grad.device)
        for lo in range(0, grad.shape[0], chunk):
            rows = grad[lo:lo + chunk]
            rows.copy_(rows.to(factor.dtype).mul_(factor[lo:lo + chunk, None]))
        return grad, None, None, None, None, None, None


def chunked_full_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    settings: KDSettings,
    *,
    group: ProcessGroup = None,
    chunk_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Per-token full-vocabulary divergence ``D(p_teacher ‖ q_student)`` ``[N]``, chunked (module docstring).

    Args:
        student_logits / teacher_logits: ``[N, V/TP]`` this rank's vocab shards (same sharding),
            any float dtype; the teacher is never differentiated.
        settings: the loss (:class:`~nemo_kd.kernels.kd_settings.KDSettings`): the divergence
            (:mod:`nemo_kd.losses.divergences`), the inverse temperatures ``s`` / ``t`` and ``T²``
            (its ``topk_convention`` / ``tail_floor`` do not apply).
        group: the TP process group (``None``: one rank).
        chunk_tokens: rows per chunk (default :func:`default_chunk_tokens`).

    Returns:
        ``[N]`` fp32 (fp64 for fp64 logits), replicated on the TP ranks, differentiable w.r.t.
        ``student_logits``, times ``T²`` with ``settings.temperature_squared``.
    """
    settings = check_settings(settings)
    div = FullVocabDivergence.of(settings)
    chunk = int(chunk_tokens) if chunk_tokens else default_chunk_tokens(student_logits.shape[-1],
                                                                        student_logits.device)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    teacher = teacher_logits.detach()
    s, t = float(settings.logits_scale), float(settings.target_logits_scale)
    if torch.is_grad_enabled() and student_logits.requires_grad:
        loss = _ChunkedFullKD.apply(student_logits, teacher, div, s, t, group, chunk)
    else:  # no backward to serve: values only (no gradient buffer)
        loss = _chunked_forward(student_logits.detach(), teacher, div, s, t, group, chunk, need_grad=False)[0]
    return loss * settings.temperature_factor


def reference_full_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    settings: KDSettings,
    *,
    group: ProcessGroup = None,
) -> torch.Tensor:
    """The same per-token divergence by autograd through :func:`~nemo_kd.losses.divergences.divergence`.

    The previous torch path of ``full_kd_loss`` (fp32 ``[N, V/TP]`` log-softmaxes of both sides,
    the divergence's graph kept for backward), kept as the reference the chunked path is
    tested and benchmarked against. Rows whose teacher logits are all −inf give 0; rows
    whose student logits are all −inf give NaN. ``settings`` as :func:`chunked_full_kd_loss`'s
    (``T²`` included).
    """
    settings = check_settings(settings)
    space = BucketSpace.sharded(group)
    acc = accumulation_dtype(student_logits.dtype)
    with torch.no_grad():
        teacher = teacher_logits.detach()
        row_ok = torch.isfinite(space.max_no_grad(teacher.to(acc)))
        teacher = torch.where(row_ok[:, None], teacher, torch.zeros_like(teacher))
        log_p = vocab_parallel_log_softmax(teacher, settings.target_logits_scale, group).to(acc)
    log_q = vocab_parallel_log_softmax(student_logits, settings.logits_scale, group)
    loss = divergence(settings.loss_type, log_p, log_q, space, jsd_beta=settings.jsd_beta,
                      skew_alpha=settings.skew_alpha, akl_mu=settings.akl_mu)
    return torch.where(row_ok, loss * settings.temperature_factor, torch.zeros_like(loss))
