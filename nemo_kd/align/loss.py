r"""Cross-tokenizer KD loss over aligned token groups.

Inputs: the student's vocab-parallel logits (its own tokenisation and template),
the teacher's top-k logits/ids *in teacher-vocabulary ids* at the teacher's own
completion positions, the per-sample :class:`~nemo_kd.align.groups.AlignmentGroups`
and a :class:`~nemo_kd.align.vocab_map.VocabMap`. Groups are split into two kinds
(:func:`build_cross_tokenizer_batch`):

**Mapped one-to-one groups** – one student token ``s`` and one teacher token ``t``
covering the same bytes, with ``map(t) = s``. The teacher's next-token distribution
at ``t``'s position is carried into the student vocabulary through the map and
compared with the student's at ``s``'s position by the *existing* top-k loss
(:func:`nemo_kd.losses.kd.topk_kd_loss`, any ``loss_type``, either convention):

* teacher top-k slot ``i`` with id ``v_i`` becomes student id ``map(v_i)``; slots
  whose id has no student counterpart are **dropped** (logit −inf). Under
  ``topk_convention="exact_tail"`` a dropped slot's teacher mass therefore lands in
  the teacher's tail bucket ``p_tail = 1 − Σ_{i mapped} p_i`` (the unmapped mass is
  part of "everything else"), and the student's tail is ``q_tail = 1 − Σ_{i mapped}
  q_{map(v_i)}``: the k'+1 buckets still partition both vocabularies (teacher side:
  mapped ids ∪ rest; student side: their images ∪ rest), so this is the exact
  divergence between the two coarsened distributions. Under ``"renormalized"`` the
  teacher is renormalised over its mapped top-k and the student over the same
  student ids: ``p̃_i = exp(t·z_i)/Σ_{j mapped} exp(t·z_j)``, ``log q̃_i = s·y_{map(v_i)}
  − LSE_{j mapped}(s·y_{map(v_j)})``.
* at a template boundary the group may be one-to-one over the content while the two
  tokens differ by a separator one template owns (``▁i`` vs ``i``): the teacher's top-k
  is then carried by a *boundary map* (``b + x`` for every candidate ``x``, see
  :mod:`nemo_kd.align.vocab_map`), which the batch records per group (``o2o_table``);
* several teacher ids mapping to one student id (SentencePiece ``A`` and ``<0x41>``)
  are merged first: ``z_merged = LSE_i(t·z_i)/t`` so that ``p_merged = Σ_i p_i``.

**The end of the completion** – the tokens after the content on both sides (each
template's end of turn, e.g. ``▁ </s>`` vs ``<|im_end|>``) form one more group when the
whole content is aligned: a one-to-one mapped group when they map (same template: the
identity), else a chain group below comparing both models' probability that the answer
ends there.

**All other groups** (one-to-many, many-to-one, many-to-many, and one-to-one groups
whose tokens do not map to each other) – the *chain-rule group probability*. For a
group whose bytes are tokenised as ``s_1..s_a`` by the student and ``t_1..t_b`` by the
teacher (teacher-forced, each on its own prefix)::

    log Q_g = Σ_{i=1..a} log q(s_i | student prefix)      (differentiable)
    log P_g = Σ_{j=1..b} log p(t_j | teacher prefix)      (teacher_target_logprobs)

are the probabilities each model gives to producing exactly that byte string (in
its own tokenisation) next. They are compared as two-bucket distributions over the
event "the next bytes are the group's bytes" vs. "anything else"::

    P = (P_g, 1 − P_g),   Q = (Q_g, 1 − Q_g),   loss_g = D(P ‖ Q)

with the chosen divergence ``D`` (``forward_kl``: ``P_g log(P_g/Q_g) + (1−P_g)
log((1−P_g)/(1−Q_g))``, etc.), both ``1 − ·`` clamped below at ``tail_floor`` as in
``exact_tail``. This is the divergence between the models' Bernoulli marginals of a
common event, hence a lower bound (data processing) of the divergence between their
distributions over byte continuations *restricted to canonical tokenisations* – the
approximation is that each model's mass for the group's bytes is its mass on its
own tokenisation of them (non-canonical tokenisations are ignored). Temperatures
enter through the per-token log-softmaxes (``logits_scale`` / ``target_logits_scale``;
``teacher_target_logprobs`` must be at the teacher's scale).

Per-token output. The loss is returned per *student* row ``[N_s]``: a mapped
one-to-one group's value sits on its student row; a chain group's ``loss_g`` is
spread evenly over its ``a`` student rows (``loss_g / a`` each, so any sum over rows
counts it once); unaligned rows (template tokens, content past a truncation) are 0
and ``aligned_mask`` is False there. ``temperature_squared`` multiplies both parts.

Identity. With the same tokenizer and template every group is a mapped one-to-one
group with the identity map, and this reduces to one call of ``topk_kd_loss`` with
exactly the same per-row inputs: the loss equals the same-tokenizer loss bit for bit
on the aligned rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from nemo_kd.align.groups import B_END, S_END, S_START, T_END, T_START, AlignmentGroups
from nemo_kd.align.vocab_map import VocabMap
from nemo_kd.kernels.buckets import BucketSpace
from nemo_kd.losses.divergences import divergence
from nemo_kd.losses.kd import KDSettings, _with_tail_bucket, check_settings, topk_kd_loss
from nemo_kd.losses.token_stats import teacher_token_stats
from nemo_kd.losses.vocab_parallel import ProcessGroup, accumulation_dtype, vocab_parallel_logprobs_at


@dataclass
class CrossTokenizerBatch:
    """Index tensors of a batch's alignment (built by :func:`build_cross_tokenizer_batch`).

    Rows are row indices into the flattened student logits ``[N_s, ·]`` and teacher
    top-k tensors ``[N_t, ·]``.
    """

    o2o_student_rows: torch.Tensor  # [M] student rows of mapped one-to-one groups
    o2o_teacher_rows: torch.Tensor  # [M] their teacher rows
    o2o_table: torch.Tensor  # [M] VocabMap table carrying the group's top-k (0: plain, >0: boundary map)
    chain_student_rows: torch.Tensor  # [A] student rows of chain groups
    chain_student_targets: torch.Tensor  # [A] the student tokens at those rows (student vocab)
    chain_student_group: torch.Tensor  # [A] chain-group index of each
    chain_teacher_rows: torch.Tensor  # [B]
    chain_teacher_group: torch.Tensor  # [B]
    chain_group_sizes: torch.Tensor  # [G_c] student tokens per chain group
    num_student_tokens: int  # completion tokens of the student, aligned or not
    num_aligned_student_tokens: int
    num_one_to_one: int  # one-to-one groups, mapped or not
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def num_chain_groups(self) -> int:
        return int(self.chain_group_sizes.numel())

    def compute_stats(self) -> Dict[str, float]:
        d = max(self.num_student_tokens, 1)
        self.stats = {
            "fraction_one_to_one": self.num_one_to_one / d,
            "fraction_mapped_one_to_one": self.o2o_student_rows.numel() / d,
            "fraction_aligned": self.num_aligned_student_tokens / d,
            "chain_groups": float(self.num_chain_groups),
        }
        return self.stats

    def aligned_student_rows(self) -> torch.Tensor:
        """Student rows that carry KD signal (mapped one-to-one ∪ chain-group rows)."""
        return torch.cat([self.o2o_student_rows, self.chain_student_rows])

    # A microbatch is a dict of tensors (moved to the device by the engine): the index tensors
    # travel under ``xtok_<field>`` and the three counts as ``xtok_counts``.
    def to_tensors(self) -> Dict[str, torch.Tensor]:
        out = {f"xtok_{name}": getattr(self, name) for name in _INDEX_FIELDS}
        out["xtok_counts"] = torch.tensor([self.num_student_tokens, self.num_aligned_student_tokens,
                                           self.num_one_to_one], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, mb: Dict[str, torch.Tensor]) -> "CrossTokenizerBatch":
        n_tok, n_aligned, n_o2o = (int(x) for x in mb["xtok_counts"].tolist())
        batch = cls(**{name: mb[f"xtok_{name}"] for name in _INDEX_FIELDS}, num_student_tokens=n_tok,
                    num_aligned_student_tokens=n_aligned, num_one_to_one=n_o2o)
        batch.compute_stats()
        return batch


_INDEX_FIELDS = ("o2o_student_rows", "o2o_teacher_rows", "o2o_table", "chain_student_rows", "chain_student_targets",
                 "chain_student_group", "chain_teacher_rows", "chain_teacher_group", "chain_group_sizes")


def build_cross_tokenizer_batch(
    alignments: Sequence[AlignmentGroups],
    student_completion_ids: Sequence[Sequence[int]],
    teacher_completion_ids: Sequence[Sequence[int]],
    vocab_map: VocabMap,
    student_row_offsets: Sequence[int],
    teacher_row_offsets: Sequence[int],
    device=None,
) -> CrossTokenizerBatch:
    """Flatten per-sample alignments into the loss's index tensors.

    ``student_row_offsets[i]`` is the student logits row that predicts sample ``i``'s
    first completion token (completion token ``c`` is predicted at row ``offset + c``:
    the caller accounts for the next-token shift and packing); likewise
    ``teacher_row_offsets[i]`` for the teacher's rows (e.g. its first row in the
    store's per-token payload). ``*_completion_ids`` are each side's completion tokens.
    """
    tables = vocab_map.tables  # [n_tables, V_t]: the plain map first, then the boundary maps
    o2o_s, o2o_t, o2o_tab, cs_rows, cs_tgt, cs_grp, ct_rows, ct_grp, sizes = ([] for _ in range(9))
    n_groups = n_tok = n_aligned = n_o2o = 0
    for al, s_ids, t_ids, s_off, t_off in zip(alignments, student_completion_ids, teacher_completion_ids,
                                              student_row_offsets, teacher_row_offsets):
        a = al.array.astype(np.int64)
        s_ids = np.asarray(s_ids, dtype=np.int64)
        t_ids = np.asarray(t_ids, dtype=np.int64)
        n_tok += al.num_student_tokens
        n_aligned += al.num_aligned_student_tokens
        if not len(a):
            continue
        end = _end_of_completion_group(a, al, len(s_ids), len(t_ids))
        if end is not None:
            a = np.concatenate([a, end[None]], 0)
            n_aligned += int(end[S_END] - end[S_START])
        one = (a[:, S_END] - a[:, S_START] == 1) & (a[:, T_END] - a[:, T_START] == 1)
        n_o2o += int(one.sum())
        t_first = t_ids[a[:, T_START]]
        in_table = (t_first >= 0) & (t_first < tables.shape[1])
        # the first table (plain map first) that carries the teacher token to the student's, else -1
        hits = tables[:, np.where(in_table, t_first, 0)] == s_ids[a[:, S_START]][None]  # [n_tables, G]
        table = np.where(hits.any(0), hits.argmax(0), -1)
        mapped = one & in_table & (table >= 0)
        o2o_s.append(s_off + a[mapped, S_START])
        o2o_t.append(t_off + a[mapped, T_START])
        o2o_tab.append(table[mapped])
        ch = a[~mapped]
        if len(ch):
            ss, tt = ch[:, S_END] - ch[:, S_START], ch[:, T_END] - ch[:, T_START]
            gid = n_groups + np.arange(len(ch))
            s_tok = _expand(ch[:, S_START], ss)
            t_tok = _expand(ch[:, T_START], tt)
            cs_rows.append(s_off + s_tok)
            cs_tgt.append(s_ids[s_tok])
            cs_grp.append(np.repeat(gid, ss))
            ct_rows.append(t_off + t_tok)
            ct_grp.append(np.repeat(gid, tt))
            sizes.append(ss)
            n_groups += len(ch)

    def cat(xs):
        arr = np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)
        return torch.as_tensor(arr, dtype=torch.int64, device=device)

    batch = CrossTokenizerBatch(
        o2o_student_rows=cat(o2o_s), o2o_teacher_rows=cat(o2o_t), o2o_table=cat(o2o_tab),
        chain_student_rows=cat(cs_rows), chain_student_targets=cat(cs_tgt), chain_student_group=cat(cs_grp),
        chain_teacher_rows=cat(ct_rows), chain_teacher_group=cat(ct_grp), chain_group_sizes=cat(sizes),
        num_student_tokens=n_tok, num_aligned_student_tokens=n_aligned, num_one_to_one=n_o2o,
    )
    batch.compute_stats()
    return batch


def _end_of_completion_group(a: np.ndarray, al: AlignmentGroups, n_s: int, n_t: int) -> Optional[np.ndarray]:
    """The tokens after the content on both sides (each template's end of turn: ``▁ </s>`` vs
    ``<|im_end|>``) as one more group: both models' probability that the completion ends here.

    Only when the whole content is aligned (no truncation on either side) and both sides have
    tokens left. Without it a student never gets a KD signal for *stopping*, and on a
    verifiable task that also cost it the prompt↔answer alignment that the end-of-answer
    prediction teaches (measured in ``benchmarks/bench_cross_tokenizer_e2e.py``).
    """
    s_end, t_end = int(a[-1, S_END]), int(a[-1, T_END])
    if int(a[-1, B_END]) != al.content_bytes or s_end >= n_s or t_end >= n_t:
        return None
    return np.array([s_end, n_s, t_end, n_t, al.content_bytes, al.content_bytes], dtype=np.int64)


def _expand(starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``concat(arange(s, s + n) for s, n in zip(starts, sizes))``."""
    total = int(sizes.sum())
    return np.repeat(starts, sizes) + (np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes))


@dataclass
class CrossTokenizerKDOutput:
    per_token: torch.Tensor  # [N_s] loss per student row (module docstring), 0 where unaligned
    aligned_mask: torch.Tensor  # [N_s] bool, rows that carry KD signal
    metrics: Dict[str, torch.Tensor]  # detached scalars
    # The teacher's top-k carried into the student vocabulary at every student row (−inf / id 0 where
    # the row has no mapped one-to-one teacher row): for token agreement and inspection.
    mapped_topk_logits: Optional[torch.Tensor] = None  # [N_s, k]
    mapped_topk_ids: Optional[torch.Tensor] = None  # [N_s, k] student ids
    one_to_one_mask: Optional[torch.Tensor] = None  # [N_s] bool, rows of mapped one-to-one groups


def _merge_duplicate_ids(z: torch.Tensor, ids: torch.Tensor, scale: float):
    """Merge slots with equal ids per row: ``z = LSE(scale·z_i)/scale`` in the first, −inf elsewhere."""
    sid, order = torch.sort(ids, dim=-1)
    zs = torch.gather(z, -1, order)
    k = ids.shape[-1]
    new = torch.ones_like(sid, dtype=torch.bool)
    new[:, 1:] = sid[:, 1:] != sid[:, :-1]
    ar = torch.arange(k, device=ids.device).expand_as(sid)
    first = torch.cummax(torch.where(new, ar, torch.zeros_like(ar)), dim=-1).values
    sz = zs * scale
    m = torch.where(torch.isfinite(sz), sz, torch.full_like(sz, float("-inf"))).amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(sz - m)  # 0 at −inf slots
    summed = torch.zeros_like(e).scatter_add(-1, first, e)
    merged = torch.where(new & (summed > 0), (m + torch.log(summed)) / scale, torch.full_like(sz, float("-inf")))
    return merged, sid


def cross_tokenizer_kd_loss(
    student_logits: torch.Tensor,
    teacher_topk_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    batch: CrossTokenizerBatch,
    vocab_map: VocabMap,
    settings: KDSettings,
    *,
    teacher_lse: Optional[torch.Tensor] = None,
    teacher_target_logprobs: Optional[torch.Tensor] = None,
    group: ProcessGroup = None,
    impl: str = "torch",
) -> CrossTokenizerKDOutput:
    """Cross-tokenizer KD per student row (module docstring for the math).

    Args:
        student_logits: ``[N_s, V_s/TP]`` the student's vocab shard (TP-sharded as in
            :func:`~nemo_kd.losses.kd.topk_kd_loss`).
        teacher_topk_logits / teacher_topk_ids: ``[N_t, k]`` the teacher's raw top-k
            logits and *teacher-vocabulary* ids at its own rows (−inf: empty slot).
        batch: :func:`build_cross_tokenizer_batch` output.
        vocab_map: teacher → student ids.
        settings: the loss (:class:`~nemo_kd.kernels.kd_settings.KDSettings`), as for
            :func:`~nemo_kd.losses.kd.topk_kd_loss`; its ``tail_floor`` also bounds the chain
            groups' ``1 − P`` buckets.
        teacher_lse: ``[N_t]`` ``LSE(target_logits_scale·z)`` over the teacher's full
            vocabulary (needed by ``exact_tail``).
        teacher_target_logprobs: ``[N_t]`` ``log_softmax(target_logits_scale·z)`` at the
            teacher's realised completion token of each row; needed when the batch has
            chain groups.
        Remaining keywords: as :func:`~nemo_kd.losses.kd.topk_kd_loss`.
    """
    settings = check_settings(settings)
    logits_scale, target_logits_scale = settings.logits_scale, settings.target_logits_scale
    tail_floor = settings.tail_floor
    n_s = student_logits.shape[0]
    dev = student_logits.device
    acc = accumulation_dtype(student_logits.dtype)
    if teacher_topk_logits.shape != teacher_topk_ids.shape or teacher_topk_logits.dim() != 2:
        raise ValueError("teacher_topk_logits and teacher_topk_ids must both be [N_t, k]")
    k = teacher_topk_logits.shape[1]

    # ---- mapped one-to-one groups: the teacher's top-k carried to the student rows, existing top-k loss
    with torch.no_grad():
        t_rows = torch.full((n_s,), -1, dtype=torch.int64, device=dev)
        t_rows[batch.o2o_student_rows] = batch.o2o_teacher_rows
        table = torch.zeros(n_s, dtype=torch.int64, device=dev)
        table[batch.o2o_student_rows] = batch.o2o_table
        has = t_rows >= 0
        src = t_rows.clamp(min=0)
        tl = teacher_topk_logits.detach()[src]
        ti = teacher_topk_ids[src].long()
        mapped = vocab_map.map_ids(ti, table)
        ok = has[:, None] & (mapped >= 0) & torch.isfinite(tl)
        ml = torch.where(ok, tl, torch.full_like(tl, float("-inf")))
        mid = torch.where(ok, mapped, torch.zeros_like(mapped))
        if not vocab_map.injective and k > 1:
            ml, mid = _merge_duplicate_ids(ml.to(torch.promote_types(ml.dtype, torch.float32)), mid,
                                           target_logits_scale)
            mid = torch.where(torch.isfinite(ml), mid, torch.zeros_like(mid))
        lse_rows = None
        if teacher_lse is not None:
            lse_rows = torch.where(has, teacher_lse.detach()[src], torch.zeros_like(teacher_lse[src]))
    per_token = topk_kd_loss(student_logits, ml, mid, settings, teacher_lse=lse_rows, group=group, impl=impl)
    aligned = has.clone()

    # ---- chain groups: two-bucket divergence of the group's chain-rule probability
    g = batch.num_chain_groups
    chain_loss = torch.zeros(0, dtype=per_token.dtype, device=dev)
    if g:
        if teacher_target_logprobs is None:
            raise ValueError("the batch has non-one-to-one groups: teacher_target_logprobs ([N_t], the teacher's "
                             "log-prob of its realised token per row) is required")
        rows = batch.chain_student_rows
        if 2 * rows.numel() >= n_s:  # half the rows or more: one pass over all rows, no [A, V] copy of the logits
            tgt = torch.zeros(n_s, dtype=torch.int64, device=dev).index_copy(0, rows, batch.chain_student_targets)
            lp_all, _ = vocab_parallel_logprobs_at(student_logits, tgt, scale=logits_scale, group=group, impl=impl)
            lp_s = lp_all[rows]
        else:
            lp_s, _ = vocab_parallel_logprobs_at(student_logits.index_select(0, rows), batch.chain_student_targets,
                                                 scale=logits_scale, group=group, impl=impl)
        log_q = torch.zeros(g, dtype=lp_s.dtype, device=dev).index_add(0, batch.chain_student_group, lp_s)
        with torch.no_grad():
            lp_t = teacher_target_logprobs.detach()[batch.chain_teacher_rows]
            lp_t = lp_t.to(torch.promote_types(lp_t.dtype, acc))
            log_p = torch.zeros(g, dtype=lp_t.dtype, device=dev).index_add(0, batch.chain_teacher_group, lp_t)
            log_p2 = _with_tail_bucket(log_p[:, None], tail_floor).to(log_q.dtype)
        log_q2 = _with_tail_bucket(log_q[:, None], tail_floor)
        chain_loss = divergence(settings.loss_type, log_p2, log_q2, BucketSpace.replicated(),
                                jsd_beta=settings.jsd_beta, skew_alpha=settings.skew_alpha, akl_mu=settings.akl_mu)
        chain_loss = chain_loss * settings.temperature_factor
        share = chain_loss / batch.chain_group_sizes.to(chain_loss.dtype)
        per_token = per_token.index_add(0, rows, share[batch.chain_student_group].to(per_token.dtype))
        aligned[rows] = True

    with torch.no_grad():
        metrics = {key: torch.tensor(v, dtype=torch.float32) for key, v in batch.stats.items()}
        metrics["vocab_teacher_coverage"] = torch.tensor(vocab_map.teacher_coverage, dtype=torch.float32)
        metrics["vocab_student_coverage"] = torch.tensor(vocab_map.student_coverage, dtype=torch.float32)
        n_al = aligned.sum()
        metrics["kl_aligned"] = (per_token.detach().sum() / n_al.clamp(min=1)).float()
        if bool(has.any()):  # teacher top-k mass that survives the vocabulary map (1 for identical vocabularies)
            zt = tl[has].to(torch.float32) * target_logits_scale
            zm = torch.where(ok[has], zt, torch.full_like(zt, float("-inf")))
            frac = torch.exp(torch.logsumexp(zm, -1) - torch.logsumexp(zt, -1))
            metrics["topk_mapped_mass"] = torch.nan_to_num(frac, nan=0.0).mean()
        if g:
            metrics["kl_chain_groups"] = chain_loss.detach().float().mean()
    return CrossTokenizerKDOutput(per_token=per_token, aligned_mask=aligned, metrics=metrics,
                                  mapped_topk_logits=ml, mapped_topk_ids=mid, one_to_one_mask=has)


def teacher_target_logprobs_from_logits(teacher_logits: torch.Tensor, target_ids: torch.Tensor,
                                        target_logits_scale: float = 1.0, group: ProcessGroup = None) -> torch.Tensor:
    """Online mode: ``log_softmax(target_logits_scale·z)`` of the teacher at its realised tokens, ``[N_t]``."""
    with torch.no_grad():
        lp, _ = vocab_parallel_logprobs_at(teacher_logits.detach(), target_ids.long(), scale=target_logits_scale,
                                           group=group)
    return lp


@dataclass
class CrossTokenizerTeacher:
    """The teacher side of cross-tokenizer KD in one training microbatch.

    The teacher ran on *its own* rendering of each conversation; its completion
    tokens form ``N_t`` compact *teacher rows* (samples concatenated), to which
    ``batch`` (:class:`CrossTokenizerBatch`) maps the student's rows of the flattened
    ``[B·S]`` student logits. The teacher statistics per teacher row come from

    * the offline store (``topk_values`` / ``topk_ids`` in teacher-vocabulary ids,
      ``lse``, ``target_logprobs``), or
    * an online co-located teacher: its logits ``[B, S, V_t/TP]`` over the microbatch's
      teacher inputs, gathered at ``logit_rows`` (``[N_t]``, the flattened row predicting
      each teacher completion token ``targets``), reduced to the same top-``top_k`` / LSE
      / target log-probs as extraction does (:func:`nemo_kd.losses.token_stats.teacher_token_stats`,
      vocab-parallel), so online and offline feed the loss identical inputs.

    Microbatch keys (written by :func:`nemo_kd.data.kd_dataset.collate`): the index
    tensors of :meth:`CrossTokenizerBatch.to_tensors`, ``xtok_vocab_map`` (the
    :class:`VocabMap` object), offline ``xtok_teacher_values`` / ``xtok_teacher_ids`` /
    ``xtok_teacher_lse`` / ``xtok_teacher_logprobs``, online ``xtok_teacher_inputs`` /
    ``xtok_teacher_position_ids`` ``[B, S]``, ``xtok_teacher_logit_rows``,
    ``xtok_teacher_targets`` ``[N_t]`` and ``xtok_top_k``.
    """

    batch: CrossTokenizerBatch
    vocab_map: VocabMap
    topk_values: Optional[torch.Tensor] = None
    topk_ids: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None
    target_logprobs: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    logit_rows: Optional[torch.Tensor] = None
    targets: Optional[torch.Tensor] = None
    top_k: int = 0

    @staticmethod
    def in_microbatch(mb) -> bool:
        return "xtok_counts" in mb

    @classmethod
    def from_microbatch(cls, mb, teacher_logits: Optional[torch.Tensor] = None) -> "CrossTokenizerTeacher":
        vm = mb.get("xtok_vocab_map")
        if not isinstance(vm, VocabMap):
            raise ValueError("a cross-tokenizer microbatch needs 'xtok_vocab_map' (a nemo_kd.align.VocabMap)")
        online = "xtok_teacher_logit_rows" in mb
        if not online and "xtok_teacher_values" not in mb:
            raise ValueError("a cross-tokenizer microbatch needs the teacher's stored top-k (offline) or its "
                             "own input ids (online)")
        return cls(
            batch=CrossTokenizerBatch.from_tensors(mb), vocab_map=vm,
            topk_values=mb.get("xtok_teacher_values"), topk_ids=mb.get("xtok_teacher_ids"),
            lse=mb.get("xtok_teacher_lse"), target_logprobs=mb.get("xtok_teacher_logprobs"),
            logits=teacher_logits if online else None, logit_rows=mb.get("xtok_teacher_logit_rows"),
            targets=mb.get("xtok_teacher_targets"),
            top_k=int(mb["xtok_top_k"]) if "xtok_top_k" in mb else 0,
        )

    def aligned_mask(self, shape) -> torch.Tensor:
        """bool ``shape`` (``[B, S]``): the student rows with KD signal (known before the forward)."""
        dev = self.batch.o2o_student_rows.device
        mask = torch.zeros(math.prod(shape), dtype=torch.bool, device=dev)
        mask[self.batch.aligned_student_rows()] = True
        return mask.reshape(shape)

    def _teacher_stats(self, group: ProcessGroup):
        """``(values, ids, lse, target_logprobs)`` per teacher row (online: from the teacher's logits)."""
        if self.logit_rows is None:
            return self.topk_values, self.topk_ids, self.lse, self.target_logprobs
        if self.logits is None:
            raise ValueError("online cross-tokenizer KD: the microbatch has no teacher logits")
        with torch.no_grad():
            flat = self.logits.detach().reshape(-1, self.logits.shape[-1])
            st = teacher_token_stats(flat.index_select(0, self.logit_rows), self.top_k, self.targets, group=group,
                                     vocab_size=self.vocab_map.teacher_vocab_size)
        return st.values, st.ids, st.lse, st.label_logprobs

    def kd_loss(self, student_logits: torch.Tensor, settings: KDSettings, *, group: ProcessGroup = None,
                impl: str = "torch") -> CrossTokenizerKDOutput:
        """:func:`cross_tokenizer_kd_loss` on the flattened ``[B·S, V_s/TP]`` student logits.

        The teacher statistics (stored, or computed online as extraction does) are at temperature
        1: the LSE of ``exact_tail`` and the chain groups' token log-probs cannot be rescaled
        from them, so ``settings.target_logits_scale`` must be 1 here.
        """
        settings = check_settings(settings)
        if settings.target_logits_scale != 1.0:
            raise ValueError("cross-tokenizer KD uses the teacher's statistics at temperature 1 (the LSE and the "
                             "chain groups' token log-probs): target_logits_scale must be 1, got "
                             f"{settings.target_logits_scale}")
        values, ids, lse, target_lp = self._teacher_stats(group)
        return cross_tokenizer_kd_loss(student_logits, values, ids, self.batch, self.vocab_map, settings,
                                       teacher_lse=lse, teacher_target_logprobs=target_lp, group=group, impl=impl)


__all__ = [
    "CrossTokenizerBatch",
    "CrossTokenizerKDOutput",
    "CrossTokenizerTeacher",
    "build_cross_tokenizer_batch",
    "cross_tokenizer_kd_loss",
    "teacher_target_logprobs_from_logits",
]
