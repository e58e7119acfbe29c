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

:class:`GlobalBatchSampler` yields, step after step, the sample indices of this
data-parallel rank's microbatches (Megatron's global-batch arithmetic), shuffled per
epoch from a seed and resumable from a number of consumed samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from nemo_kd.data.records import RecordSet
from nemo_kd.data.tokenization import ConversationTokenizer


class DataConfigError(ValueError):
    pass


@dataclass
class DistillationSample:
    index: int
    input_ids: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # int8 [L], 1 on completion tokens
    teacher: Optional[object] = None  # nemo_kd.teacher.store.TeacherTopK


class DistillationDataset(torch.utils.data.Dataset):
    """Student-tokenised records, optionally joined to a teacher logits store.

    Args:
        records: the dataset (:func:`nemo_kd.data.records.read_records`).
        tokenizer: the student's :class:`ConversationTokenizer`.
        store: a :class:`~nemo_kd.teacher.store.StoreReader` (offline KD) or ``None``.
        k: the ``k`` the training expects (checked against the store when given).
    """

    def __init__(self, records: RecordSet, tokenizer: ConversationTokenizer, store=None, k: Optional[int] = None):
        self.records = records
        self.tokenizer = tokenizer
        self.samples: List[Optional[DistillationSample]] = []
        for rec in records:
            name = f"{rec.source_file}:{rec.source_line}" if rec.source_file else f"sample {rec.index}"
            tok = tokenizer(list(rec.messages), sample_name=name)
            if tok is None:  # dropped as over-long (counted in tokenizer.stats)
                self.samples.append(None)
                continue
            self.samples.append(DistillationSample(
                index=rec.index,
                input_ids=np.asarray(tok.input_ids, dtype=np.int64),
                loss_mask=np.asarray(tok.loss_mask, dtype=np.int8),
            ))
        self.valid_indices = [i for i, s in enumerate(self.samples) if s is not None]
        self.store = store
        if store is not None:
            store.check_compatible(
                dataset_hash=records.content_hash,
                tokenizer_hash=tokenizer.hash,
                k=k,
                max_seq_length=tokenizer.max_seq_length,
                num_samples=len(records),
                num_completion_tokens_fn=lambda i: self._completion_tokens(i),
            )

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
        return DistillationSample(s.index, s.input_ids, s.loss_mask, self.store[s.index])


def collate(samples: Sequence[DistillationSample], seq_length: int, pad_id: int, k: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Pad to ``seq_length`` inputs and shift labels; place teacher rows at label positions.

    Returns tensors ``inputs``/``labels``/``position_ids`` ``[B, S]`` int64,
    ``loss_mask`` ``[B, S]`` float, and with teacher data ``teacher_values`` ``[B, S, k]``
    fp32 (−inf where absent), ``teacher_ids`` ``[B, S, k]`` int64, ``teacher_lse``
    ``[B, S]`` fp32, ``teacher_seq_logprob`` ``[B]`` fp64.
    """
    b, s = len(samples), seq_length
    tokens = torch.full((b, s + 1), pad_id, dtype=torch.long)
    token_mask = torch.zeros(b, s + 1)
    has_teacher = samples[0].teacher is not None
    if has_teacher:
        k = samples[0].teacher.values.shape[1]
        t_vals = torch.full((b, s, k), float("-inf"))
        t_ids = torch.zeros(b, s, k, dtype=torch.long)
        t_lse = torch.zeros(b, s)
        t_seq = torch.zeros(b, dtype=torch.float64)
    for row, smp in enumerate(samples):
        n = len(smp.input_ids)
        if n > s + 1:
            raise DataConfigError(f"sample {smp.index} has {n} tokens, more than seq_length + 1 = {s + 1}; "
                                  "set data.max_seq_length <= model seq_length + 1")
        tokens[row, :n] = torch.from_numpy(smp.input_ids)
        token_mask[row, :n] = torch.from_numpy(smp.loss_mask.astype(np.float32))
        if has_teacher:
            label_pos = torch.nonzero(token_mask[row, 1:]).flatten()  # label index t ⇔ token t+1
            if label_pos.numel() != smp.teacher.num_tokens:
                raise DataConfigError(f"sample {smp.index}: {label_pos.numel()} completion tokens but the teacher store "
                                      f"has {smp.teacher.num_tokens} rows")
            t_vals[row, label_pos] = smp.teacher.values.float()
            t_ids[row, label_pos] = smp.teacher.ids.long()
            t_lse[row, label_pos] = smp.teacher.lse.float()
            t_seq[row] = smp.teacher.seq_logprob
    batch = {
        "inputs": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": token_mask[:, 1:].contiguous(),
        "position_ids": torch.arange(s).unsqueeze(0).expand(b, s).contiguous(),
        "sample_index": torch.tensor([smp.index for smp in samples]),
    }
    if has_teacher:
        batch.update(teacher_values=t_vals, teacher_ids=t_ids, teacher_lse=t_lse, teacher_seq_logprob=t_seq)
    return batch


class GlobalBatchSampler:
    """Sample indices of this DP rank's microbatches, one global batch per step.

    ``global_batch_size = micro_batch_size × num_microbatches × dp_size``. Epoch ``e``
    visits the dataset in the order ``permutation(seed + e)`` (or in order when
    ``shuffle`` is off); global batch ``g`` takes positions ``[g·GBS, (g+1)·GBS)`` of that
    order, and DP rank ``r`` takes its ``micro_batch_size × num_microbatches`` block of it.
    A trailing partial global batch is dropped. ``consumed_samples`` (a multiple of the
    global batch size) resumes exactly where a previous run stopped.
    """

    def __init__(self, num_samples: int, micro_batch_size: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 1234, shuffle: bool = True, consumed_samples: int = 0):
        per_step = micro_batch_size * dp_size
        if global_batch_size % per_step:
            raise DataConfigError(f"global_batch_size={global_batch_size} must be a multiple of micro_batch_size × "
                                  f"data-parallel size = {micro_batch_size} × {dp_size}")
        if num_samples < global_batch_size:
            raise DataConfigError(f"the dataset has {num_samples} samples, fewer than one global batch "
                                  f"({global_batch_size})")
        if consumed_samples % global_batch_size:
            raise DataConfigError(f"consumed_samples={consumed_samples} is not a multiple of the global batch size")
        self.num_samples, self.micro, self.gbs = num_samples, micro_batch_size, global_batch_size
        self.dp_rank, self.dp_size, self.seed, self.shuffle = dp_rank, dp_size, seed, shuffle
        self.num_microbatches = global_batch_size // per_step
        self.steps_per_epoch = num_samples // global_batch_size
        self.consumed_samples = consumed_samples

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng(self.seed + epoch).permutation(self.num_samples)

    def __iter__(self) -> Iterator[List[List[int]]]:
        while True:
            step = self.consumed_samples // self.gbs
            epoch, in_epoch = divmod(step, self.steps_per_epoch)
            order = self._order(epoch)
            start = in_epoch * self.gbs + self.dp_rank * self.micro * self.num_microbatches
            mine = order[start:start + self.micro * self.num_microbatches].tolist()
            self.consumed_samples += self.gbs
            yield [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.num_microbatches)]
