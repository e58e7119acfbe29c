"""A teacher behind an HTTP server (vLLM, SGLang, ``nemo-kd-serve-teacher``): the client that scores token ids.

The teacher is not loaded here; its top-k log-probs come over the network, for exactly
the token ids the local teacher tokenizer produced (its own chat template, as an
in-process extraction renders them). One request per sample, teacher-forced (one
prefill, no generation), ``concurrency`` requests in flight.

Wire dialects (``dialect: vllm | sglang | auto``)
-------------------------------------------------
``vllm``: OpenAI-compatible ``POST /v1/completions`` with ``prompt`` = the token ids,
``prompt_logprobs = k``, ``echo``, ``max_tokens = 1`` (vLLM needs one generated token;
it is discarded) and ``temperature = 0``. The choice's ``prompt_logprobs`` is a list
with one entry per prompt token: ``null`` at position 0 (nothing predicts the first
token), then ``{token_id (a string in JSON): {logprob, rank, decoded_token}}`` with the k
best tokens *plus the scored token itself* when it is outside the top-k (k + 1 entries).
``--max-logprobs`` (default 20) caps k; a larger request is refused by the server, which
:func:`_refusal` turns into an error naming the flag. Newer vLLM also echoes the ids
(``return_token_ids`` → ``prompt_token_ids``), compared when present.

``sglang``: native ``POST /generate`` with ``input_ids``, ``return_logprob``,
``logprob_start_len = 0``, ``top_logprobs_num = k``, ``return_text_in_logprobs = false``:
``meta_info.input_token_logprobs`` is one ``[logprob, token_id, text|null]`` per prompt
token (logprob ``null`` at position 0) and ``meta_info.input_top_logprobs`` one list of k
such triples per position (``null`` at position 0).

``auto`` probes ``GET /get_model_info`` (SGLang only; SGLang also answers ``/v1/models``)
and then ``GET /v1/models`` (vLLM and the nemo_kd server).

What is checked, per sample (an error names the sample, the endpoint and the server's own
message): one position per sent token, the scored token's id at every position (vLLM: it is
in the position's entries, and the echoed ``prompt_token_ids`` when given; SGLang: the
echoed id), k entries (k + 1 with the scored token outside the top-k), no NaN/Inf
(:class:`~nemo_kd.losses.token_stats.NonFiniteLogitsError`) and no positive log-prob. Values are
sorted as the in-process top-k is (value descending, then lower id).

Sampling (:meth:`TeacherClient.sample`): ``n`` completions of one token-id prompt.
``vllm``: ``/v1/completions`` with ``n``, ``temperature``, ``top_p``, ``top_k`` (when > 0), ``max_tokens``,
``seed``, ``stop_token_ids``, ``logprobs = k``, ``return_token_ids`` and ``return_tokens_as_token_ids``;
``choices[c]`` holds ``token_ids`` (the stop token included, as vLLM returns it), ``finish_reason``
(``stop`` | ``length``) and ``logprobs.token_logprobs`` (vLLM's default ``raw_logprobs``: the model's
distribution at temperature 1). Against ``nemo-kd-serve-teacher`` the request also carries
``nemo_kd_sample_offset``, so the server draws exactly as the in-process sampler does for that global
sample index. ``sglang``: ``/generate`` with ``sampling_params`` (``n``, ``temperature``, ``top_p``,
``top_k``, ``max_new_tokens``, ``stop_token_ids``, ``sampling_seed``) and ``return_logprob``
(``meta_info.output_token_logprobs``, ``finish_reason``); SGLang reports the log-probs of the
distribution it sampled from unless started otherwise, so callers rescore (:meth:`TeacherClient.rescore`,
teacher-forced ``prompt_logprobs``) when they need temperature 1. Checked: ``n`` choices with indices
``0..n-1``, the echoed prompt ids, one finite non-positive log-prob per generated token, token ids in
the vocabulary; an error names the sample.

Retries. Connection errors, timeouts, 408/429/5xx are retried with exponential backoff and
full jitter, honouring ``Retry-After``; other 4xx are not (a bad request stays bad). The API
key (``api_key_env``: the *name* of an environment variable) is sent as a bearer token and
scrubbed from every message this module produces; URLs are shown without user-info.

Why log-probs are enough. The store keeps top-k log-probs with an LSE of 0, which is the
exact log-normaliser of log-probs: every loss reads ``exp(v − lse)`` (the top-k
probabilities and the ``exact_tail`` tail ``1 − Σ p``) or a softmax over the top-k, invariant to
a per-row shift, so a served store trains as an in-process one does. What a server cannot
give are the raw logits themselves; the store records that in
``extensions["served_teacher"]`` (:data:`SERVED_TEACHER_EXTENSION`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import hashlib
import itertools
import json
import logging
import math
import operator
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import msgspec
import numpy as np
import torch

from nemo_kd.losses.token_stats import NonFiniteLogitsError
from nemo_kd.teacher.teachers import Teacher

__all__ = [
    "DIALECTS",
    "SERVED_TEACHER_EXTENSION",
    "SampledCompletion",
    "ScoredTokens",
    "ServedTeacher",
    "ServedTeacherConfig",
    "ServedTeacherError",
    "TeacherClient",
    "decode_sglang_generate",
    "decode_vllm_completion",
    "parse_sglang_generate",
    "parse_sglang_sampled",
    "parse_vllm_completion",
    "parse_vllm_sampled",
]

DIALECTS = ("vllm", "sglang", "auto")
SERVED_TEACHER_EXTENSION = "served_teacher"
_RETRY_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
_HASH_DOMAIN = b"nemo_kd.served_teacher.v1\n"
# Positive log-probs up to this are fp32 rounding of log_softmax near 0 (stored as 0); above it, refused.
_POSITIVE_TOLERANCE = 1e-6
_MASS_TOLERANCE = 1e-3  # a top-k's probabilities sum to <= 1 (fp32 / bf16 rounding of a log_softmax)
log = logging.getLogger(__name__)


class ServedTeacherError(RuntimeError):
    """A served teacher failed or answered something that is not the scoring of the ids sent."""


@dataclass
class ServedTeacherConfig:
    """``teacher.*`` of ``conf/compute_topk_logits.yaml`` with ``teacher.type: served``."""

    url: Optional[str] = None  # e.g. http://teacher-node:8000 (no path; the dialect picks the endpoint)
    model: Optional[str] = None  # the server's model id; None: the only one it serves
    dialect: str = "auto"  # vllm | sglang | auto (probed)
    concurrency: int = 32  # requests in flight per client process
    api_key_env: Optional[str] = None  # NAME of the environment variable holding the API key (never the key)
    connect_timeout_s: float = 10.0
    request_timeout_s: float = 600.0  # one sample's scoring, queueing on the server included
    max_retries: int = 8  # per request, on connection errors / timeouts / 408 / 429 / 5xx
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    vocab_size: Optional[int] = None  # None: what the server reports (nemo_kd server), else the tokenizer's size
    name: Optional[str] = None  # recorded in the manifest (None: the server's model id)

    def __post_init__(self):
        if not self.url:
            raise ValueError("teacher.type=served needs teacher.url (e.g. http://host:8000)")
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"teacher.url must be http(s)://host[:port], got {display_url(self.url)!r}")
        if self.dialect not in DIALECTS:
            raise ValueError(f"teacher.dialect must be one of {DIALECTS}, got {self.dialect!r}")
        if self.concurrency < 1 or self.max_retries < 0:
            raise ValueError("teacher.concurrency must be >= 1 and teacher.max_retries >= 0")
        if min(self.connect_timeout_s, self.request_timeout_s) <= 0:
            raise ValueError("teacher timeouts must be > 0")

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def api_key(self) -> Optional[str]:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(f"teacher.api_key_env={self.api_key_env}: that environment variable is not set")
        return key


def display_url(url: str) -> str:
    """``url`` without user-info (``user:password@``) and query: what logs and errors may show."""
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return urlunsplit((p.scheme, host, p.path, "", ""))


@dataclass
class ScoredTokens:
    """One sample's scored completion: rows are completion tokens ``first .. L-1``."""

    values: np.ndarray  # [n, k] float32 log-probs, descending (ties: lower id first)
    ids: np.ndarray  # [n, k] int64
    label_logprobs: np.ndarray  # [n] float32 log p(token_j | tokens_<j)


@dataclass
class SampledCompletion:
    """One completion drawn by a server: ``token_ids`` without the stop token that ended it; ``logprobs`` one
    per token of ``token_ids`` plus the stop token's when ``finished`` and the server reported it."""

    token_ids: List[int]
    finished: bool  # ended by a stop / end token (False: max_tokens ran out)
    logprobs: List[float]
    finish_reason: str


# ----------------------------------------------------------------------------- wire parsing (pure)


def _check_logprob(x: Any, where: str, what: str) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        raise ServedTeacherError(f"{where}: malformed response: {what} is {x!r}, not a number")
    x = float(x)
    if not math.isfinite(x):
        raise NonFiniteLogitsError(f"non-finite (NaN/Inf) teacher log-prob in {where}, {what}")
    if x > _POSITIVE_TOLERANCE:
        raise ServedTeacherError(f"{where}: {what} is a positive log-prob ({x}): not a log-probability")
    return min(x, 0.0)


def _check_normalised(got: "ScoredTokens", first: int, where: str) -> "ScoredTokens":
    """Refuse values that are not log-probs (raw logits, e.g. vLLM ``--logprobs-mode raw_logits``): the top-k
    probabilities of a position sum to at most 1."""
    if got.values.size:
        mass = np.exp(got.values.astype(np.float64)).sum(1)
        bad = np.flatnonzero(mass > 1 + _MASS_TOLERANCE)
        if bad.size:
            j = int(bad[0])
            raise ServedTeacherError(f"{where}: token position {first + j}: the top-k probabilities sum to "
                                     f"{mass[j]:.6g} > 1: the server's values are not log-probs (vLLM: serve with "
                                     "the default --logprobs-mode raw_logprobs)")
    return got


def _sorted_topk(entries: List[Tuple[float, int]], k: int, where: str, pos: int):
    if len(entries) != k:
        raise ServedTeacherError(f"{where}: token position {pos}: {len(entries)} top log-probs, expected k={k}")
    entries.sort(key=lambda e: (-e[0], e[1]))  # the in-process order: value descending, then lower id
    return entries


def parse_vllm_completion(body: Mapping[str, Any], ids: Sequence[int], first: int, k: int,
                          where: str) -> ScoredTokens:
    """A vLLM ``/v1/completions`` response (one choice) for prompt ``ids`` → rows ``first .. len(ids)-1``."""
    try:
        choice = body["choices"][0]
        pl = choice["prompt_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise ServedTeacherError(f"{where}: malformed response: no choices[0].prompt_logprobs (keys "
                                 f"{sorted(body) if isinstance(body, dict) else type(body).__name__}); is the "
                                 "server vLLM with prompt_logprobs support?") from None
    if not isinstance(pl, list):
        raise ServedTeacherError(f"{where}: malformed response: prompt_logprobs is {type(pl).__name__}, not a list")
    if len(pl) != len(ids):
        raise ServedTeacherError(f"{where}: the server scored {len(pl)} positions for the {len(ids)} token ids sent "
                                 "(re-tokenised or truncated prompt?)")
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != list(ids):
        bad = next((j for j, (a, b) in enumerate(zip(echoed, ids)) if a != b), min(len(echoed), len(ids)))
        raise ServedTeacherError(f"{where}: the server echoed other token ids than were sent (first difference at "
                                 f"position {bad}: sent {ids[bad] if bad < len(ids) else None}, echoed "
                                 f"{echoed[bad] if bad < len(echoed) else None})")
    usage = body.get("usage") or {}
    if isinstance(usage, dict) and usage.get("prompt_tokens") not in (None, len(ids)):
        raise ServedTeacherError(f"{where}: usage.prompt_tokens={usage['prompt_tokens']} for {len(ids)} token ids sent")
    n = len(ids) - first
    values = np.empty((n, k), dtype=np.float32)
    top_ids = np.empty((n, k), dtype=np.int64)
    labels = np.empty(n, dtype=np.float32)
    for row, j in enumerate(range(first, len(ids))):
        d = pl[j]
        if not isinstance(d, dict):
            raise ServedTeacherError(f"{where}: malformed response: prompt_logprobs[{j}] is {d!r}")
        key = str(ids[j])
        own = d.get(key)
        if own is None:
            raise ServedTeacherError(f"{where}: token position {j}: the scored token {ids[j]} is not among the "
                                     f"server's entries {sorted(d)[:5]}...: it scored other token ids than were sent")
        try:
            labels[row] = _check_logprob(own["logprob"], where, f"token position {j} (token {ids[j]})")
            outside = len(d) == k + 1  # the scored token is outside the top-k: vLLM adds it
            entries = [(_check_logprob(v["logprob"], where, f"token position {j}, candidate {t}"), int(t))
                       for t, v in d.items() if not (outside and t == key)]
        except NonFiniteLogitsError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ServedTeacherError(f"{where}: malformed response: prompt_logprobs[{j}] ({type(e).__name__}: "
                                     f"{e})") from None
        for c, (lp, t) in enumerate(_sorted_topk(entries, k, where, j)):
            values[row, c] = lp
            top_ids[row, c] = t
    return _check_normalised(ScoredTokens(values, top_ids, labels), first, where)


class _VLogprob(msgspec.Struct, gc=False):  # vLLM's Logprob; rank / decoded_token skipped (no objects made)
    logprob: float


class _VChoice(msgspec.Struct):
    prompt_logprobs: List[Optional[Dict[int, _VLogprob]]]
    prompt_token_ids: Optional[List[int]] = None


class _VUsage(msgspec.Struct):
    prompt_tokens: Optional[int] = None


class _VCompletion(msgspec.Struct):
    choices: List[_VChoice]
    usage: Optional[_VUsage] = None


_VLLM_DECODER = msgspec.json.Decoder(_VCompletion)
_LOGPROB = operator.attrgetter("logprob")


def _fast_vllm(raw: bytes, ids: Sequence[int], first: int, k: int) -> Optional[ScoredTokens]:
    """:func:`parse_vllm_completion` of the raw body in C (msgspec) and numpy, or None when anything is off.

    It returns only answers that pass every check of the slow path; None sends the body to the slow path,
    which names what is wrong (NaN is not JSON to msgspec, a missing field, a wrong count, ...)."""
    try:
        body = _VLLM_DECODER.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if not body.choices:
        return None
    choice = body.choices[0]
    pl, n_ids = choice.prompt_logprobs, len(ids)
    if len(pl) != n_ids or (choice.prompt_token_ids is not None and choice.prompt_token_ids != list(ids)):
        return None
    if body.usage is not None and body.usage.prompt_tokens not in (None, n_ids):
        return None
    sub, labels_ids = pl[first:], ids[first:]
    n = len(sub)
    if n == 0:
        return ScoredTokens(np.empty((0, k), np.float32), np.empty((0, k), np.int64), np.empty(0, np.float32))
    if any(d is None for d in sub):
        return None
    own = [d.get(t) for d, t in zip(sub, labels_ids)]
    if any(o is None for o in own):
        return None
    counts = np.fromiter(map(len, sub), np.int64, n)
    if not np.all((counts == k) | (counts == k + 1)):
        return None
    total = int(counts.sum())
    flat_ids = np.fromiter(itertools.chain.from_iterable(sub), np.int64, total)
    # map / attrgetter / chain: the iteration runs in C (a generator expression here cost a third of the decode)
    flat_lp = np.fromiter(map(_LOGPROB, itertools.chain.from_iterable(map(dict.values, sub))), np.float64, total)
    label_lp = np.fromiter(map(_LOGPROB, own), np.float64, n)
    # the scored token is dropped where it is the extra (k + 1-th) entry vLLM adds outside the top-k
    extra = np.repeat(counts == k + 1, counts) & (flat_ids == np.repeat(np.asarray(labels_ids, np.int64), counts))
    keep = ~extra
    if int(keep.sum()) != n * k:
        return None
    vals, top = flat_lp[keep].reshape(n, k), flat_ids[keep].reshape(n, k)
    if not (np.isfinite(vals).all() and np.isfinite(label_lp).all()) or \
            vals.max() > _POSITIVE_TOLERANCE or label_lp.max() > _POSITIVE_TOLERANCE:
        return None
    order = np.lexsort((top, -vals))  # per row: value descending, then lower id (the in-process order)
    vals = np.minimum(np.take_along_axis(vals, order, 1), 0.0).astype(np.float32)
    return ScoredTokens(vals, np.take_along_axis(top, order, 1), np.minimum(label_lp, 0.0).astype(np.float32))


def decode_vllm_completion(raw: bytes, ids: Sequence[int], first: int, k: int, where: str) -> ScoredTokens:
    """The body of a vLLM ``/v1/completions`` answer → :class:`ScoredTokens` (fast path, then the checked one)."""
    got = _fast_vllm(raw, ids, first, k)
    if got is not None:
        return _check_normalised(got, first, where)
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ServedTeacherError(f"{where}: malformed response (not JSON: {e}; body starts "
                                 f"{raw[:200].decode('utf-8', 'replace')!r})") from None
    return parse_vllm_completion(data, ids, first, k, where)


def decode_sglang_generate(raw: bytes, ids: Sequence[int], first: int, k: int, where: str) -> ScoredTokens:
    """The body of an SGLang ``/generate`` answer → :class:`ScoredTokens`."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ServedTeacherError(f"{where}: malformed response (not JSON: {e}; body starts "
                                 f"{raw[:200].decode('utf-8', 'replace')!r})") from None
    return parse_sglang_generate(data, ids, first, k, where)


def parse_sglang_generate(body: Mapping[str, Any], ids: Sequence[int], first: int, k: int,
                          where: str) -> ScoredTokens:
    """An SGLang ``/generate`` response (``logprob_start_len = 0``) for ``ids`` → rows ``first .. len(ids)-1``."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    try:
        meta = body["meta_info"]
        tok_lp, top_lp = meta["input_token_logprobs"], meta["input_top_logprobs"]
    except (KeyError, TypeError):
        raise ServedTeacherError(f"{where}: malformed response: no meta_info.input_token_logprobs / "
                                 "input_top_logprobs (is return_logprob honoured?)") from None
    if not isinstance(tok_lp, list) or not isinstance(top_lp, list) or len(tok_lp) != len(ids) or \
            len(top_lp) != len(ids):
        got = len(tok_lp) if isinstance(tok_lp, list) else tok_lp
        raise ServedTeacherError(f"{where}: the server scored {got} positions for the {len(ids)} token ids sent "
                                 "(re-tokenised or truncated prompt?)")
    n = len(ids) - first
    values = np.empty((n, k), dtype=np.float32)
    top_ids = np.empty((n, k), dtype=np.int64)
    labels = np.empty(n, dtype=np.float32)
    try:
        for j in range(len(ids)):
            if int(tok_lp[j][1]) != ids[j]:
                raise ServedTeacherError(f"{where}: token position {j}: the server scored token {tok_lp[j][1]}, "
                                         f"the id sent is {ids[j]}")
        for row, j in enumerate(range(first, len(ids))):
            labels[row] = _check_logprob(tok_lp[j][0], where, f"token position {j} (token {ids[j]})")
            entries = [(_check_logprob(e[0], where, f"token position {j}, candidate {e[1]}"), int(e[1]))
                       for e in (top_lp[j] or [])]
            for c, (lp, t) in enumerate(_sorted_topk(entries, k, where, j)):
                values[row, c] = lp
                top_ids[row, c] = t
    except NonFiniteLogitsError:
        raise
    except (IndexError, TypeError, ValueError) as e:
        raise ServedTeacherError(f"{where}: malformed response: meta_info logprobs ({type(e).__name__}: {e})") from None
    return _check_normalised(ScoredTokens(values, top_ids, labels), first, where)


def _token_id(x: Any, where: str, vocab_size: Optional[int]) -> int:
    if isinstance(x, str) and x.startswith("token_id:"):  # vLLM's return_tokens_as_token_ids
        x = x[len("token_id:"):]
    try:
        t = int(x)
    except (TypeError, ValueError):
        raise ServedTeacherError(f"{where}: malformed response: token {x!r} is not a token id") from None
    if t < 0 or (vocab_size is not None and t >= vocab_size):
        raise ServedTeacherError(f"{where}: token id {t} is outside the teacher's vocabulary [0, {vocab_size})")
    return t


def _completion(tokens: List[int], lps: List[float], stopped: bool, stop_ids: Sequence[int], reason: str,
                where: str) -> SampledCompletion:
    """Strip the stop token a server includes (vLLM, SGLang) and check one log-prob per token."""
    finished = stopped
    if stopped and tokens and tokens[-1] in stop_ids:
        tokens = tokens[:-1]
    if len(lps) not in (len(tokens), len(tokens) + finished):
        raise ServedTeacherError(f"{where}: {len(lps)} log-probs for {len(tokens)} generated tokens")
    return SampledCompletion(tokens, finished, lps, reason)


def parse_vllm_sampled(body: Mapping[str, Any], ids: Sequence[int], n: int, stop_ids: Sequence[int], where: str,
                       vocab_size: Optional[int] = None) -> List[SampledCompletion]:
    """A vLLM ``/v1/completions`` sampling answer (``n`` choices of prompt ``ids``) → its completions by index."""
    try:
        choices = body["choices"]
    except (KeyError, TypeError):
        raise ServedTeacherError(f"{where}: malformed response: no choices") from None
    if not isinstance(choices, list) or len(choices) != n:
        raise ServedTeacherError(f"{where}: {len(choices) if isinstance(choices, list) else choices!r} choices for "
                                 f"n={n}")
    try:
        order = sorted(choices, key=lambda c: c["index"])
        if [c["index"] for c in order] != list(range(n)):
            raise ServedTeacherError(f"{where}: choice indices {[c['index'] for c in order]} are not 0..{n - 1}")
    except (KeyError, TypeError):
        raise ServedTeacherError(f"{where}: malformed response: a choice without an index") from None
    usage = body.get("usage") or {}
    if isinstance(usage, dict) and usage.get("prompt_tokens") not in (None, len(ids)):
        raise ServedTeacherError(f"{where}: usage.prompt_tokens={usage['prompt_tokens']} for {len(ids)} token ids sent")
    out = []
    for c, ch in enumerate(order):
        at = f"{where} choice {c}"
        echoed = ch.get("prompt_token_ids")
        if echoed is not None and list(echoed) != list(ids):
            raise ServedTeacherError(f"{at}: the server echoed other prompt token ids than were sent "
                                     f"({len(echoed)} ids for {len(ids)} sent)")
        lp = ch.get("logprobs")
        if not isinstance(lp, dict) or not isinstance(lp.get("token_logprobs"), list):
            raise ServedTeacherError(f"{at}: malformed response: no logprobs.token_logprobs (request logprobs)")
        tokens = ch.get("token_ids")
        if tokens is None:  # older vLLM: the ids only as "token_id:N" strings
            tokens = lp.get("tokens")
        if not isinstance(tokens, list):
            raise ServedTeacherError(f"{at}: malformed response: no token_ids (vLLM: return_token_ids or "
                                     "return_tokens_as_token_ids)")
        tokens = [_token_id(t, at, vocab_size) for t in tokens]
        strs = lp.get("tokens")
        if isinstance(strs, list) and len(strs) == len(tokens):
            for j, (x, t) in enumerate(zip(strs, tokens)):
                if isinstance(x, str) and x.startswith("token_id:") and int(x[9:]) != t:
                    raise ServedTeacherError(f"{at}: generated token {j}: token_ids says {t}, logprobs.tokens {x}")
        values = lp["token_logprobs"]
        if len(values) != len(tokens):
            raise ServedTeacherError(f"{at}: {len(values)} token_logprobs for {len(tokens)} generated tokens")
        lps = [_check_logprob(x, at, f"generated token {j}") for j, x in enumerate(values)]
        reason = ch.get("finish_reason")
        if reason not in ("stop", "length"):
            raise ServedTeacherError(f"{at}: finish_reason={reason!r} (expected stop or length)")
        out.append(_completion(tokens, lps, reason == "stop", stop_ids, reason, at))
    return out


def parse_sglang_sampled(body: Any, ids: Sequence[int], n: int, stop_ids: Sequence[int], where: str,
                         vocab_size: Optional[int] = None) -> List[SampledCompletion]:
    """An SGLang ``/generate`` sampling answer (a dict for ``n = 1``, a list of ``n`` dicts) → its completions."""
    items = body if isinstance(body, list) else [body]
    if len(items) != n:
        raise ServedTeacherError(f"{where}: {len(items)} completions for n={n}")
    out = []
    for c, item in enumerate(items):
        at = f"{where} choice {c}"
        try:
            meta = item["meta_info"]
            tokens = [_token_id(t, at, vocab_size) for t in item["output_ids"]]
            pairs = meta["output_token_logprobs"]
            reason = (meta.get("finish_reason") or {}).get("type")
        except (KeyError, TypeError, AttributeError):
            raise ServedTeacherError(f"{at}: malformed response: no output_ids / meta_info.output_token_logprobs / "
                                     "finish_reason (is return_logprob honoured?)") from None
        if meta.get("prompt_tokens") not in (None, len(ids)):
            raise ServedTeacherError(f"{at}: meta_info.prompt_tokens={meta['prompt_tokens']} for {len(ids)} token "
                                     "ids sent")
        if reason not in ("stop", "length"):
            raise ServedTeacherError(f"{at}: finish_reason={reason!r} (expected stop or length)")
        try:
            lps = [_check_logprob(e[0], at, f"generated token {j}") for j, e in enumerate(pairs)]
            for j, (e, t) in enumerate(zip(pairs, tokens)):
                if int(e[1]) != t:
                    raise ServedTeacherError(f"{at}: generated token {j}: output_ids says {t}, "
                                             f"output_token_logprobs {e[1]}")
        except (NonFiniteLogitsError, ServedTeacherError):
            raise
        except (IndexError, TypeError, ValueError) as e:
            raise ServedTeacherError(f"{at}: malformed response: output_token_logprobs ({type(e).__name__}: "
                                     f"{e})") from None
        out.append(_completion(tokens, lps, reason == "stop", stop_ids, reason, at))
    return out


def _server_message(text) -> str:
    """The server's own message from an error body (vLLM/OpenAI ``{"error": {"message"}}`` or ``{"message"}``)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:1000]
        for key in ("message", "detail", "error"):
            if data.get(key):
                return str(data[key])[:1000]
    return text.strip()[:500]


def _refusal(status: int, message: str, k: int, dialect: str) -> str:
    """The error text for a refused request; a top-k above the server's cap names the flag that raises it."""
    low = message.lower()
    if "logprobs" in low and "max" in low:
        flag = "--max-logprobs" if dialect == "vllm" else "the server's log-prob limit"
        return (f"the server refuses top_k={k} log-probs (HTTP {status}: {message}); restart it with {flag} >= {k} "
                f"(e.g. `vllm serve MODEL --max-logprobs {k}`, or `nemo-kd-serve-teacher max_logprobs={k}`) or lower "
                "top_k")
    return f"HTTP {status}: {message}"


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


# ----------------------------------------------------------------------------- the async client


class _Retryable(Exception):
    def __init__(self, what: str, retry_after: Optional[float] = None):
        super().__init__(what)
        self.what, self.retry_after = what, retry_after


class TeacherClient:
    """Async client of one teacher server (one ``aiohttp`` session, ``concurrency`` requests in flight).

    ``await open()`` probes the dialect and the model; ``await score(ids, first, k, where)``
    scores one sample; ``await close()``.
    """

    def __init__(self, cfg: ServedTeacherConfig):
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.shown = display_url(self.base)
        self._key = cfg.api_key()
        self.dialect: Optional[str] = None if cfg.dialect == "auto" else cfg.dialect
        self.model: Optional[str] = cfg.model
        self.info: Dict[str, Any] = {}
        self._session: Optional[aiohttp.ClientSession] = None
        self._sem: Optional[asyncio.Semaphore] = None
        self.retries = 0  # requests retried (all causes), for the summary and the tests

    def scrub(self, text: str) -> str:
        """``text`` without the API key (a server may echo a header back in its message)."""
        return text.replace(self._key, "***") if self._key else text

    async def open(self) -> None:
        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        timeout = aiohttp.ClientTimeout(total=self.cfg.request_timeout_s, sock_connect=self.cfg.connect_timeout_s)
        # limit: the pool holds as many connections as requests in flight (aiohttp's default caps at 100)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, raise_for_status=False,
                                              connector=aiohttp.TCPConnector(limit=self.cfg.concurrency))
        self._sem = asyncio.Semaphore(self.cfg.concurrency)
        await self._probe()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- one request with retries

    async def _request(self, method: str, path: str, where: str, body: Optional[dict] = None,
                       retry: bool = True) -> Tuple[int, bytes]:
        """``(status, text)`` of a 2xx or non-retryable answer; raises :class:`ServedTeacherError` after retries."""
        url = self.base + path
        attempt = 0
        while True:
            try:
                async with self._session.request(method, url, json=body) as resp:
                    text = await resp.read()  # bytes: the fast decoder reads them as they came
                    if resp.status in _RETRY_STATUS:
                        raise _Retryable(f"HTTP {resp.status}: {_server_message(text)}",
                                         _retry_after(resp.headers.get("Retry-After")))
                    return resp.status, text
            except (_Retryable, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                what = e.what if isinstance(e, _Retryable) else (
                    f"timed out after {self.cfg.request_timeout_s:g} s" if isinstance(e, asyncio.TimeoutError)
                    else f"{type(e).__name__}: {e}")
                if not retry or attempt >= self.cfg.max_retries:
                    raise ServedTeacherError(self.scrub(
                        f"{where}: {method} {self.shown}{path} failed after {attempt + 1} attempt(s): {what}")) from None
                delay = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * 2 ** attempt)
                delay = random.uniform(0.5 * delay, delay)  # jitter: clients that failed together retry apart
                retry_after = getattr(e, "retry_after", None)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, self.cfg.backoff_max_s))
                attempt += 1
                self.retries += 1
                log.info("%s: %s %s%s: %s; retry %d/%d in %.2f s", where, method, self.shown, path, self.scrub(what),
                         attempt, self.cfg.max_retries, delay)
                await asyncio.sleep(delay)

    async def _get_json(self, path: str) -> Optional[Any]:
        status, text = await self._request("GET", path, "probing the teacher server")
        if status in (401, 403):
            hint = "check teacher.api_key_env" if self._key else "the server wants a key: set teacher.api_key_env"
            raise ServedTeacherError(self.scrub(f"GET {self.shown}{path}: HTTP {status}: {_server_message(text)} "
                                                f"({hint})"))
        if status != 200:  # 404: not this dialect's endpoint
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None

    async def _probe(self) -> None:
        """Dialect (``auto``), model id and the fingerprint the server reports."""
        sglang = await self._get_json("/get_model_info") if self.dialect in (None, "sglang") else None
        if self.dialect is None:
            self.dialect = "sglang" if isinstance(sglang, dict) and "model_path" in sglang else "vllm"
        if self.dialect == "sglang":
            if not isinstance(sglang, dict):
                raise ServedTeacherError(f"{self.shown}/get_model_info: no SGLang model info (is it an SGLang "
                                         "server? set teacher.dialect=vllm for vLLM or nemo-kd-serve-teacher)")
            served = sglang.get("model_path")
            if self.model is None:
                self.model = served
            self.info = {key: sglang[key] for key in ("model_path", "tokenizer_path", "weight_version")
                         if sglang.get(key) is not None}
            return
        models = await self._get_json("/v1/models")
        data = models.get("data") if isinstance(models, dict) else None
        if not isinstance(data, list) or not data:
            raise ServedTeacherError(f"{self.shown}/v1/models: no model list (is teacher.url an OpenAI-compatible "
                                     "server such as `vllm serve` or nemo-kd-serve-teacher?)")
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        if self.model is None:
            if len(ids) != 1:
                raise ServedTeacherError(f"{self.shown} serves {len(ids)} models {ids}: set teacher.model")
            self.model = ids[0]
        if self.model not in ids:
            raise ServedTeacherError(f"{self.shown} does not serve teacher.model={self.model!r} (it serves {ids})")
        entry = data[ids.index(self.model)]
        # Only what identifies the weights: not "created" (a timestamp that changes when the server restarts)
        self.info = {key: entry[key] for key in ("id", "root", "parent", "max_model_len", "nemo_kd")
                     if entry.get(key) is not None}

    # -- scoring

    def _body(self, ids: Sequence[int], k: int) -> Tuple[str, dict]:
        ids = [int(t) for t in ids]
        if self.dialect == "sglang":
            return "/generate", {"input_ids": ids, "return_logprob": True, "logprob_start_len": 0,
                                 "top_logprobs_num": k, "return_text_in_logprobs": False,
                                 "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        return "/v1/completions", {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                                   "echo": True, "prompt_logprobs": k, "return_token_ids": True}

    async def score(self, ids: Sequence[int], first: int, k: int, where: str) -> ScoredTokens:
        """Top-k log-probs and the scored token's log-prob at positions ``first .. len(ids)-1`` of ``ids``."""
        path, body = self._body(ids, k)
        async with self._sem:
            status, text = await self._request("POST", path, where, body)
        endpoint = f"POST {self.shown}{path}"
        if status != 200:
            raise ServedTeacherError(self.scrub(f"{where}: {endpoint}: {_refusal(status, _server_message(text), k, self.dialect)}"))
        decode = decode_sglang_generate if self.dialect == "sglang" else decode_vllm_completion
        try:
            return decode(text, ids, first, k, f"{where}: {endpoint}")
        except (ServedTeacherError, NonFiniteLogitsError) as e:
            raise type(e)(self.scrub(str(e))) from None

    @property
    def is_nemo_kd(self) -> bool:
        """The server is ``nemo-kd-serve-teacher`` (it draws with the in-process sampler's seeds)."""
        return "nemo_kd" in self.info

    async def sample(self, ids: Sequence[int], n: int, *, temperature: float, top_p: float = 1.0, top_k: int = 0,
                     max_tokens: int, seed: Optional[int], stop_token_ids: Sequence[int] = (), logprobs: int = 0,
                     sample_offset: Optional[int] = None, where: str, vocab_size: Optional[int] = None
                     ) -> List[SampledCompletion]:
        """``n`` completions of ``ids`` (module docstring, *Sampling*); ``sample_offset`` is sent to a nemo_kd server."""
        ids = [int(t) for t in ids]
        stops = [int(t) for t in stop_token_ids]
        if self.dialect == "sglang":
            params = {"n": n, "temperature": temperature, "top_p": top_p, "top_k": top_k if top_k > 0 else -1,
                      "max_new_tokens": max_tokens, "stop_token_ids": stops}
            if seed is not None:
                params["sampling_seed"] = int(seed)
            path, body = "/generate", {"input_ids": ids, "sampling_params": params, "return_logprob": True,
                                       "logprob_start_len": -1, "top_logprobs_num": logprobs,
                                       "return_text_in_logprobs": False}
        else:
            path, body = "/v1/completions", {"model": self.model, "prompt": ids, "n": n, "temperature": temperature,
                                             "top_p": top_p, "max_tokens": max_tokens, "seed": seed,
                                             "stop_token_ids": stops, "logprobs": logprobs, "echo": False,
                                             "return_token_ids": True, "return_tokens_as_token_ids": True}
            if top_k > 0:
                body["top_k"] = top_k
            if sample_offset is not None and self.is_nemo_kd:
                body["nemo_kd_sample_offset"] = int(sample_offset)
        async with self._sem:
            status, text = await self._request("POST", path, where, body)
        endpoint = f"POST {self.shown}{path}"
        if status != 200:
            raise ServedTeacherError(self.scrub(f"{where}: {endpoint}: "
                                                f"{_refusal(status, _server_message(text), logprobs, self.dialect)}"))
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ServedTeacherError(self.scrub(f"{where}: {endpoint}: malformed response (not JSON: {e}; body "
                                                f"starts {text[:200].decode('utf-8', 'replace')!r})")) from None
        parse = parse_sglang_sampled if self.dialect == "sglang" else parse_vllm_sampled
        try:
            return parse(data, ids, n, stops, f"{where}: {endpoint}", vocab_size)
        except (ServedTeacherError, NonFiniteLogitsError) as e:
            raise type(e)(self.scrub(str(e))) from None

    async def rescore(self, ids: Sequence[int], completion: Sequence[int], where: str) -> np.ndarray:
        """Teacher-forced log-probs (temperature 1) of ``completion`` after prompt ``ids``: one ``prompt_logprobs``
        scoring request (what a server that reports sampling-distribution log-probs is asked again)."""
        seq = [int(t) for t in ids] + [int(t) for t in completion]
        if not completion:
            return np.empty(0, np.float32)
        return (await self.score(seq, len(ids), 1, f"{where} (rescored)")).label_logprobs

    def fingerprint(self) -> Dict[str, Any]:
        """The ``served_teacher`` manifest record: what the server says it serves, no URL, no key."""
        return {"model": self.model, "dialect": self.dialect, "server_reports": self.info,
                "values": "log-probs reported by the server (normalised; the stored LSE 0 is their log-normaliser)",
                "raw_logits_available": False, "lse_available": False}


# ----------------------------------------------------------------------------- the synchronous teacher


class _Loop:
    """An asyncio loop on a daemon thread: the extraction loop stays synchronous."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="served-teacher", daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro):
        return self.submit(coro).result()

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)


class ServedTeacher(Teacher):
    """An extraction teacher whose statistics come from a server (``teacher.type=served``).

    It has no logits (:meth:`run` refuses); extraction asks :meth:`stream` for the samples of
    its block in order, and requests run ahead of the writer, ``concurrency`` in flight.
    ``hash`` fingerprints what the server reports about its weights (model id, path /
    revision, maximum length; not its URL nor start time), so a restarted server resumes
    the same store.
    """

    def __init__(self, cfg: ServedTeacherConfig, tokenizer_size: Optional[int] = None):
        self.cfg = cfg
        self._loop = _Loop()
        self.client = TeacherClient(cfg)
        try:
            self._loop.run(self.client.open())
        except BaseException:
            self.close()
            raise
        self.name = cfg.name or str(self.client.model)
        record = self.client.fingerprint()
        self.hash = "sha256:" + hashlib.sha256(_HASH_DOMAIN + json.dumps(
            {key: record[key] for key in ("model", "dialect", "server_reports")}, sort_keys=True).encode()).hexdigest()
        reported = (self.client.info.get("nemo_kd") or {}).get("vocab_size")
        self.vocab_size = int(cfg.vocab_size or reported or tokenizer_size or 0)
        if self.vocab_size < 1:
            raise ValueError("teacher.type=served: the teacher's vocabulary size is unknown (set teacher.vocab_size)")
        max_len = self.client.info.get("max_model_len")
        self.max_seq_length = int(max_len) if max_len else None
        self.manifest_record = record

    def run(self, tokens, callback, micro_batch_size=None, output_chunk_tokens=None) -> None:
        raise TypeError("a served teacher gives log-probs over HTTP, not logits: extraction reads it through "
                        "ServedTeacher.stream")

    def stream(self, items: Iterable[Tuple[int, Any]], k: int, sample_name: Callable[[int], str]) -> "ScoreStream":
        """Score ``(sample_index, TokenizedSample or None)`` in order, running ahead (see :class:`ScoreStream`)."""
        return ScoreStream(self, items, k, sample_name)

    def submit_score(self, ids: Sequence[int], first: int, k: int, where: str) -> concurrent.futures.Future:
        """:meth:`TeacherClient.score` on the client's loop; the future's result is a :class:`ScoredTokens`
        (training's rows, :mod:`nemo_kd.training.served_teacher`)."""
        return self._loop.submit(self.client.score(ids, first, k, where))

    def close(self) -> None:
        if self._loop is not None:
            if self.client._session is not None:
                try:  # bounded: from __del__ at interpreter exit the loop's (daemon) thread may never run again
                    self._loop.submit(self.client.close()).result(timeout=5)
                except Exception:  # noqa: BLE001 - closing a broken session must not hide the first error
                    pass
            self._loop.stop()
            self._loop = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass


class ScoreStream:
    """Scores the samples of a block in order, ``2 × concurrency`` requests submitted ahead.

    :meth:`next_batch` returns the batch's statistics as extraction's collector keeps them
    (``values [n, k]`` log-probs, ``ids``, ``lse`` zeros, ``label_logprobs``, over the batch's
    scored samples in order) and the seconds spent waiting. The first failure (in sample
    order) cancels what is in flight and is raised; nothing after a failed sample is written.
    """

    def __init__(self, teacher: ServedTeacher, items: Iterable[Tuple[int, Any]], k: int,
                 sample_name: Callable[[int], str]):
        self.teacher, self.k, self.sample_name = teacher, k, sample_name
        self._items = iter(items)
        self._ahead = 2 * teacher.cfg.concurrency
        self._pending: deque = deque()  # (sample_index, future or None for a dropped sample)
        self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self._ahead:
            try:
                i, s = next(self._items)
            except StopIteration:
                return
            fut = None
            if s is not None:
                fut = self.teacher._loop.submit(
                    self.teacher.client.score(s.input_ids, s.num_prompt_tokens, self.k, self.sample_name(i)))
            self._pending.append((i, fut))

    def cancel(self) -> None:
        for _, fut in self._pending:
            if fut is not None:
                fut.cancel()
        self._pending.clear()

    def next_batch(self, indices: Sequence[int], samples: Sequence[Any]):
        t0 = time.perf_counter()
        parts = []
        try:
            for i, s in zip(indices, samples):
                if not self._pending:
                    self._fill()
                j, fut = self._pending.popleft()
                if j != i:
                    raise RuntimeError(f"served teacher stream out of order: expected sample {i}, have {j}")
                if fut is not None:
                    got: ScoredTokens = fut.result()
                    n = got.values.shape[0]
                    parts.append((torch.from_numpy(got.values), torch.from_numpy(got.ids), torch.zeros(n),
                                  torch.from_numpy(got.label_logprobs)))
                self._fill()
        except BaseException:
            self.cancel()
            raise
        return parts, time.perf_counter() - t0
