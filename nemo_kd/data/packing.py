"""Sequence packing: several samples per row of ``seq_length``, attention never crossing a sample.

Distillation data is of very uneven length (chat: a few hundred tokens with a tail of
thousands; reasoning traces: tens of thousands), so padding every sample to the row length
spends most of a step on padding. With ``data.*.pack_sequences: true`` the training rows
hold whole samples laid end to end:

* **The plan** (:func:`pack_plan`) is fixed when the dataset is built: the kept samples in a
  seeded order (``seed``, or in order without ``shuffle``), cut into windows of
  ``pack_window`` samples, each window packed *first-fit decreasing* (longest first, into
  the first row with room, ties by order). A pure function of the lengths, the row length,
  the window and the seed: every rank, every restart and every epoch see the same packs.
  The global-batch sampler then runs over packs as it ran over samples (shuffled per epoch,
  resumed by position), so ``micro_batch_size`` / ``global_batch_size`` count *rows*.
* **A sample in a row** (:func:`collate_packed`) occupies ``n − 1`` positions for its ``n``
  tokens (inputs ``ids[:-1]``, labels ``ids[1:]``: its last token is only a label; padded,
  the extra position predicts padding and is masked); positions restart at 0 (RoPE), the
  loss mask and the teacher's stored top-k rows follow their sample, and ``segment_ids``
  ``[B, S]`` (−1 on padding) say which sample each position belongs to.
* **Attention** (:class:`ModelInputs`): the model runs packed rows in Megatron's THD layout, the
  rows flattened to one sequence with ``PackedSeqParams`` (:func:`packed_seq_params`: ``cu_seqlens``
  of the samples), for every spec: TE's attention reads them as Megatron expects, the local spec's
  ``SDPACoreAttention`` runs causal attention per sample, samples bucketed by length (work
  ``Σ len²``, not ``S²`` a row, and no ``[S, S]`` mask); Megatron's THD RoPE restarts positions per
  sample. The online teacher and extraction run the same rows. :func:`packed_attention_mask`
  (``[B, 1, S, S]`` bool, ``True`` = masked) is the same attention as a dense mask, the reference
  the tests compare with.

Per-token quantities then equal the padded ones sample by sample (tested: loss, metrics and
gradients, offline and online, TP=1/TP=2/PP=2). Per-sample quantities follow their sample:
packed rows carry ``sample_of_position`` ``[B, S]`` (the microbatch's sample at each position), and
``roles``, ``pair_ids`` and ``teacher_seq_logprob`` are then one a sample, not a row
(:class:`~nemo_kd.losses.objective.ObjectiveBatch` ``samples``): the KD/SFT role weights and each
sample's sequence log-prob (the preference terms) read them. Preference pairs are packed as units:
both sides, in order, in one row (a pair longer than the row is refused naming it). Cross-tokenizer
samples: the alignment groups point at the sample's positions in its row (offline: the store's
teacher rows stay compact); an online teacher's own renderings are packed into the same rows in
the same order (``xtok_teacher_*``, its own ``segment_ids``), the plan counting for each sample the
longer of its two renderings (a teacher tokenizer may split the text finer); a rendering is never cut: one
longer than the row is refused naming the sample and which rendering. Not packed (refused with the reason): on-policy sampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

if TYPE_CHECKING:  # Megatron is imported where the model runs, not by every reader of this module (--help)
    from megatron.core.packed_seq_params import PackedSeqParams

from nemo_kd.data.kd_dataset import DataConfigError, DistillationDataset, DistillationSample, collate_rows

DEFAULT_PACK_WINDOW = 1000


def sample_positions(num_tokens: int) -> int:
    """Row positions a sample of ``num_tokens`` tokens takes in a packed row (its last token is only a label)."""
    return max(num_tokens - 1, 0)


def pack_plan(lengths: Sequence[int], capacity: int, window: int = DEFAULT_PACK_WINDOW, seed: int = 1234,
              shuffle: bool = True) -> List[List[int]]:
    """Packs of sample indices (module docstring): each pack's ``lengths`` sum to at most ``capacity``.

    ``lengths`` are positions per sample (:func:`sample_positions`). Deterministic in its arguments."""
    if capacity < 1 or window < 1:
        raise DataConfigError(f"packing needs a row length and a window >= 1, got {capacity} and {window}")
    lengths = np.asarray(lengths, dtype=np.int64)
    too_long = np.flatnonzero(lengths > capacity)
    if too_long.size:
        raise DataConfigError(f"sample {int(too_long[0])} needs {int(lengths[too_long[0]])} positions, more than the "
                              f"row length {capacity} (and {too_long.size - 1} more): set data.max_seq_length <= "
                              "model seq_length")
    order = np.random.default_rng(seed).permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    packs: List[List[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        # longest first, ties in window order (a stable sort of −length)
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        rows: List[List[int]] = []
        room: List[int] = []
        for i in chunk.tolist():
            n = int(lengths[i])
            for r, free in enumerate(room):
                if n <= free:
                    rows[r].append(i)
                    room[r] -= n
                    break
            else:
                rows.append([i])
                room.append(capacity - n)
        packs.extend(rows)
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """Item ``p`` = the samples of pack ``p`` of a :class:`DistillationDataset` (:func:`pack_plan`)."""

    def __init__(self, dataset: DistillationDataset, seq_length: int, window: int = DEFAULT_PACK_WINDOW,
                 seed: int = 1234, shuffle: bool = True):
        self.dataset, self.seq_length = dataset, seq_length
        lengths = [self._positions(dataset.samples[j]) for j in dataset.valid_indices]
        for j, need in zip(dataset.valid_indices, lengths):
            if need > seq_length:
                raise DataConfigError(self._too_long(dataset, j, need, seq_length))
        # The unit of packing: a sample, or a preference pair (both sides in one row, in order, so the
        # pair is in one microbatch whatever its size and its sequence log-probs are the samples').
        g = dataset.group_size
        units = [sum(lengths[u:u + g]) for u in range(0, len(lengths), g)]
        for u, need in enumerate(units):
            if g > 1 and need > seq_length:
                first = dataset.samples[dataset.valid_indices[u * g]].index
                raise DataConfigError(f"pack_sequences: preference pair {u} (samples {first}, {first + 1}) needs "
                                      f"{need} positions, more than the row length {seq_length}: both sides of a "
                                      "pair share a row; set data.train_ds.pack_length >= 2 x max_seq_length")
        self.packs = [[u * g + i for u in pack for i in range(g)]
                      for pack in pack_plan(units, seq_length, window, seed, shuffle)]
        self.num_positions = int(sum(lengths))

    @staticmethod
    def _positions(sample: DistillationSample) -> int:
        """Row positions a sample needs: the student's; an online cross-tokenizer sample also packs the
        teacher's own rendering into the same row (:func:`~nemo_kd.data.kd_dataset.collate_rows`), so the
        longer of the two (an offline store's teacher rows are not positions)."""
        n = sample_positions(len(sample.input_ids))
        xtok = sample.xtok
        if xtok is not None and xtok.teacher_input_ids is not None:
            n = max(n, sample_positions(len(xtok.teacher_input_ids)))
        return n

    @staticmethod
    def _too_long(dataset: DistillationDataset, j: int, need: int, seq_length: int) -> str:
        """Why sample ``j`` fits no row, naming it and the rendering that is too long: an online cross-tokenizer
        teacher's own rendering may be the longer one (its tokenizer splits the text finer), and it is packed in
        the same rows, never cut (that would move another sample's tokens)."""
        smp = dataset.samples[j]
        records = getattr(dataset, "records", None)
        rec = records[j] if records is not None else None
        name = f"sample {smp.index}" + (f" ({rec.source_file}:{rec.source_line})" if getattr(rec, "source_file", "")
                                        else "")
        student = sample_positions(len(smp.input_ids))
        if need > student:
            return (f"pack_sequences: {name}: the online teacher's own rendering needs {need} positions (the "
                    f"student's {student}), more than the row length {seq_length}; a packed row holds each "
                    "sample's teacher rendering whole: give the teacher's tokenizer a max_seq_length <= "
                    f"{seq_length} or longer rows (data.train_ds.pack_length)")
        return (f"pack_sequences: {name} needs {need} positions, more than the row length {seq_length}: set "
                "data.max_seq_length <= the row length (data.train_ds.pack_length)")

    @property
    def group_size(self) -> int:
        """Packs hold whole pairs: the global-batch sampler runs over packs one by one."""
        return 1

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, p: int) -> List[DistillationSample]:
        return [self.dataset[i] for i in self.packs[p]]

    @property
    def padding_fraction(self) -> float:
        """Share of the rows' positions that are padding."""
        return 1.0 - self.num_positions / max(1, len(self.packs) * self.seq_length)


def collate_packed(packs: Sequence[Sequence[DistillationSample]], seq_length: int,
                   pad_id: int) -> Dict[str, torch.Tensor]:
    """:func:`~nemo_kd.data.kd_dataset.collate` for packed rows: the same keys (``sample_index`` and
    ``num_tokens`` per row: the first sample's index, the samples' tokens), plus ``segment_ids``
    ``[B, S]`` int64 (the sample's place in its row, −1 on padding) and ``sample_of_position`` ``[B, S]``
    (the sample's number ``0..N−1`` in the microbatch, −1 on padding); ``roles``, ``pair_ids`` and
    ``teacher_seq_logprob`` are ``[N]``, one a sample."""
    return collate_rows(packs, seq_length, pad_id, packed=True)


def packed_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's boolean attention mask ``[B, 1, S, S]`` (``True`` = masked) keeping attention
    inside each sample of a packed row; the causal part is the core attention's. Padding
    positions (−1) attend among themselves: finite, and their loss is masked."""
    seg = segment_ids
    return (seg[:, None, :, None] != seg[:, None, None, :]).contiguous()


def packed_seq_params(segment_ids: torch.Tensor) -> PackedSeqParams:
    """Megatron's THD description of packed rows ``segment_ids`` ``[B, S]`` flattened to one sequence of
    ``B·S`` tokens (row after row): ``cu_seqlens_q = cu_seqlens_kv`` ``[n + 1]`` int32, the starts of the
    ``n`` runs of one segment id within a row (a row's padding tail, −1, is a run of its own: it attends
    among itself, finite, and its loss is masked), then ``B·S``; ``max_seqlen_*`` the longest run. What
    TE's ``DotProductAttention`` (``qkv_format='thd'``), Megatron's THD RoPE (positions restart per
    segment) and :class:`~nemo_kd.models.layer_spec.SDPACoreAttention` read."""
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = segment_ids.shape
    flat = segment_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a row starts a run whatever its first id
    bounds = torch.cat([starts.nonzero().squeeze(1), flat.new_tensor([b * s])])
    cu = bounds.to(torch.int32)
    longest = int((bounds[1:] - bounds[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


@dataclass
class ModelInputs:
    """One microbatch as Megatron's ``GPTModel.forward`` takes it: ``model(*args, **kwargs)``, then
    :meth:`rows` on its output (on the last pipeline stage).

    Padded rows ``[B, S]``: ``(input_ids, position_ids, None)`` (the causal mask is the core attention's).
    Packed rows (``segment_ids`` given): Megatron's THD layout, selected for every spec: ``input_ids`` and
    ``position_ids`` flattened to ``[1, B·S]``, no ``attention_mask``, ``packed_seq_params``
    (:func:`packed_seq_params`), which TE's attention and the local spec's
    :class:`~nemo_kd.models.layer_spec.SDPACoreAttention` read; :meth:`rows` puts an output ``[1, B·S, ...]``
    (logits, or a deferred projection's final hidden states) back in rows ``[B, S, ...]``."""

    args: tuple
    kwargs: dict
    shape: Tuple[int, int]
    packed: bool

    @staticmethod
    def of(input_ids: torch.Tensor, position_ids: torch.Tensor,
           segment_ids: Optional[torch.Tensor] = None) -> "ModelInputs":
        b, s = input_ids.shape
        if segment_ids is None:
            return ModelInputs((input_ids, position_ids, None), {}, (b, s), packed=False)
        params = packed_seq_params(segment_ids.to(input_ids.device))
        return ModelInputs((input_ids.reshape(1, b * s), position_ids.reshape(1, b * s), None),
                           {"packed_seq_params": params}, (b, s), packed=True)

    @staticmethod
    def of_batch(mb: Dict[str, torch.Tensor], inputs_key: str = "inputs",
                 position_ids_key: str = "position_ids") -> "ModelInputs":
        """A collated microbatch (:func:`collate_packed` rows carry ``segment_ids``)."""
        return ModelInputs.of(mb[inputs_key], mb[position_ids_key], mb.get("segment_ids"))

    @property
    def schedule_shape(self) -> Tuple[int, int]:
        """:func:`schedule_shape` of this microbatch."""
        return schedule_shape(*self.shape, packed=self.packed)

    def rows(self, output: torch.Tensor) -> torch.Tensor:
        return output.reshape(*self.shape, *output.shape[2:]) if self.packed else output


@dataclass
class TokenRows:
    """Token sequences laid end to end in rows (:func:`pack_token_rows`): ``inputs`` / ``labels`` /
    ``position_ids`` / ``segment_ids`` ``[B, W]`` int64 (``labels`` the next token, ``segment_ids`` −1 and
    ``inputs`` / ``labels`` ``pad_id`` on padding), ``placements[i]`` = ``(row, offset)`` of sequence ``i``
    (None for one in no row): its position ``offset + t`` reads token ``t`` and predicts token ``t + 1``."""

    inputs: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    segment_ids: torch.Tensor
    placements: List[Optional[Tuple[int, int]]]

    def model_inputs(self, device=None) -> ModelInputs:
        """The rows as the model takes them (THD, :class:`ModelInputs`), on ``device``."""
        return ModelInputs.of(self.inputs.to(device), self.position_ids.to(device), self.segment_ids.to(device))


def pack_token_rows(sequences: Sequence[Sequence[int]], rows: Sequence[Sequence[int]], width: int,
                    pad_id: int = 0) -> TokenRows:
    """Rows ``[len(rows), width]`` holding ``sequences[i]`` for the ``i`` of each row, in the row's order,
    laid out as :func:`collate_packed` lays out a sample: :func:`sample_positions` positions each (inputs
    ``ids[:-1]``, labels ``ids[1:]``), positions restarting at 0, ``segment_ids`` the sample's place in its
    row. ``rows`` is a plan (:func:`pack_plan`'s packs, as indices into ``sequences``); a row longer than
    ``width`` is refused naming it."""
    b = len(rows)
    inputs = torch.full((b, width), pad_id, dtype=torch.long)
    labels = torch.full((b, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros(b, width, dtype=torch.long)
    segment_ids = torch.full((b, width), -1, dtype=torch.long)
    placements: List[Optional[Tuple[int, int]]] = [None] * len(sequences)
    for r, row in enumerate(rows):
        o = 0
        for j, i in enumerate(row):
            ids = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            n = sample_positions(len(ids))
            if o + n > width:
                raise DataConfigError(f"packed row {r}: its sequences {list(row)} need more than {width} positions "
                                      f"(sequence {i} ends at {o + n})")
            inputs[r, o:o + n] = ids[:-1]
            labels[r, o:o + n] = ids[1:]
            position_ids[r, o:o + n] = torch.arange(n)
            segment_ids[r, o:o + n] = j
            placements[i] = (r, o)
            o += n
    return TokenRows(inputs, labels, position_ids, segment_ids, placements)


def schedule_shape(rows: int, seq_length: int, packed: bool) -> Tuple[int, int]:
    """``(seq_length, micro_batch_size)`` for Megatron's pipeline schedule, whose p2p tensors are the
    model's ``[S, B, H]``: packed rows (THD, :class:`ModelInputs`) are ``[B·S, 1, H]``."""
    return (rows * seq_length, 1) if packed else (seq_length, rows)
