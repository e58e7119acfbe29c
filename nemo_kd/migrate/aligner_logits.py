"""NeMo-Aligner's top-k teacher logits (JSONL) imported into nemo_kd's verified logits store.

``nemo-kd-import-aligner-logits --aligner-jsonl F [--aligner-jsonl F2 ...] --data RECORDS.jsonl
--tokenizer TOKENIZER_DIR --output STORE_DIR --max-seq-length N`` reads the files NeMo-Aligner's
``examples/nlp/synthetic_data_gen/compute_topk_logits.py`` wrote and writes the same store
``nemo-kd-compute-topk-logits`` would have written for ``RECORDS`` (same dataset hash, tokenizer
hash, ``max_seq_length`` and ``k``): training joins it to the records exactly like an extracted
store (:class:`~nemo_kd.data.kd_dataset.DistillationDataset`, ``check_compatible``).

What Aligner writes (read from its sources: ``compute_topk_logits.py``,
``nemo_aligner/utils/distributed.py:compute_topk_logits_in_batched_sequence`` and NeMo's
``GPTSFTDataset.collate_fn``), one JSON object per sample and line:

* every field of the SFT collate row: ``tokens = input_ids[:-1]``, ``labels = input_ids[1:]``,
  ``loss_mask = mask[1:]`` (so ``loss_mask[t]`` is about ``labels[t]``), ``context_lengths``,
  ``contexts``, ``answers``, ...; rows are right-padded (with EOS, mask 0) to the batch's longest
  sample rounded up to a multiple of 8;
* ``topk_logits`` ``[S][k]`` and ``topk_token_ids`` ``[S][k]``: the teacher's top-k at *every*
  position ``t`` of ``tokens`` – the distribution of ``labels[t]`` – taken from the logits minus
  their row maximum (values <= 0, descending);
* ``log_sum_exp_logits`` ``[S]``: the log-sum-exp of those shifted logits over the full
  vocabulary (older Aligner versions do not write it);
* ``index``: the sample's index in the SFT dataset file the run read (chunks cover
  ``start_from_idx..end_at_idx``; a resumed run appends to its file, skipping indices present).

Join. The line with ``index = i`` belongs to sample ``i`` of ``--data`` (the same samples, in the
same order, as Aligner's SFT file). Sample ``i`` is tokenised the nemo_kd way
(:class:`~nemo_kd.data.tokenization.ConversationTokenizer`: ``--tokenizer``, ``--prompt-format``,
``--max-seq-length``, ``--overlong``, as training will); with ``L`` tokens of which the first
``P`` are prompt, the teacher must have read ``tokens[0..L-2]`` equal to those tokens, with
``labels[t]`` equal to token ``t+1`` and ``loss_mask`` 1 exactly on ``t >= P-1`` (and 0 after ``L-2``, unless
nemo_kd truncated the sample: a causal teacher's logits on a prefix do not depend on what
follows). Otherwise the line is refused, naming file, line, index and the first differing token
position: the logits would belong to other tokens (another tokenizer, chat template or length
limit). The store's row ``r`` (completion token ``P + r``) holds Aligner's position ``t = P-1+r``.
Values are kept as Aligner wrote them (max-shifted logits: every use of the store – softmax over
the k, ``z - LSE``, a temperature – is invariant to a per-row shift), sorted by value descending,
ties by lower id (the store's convention), optionally cut to ``--top-k``.

Log-sum-exp. With ``log_sum_exp_logits`` on every line it is stored (full vocabulary:
``topk_convention: exact_tail`` is available); it must not be below the log-sum-exp of the line's
own top-k (``--lse-tolerance``). Without it (on any line) the store's ``lse`` is the log-sum-exp
of the k stored logits and the manifest records ``unavailable_statistics:
["full_vocabulary_lse", ...]``: training with ``exact_tail`` on it is refused
(:meth:`~nemo_kd.teacher.store.StoreReader.check_topk_convention`). The per-sample
``seq_logprob`` (the teacher's log-prob of the reference completion, the DPO/DPKD reference) is
never known from a top-k file: it is written as 0 and listed as unavailable too; a file of
preference pairs is refused for that reason.

Refused, naming ``file:line`` and the field: malformed JSON, a missing field (``index``,
``tokens``, ``labels``, ``loss_mask``, ``topk_logits``, ``topk_token_ids``), rows of different
lengths or a ``k`` that differs between rows or lines, non-finite logits or LSE at a stored
position, token ids outside the vocabulary (``--teacher-vocab-size``, default the tokenizer's
size) or repeated within a row, an index outside ``--data``, two lines of one index with different
stored data (a line identical to an earlier one – a resumed run – is accepted once), and samples of
``--data`` no line covers (how many, and the first indices).

Reading is one pass (each line parsed once, by ``--workers`` processes: JSON decoding dominates, about
0.3 s for a 4096 x 100 line; the completion rows spilled to a scratch file), then
the store is written in sample order with :class:`~nemo_kd.teacher.store.StoreWriter`, re-opened,
its checksums verified and checked with ``check_compatible`` against the dataset, and only then
renamed into place: ``--output`` either does not exist or is a finished store.

This module imports only the standard library at import time, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["AlignerImportError", "ImportSummary", "build_parser", "import_aligner_logits", "main"]

PROG = "nemo-kd-import-aligner-logits"
REQUIRED_FIELDS = ("index", "tokens", "labels", "loss_mask", "topk_logits", "topk_token_ids")
LSE_FIELD = "log_sum_exp_logits"
DEFAULT_LSE_TOLERANCE = 0.05  # nats; Aligner computes the LSE in the model's (bf16) dtype
_VALUES_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_MISSING_SHOWN = 10  # indices named when samples have no line


class AlignerImportError(ValueError):
    """An Aligner file that cannot be imported; the message names the file, line and field."""


@dataclass
class ImportSummary:
    """What an import did."""

    output_path: str
    num_samples: int
    num_tokens: int  # completion tokens in the store
    k: int
    values_dtype: str
    exact_tail_available: bool
    files: List[str]
    lines: int  # lines read (non-blank)
    duplicates: int  # identical duplicate lines skipped
    lines_without_lse: int
    truncated: int  # samples nemo_kd truncated at max_seq_length
    dropped: int  # samples nemo_kd dropped as over-long (0 tokens in the store)
    manifest: Dict[str, Any] = field(default_factory=dict, repr=False)

    def format(self) -> str:
        """The one-line summary the CLI prints."""
        extra = "".join(f", {n} {what}" for n, what in ((self.truncated, "truncated"), (self.dropped, "dropped as over-long"))
                        if n)
        if self.exact_tail_available:
            tail = "exact_tail available (full-vocabulary log_sum_exp_logits)"
        else:
            tail = (f"exact_tail unavailable ({self.lines_without_lse} line(s) without log_sum_exp_logits: the store's "
                    "LSE covers its k logits only; train with kd.topk_convention=renormalized)")
        return (f"{PROG}: {self.num_samples} samples, {self.num_tokens} completion tokens, k={self.k} "
                f"({self.values_dtype}{extra}) from {len(self.files)} file(s) ({self.lines} lines, {self.duplicates} "
                f"identical duplicate(s) skipped) -> {self.output_path}; {tail}")


# ----------------------------------------------------------------------------- one line


class _Line:
    """Where a line came from, for messages."""

    __slots__ = ("file", "line")

    def __init__(self, file: str, line: int):
        self.file, self.line = file, line

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def _int_list(obj: dict, name: str, where: _Line):
    import numpy as np

    value = obj[name]
    if not isinstance(value, list) or not value:
        raise AlignerImportError(f"{where}: field '{name}' must be a non-empty list of integers, got "
                                 f"{type(value).__name__}")
    try:
        arr = np.asarray(value)
    except ValueError:
        raise AlignerImportError(f"{where}: field '{name}' is ragged (nested lists of different lengths)") from None
    if arr.ndim != 1 or arr.dtype.kind not in "iub":
        raise AlignerImportError(f"{where}: field '{name}' must be a flat list of integers (got shape {arr.shape}, "
                                 f"dtype {arr.dtype})")
    return arr.astype(np.int64)


def _matrix(obj: dict, name: str, where: _Line, rows: int, kind: str, keep: slice):
    """Rows ``keep`` of ``obj[name]``, a ``[rows][k]`` list (``kind``: "f" float64 / "i" int64), and ``k``.

    The shape is checked on every row (ragged rows named); only the kept rows are converted."""
    import numpy as np

    value = obj[name]
    if not isinstance(value, list) or any(not isinstance(r, list) for r in value):
        raise AlignerImportError(f"{where}: field '{name}' must be a list of per-position lists [S][k]")
    if len(value) != rows:
        raise AlignerImportError(f"{where}: field '{name}' has {len(value)} positions, 'tokens' has {rows}")
    k = len(value[0])
    bad = next((t for t, r in enumerate(value) if len(r) != k), None)
    if bad is not None:
        raise AlignerImportError(f"{where}: field '{name}' is ragged: position 0 has k={k} entries, position {bad} "
                                 f"has {len(value[bad])}")
    if k < 1:
        raise AlignerImportError(f"{where}: field '{name}' has k=0 entries per position")
    part = value[keep]
    try:
        arr = np.asarray(part, dtype=np.float64 if kind == "f" else None).reshape(len(part), k)
    except (ValueError, TypeError) as e:
        raise AlignerImportError(f"{where}: field '{name}' holds non-numbers ({e})") from None
    if kind == "i":
        if arr.size and arr.dtype.kind not in "iu":
            raise AlignerImportError(f"{where}: field '{name}' must hold integer token ids, got {arr.dtype}")
        arr = arr.astype(np.int64)
    return arr, k


def _piece(tokenizer, token_id: int) -> str:
    try:
        return repr(tokenizer.convert_ids_to_tokens(int(token_id)))
    except Exception:  # noqa: BLE001 - only for a message
        return "?"


@dataclass
class _Context:
    """What parsing a line needs (shared with worker processes)."""

    ctok: Any  # nemo_kd's ConversationTokenizer
    samples: list  # TokenizedSample | None per sample of --data
    sample_names: List[str]
    vocab_size: int
    top_k: Optional[int]
    lse_tolerance: float
    data_path: str


@dataclass
class _Parsed:
    """One line, checked and cut to the sample's completion rows (store order, ``--top-k`` applied)."""

    where: _Line
    index: int
    k: int  # the line's k (before --top-k)
    values: Any  # float32 [n, k']
    ids: Any  # int32 [n, k']
    lse_k: Any  # float32 [n]: log-sum-exp of the kept logits
    lse_full: Any  # float32 [n] (log_sum_exp_logits) or None
    digests: Tuple[str, str, str]


def _mismatch(ctx: _Context, where: _Line, i: int, position: int, what: str) -> AlignerImportError:
    ts, c = ctx.samples[i], ctx.ctok
    return AlignerImportError(
        f"{where}: index {i} ({ctx.sample_names[i]}): Aligner's tokens differ from nemo_kd's tokenisation at token "
        f"position {position}: {what}. nemo_kd renders the sample as {len(ts.input_ids)} tokens, {ts.num_prompt_tokens} "
        f"of them prompt (tokenizer hash {c.hash[:16]}..., prompt_format={c.prompt_format}, max_seq_length="
        f"{c.max_seq_length}); the teacher's logits belong to other tokens: Aligner read the data with another "
        "tokenizer, chat template or length limit (or --data is not the file Aligner read, in its order)")


def _check_tokens(ctx: _Context, where: _Line, i: int, tokens, labels, loss_mask) -> None:
    """Aligner's row against nemo_kd's tokenisation of sample ``i`` (module docstring, "Join")."""
    import numpy as np

    ts, tok = ctx.samples[i], ctx.ctok.tokenizer
    ids = np.asarray(ts.input_ids, dtype=np.int64)
    n_tok, p = len(ids), ts.num_prompt_tokens
    s = len(tokens)
    m = min(s, n_tok - 1)  # positions t both sides have: tokens[t] ~ ids[t], labels[t] ~ ids[t + 1]
    first: List[Tuple[int, str]] = []
    bad = np.nonzero(tokens[:m] != ids[:m])[0]
    if bad.size:
        t = int(bad[0])
        first.append((t, f"the teacher read token {int(tokens[t])} ({_piece(tok, tokens[t])}) ('tokens'[{t}]), "
                         f"nemo_kd has {int(ids[t])} ({_piece(tok, ids[t])})"))
    # The labels of the completion positions (the prompt's tokens are checked through 'tokens').
    bad = np.nonzero((labels[:m] != ids[1:m + 1]) & (np.arange(m) >= p - 1))[0]
    if bad.size:
        t = int(bad[0])
        first.append((t + 1, f"Aligner's label is {int(labels[t])} ({_piece(tok, labels[t])}) ('labels'[{t}]), "
                             f"nemo_kd's token is {int(ids[t + 1])} ({_piece(tok, ids[t + 1])})"))
    want = (np.arange(m) >= p - 1).astype(np.int64)
    bad = np.nonzero((loss_mask[:m] != 0).astype(np.int64) != want)[0]
    if bad.size:
        t = int(bad[0])
        side = "completion" if loss_mask[t] else "prompt"
        first.append((t + 1, f"Aligner's loss_mask[{t}] = {int(loss_mask[t])} makes it {side}, nemo_kd's "
                             f"completion starts at position {p}"))
    if s < n_tok - 1:
        first.append((s + 1, f"Aligner's row ends after {s} positions ({s + 1} tokens), nemo_kd's sample has "
                             f"{n_tok} tokens"))
    elif not ts.truncated:  # a sample nemo_kd truncated may go on in Aligner's row: those rows are not used
        extra = np.nonzero(loss_mask[m:] != 0)[0]
        if extra.size:
            t = m + int(extra[0])
            first.append((t + 1, f"Aligner's loss_mask[{t}] marks a completion token there, nemo_kd's sample ends "
                                 f"after {n_tok} tokens"))
    if first:
        position, what = min(first, key=lambda x: x[0])
        raise _mismatch(ctx, where, i, position, what)


def _at(where: _Line, i: int, name: str, t: int, p: int) -> str:
    return f"{where}: index {i}: field '{name}' at position {t} (it predicts completion token {t + 1 - p}, 0-based, of sample {i})"


def _parse(ctx: _Context, where: _Line, raw: bytes) -> _Parsed:
    """Decode and check one Aligner line (everything that needs no other line)."""
    import numpy as np

    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignerImportError(f"{where}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise AlignerImportError(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in obj]
    if missing:
        raise AlignerImportError(f"{where}: missing field(s) {missing} (NeMo-Aligner's compute_topk_logits writes "
                                 f"{list(REQUIRED_FIELDS)} and {LSE_FIELD} on every line)")
    i = obj["index"]
    if isinstance(i, bool) or not isinstance(i, int):
        raise AlignerImportError(f"{where}: field 'index' must be an integer, got {i!r}")
    n = len(ctx.samples)
    if not 0 <= i < n:
        raise AlignerImportError(f"{where}: field 'index' = {i} is outside --data {ctx.data_path} ({n} samples, "
                                 f"indices 0..{n - 1})")
    tokens = _int_list(obj, "tokens", where)
    s = len(tokens)
    labels, loss_mask = _int_list(obj, "labels", where), _int_list(obj, "loss_mask", where)
    for name, arr in (("labels", labels), ("loss_mask", loss_mask)):
        if len(arr) != s:
            raise AlignerImportError(f"{where}: field '{name}' has {len(arr)} positions, 'tokens' has {s}")
    ts = ctx.samples[i]
    if ts is not None:
        _check_tokens(ctx, where, i, tokens, labels, loss_mask)
        p = ts.num_prompt_tokens
        rows = slice(p - 1, len(ts.input_ids) - 1)  # position t predicts token t+1: completion tokens P..L-1
    else:  # dropped as over-long (--overlong drop): 0 tokens in the store, as extraction writes it
        p, rows = 0, slice(0, 0)
    v, k = _matrix(obj, "topk_logits", where, s, "f", rows)
    t_ids, k_ids = _matrix(obj, "topk_token_ids", where, s, "i", rows)
    if k_ids != k:
        raise AlignerImportError(f"{where}: 'topk_token_ids' has k={k_ids} per position, 'topk_logits' k={k}")
    if ctx.top_k is not None and ctx.top_k > k:
        raise AlignerImportError(f"{where}: --top-k {ctx.top_k} but the line holds k={k} logits per position")
    full = None
    if obj.get(LSE_FIELD) is not None:
        try:
            full = np.asarray(obj[LSE_FIELD], dtype=np.float64)
        except (ValueError, TypeError):
            raise AlignerImportError(f"{where}: field '{LSE_FIELD}' must be a list of numbers") from None
        if full.shape != (s,):
            raise AlignerImportError(f"{where}: field '{LSE_FIELD}' has shape {list(full.shape)}, expected [{s}] (one "
                                     "per position of 'tokens')")
        full = full[rows]

    bad = np.nonzero(~np.isfinite(v))
    if bad[0].size:
        r, c = int(bad[0][0]), int(bad[1][0])
        raise AlignerImportError(f"{_at(where, i, 'topk_logits', rows.start + r, p)}: non-finite value {v[r, c]} "
                                 f"(entry {c}): the teacher produced NaN/Inf logits")
    bad = np.nonzero((t_ids < 0) | (t_ids >= ctx.vocab_size))
    if bad[0].size:
        r, c = int(bad[0][0]), int(bad[1][0])
        raise AlignerImportError(
            f"{_at(where, i, 'topk_token_ids', rows.start + r, p)}: token id {int(t_ids[r, c])} is outside the "
            f"vocabulary [0, {ctx.vocab_size}) (the tokenizer's size; --teacher-vocab-size for a teacher whose real "
            "vocabulary is larger)")
    dup = np.nonzero((np.diff(np.sort(t_ids, axis=1), axis=1) == 0).any(axis=1))[0]
    if dup.size:
        raise AlignerImportError(f"{_at(where, i, 'topk_token_ids', rows.start + int(dup[0]), p)}: a token id "
                                 "appears twice among the top-k")
    # The store's order: value descending, ties by the lower id; then --top-k.
    v32 = v.astype(np.float32)
    order = np.lexsort((t_ids, -v32), axis=-1)
    keep = ctx.top_k or k
    v32 = np.take_along_axis(v32, order, axis=1)[:, :keep]
    i32 = np.take_along_axis(t_ids, order, axis=1).astype(np.int32)[:, :keep]
    v64 = np.take_along_axis(v, order, axis=1)[:, :keep]
    top = v64.max(axis=1) if len(v64) else np.zeros(0)
    lse_k64 = top + np.log(np.exp(v64 - top[:, None]).sum(axis=1))
    lse_f = None
    if full is not None:
        bad = np.nonzero(~np.isfinite(full))[0]
        if bad.size:
            r = int(bad[0])
            raise AlignerImportError(f"{_at(where, i, LSE_FIELD, rows.start + r, p)}: non-finite value {full[r]}")
        low = np.nonzero(full < lse_k64 - ctx.lse_tolerance)[0]
        if low.size:
            r = int(low[0])
            raise AlignerImportError(
                f"{_at(where, i, LSE_FIELD, rows.start + r, p)}: {full[r]} is below the log-sum-exp of the position's "
                f"own top-{keep} logits ({lse_k64[r]:.6g}, tolerance {ctx.lse_tolerance}): not the full-vocabulary "
                "log-sum-exp of these logits")
        lse_f = full.astype(np.float32)
    digests = (hashlib.sha256(v32.tobytes()).hexdigest(), hashlib.sha256(i32.tobytes()).hexdigest(),
               hashlib.sha256(lse_f.tobytes() if lse_f is not None else b"absent").hexdigest())
    return _Parsed(where, i, k, np.ascontiguousarray(v32), np.ascontiguousarray(i32), lse_k64.astype(np.float32),
                   lse_f, digests)


_WORKER_CONTEXT: Optional[_Context] = None  # set in the parent before the worker processes fork


def _parse_in_worker(item: Tuple[str, int, bytes]) -> _Parsed:
    file, line, raw = item
    return _parse(_WORKER_CONTEXT, _Line(file, line), raw)


def _parsed_lines(ctx: _Context, files: Sequence[str], workers: int, hashers: Dict[str, Any]):
    """Every non-blank line of ``files``, parsed, in file order (``workers`` processes parse, a bounded window);
    ``hashers[file]`` digests each file on the way."""
    items = ((path, lineno, raw) for path in files for lineno, raw in _iter_lines(path, hashers[path]))
    if workers <= 1 or "fork" not in __import__("multiprocessing").get_all_start_methods():
        for path, lineno, raw in items:
            yield _parse(ctx, _Line(path, lineno), raw)
        return
    import multiprocessing
    from collections import deque

    global _WORKER_CONTEXT
    _WORKER_CONTEXT = ctx
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pending = deque()
            for item in items:  # at most 2 lines per worker in flight: memory stays bounded
                pending.append(pool.apply_async(_parse_in_worker, (item,)))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().get()
            while pending:
                yield pending.popleft().get()
    finally:
        _WORKER_CONTEXT = None


class _Collector:
    """Cross-line checks (k, duplicates) and the scratch file of accepted rows."""

    def __init__(self, scratch):
        self.scratch = scratch
        self.k: Optional[int] = None
        self.k_from: Optional[_Line] = None
        self.seen: Dict[int, Tuple[_Line, Tuple[str, str, str]]] = {}
        self.offsets: Dict[int, Tuple[int, int]] = {}  # index -> (scratch offset, rows)
        self.lines = self.duplicates = self.lines_without_lse = 0
        self._bytes = 0

    def add(self, parsed: _Parsed) -> None:
        import numpy as np

        self.lines += 1
        where, i = parsed.where, parsed.index
        if self.k is None:
            self.k, self.k_from = parsed.k, where
        elif parsed.k != self.k:
            raise AlignerImportError(f"{where}: field 'topk_logits' has k={parsed.k} per position, {self.k_from} has "
                                     f"k={self.k}: every line must hold the same k")
        if parsed.lse_full is None:
            self.lines_without_lse += 1
        if i in self.seen:
            first, theirs = self.seen[i]
            if theirs == parsed.digests:
                self.duplicates += 1  # a resumed run wrote the sample again: the same data, taken once
                return
            fields = [name for name, a, b in zip(("topk_logits", "topk_token_ids", LSE_FIELD), theirs, parsed.digests)
                      if a != b]
            raise AlignerImportError(f"{where}: index {i} appeared before at {first} with different {', '.join(fields)} "
                                     "at its completion positions: two teacher runs disagree on one sample (refusing "
                                     "to pick one)")
        self.seen[i] = (where, parsed.digests)
        n = len(parsed.values)
        self.offsets[i] = (self._bytes, n)
        lse_f = parsed.lse_full if parsed.lse_full is not None else np.zeros(n, np.float32)
        for arr in (parsed.values, parsed.ids, parsed.lse_k, lse_f):
            data = np.ascontiguousarray(arr).tobytes()
            self.scratch.write(data)
            self._bytes += len(data)

    def read(self, i: int, k: int, use_full_lse: bool):
        import numpy as np

        offset, n = self.offsets[i]
        self.scratch.seek(offset)
        v = np.frombuffer(self.scratch.read(4 * n * k), dtype=np.float32).reshape(n, k)
        ids = np.frombuffer(self.scratch.read(4 * n * k), dtype=np.int32).reshape(n, k)
        lse_k = np.frombuffer(self.scratch.read(4 * n), dtype=np.float32)
        lse_f = np.frombuffer(self.scratch.read(4 * n), dtype=np.float32)
        return v, ids, (lse_f if use_full_lse else lse_k)


def _iter_lines(path: str, hasher=None):
    """``(line number, bytes)`` of every non-blank line; ``hasher`` sees every byte of the file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if hasher is not None:
                hasher.update(raw)
            if raw.strip():
                yield lineno, raw


def _files_digest(hashers: Dict[str, Any]) -> str:
    """One digest of the input files' contents, whatever their order on the command line."""
    return "sha256:" + hashlib.sha256("\n".join(sorted(h.hexdigest() for h in hashers.values())).encode()).hexdigest()


def import_aligner_logits(
    aligner_jsonl: Sequence[str],
    data_path: str,
    tokenizer,
    output_path: str,
    max_seq_length: int,
    values_dtype: str = "bfloat16",
    prompt_format: str = "chat",
    overlong: str = "truncate",
    top_k: Optional[int] = None,
    teacher_vocab_size: Optional[int] = None,
    split: Optional[str] = None,
    lse_tolerance: float = DEFAULT_LSE_TOLERANCE,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
) -> ImportSummary:
    """Import Aligner top-k JSONL files into a logits store at ``output_path`` (module docstring).

    ``tokenizer``: a Hugging Face fast tokenizer or its directory (the student's, as training
    loads it). ``values_dtype``: ``float32`` or ``bfloat16`` (``fp32`` / ``bf16`` accepted).
    ``workers``: processes parsing lines (JSON decoding dominates: ~0.3 s for a 4096 x 100 line).
    Raises :class:`AlignerImportError` (file:line and field), :class:`~nemo_kd.data.records.DataError`
    for a malformed records file, :class:`~nemo_kd.data.tokenization.TokenizationError`.
    """
    from nemo_kd.data.records import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer, TokenizationError
    from nemo_kd.teacher.store import FULL_VOCABULARY_LSE, SEQ_LOGPROB, StoreManifest, StoreReader, StoreWriter

    files = [os.fspath(f) for f in aligner_jsonl]
    if not files:
        raise AlignerImportError("no Aligner file given (--aligner-jsonl)")
    for f in files:
        if not os.path.isfile(f):
            raise AlignerImportError(f"{f}: no such file (--aligner-jsonl)")
    if values_dtype not in _VALUES_DTYPES:
        raise ValueError(f"values_dtype must be one of {sorted(_VALUES_DTYPES)}, got {values_dtype!r}")
    values_dtype = _VALUES_DTYPES[values_dtype]
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    output_path = os.path.abspath(os.fspath(output_path))
    if os.path.lexists(output_path) and not overwrite and (not os.path.isdir(output_path) or os.listdir(output_path)):
        raise AlignerImportError(f"{output_path} exists: refusing to overwrite it (--overwrite replaces it once the "
                                 "new store is complete)")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))
        except OSError as e:
            raise AlignerImportError(f"--tokenizer {os.fspath(tokenizer)}: cannot load a tokenizer there ({e})") from None

    records = read_records(data_path, split=split)
    if records.is_preference or any(r.role != "single" for r in records):
        raise AlignerImportError(f"{data_path} holds preference pairs: NeMo-Aligner's KD logits are computed over SFT "
                                 "samples, and a top-k file has no teacher log-prob of a whole response (the DPO/DPKD "
                                 "reference); import the SFT records Aligner read")
    ctok = ConversationTokenizer(tokenizer, prompt_format, max_seq_length, overlong)
    samples = []
    for rec in records:
        name = f"{rec.source_file}:{rec.source_line}" if rec.source_file else f"sample {rec.index}"
        ts = ctok(list(rec.messages), sample_name=name)
        if ts is not None and ts.num_prompt_tokens < 1:
            raise TokenizationError(f"{name}: the prompt renders to no tokens, so the first completion token has no "
                                    "teacher position predicting it")
        samples.append(ts)
    vocab = int(teacher_vocab_size) if teacher_vocab_size else len(ctok.tokenizer)
    names = [f"{r.source_file}:{r.source_line}" if r.source_file else f"sample {r.index} of {data_path}" for r in records]
    ctx = _Context(ctok, samples, names, vocab, top_k, lse_tolerance, os.fspath(data_path))

    parent = os.path.dirname(output_path)
    os.makedirs(parent, exist_ok=True)
    work = os.path.join(parent, f".{os.path.basename(output_path)}.importing-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    bar = None
    try:
        with open(os.path.join(work, "aligner-rows.scratch"), "w+b") as scratch:
            imp = _Collector(scratch)
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(records), unit="sample", dynamic_ncols=True, file=sys.stderr,
                           desc="reading Aligner top-k")
            hashers = {f: hashlib.sha256() for f in files}
            for parsed in _parsed_lines(ctx, files, workers, hashers):
                imp.add(parsed)
                if bar is not None and imp.lines % 16 == 0:
                    bar.n = len(imp.offsets)
                    bar.refresh()
            if bar is not None:
                bar.n = len(imp.offsets)
                bar.close()
                bar = None
            if imp.k is None:
                raise AlignerImportError(f"{', '.join(files)}: no line to import (empty file(s))")
            missing = [i for i in range(len(records)) if i not in imp.offsets]
            if missing:
                shown = ", ".join(map(str, missing[:_MISSING_SHOWN])) + (" ..." if len(missing) > _MISSING_SHOWN else "")
                raise AlignerImportError(
                    f"{len(missing)} of the {len(records)} samples of {data_path} have no line in the Aligner file(s) "
                    f"{', '.join(files)}: indices {shown}. Every sample needs its teacher logits (a chunk file "
                    "missing? start_from_idx/end_at_idx not covering the dataset?)")
            k = top_k or imp.k
            full_lse = imp.lines_without_lse == 0
            unavailable = [SEQ_LOGPROB] if full_lse else [FULL_VOCABULARY_LSE, SEQ_LOGPROB]
            shown = ", ".join(os.path.basename(f) for f in files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")
            manifest = StoreManifest(
                k=int(k), values_dtype=values_dtype, dataset_hash=records.content_hash, tokenizer_hash=ctok.hash,
                teacher_name=f"NeMo-Aligner compute_topk_logits: {shown}", teacher_hash=_files_digest(hashers),
                max_seq_length=int(max_seq_length), num_samples=len(records), logits_scale_applied=False,
                logits_scale=1.0, teacher_vocab_size=vocab, unavailable_statistics=sorted(unavailable))
            if values_dtype != "float32":  # 16-bit values as log-probs (format 3), as compute_topk_logits writes them
                manifest.values_encoding = "logprobs"
                manifest.format_version = manifest.min_reader_version = 3
            writer = StoreWriter(work, manifest, 0, 1)
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(records), unit="sample", dynamic_ncols=True, file=sys.stderr,
                           desc="writing the store")
            for i in range(len(records)):
                v, ids, lse = imp.read(i, k, full_lse)
                writer.append(i, v, ids, lse, 0.0)  # seq_logprob unknown (unavailable_statistics)
                if bar is not None:
                    bar.update(1)
            writer.finalize()
            writer.close()
            if bar is not None:
                bar.close()
                bar = None
        os.remove(os.path.join(work, "aligner-rows.scratch"))
        with StoreReader(work, verify_checksums=True) as reader:  # the store training will open, checked as it will
            reader.check_compatible(dataset_hash=records.content_hash, tokenizer_hash=ctok.hash, k=int(k),
                                    max_seq_length=int(max_seq_length), num_samples=len(records),
                                    num_completion_tokens_fn=lambda j: 0 if samples[j] is None
                                    else samples[j].num_completion_tokens)
            final = json.loads(reader.manifest.to_json())
        _move_into_place(work, output_path)
    except BaseException:
        if bar is not None:
            bar.close()
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ImportSummary(output_path=output_path, num_samples=len(records), num_tokens=int(final["num_tokens"]), k=int(k),
                         values_dtype=values_dtype, exact_tail_available=full_lse, files=files, lines=imp.lines,
                         duplicates=imp.duplicates, lines_without_lse=imp.lines_without_lse,
                         truncated=ctok.stats.truncated, dropped=ctok.stats.dropped, manifest=final)


def _move_into_place(work: str, output_path: str) -> None:
    """Rename the finished store to ``output_path`` (replacing what is there only now)."""
    old = None
    if os.path.lexists(output_path):
        if os.path.isdir(output_path) and not os.listdir(output_path):
            os.rmdir(output_path)
        else:
            old = f"{output_path}.replaced-{os.getpid()}"
            os.replace(output_path, old)
    os.replace(work, output_path)
    try:
        fd = os.open(os.path.dirname(output_path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if os.path.isdir(old) else os.remove(old)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Import NeMo-Aligner's top-k teacher logits (the JSONL files of its compute_topk_logits.py) into "
                    "a nemo_kd teacher logits store joined to the records file Aligner read: the store training "
                    "checks like one from nemo-kd-compute-topk-logits.")
    p.add_argument("--aligner-jsonl", action="append", required=True, metavar="FILE",
                   help="an Aligner top-k file (repeat for every chunk, e.g. train_with_logits_0.jsonl ...); lines in "
                        "any order, a resumed run's identical duplicates accepted")
    p.add_argument("--data", required=True, help="the records Aligner's run read (prompt/response or messages JSONL, "
                                                 "or a datasets directory), same samples in the same order")
    p.add_argument("--tokenizer", required=True, help="the student's Hugging Face tokenizer directory (the one "
                                                      "model.data.train_ds.tokenizer names)")
    p.add_argument("--output", required=True, help="the store directory to create (atomically)")
    p.add_argument("--max-seq-length", type=int, required=True,
                   help="model.data.train_ds.max_seq_length of the training run")
    p.add_argument("--prompt-format", choices=("chat", "plain"), default="chat",
                   help="model.data.train_ds.prompt_format (default chat: the tokenizer's template)")
    p.add_argument("--overlong", choices=("truncate", "drop"), default="truncate",
                   help="model.data.train_ds.overlong (default truncate)")
    p.add_argument("--values-dtype", choices=("fp32", "bf16"), default="bf16",
                   help="how the top-k values are stored (default bf16, as log-probs; fp32 keeps them exactly)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep the K largest of the files' k logits per token (Aligner's model.data.top_k)")
    p.add_argument("--teacher-vocab-size", type=int, default=None,
                   help="ids must be below this (default: the tokenizer's size)")
    p.add_argument("--split", default=None, help="the split of a DatasetDict directory given as --data")
    p.add_argument("--lse-tolerance", type=float, default=DEFAULT_LSE_TOLERANCE,
                   help="how far (nats) log_sum_exp_logits may fall below the log-sum-exp of its own top-k logits "
                        f"(default {DEFAULT_LSE_TOLERANCE}: Aligner computes it in bf16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (once the new store is done)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="processes parsing the JSON lines (default: min(8, CPUs))")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point ``nemo-kd-import-aligner-logits`` (argument parsing before any heavy import)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("max_seq_length", "top_k", "teacher_vocab_size", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from nemo_kd.data.records import DataError
    from nemo_kd.data.tokenization import TokenizationError
    from nemo_kd.teacher.store import StoreError

    try:
        summary = import_aligner_logits(
            args.aligner_jsonl, args.data, args.tokenizer, args.output, args.max_seq_length,
            values_dtype=args.values_dtype, prompt_format=args.prompt_format, overlong=args.overlong,
            top_k=args.top_k, teacher_vocab_size=args.teacher_vocab_size, split=args.split,
            lse_tolerance=args.lse_tolerance, overwrite=args.overwrite, progress=not args.no_progress,
            workers=args.workers)
    except (AlignerImportError, DataError, TokenizationError, StoreError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(summary.format(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
