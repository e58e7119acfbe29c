"""Training against a served teacher (``model.teacher.mode: served``): every step's rows scored over HTTP.

The teacher lives behind a server (vLLM, SGLang, ``nemo-kd-serve-teacher``) and is reached with the
pipelines' client (:class:`~nemo_kd.teacher.served.ServedTeacher`, the same ``teacher.*`` keys: ``url``,
``model``, ``dialect``, ``api_key_env``, ``concurrency``, timeouts, retries; plus ``top_k``). Each
training step's rows, the dataset's responses on a supervised step and the student's own samples on an
on-policy step (:mod:`nemo_kd.generation.on_policy`), are scored teacher-forced; per completion token
the server's top-k log-probs enter the objective exactly as a store's rows do
(:class:`~nemo_kd.losses.objective.TopKTeacher` with ``lse = 0``, the store's ``values_encoding:
logprobs``):

* ``renormalized``: ``softmax(s·v)`` over the k ids, with ``v_i = z_i − LSE`` the log-probs: a
  per-row shift of the raw logits ``z``, so any ``target_logits_scale`` ``s`` gives what the raw
  logits give;
* ``exact_tail``: ``p_i = exp(v_i − 0)`` and the tail bucket ``1 − Σ_k p_i``, exact at ``s = 1``;
  at ``s ≠ 1`` it needs ``LSE(s·z)`` over the whole vocabulary, which log-probs cannot give, so that
  combination is refused when the model is built (as for a store), as is a cross-tokenizer teacher.

A row is sent as one sequence: its tokens up to its last completion token (packed rows: each segment
on its own), ``first`` = its first completion token; the rows of the answer at the completion tokens
(``loss_mask``) are placed at their label positions, as :func:`nemo_kd.data.kd_dataset.collate`
places a store's rows. ``teacher_seq_logprob`` is the sum of the scored tokens' log-probs.

Overlap with training
---------------------
* Supervised steps: the sampler knows the next step's rows, so when step ``t`` has its rows, step
  ``t + 1``'s requests are submitted (at most one step ahead) and run on the client's asyncio thread
  while step ``t`` trains. What a step takes is matched by its sample indices: a prefetch made for
  other rows (a resume, another data order) is cancelled and the step fetches its own, so prefetching
  never changes what a step trains on.
* On-policy steps: each microbatch's samples are submitted as soon as they are drawn
  (``resample_step(on_sampled=...)``), so the network overlaps the next microbatch's sampling.

``teacher_wait_s`` (seconds the step blocked on the server) and ``teacher_wait_frac`` (of the step's
wall time) are logged every step. Every tensor-parallel / pipeline rank of a data-parallel group
requests its own microbatches' rows (the same requests; a server answers them alike); no collective
is needed, so a failing server fails every rank with the same error. That error names the step,
microbatch, row and sample, the endpoint (without credentials) and the server's own message.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from nemo_kd.losses.objective import DistillationLossConfig
from nemo_kd.teacher.served import ServedTeacher, ServedTeacherConfig, ScoredTokens

__all__ = ["SERVED_TEACHER_KEYS", "ServedStepTeacher", "ServedTrainingConfig"]

SERVED_TEACHER_KEYS = frozenset({"mode", "top_k", *ServedTeacherConfig.field_names()})
# what the objective reads from a microbatch's teacher side (the keys collate writes for a store)
_TEACHER_KEYS = ("teacher_values", "teacher_ids", "teacher_lse", "teacher_seq_logprob", "teacher_log_tail")


@dataclass
class ServedTrainingConfig:
    """``model.teacher`` with ``mode: served``: the client's settings and the top-k per token."""

    client: ServedTeacherConfig
    top_k: int = 20  # vLLM's default --max-logprobs; a larger k needs the server started with more

    @classmethod
    def from_teacher_section(cls, teacher: Dict, loss_cfg: DistillationLossConfig) -> "ServedTrainingConfig":
        """Validate ``model.teacher`` (``mode: served``) against the objective; refusals name the key."""
        other = sorted(set(teacher) - SERVED_TEACHER_KEYS)
        if other:
            raise ValueError(f"teacher.mode=served: teacher.{other[0]} does not apply to a served teacher (its keys: "
                             f"{sorted(SERVED_TEACHER_KEYS)}); a cross-tokenizer or co-located teacher is "
                             "teacher.mode=online")
        top_k = int(teacher.get("top_k") or 20)
        if top_k < 1:
            raise ValueError(f"teacher.top_k must be >= 1, got {top_k}")
        if loss_cfg.topk_convention == "exact_tail" and loss_cfg.target_logits_scale != 1.0:
            raise ValueError(
                "teacher.mode=served with kd.topk_convention=exact_tail and kd.target_logits_scale="
                f"{loss_cfg.target_logits_scale}: a server reports log-probs at temperature 1, not raw logits, so the "
                "tail mass 1 - sum(p) at another teacher temperature cannot be computed (it needs the log-sum-exp "
                "of the scaled logits over the whole vocabulary): use kd.topk_convention=renormalized (exact with "
                "log-probs at any temperature: a softmax over the top-k ignores the per-row shift) or "
                "kd.target_logits_scale=1")
        fields = {k: v for k, v in teacher.items() if k not in ("mode", "top_k")}
        return cls(client=ServedTeacherConfig(**fields), top_k=top_k)


@dataclass
class _RowRequest:
    """One sequence sent for scoring and where its answer goes in the microbatch."""

    row: int
    label_positions: torch.Tensor  # [n] label positions t (token t + 1 is the completion token scored)
    selected: torch.Tensor  # [n] rows of the answer (tokens first .. last) that are completion tokens
    future: concurrent.futures.Future


@dataclass
class _PendingMicrobatch:
    microbatch: Dict[str, torch.Tensor]
    requests: List[_RowRequest]


def _cancel(pending: Sequence[_PendingMicrobatch]) -> None:
    """Cancel every request of ``pending`` still in flight (a finished one keeps its answer, unused)."""
    for p in pending:
        for req in p.requests:
            req.future.cancel()


def _row_segments(mb: Dict[str, torch.Tensor], r: int) -> List[Tuple[int, int]]:
    """``(offset, length)`` of the sequences in row ``r``: the whole row, or each packed segment."""
    if "segment_ids" not in mb:
        return [(0, mb["inputs"].shape[1])]
    seg = mb["segment_ids"][r]
    out = []
    for j in torch.unique(seg[seg >= 0]).tolist():
        pos = (seg == j).nonzero().flatten()
        out.append((int(pos[0]), int(pos[-1]) - int(pos[0]) + 1))
    return out


class ServedStepTeacher:
    """The served teacher of a training run: fetches, prefetches and attaches every step's teacher rows."""

    def __init__(self, cfg: ServedTrainingConfig, vocab_size: Optional[int] = None):
        self.cfg = cfg
        self.teacher = ServedTeacher(cfg.client, tokenizer_size=vocab_size)
        if vocab_size is not None and self.teacher.vocab_size > vocab_size:
            self.teacher.close()
            raise ValueError(f"the served teacher {self.teacher.name!r} has a vocabulary of {self.teacher.vocab_size} "
                             f"tokens, more than student.vocab_size ({vocab_size}): a served teacher must share the "
                             "student's tokenizer (cross-tokenizer KD: teacher.mode=online with teacher.tokenizer)")
        self._prefetched: Optional[Tuple[int, tuple, List[_PendingMicrobatch]]] = None  # (step, key, pending)
        self._sampled: List[_PendingMicrobatch] = []  # this on-policy step's microbatches, submitted as drawn
        self.prefetch_hits = 0  # steps whose rows were already requested (tests, logs)
        self.wait_s = 0.0

    # ------------------------------------------------------------------ requests

    def _submit(self, mb: Dict[str, torch.Tensor], where: str) -> _PendingMicrobatch:
        requests = []
        sample_index = mb.get("sample_index")
        for r in range(mb["inputs"].shape[0]):
            for o, length in _row_segments(mb, r):
                # the sequence of this segment: inputs[o] then labels[o : o+length] (collate's shift)
                seq = torch.cat([mb["inputs"][r, o:o + 1], mb["labels"][r, o:o + length]])
                completion = (mb["loss_mask"][r, o:o + length] > 0).nonzero().flatten() + 1  # token positions
                if completion.numel() == 0:
                    continue
                first, last = int(completion[0]), int(completion[-1])
                name = f"{where}, row {r}" + (f" (sample {int(sample_index[r])})" if sample_index is not None else "")
                fut = self.teacher.submit_score(seq[:last + 1].tolist(), first, self.cfg.top_k, name)
                requests.append(_RowRequest(r, o + completion - 1, completion - first, fut))
        return _PendingMicrobatch(mb, requests)

    def _collect(self, pending: _PendingMicrobatch, cancel_all: bool = True) -> Dict[str, torch.Tensor]:
        """The microbatch with the teacher rows a store would give (``values`` log-probs, ``lse`` 0)."""
        mb = pending.microbatch
        b, s = mb["inputs"].shape
        k = self.cfg.top_k
        values = torch.full((b, s, k), float("-inf"))
        ids = torch.zeros(b, s, k, dtype=torch.long)
        seq_logprob = torch.zeros(b, dtype=torch.float64)
        try:
            for req in pending.requests:
                got: ScoredTokens = req.future.result()
                sel = req.selected
                values[req.row, req.label_positions] = torch.from_numpy(got.values)[sel]
                ids[req.row, req.label_positions] = torch.from_numpy(got.ids)[sel]
                seq_logprob[req.row] += torch.from_numpy(got.label_logprobs)[sel].double().sum()
        except BaseException:  # the run stops here: nothing of this step trains, nothing ahead is kept
            if cancel_all:
                self.cancel()
            _cancel([pending])
            raise
        out = {key: v for key, v in mb.items() if key not in _TEACHER_KEYS}
        out.update(teacher_values=values, teacher_ids=ids, teacher_lse=torch.zeros(b, s),
                   teacher_seq_logprob=seq_logprob)
        return out

    @staticmethod
    def _key(microbatches: Sequence[Dict[str, torch.Tensor]]) -> tuple:
        return tuple(tuple(mb["sample_index"].tolist()) if "sample_index" in mb else id(mb) for mb in microbatches)

    def cancel(self) -> None:
        """Drop what is in flight (a prefetch, sampled microbatches that will not train)."""
        self.cancel_prefetch()
        _cancel(self._sampled)
        self._sampled = []

    # ------------------------------------------------------------------ the step's hooks

    def submit_sampled(self, step: int, index: int, mb: Dict[str, torch.Tensor]) -> None:
        """On-policy: ``resample_step``'s ``on_sampled`` callback; the microbatch's samples go out now."""
        self._sampled.append(self._submit(mb, f"step {step}, on-policy microbatch {index}"))

    def prefetch(self, step: int, microbatches: Callable[[], List[Dict[str, torch.Tensor]]]) -> None:
        """Request step ``step``'s rows now (``microbatches``: called here, on the dataset's rows)."""
        self.cancel_prefetch()
        mbs = microbatches()
        self._prefetched = (step, self._key(mbs),
                            [self._submit(mb, f"step {step} (prefetched), microbatch {i}") for i, mb in enumerate(mbs)])

    def cancel_prefetch(self) -> None:
        if self._prefetched is not None:
            _cancel(self._prefetched[2])
            self._prefetched = None

    def attach(self, step: int, microbatches: List[Dict[str, torch.Tensor]]) -> List[Dict[str, torch.Tensor]]:
        """``microbatches`` with their teacher rows: those submitted for exactly these rows (sampled or
        prefetched), else requested now. ``wait_s``: the seconds this blocked on the server."""
        t0 = time.perf_counter()
        if len(self._sampled) == len(microbatches) and \
                all(p.microbatch is mb for p, mb in zip(self._sampled, microbatches)):
            pending = self._sampled
        elif self._prefetched is not None and self._prefetched[:2] == (step, self._key(microbatches)):
            pending = self._prefetched[2]
            self.prefetch_hits += 1
        else:
            self.cancel()
            pending = [self._submit(mb, f"step {step}, microbatch {i}") for i, mb in enumerate(microbatches)]
        self._sampled, self._prefetched = [], None
        out = [self._collect(p) for p in pending]
        self.wait_s = time.perf_counter() - t0
        return out

    def score_now(self, microbatches: List[Dict[str, torch.Tensor]], where: str) -> List[Dict[str, torch.Tensor]]:
        """``microbatches`` with their teacher rows, requested now (validation); a prefetch stays in flight."""
        return [self._collect(self._submit(mb, f"{where}, microbatch {i}"), cancel_all=False)
                for i, mb in enumerate(microbatches)]

    def step_metrics(self, step_seconds: float) -> Dict[str, float]:
        return {"teacher_wait_s": self.wait_s, "teacher_wait_frac": self.wait_s / max(step_seconds, 1e-9)}

    def close(self) -> None:
        self.cancel()
        self.teacher.close()

