"""Fused Triton full-vocabulary KD (online teacher) + CE at the label, vocab-parallel.

Computes what :func:`nemo_kd.losses.kd.full_kd_loss` computes for every divergence
(``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``akl``; and, optionally,
the student's log-prob at the label, the CE term) without materialising any fp32 ``[N, V]``
tensor. Per token (row) ``n``, with
this rank's shards ``z`` (student) and ``u`` (teacher) ``[N, V_local]``, inverse
temperatures ``s`` (``logits_scale``) and ``t`` (``target_logits_scale``)::

    a_v = s·z_v,  A = LSE_v(a_v),  log q_v = a_v − A          (student)
    b_v = t·u_v,  B = LSE_v(b_v),  log p_v = b_v − B          (teacher)

    FKL  = Σ_v p_v (log p_v − log q_v)   = W_f / S_b − log S_b + log S_a
    RKL  = Σ_v q_v (log q_v − log p_v)   = W_r / S_a − log S_a + log S_b
    JSD_β = β·Σ p (log p − log m) + (1−β)·Σ q (log q − log m),   m = β·p + (1−β)·q
    SKL_α = Σ p (log p − log m),   m = α·p + (1−α)·q          (skew forward KL, β = α)
    SRKL_α = Σ q (log q − log m),  m = (1−α)·p + α·q          (skew reverse KL, β = 1−α)
    AKL_μ  = w_h·FKL + (1−w_h)·RKL,  w_h = Σ_head |p−q| / Σ |p−q|   (constants for autograd)

with ``S_a = Σ e^{a−M_a}``, ``S_b = Σ e^{b−M_b}`` (``M`` the row maxima) and the
shift-relative sums ``W_f = Σ e^{b−M_b}·((b−M_b) − (a−M_a))``, ``W_r = Σ e^{a−M_a}·((a−M_a)
− (b−M_b))``. Working relative to the maxima keeps the KL free of the cancellation
``E_p[b] − B`` that ±1e4 logits would cause; for the same reason every per-column log-prob
(second pass, backward, label) is formed as ``log q_v = (a_v − M_a) − log S_a``, never as
``a_v − A`` (whose fp32 ``A`` is rounded to ulp(1e4) ≈ 1e-3 there). β = 0 / 1 are exactly FKL / RKL (TRL's
convention, as :func:`nemo_kd.losses.divergences.generalized_jsd`). Gradients w.r.t. the
student's logits (``g`` the upstream gradient of the row's KD value, ``g_y`` of the
label log-prob)::

    ∂FKL/∂a_v  = q_v − p_v
    ∂RKL/∂a_v  = q_v·(log q_v − log p_v − RKL)
    ∂JSD/∂a_v  = (1−β)·q_v·(log q_v − log m_v − KL(q‖m))      [∂JSD/∂q_v = (1−β)·log(q_v/m_v)]
    ∂SKL/∂a_v  = (1−α)·q_v·(Σ_u q_u·p_u/m_u − p_v/m_v)
    ∂SRKL/∂a_v = q_v·(log q_v − log m_v − α·q_v/m_v − SRKL + α·Σ_u q_u²/m_u)
    ∂AKL/∂a_v  = w_h·∂FKL/∂a_v + (1−w_h)·∂RKL/∂a_v

AKL's head (:meth:`~nemo_kd.kernels.buckets.BucketSpace.head_mask`: a token is in it iff the
teacher mass strictly above it is below μ, ties together) is a threshold on the teacher's raw
logits read off its vocab-parallel top-``AKL_TOPK`` (the torch path's bisection for rows whose
head runs past them); both KLs come from the first pass (``W_f`` and ``W_r``), the two gaps
from a second pass, one ``[N, 2]`` all-reduce.
    ∂z_v       = s·( g·∂D/∂a_v + g_y·([v = y] − q_v) )

Passes over ``[N, V_local]`` (student + teacher shards read together):

* forward: ONE pass (FKL, RKL) computing per row, with a block-wise online max, the
  local ``M_a, S_a, M_b, S_b, W`` and ``a_y`` at the label if this shard owns it; the
  mixture losses (JSD, skew FKL/RKL) need the global ``A, B`` inside ``log m``, so they take
  a second pass for ``Σ`` of their terms and of the statistic their gradient needs.
* TP: ONE all-gather of the per-rank ``[N, 6]`` statistics (each rank then combines the
  ranks' maxima and rescaled sums itself, which a single all-reduce cannot do, as the
  rescaling needs the global maxima first), plus, for the mixture losses only, one
  ``[N, 2]`` SUM all-reduce of the second pass.
* backward: ONE pass reading both shards and writing ``∂L/∂z`` in the logits' dtype
  into a fresh buffer, or over the student logits with ``inplace_backward=True``.

Memory: besides the gradient buffer (none in place), O(N) fp32 per-row statistics. The
kernels stream one row per program (forward) or row × column block (backward), so
their scratch does not grow with ``N·V``: there is nothing to chunk over tokens.

Masks (−inf logits), as in the torch path: a −inf teacher column has ``p = 0`` and adds
exactly 0 to ``p·log(p/·)`` terms; reverse KL is ``+inf`` where the teacher column is
−inf and the student's is not. A row whose teacher logits are all −inf yields exactly 0
and no gradient (as the torch path); so does a row whose *student* logits are all −inf
(the torch path gives NaN there), whose label log-prob is also defined as 0, as in
:mod:`nemo_kd.kernels.logprobs_triton`. Ids outside this shard (or outside ``[0, V)``)
contribute 0 to the label gather. ``s, t > 0``. On CPU the kernels need
``TRITON_INTERPRET=1`` set before Triton is imported.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from nemo_kd.kernels.buckets import BucketSpace
from nemo_kd.kernels.collectives import all_gather_vocab, tp_rank, tp_world_size
from nemo_kd.kernels.common import check_fused_supported, is_interpreted, store_out
from nemo_kd.kernels.kd_settings import KDSettings, check_settings

FUSED_FULL_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_fkl", "skew_rkl", "akl")
# Mixture losses (codes 2–4) share the second pass: D = w_p·KL(p‖m) + w_q·KL(q‖m), m = β·p + (1−β)·q.
# AKL (5) takes both KLs from the first pass and its head/tail gaps from a second one.
_FKL, _RKL, _JSD, _SKEW_FKL, _SKEW_RKL, _AKL = 0, 1, 2, 3, 4, 5
# AKL's head (the fewest top teacher probabilities whose mass reaches μ) is read off the teacher's
# top AKL_TOPK; rows whose head does not end inside them (very flat teachers) fall back to the
# bisection of nemo_kd.kernels.buckets.BucketSpace over that row.
AKL_TOPK = 64
AKL_BISECTION_ROWS = 32  # rows per step of that fallback (its fp32 scratch is rows × V/TP)
# Per-row statistics of the first pass: max/sum of a, max/sum of b, W, a at the label, W_r (AKL).
_NSTAT = 7

# Columns per iteration over BOTH shards: 2048 lanes × 2 streams over 8 warps keeps 16
# fp32 values per thread in flight per iteration. Env overrides for tuning on a GPU.
FWD_BLOCK_V = int(os.environ.get("NEMO_KD_FULL_FWD_BLOCK", 2048))
FWD_NUM_WARPS = int(os.environ.get("NEMO_KD_FULL_FWD_WARPS", 8))
BWD_BLOCK_V = int(os.environ.get("NEMO_KD_FULL_BWD_BLOCK", 2048))
BWD_NUM_WARPS = int(os.environ.get("NEMO_KD_FULL_BWD_WARPS", 8))


@triton.jit
def _shift(m):
    """The shift used for a running max ``m``: ``m``, or 0 while nothing finite was seen."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _stats_kernel(
    zs_ptr, zt_ptr, label_ptr, stats_ptr,
    V, stride_s, stride_t, stride_stats, vocab_start, s_scale, t_scale,
    LOSS: tl.constexpr, HAS_LABEL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row, one pass over both shards: [M_a, S_a, M_b, S_b, W, a_label] (module docstring).

    Block-wise online max: the row maxima are scalars, so the accumulators (per lane)
    are rescaled by one scalar exp per block and each element costs one exp per stream.
    """
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    cols = tl.arange(0, BLOCK_V)
    ninf = tl.full([BLOCK_V], float("-inf"), tl.float32)
    m_a = tl.max(ninf, axis=0)  # fp32 scalar -inf (a loop-carried scalar tensor)
    m_b = tl.max(ninf, axis=0)
    s_a = tl.zeros([BLOCK_V], tl.float32)
    s_b = tl.zeros([BLOCK_V], tl.float32)
    w = tl.zeros([BLOCK_V], tl.float32)
    w2 = tl.zeros([BLOCK_V], tl.float32)  # AKL: W_r beside W_f
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        a = tl.load(zs_row + c, mask=inb, other=float("-inf")).to(tl.float32) * s_scale
        b = tl.load(zt_row + c, mask=inb, other=float("-inf")).to(tl.float32) * t_scale
        new_a = tl.maximum(m_a, tl.max(a, axis=0))
        new_b = tl.maximum(m_b, tl.max(b, axis=0))
        old_sh_a, sh_a = _shift(m_a), _shift(new_a)
        old_sh_b, sh_b = _shift(m_b), _shift(new_b)
        # Empty accumulators (max still -inf) are 0: rescale them by 0, never by exp(+big).
        r_a = tl.where(m_a == float("-inf"), 0.0, tl.exp(m_a - new_a))
        r_b = tl.where(m_b == float("-inf"), 0.0, tl.exp(m_b - new_b))
        e_a = tl.exp(a - sh_a)  # 0 at -inf
        e_b = tl.exp(b - sh_b)
        if LOSS == 1:  # W_r = Σ e^{a-sh_a}((a-sh_a) - (b-sh_b))
            w = r_a * (w + ((sh_b - old_sh_b) - (sh_a - old_sh_a)) * s_a)
            w += tl.where(a > float("-inf"), e_a * ((a - sh_a) - (b - sh_b)), 0.0)
        else:  # W_f = Σ e^{b-sh_b}((b-sh_b) - (a-sh_a)): moving the shifts adds (Δsh_a - Δsh_b)·S_b
            # (FKL and AKL; unused by the mixture losses, whose pass is bound by memory anyway)
            w = r_b * (w + ((sh_a - old_sh_a) - (sh_b - old_sh_b)) * s_b)
            w += tl.where(b > float("-inf"), e_b * ((b - sh_b) - (a - sh_a)), 0.0)
        if LOSS == 5:
            w2 = r_a * (w2 + ((sh_b - old_sh_b) - (sh_a - old_sh_a)) * s_a)
            w2 += tl.where(a > float("-inf"), e_a * ((a - sh_a) - (b - sh_b)), 0.0)
        s_a = s_a * r_a + e_a
        s_b = s_b * r_b + e_b
        m_a = new_a
        m_b = new_b
    out = stats_ptr + row * stride_stats
    tl.store(out + 0, m_a)
    tl.store(out + 1, tl.sum(s_a, axis=0))
    tl.store(out + 2, m_b)
    tl.store(out + 3, tl.sum(s_b, axis=0))
    tl.store(out + 4, tl.sum(w, axis=0))
    if HAS_LABEL:
        local = tl.load(label_ptr + row) - vocab_start
        owned = (local >= 0) & (local < V)
        a_y = tl.load(zs_row + local, mask=owned, other=0.0).to(tl.float32) * s_scale
        tl.store(out + 5, tl.where(owned, a_y, 0.0))
    else:
        tl.store(out + 5, 0.0)
    tl.store(out + 6, tl.sum(w2, axis=0))


@triton.jit
def _second_pass_kernel(
    zs_ptr, zt_ptr, sh_a_ptr, ls_a_ptr, sh_b_ptr, ls_b_ptr, thr_ptr, out_ptr,
    V, stride_s, stride_t, s_scale, t_scale, beta,
    LOSS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row, the second pass over this shard (mixture losses and AKL), given the global
    shifts ``M`` (``sh``) and ``log S`` (``ls``, +inf on dead rows) of both sides:
    ``[D, X]`` — JSD: [JSD, KL(q‖m)]; skew FKL: [SKL, Σ q·p/m]; skew RKL: [SRKL, Σ q²/m]
    (module docstring); AKL: [Σ_{u ≥ thr} |p − q|, Σ |p − q|], the head given by a threshold
    ``thr`` on the teacher's *raw* logits ``u`` (exact: no rounding of p in between)."""
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    sh_a = tl.load(sh_a_ptr + row)
    ls_a = tl.load(ls_a_ptr + row)
    sh_b = tl.load(sh_b_ptr + row)
    ls_b = tl.load(ls_b_ptr + row)
    cols = tl.arange(0, BLOCK_V)
    j = tl.zeros([BLOCK_V], tl.float32)
    k = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        c = start + cols
        inb = c < V
        lq = (tl.load(zs_row + c, mask=inb, other=float("-inf")).to(tl.float32) * s_scale - sh_a) - ls_a
        u = tl.load(zt_row + c, mask=inb, other=float("-inf")).to(tl.float32)
        lp = (u * t_scale - sh_b) - ls_b
        q = tl.exp(lq)
        p = tl.exp(lp)
        if LOSS == 5:
            gap = tl.abs(p - q)
            j += tl.where(u >= tl.load(thr_ptr + row), gap, 0.0)
            k += gap
        m = beta * p + (1.0 - beta) * q
        lm = tl.log(m)
        # m = 0 only where both masses vanish (or flush to zero): such a column adds 0.
        kq = tl.where((q > 0.0) & (m > 0.0), q * (lq - lm), 0.0)
        kp = tl.where((p > 0.0) & (m > 0.0), p * (lp - lm), 0.0)
        if LOSS == 2:
            j += beta * kp + (1.0 - beta) * kq
            k += kq
        elif LOSS == 3:
            j += kp
            k += tl.where(m > 0.0, q * (p / m), 0.0)
        elif LOSS == 4:
            j += kq
            k += tl.where(m > 0.0, q * (q / m), 0.0)
    tl.store(out_ptr + row * 2, tl.sum(j, axis=0))
    tl.store(out_ptr + row * 2 + 1, tl.sum(k, axis=0))


@triton.jit
def _bwd_kernel(
    zs_ptr, zt_ptr, grad_ptr, sh_a_ptr, ls_a_ptr, sh_b_ptr, ls_b_ptr, g_kd_ptr, r_ptr, g_y_ptr, label_ptr,
    V, stride_s, stride_t, stride_g, s_scale, t_scale, beta,
    LOSS: tl.constexpr, BLOCK_V: tl.constexpr, EMULATE_RTNE_BF16: tl.constexpr,
):
    """grad[n, v] = s·(g_n·∂D/∂a_v + g_y·([v = y] − q_v)) in grad's dtype (may alias the student logits).

    ``r`` ``[N, 2]``: the row's divergence and the second pass's statistic X (mixture
    losses); ``label`` the local label column or −1. Dead rows come with g = 0 and
    log S = +inf (q, p = 0).
    """
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    inb = c < V
    sh_a = tl.load(sh_a_ptr + row)
    ls_a = tl.load(ls_a_ptr + row)
    sh_b = tl.load(sh_b_ptr + row)
    ls_b = tl.load(ls_b_ptr + row)
    g_kd = tl.load(g_kd_ptr + row)
    g_y = tl.load(g_y_ptr + row)
    label = tl.load(label_ptr + row)
    lq = (tl.load(zs_ptr + row * stride_s + c, mask=inb, other=float("-inf")).to(tl.float32) * s_scale - sh_a) - ls_a
    lp = (tl.load(zt_ptr + row * stride_t + c, mask=inb, other=float("-inf")).to(tl.float32) * t_scale - sh_b) - ls_b
    q = tl.exp(lq)
    p = tl.exp(lp)
    if LOSS == 0:
        d = q - p
    elif LOSS == 5:  # AKL: w_h·∂FKL + (1 − w_h)·∂RKL with r = [RKL, w_h] (weights are constants)
        r = tl.load(r_ptr + row * 2)
        w_h = tl.load(r_ptr + row * 2 + 1)
        d_r = tl.where(q > 0.0, (1.0 - w_h) * q * ((lq - lp) - r), 0.0)
        d = w_h * (q - p) + tl.where(w_h < 1.0, d_r, 0.0)
    elif LOSS == 1:
        r = tl.load(r_ptr + row * 2)
        d = tl.where(q > 0.0, q * ((lq - lp) - r), 0.0)
    else:
        r = tl.load(r_ptr + row * 2)
        x = tl.load(r_ptr + row * 2 + 1)
        m = beta * p + (1.0 - beta) * q
        ok = (q > 0.0) & (m > 0.0)
        m_safe = tl.where(m > 0.0, m, 1.0)
        if LOSS == 2:
            d = tl.where(ok, (1.0 - beta) * q * ((lq - tl.log(m_safe)) - x), 0.0)
        elif LOSS == 3:
            d = tl.where(ok, (1.0 - beta) * q * (x - p / m_safe), 0.0)
        else:  # skew RKL: α = 1 − β
            d = tl.where(ok, q * ((lq - tl.log(m_safe)) - (1.0 - beta) * (q / m_safe) - r + (1.0 - beta) * x), 0.0)
    # A dead row (g = 0) stays exactly 0 even where d is infinite.
    g = tl.where(g_kd != 0.0, g_kd * d, 0.0) - g_y * q + tl.where(c == label, g_y, 0.0)
    store_out(grad_ptr + row * stride_g + c, g * s_scale, inb, EMULATE_RTNE_BF16)


def _combine(stats: torch.Tensor, loss: int) -> Tuple[torch.Tensor, ...]:
    """Merge the ranks' first-pass statistics ``[TP, N, 7]`` (TP = 1 included).

    Sums move from each rank's shift to the global one: ``S ← e^{M_r − M}·S_r`` and, for
    ``W`` (relative to both shifts), ``W ← e^{M_r − M}·(W_r + (Δsh_other − Δsh_own)·S_r)``.
    A rank with no finite value (``M_r = −inf``) has ``S_r = W_r = 0`` and contributes 0.
    Returns ``(M_a, log S_a, M_b, log S_b, S_a, S_b, W_f, W_r, a_label)`` per row: the global
    shifts ``M`` (0 on a dead row, whose ``log S`` is −inf), so ``A = M_a + log S_a``; the W a
    loss does not use are 0.
    """
    m_a, s_a, m_b, s_b, w, a_y, w2 = stats.unbind(-1)
    ninf = float("-inf")
    gm_a, gm_b = m_a.max(dim=0).values, m_b.max(dim=0).values
    sh = lambda m: torch.where(m == ninf, torch.zeros_like(m), m)  # noqa: E731
    gsh_a, gsh_b, sh_a, sh_b = sh(gm_a), sh(gm_b), sh(m_a), sh(m_b)
    f_a, f_b = torch.exp(m_a - gsh_a), torch.exp(m_b - gsh_b)  # 0 for empty ranks
    S_a, S_b = (f_a * s_a).sum(0), (f_b * s_b).sum(0)

    def moved(f, w_rank, own_shift, own_global, other_shift, other_global, s_rank):
        part = f * (w_rank + ((other_global - other_shift) - (own_global - own_shift)) * s_rank)
        return torch.where(f > 0, part, torch.zeros_like(part)).sum(0)  # an underflowed rank adds 0, not 0·inf

    zero = torch.zeros_like(S_a)
    w_f = moved(f_b, w, sh_b, gsh_b, sh_a, gsh_a, s_b) if loss in (_FKL, _AKL) else zero
    w_r = moved(f_a, w if loss == _RKL else w2, sh_a, gsh_a, sh_b, gsh_b, s_a) if loss in (_RKL, _AKL) else zero
    return gsh_a, torch.log(S_a), gsh_b, torch.log(S_b), S_a, S_b, w_f, w_r, a_y.sum(0)


def _akl_head_threshold(teacher: torch.Tensor, sh_b: torch.Tensor, ls_b: torch.Tensor, t: float, mu: float,
                        group) -> torch.Tensor:
    """AKL's head as a threshold on the teacher's raw logits: head = {u ≥ u*} per row.

    The head (:meth:`~nemo_kd.kernels.buckets.BucketSpace.head_mask`, whose rule this
    implements) is every token whose probability is at least that of the token whose
    cumulative mass reaches μ; ``p`` is monotone in ``u`` (t > 0), so that token is read off
    the global top-``AKL_TOPK`` logits (vocab-parallel): ``u*`` is the value at the first
    position where the top-k's cumulative mass (float64, as the bisection's) reaches μ, and
    ``u ≥ u*`` takes in every token tied with it, wherever a top-k would have cut the tie. Rows
    whose top-k mass stays below μ (the head may go on: very flat teachers) take the bisection
    on ``p`` over the whole row (an fp32 copy of those rows only), turned back into the
    smallest logit of the head. Thresholds are stored logits, so the kernel's comparison is
    exact. ``sh_b``/``ls_b``: the teacher's global shift and ``log S`` (+inf on dead rows).
    """
    n, v_local = teacher.shape
    k = min(AKL_TOPK, v_local * tp_world_size(group))
    # Values only (ties do not matter for a threshold): each shard's top-k in the teacher's dtype,
    # then the top-k of the k·TP candidates; raw logits as fp32, descending.
    local = teacher.topk(min(k, v_local), dim=-1).values.float()
    vals = all_gather_vocab(local, group).topk(k, dim=-1).values
    p_top = torch.exp((vals * t - sh_b[:, None]) - ls_b[:, None])
    before = (torch.cumsum(p_top.double(), dim=-1) < mu).sum(-1)  # top-k tokens before the one reaching μ
    thr = vals.gather(-1, before.clamp(max=k - 1)[:, None])[:, 0]
    open_rows = torch.nonzero(before >= k).flatten()
    if tp_world_size(group) > 1:  # every rank takes part in the bisection's all-reduces for the same rows
        flag = torch.zeros(n, dtype=torch.int32, device=teacher.device)
        flag[open_rows] = 1
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        open_rows = torch.nonzero(flag).flatten()
    space = BucketSpace.sharded(group if tp_world_size(group) > 1 else None)
    for c in range(0, open_rows.numel(), AKL_BISECTION_ROWS):  # fp32 scratch bounded to a few rows
        rows = open_rows[c:c + AKL_BISECTION_ROWS]
        u = teacher[rows].float()
        p_rows = torch.exp((u * t - sh_b[rows, None]) - ls_b[rows, None])
        in_head = space.head_mask(p_rows, mu)
        u_min = torch.where(in_head, u, torch.full_like(u, float("inf"))).min(dim=-1).values
        if tp_world_size(group) > 1:
            dist.all_reduce(u_min, op=dist.ReduceOp.MIN, group=group)
        thr[rows] = u_min
    return thr


class FusedFullKD(torch.autograd.Function):
    """Autograd wrapper: forward returns ``(kd [N], label_logprob [N])`` fp32, replicated on TP ranks.

    The TP collectives are statistics (no autograd); each rank's backward writes the
    gradient of its own shard from the replicated upstream gradient (Megatron's
    ``reduce_from_tensor_model_parallel_region`` contract, as the torch path).
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, loss, s, t, beta, group, inplace):
        n, v_local = student.shape
        dev = student.device
        tp = tp_world_size(group)
        vocab_start = tp_rank(group) * v_local
        has_label = labels is not None
        label_arg = labels if has_label else torch.zeros(1, dtype=torch.int64, device=dev)
        stats = torch.empty(n, _NSTAT, dtype=torch.float32, device=dev)
        if n > 0:
            _stats_kernel[(n,)](
                student, teacher, label_arg, stats,
                v_local, student.stride(0), teacher.stride(0), stats.stride(0), vocab_start, s, t,
                LOSS=loss, HAS_LABEL=has_label, BLOCK_V=FWD_BLOCK_V, num_warps=FWD_NUM_WARPS,
            )
        if tp > 1:
            gathered = [torch.empty_like(stats) for _ in range(tp)]
            dist.all_gather(gathered, stats, group=group)
            stats = torch.stack(gathered)
        else:
            stats = stats[None]
        sh_a, ls_a, sh_b, ls_b, S_a, S_b, w_f, w_r, a_y = _combine(stats, loss)
        alive_a, alive_b = torch.isfinite(ls_a), torch.isfinite(ls_b)
        row_ok = alive_a & alive_b
        zero = torch.zeros_like(ls_a)
        inf = torch.full_like(ls_a, float("inf"))
        # Backward / second pass: log S = +inf on dead rows makes q (resp. p) exactly 0 there.
        ls_a_k = torch.where(alive_a, ls_a, inf)
        ls_b_k = torch.where(alive_b, ls_b, inf)
        fkl = w_f / S_b - torch.log(S_b) + torch.log(S_a)
        rkl = w_r / S_a - torch.log(S_a) + torch.log(S_b)
        stat = zero
        if loss == _FKL:
            kd = fkl
        elif loss == _RKL:
            kd = rkl
        if loss >= _JSD:  # the second pass (mixture losses, AKL's gaps), one [N, 2] all-reduce
            # AKL: its head threshold; μ rides in the β slot, and its m (β = 0) is unused.
            thr = _akl_head_threshold(teacher, sh_b, ls_b_k, t, beta, group) if loss == _AKL else zero
            part = torch.zeros(n, 2, dtype=torch.float32, device=dev)
            if n > 0:
                _second_pass_kernel[(n,)](
                    student, teacher, sh_a, ls_a_k, sh_b, ls_b_k, thr.contiguous(), part,
                    v_local, student.stride(0), teacher.stride(0), s, t, 0.0 if loss == _AKL else beta,
                    LOSS=loss, BLOCK_V=FWD_BLOCK_V, num_warps=FWD_NUM_WARPS,
                )
            if tp > 1:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        if loss == _AKL:
            g_head, g_total = part.unbind(-1)
            w_h = torch.where(g_total > 0, g_head / torch.where(g_total > 0, g_total, torch.ones_like(g_total)),
                              torch.full_like(g_total, 0.5))
            # A zero weight must not turn an infinite KL into NaN (as the torch path).
            kd = torch.where(w_h > 0, w_h * fkl, zero) + torch.where(w_h < 1, (1 - w_h) * rkl, zero)
            stat = w_h
            beta = 0.0
            rkl = torch.where(w_h < 1, rkl, zero)
        elif loss >= _JSD:
            kd = part[:, 0]
            stat = part[:, 1]
        kd = torch.where(row_ok, kd, zero)
        label_lp = torch.where(alive_a, (a_y - sh_a) - ls_a, zero)
        r = torch.stack([rkl if loss == _AKL else kd, stat], dim=1)
        if has_label:
            local = labels - vocab_start
            label_local = torch.where((local >= 0) & (local < v_local), local, torch.full_like(local, -1))
        else:
            label_local = torch.full((n,), -1, dtype=torch.int64, device=dev)
        ctx.save_for_backward(student, teacher, sh_a, ls_a_k, sh_b, ls_b_k, r, row_ok, alive_a, label_local)
        ctx.cfg = (loss, s, t, beta, inplace)
        return kd, label_lp

    @staticmethod
    def backward(ctx, g_kd, g_lp):
        student, teacher, sh_a, ls_a, sh_b, ls_b, r, row_ok, alive_a, label_local = ctx.saved_tensors
        loss, s, t, beta, inplace = ctx.cfg
        n, v_local = student.shape
        zeros = torch.zeros(n, dtype=torch.float32, device=student.device)
        g_kd = zeros if g_kd is None else torch.where(row_ok, g_kd.float(), zeros).contiguous()
        g_y = zeros if g_lp is None else torch.where(alive_a, g_lp.float(), zeros).contiguous()
        if inplace:
            grad = student.detach()  # same storage: the caller promised the logits are dead
            # Triton's stores bypass autograd's version counter: bump it by hand (see logprobs_triton).
            torch.autograd.graph.increment_version(grad)
        else:
            grad = torch.empty((n, v_local), dtype=student.dtype, device=student.device)
        if n > 0 and v_local > 0:
            _bwd_kernel[(n, triton.cdiv(v_local, BWD_BLOCK_V))](
                student, teacher, grad, sh_a, ls_a, sh_b, ls_b, g_kd, r.contiguous(), g_y, label_local,
                v_local, student.stride(0), teacher.stride(0), grad.stride(0), s, t, beta,
                LOSS=loss, BLOCK_V=BWD_BLOCK_V, EMULATE_RTNE_BF16=grad.dtype == torch.bfloat16 and is_interpreted(),
                num_warps=BWD_NUM_WARPS,
            )
        return grad, None, None, None, None, None, None, None, None


# loss_type -> (kernel code, β of the mixture m = β·p + (1−β)·q as a function of (jsd_beta, skew_alpha))
_MIXTURES = {
    "jsd": (_JSD, lambda jsd_beta, alpha: jsd_beta),
    "skew_fkl": (_SKEW_FKL, lambda jsd_beta, alpha: alpha),  # KL(p ‖ α·p + (1−α)·q)
    "skew_rkl": (_SKEW_RKL, lambda jsd_beta, alpha: 1.0 - alpha),  # KL(q ‖ (1−α)·p + α·q)
}


def fused_full_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    settings: KDSettings,
    *,
    group: Optional[dist.ProcessGroup] = None,
    label_ids: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Per-token full-vocab divergence ``[N]`` fp32 and, with ``label_ids``, ``s·z_y − LSE(s·z)`` ``[N]``.

    Args:
        student_logits / teacher_logits: ``[N, V/TP]`` this rank's shards (same sharding),
            fp32/bf16/fp16; the teacher is never differentiated.
        settings: the loss (:class:`~nemo_kd.kernels.kd_settings.KDSettings`): ``loss_type``
            ``forward_kl``, ``reverse_kl``, ``jsd`` (β = ``jsd_beta``), ``skew_fkl`` / ``skew_rkl``
            (α = ``skew_alpha``) or ``akl`` (μ = ``akl_mu``), ``p`` = teacher; the inverse
            temperatures ``s`` / ``t``; ``T²`` (applied to the KD value, not to the label
            log-prob); ``topk_convention`` / ``tail_floor`` do not apply.
        group: the TP process group (``None``: one rank).
        label_ids: optional ``[N]`` global ids: also return the student's log-prob at
            them at scale ``s``, from the same passes (the CE at temperature 1 when s = 1).
        inplace_backward: write the gradient over ``student_logits`` (which must then not
            be used after this backward; the version counter is bumped, so an autograd node
            that saved them and runs later fails loudly).

    No masking by the loss mask here: :func:`nemo_kd.losses.kd.full_kd_loss` is the public entry
    point (``impl="fused"``).
    """
    settings = check_settings(settings)
    loss_type = settings.loss_type
    check_fused_supported(student_logits)
    check_fused_supported(teacher_logits)
    if loss_type not in FUSED_FULL_LOSS_TYPES:
        raise ValueError(f"the fused full-vocab kernel supports loss_type in {FUSED_FULL_LOSS_TYPES}, got "
                         f"{loss_type!r} (use impl='torch')")
    if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits "
                         "must both be [tokens, vocab_shard]")
    kind, beta = {"forward_kl": _FKL, "reverse_kl": _RKL, "akl": _AKL}.get(loss_type), 0.0
    if kind == _AKL:
        beta = float(settings.akl_mu)  # carried in the β slot: AKL has no mixture
    elif kind is None:
        kind, mix = _MIXTURES[loss_type]
        beta = float(mix(settings.jsd_beta, settings.skew_alpha))
    # End points that are exactly FKL / RKL (JSD's by TRL's convention; skew at α = 0).
    if kind == _JSD and beta in (0.0, 1.0):
        kind = _FKL if beta == 0.0 else _RKL
    elif (kind, beta) in ((_SKEW_FKL, 0.0), (_SKEW_RKL, 1.0)):
        kind = _FKL if kind == _SKEW_FKL else _RKL
    if student_logits.stride(-1) != 1:
        if inplace_backward:
            raise ValueError("inplace_backward=True needs student logits with unit column stride")
        student_logits = student_logits.contiguous()
    teacher = teacher_logits.detach()
    teacher = teacher if teacher.stride(-1) == 1 else teacher.contiguous()
    labels = None
    if label_ids is not None:
        labels = label_ids.reshape(-1).to(device=student_logits.device, dtype=torch.int64).contiguous()
        if labels.shape[0] != student_logits.shape[0]:
            raise ValueError(f"label_ids has {labels.shape[0]} entries, logits {student_logits.shape[0]} rows")
    kd, label_lp = FusedFullKD.apply(student_logits, teacher, labels, kind, float(settings.logits_scale),
                                     float(settings.target_logits_scale), beta, group, bool(inplace_backward))
    return kd * settings.temperature_factor, (label_lp if labels is not None else None)
