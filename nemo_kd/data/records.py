"""Input records for distillation: prompt/completion samples read from disk, validated.

Two input shapes are accepted, in JSON Lines files (one object per line) or in a
Hugging Face ``datasets`` dataset saved with ``save_to_disk``:

* ``{"prompt": str, "response": str, "id": optional}`` – becomes the chat
  ``[{"role": "user", ...}, {"role": "assistant", ...}]``;
* ``{"messages": [{"role": str, "content": str}, ...], "id": optional}`` – the
  trailing run of ``assistant`` turns is the completion, everything before is the
  prompt;
* a preference pair, ``{"prompt": str | "messages": [prompt turns], "chosen": ...,
  "rejected": ..., "id": optional}`` (the TRL/DPO layout; ``chosen``/``rejected`` a
  string or a list of assistant turns) – becomes *two* consecutive records, the
  chosen conversation (:data:`ROLE_CHOSEN`) then the rejected one
  (:data:`ROLE_REJECTED`), sharing a pair number. Preference distillation makes the
  teacher's response the chosen one and the student's the rejected one.

Every sample keeps its raw text (the messages, untouched): a later stage renders
them with a chat template (possibly the teacher's own), so nothing here tokenises
or templates. Malformed input raises :class:`DataError` naming ``file:line`` and
the reason; with ``skip_bad_samples=True`` such samples are dropped and listed in
:attr:`RecordSet.skipped` instead.

:attr:`RecordSet.content_hash` is a stable sha256 over the canonical JSON of the
kept records (ids, messages and pair roles, in order) – independent of file names, line
numbers, key order and whitespace – so a logits store can tell it was built from a
different dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__all__ = [
    "ALLOWED_ROLES",
    "DataError",
    "ROLE_CHOSEN",
    "ROLE_REJECTED",
    "ROLE_SINGLE",
    "Record",
    "RecordSet",
    "SkippedSample",
    "read_records",
    "records_from_objects",
]

ALLOWED_ROLES = ("system", "user", "assistant", "tool")
# Record.role: an ordinary sample, or one side of a preference pair.
ROLE_SINGLE, ROLE_CHOSEN, ROLE_REJECTED = "single", "chosen", "rejected"


def completion_start(messages: Sequence[Dict[str, str]]) -> int:
    """Index of the first message of the completion: the trailing run of assistant turns."""
    start = len(messages)
    while start > 0 and messages[start - 1]["role"] == "assistant":
        start -= 1
    return start
# Bumped if the canonical form hashed by RecordSet.content_hash ever changes, so
# old and new hashes can never collide by accident.
_HASH_DOMAIN = b"nemo_kd.records.v1\n"

SampleId = Union[str, int, None]


class DataError(ValueError):
    """A malformed input sample. ``str(err)`` is ``"<file>:<line>: <reason>"``."""

    def __init__(self, file: str, line: int, reason: str):
        self.file, self.line, self.reason = file, line, reason
        super().__init__(f"{file}:{line}: {reason}")


@dataclass(frozen=True)
class SkippedSample:
    """A sample dropped in ``skip_bad_samples`` mode."""

    file: str
    line: int  # 1-based line of a .jsonl file; 1-based row number of an HF dataset
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class Record:
    """One validated sample.

    Attributes:
        index: position among the kept samples (0..len-1): the key a logits store uses.
        id: the sample's ``id`` field if present (str or int), else ``None``.
        messages: ``({"role", "content"}, ...)``; the trailing assistant turns are
            the completion. Content is the raw text, never templated.
        source_file / source_line: where it came from (line is 1-based).
        role: :data:`ROLE_SINGLE`, or :data:`ROLE_CHOSEN` / :data:`ROLE_REJECTED` for the
            two sides of a preference pair (consecutive records, chosen first).
        pair: the pair's number (0..pairs-1) among the kept pairs; -1 for a single.
    """

    index: int
    id: SampleId
    messages: Tuple[Dict[str, str], ...]
    source_file: str = ""
    source_line: int = 0
    role: str = ROLE_SINGLE
    pair: int = -1

    @property
    def num_completion_messages(self) -> int:
        return len(self.messages) - completion_start(self.messages)

    @property
    def prompt_messages(self) -> Tuple[Dict[str, str], ...]:
        return self.messages[: len(self.messages) - self.num_completion_messages]

    @property
    def completion_messages(self) -> Tuple[Dict[str, str], ...]:
        return self.messages[len(self.messages) - self.num_completion_messages :]

    @property
    def prompt_text(self) -> str:
        """Prompt contents joined by newlines (no template): for a prompt/response
        sample this is exactly the ``prompt`` string."""
        return "\n".join(m["content"] for m in self.prompt_messages)

    @property
    def completion_text(self) -> str:
        """Completion contents joined by newlines (no template): for a prompt/response
        sample this is exactly the ``response`` string."""
        return "\n".join(m["content"] for m in self.completion_messages)

    def canonical(self) -> Dict[str, Any]:
        """The hashed content: id, messages and pair role (not index or source location).
        A single's form has no role, so hashes of plain datasets never change."""
        out = {"id": self.id, "messages": [dict(m) for m in self.messages]}
        if self.role != ROLE_SINGLE:
            out["role"] = self.role
        return out


@dataclass
class RecordSet:
    """Validated records plus the samples skipped in ``skip_bad_samples`` mode."""

    records: List[Record]
    skipped: List[SkippedSample] = field(default_factory=list)
    source: str = ""
    _hash: Optional[str] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Record:
        return self.records[i]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def content_hash(self) -> str:
        """``sha256:<hex>`` over the canonical JSON of every kept record, in order."""
        if self._hash is None:
            h = hashlib.sha256(_HASH_DOMAIN)
            for r in self.records:
                h.update(json.dumps(r.canonical(), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
                h.update(b"\n")
            self._hash = "sha256:" + h.hexdigest()
        return self._hash

    @property
    def num_pairs(self) -> int:
        return sum(r.role == ROLE_CHOSEN for r in self.records)

    @property
    def is_preference(self) -> bool:
        """Every record is one side of a preference pair (a pair dataset)."""
        return bool(self.records) and all(r.role != ROLE_SINGLE for r in self.records)

    def skipped_report(self) -> str:
        """Human-readable list of skipped samples (empty string if none)."""
        if not self.skipped:
            return ""
        lines = [f"skipped {len(self.skipped)} bad sample(s):"] + [f"  {s}" for s in self.skipped]
        return "\n".join(lines)


# ----------------------------------------------------------------------------- validation


class _Invalid(Exception):
    """Internal: reason a single object is not a valid sample."""


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _require_str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"wrong type for {what}: expected string, got {_type_name(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's "\ud800" escapes decode to lone surrogates: no tokenizer takes them
        raise _Invalid(f"unencodable text in {what}: {value[e.start:e.end].encode('unicode_escape').decode()} at "
                       f"character {e.start} ({e.reason})") from None
    return value


def _validate_id(obj: Dict[str, Any]) -> SampleId:
    if "id" not in obj or obj["id"] is None:
        return None
    sid = obj["id"]
    # bool is an int subclass in Python but certainly not a sample id.
    if isinstance(sid, bool) or not isinstance(sid, (str, int)):
        raise _Invalid(f"wrong type for field 'id': expected string or integer, got {_type_name(sid)}")
    return sid


def _validate_messages(messages: Any) -> Tuple[Dict[str, str], ...]:
    if not isinstance(messages, list):
        raise _Invalid(f"wrong type for field 'messages': expected list, got {_type_name(messages)}")
    if not messages:
        raise _Invalid("field 'messages' is empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Invalid(f"wrong type for messages[{i}]: expected object, got {_type_name(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise _Invalid(f"missing field 'messages[{i}].{key}'")
        role = _require_str(m["role"], f"messages[{i}].role")
        content = _require_str(m["content"], f"messages[{i}].content")
        if role not in ALLOWED_ROLES:
            raise _Invalid(f"invalid role {role!r} in messages[{i}] (allowed: {', '.join(ALLOWED_ROLES)})")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _Invalid("no assistant turn: a chat sample needs a final assistant message as the completion")
    if out[-1]["role"] != "assistant":
        raise _Invalid(f"no assistant turn at the end: the last message has role {out[-1]['role']!r}; the completion must be the final assistant turn(s)")
    return tuple(out)


def _check_completion(messages: Tuple[Dict[str, str], ...], what: str = "completion") -> None:
    # Whitespace-only completions carry no training signal and usually mean a broken export.
    if not any(m["content"].strip() for m in messages[completion_start(messages) :]):
        raise _Invalid(f"empty {what}: the final assistant turn(s) contain no text")


def _validate_pair(obj: Dict[str, Any]) -> List[Tuple[str, Tuple[Dict[str, str], ...]]]:
    """``[(ROLE_CHOSEN, messages), (ROLE_REJECTED, messages)]`` of a preference pair."""
    if "response" in obj:
        raise _Invalid("ambiguous sample: has 'response' and 'chosen'/'rejected'")
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise _Invalid(f"missing field '{key}' (a preference pair needs 'chosen' and 'rejected')")
    if obj.get("messages") is not None:
        if "prompt" in obj:
            raise _Invalid("ambiguous sample: has both 'messages' and 'prompt'")
        prompt = obj["messages"]
        if not isinstance(prompt, list) or not prompt:
            raise _Invalid("field 'messages' of a preference pair must be a non-empty list of prompt turns")
    elif "prompt" in obj:
        prompt = [{"role": "user", "content": _require_str(obj["prompt"], "field 'prompt'")}]
    else:
        raise _Invalid("missing field: a preference pair needs 'prompt' or 'messages'")
    out = []
    for key, role in (("chosen", ROLE_CHOSEN), ("rejected", ROLE_REJECTED)):
        side = obj[key]
        turns = [{"role": "assistant", "content": side}] if isinstance(side, str) else side
        if not isinstance(turns, list):
            raise _Invalid(f"wrong type for field '{key}': expected string or list of assistant turns, "
                           f"got {_type_name(side)}")
        messages = _validate_messages(list(prompt) + list(turns))
        if completion_start(messages) != len(prompt):
            raise _Invalid(f"field '{key}' must hold only assistant turns after a prompt that does not end "
                           "with an assistant turn")
        _check_completion(messages, f"'{key}' response")
        out.append((role, messages))
    return out


def _validate_object(obj: Any) -> List[Tuple[SampleId, str, Tuple[Dict[str, str], ...]]]:
    """``[(id, role, messages)]`` of a decoded sample (two entries for a preference pair),
    or raise :class:`_Invalid`."""
    if not isinstance(obj, dict):
        raise _Invalid(f"wrong type for sample: expected JSON object, got {_type_name(obj)}")
    sid = _validate_id(obj)
    if "chosen" in obj or "rejected" in obj:
        return [(sid, role, messages) for role, messages in _validate_pair(obj)]
    if "messages" in obj and obj["messages"] is not None:
        if "prompt" in obj or "response" in obj:
            raise _Invalid("ambiguous sample: has both 'messages' and 'prompt'/'response'")
        messages = _validate_messages(obj["messages"])
    else:
        if "prompt" not in obj and "response" not in obj:
            raise _Invalid("missing field: expected 'prompt' and 'response', or 'messages'")
        for key in ("prompt", "response"):
            if key not in obj:
                raise _Invalid(f"missing field '{key}'")
        prompt = _require_str(obj["prompt"], "field 'prompt'")
        response = _require_str(obj["response"], "field 'response'")
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})
    _check_completion(messages)
    return [(sid, ROLE_SINGLE, messages)]


# ----------------------------------------------------------------------------- readers


def _iter_jsonl(path: str) -> Iterator[Tuple[int, Any, Optional[str]]]:
    """Yield ``(line_number, obj, error_reason)`` per non-blank line of a JSON Lines file."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"bad UTF-8: {e.reason} at byte {e.start}"
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]  # tolerate a byte-order mark
            if not text.strip():
                continue
            try:
                yield lineno, json.loads(text), None
            except json.JSONDecodeError as e:
                yield lineno, None, f"bad JSON: {e.msg} (column {e.colno})"


def _iter_hf_dataset(path: str, split: Optional[str]) -> Tuple[str, Iterator[Tuple[int, Any, Optional[str]]]]:
    import datasets  # optional dependency, only for directories

    ds = datasets.load_from_disk(path)
    label = path
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path} is a DatasetDict with splits {sorted(ds)}; pass split=")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{path} has no split {split!r} (splits: {sorted(ds)})")
        ds = ds[split]
        label = f"{path}[{split}]"

    def rows():
        for i, row in enumerate(ds, start=1):
            # HF fills absent columns with None; drop them so "missing" reads as missing.
            yield i, {k: v for k, v in row.items() if v is not None}, None

    return label, rows()


def records_from_objects(
    items: Iterable[Tuple[str, int, Any, Optional[str]]], skip_bad_samples: bool = False, source: str = ""
) -> RecordSet:
    """Validate ``(file, line, obj, pre_error)`` tuples into a :class:`RecordSet`."""
    records: List[Record] = []
    skipped: List[SkippedSample] = []
    pairs = 0
    for file, line, obj, pre_error in items:
        try:
            if pre_error is not None:
                raise _Invalid(pre_error)
            entries = _validate_object(obj)
        except _Invalid as e:
            if not skip_bad_samples:
                raise DataError(file, line, str(e)) from None
            skipped.append(SkippedSample(file, line, str(e)))
            continue
        pair = pairs if len(entries) == 2 else -1
        pairs += len(entries) == 2
        for sid, role, messages in entries:
            records.append(Record(len(records), sid, messages, file, line, role, pair))
    return RecordSet(records, skipped, source)


def read_records(path: Union[str, os.PathLike], skip_bad_samples: bool = False, split: Optional[str] = None) -> RecordSet:
    """Read and validate samples from a ``.jsonl`` file or a ``datasets.save_to_disk`` directory.

    Args:
        path: a JSON Lines file, or a directory written by ``Dataset.save_to_disk``
            (``DatasetDict`` too: pick the split with ``split``, or it must have one).
        skip_bad_samples: drop malformed samples (listed in ``RecordSet.skipped``)
            instead of raising :class:`DataError`.

    Raises:
        DataError: ``"<file>:<line>: <reason>"`` for the first malformed sample.
        FileNotFoundError: ``path`` does not exist.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such dataset: {path}")
    if os.path.isdir(path):
        label, rows = _iter_hf_dataset(path, split)
        items = ((label, line, obj, err) for line, obj, err in rows)
    else:
        items = ((path, line, obj, err) for line, obj, err in _iter_jsonl(path))
    return records_from_objects(items, skip_bad_samples, source=path)
