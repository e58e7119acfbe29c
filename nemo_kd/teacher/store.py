"""The offline teacher logits store: sharded, memory-mapped, resumable, versioned.

A teacher is run once over the training data; for every completion token the store
keeps the teacher's top-k raw logits, their token ids and the log-sum-exp, and for
every sample the teacher's log-prob of the reference completion. Students then read
it many times, by sample index, in any order.

Format version 1 (a directory)
------------------------------
``manifest.json``
    :class:`StoreManifest` as JSON: format name/version, ``k``, ``values_dtype``,
    ``logits_scale`` / ``logits_scale_applied``, teacher name and hash, tokenizer
    hash, dataset hash, ``max_seq_length``, ``num_samples``, and per shard its
    sample range, token count, byte sizes and sha256 checksums. Written last,
    atomically, once every shard is final: a directory without it is incomplete.
``shard-{rank:05d}.bin``
    Per-token payload of DP rank ``rank``'s samples, one block per sample at the
    byte offset given by the index. A sample with ``n`` completion tokens is::

        ids     int32  [n, k]   little-endian, top-k token ids (descending value)
        lse     fp32   [n]      log-sum-exp of the teacher's raw logits
        values  VT     [n, k]   top-k raw logits; VT = fp32 | fp16 | bf16 (bf16
                                stored as its raw uint16 bit pattern)
        pad     0..2 zero bytes to a 4-byte boundary (keeps int32/fp32 aligned)

    i.e. ``6k + 4`` bytes per token at bf16/fp16 (``8k + 4`` at fp32).
``shard-{rank:05d}.idx``
    A ``.npy`` file (``np.load(mmap_mode="r")``), one packed row per sample:
    ``sample_index int64, offset int64, num_tokens int32, seq_logprob float64``
    (28 bytes). With the at most 2 bytes of padding and its 32 bytes of checksums
    (``.sum`` below), a sample costs ``6k + 4`` bytes per token plus 62 bytes: at
    most ``6k + 16`` per token for every sample of 6 or more tokens.
``shard-{rank:05d}.sum``
    A ``.npy`` file of per-sample checksums, one row per sample (``extensions["sample_checksums"]``,
    "Verified reads" below).
``shard-{rank:05d}.json``
    The shard's own record (settings + :class:`ShardInfo` + its checksum file), the marker that the
    shard is final; ``manifest.json`` is assembled from these, and every open checks it against them.

Samples are assigned to DP ranks in contiguous blocks (:func:`shard_sample_range`),
so a sample's shard is found by bisection and its record in O(1).

Writing, atomicity and resume
-----------------------------
:class:`StoreWriter` appends samples to ``shard-XXXXX.bin.partial`` and
``shard-XXXXX.idx.partial``. :meth:`StoreWriter.commit` fsyncs them and then
atomically replaces ``shard-XXXXX.progress.json`` (temp file + fsync +
``os.replace``) with the committed sample count and byte offsets: the progress file
is the single commit point. Reopening with a progress file truncates both partial
files to the committed sizes (dropping whatever a killed process half-wrote) and
:attr:`StoreWriter.next_sample_index` says where to continue; without one, stale
partial files are deleted (nothing had been committed). Because the payload is a
pure function of the samples and nothing time- or process-dependent is stored, a run
killed at any moment and restarted yields the same bytes as an uninterrupted one.
:meth:`StoreWriter.finalize` writes the ``.idx`` (atomically), renames the partial
payload to ``.bin``, writes ``shard-XXXXX.json`` (atomically), removes the progress
files, and, if every rank's shard is final, writes ``manifest.json``; each step is
idempotent and a restart after a kill between any two of them completes the rest.

Versioning and format version 2 (cross-tokenizer)
-------------------------------------------------
The manifest carries ``format_version`` (what the writer wrote) and
``min_reader_version`` (the oldest reader that may use the store); a reader refuses
a store whose ``min_reader_version`` is above its own version, and otherwise ignores
manifest keys and ``extensions`` entries it does not know. A store without
cross-tokenizer data is written as format version 1 (every v1 reader reads it; the
per-sample checksums are an extension it ignores). Version 2 adds cross-tokenizer
distillation without changing any v1 file:

* the v1 per-token payload stays as is; its rows are the completion tokens of the
  *teacher's own* rendering (its chat template, its tokenizer) and its ids are ids
  of the teacher's vocabulary (``tokenizer_hash`` is the teacher's
  :class:`~nemo_kd.data.tokenization.ConversationTokenizer` hash);
* ``extensions["cross_tokenizer_alignment"]`` (:data:`ALIGNMENT_EXTENSION`) holds
  ``student_tokenizer_hash`` / ``student_max_seq_length`` (the student rendering the
  alignment was made against), ``teacher_tokenizer_hash``, ``alignment_algorithm`` /
  ``alignment_version`` (:mod:`nemo_kd.align.groups`), the vocabulary map file
  (``vocab_map.npy``: int32 ``[tables, teacher id] → student id or −1`` – the plain map
  then the boundary maps of :mod:`nemo_kd.align.vocab_map` – over the teacher
  tokenizer's ids, with ``student_real_vocab`` / ``teacher_real_vocab`` /
  ``vocab_map_identity`` and its sha256), and per rank (``shards``, added by
  :func:`finalize_manifest`) the files below with sizes and checksums;
* ``shard-XXXXX.align.bin``: per sample, 4-byte aligned by construction::

      groups   int32 [G + 1, 6]  AlignmentGroups.to_numpy(): a header row
                                 (G, n_student, n_teacher, content_bytes, version, 0)
                                 then per group (s_start, s_end, t_start, t_end,
                                 b_start, b_end) in completion-token / content-byte units
      ids      int32 [n_t]       the teacher's completion tokens (its own tokenisation)
      logprob  fp32  [n_t]       log p_teacher(token | teacher prefix), raw logits

* ``shard-XXXXX.align.idx`` (``.npy``, :data:`ALIGN_INDEX_DTYPE`): ``sample_index
  int64, offset int64, num_groups int32, num_student_tokens int32,
  num_teacher_tokens int32`` (32 bytes) per sample.

A cross-tokenizer store writes ``format_version = min_reader_version >= 2``: a v1
reader would feed teacher-vocabulary ids to a student with another vocabulary, so it
refuses with a clear error instead.

Format version 3 (log-prob values)
----------------------------------
With 16-bit ``values_dtype`` the top-k values are stored as log-probs ``z − LSE``
(``values_encoding: "logprobs"``, ``format_version = min_reader_version = 3``) and the
reader adds the fp32 LSE back, so consumers still see logits. Why: a confident
teacher's raw logits of 20–30 have a bf16 step of 0.125, so ``exp(z − LSE)`` of its top
token came back as 0.94–1.05 and the ``exact_tail`` tail bucket (``1 − Σ p``) was noise;
as log-probs near 0 the same 16 bits resolve probabilities to ~1e-5. Temperature still
applies at training time (``softmax(s·z)`` is invariant to the per-row shift). fp32
values stay raw logits (format 1 or 2); older readers refuse a version-3 store. Resume and atomicity cover the alignment files
exactly like the payload (same commit point, same truncation on reopen).

Statistics a store may lack (imported stores)
--------------------------------------------
``unavailable_statistics`` (a manifest list, absent when empty: stores written by
``compute_topk_logits`` are unchanged) names what an imported store could not be given:
``"full_vocabulary_lse"`` – its ``lse`` is the log-sum-exp of the k stored logits only
(NeMo-Aligner top-k files without ``log_sum_exp_logits``), so the tail mass ``1 − Σ p`` is
unknown and ``topk_convention: exact_tail`` is refused (:meth:`StoreReader.check_topk_convention`);
``"seq_logprob"`` – the per-sample ``seq_logprob`` is a placeholder 0 (Aligner keeps no
teacher log-prob of the reference completion).

Verified reads
--------------
Nothing is decoded from a store that is not what the writer wrote:

* **per-sample checksums** (``extensions["sample_checksums"]``: layout 1, xxh3_64, an extension every older
  reader ignores, so no format version changes): per sample one hash over its ``ids | lse | values`` laid end
  to end (checked on every read, one call), and one per field (to name the field that fails); cross-tokenizer
  stores the same for ``alignment groups | teacher_ids | teacher_logprobs``. The hashes are seeded with the
  decoding settings (``k``, ``values_dtype``, ``values_encoding``, ``logits_scale``), so an edit of those in the
  manifest *and* the records still fails;
* at every open: the manifest against each ``shard-XXXXX.json`` (every setting, every :class:`ShardInfo` field,
  each extension's shard entry; differences named), file names confined to the store directory, file sizes,
  the index layout the manifest implies (sample ids, token counts, offsets laid end to end at ``k`` and
  ``values_dtype``) and the small files (indices, checksums) hashed whole (sha256);
* whole-file sha256 of the payloads: ``StoreReader(path, verify_checksums=True)`` (training:
  ``data.*.verify_logits_store``) or ``nemo-kd-verify-store`` (:mod:`nemo_kd.teacher.verify_store`).

A store written before per-sample checksums has no ``.sum`` files: it is read after its files are hashed
whole at open (logged), since nothing else would catch a flipped byte.

The teacher's log tail mass (an extension)
------------------------------------------
``extensions["teacher_log_tail"]`` (:data:`LOG_TAIL_EXTENSION`, layout 1; an extension every older reader
ignores, so no format version changes): per completion token the teacher's log-probability outside its
stored top-k, ``log_tail = log Σ_{v ∉ top-k} p_v``, computed at extraction from the full vocabulary as a
direct sum (:func:`nemo_kd.losses.token_stats.vocab_parallel_log_tail`). ``exact_tail`` reads it instead of
``1 − Σ_k exp(z_i − LSE)``, whose cancellation and the fp32 LSE limit the tail on peaked teachers
(``benchmarks/bench_tail_precision.py``). Per shard:

* ``shard-XXXXX.log_tail.f4``: ``<f4`` per token, the shard's samples' tokens in order (sample ``i``'s
  rows start at the sum of its predecessors' ``num_tokens``); ``−inf`` where the top-k hold all the mass;
* ``shard-XXXXX.log_tail.xxh3.npy``: one ``<u8`` xxh3_64 per sample of its ``log_tail`` bytes (seeded as
  the other per-sample checksums), checked on every read (a failure names the field ``log_tail``).

That is 4 bytes a token and 8 a sample more (``6k + 8`` a token at bf16/fp16 plus 70 bytes a sample: at most
``6k + 20`` a token for every sample of 6 or more tokens).

Both files are listed with sizes and sha256 in the extension's ``shards`` and in each shard record
(``log_tail_shard``), checked at open like the other files (sizes, the checksum file hashed whole, the
payload whole under ``verify_checksums``); they are written, committed, truncated on resume and renamed
exactly as the payload. :class:`TeacherTopK` ``.log_tail`` is ``None`` for a store without it (written
before it, imported, served teachers: log-probs only), and cross-tokenizer stores are written without it
(their loss reads the teacher's own tokens, not a tail bucket).

Reading
-------
:class:`StoreReader` memory-maps every shard; ``reader[i]`` returns a
:class:`TeacherTopK` (fp32 values, int64 ids, fp32 LSE, float seq log-prob) for
dataset sample ``i``; in a cross-tokenizer store its ``alignment`` is the sample's
:class:`StoredAlignment` and :meth:`StoreReader.vocab_map` the teacher → student map.
:meth:`StoreReader.check_compatible` refuses, with :class:`StoreMismatchError`
(naming the store and each differing field), a store built for another dataset,
tokenizer (the student's, for a cross-tokenizer store), ``k`` or length;
:meth:`StoreReader.verify_checksums` re-hashes every file (and with ``samples=True`` reads every sample).

This module imports torch lazily (only to hand tensors to callers), so a writer
process does not pay torch's import time.
"""

from __future__ import annotations

import bisect
import dataclasses
import glob
import hashlib
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import numpy as np
import xxhash

from nemo_kd.output_lock import OutputLock, remove_stale_temps, temp_tag

__all__ = [
    "ALIGNMENT_EXTENSION",
    "ALIGN_INDEX_DTYPE",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "FULL_VOCABULARY_LSE",
    "INDEX_DTYPE",
    "LOG_TAIL_EXTENSION",
    "READER_VERSION",
    "SAMPLE_CHECKSUMS_EXTENSION",
    "SEQ_LOGPROB",
    "UNAVAILABLE_STATISTICS",
    "VALUES_DTYPES",
    "ShardInfo",
    "StoreCorruptError",
    "StoreError",
    "StoreIncompleteError",
    "StoreManifest",
    "StoreMismatchError",
    "StoreReader",
    "StoreWriter",
    "StoredAlignment",
    "TeacherTopK",
    "bytes_per_sample",
    "cross_tokenizer_extension",
    "finalize_manifest",
    "log_tail_extension",
    "shard_for_sample",
    "shard_sample_range",
]

FORMAT_NAME = "nemo_kd.teacher_logits_store"
FORMAT_VERSION = 3  # the newest format this module writes (module docstring, "Versioning")
READER_VERSION = 3  # the newest min_reader_version this module can read
VALUES_ENCODINGS = ("logits", "logprobs")  # what the stored top-k values are (module docstring)
# What an imported store may lack (module docstring, "Statistics a store may lack").
FULL_VOCABULARY_LSE = "full_vocabulary_lse"
SEQ_LOGPROB = "seq_logprob"
UNAVAILABLE_STATISTICS = (FULL_VOCABULARY_LSE, SEQ_LOGPROB)
ALIGNMENT_EXTENSION = "cross_tokenizer_alignment"  # format version 2: the cross-tokenizer alignment
ALIGNMENT_EXTENSION_LAYOUT = 1  # layout of the extension's files (bump on change)
VOCAB_MAP_FILE = "vocab_map.npy"
# Per-sample checksums (module docstring, "Verified reads"): one xxh3_64 per stored field of each sample.
SAMPLE_CHECKSUMS_EXTENSION = "sample_checksums"
SAMPLE_CHECKSUMS_LAYOUT = 1
SAMPLE_CHECKSUM_ALGORITHM = "xxh3_64"
# The teacher's log tail mass per token (module docstring, "The teacher's log tail mass").
LOG_TAIL_EXTENSION = "teacher_log_tail"
LOG_TAIL_LAYOUT = 1
LOG_TAIL_DTYPE = np.dtype("<f4")
# The first checksum of each group covers the group's fields end to end (one hash call per read); the others name
# the field that fails when it does not match.
PAYLOAD_FIELDS = ("payload", "ids", "lse", "values")
ALIGNMENT_FIELDS = ("alignment", "alignment_groups", "teacher_ids", "teacher_logprobs")
# Keys every cross-tokenizer extension must carry (besides "shards", added by finalize_manifest).
_ALIGNMENT_KEYS = ("layout", "alignment_algorithm", "alignment_version", "student_tokenizer_hash",
                   "teacher_tokenizer_hash", "student_max_seq_length", "student_real_vocab", "teacher_real_vocab",
                   "vocab_map_identity", "vocab_map_file", "vocab_map_sha256")

# Values dtype name -> on-disk numpy dtype (bf16 as raw uint16 bits; numpy has no bf16).
VALUES_DTYPES: Dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "bfloat16": np.dtype("<u2"),
    "float16": np.dtype("<f2"),
}
INDEX_DTYPE = np.dtype([("sample_index", "<i8"), ("offset", "<i8"), ("num_tokens", "<i4"), ("seq_logprob", "<f8")])
ALIGN_INDEX_DTYPE = np.dtype([("sample_index", "<i8"), ("offset", "<i8"), ("num_groups", "<i4"),
                              ("num_student_tokens", "<i4"), ("num_teacher_tokens", "<i4")])
_ALIGN = 4  # sample blocks start 4-byte aligned so the int32/fp32 sections are aligned
_MANIFEST = "manifest.json"
_HASH_CHUNK = 8 << 20
log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """Base class for logits-store errors."""


class StoreMismatchError(StoreError):
    """The store does not match the dataset/tokenizer/settings it is used with.

    ``differences`` lists each mismatch as a sentence.
    """

    def __init__(self, differences: List[str], path: str = ""):
        self.differences = list(differences)
        where = f" {path}" if path else ""
        super().__init__(f"teacher logits store{where} does not match:\n  - " + "\n  - ".join(self.differences))


class StoreCorruptError(StoreError):
    """A file of the store is damaged (checksum, size, non-finite values, bad index)."""


class StoreIncompleteError(StoreError):
    """The store is not finished (missing shards or manifest)."""


# ----------------------------------------------------------------------------- assignment


def shard_sample_range(num_samples: int, rank: int, world_size: int) -> range:
    """The contiguous block of sample indices DP rank ``rank`` of ``world_size`` writes.

    The first ``num_samples % world_size`` ranks get one extra sample. Both the
    writer and resume use it, so a restarted rank continues its own block.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} for world size {world_size}")
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def shard_for_sample(sample_index: int, num_samples: int, world_size: int) -> int:
    """The DP rank whose block holds ``sample_index`` (inverse of :func:`shard_sample_range`)."""
    if not 0 <= sample_index < num_samples:
        raise IndexError(f"sample {sample_index} out of range [0, {num_samples})")
    base, extra = divmod(num_samples, world_size)
    boundary = extra * (base + 1)  # samples before this are in the larger blocks
    if sample_index < boundary:
        return sample_index // (base + 1)
    return extra + (sample_index - boundary) // base


def bytes_per_sample(num_tokens: int, k: int, values_dtype: str) -> int:
    """Payload bytes of one sample block (including alignment padding)."""
    raw = num_tokens * (k * 4 + 4 + k * VALUES_DTYPES[values_dtype].itemsize)
    return -(-raw // _ALIGN) * _ALIGN


# ----------------------------------------------------------------------------- manifest


@dataclass
class ShardInfo:
    """One DP rank's final shard, as listed in the manifest."""

    rank: int
    payload_file: str
    index_file: str
    first_sample: int
    num_samples: int
    num_tokens: int
    payload_bytes: int
    index_bytes: int
    payload_sha256: str
    index_sha256: str


# Manifest keys that describe how the store was built; a resumed writer and every
# shard of one store must agree on all of them.
_SETTINGS_KEYS = (
    "format_version",
    "min_reader_version",
    "k",
    "values_dtype",
    "logits_scale_applied",
    "logits_scale",
    "teacher_name",
    "teacher_hash",
    "tokenizer_hash",
    "dataset_hash",
    "max_seq_length",
    "num_samples",
    "teacher_vocab_size",
    "world_size",
    "extensions",
    "unavailable_statistics",
)


@dataclass
class StoreManifest:
    """Everything a reader needs to trust and interpret the store (``manifest.json``).

    Writers pass the settings fields; ``world_size``, ``shards`` and ``num_tokens``
    are filled in by the writer and :func:`finalize_manifest`.
    """

    k: int
    values_dtype: str = "bfloat16"
    dataset_hash: str = ""
    tokenizer_hash: str = ""
    teacher_name: str = ""
    teacher_hash: str = ""
    max_seq_length: int = 0
    num_samples: int = 0
    logits_scale_applied: bool = False  # True: stored values/LSE already include logits_scale
    values_encoding: str = "logits"  # "logprobs": values stored as z − LSE (format 3); readers return z
    unavailable_statistics: List[str] = field(default_factory=list)  # e.g. ["full_vocabulary_lse"] (docstring)
    logits_scale: float = 1.0
    teacher_vocab_size: Optional[int] = None
    world_size: int = 1
    num_tokens: int = 0
    shards: List[ShardInfo] = field(default_factory=list)
    extensions: Dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = 1  # 2 only with the cross-tokenizer extension (module docstring)
    min_reader_version: int = 1

    @property
    def exact_tail_available(self) -> bool:
        """Whether ``lse`` is the teacher's full-vocabulary log-sum-exp (what ``exact_tail`` needs)."""
        return FULL_VOCABULARY_LSE not in (self.unavailable_statistics or [])

    @property
    def is_cross_tokenizer(self) -> bool:
        return ALIGNMENT_EXTENSION in (self.extensions or {})

    def validate(self) -> None:
        if self.format != FORMAT_NAME:
            raise StoreError(f"not a teacher logits store manifest (format {self.format!r})")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.values_dtype not in VALUES_DTYPES:
            raise ValueError(f"values_dtype must be one of {sorted(VALUES_DTYPES)}, got {self.values_dtype!r}")
        if self.max_seq_length < 1:
            raise ValueError(f"max_seq_length must be >= 1, got {self.max_seq_length}")
        if self.num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {self.num_samples}")
        if self.extensions and not isinstance(self.extensions, dict):
            raise ValueError("extensions must be a dict")
        if self.is_cross_tokenizer:
            ext = self.extensions[ALIGNMENT_EXTENSION]
            missing = [key for key in _ALIGNMENT_KEYS if key not in ext]
            if missing:
                raise ValueError(f"the {ALIGNMENT_EXTENSION} extension lacks {missing}")
            if self.format_version < 2 or self.min_reader_version < 2:
                raise ValueError("a cross-tokenizer store is format_version >= 2 with min_reader_version >= 2, got "
                                 f"{self.format_version} / {self.min_reader_version}")
        elif self.format_version == 2:
            raise ValueError(f"format_version 2 without the {ALIGNMENT_EXTENSION} extension: a same-tokenizer store "
                             "is written as format version 1 (or 3 with log-prob values)")
        if LOG_TAIL_EXTENSION in (self.extensions or {}) and self.is_cross_tokenizer:
            raise ValueError(f"the {LOG_TAIL_EXTENSION} extension is for same-tokenizer stores (the cross-tokenizer "
                             "loss reads the teacher's own tokens, not a tail bucket)")
        unknown = sorted(set(self.unavailable_statistics or []) - set(UNAVAILABLE_STATISTICS))
        if unknown:
            raise ValueError(f"unavailable_statistics: unknown {unknown}, known {list(UNAVAILABLE_STATISTICS)}")
        if self.values_encoding not in VALUES_ENCODINGS:
            raise ValueError(f"values_encoding must be one of {VALUES_ENCODINGS}, got {self.values_encoding!r}")
        if self.values_encoding == "logprobs" and (self.format_version < 3 or self.min_reader_version < 3):
            raise ValueError("log-prob encoded values need format_version >= 3 and min_reader_version >= 3 (an older "
                             f"reader would take them for logits), got {self.format_version} / "
                             f"{self.min_reader_version}")

    def _as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["values_encoding"] == "logits":  # formats 1/2 stay byte-identical to what their writers wrote
            del d["values_encoding"]
        if not d["unavailable_statistics"]:  # likewise every store that lacks nothing
            del d["unavailable_statistics"]
        return d

    def settings(self) -> Dict[str, Any]:
        """The build settings (no shard list / totals), as plain JSON data."""
        d = self._as_dict()
        return {key: d[key] for key in _SETTINGS_KEYS + ("values_encoding",) if key in d}

    def to_json(self) -> str:
        return json.dumps(self._as_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StoreManifest":
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys come from newer writers; min_reader_version says if they matter.
        kwargs = {key: v for key, v in d.items() if key in known}
        kwargs["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> "StoreManifest":
        return cls.from_dict(json.loads(text))


def _as_manifest(fields: Union[StoreManifest, Mapping[str, Any]]) -> StoreManifest:
    if isinstance(fields, StoreManifest):
        return dataclasses.replace(fields, shards=[], num_tokens=0, extensions=dict(fields.extensions))
    return StoreManifest.from_dict(dict(fields))


# ----------------------------------------------------------------------------- file helpers


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes, tag: str) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, ``os.replace``, fsync dir.

    ``tag`` makes the temp name unique per writer (``path.tmp-<tag>``) so concurrent
    writers never share a temp file and each can clean up only its own leftovers.
    """
    tmp = f"{path}.tmp-{tag}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_HASH_CHUNK)
            if not chunk:
                break
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _remove_if_exists(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (without importing torch here)
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        return x.cpu().numpy()
    return np.asarray(x)


def _fp32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round fp32 to bf16 (nearest, ties to even – as torch does) and return the uint16 bits.

    Callers reject non-finite input first, so the NaN special case is not needed.
    """
    u = np.ascontiguousarray(x, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype("<u2")


def _bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def _encode_values(values: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype == "float32":
        return np.ascontiguousarray(values, dtype="<f4")
    if values_dtype == "float16":
        with np.errstate(over="ignore"):  # overflow becomes inf, which append() rejects by name
            return np.ascontiguousarray(values, dtype="<f4").astype("<f2")
    return _fp32_to_bf16_bits(values)


def _decode_values(raw: np.ndarray, values_dtype: str) -> np.ndarray:
    if values_dtype == "bfloat16":
        return _bf16_bits_to_fp32(raw)
    return raw.astype("<f4")


# ----------------------------------------------------------------------------- per-sample checksums


def checksum_dtype(cross_tokenizer: bool) -> np.dtype:
    """One ``<u8`` xxh3_64 per stored field of a sample (the rows of ``shard-XXXXX.sum``)."""
    fields = PAYLOAD_FIELDS + (ALIGNMENT_FIELDS if cross_tokenizer else ())
    return np.dtype([(name, "<u8") for name in fields])


def sample_checksums_extension(cross_tokenizer: bool) -> Dict[str, Any]:
    """The ``sample_checksums`` extension a writer records (``shards`` is added by :func:`finalize_manifest`)."""
    return {"layout": SAMPLE_CHECKSUMS_LAYOUT, "algorithm": SAMPLE_CHECKSUM_ALGORITHM,
            "fields": list(checksum_dtype(cross_tokenizer).names)}


def log_tail_extension() -> Dict[str, Any]:
    """The ``teacher_log_tail`` extension a writer records (``shards`` is added by :func:`finalize_manifest`)."""
    return {"layout": LOG_TAIL_LAYOUT, "dtype": LOG_TAIL_DTYPE.str, "checksum_algorithm": SAMPLE_CHECKSUM_ALGORITHM,
            "statistic": "log sum_{v not in top-k} p_v, a direct sum over the full vocabulary"}


def _check_log_tail_extension(ext: Any, where: str) -> None:
    if not isinstance(ext, dict) or ext.get("layout") != LOG_TAIL_LAYOUT or ext.get("dtype") != LOG_TAIL_DTYPE.str \
            or ext.get("checksum_algorithm") != SAMPLE_CHECKSUM_ALGORITHM:
        raise StoreError(f"{where}: {LOG_TAIL_EXTENSION} extension {ext!r}: this reader knows layout {LOG_TAIL_LAYOUT}, "
                         f"dtype {LOG_TAIL_DTYPE.str}, {SAMPLE_CHECKSUM_ALGORITHM}")


def _checksum_seed(m: "StoreManifest") -> int:
    """The hash seed: the settings that say how the bytes decode. An edit of ``k``, ``values_dtype`` or
    ``values_encoding`` in the manifest and in the shard records alike still fails every sample's check."""
    decoding = json.dumps({"k": m.k, "values_dtype": m.values_dtype, "values_encoding": m.values_encoding,
                           "logits_scale_applied": m.logits_scale_applied, "logits_scale": m.logits_scale},
                          sort_keys=True)
    return xxhash.xxh3_64_intdigest(decoding.encode())


def _checksum(data, seed: int) -> int:
    return xxhash.xxh3_64_intdigest(data, seed)


@dataclass
class StoredAlignment:
    """One sample's cross-tokenizer data (format version 2, module docstring).

    ``packed``: int32 ``[G + 1, 6]`` (:meth:`nemo_kd.align.groups.AlignmentGroups.to_numpy`);
    ``teacher_ids``: int32 ``[n_t]`` the teacher's completion tokens;
    ``teacher_logprobs``: fp32 ``[n_t]`` the teacher's log-prob of each of them.
    """

    packed: np.ndarray
    teacher_ids: np.ndarray
    teacher_logprobs: np.ndarray

    @classmethod
    def from_groups(cls, groups, teacher_ids, teacher_logprobs) -> "StoredAlignment":
        """From an :class:`~nemo_kd.align.groups.AlignmentGroups` (or its packed array)."""
        packed = groups.to_numpy() if hasattr(groups, "to_numpy") else groups
        return cls(np.ascontiguousarray(packed, dtype="<i4").reshape(-1, 6),
                   np.ascontiguousarray(_to_numpy(teacher_ids), dtype="<i4").reshape(-1),
                   np.ascontiguousarray(_to_numpy(teacher_logprobs), dtype="<f4").reshape(-1))

    @property
    def num_groups(self) -> int:
        return int(self.packed[0, 0])

    @property
    def num_student_tokens(self) -> int:
        return int(self.packed[0, 1])

    @property
    def num_teacher_tokens(self) -> int:
        return int(self.packed[0, 2])

    def groups(self):
        """The :class:`~nemo_kd.align.groups.AlignmentGroups` (checks the alignment version)."""
        from nemo_kd.align.groups import AlignmentGroups

        return AlignmentGroups.from_numpy(self.packed)

    def to_bytes(self) -> bytes:
        return self.packed.tobytes() + self.teacher_ids.tobytes() + self.teacher_logprobs.tobytes()


def cross_tokenizer_extension(vocab_map, student_tokenizer_hash: str, teacher_tokenizer_hash: str,
                              student_max_seq_length: int):
    """``(extension, vocab_map_bytes)`` of a cross-tokenizer store (module docstring).

    Put ``extension`` in ``StoreManifest.extensions[ALIGNMENT_EXTENSION]`` (with
    ``format_version = min_reader_version = 2``) and give every writer
    ``vocab_map_bytes`` through :meth:`StoreWriter.write_vocab_map`.
    """
    from nemo_kd.align.groups import ALIGNMENT_ALGORITHM, ALIGNMENT_VERSION

    # [n_tables, teacher_real_vocab]: the plain map, then the boundary maps (nemo_kd.align.vocab_map)
    t2s = np.asarray(vocab_map.tables[:, : vocab_map.teacher_real_vocab], dtype="<i4")
    buf = io.BytesIO()
    np.save(buf, t2s, allow_pickle=False)
    data = buf.getvalue()
    ext = {
        "layout": ALIGNMENT_EXTENSION_LAYOUT,
        "alignment_algorithm": ALIGNMENT_ALGORITHM,
        "alignment_version": ALIGNMENT_VERSION,
        "student_tokenizer_hash": student_tokenizer_hash,
        "teacher_tokenizer_hash": teacher_tokenizer_hash,
        "student_max_seq_length": int(student_max_seq_length),
        "student_real_vocab": int(vocab_map.student_real_vocab),
        "teacher_real_vocab": int(vocab_map.teacher_real_vocab),
        "vocab_map_identity": bool(vocab_map.is_identity),
        "vocab_map_file": VOCAB_MAP_FILE,
        "vocab_map_sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
    }
    return ext, data


def _check_alignment(sample_index: int, al: StoredAlignment, n_teacher: int, version: int) -> None:
    """Structural checks of one sample's alignment before it is written (messages name the sample)."""
    p = al.packed
    if p.ndim != 2 or p.shape[1] != 6 or p.shape[0] < 1 or p.shape[0] != int(p[0, 0]) + 1:
        raise ValueError(f"sample {sample_index}: packed alignment must be [G + 1, 6] with G in its header row")
    if int(p[0, 4]) != int(version):
        raise ValueError(f"sample {sample_index}: packed alignment of version {int(p[0, 4])} in a store of alignment "
                         f"version {version}")
    if al.num_teacher_tokens != n_teacher:
        raise ValueError(f"sample {sample_index}: the alignment counts {al.num_teacher_tokens} teacher completion "
                         f"tokens but the top-k payload has {n_teacher} rows")
    if al.teacher_ids.shape != (n_teacher,) or al.teacher_logprobs.shape != (n_teacher,):
        raise ValueError(f"sample {sample_index}: teacher_ids / teacher_logprobs must be [{n_teacher}], got "
                         f"{al.teacher_ids.shape} / {al.teacher_logprobs.shape}")
    g = p[1:].astype(np.int64)
    if len(g) and (g[:, :4].min() < 0 or g[:, 1].max() > al.num_student_tokens or g[:, 3].max() > n_teacher):
        raise ValueError(f"sample {sample_index}: alignment groups reference tokens outside the sample")
    if not np.isfinite(al.teacher_logprobs).all():
        raise ValueError(f"sample {sample_index}: non-finite teacher token log-probs")


# ----------------------------------------------------------------------------- writer


class StoreWriter:
    """Writes DP rank ``rank``'s shard; resumable at any point (see module docstring).

    Usage::

        w = StoreWriter(path, StoreManifest(k=..., num_samples=..., ...), rank, world_size)
        for i in w.remaining():                # sample indices still to write
            w.append(i, values, ids, lse, seq_logprob)
            if i % 64 == 0:
                w.commit()                     # durable from here on
        w.finalize()                           # also writes manifest.json once all ranks are final

    Args:
        path: the store directory (created if needed; shared by all DP ranks).
        manifest_fields: a :class:`StoreManifest` (or a dict of its fields) with the
            build settings; ``num_samples`` is the dataset size (all ranks).
        rank, world_size: this DP rank and the number of DP ranks (shards).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        manifest_fields: Union[StoreManifest, Mapping[str, Any]],
        rank: int = 0,
        world_size: int = 1,
    ):
        self.path = os.fspath(path)
        self.rank, self.world_size = int(rank), int(world_size)
        self.manifest = _as_manifest(manifest_fields)
        self.manifest.world_size = self.world_size
        self.manifest.validate()
        if self.manifest.format_version > FORMAT_VERSION:
            raise ValueError(f"this writer writes format versions <= {FORMAT_VERSION}, not {self.manifest.format_version}")
        self.cross_tokenizer = self.manifest.is_cross_tokenizer
        # every store this writer writes carries per-sample checksums (an extension: older readers ignore it)
        self.manifest.extensions[SAMPLE_CHECKSUMS_EXTENSION] = sample_checksums_extension(self.cross_tokenizer)
        self._sum_dtype = checksum_dtype(self.cross_tokenizer)
        self.has_log_tail = LOG_TAIL_EXTENSION in self.manifest.extensions
        if self.has_log_tail:
            _check_log_tail_extension(self.manifest.extensions[LOG_TAIL_EXTENSION], self.path)
        self._seed = _checksum_seed(self.manifest)
        self.assigned = shard_sample_range(self.manifest.num_samples, self.rank, self.world_size)
        self._tag = temp_tag(f"r{self.rank}-")  # per process: a killed writer's temp files are told from ours
        base = os.path.join(self.path, f"shard-{self.rank:05d}")
        self.payload_file, self.index_file = base + ".bin", base + ".idx"
        self._payload_partial, self._index_partial = base + ".bin.partial", base + ".idx.partial"
        self._progress_file, self._done_file = base + ".progress.json", base + ".json"
        self.align_payload_file, self.align_index_file = base + ".align.bin", base + ".align.idx"
        self._align_partial, self._align_index_partial = base + ".align.bin.partial", base + ".align.idx.partial"
        self.checksum_file, self._checksum_partial = base + ".sum", base + ".sum.partial"
        self.log_tail_file, self._log_tail_partial = base + ".log_tail.f4", base + ".log_tail.f4.partial"
        self.log_tail_sums_file = base + ".log_tail.xxh3.npy"
        self._log_tail_sums_partial = self.log_tail_sums_file + ".partial"
        self._tail = self._tail_sums = None
        self.log_tail_shard: Optional[Dict[str, Any]] = None
        self._payload = self._index = self._sums = None
        self._align = self._align_index = None
        self._align_bytes = self._committed_align_bytes = 0
        self.align_shard: Optional[Dict[str, Any]] = None
        self.checksum_shard: Optional[Dict[str, Any]] = None
        self._committed_samples = self._committed_bytes = 0
        self._samples = self._bytes = self._tokens = 0  # appended, committed or not
        self._committed_tokens = 0
        self.shard_info: Optional[ShardInfo] = None
        self.resumed_from: Optional[int] = None  # sample index a resume continued from
        # One writer per shard: a second process writing this rank's shard (another run into the same directory)
        # is refused naming this one; a killed writer's lock is taken over. Ranks of one run hold their own.
        self._lock = OutputLock(self.path, name=f"shard-{self.rank:05d}.writer",
                                what=f"teacher logits store (the shard of rank {self.rank})").acquire()
        try:
            self._open()
        except BaseException:
            self._close_files()
            self._lock.release()
            raise

    def write_vocab_map(self, data: bytes) -> None:
        """Write the cross-tokenizer store's ``vocab_map.npy`` (atomically; every rank writes the same
        bytes). ``data`` must hash to the extension's ``vocab_map_sha256``."""
        ext = self.manifest.extensions[ALIGNMENT_EXTENSION]
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if digest != ext["vocab_map_sha256"]:
            raise StoreMismatchError([f"vocab map checksum {digest} != the manifest's {ext['vocab_map_sha256']}"],
                                     self.path)
        target = os.path.join(self.path, ext["vocab_map_file"])
        if not (os.path.exists(target) and _sha256_file(target) == digest):
            _atomic_write(target, data, self._tag)

    # -- state

    @property
    def next_sample_index(self) -> int:
        """The sample index :meth:`append` expects next (where a resumed run continues)."""
        return self.assigned.start + self._samples

    @property
    def num_committed(self) -> int:
        return self._committed_samples

    @property
    def is_finished(self) -> bool:
        return self.shard_info is not None

    def remaining(self) -> range:
        """Sample indices still to append, in order."""
        return range(self.next_sample_index, self.assigned.stop)

    def _settings_record(self) -> Dict[str, Any]:
        return {"rank": self.rank, "settings": self.manifest.settings()}

    def _check_settings(self, record: Mapping[str, Any], what: str) -> None:
        mine = self._settings_record()
        diffs = []
        if record.get("rank") != self.rank:
            diffs.append(f"rank: {what} has {record.get('rank')}, this writer is {self.rank}")
        theirs = record.get("settings", {})
        for key, value in mine["settings"].items():
            if theirs.get(key) != value:
                diffs.append(f"{key}: {what} has {theirs.get(key)!r}, this writer has {value!r}")
        if diffs:
            raise StoreMismatchError(
                [f"the existing {what} was written with different settings (refusing to mix or overwrite them)"] + diffs,
                self.path,
            )

    def _open(self) -> None:
        # Temp files of this rank's killed writers (the lock says none is alive); "*.tmp-r{rank}": older writers'.
        removed = remove_stale_temps(self.path, f"*.tmp-r{self.rank}-*", keep_tag=self._tag) + \
            remove_stale_temps(self.path, f"*.tmp-r{self.rank}")
        if removed:
            log.info("%s: removed %d temporary file(s) of a killed writer of shard %d: %s", self.path, len(removed),
                     self.rank, ", ".join(os.path.basename(f) for f in removed))
        if os.path.exists(self._done_file):
            with open(self._done_file) as f:
                record = json.load(f)
            self._check_settings(record, os.path.basename(self._done_file))
            self.shard_info = ShardInfo(**record["shard"])
            self._samples = self._committed_samples = self.shard_info.num_samples
            self._tokens = self._committed_tokens = self.shard_info.num_tokens
            self._bytes = self._committed_bytes = self.shard_info.payload_bytes
            self.resumed_from = self.assigned.stop
            self.align_shard = record.get("alignment_shard")
            self.checksum_shard = record.get("checksum_shard")
            self.log_tail_shard = record.get("log_tail_shard")
            # A kill during finalize's last step may leave these behind.
            for leftover in (self._progress_file, self._index_partial, self._align_index_partial, self._checksum_partial,
                             self._log_tail_sums_partial):
                _remove_if_exists(leftover)
            return
        if os.path.exists(self._progress_file):
            with open(self._progress_file) as f:
                progress = json.load(f)
            self._check_settings(progress, os.path.basename(self._progress_file))
            renamed = [(self.payload_file, self._payload_partial)]
            if self.cross_tokenizer:
                renamed.append((self.align_payload_file, self._align_partial))
            if self.has_log_tail:
                renamed.append((self.log_tail_file, self._log_tail_partial))
            for final, partial in renamed:
                if not os.path.exists(partial) and os.path.exists(final):
                    # Killed between finalize's rename and its shard record: undo the rename.
                    os.replace(final, partial)
            self._committed_samples = int(progress["committed_samples"])
            self._committed_bytes = int(progress["payload_bytes"])
            self._committed_tokens = int(progress["num_tokens"])
            index_bytes = self._committed_samples * INDEX_DTYPE.itemsize
            files = [(self._payload_partial, self._committed_bytes), (self._index_partial, index_bytes),
                     (self._checksum_partial, self._committed_samples * self._sum_dtype.itemsize)]
            if self.cross_tokenizer:
                self._committed_align_bytes = int(progress["align_bytes"])
                files += [(self._align_partial, self._committed_align_bytes),
                          (self._align_index_partial, self._committed_samples * ALIGN_INDEX_DTYPE.itemsize)]
            if self.has_log_tail:  # one <f4 per committed token, one <u8 per committed sample
                files += [(self._log_tail_partial, self._committed_tokens * LOG_TAIL_DTYPE.itemsize),
                          (self._log_tail_sums_partial, self._committed_samples * 8)]
            for file, size in files:
                actual = os.path.getsize(file) if os.path.exists(file) else -1
                if actual < size:
                    raise StoreCorruptError(f"{file}: {actual} bytes on disk but {size} were committed")
            handles = [open(file, "r+b") for file, _ in files]
            # Drop anything appended after the last commit (possibly half-written).
            for f, (_, size) in zip(handles, files):
                f.truncate(size)
                f.seek(0, io.SEEK_END)
            self._payload, self._index, self._sums = handles[:3]
            if self.cross_tokenizer:
                self._align, self._align_index = handles[3:5]
                self._align_bytes = self._committed_align_bytes
            if self.has_log_tail:
                self._tail, self._tail_sums = handles[-2:]
            self._samples, self._bytes, self._tokens = self._committed_samples, self._committed_bytes, self._committed_tokens
            self.resumed_from = self.next_sample_index
            return
        # Nothing committed yet: whatever is on disk for this rank is garbage of a killed run.
        for stale in (self._payload_partial, self._index_partial, self.payload_file, self.index_file,
                      self._align_partial, self._align_index_partial, self.align_payload_file, self.align_index_file,
                      self._checksum_partial, self.checksum_file, self._log_tail_partial, self.log_tail_file,
                      self._log_tail_sums_partial, self.log_tail_sums_file):
            _remove_if_exists(stale)
        self._payload = open(self._payload_partial, "w+b")
        self._index = open(self._index_partial, "w+b")
        self._sums = open(self._checksum_partial, "w+b")
        if self.cross_tokenizer:
            self._align = open(self._align_partial, "w+b")
            self._align_index = open(self._align_index_partial, "w+b")
        if self.has_log_tail:
            self._tail = open(self._log_tail_partial, "w+b")
            self._tail_sums = open(self._log_tail_sums_partial, "w+b")

    # -- writing

    def append(self, sample_index: int, values, ids, lse, seq_logprob: float,
               alignment: Optional[StoredAlignment] = None, log_tail=None) -> None:
        """Append sample ``sample_index`` (must be :attr:`next_sample_index`).

        Args:
            values: ``[n, k]`` teacher raw top-k logits (fp32/bf16 tensor or array),
                ``n`` = completion tokens (``0 <= n <= max_seq_length``).
            ids: ``[n, k]`` teacher token ids (stored as int32).
            lse: ``[n]`` teacher log-sum-exp per token.
            seq_logprob: the teacher's log-prob of the whole reference completion.
            alignment: a cross-tokenizer store's :class:`StoredAlignment` of the sample
                (required there, refused in a same-tokenizer store).
            log_tail: ``[n]`` the teacher's ``log Σ_{v ∉ top-k} p_v`` per token: required in a store with
                the ``teacher_log_tail`` extension, refused in one without (module docstring).

        Not durable until :meth:`commit`.
        """
        if self.is_finished:
            raise StoreError(f"shard {self.rank} is already finalized")
        if sample_index != self.next_sample_index:
            raise ValueError(
                f"samples must be appended in order: expected sample {self.next_sample_index}"
                f" (rank {self.rank} writes {self.assigned.start}..{self.assigned.stop - 1}), got {sample_index}"
            )
        if sample_index >= self.assigned.stop:
            raise ValueError(f"sample {sample_index} is outside rank {self.rank}'s block {self.assigned}")
        if (log_tail is not None) != self.has_log_tail:
            raise ValueError(f"sample {sample_index}: " + (f"this store has the {LOG_TAIL_EXTENSION} extension: "
                             "append needs log_tail" if self.has_log_tail else
                             f"log_tail given to a store without the {LOG_TAIL_EXTENSION} extension"))
        if (alignment is not None) != self.cross_tokenizer:
            raise ValueError(f"sample {sample_index}: " + ("a cross-tokenizer store needs the sample's alignment"
                             if self.cross_tokenizer else "alignment given to a same-tokenizer (format 1) store"))
        m = self.manifest
        v = _to_numpy(values).astype("<f4", copy=False)
        i = _to_numpy(ids)
        l = _to_numpy(lse).astype("<f4", copy=False)
        n = v.shape[0] if v.ndim == 2 else -1
        if v.ndim != 2 or v.shape[1] != m.k:
            raise ValueError(f"sample {sample_index}: values must be [n, k={m.k}], got {v.shape}")
        if i.shape != v.shape:
            raise ValueError(f"sample {sample_index}: ids shape {i.shape} != values shape {v.shape}")
        if l.shape != (n,):
            raise ValueError(f"sample {sample_index}: lse must be [{n}], got {l.shape}")
        if n > m.max_seq_length:
            raise ValueError(f"sample {sample_index}: {n} completion tokens exceed max_seq_length {m.max_seq_length}")
        if not (np.isfinite(v).all() and np.isfinite(l).all() and math.isfinite(float(seq_logprob))):
            raise ValueError(f"sample {sample_index}: non-finite (NaN/Inf) teacher logits, LSE or sequence log-prob")
        if log_tail is not None:
            t = _to_numpy(log_tail).astype(LOG_TAIL_DTYPE, copy=False)
            if t.shape != (n,):
                raise ValueError(f"sample {sample_index}: log_tail must be [{n}], got {t.shape}")
            if not (t <= 0).all():  # NaN fails this too; -inf (no mass outside the top-k) is kept
                bad = int(np.flatnonzero(~(t <= 0))[0])
                raise ValueError(f"sample {sample_index}: log_tail of token {bad} is {t[bad]}, not a log-probability "
                                 "(NaN or > 0)")
        if i.size and (i.min() < 0 or i.max() >= (m.teacher_vocab_size or 2**31)):
            raise ValueError(f"sample {sample_index}: token id out of range [0, {m.teacher_vocab_size or 2**31})")
        # log-prob encoding: z − LSE is ≤ 0 and ≈ 0 for the teacher's likely tokens, where 16-bit
        # floats are finest; raw logits of 20-30 have a bf16 step of 0.125 (module docstring)
        encoded = _encode_values(v - l[:, None] if m.values_encoding == "logprobs" else v, m.values_dtype)
        if m.values_dtype == "float16" and not np.isfinite(encoded).all():
            raise ValueError(f"sample {sample_index}: teacher logits overflow float16; use values_dtype='bfloat16'")
        fields = (np.ascontiguousarray(i, dtype="<i4").tobytes(), np.ascontiguousarray(l).tobytes(), encoded.tobytes())
        block = b"".join(fields)
        sums = (block,) + fields
        block += b"\0" * (-len(block) % _ALIGN)
        row = np.array([(sample_index, self._bytes, n, float(seq_logprob))], dtype=INDEX_DTYPE)
        if alignment is not None:
            _check_alignment(sample_index, alignment, n,
                             self.manifest.extensions[ALIGNMENT_EXTENSION]["alignment_version"])
            a_block = alignment.to_bytes()
            sums += (a_block, alignment.packed.tobytes(), alignment.teacher_ids.tobytes(),
                     alignment.teacher_logprobs.tobytes())
            a_row = np.array([(sample_index, self._align_bytes, alignment.num_groups, alignment.num_student_tokens, n)],
                             dtype=ALIGN_INDEX_DTYPE)
            self._align.write(a_block)
            self._align_index.write(a_row.tobytes())
            self._align_bytes += len(a_block)
        if log_tail is not None:
            t_bytes = np.ascontiguousarray(t).tobytes()
            self._tail.write(t_bytes)
            self._tail_sums.write(np.array([_checksum(t_bytes, self._seed)], dtype="<u8").tobytes())
        self._payload.write(block)
        self._index.write(row.tobytes())
        self._sums.write(np.array([tuple(_checksum(f, self._seed) for f in sums)], dtype=self._sum_dtype).tobytes())
        self._samples += 1
        self._bytes += len(block)
        self._tokens += n

    def commit(self) -> None:
        """Make every appended sample durable (fsync data, then atomically record progress)."""
        if self.is_finished or (self._samples == self._committed_samples and os.path.exists(self._progress_file)):
            return
        for f in (self._payload, self._index, self._sums, self._align, self._align_index, self._tail, self._tail_sums):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
        record = self._settings_record()
        record.update(committed_samples=self._samples, payload_bytes=self._bytes, num_tokens=self._tokens)
        if self.cross_tokenizer:
            record["align_bytes"] = self._align_bytes
        # The commit point: before this replace the old progress stands, after it the new one.
        _atomic_write(self._progress_file, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), self._tag)
        self._committed_samples, self._committed_bytes, self._committed_tokens = self._samples, self._bytes, self._tokens
        self._committed_align_bytes = self._align_bytes

    def finalize(self) -> ShardInfo:
        """Seal this shard (all assigned samples must be appended); write the manifest if all shards are final.

        Idempotent: calling it on a finished shard (e.g. after a restart) only
        retries the manifest.
        """
        if not self.is_finished:
            if self.next_sample_index != self.assigned.stop:
                raise StoreIncompleteError(
                    f"rank {self.rank} cannot finalize: samples {self.next_sample_index}..{self.assigned.stop - 1}"
                    " were not appended"
                )
            self.commit()
            self._index.seek(0)
            rows = np.frombuffer(self._index.read(), dtype=INDEX_DTYPE)
            buf = io.BytesIO()
            np.save(buf, rows, allow_pickle=False)
            _atomic_write(self.index_file, buf.getvalue(), self._tag)
            if self.cross_tokenizer:
                self._align_index.seek(0)
                buf = io.BytesIO()
                np.save(buf, np.frombuffer(self._align_index.read(), dtype=ALIGN_INDEX_DTYPE), allow_pickle=False)
                _atomic_write(self.align_index_file, buf.getvalue(), self._tag)
            self._sums.seek(0)
            buf = io.BytesIO()
            np.save(buf, np.frombuffer(self._sums.read(), dtype=self._sum_dtype), allow_pickle=False)
            _atomic_write(self.checksum_file, buf.getvalue(), self._tag)
            if self.has_log_tail:
                self._tail_sums.seek(0)
                buf = io.BytesIO()
                np.save(buf, np.frombuffer(self._tail_sums.read(), dtype="<u8"), allow_pickle=False)
                _atomic_write(self.log_tail_sums_file, buf.getvalue(), self._tag)
            self._close_files()
            os.replace(self._payload_partial, self.payload_file)
            if self.cross_tokenizer:
                os.replace(self._align_partial, self.align_payload_file)
            if self.has_log_tail:
                os.replace(self._log_tail_partial, self.log_tail_file)
            _fsync_dir(self.path)
            info = ShardInfo(
                rank=self.rank,
                payload_file=os.path.basename(self.payload_file),
                index_file=os.path.basename(self.index_file),
                first_sample=self.assigned.start,
                num_samples=len(self.assigned),
                num_tokens=self._tokens,
                payload_bytes=os.path.getsize(self.payload_file),
                index_bytes=os.path.getsize(self.index_file),
                payload_sha256=_sha256_file(self.payload_file),
                index_sha256=_sha256_file(self.index_file),
            )
            record = self._settings_record()
            record["shard"] = dataclasses.asdict(info)
            if self.cross_tokenizer:
                self.align_shard = {
                    "rank": self.rank,
                    "payload_file": os.path.basename(self.align_payload_file),
                    "index_file": os.path.basename(self.align_index_file),
                    "payload_bytes": os.path.getsize(self.align_payload_file),
                    "index_bytes": os.path.getsize(self.align_index_file),
                    "payload_sha256": _sha256_file(self.align_payload_file),
                    "index_sha256": _sha256_file(self.align_index_file),
                }
                record["alignment_shard"] = self.align_shard
            self.checksum_shard = {"rank": self.rank, "file": os.path.basename(self.checksum_file),
                                   "bytes": os.path.getsize(self.checksum_file),
                                   "sha256": _sha256_file(self.checksum_file)}
            record["checksum_shard"] = self.checksum_shard
            if self.has_log_tail:
                self.log_tail_shard = {
                    "rank": self.rank,
                    "file": os.path.basename(self.log_tail_file),
                    "bytes": os.path.getsize(self.log_tail_file),
                    "sha256": _sha256_file(self.log_tail_file),
                    "checksum_file": os.path.basename(self.log_tail_sums_file),
                    "checksum_bytes": os.path.getsize(self.log_tail_sums_file),
                    "checksum_sha256": _sha256_file(self.log_tail_sums_file),
                }
                record["log_tail_shard"] = self.log_tail_shard
            _atomic_write(self._done_file, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode(), self._tag)
            for leftover in (self._progress_file, self._index_partial, self._align_index_partial, self._checksum_partial,
                             self._log_tail_sums_partial):
                _remove_if_exists(leftover)
            self.shard_info = info
        try:
            finalize_manifest(self.path, tag=self._tag)
        except StoreIncompleteError:
            pass  # other ranks still writing; the last one to finish writes it
        self._lock.release()
        return self.shard_info

    def _close_files(self) -> None:
        for f in (self._payload, self._index, self._sums, self._align, self._align_index, self._tail, self._tail_sums):
            if f is not None:
                f.close()
        self._payload = self._index = self._sums = self._align = self._align_index = None
        self._tail = self._tail_sums = None

    def close(self) -> None:
        """Close without committing (uncommitted appends are dropped on the next open) and release the shard."""
        self._close_files()
        self._lock.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def finalize_manifest(path: Union[str, os.PathLike], tag: Optional[str] = None) -> StoreManifest:
    """Assemble and atomically write ``manifest.json`` from every rank's final shard record.

    Safe to call from several ranks at once (each writes identical bytes through
    its own temp file). Raises :class:`StoreIncompleteError` naming missing ranks.
    """
    path = os.fspath(path)
    records = []
    for file in sorted(glob.glob(os.path.join(glob.escape(path), "shard-[0-9][0-9][0-9][0-9][0-9].json"))):
        with open(file) as f:
            records.append(json.load(f))
    if not records:
        raise StoreIncompleteError(f"{path}: no finalized shard")
    settings = records[0]["settings"]
    for r in records[1:]:
        if r["settings"] != settings:
            diffs = [f"{key}: {settings.get(key)!r} vs {r['settings'].get(key)!r}" for key in settings if r["settings"].get(key) != settings.get(key)]
            raise StoreMismatchError([f"shard of rank {r['rank']} was written with different settings than rank {records[0]['rank']}"] + diffs, path)
    world = settings["world_size"]
    present = {r["rank"] for r in records}
    missing = sorted(set(range(world)) - present)
    if missing:
        raise StoreIncompleteError(f"{path}: shards of rank(s) {missing} are not finalized yet")
    shards = sorted((ShardInfo(**r["shard"]) for r in records), key=lambda s: s.rank)
    expected = 0
    for s in shards:
        if s.first_sample != expected:
            raise StoreCorruptError(f"{path}: shard {s.rank} starts at sample {s.first_sample}, expected {expected}")
        expected += s.num_samples
    if expected != settings["num_samples"]:
        raise StoreCorruptError(f"{path}: shards hold {expected} samples, manifest says {settings['num_samples']}")
    manifest = StoreManifest.from_dict(dict(settings, shards=[dataclasses.asdict(s) for s in shards]))
    manifest.num_tokens = sum(s.num_tokens for s in shards)
    # each extension's per-shard files, listed in the manifest in shard order from the shard records
    for name, record_key, missing in (
            (ALIGNMENT_EXTENSION, "alignment_shard", "a cross-tokenizer shard record lacks its alignment files"),
            (SAMPLE_CHECKSUMS_EXTENSION, "checksum_shard", "a shard record lacks its per-sample checksum file"),
            (LOG_TAIL_EXTENSION, "log_tail_shard", f"a shard record lacks its {LOG_TAIL_EXTENSION} files")):
        if name not in manifest.extensions:
            continue
        by_rank = {r["rank"]: r.get(record_key) for r in records}
        if any(by_rank[s.rank] is None for s in shards):
            raise StoreCorruptError(f"{path}: {missing}")
        ext = dict(manifest.extensions[name], shards=[by_rank[s.rank] for s in shards])
        manifest.extensions = dict(manifest.extensions, **{name: ext})
    _atomic_write(os.path.join(path, _MANIFEST), manifest.to_json().encode(), tag or f"p{os.getpid()}")
    return manifest


# ----------------------------------------------------------------------------- reader


@dataclass
class TeacherTopK:
    """The stored teacher statistics of one sample's completion tokens."""

    sample_index: int
    values: Any  # torch fp32 [n, k] raw teacher logits (bf16/fp16-rounded if stored so)
    ids: Any  # torch int64 [n, k]
    lse: Any  # torch fp32 [n]
    seq_logprob: float
    alignment: Optional[StoredAlignment] = None  # cross-tokenizer store (format 2) only
    log_tail: Any = None  # torch fp32 [n] log Σ_{v ∉ top-k} p_v (teacher_log_tail extension), else None

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[0])


def _confine_file_names(m: StoreManifest, manifest_path: str) -> None:
    """Every file a manifest names is a plain file name in the store directory (no path, no ``..``):
    an edited manifest must not make the reader open files elsewhere."""
    names = [(f"shards[{i}].{field}", getattr(s, field)) for i, s in enumerate(m.shards)
             for field in ("payload_file", "index_file")]
    ext = (m.extensions or {}).get(ALIGNMENT_EXTENSION) or {}
    names += [(f"extensions.{ALIGNMENT_EXTENSION}.shards[{i}].{field}", a.get(field))
              for i, a in enumerate(ext.get("shards") or []) for field in ("payload_file", "index_file")]
    if "vocab_map_file" in ext:
        names.append((f"extensions.{ALIGNMENT_EXTENSION}.vocab_map_file", ext["vocab_map_file"]))
    sums = (m.extensions or {}).get(SAMPLE_CHECKSUMS_EXTENSION) or {}
    names += [(f"extensions.{SAMPLE_CHECKSUMS_EXTENSION}.shards[{i}].file", c.get("file") if isinstance(c, dict) else c)
              for i, c in enumerate(sums.get("shards") or [])]
    tails = (m.extensions or {}).get(LOG_TAIL_EXTENSION) or {}
    names += [(f"extensions.{LOG_TAIL_EXTENSION}.shards[{i}].{field}", c.get(field) if isinstance(c, dict) else c)
              for i, c in enumerate(tails.get("shards") or []) for field in ("file", "checksum_file")]
    for where, name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name \
                or "/" in name or "\\" in name:
            raise StoreCorruptError(f"{manifest_path}: {where}={name!r} is not a file name inside the store")


def _comparable_settings(m: StoreManifest) -> Dict[str, Any]:
    """A manifest's build settings with defaults filled in and without the shard lists finalize adds."""
    out = {key: getattr(m, key) for key in _SETTINGS_KEYS + ("values_encoding",)}
    out["extensions"] = {name: {key: v for key, v in ext.items() if key != "shards"} if isinstance(ext, dict) else ext
                         for name, ext in (m.extensions or {}).items()}
    return out


class StoreReader:
    """Random access to a finished store by dataset sample index (memory-mapped)."""

    def __init__(self, path: Union[str, os.PathLike], verify_checksums: bool = False):
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, _MANIFEST)
        if not os.path.exists(manifest_path):
            raise StoreIncompleteError(
                f"{self.path}: no {_MANIFEST} – the store is incomplete (not every rank finalized) or not a store"
            )
        try:
            with open(manifest_path, encoding="utf-8") as f:
                self.manifest = StoreManifest.from_json(f.read())
        except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise StoreCorruptError(f"{manifest_path}: unreadable manifest ({type(e).__name__}: {e})") from None
        m = self.manifest
        _confine_file_names(m, manifest_path)
        if m.format != FORMAT_NAME:
            raise StoreError(f"{manifest_path}: not a teacher logits store (format {m.format!r})")
        if m.min_reader_version > READER_VERSION:
            raise StoreError(
                f"{self.path}: store format version {m.format_version} needs reader version >= {m.min_reader_version},"
                f" this reader is version {READER_VERSION}"
                + (" (it holds cross-tokenizer alignment data)" if ALIGNMENT_EXTENSION in m.extensions else "")
            )
        self.cross_tokenizer = m.is_cross_tokenizer
        if self.cross_tokenizer:
            ext = m.extensions[ALIGNMENT_EXTENSION]
            missing = [key for key in _ALIGNMENT_KEYS + ("shards",) if key not in ext]
            if missing or ext.get("layout") != ALIGNMENT_EXTENSION_LAYOUT:
                raise StoreError(
                    f"{self.path}: store format version {m.format_version} (needs reader version >= "
                    f"{m.min_reader_version}) declares cross-tokenizer alignment data, but its "
                    f"{ALIGNMENT_EXTENSION!r} extension " + (f"lacks {missing}" if missing else
                    f"has layout {ext.get('layout')!r}, this reader knows {ALIGNMENT_EXTENSION_LAYOUT}"))
        self._k, self._vdtype = m.k, VALUES_DTYPES[m.values_dtype]
        self._first = [s.first_sample for s in m.shards]
        self._sum_info = (m.extensions or {}).get(SAMPLE_CHECKSUMS_EXTENSION)
        if self._sum_info is not None and (self._sum_info.get("layout") != SAMPLE_CHECKSUMS_LAYOUT or
                                           self._sum_info.get("algorithm") != SAMPLE_CHECKSUM_ALGORITHM or
                                           self._sum_info.get("fields") != list(checksum_dtype(self.cross_tokenizer).names)):
            raise StoreError(f"{manifest_path}: per-sample checksums of layout {self._sum_info.get('layout')!r} / "
                             f"{self._sum_info.get('algorithm')!r} / fields {self._sum_info.get('fields')!r}: this "
                             f"reader knows layout {SAMPLE_CHECKSUMS_LAYOUT}, {SAMPLE_CHECKSUM_ALGORITHM}")
        self._tail_info = (m.extensions or {}).get(LOG_TAIL_EXTENSION)
        if self._tail_info is not None:
            _check_log_tail_extension(self._tail_info, manifest_path)
        self._cross_check_records(manifest_path)
        # The small files (indices, checksums) are hashed whole at every open: a few ms per million samples.
        for name, size, digest in self._files(True):
            file = os.path.join(self.path, name)
            actual = os.path.getsize(file) if os.path.exists(file) else None
            if actual != size:
                raise StoreCorruptError(f"{file}: {actual} bytes, manifest says {size}")
            if _sha256_file(file) != digest:
                raise StoreCorruptError(f"{file}: checksum differs from the manifest's {digest}: the file is damaged")
        for name, size, _ in self._files(False):
            file = os.path.join(self.path, name)
            actual = os.path.getsize(file) if os.path.exists(file) else None
            if actual != size:
                raise StoreCorruptError(f"{file}: {actual} bytes, manifest says {size}")
        self._payloads, self._indices, self._sums = [], [], []
        for pos, s in enumerate(m.shards):
            payload = os.path.join(self.path, s.payload_file)
            self._payloads.append(memoryview(np.memmap(payload, dtype=np.uint8, mode="r")) if s.payload_bytes
                                  else memoryview(b""))
            index = np.load(os.path.join(self.path, s.index_file), mmap_mode="r" if s.num_samples else None, allow_pickle=False)
            if index.dtype != INDEX_DTYPE or index.shape != (s.num_samples,):
                raise StoreCorruptError(f"{s.index_file}: index has dtype {index.dtype} shape {index.shape}, expected {s.num_samples} rows")
            self._check_payload_layout(pos, s, index)
            self._indices.append(index)
            if self._sum_info is not None:
                c = self._sum_info["shards"][pos]
                sums = np.load(os.path.join(self.path, c["file"]), allow_pickle=False)
                if sums.dtype != checksum_dtype(self.cross_tokenizer) or sums.shape != (s.num_samples,):
                    raise StoreCorruptError(f"{os.path.join(self.path, c['file'])}: checksums of dtype {sums.dtype} "
                                            f"shape {sums.shape}, expected {s.num_samples} rows")
                self._sums.append(np.ascontiguousarray(sums).view("<u8").reshape(s.num_samples, -1))
        self._tails, self._tail_sums, self._tail_starts = [], [], []
        if self._tail_info is not None:
            for pos, (s, c) in enumerate(zip(m.shards, self._tail_info["shards"])):
                if c["bytes"] != s.num_tokens * LOG_TAIL_DTYPE.itemsize:
                    raise StoreCorruptError(f"{os.path.join(self.path, c['file'])}: {c['bytes']} bytes for the shard's "
                                            f"{s.num_tokens} tokens ({LOG_TAIL_DTYPE.itemsize} a token)")
                self._tails.append(memoryview(np.memmap(os.path.join(self.path, c["file"]), dtype=np.uint8, mode="r"))
                                   if c["bytes"] else memoryview(b""))
                sums = np.load(os.path.join(self.path, c["checksum_file"]), allow_pickle=False)
                if sums.dtype != np.dtype("<u8") or sums.shape != (s.num_samples,):
                    raise StoreCorruptError(f"{os.path.join(self.path, c['checksum_file'])}: checksums of dtype "
                                            f"{sums.dtype} shape {sums.shape}, expected {s.num_samples} <u8")
                self._tail_sums.append(sums)
                n = np.asarray(self._indices[pos]["num_tokens"]).astype(np.int64)
                self._tail_starts.append(np.concatenate([[0], np.cumsum(n)]) * LOG_TAIL_DTYPE.itemsize)
        self._seed = _checksum_seed(m)
        self._align_payloads, self._align_indices = [], []
        if self.cross_tokenizer:
            for pos, (s, a) in enumerate(zip(m.shards, m.extensions[ALIGNMENT_EXTENSION]["shards"])):
                self._align_payloads.append(memoryview(np.memmap(os.path.join(self.path, a["payload_file"]),
                                                                 dtype=np.uint8, mode="r")) if a["payload_bytes"]
                                            else memoryview(b""))
                index = np.load(os.path.join(self.path, a["index_file"]), mmap_mode="r" if s.num_samples else None,
                                allow_pickle=False)
                if index.dtype != ALIGN_INDEX_DTYPE or index.shape != (s.num_samples,):
                    raise StoreCorruptError(f"{a['index_file']}: index has dtype {index.dtype} shape {index.shape}, "
                                            f"expected {s.num_samples} rows")
                self._check_alignment_layout(pos, a, index)
                self._align_indices.append(index)
        if self._sum_info is None:
            # Written before per-sample checksums: the only check left is the whole files, so do it now.
            log.warning("%s: written before per-sample checksums (nemo_kd < 0.2): verifying every file whole at open",
                        self.path)
            verify_checksums = True
        self.has_sample_checksums = self._sum_info is not None
        if verify_checksums:
            self.verify_checksums()

    # -- open-time checks: the manifest against the shard records and the sizes it implies

    def _cross_check_records(self, manifest_path: str) -> None:
        """The manifest is assembled from the ``shard-XXXXX.json`` records: every field must still agree."""
        m = self.manifest
        if len({s.rank for s in m.shards}) != len(m.shards) or len(m.shards) != m.world_size:
            raise StoreCorruptError(f"{manifest_path}: {len(m.shards)} shards listed for world_size {m.world_size}")
        mine = _comparable_settings(m)
        listed = {name: ext.get("shards") for name, ext in (m.extensions or {}).items() if isinstance(ext, dict)}
        for name, shards in listed.items():
            if name in (ALIGNMENT_EXTENSION, SAMPLE_CHECKSUMS_EXTENSION, LOG_TAIL_EXTENSION) and \
                    (not isinstance(shards, list) or [x.get("rank") for x in shards] != [s.rank for s in m.shards]):
                raise StoreCorruptError(f"{manifest_path}: extensions.{name}.shards do not list the payload shards")
        for pos, s in enumerate(m.shards):
            record_file = os.path.join(self.path, f"shard-{s.rank:05d}.json")
            try:
                with open(record_file, encoding="utf-8") as f:
                    record = json.load(f)
            except FileNotFoundError:
                raise StoreCorruptError(f"{record_file}: missing; every store holds one record per shard, which its "
                                        f"manifest {manifest_path} is checked against") from None
            except ValueError as e:
                raise StoreCorruptError(f"{record_file}: unreadable shard record ({e})") from None
            try:  # normalised as the manifest is: keys this reader knows, defaults filled in
                theirs = _comparable_settings(StoreManifest.from_dict(dict(record.get("settings") or {}, shards=[])))
            except (TypeError, ValueError, KeyError, AttributeError) as e:
                raise StoreCorruptError(f"{record_file}: unreadable shard record settings ({e})") from None
            diffs = []
            for key in sorted(set(mine) | set(theirs)):
                if key == "extensions":
                    ours_x, theirs_x = mine.get(key) or {}, theirs.get(key) or {}
                    for name in sorted(set(ours_x) | set(theirs_x)):
                        if ours_x.get(name) != theirs_x.get(name):
                            diffs.append(f"extensions.{name}: manifest {ours_x.get(name)!r}, record "
                                         f"{theirs_x.get(name)!r}")
                elif mine.get(key) != theirs.get(key):
                    diffs.append(f"{key}: manifest {mine.get(key)!r}, record {theirs.get(key)!r}")
            for key, value in dataclasses.asdict(s).items():
                if (record.get("shard") or {}).get(key) != value:
                    diffs.append(f"shards[{pos}].{key}: manifest {value!r}, record {(record.get('shard') or {}).get(key)!r}")
            for name, record_key in ((ALIGNMENT_EXTENSION, "alignment_shard"), (SAMPLE_CHECKSUMS_EXTENSION, "checksum_shard"),
                                     (LOG_TAIL_EXTENSION, "log_tail_shard")):
                if listed.get(name) is not None and record.get(record_key) != listed[name][pos]:
                    diffs.append(f"extensions.{name}.shards[{pos}]: manifest {listed[name][pos]!r}, record "
                                 f"{record.get(record_key)!r}")
            if diffs:
                raise StoreCorruptError(f"{manifest_path} disagrees with the shard record {record_file} (an edited or "
                                        "mixed-up manifest; refusing to read the payload through it):\n  - "
                                        + "\n  - ".join(diffs))

    def _check_payload_layout(self, pos: int, s: ShardInfo, index) -> None:
        """Sample ids, token counts and offsets of a shard's index against the manifest's ``k`` and ``values_dtype``."""
        m, file = self.manifest, os.path.join(self.path, s.payload_file)
        ids = np.asarray(index["sample_index"])
        expected_ids = np.arange(s.first_sample, s.first_sample + s.num_samples)
        if not np.array_equal(ids, expected_ids):
            bad = int(np.flatnonzero(ids != expected_ids)[0])
            raise StoreCorruptError(f"{s.index_file}: row {bad} is for sample {int(ids[bad])}, expected "
                                    f"{int(expected_ids[bad])}")
        n = np.asarray(index["num_tokens"]).astype(np.int64)
        if len(n) and (n.min() < 0 or n.max() > m.max_seq_length):
            bad = int(np.flatnonzero((n < 0) | (n > m.max_seq_length))[0])
            raise StoreCorruptError(f"{s.index_file}: sample {s.first_sample + bad} has {int(n[bad])} tokens, outside "
                                    f"[0, max_seq_length={m.max_seq_length}]")
        if int(n.sum()) != s.num_tokens:
            raise StoreCorruptError(f"{s.index_file}: the index counts {int(n.sum())} tokens, the manifest's "
                                    f"shards[{pos}].num_tokens says {s.num_tokens}")
        per_token = m.k * 4 + 4 + m.k * self._vdtype.itemsize
        sizes = -(-(n * per_token) // _ALIGN) * _ALIGN
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if len(ends) else 0
        if total != s.payload_bytes:
            raise StoreCorruptError(
                f"{file}: its {s.num_samples} samples of {s.num_tokens} tokens take {total} bytes at k={m.k}, "
                f"values_dtype={m.values_dtype} ({per_token} bytes a token), but the file has {s.payload_bytes}: "
                "the manifest's k / values_dtype do not describe this payload")
        offsets = np.asarray(index["offset"])
        if not np.array_equal(offsets, ends - sizes):
            bad = int(np.flatnonzero(offsets != ends - sizes)[0])
            raise StoreCorruptError(f"{s.index_file}: sample {s.first_sample + bad} starts at byte {int(offsets[bad])}"
                                    f", its predecessors end at {int((ends - sizes)[bad])}")

    def _check_alignment_layout(self, pos: int, a: Mapping[str, Any], index) -> None:
        s = self.manifest.shards[pos]
        if not np.array_equal(np.asarray(index["sample_index"]), np.arange(s.first_sample, s.first_sample + s.num_samples)):
            raise StoreCorruptError(f"{a['index_file']}: its rows are not samples {s.first_sample}..")
        n_teacher = np.asarray(index["num_teacher_tokens"]).astype(np.int64)
        if not np.array_equal(n_teacher, np.asarray(self._indices[pos]["num_tokens"]).astype(np.int64)):
            bad = int(np.flatnonzero(n_teacher != np.asarray(self._indices[pos]["num_tokens"]))[0])
            raise StoreCorruptError(f"{a['index_file']}: sample {s.first_sample + bad} has {int(n_teacher[bad])} "
                                    f"teacher tokens, the payload index {int(self._indices[pos]['num_tokens'][bad])}")
        sizes = 4 * (6 * (np.asarray(index["num_groups"]).astype(np.int64) + 1) + 2 * n_teacher)
        ends = np.cumsum(sizes)
        total = int(ends[-1]) if len(ends) else 0
        if total != a["payload_bytes"] or not np.array_equal(np.asarray(index["offset"]), ends - sizes):
            raise StoreCorruptError(f"{os.path.join(self.path, a['payload_file'])}: the alignment index implies "
                                    f"{total} bytes laid end to end, the file has {a['payload_bytes']}")

    def _files(self, small_only: bool):
        """``(name, bytes, sha256)`` of the store's small files (indices, checksums) or of its payloads."""
        m, out = self.manifest, []
        info = (m.extensions or {}).get(ALIGNMENT_EXTENSION) if self.cross_tokenizer else None
        for pos, s in enumerate(m.shards):
            a = info["shards"][pos] if info else None
            if small_only:
                out.append((s.index_file, s.index_bytes, s.index_sha256))
                if a:
                    out.append((a["index_file"], a["index_bytes"], a["index_sha256"]))
                if self._sum_info is not None:
                    c = self._sum_info["shards"][pos]
                    out.append((c["file"], c["bytes"], c["sha256"]))
                if self._tail_info is not None:
                    t = self._tail_info["shards"][pos]
                    out.append((t["checksum_file"], t["checksum_bytes"], t["checksum_sha256"]))
            else:
                out.append((s.payload_file, s.payload_bytes, s.payload_sha256))
                if a:
                    out.append((a["payload_file"], a["payload_bytes"], a["payload_sha256"]))
                if self._tail_info is not None:
                    t = self._tail_info["shards"][pos]
                    out.append((t["file"], t["bytes"], t["sha256"]))
        return out

    def _sample_intact(self, shard: int, pos: int, column: int, data) -> bool:
        """Whether ``data`` (a sample's fields laid end to end) hashes to the checksum recorded in ``column``: the
        check of every read, kept to one hash and one lookup (the read itself is a copy and a decode)."""
        return _checksum(data, self._seed) == self._sums[shard].item(pos, column)

    def _raise_corrupt_sample(self, shard: int, pos: int, sample_index: int, fields, first_column: int, buf,
                              file: str, base: int = 0) -> None:
        """A sample failed :meth:`_sample_intact`: name the field of ``fields`` (``(name, start, nbytes)`` in
        ``buf``) whose own checksum fails (``base``: where ``buf`` starts in the file, for the message)."""
        recorded = self._sums[shard][pos]
        start, end = fields[0][1], fields[-1][1] + fields[-1][2]
        failed = [(name, a, nbytes, column) for column, (name, a, nbytes) in enumerate(fields, first_column + 1)
                  if _checksum(buf[a:a + nbytes], self._seed) != int(recorded[column])]
        name, start, nbytes, column = failed[0] if failed else ("fields", start, end - start, first_column)
        raise StoreCorruptError(
            f"{self.path}: sample {sample_index} ({file}, bytes {base + start}..{base + start + nbytes}): its {name} "
            "fail their "
            f"{SAMPLE_CHECKSUM_ALGORITHM} checksum (read {_checksum(buf[start:start + nbytes], self._seed):016x}, "
            f"recorded {int(recorded[column]):016x}): the store is damaged. Re-extract it or restore the file; "
            f"`nemo-kd-verify-store {self.path}` checks every sample (if every field of every sample fails, the "
            "manifest's and shard records' k / values_dtype / values_encoding were edited)")

    def __len__(self) -> int:
        return self.manifest.num_samples

    def _locate(self, sample_index: int):
        if not 0 <= sample_index < self.manifest.num_samples:
            raise IndexError(f"sample {sample_index} out of range [0, {self.manifest.num_samples})")
        # Blocks are contiguous and only trailing ones can be empty (their first_sample
        # is num_samples), so the last shard starting at or before the sample holds it.
        shard = bisect.bisect_right(self._first, sample_index) - 1
        row = self._indices[shard][sample_index - self._first[shard]]
        if int(row["sample_index"]) != sample_index:
            raise StoreCorruptError(f"{self.manifest.shards[shard].index_file}: row for sample {sample_index} says {int(row['sample_index'])}")
        return shard, row

    def num_tokens(self, sample_index: int) -> int:
        """Teacher completion tokens (rows) of a sample."""
        return int(self._locate(sample_index)[1]["num_tokens"])

    # -- cross-tokenizer (format 2)

    @property
    def alignment_info(self) -> Dict[str, Any]:
        """The ``cross_tokenizer_alignment`` extension (empty for a same-tokenizer store)."""
        return dict(self.manifest.extensions.get(ALIGNMENT_EXTENSION, {})) if self.cross_tokenizer else {}

    def _align_row(self, sample_index: int):
        if not self.cross_tokenizer:
            raise StoreError(f"{self.path}: not a cross-tokenizer store (format version {self.manifest.format_version})")
        shard, _ = self._locate(sample_index)
        row = self._align_indices[shard][sample_index - self._first[shard]]
        if int(row["sample_index"]) != sample_index:
            raise StoreCorruptError(f"{self.path}: alignment row for sample {sample_index} says {int(row['sample_index'])}")
        return shard, row

    def num_student_tokens(self, sample_index: int) -> int:
        """Student completion tokens the sample's alignment was made for (cross-tokenizer store)."""
        return int(self._align_row(sample_index)[1]["num_student_tokens"])

    def alignment(self, sample_index: int) -> StoredAlignment:
        """The sample's :class:`StoredAlignment` (numpy copies)."""
        shard, row = self._align_row(sample_index)
        g, n = int(row["num_groups"]), int(row["num_teacher_tokens"])
        off, buf = int(row["offset"]), self._align_payloads[shard]
        file = self.alignment_info['shards'][shard]['payload_file']
        if off + 4 * (6 * (g + 1) + 2 * n) > len(buf):
            raise StoreCorruptError(f"sample {sample_index}: alignment record runs past the end of {file}")
        pos = sample_index - self._first[shard]
        if self._sums and not self._sample_intact(shard, pos, len(PAYLOAD_FIELDS), buf[off:off + 24 * (g + 1) + 8 * n]):
            self._raise_corrupt_sample(shard, pos, sample_index,
                                       (("alignment groups", off, 24 * (g + 1)), ("teacher_ids", off + 24 * (g + 1), 4 * n),
                                        ("teacher_logprobs", off + 24 * (g + 1) + 4 * n, 4 * n)), len(PAYLOAD_FIELDS),
                                       buf, file)
        packed = np.frombuffer(buf, dtype="<i4", count=6 * (g + 1), offset=off).reshape(g + 1, 6).copy()
        off += 24 * (g + 1)
        ids = np.frombuffer(buf, dtype="<i4", count=n, offset=off).copy()
        lp = np.frombuffer(buf, dtype="<f4", count=n, offset=off + 4 * n).copy()
        al = StoredAlignment(packed, ids, lp)
        if (al.num_groups, al.num_student_tokens, al.num_teacher_tokens) != \
                (g, int(row["num_student_tokens"]), n):
            raise StoreCorruptError(f"sample {sample_index}: alignment header disagrees with its index row")
        version = self.manifest.extensions[ALIGNMENT_EXTENSION]["alignment_version"]
        if int(packed[0, 4]) != int(version):
            raise StoreCorruptError(f"{self.path}: sample {sample_index}: alignment version {int(packed[0, 4])} in "
                                    f"{file}, the manifest says {version}")
        return al

    def vocab_map(self, student_vocab_size: Optional[int] = None):
        """The teacher → student :class:`~nemo_kd.align.vocab_map.VocabMap` of a cross-tokenizer store.

        ``student_vocab_size``: the student model's (padded) output rows (default: its
        tokenizer's size); the teacher side is the manifest's ``teacher_vocab_size``.
        """
        from nemo_kd.align.vocab_map import VocabMap

        info = self.alignment_info
        if not info:
            raise StoreError(f"{self.path}: not a cross-tokenizer store: it has no vocabulary map")
        file = os.path.join(self.path, info["vocab_map_file"])
        if not os.path.exists(file):
            raise StoreCorruptError(f"{file}: missing (the cross-tokenizer store's vocabulary map)")
        if _sha256_file(file) != info["vocab_map_sha256"]:
            raise StoreCorruptError(f"{file}: checksum differs from the manifest's {info['vocab_map_sha256']}")
        tables = np.load(file, allow_pickle=False).astype(np.int64)
        tables = tables[None] if tables.ndim == 1 else tables
        s_real, t_real = int(info["student_real_vocab"]), int(info["teacher_real_vocab"])
        s_size = int(student_vocab_size) if student_vocab_size is not None else s_real
        t_size = max(int(self.manifest.teacher_vocab_size or t_real), t_real)
        if s_size < s_real:
            raise StoreMismatchError([f"student vocabulary size {s_size} is below the student tokenizer's {s_real} "
                                      "the store was aligned for"], self.path)
        if tables.ndim != 2 or tables.shape[1] != t_real or (tables >= s_real).any():
            raise StoreCorruptError(f"{file}: expected [n, {t_real}] ids < {s_real}, got shape {tables.shape}")
        full = np.full((tables.shape[0], t_size), -1, dtype=np.int64)
        full[:, :t_real] = tables
        return VocabMap(full[0], s_size, t_size, s_real, t_real, is_identity=bool(info["vocab_map_identity"]),
                        boundary_maps=full[1:] if len(full) > 1 else None)

    def read_numpy(self, sample_index: int):
        """``(values fp32 [n,k], ids int32 [n,k], lse fp32 [n], seq_logprob)`` as numpy copies."""
        shard, row = self._locate(sample_index)
        n, off, k = int(row["num_tokens"]), int(row["offset"]), self._k
        buf = self._payloads[shard]
        if off + bytes_per_sample(n, k, self.manifest.values_dtype) > len(buf):
            raise StoreCorruptError(f"sample {sample_index}: record runs past the end of {self.manifest.shards[shard].payload_file}")
        # One copy of the sample's bytes out of the memory map: the checksum is taken over exactly the bytes
        # decoded below (the file cannot change between check and use), and while they are in cache.
        ids_bytes, lse_bytes = 4 * n * k, 4 * n
        block = bytearray(buf[off:off + ids_bytes + lse_bytes + n * k * self._vdtype.itemsize])
        pos = sample_index - self._first[shard]
        if self._sums and not self._sample_intact(shard, pos, 0, block):
            self._raise_corrupt_sample(shard, pos, sample_index,
                                       (("ids", 0, ids_bytes), ("lse", ids_bytes, lse_bytes),
                                        ("values", ids_bytes + lse_bytes, len(block) - ids_bytes - lse_bytes)), 0,
                                       memoryview(block), self.manifest.shards[shard].payload_file, base=off)
        ids = np.frombuffer(block, dtype="<i4", count=n * k).reshape(n, k)
        lse = np.frombuffer(block, dtype="<f4", count=n, offset=ids_bytes)
        raw = np.frombuffer(block, dtype=self._vdtype, count=n * k, offset=ids_bytes + lse_bytes).reshape(n, k)
        values = _decode_values(raw, self.manifest.values_dtype)
        if self.manifest.values_encoding == "logprobs":
            values = values + lse[:, None]  # back to logits (fp32): z − LSE stays as precise as stored
        if not (np.isfinite(values).all() and np.isfinite(lse).all()):
            raise StoreCorruptError(f"sample {sample_index}: non-finite (NaN/Inf) teacher logits or LSE in the store")
        return values, ids, lse, float(row["seq_logprob"])

    @property
    def has_log_tail(self) -> bool:
        """Whether the store keeps the teacher's log tail mass per token (``teacher_log_tail`` extension)."""
        return self._tail_info is not None

    def read_log_tail(self, sample_index: int) -> Optional[np.ndarray]:
        """The sample's ``log Σ_{v ∉ top-k} p_v`` per token, fp32 ``[n]`` (a copy), or ``None`` without the
        extension. Checked against its per-sample checksum (a failure names the field ``log_tail``)."""
        if self._tail_info is None:
            return None
        shard, row = self._locate(sample_index)
        pos = sample_index - self._first[shard]
        start, end = (int(x) for x in self._tail_starts[shard][pos:pos + 2])
        buf, file = self._tails[shard], self._tail_info["shards"][shard]["file"]
        if end > len(buf) or end - start != LOG_TAIL_DTYPE.itemsize * int(row["num_tokens"]):
            raise StoreCorruptError(f"sample {sample_index}: log_tail runs past the end of {file}")
        data = bytes(buf[start:end])
        recorded = int(self._tail_sums[shard][pos])
        if _checksum(data, self._seed) != recorded:
            raise StoreCorruptError(
                f"{self.path}: sample {sample_index} ({file}, bytes {start}..{end}): its log_tail fail their "
                f"{SAMPLE_CHECKSUM_ALGORITHM} checksum (read {_checksum(data, self._seed):016x}, recorded "
                f"{recorded:016x}): the store is damaged. Re-extract it or restore the file; `nemo-kd-verify-store "
                f"{self.path}` checks every sample")
        tail = np.frombuffer(data, dtype=LOG_TAIL_DTYPE).copy()
        if not (tail <= 0).all():
            raise StoreCorruptError(f"sample {sample_index}: log_tail in {file} is NaN or > 0 (not a log-probability)")
        return tail

    def __getitem__(self, sample_index: int) -> TeacherTopK:
        import torch

        values, ids, lse, seq_logprob = self.read_numpy(int(sample_index))
        log_tail = self.read_log_tail(int(sample_index))
        return TeacherTopK(
            int(sample_index),
            torch.from_numpy(values),
            torch.from_numpy(ids.astype(np.int64)),
            torch.from_numpy(lse),
            seq_logprob,
            self.alignment(int(sample_index)) if self.cross_tokenizer else None,
            torch.from_numpy(log_tail) if log_tail is not None else None,
        )

    def verification_steps(self, samples: bool = False) -> int:
        """How many ``progress`` calls :meth:`verify_checksums` makes (files, then samples)."""
        return len(self._files(True)) + len(self._files(False)) + (1 if self.cross_tokenizer else 0) + \
            (len(self) if samples else 0)

    def verify_checksums(self, samples: bool = False, progress: Optional[Callable[[int], None]] = None) -> None:
        """Re-hash every file whole against the manifest's sha256 (``samples``: then read every sample
        through its per-sample checks too); :class:`StoreCorruptError` names the first damaged one.
        ``progress(nbytes_or_samples)`` is called as the work advances (for a progress bar)."""
        files = [(name, digest) for name, _, digest in self._files(True) + self._files(False)]
        info = self.alignment_info
        if info:
            files.append((info["vocab_map_file"], info["vocab_map_sha256"]))
        for name, expected in files:
            actual = _sha256_file(os.path.join(self.path, name))
            if actual != expected:
                raise StoreCorruptError(f"{os.path.join(self.path, name)}: checksum {actual} != manifest {expected}")
            if progress is not None:
                progress(1)
        if samples:
            for i in range(len(self)):
                self.read_numpy(i)
                self.read_log_tail(i)
                if self.cross_tokenizer:
                    self.alignment(i)
                if progress is not None:
                    progress(1)

    def check_topk_convention(self, topk_convention: Optional[str]) -> None:
        """Refuse ``exact_tail`` on a store whose ``lse`` covers only the k stored logits."""
        if topk_convention == "exact_tail" and not self.manifest.exact_tail_available:
            raise StoreMismatchError([
                "topk_convention=exact_tail needs the teacher's full-vocabulary log-sum-exp, and this store has "
                f"only the log-sum-exp of its k={self.manifest.k} stored logits (unavailable_statistics: "
                f"{self.manifest.unavailable_statistics}; e.g. NeMo-Aligner top-k logits imported without "
                "log_sum_exp_logits): use topk_convention=renormalized, or extract the teacher again with "
                "compute_topk_logits"], self.path)

    def check_compatible(
        self,
        dataset_hash: Optional[str] = None,
        tokenizer_hash: Optional[str] = None,
        k: Optional[int] = None,
        max_seq_length: Optional[int] = None,
        num_completion_tokens_fn: Optional[Callable[[int], int]] = None,
        num_samples: Optional[int] = None,
        teacher_hash: Optional[str] = None,
        max_reported: int = 5,
        student_tokenizer_hash: Optional[str] = None,
        student_max_seq_length: Optional[int] = None,
    ) -> None:
        """Raise :class:`StoreMismatchError` listing every setting that differs.

        Arguments left ``None`` are not checked. ``num_completion_tokens_fn(i)``
        gives the dataset's completion length of sample ``i`` (after truncation to
        ``max_seq_length``); every sample is compared with the stored token count
        and the first ``max_reported`` disagreements are named.

        Cross-tokenizer store: ``tokenizer_hash`` / ``max_seq_length`` are the
        *teacher's* rendering; the student dataset is checked with
        ``student_tokenizer_hash`` / ``student_max_seq_length``, and
        ``num_completion_tokens_fn`` is compared with the student token counts the
        alignments were made for. Passing ``student_*`` to a same-tokenizer store is
        itself a mismatch (it has no alignment for a student tokenisation).
        """
        m = self.manifest
        diffs = []
        info = self.alignment_info
        if not self.cross_tokenizer and (student_tokenizer_hash is not None or student_max_seq_length is not None):
            diffs.append("cross-tokenizer alignment: the store has none (format version 1, built for the teacher's "
                         "tokenizer only); re-extract with align_teacher_template=true and the student tokenizer")
        for name, want, have in (
            ("dataset hash", dataset_hash, m.dataset_hash),
            ("tokenizer hash", tokenizer_hash, m.tokenizer_hash),
            ("k", k, m.k),
            ("max_seq_length", max_seq_length, m.max_seq_length),
            ("number of samples", num_samples, m.num_samples),
            ("teacher hash", teacher_hash, m.teacher_hash),
            ("student tokenizer hash", student_tokenizer_hash if info else None, info.get("student_tokenizer_hash")),
            ("student max_seq_length", student_max_seq_length if info else None, info.get("student_max_seq_length")),
        ):
            if want is not None and want != have:
                diffs.append(f"{name}: store has {have!r}, expected {want!r}")
        if num_completion_tokens_fn is not None and not diffs:
            bad = 0
            count = self.num_student_tokens if self.cross_tokenizer else self.num_tokens
            what = "student completion tokens" if self.cross_tokenizer else "completion tokens"
            for i in range(m.num_samples):
                want, have = int(num_completion_tokens_fn(i)), count(i)
                if want != have:
                    bad += 1
                    if bad <= max_reported:
                        diffs.append(f"sample {i}: store has {have} {what}, the dataset gives {want}")
            if bad > max_reported:
                diffs.append(f"... and {bad - max_reported} more sample(s) with a different token count")
        if diffs:
            raise StoreMismatchError(diffs, self.path)

    def close(self) -> None:
        self._payloads, self._indices = [], []
        self._align_payloads, self._align_indices = [], []
        self._tails, self._tail_sums, self._tail_starts = [], [], []

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
