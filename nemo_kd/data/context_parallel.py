"""A microbatch's share on one context-parallel rank: every per-position tensor cut as Megatron cuts rows.

Under context parallelism every CP rank of a data-parallel rank reads the same rows, and each keeps
its ``S / CP`` positions of them (chunks ``r`` and ``2·CP − 1 − r`` of ``2·CP``,
:mod:`nemo_kd.parallel.context_parallel`). :func:`microbatch_on_cp_rank` applies that cut to every
per-position tensor of a collated microbatch (:func:`~nemo_kd.data.kd_dataset.collate`): the model's
inputs and positions, the labels and loss mask, and an offline or served teacher's top-k rows, which
are stored per label position and so follow the student's positions exactly. Per-row and per-sample
entries (``roles``, ``pair_ids``, ``teacher_seq_logprob``, ``sample_index``, ``num_tokens``) stay whole:
a sequence-level term sums each sample's positions over the CP group
(:class:`~nemo_kd.losses.objective.DistillationObjective`).

What is not supported under CP is refused naming the key: packed rows (``segment_ids``: THD with CP
needs per-sample padding to ``2·CP`` that the packer does not make) and cross-tokenizer microbatches
(``xtok_*``: the alignment groups index whole rows). A tensor key this module does not know is
refused too, rather than guessed.
"""

from __future__ import annotations

from typing import Dict

import torch

from nemo_kd.parallel.context_parallel import slice_for_cp_rank

__all__ = ["PER_POSITION_KEYS", "WHOLE_KEYS", "microbatch_on_cp_rank"]

# [B, S] or [B, S, k]: cut along dim 1.
PER_POSITION_KEYS = ("inputs", "labels", "loss_mask", "position_ids", "teacher_values", "teacher_ids", "teacher_lse",
                     "teacher_log_tail")
# per row [B] or per sample [N]: the same on every CP rank.
WHOLE_KEYS = ("sample_index", "num_tokens", "roles", "pair_ids", "teacher_seq_logprob")
_PACKED_KEYS = ("segment_ids", "sample_of_position")


def microbatch_on_cp_rank(mb: Dict[str, object], cp_rank: int, cp_size: int) -> Dict[str, object]:
    """``mb`` with every per-position tensor cut to CP rank ``cp_rank``'s positions (module docstring);
    a new dict, ``mb`` itself untouched. ``cp_size == 1``: ``mb`` as is."""
    if cp_size == 1:
        return mb
    packed = [k for k in _PACKED_KEYS if k in mb]
    if packed:
        raise ValueError(f"context_parallel_size={cp_size} with packed rows (microbatch key {packed[0]!r}): "
                         "set data.*.pack_sequences=false (THD with context parallelism is not supported)")
    out = {}
    for key, value in mb.items():
        if key.startswith("xtok_"):
            raise ValueError(f"context_parallel_size={cp_size} with a cross-tokenizer microbatch (key {key!r}): "
                             "cross-tokenizer KD runs with context_parallel_size=1")
        if key in PER_POSITION_KEYS:
            if not torch.is_tensor(value) or value.dim() < 2:
                raise ValueError(f"microbatch key {key!r} must be a [B, S, ...] tensor under context parallelism, "
                                 f"got {type(value).__name__}{tuple(value.shape) if torch.is_tensor(value) else ''}")
            out[key] = slice_for_cp_rank(value, cp_rank, cp_size, dim=1)
        elif key in WHOLE_KEYS or not torch.is_tensor(value):
            out[key] = value
        else:
            raise ValueError(f"microbatch key {key!r}: context parallelism does not know whether it is per position "
                             f"(cut over the CP ranks) or per row/sample (kept whole); known: per position "
                             f"{list(PER_POSITION_KEYS)}, whole {list(WHOLE_KEYS)}")
    return out
