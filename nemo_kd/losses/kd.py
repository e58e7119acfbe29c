"""Token-level knowledge-distillation losses over vocab-parallel student logits.

The student's logits arrive as Megatron's output layer produces them: this TP rank's
vocabulary shard ``[N, V/TP]`` (``N`` flattened tokens, rank ``r`` owning global ids
``[r·V/TP, (r+1)·V/TP)``), any float dtype; everything is accumulated in fp32 (fp64
for fp64 logits) and nothing gathers the full vocabulary on one rank.

* :func:`topk_kd_loss` – against a stored (offline) teacher: its top-k logits and
  global ids per token, in one of two conventions (``topk_convention``):

  - ``"renormalized"`` (NeMo-Aligner): teacher ``p̃ = softmax`` over its k stored
    logits; student ``q̃ = softmax`` of its own logits restricted to the same k ids
    (``log q̃_i = s·z_i − LSE_j(s·z_j)`` over the k ids only). Needs only the
    student's logits gathered at the ids (one ``[N, k]`` all-reduce), no pass over
    the vocabulary.
  - ``"exact_tail"`` (TRL's ``_add_tail_bucket``, DistillKit): exact teacher
    log-probs ``log p_i = t·z_i − LSE_T`` (``teacher_lse``: the teacher's
    log-sum-exp of its *scaled* logits ``t·z`` over the full vocabulary) plus one
    tail bucket ``p_tail = 1 − Σ_i p_i``; the student's exact log-probs at the ids
    (:func:`~nemo_kd.losses.vocab_parallel.vocab_parallel_logprobs_at`) plus
    ``q_tail = 1 − Σ_i q_i``; the divergence is taken over these k+1 buckets,
    which partition the vocabulary, so it lower-bounds the full-vocab one.
    With ``teacher_log_tail`` (the store's ``log Σ_{v ∉ top-k} p_v``, summed directly over
    the full vocabulary at extraction) the teacher's buckets are exact instead:
    ``p_tail = exp(log_tail)`` and ``log p_i = z_i − LSE*`` with
    ``LSE* = LSE_k(z) − log(−expm1(log_tail))``, the log-sum-exp the stored top-k and tail
    imply (the head holds exactly ``1 − p_tail``). Neither the ``1 − Σ p`` cancellation nor
    the stored fp32 LSE (half an ulp, ~1e-6 at |LSE| ~ 20, shifting every ``log p_i``) enters;
    both were the limit on peaked teachers (``benchmarks/bench_tail_precision.py``).

* :func:`full_kd_loss` – against an online teacher whose logits are a vocab shard
  with the same sharding: full-vocabulary divergences.

Both return per-token values ``[N]`` (unreduced: masking and normalisation happen
elsewhere) and take the loss as one :class:`~nemo_kd.kernels.kd_settings.KDSettings`
(re-exported here): every divergence of :mod:`nemo_kd.losses.divergences` (``loss_type``:
``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_fkl``, ``skew_rkl``, ``akl``, with its
``jsd_beta`` / ``skew_alpha`` / ``akl_mu``), the top-k ``topk_convention`` / ``tail_floor``,
and the temperatures; how to run it (``impl``, ``inplace_backward``) and per-call data stay
keywords (:mod:`nemo_kd.kernels.kd_settings` says why).

Temperature. ``logits_scale`` (student) and ``target_logits_scale`` (teacher) are
inverse temperatures multiplied into the logits before the loss (NeMo-Aligner's
names). ``temperature_squared=True`` multiplies the divergence by ``T² =
1/logits_scale²`` (Hinton et al., arXiv 1503.02531, keeping gradient magnitudes
comparable across temperatures); off by default, as in NeMo-Aligner / ModelOpt.

Empty data. A teacher logit of −inf (an empty top-k slot, a padded vocabulary
column) is a zero-probability bucket: in top-k losses the slot is dropped on both
sides (its student mass goes to the student's tail under ``exact_tail``). A row
with no finite teacher logit (or a non-finite ``teacher_lse``) yields exactly 0 with
zero gradient, so masked or padded rows stay finite.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from nemo_kd.kernels.buckets import BucketSpace
from nemo_kd.kernels.kd_settings import (  # noqa: F401  (re-exported: the settings of this module's losses)
    DEFAULT_TAIL_FLOOR,
    LOSS_TYPES,
    TOPK_CONVENTIONS,
    KDSettings,
    check_settings,
)
from nemo_kd.losses.divergences import divergence
from nemo_kd.losses.full_vocab import chunked_full_kd_loss
from nemo_kd.losses.vocab_parallel import (
    ProcessGroup,
    accumulation_dtype,
    all_reduce_no_grad,
    all_reduce_sum,
    resolve_impl,
    tp_world_size,
    vocab_parallel_logprobs_at,
    vocab_shard_range,
)

def _check_student(student_logits: torch.Tensor) -> None:
    if student_logits.dim() != 2:
        raise ValueError(f"student_logits must be [tokens, vocab_shard], got {tuple(student_logits.shape)}")


class _GatherInplaceBackward(torch.autograd.Function):
    """``logits.gather(-1, index)`` whose backward writes its (sparse) gradient over the logits.

    ``torch.gather``'s backward is ``zeros_like(logits).scatter_add_(-1, index, grad)``: a
    dense ``[N, V/TP]`` buffer for k values per row. This one zeroes the logits' own storage
    and scatters into it (same values, same bits); ``zero_`` through the detached alias
    bumps the shared version counter, so a later reader of the logits fails loudly.
    The logits are saved only as the destination (their values are never read in backward).
    """

    @staticmethod
    def forward(ctx, logits, index):
        ctx.save_for_backward(logits, index)
        return logits.gather(-1, index)

    @staticmethod
    def backward(ctx, grad):
        logits, index = ctx.saved_tensors
        out = logits.detach()
        out.zero_()
        return out.scatter_add_(-1, index, grad.to(out.dtype)), None


def _gather_scaled_logits(logits: torch.Tensor, ids: torch.Tensor, scale: float, group: ProcessGroup,
                          inplace_backward: bool = False) -> torch.Tensor:
    """``scale·z`` at global ``ids`` ``[N, k]`` from the vocab shards (differentiable).

    Each rank gathers the ids it owns in the logits' own dtype (no fp32 copy of the
    shard), the partials are summed over TP (identity backward), and the gradient
    lands only in the owner's shard (in the logits' own storage with ``inplace_backward``).
    """
    acc = accumulation_dtype(logits.dtype)
    v_local = logits.shape[-1]
    local = ids - vocab_shard_range(v_local, group)[0]
    owned = (local >= 0) & (local < v_local)
    index = local.clamp(0, v_local - 1)
    picked = _GatherInplaceBackward.apply(logits, index) if inplace_backward else torch.gather(logits, -1, index)
    picked = picked.to(acc)
    picked = all_reduce_sum(torch.where(owned, picked, torch.zeros_like(picked)), group)
    return picked * scale if scale != 1.0 else picked


def _with_tail_bucket(log_probs_k: torch.Tensor, tail_floor: float,
                      log_tail: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Append ``log max(1 − Σ_k exp(log_probs_k), tail_floor)`` as bucket k+1, ``[N, k+1]``
    (``log_tail`` ``[N]`` given: ``max(log_tail, log tail_floor)``, the stored tail, instead).

    ``1 − Σ_k`` cancels: on a peaked distribution the tail is many orders below the mass,
    so it is formed in float64 (the k terms are few), where the sum's rounding (~1e-16)
    is far below the inputs' own; an fp32 ``logsumexp`` then ``log1mexp`` loses ~1e-7 of
    the *mass*, i.e. ~1e-7/tail of the tail (121% on ×20-peaked teachers). Clamped
    (value and zero gradient) at ``tail_floor``; the result keeps the input's dtype.
    """
    if log_tail is not None:
        tail = log_tail.to(torch.float64).clamp(min=math.log(tail_floor)).to(log_probs_k.dtype)
        return torch.cat([log_probs_k, tail[:, None]], dim=-1)
    mass = torch.exp(log_probs_k.to(torch.float64)).sum(dim=-1)
    tail = torch.log((1.0 - mass).clamp(min=tail_floor)).to(log_probs_k.dtype)
    return torch.cat([log_probs_k, tail[:, None]], dim=-1)


def _check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        raise ValueError(f"teacher_topk_ids has ids outside [0, {vocab_size}) (global vocabulary) in non-empty slots")


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    settings: KDSettings,
    *,
    teacher_lse: Optional[torch.Tensor] = None,
    teacher_log_tail: Optional[torch.Tensor] = None,
    group: ProcessGroup = None,
    impl: str = "torch",
    label_ids: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
):
    """Per-token KD divergence ``[N]`` against a teacher's stored top-k logits.

    Args:
        student_logits: ``[N, V/TP]`` this rank's vocabulary shard, any float dtype.
        teacher_topk_logits: ``[N, k]`` the teacher's raw (unscaled) logits at its
            top-k ids; −inf marks an empty slot. Never differentiated.
        teacher_topk_ids: ``[N, k]`` global vocabulary ids (on any rank's shard).
        settings: the loss (:class:`~nemo_kd.kernels.kd_settings.KDSettings`): divergence
            (``p`` = teacher), ``topk_convention`` (module docstring), ``tail_floor``
            (``exact_tail``: both tails are ``max(1 − Σ_k, tail_floor)``), temperatures, ``T²``.
        teacher_lse: ``[N]`` ``LSE_v(target_logits_scale · z_v)`` over the teacher's
            full vocabulary; required by ``exact_tail``, ignored by ``renormalized``.
        group: the TP process group (``None``: single rank).
        impl: log-prob primitive implementation forwarded to
            ``vocab_parallel_logprobs_at`` (``"torch"`` default, ``"fused"`` Triton,
            ``"auto"``: fused on CUDA when Triton imports).
        label_ids: optional ``[N]`` global ids (the SFT labels). When given, also
            return the student's log-prob ``log q(label)`` at temperature 1, taken from
            the *same* pass over the vocabulary as the KD term when ``logits_scale``
            is 1 (ids = top-k ∪ label: one forward and one backward pass over the
            logits for KD + CE together), else from a second pass at scale 1.
        inplace_backward: write ``∂/∂student_logits`` over the logits' own storage
            (:func:`~nemo_kd.losses.vocab_parallel.logits_overwrite_blocker`). Only
            when a single autograd node reads the logits: refused (ValueError) with
            ``label_ids`` at ``logits_scale != 1``, where KD and the label are two passes.
        teacher_log_tail: ``exact_tail`` only (ignored by ``renormalized``): ``[N]`` the teacher's
            ``log Σ_{v ∉ top-k} p_v`` at temperature 1 (the store's ``teacher_log_tail``); its
            buckets are then exact (module docstring) and ``teacher_lse`` is not read. Refused
            with ``target_logits_scale != 1`` (the tail at another temperature is another sum).

    Returns:
        ``[N]`` fp32 (fp64 for fp64 logits) per-token divergence, replicated on the TP
        ranks; exactly 0 on rows with no finite teacher logit. With ``label_ids``:
        ``(divergence [N], label_logprobs [N])``.
    """
    settings = check_settings(settings)
    _check_student(student_logits)
    topk_convention, logits_scale = settings.topk_convention, settings.logits_scale
    target_logits_scale, tail_floor = settings.target_logits_scale, settings.tail_floor
    n = student_logits.shape[0]
    if teacher_topk_logits.shape != teacher_topk_ids.shape or teacher_topk_logits.dim() != 2 \
            or teacher_topk_logits.shape[0] != n:
        raise ValueError(f"teacher_topk_logits {tuple(teacher_topk_logits.shape)} and teacher_topk_ids "
                         f"{tuple(teacher_topk_ids.shape)} must both be [N={n}, k]")
    acc = accumulation_dtype(student_logits.dtype)
    # The teacher side is [N, k]: computed in float64 (t·z_i − LSE_T is then exact in the stored
    # values, and 1 − Σ p_i loses nothing more), then cast to acc.
    teacher_dtype = torch.float64

    with torch.no_grad():
        z_t = teacher_topk_logits.detach().to(teacher_dtype) * target_logits_scale
        slot = torch.isfinite(z_t)
        row_ok = slot.any(dim=-1)
        lse_t = log_tail_t = None
        if topk_convention == "exact_tail" and teacher_log_tail is not None:
            if target_logits_scale != 1.0:
                raise ValueError("teacher_log_tail is the teacher's tail mass at temperature 1; exact_tail at "
                                 f"target_logits_scale={target_logits_scale} would need it at that temperature")
            if teacher_log_tail.shape != (n,):
                raise ValueError(f"teacher_log_tail must be [N={n}], got {tuple(teacher_log_tail.shape)}")
            log_tail_t = teacher_log_tail.detach().to(teacher_dtype)
            # The LSE the stored top-k and tail imply: the head holds 1 − tail = −expm1(log_tail) (no cancellation).
            lse_t = torch.logsumexp(torch.where(slot, z_t, torch.full_like(z_t, float("-inf"))), dim=-1) - \
                torch.log(-torch.expm1(log_tail_t))
            row_ok &= torch.isfinite(lse_t) & ~torch.isnan(log_tail_t)
            lse_t = torch.where(row_ok, lse_t, torch.zeros_like(lse_t))
            log_tail_t = torch.where(row_ok, log_tail_t, torch.zeros_like(log_tail_t) - 1.0)
        elif topk_convention == "exact_tail":
            if teacher_lse is None:
                raise ValueError("topk_convention='exact_tail' needs teacher_lse: the log-sum-exp of the teacher's "
                                 "target_logits_scale-scaled logits over its full vocabulary, [N]")
            if teacher_lse.shape != (n,):
                raise ValueError(f"teacher_lse must be [N={n}], got {tuple(teacher_lse.shape)}")
            lse_t = teacher_lse.detach().to(teacher_dtype)
            row_ok &= torch.isfinite(lse_t)
            lse_t = torch.where(row_ok, lse_t, torch.zeros_like(lse_t))
        # Rows without teacher information get a finite stand-in (all slots, logits 0, id 0); zeroed at the end.
        slot = torch.where(row_ok[:, None], slot, torch.ones_like(slot))
        z_t = torch.where(slot & torch.isfinite(z_t), z_t, torch.zeros_like(z_t))
        z_t = torch.where(slot, z_t, torch.full_like(z_t, float("-inf")))
        ids = torch.where(slot & row_ok[:, None], teacher_topk_ids.long(), torch.zeros_like(teacher_topk_ids.long()))
        _check_ids(ids, student_logits.shape[-1] * tp_world_size(group))

    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=student_logits.device)
    k = ids.shape[1]
    label_lp = None
    share_pass = label_ids is not None and logits_scale == 1.0
    if inplace_backward and label_ids is not None and not share_pass:
        raise ValueError("inplace_backward needs one pass over the logits, but KD at logits_scale != 1 and the "
                         "label log-prob at temperature 1 are two (two nodes would each own the gradient buffer)")
    inplace = dict(inplace_backward=inplace_backward)  # exactly one of the calls below runs with it
    if share_pass:
        # One vocab pass for KD and CE: log-probs at [top-k ids | label].
        lp_all, _ = vocab_parallel_logprobs_at(student_logits, torch.cat([ids, label_ids.long()[:, None]], dim=1),
                                               group=group, impl=impl, **inplace)
        logq_at, label_lp = lp_all[:, :k], lp_all[:, k]
    elif label_ids is not None:
        label_lp, _ = vocab_parallel_logprobs_at(student_logits, label_ids.long(), group=group, impl=impl)
    if topk_convention == "renormalized":
        log_p = torch.log_softmax(z_t, dim=-1).to(acc)
        # The LSE cancels in the renormalisation: gathered logits suffice (no vocab pass).
        s = logq_at if share_pass else _gather_scaled_logits(student_logits, ids, logits_scale, group, **inplace)
        s = torch.where(slot, s, neg_inf)
        # torch.log_softmax is (s − max) − log Σ exp(s − max): no rounding at ulp(|s|) for |s| ~ 1e4.
        log_q = torch.log_softmax(s, dim=-1)
    else:
        log_p = _with_tail_bucket(z_t - lse_t[:, None], tail_floor, log_tail_t).to(acc)
        if not share_pass:
            logq_at, _ = vocab_parallel_logprobs_at(student_logits, ids, scale=logits_scale, group=group, impl=impl,
                                                    **inplace)
        log_q = _with_tail_bucket(torch.where(slot, logq_at, neg_inf), tail_floor)

    loss = divergence(settings.loss_type, log_p, log_q, BucketSpace.replicated(),
                      jsd_beta=settings.jsd_beta, skew_alpha=settings.skew_alpha, akl_mu=settings.akl_mu)
    loss = loss * settings.temperature_factor
    loss = torch.where(row_ok, loss, torch.zeros_like(loss))
    return (loss, label_lp) if label_ids is not None else loss


def full_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    settings: KDSettings,
    *,
    group: ProcessGroup = None,
    impl: str = "torch",
    label_ids: Optional[torch.Tensor] = None,
    inplace_backward: bool = False,
):
    """Per-token full-vocabulary KD divergence ``[N]`` against an online teacher.

    ``teacher_logits`` is the teacher's vocab shard ``[N, V/TP]`` with the student's
    sharding (same TP group, same vocabulary); it is detached (no gradient reaches it).
    The divergences are those of :mod:`nemo_kd.losses.divergences` over the TP-sharded
    vocabulary, no gather. −inf teacher columns (padded vocabulary) contribute
    exactly 0 to ``p·log(p/·)`` terms; reverse KL is ``+inf`` there unless the
    student's column is −inf too (see :mod:`nemo_kd.losses.divergences`). Rows
    whose teacher logits are all −inf give exactly 0 (as do rows whose student logits
    are all −inf, on both paths). ``settings``: the loss (its ``topk_convention`` and
    ``tail_floor`` do not apply: there is no top-k); other arguments as in :func:`topk_kd_loss`.

    ``impl``: ``"torch"`` (:func:`~nemo_kd.losses.full_vocab.chunked_full_kd_loss`: row
    chunks with closed-form gradients, the gradient itself the only thing kept for backward;
    :func:`~nemo_kd.losses.full_vocab.reference_full_kd_loss` is the autograd reference it is
    tested against), ``"fused"`` (the Triton kernels of
    :mod:`nemo_kd.kernels.full_kd_triton`: one pass over both shards forward (two for
    the mixtures and AKL), one backward, no fp32 ``[N, V]`` tensor; every divergence) or
    ``"auto"`` (:func:`~nemo_kd.losses.vocab_parallel.resolve_impl`: fused for CUDA logits
    when Triton imports, the chunked torch path elsewhere). ``label_ids`` ``[N]``: also return the student's ``log q(label)`` at
    temperature 1, as :func:`topk_kd_loss` does (from the fused kernel's own passes
    when ``logits_scale`` is 1), i.e. ``(divergence, label_logprobs)``.

    ``inplace_backward``: the fused kernel writes ``∂/∂student_logits`` over the logits
    (:func:`~nemo_kd.losses.vocab_parallel.logits_overwrite_blocker`). Refused
    (ValueError) on the torch path, which allocates its gradient buffer in the forward while
    the logits are still live (nothing to save by overwriting them), and with ``label_ids``
    at ``logits_scale != 1`` (two passes).
    """
    settings = check_settings(settings)
    _check_student(student_logits)
    loss_type, logits_scale = settings.loss_type, settings.logits_scale
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits {tuple(teacher_logits.shape)} must match the student's shard "
                         f"{tuple(student_logits.shape)} (same vocabulary and TP sharding)")
    resolved_from_auto = impl == "auto"
    impl = resolve_impl(impl, student_logits)
    if impl == "fused":
        try:
            from nemo_kd.kernels.full_kd_triton import FUSED_FULL_LOSS_TYPES, fused_full_kd_loss
        except ImportError as e:  # keep the torch path usable without triton
            raise RuntimeError(f"impl='fused' needs triton, which failed to import: {e}") from e

        if loss_type in FUSED_FULL_LOSS_TYPES:
            share_pass = label_ids is not None and logits_scale == 1.0
            if inplace_backward and label_ids is not None and not share_pass:
                raise ValueError("inplace_backward needs one pass over the logits, but KD at logits_scale != 1 and "
                                 "the label log-prob at temperature 1 are two")
            loss, label_lp = fused_full_kd_loss(
                student_logits, teacher_logits, settings, group=group,
                label_ids=label_ids if share_pass else None, inplace_backward=inplace_backward)
            if label_ids is not None and not share_pass:
                label_lp, _ = vocab_parallel_logprobs_at(student_logits, label_ids.long(), group=group, impl="fused")
            return (loss, label_lp) if label_ids is not None else loss
        if resolved_from_auto:
            impl = "torch"
        else:
            raise ValueError(f"impl='fused' full-vocab KD supports loss_type in {FUSED_FULL_LOSS_TYPES}, got "
                             f"{loss_type!r}: use impl='torch' (or 'auto', which falls back to torch)")
    if inplace_backward:
        # The chunked torch path allocates its gradient buffer in the forward (the logits are still
        # live there), so it has no buffer to spare by writing over them.
        raise ValueError(f"inplace_backward needs the fused full-vocab kernel (impl='fused'); the torch path "
                         f"({loss_type!r}) keeps its own gradient buffer from the forward")
    loss = chunked_full_kd_loss(student_logits, teacher_logits, settings, group=group)
    if label_ids is None:
        return loss
    return loss, vocab_parallel_logprobs_at(student_logits, label_ids.long(), group=group, impl=impl)[0]


@torch.no_grad()
def vocab_parallel_argmax(logits: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Global argmax id ``[N]`` over the TP-sharded vocabulary (ties: the smallest id)."""
    v_local = logits.shape[-1]
    local_max, local_arg = logits.max(dim=-1)
    local_max = local_max.to(accumulation_dtype(logits.dtype))
    global_max = all_reduce_no_grad(local_max.clone(), dist.ReduceOp.MAX, group)
    candidate = local_arg + vocab_shard_range(v_local, group)[0]
    no_candidate = torch.full_like(candidate, v_local * tp_world_size(group))
    candidate = torch.where(local_max == global_max, candidate, no_candidate)
    return all_reduce_no_grad(candidate, dist.ReduceOp.MIN, group)


@torch.no_grad()
def token_agreement(
    student_logits: Optional[torch.Tensor],
    teacher: torch.Tensor,
    group: ProcessGroup = None,
    *,
    teacher_topk_logits: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    student_argmax: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fraction of tokens where the student's argmax equals the teacher's (for logging).

    ``teacher`` is either the teacher's top-k ids ``[N, k]`` / ``[N]`` (integer dtype;
    its top-1 is column 0, as ``torch.topk`` orders them, or the argmax of
    ``teacher_topk_logits`` when given) or the teacher's logits shard ``[N, V/TP]``
    (floating dtype; argmax vocab-parallel). ``mask`` ``[N]`` (optional) selects the
    tokens counted. ``student_argmax`` ``[N]``: the student's global argmax ids when already
    known (then ``student_logits`` is not read). Returns a 0-dim fp32 tensor, identical on
    all TP ranks.
    """
    student_top = student_argmax if student_argmax is not None else vocab_parallel_argmax(student_logits, group)
    if teacher.is_floating_point():
        teacher_top = vocab_parallel_argmax(teacher, group)
    elif teacher.dim() == 1:
        teacher_top = teacher
    elif teacher_topk_logits is not None:
        teacher_top = teacher.gather(-1, teacher_topk_logits.argmax(dim=-1, keepdim=True))[:, 0]
    else:
        teacher_top = teacher[:, 0]
    agree = (student_top == teacher_top.long()).float()
    if mask is None:
        return agree.mean()
    mask = mask.float()
    return (agree * mask).sum() / mask.sum().clamp(min=1.0)
