"""Training data for distillation: tokenised samples joined to the teacher logits store.

A :class:`DistillationDataset` holds every sample of a :class:`RecordSet` rendered and
tokenised for the *student* (completion-only loss mask) and, in offline mode, joined to
the teacher's stored top-k by sample index. The join is checked when the dataset is
built: the store must have been made from the same dataset, tokenizer, length limit
(and ``k``), and every sample's stored token count must equal its completion length;
otherwise :class:`~nemo_kd.teacher.store.StoreMismatchError` names what differs.

:func:`collate` pads a list of samples to a fixed ``seq_length`` (Megatron's pipeline
schedules exchange fixed-shape activations) and applies the next-token shift: the
label of position ``t`` is token ``t+1`` and its mask is the loss mask of token
``t+1``, so prompt tokens never enter a loss. Teacher rows are placed at the label
positions: the store's ``r``-th row of a sample describes its ``r``-th completion token.

Cross-tokenizer samples (teacher and student with different tokenizers/templates,
:mod:`nemo_kd.align`). The teacher saw each conversation in *its own* rendering, so its
rows do not sit at student positions. A sample then carries a
:class:`CrossTokenizerSample` (the student↔teacher alignment groups, the teacher's
completion ids, the vocabulary map) and :func:`collate` emits, instead of the
``teacher_*`` tensors, the teacher's rows compactly (samples concatenated) plus the
index tensors that tie them to student rows (the ``xtok_*`` keys of
:class:`~nemo_kd.align.loss.CrossTokenizerTeacher`):

* offline – a cross-tokenizer store (format version 2): its top-k (teacher ids) and
  per-token log-probs, checked at construction against the *student's* tokenizer
  hash, length limit and per-sample student token counts;
* online – ``teacher_tokenizer`` given: each conversation is also rendered and
  tokenised with the teacher's own template and aligned here; the microbatch carries
  the teacher's input ids ``xtok_teacher_inputs`` ``[B, S]`` (same shape as the
  student's, so Megatron's schedules need nothing new) and the rows of its logits to
  reduce to top-``k`` during the step.

Preference pairs (records with ``role`` chosen / rejected, :mod:`nemo_kd.data.records`):
the two sides of a pair are consecutive samples; a pair whose either side is dropped as
over-long is dropped whole (counted in :attr:`DistillationDataset.dropped_pairs`), and
:func:`collate` adds ``roles`` (the objective's ``ROLE_POSITIVE`` / ``ROLE_NEGATIVE``) and
``pair_ids`` ``[B]``. :class:`GlobalBatchSampler` with ``group_size=2`` (the dataset's
:attr:`~DistillationDataset.group_size`) shuffles pairs, never splitting one across
microbatches, as the sequence-level preference term needs both sides together.

:class:`GlobalBatchSampler` yields, step after step, the sample indices of this
data-parallel rank's microbatches (Megatron's global-batch arithmetic), shuffled per
epoch from a seed and resumable from a number of consumed samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from nemo_kd.align.groups import alignment_version_notice
from nemo_kd.data.records import ROLE_CHOSEN, ROLE_REJECTED, ROLE_SINGLE, RecordSet
from nemo_kd.data.tokenization import ConversationTokenizer
from nemo_kd.losses.objective import ROLE_NEGATIVE, ROLE_POSITIVE
from nemo_kd.losses.objective import ROLE_SINGLE as OBJECTIVE_ROLE_SINGLE

logger = logging.getLogger(__name__)

# Record roles as the objective numbers them (the teacher's response is the preferred one).
_OBJECTIVE_ROLES = {ROLE_SINGLE: OBJECTIVE_ROLE_SINGLE, ROLE_CHOSEN: ROLE_POSITIVE, ROLE_REJECTED: ROLE_NEGATIVE}


class DataConfigError(ValueError):
    pass


@dataclass
class CrossTokenizerSample:
    """The teacher side of one cross-tokenizer sample (module docstring)."""

    groups: object  # nemo_kd.align.AlignmentGroups (completion-token ranges, student ↔ teacher)
    teacher_completion_ids: np.ndarray  # int64 [n_t], the teacher's own completion tokens
    vocab_map: object  # nemo_kd.align.VocabMap, shared by all samples of a dataset
    teacher_logprobs: Optional[np.ndarray] = None  # offline: fp32 [n_t] log p_T(token | teacher prefix)
    teacher_input_ids: Optional[np.ndarray] = None  # online: int64 [L_t], the teacher's whole sample
    top_k: int = 0  # online: teacher top-k computed in the step


@dataclass
class DistillationSample:
    index: int
    input_ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # int8 [L], 1 on completion tokens
    teacher: Optional[object] = None  # nemo_kd.teacher.store.TeacherTopK
    xtok: Optional[CrossTokenizerSample] = None  # cross-tokenizer samples only
    role: str = ROLE_SINGLE  # nemo_kd.data.records: single | chosen | rejected
    pair: int = -1  # preference pair number, -1 for a single


def _drop(rec, reason: str) -> Dict[str, object]:
    return dict(file=rec.source_file, line=rec.source_line, sample=rec.index, id=rec.id, reason=reason)


class DistillationDataset(torch.utils.data.Dataset):
    """Student-tokenised records, optionally joined to a teacher logits store.

    Args:
        records: the dataset (:func:`nemo_kd.data.records.read_records`).
        tokenizer: the student's :class:`ConversationTokenizer`.
        store: a :class:`~nemo_kd.teacher.store.StoreReader` (offline KD) or ``None``;
            a cross-tokenizer store (format version 2) makes every sample cross-tokenizer.
        k: the ``k`` the training expects (checked against the store when given); online
            cross-tokenizer: the teacher top-k computed per step (default 100).
        teacher_tokenizer: online cross-tokenizer KD: the *teacher's*
            :class:`ConversationTokenizer` (its own template; same ``max_seq_length``).
        student_vocab_size / teacher_vocab_size: the models' output rows (unpadded
            ``vocab_size`` of their configs) for the vocabulary map; default: the
            tokenizers' sizes.
        topk_convention: the training's ``kd.topk_convention`` when given: ``exact_tail`` on a
            store without the teacher's full-vocabulary log-sum-exp (imported NeMo-Aligner top-k)
            is refused naming the store.
    """

    def __init__(self, records: RecordSet, tokenizer: ConversationTokenizer, store=None, k: Optional[int] = None,
                 teacher_tokenizer: Optional[ConversationTokenizer] = None, student_vocab_size: Optional[int] = None,
                 teacher_vocab_size: Optional[int] = None, topk_convention: Optional[str] = None):
        self.records = records
        if store is not None:
            store.check_topk_convention(topk_convention)  # before tokenising: a config error, said at once
        self.tokenizer = tokenizer
        self.samples: List[Optional[DistillationSample]] = []
        self.dropped_pairs = 0
        if store is not None and teacher_tokenizer is not None:
            raise DataConfigError("teacher_tokenizer is for online cross-tokenizer KD; an offline store carries the "
                                  "teacher's tokenisation itself")
        self.vocab_map = None
        if teacher_tokenizer is not None:
            from nemo_kd.align import build_vocab_map

            self.vocab_map = build_vocab_map(tokenizer.tokenizer, teacher_tokenizer.tokenizer, student_vocab_size,
                                             teacher_vocab_size)
        # Every sample of the file that will not train, and why (the training run logs and writes them).
        self.drops: List[Dict[str, object]] = [dict(file=s.file, line=s.line, reason=s.reason)
                                               for s in records.skipped]
        for rec in records:
            name = f"{rec.source_file}:{rec.source_line}" if rec.source_file else f"sample {rec.index}"
            tok = tokenizer(list(rec.messages), sample_name=name)
            if tok is None:  # dropped as over-long: the tokenizer recorded why
                self.samples.append(None)
                self.drops.append(_drop(rec, tokenizer.stats.dropped_reasons[-1]))
                continue
            sample = DistillationSample(
                index=rec.index,
                input_ids=np.asarray(tok.input_ids, dtype=np.int64),
                loss_mask=np.asarray(tok.loss_mask, dtype=np.int8),
                role=rec.role,
                pair=rec.pair,
            )
            if teacher_tokenizer is not None:
                sample.xtok = self._online_alignment(rec, tok, teacher_tokenizer, name, k or 100)
            self.samples.append(sample)
        if records.is_preference:
            # A pair is trained as a pair: drop both sides when either was dropped as over-long.
            kept = [i for i in range(0, len(self.samples), 2)
                    if self.samples[i] is not None and self.samples[i + 1] is not None]
            self.dropped_pairs = len(self.samples) // 2 - len(kept)
            for i in range(0, len(self.samples), 2):
                for side, other in ((i, i + 1), (i + 1, i)):
                    if self.samples[side] is not None and self.samples[other] is None:
                        self.drops.append(_drop(records[side], f"its pair's other side (sample {other}) was dropped"))
            self.valid_indices = [j for i in kept for j in (i, i + 1)]
        elif any(r.role != ROLE_SINGLE for r in records):
            raise DataConfigError(f"{records.source or 'the dataset'} mixes preference pairs and single samples: "
                                  "train pairs from a file of pairs only")
        else:
            self.valid_indices = [i for i, s in enumerate(self.samples) if s is not None]
        self.store = store
        if store is not None and getattr(store, "cross_tokenizer", False):
            # The store's payload is the teacher's rendering: check the *student* side it was aligned for.
            store.check_compatible(
                dataset_hash=records.content_hash,
                k=k,
                num_samples=len(records),
                student_tokenizer_hash=tokenizer.hash,
                student_max_seq_length=tokenizer.max_seq_length,
                num_completion_tokens_fn=lambda i: self._completion_tokens(i),
            )
            notice = alignment_version_notice(store.alignment_info["alignment_version"], str(store.path))
            if notice:
                logger.warning(notice)
            self.vocab_map = store.vocab_map(student_vocab_size)
        elif store is not None:
            store.check_compatible(
                dataset_hash=records.content_hash,
                tokenizer_hash=tokenizer.hash,
                k=k,
                max_seq_length=tokenizer.max_seq_length,
                num_samples=len(records),
                num_completion_tokens_fn=lambda i: self._completion_tokens(i),
            )

    def _online_alignment(self, rec, student, teacher_ct: ConversationTokenizer, name: str,
                          k: int) -> Optional[CrossTokenizerSample]:
        from nemo_kd.align import align_rendered

        teacher = teacher_ct(list(rec.messages), sample_name=name)
        groups = align_rendered(list(rec.messages), student, teacher, self.tokenizer.tokenizer, teacher_ct.tokenizer,
                                name)
        ids = np.asarray(teacher.input_ids if teacher is not None else [], dtype=np.int64)
        n_t = 0 if teacher is None else teacher.num_completion_tokens
        return CrossTokenizerSample(groups=groups, teacher_completion_ids=ids[len(ids) - n_t:],
                                    vocab_map=self.vocab_map, teacher_input_ids=ids, top_k=int(k))

    @property
    def group_size(self) -> int:
        """Consecutive samples that must share a microbatch: 2 for preference pairs, else 1."""
        return 2 if self.records.is_preference else 1

    @property
    def cross_tokenizer(self) -> bool:
        return self.vocab_map is not None

    def _completion_tokens(self, i: int) -> int:
        s = self.samples[i]
        return 0 if s is None else int(s.loss_mask.sum())

    def __len__(self) -> int:
        return len(self.valid_indices)

    def __getitem__(self, i: int) -> DistillationSample:
        """The ``i``-th *kept* sample (over-long samples dropped by config are skipped)."""
        s = self.samples[self.valid_indices[i]]
        if self.store is None:
            return s
        teacher = self.store[s.index]
        xtok = None
        if teacher.alignment is not None:
            al = teacher.alignment
            xtok = CrossTokenizerSample(groups=al.groups(), teacher_completion_ids=al.teacher_ids.astype(np.int64),
                                        vocab_map=self.vocab_map, teacher_logprobs=al.teacher_logprobs)
        return DistillationSample(s.index, s.input_ids, s.loss_mask, teacher, xtok, s.role, s.pair)


def collate(samples: Sequence[DistillationSample], seq_length: int, pad_id: int, k: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Pad to ``seq_length`` inputs and shift labels; place teacher rows at label positions.

    Returns tensors ``inputs``/``labels``/``position_ids`` ``[B, S]`` int64,
    ``loss_mask`` ``[B, S]`` float, ``num_tokens`` ``[B]`` (real, unpadded input tokens), and with teacher data ``teacher_values`` ``[B, S, k]``
    fp32 (−inf where absent), ``teacher_ids`` ``[B, S, k]`` int64, ``teacher_lse``
    ``[B, S]`` fp32, ``teacher_seq_logprob`` ``[B]`` fp64, ``teacher_log_tail`` ``[B, S]`` fp32 (the teacher's
    ``log Σ_{v ∉ top-k} p_v``; only from a store with the ``teacher_log_tail`` extension); with preference pairs
    ``roles`` ``[B]`` (the objective's ROLE_*) and ``pair_ids`` ``[B]``.
    """
    return collate_rows([[smp] for smp in samples], seq_length, pad_id, packed=False)


def collate_rows(rows: Sequence[Sequence[DistillationSample]], seq_length: int, pad_id: int,
                 packed: bool) -> Dict[str, torch.Tensor]:
    """:func:`collate` of rows holding one sample each (``packed=False``) or several laid end to end
    (:mod:`nemo_kd.data.packing`). A sample of ``n`` tokens takes ``L`` positions from its row's
    offset ``o``: ``inputs[o:o+L] = ids[:L]``, ``labels[o:o+L] = ids[1:L+1]`` (padding past its
    end), the loss mask likewise, positions ``0..L−1``; ``L = min(n, S)`` alone in a row (its last
    input predicts padding, masked), ``L = n − 1`` packed (the last token is only a label)."""
    samples = [smp for row in rows for smp in row]
    b, s = len(rows), seq_length
    inputs = torch.full((b, s), pad_id, dtype=torch.long)
    labels = torch.full((b, s), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(b, s)
    position_ids = torch.zeros(b, s, dtype=torch.long) if packed else torch.arange(s).unsqueeze(0).expand(b, s)
    segment_ids = torch.full((b, s), -1, dtype=torch.long)
    cross = samples[0].xtok is not None
    if any((smp.xtok is not None) != cross for smp in samples):
        raise DataConfigError("a microbatch mixes cross-tokenizer and same-tokenizer samples")
    # packed: the microbatch's sample (0..N-1, row after row) at each position, -1 on padding
    sample_of_position = torch.full((b, s), -1, dtype=torch.long)
    has_teacher = samples[0].teacher is not None and not cross
    if has_teacher:
        k = samples[0].teacher.values.shape[1]
        t_vals = torch.full((b, s, k), float("-inf"))
        t_ids = torch.zeros(b, s, k, dtype=torch.long)
        t_lse = torch.zeros(b, s)
        # the store's log tail mass (teacher_log_tail extension): in the batch only when every sample has it
        t_tail = torch.zeros(b, s) if all(smp.teacher.log_tail is not None for smp in samples) else None
        t_seq = torch.zeros(len(samples), dtype=torch.float64)  # one a sample (= a row, padded)
    num_tokens = torch.zeros(b, dtype=torch.long)
    g = 0  # the sample's number in the microbatch
    placements = []  # (row, offset) of each sample
    for row, row_samples in enumerate(rows):
        o = 0
        for j, smp in enumerate(row_samples):
            n = len(smp.input_ids)
            if n > s + 1:
                raise DataConfigError(f"sample {smp.index} has {n} tokens, more than seq_length + 1 = {s + 1}; "
                                      "set data.max_seq_length <= model seq_length + 1")
            length = n - 1 if packed else min(n, s)
            if o + length > s:
                raise DataConfigError(f"packed row {row}: its samples need more than seq_length = {s} positions")
            ids = torch.from_numpy(smp.input_ids)
            mask = torch.from_numpy(smp.loss_mask.astype(np.float32))
            inputs[row, o:o + length] = ids[:length]
            labels[row, o:o + min(length, n - 1)] = ids[1:length + 1]
            loss_mask[row, o:o + min(length, n - 1)] = mask[1:length + 1]
            if packed:
                position_ids[row, o:o + length] = torch.arange(length)
            segment_ids[row, o:o + length] = j
            sample_of_position[row, o:o + length] = g
            placements.append((row, o))
            if has_teacher:
                label_pos = o + torch.nonzero(loss_mask[row, o:o + length]).flatten()  # label t ⇔ token t+1
                if label_pos.numel() != smp.teacher.num_tokens:
                    raise DataConfigError(f"sample {smp.index}: {label_pos.numel()} completion tokens but the teacher "
                                          f"store has {smp.teacher.num_tokens} rows")
                t_vals[row, label_pos] = smp.teacher.values.float()
                t_ids[row, label_pos] = smp.teacher.ids.long()
                t_lse[row, label_pos] = smp.teacher.lse.float()
                if t_tail is not None:
                    t_tail[row, label_pos] = smp.teacher.log_tail.float()
                t_seq[g] = smp.teacher.seq_logprob
            num_tokens[row] += min(n, s)
            o += length
            g += 1
    batch = {
        "inputs": inputs,
        "labels": labels,
        "loss_mask": loss_mask,
        "position_ids": position_ids.contiguous(),
        "sample_index": torch.tensor([row[0].index for row in rows]),
        # the model reads this many real tokens per row; the rest of ``seq_length`` is padding
        "num_tokens": num_tokens,
    }
    if packed:
        # roles, pair_ids and teacher_seq_logprob are then per sample [N] (ObjectiveBatch.samples)
        batch.update(segment_ids=segment_ids, sample_of_position=sample_of_position)
    if has_teacher:
        batch.update(teacher_values=t_vals, teacher_ids=t_ids, teacher_lse=t_lse, teacher_seq_logprob=t_seq)
        if t_tail is not None:
            batch["teacher_log_tail"] = t_tail
    if any(smp.role != ROLE_SINGLE for smp in samples):
        batch.update(roles=torch.tensor([_OBJECTIVE_ROLES[smp.role] for smp in samples]),
                     pair_ids=torch.tensor([smp.pair for smp in samples]))
    if cross:
        batch.update(_collate_cross_tokenizer(samples, s, placements if packed else None, b))
    return batch


def _collate_cross_tokenizer(samples: Sequence[DistillationSample], seq_length: int,
                             placements: Optional[Sequence[tuple]] = None, num_rows: int = 0) -> Dict[str, object]:
    """The ``xtok_*`` entries of a cross-tokenizer microbatch (module docstring).

    Student row of completion token ``c`` of batch row ``r``: ``r·S + P_s − 1 + c``
    (``P_s`` prompt tokens; the label shift). Teacher row of its completion token ``j``:
    ``T_r + j`` in the compact teacher rows (``T_r`` = teacher tokens of earlier rows);
    online, the teacher logits row predicting it is ``r·S + P_t − 1 + j``.

    Packed rows (``placements``: each sample's ``(row, offset)`` in the student's rows): the student
    row is ``r·S + o + P_s − 1 + c``; online, the teacher's renderings are packed into the same rows
    in the same order (``L_t − 1`` positions each from the row's teacher offset ``o_t``, positions
    restarting, ``xtok_teacher_segment_ids`` for its THD layout), its logits row ``r·S + o_t + P_t − 1 + j``.
    """
    from nemo_kd.align import build_cross_tokenizer_batch

    vm = samples[0].xtok.vocab_map
    online = samples[0].xtok.teacher_input_ids is not None
    packed = placements is not None
    groups, s_comp, t_comp, s_offs, t_offs = [], [], [], [], []
    t_tokens = torch.zeros(len(samples), seq_length + 1, dtype=torch.long)
    if packed and online:
        t_inputs = torch.zeros(num_rows, seq_length, dtype=torch.long)
        t_positions = torch.zeros(num_rows, seq_length, dtype=torch.long)
        t_segments = torch.full((num_rows, seq_length), -1, dtype=torch.long)
        t_row_offset = [0] * num_rows
    vals, ids, lse, lps, logit_rows = [], [], [], [], []
    seq_lp = torch.zeros(len(samples), dtype=torch.float64)
    n_t_total = 0
    for row, smp in enumerate(samples):
        x = smp.xtok
        if x.vocab_map is not vm:
            raise DataConfigError("a microbatch mixes samples with different vocabulary maps")
        n_s = int(smp.loss_mask.sum())
        p_s = len(smp.input_ids) - n_s
        g = x.groups
        n_t = len(x.teacher_completion_ids)
        if g.num_student_tokens != n_s or g.num_teacher_tokens != n_t:
            raise DataConfigError(f"sample {smp.index}: the alignment is for {g.num_student_tokens} student / "
                                  f"{g.num_teacher_tokens} teacher completion tokens, the sample has {n_s} / {n_t}")
        if p_s < 1 and n_s:
            raise DataConfigError(f"sample {smp.index}: the student's prompt renders to no tokens, so its first "
                                  "completion token has no position predicting it")
        groups.append(g)
        s_comp.append(smp.input_ids[p_s:])
        t_comp.append(x.teacher_completion_ids)
        start = row * seq_length if not packed else placements[row][0] * seq_length + placements[row][1]
        s_offs.append(start + p_s - 1)
        t_offs.append(n_t_total)
        if online:
            t_all = x.teacher_input_ids
            if len(t_all) > seq_length + 1:
                raise DataConfigError(f"sample {smp.index}: the teacher's rendering has {len(t_all)} tokens, more "
                                      f"than seq_length + 1 = {seq_length + 1}; lower data.max_seq_length")
            p_t = len(t_all) - n_t
            if p_t < 1 and n_t:
                raise DataConfigError(f"sample {smp.index}: the teacher's prompt renders to no tokens")
            if not packed:
                t_tokens[row, :len(t_all)] = torch.from_numpy(t_all)
                logit_rows.append(torch.arange(n_t) + row * seq_length + p_t - 1)
            else:  # its last token is only a target, as the student's
                r, length = placements[row][0], len(t_all) - 1
                o_t = t_row_offset[r]
                if o_t + length > seq_length:
                    raise DataConfigError(f"packed row {r}: the teacher's renderings of its samples need more than "
                                          f"seq_length = {seq_length} positions (sample {smp.index})")
                t_inputs[r, o_t:o_t + length] = torch.from_numpy(t_all[:-1])
                t_positions[r, o_t:o_t + length] = torch.arange(length)
                t_segments[r, o_t:o_t + length] = row
                logit_rows.append(torch.arange(n_t) + r * seq_length + o_t + p_t - 1)
                t_row_offset[r] = o_t + length
        else:
            t = smp.teacher
            if t is None or t.num_tokens != n_t or x.teacher_logprobs is None:
                raise DataConfigError(f"sample {smp.index}: the teacher store has "
                                      f"{None if t is None else t.num_tokens} rows, the alignment {n_t}")
            vals.append(t.values.float())
            ids.append(t.ids.long())
            lse.append(t.lse.float())
            lps.append(torch.from_numpy(np.asarray(x.teacher_logprobs, dtype=np.float32)))
            seq_lp[row] = t.seq_logprob
        n_t_total += n_t
    out: Dict[str, object] = dict(build_cross_tokenizer_batch(groups, s_comp, t_comp, vm, s_offs, t_offs).to_tensors())
    out["xtok_vocab_map"] = vm
    if online and packed:
        out.update(xtok_teacher_inputs=t_inputs, xtok_teacher_position_ids=t_positions,
                   xtok_teacher_segment_ids=t_segments, xtok_teacher_logit_rows=torch.cat(logit_rows),
                   xtok_teacher_targets=torch.from_numpy(np.concatenate(t_comp).astype(np.int64)),
                   xtok_top_k=torch.tensor(samples[0].xtok.top_k))
    elif online:
        out.update(xtok_teacher_inputs=t_tokens[:, :-1].contiguous(),
                   xtok_teacher_position_ids=torch.arange(seq_length).unsqueeze(0).expand(len(samples),
                                                                                          seq_length).contiguous(),
                   xtok_teacher_logit_rows=torch.cat(logit_rows),
                   xtok_teacher_targets=torch.from_numpy(np.concatenate(t_comp).astype(np.int64)),
                   xtok_top_k=torch.tensor(samples[0].xtok.top_k))
    else:
        k = samples[0].teacher.values.shape[1]
        cat = lambda xs, shape: torch.cat(xs) if xs else torch.zeros(shape)  # noqa: E731
        out.update(xtok_teacher_values=cat(vals, (0, k)), xtok_teacher_ids=cat(ids, (0, k)).long(),
                   xtok_teacher_lse=cat(lse, (0,)), xtok_teacher_logprobs=cat(lps, (0,)), teacher_seq_logprob=seq_lp)
    return out


class GlobalBatchSampler:
    """Sample indices of this DP rank's microbatches, one global batch per step.

    ``global_batch_size = micro_batch_size × num_microbatches × dp_size``. Epoch ``e``
    visits the dataset in the order ``permutation(seed + e)`` (or in order when
    ``shuffle`` is off); global batch ``g`` takes positions ``[g·GBS, (g+1)·GBS)`` of that
    order, and DP rank ``r`` takes its ``micro_batch_size × num_microbatches`` block of it.
    A trailing partial global batch is dropped. ``consumed_samples`` (a multiple of the
    global batch size) resumes exactly where a previous run stopped.

    ``group_size`` > 1 keeps runs of that many consecutive samples together (preference
    pairs): the permutation is over groups, every size counts samples, and the micro
    batch size must be a multiple of the group size.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, shuffle: bool = True, consumed_samples: int = 0,
                 group_size: int = 1):
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise DataConfigError(f"global_batch_size={global_batch_size} must be a multiple of micro_batch_size × "
                                  f"data-parallel size = {micro_batch_size} × {dp_size}")
        if micro_batch_size % group_size or num_samples % group_size:
            raise DataConfigError(f"micro_batch_size={micro_batch_size} must be a multiple of {group_size}: "
                                  "both sides of a preference pair go into the same microbatch")
        if num_samples < global_batch_size:
            raise DataConfigError(f"the dataset has {num_samples} samples, fewer than one global batch "
                                  f"({global_batch_size})")
        if consumed_samples % global_batch_size:
            raise DataConfigError(f"consumed_samples={consumed_samples} is not a multiple of the global batch size")
        self.num_samples, self.micro, self.gbs = num_samples, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.group_size = group_size
        self.num_microbatches = global_batch_size // per_step
        self.steps_per_epoch = num_samples // global_batch_size
        self.consumed_samples = consumed_samples

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        g = self.group_size
        groups = np.random.default_rng(self.seed + epoch).permutation(self.num_samples // g)
        return (groups[:, None] * g + np.arange(g)).reshape(-1)

    def __iter__(self) -> Iterator[List[List[int]]]:
        while True:
            step = self.consumed_samples // self.gbs
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            order = self._order(epoch)
            start = in_epoch * self.gbs + self.dp_rank * self.micro * self.num_microbatches
            mine = order[start:start + self.micro * self.num_microbatches].tolist()
            self.consumed_samples += self.gbs
            yield [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.num_microbatches)]
