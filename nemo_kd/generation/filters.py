"""Response filters for distillation data (DASD "Response Filtering", arXiv 2601.09088).

Teacher samples (and mixed-policy continuations) are dropped before training when
they are over-long in the *student's* tokens, cut off by the generation length
limit, empty, contain tool calls, lack required parts (a thinking block, an
answer), or are degenerate repetition. Every rule lives in
:class:`ResponseFilterConfig` and can be switched off.

:func:`filter_response` checks one text and returns a :class:`FilterVerdict` whose
``reason`` is the *first* failing rule, in this fixed order (cheap and root-cause
rules first, the costly repetition scans last)::

    empty | too_short      no text after stripping whitespace | fewer than min_chars
    unfinished             stopped by the length limit (a truncation is reported
                           as this, not as too_long: it is the root cause)
    too_long               num_tokens (student tokens) > max_tokens
    forbidden:<pattern>    a forbid_patterns regex matches
    missing:<pattern>      a require_patterns regex does not match
    repeated_substring     a substring of min..max_repeat_chars characters occurs
                           more than max_consecutive_repeats times back to back
    repetitive_ngrams      duplicate word n-grams / all n-grams > max_repeated_ngram_fraction

The reasons are stable strings (``<pattern>`` is the regex exactly as configured),
so counts from several shards can be added up (:class:`FilterReport`).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional, Pattern, Sequence, TextIO, Tuple, TypeVar

import numpy as np

__all__ = [
    "DEFAULT_FORBID_PATTERNS",
    "REASONING_REQUIRE_PATTERNS",
    "FilterReport",
    "FilterVerdict",
    "ResponseFilterConfig",
    "filter_response",
    "filter_responses",
    "repeated_ngram_fraction",
    "has_consecutive_repeat",
]

# Tool-call markers of the common chat formats. Distillation data for a thinking
# model should not teach it to emit calls to tools it will not have at inference,
# and a response that stops at a tool call is not a complete answer. Each entry is
# the *structural* marker (not the bare word "tool"), so text that merely talks
# about tools survives:
#   <tool_call>                    Qwen2.5/Qwen3, Hermes
#   "tool_calls":                  OpenAI-style JSON function-calling (as a key)
#   <|python_tag|>                 Llama 3.x built-in tools
#   <|call|>                       gpt-oss harmony (the DASD teacher): ends a tool call
#   [TOOL_CALLS]                   Mistral
#   <｜tool▁calls▁begin｜>         DeepSeek-V3/R1 (full-width bars, U+2581)
DEFAULT_FORBID_PATTERNS: Tuple[str, ...] = (
    r"<tool_call>",
    r'"tool_calls"\s*:',
    r"<\|python_tag\|>",
    r"<\|call\|>",
    r"\[TOOL_CALLS\]",
    r"<｜tool▁calls?▁begin｜>",
)

# An example for ``require_patterns`` with ``<think>``-style models: a non-empty
# thinking block closed, then a non-empty answer after it. Not the default because
# the markers depend on the chat format (gpt-oss uses harmony channels instead).
REASONING_REQUIRE_PATTERNS: Tuple[str, ...] = (r"(?s)<think>\s*\S.*?</think>\s*\S",)


def _as_pattern_tuple(value: Any, option: str) -> Tuple[str, ...]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"ResponseFilterConfig.{option} must be a list of regex strings, got {type(value).__name__}")
    out = tuple(value)
    for i, p in enumerate(out):
        if not isinstance(p, str):
            raise TypeError(f"ResponseFilterConfig.{option}[{i}] must be a string, got {type(p).__name__}")
    return out


def _compile(patterns: Tuple[str, ...], option: str) -> Tuple[Pattern[str], ...]:
    compiled = []
    for i, p in enumerate(patterns):
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"ResponseFilterConfig.{option}[{i}]: invalid regular expression {p!r}: {e}") from None
    return tuple(compiled)


@dataclass(frozen=True)
class ResponseFilterConfig:
    """Which responses to drop. ``None`` switches a numeric rule off.

    Attributes:
        max_tokens: drop responses longer than this many tokens *of the student's
            tokenizer* (the length the student trains on; the teacher's count can
            differ by tens of percent). ``None``: no length limit. When set,
            :func:`filter_response` needs ``num_tokens``.
        require_patterns: regexes that must all match somewhere (``re.search``),
            e.g. a thinking block and an answer part, see
            :data:`REASONING_REQUIRE_PATTERNS`. Inline flags such as ``(?s)`` work.
            Default: none (the markers depend on the chat format).
        forbid_patterns: regexes none of which may match. Default: the tool-call
            markers of common chat formats, :data:`DEFAULT_FORBID_PATTERNS`.
        ngram_size: ``n`` of the word n-grams (words = whitespace-separated runs).
        max_repeated_ngram_fraction: drop when ``1 - distinct/total`` word n-grams
            exceeds this. 0.5 by default, because a reasoning response's answer
            part often restates its thinking nearly verbatim, which alone can
            reach ~0.5 for short thinking; a degenerate loop goes towards 1.
            Long-unit loops (a repeated paragraph) are caught here.
        max_consecutive_repeats: drop when one substring of ``min_repeat_chars``
            .. ``max_repeat_chars`` characters occurs more than this many times in
            a row, i.e. the regex ``(?s)(.{m,M}?)\\1{k}`` matches (k = this).
            Catches short loops ("Wait, let me check. Wait, let me check. ...")
            that the word n-gram rule misses in text without spaces (CJK).
        min_repeat_chars: the shortest repeated unit considered; 20 characters
            plus the repeat count keep rulers (``-----``), digit runs and markdown
            table rows (~220 characters of periodic text are needed by default).
        max_repeat_chars: the longest repeated unit considered. Bounds the cost
            (linear in it); longer units are the n-gram rule's job.
        require_finished: drop responses that stopped because they hit the
            generation length limit (``finished=False``): they have no answer.
        min_chars: drop responses with fewer non-surrounding-whitespace characters
            (whitespace-only responses are always ``empty``).
    """

    max_tokens: Optional[int] = None
    require_patterns: Sequence[str] = ()
    forbid_patterns: Sequence[str] = DEFAULT_FORBID_PATTERNS
    ngram_size: int = 10
    max_repeated_ngram_fraction: Optional[float] = 0.5
    max_consecutive_repeats: Optional[int] = 10
    min_repeat_chars: int = 20
    max_repeat_chars: int = 200
    require_finished: bool = True
    min_chars: int = 1
    # Compiled once here, not per response.
    _require_re: Tuple[Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _forbid_re: Tuple[Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        def check(ok: bool, option: str, rule: str):
            if not ok:
                raise ValueError(f"ResponseFilterConfig.{option} must be {rule}, got {getattr(self, option)!r}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        check(self.max_tokens is None or (is_int(self.max_tokens) and self.max_tokens >= 1), "max_tokens", "None or an integer >= 1")
        check(is_int(self.ngram_size) and self.ngram_size >= 1, "ngram_size", "an integer >= 1")
        f = self.max_repeated_ngram_fraction
        check(f is None or (isinstance(f, (int, float)) and 0.0 <= f <= 1.0), "max_repeated_ngram_fraction", "None or in [0, 1]")
        k = self.max_consecutive_repeats
        check(k is None or (is_int(k) and k >= 1), "max_consecutive_repeats", "None or an integer >= 1")
        check(is_int(self.min_repeat_chars) and self.min_repeat_chars >= 1, "min_repeat_chars", "an integer >= 1")
        check(is_int(self.max_repeat_chars) and self.max_repeat_chars >= self.min_repeat_chars, "max_repeat_chars", "an integer >= min_repeat_chars")
        check(is_int(self.min_chars) and self.min_chars >= 0, "min_chars", "an integer >= 0")
        req = _as_pattern_tuple(self.require_patterns, "require_patterns")
        forb = _as_pattern_tuple(self.forbid_patterns, "forbid_patterns")
        # frozen: normalise lists (e.g. OmegaConf ListConfig) to tuples and cache the regexes.
        object.__setattr__(self, "require_patterns", req)
        object.__setattr__(self, "forbid_patterns", forb)
        object.__setattr__(self, "_require_re", _compile(req, "require_patterns"))
        object.__setattr__(self, "_forbid_re", _compile(forb, "forbid_patterns"))


@dataclass(frozen=True)
class FilterVerdict:
    """``keep`` and, when dropped, the first failing rule (see the module docstring)."""

    keep: bool
    reason: Optional[str] = None


KEEP = FilterVerdict(True, None)


def repeated_ngram_fraction(text: str, n: int) -> float:
    """``1 - distinct / total`` over the word n-grams of ``text``: the share of
    n-gram occurrences that repeat an earlier one. 0 when there are no n-grams."""
    words = text.split()
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    distinct = len(set(zip(*(words[i:] for i in range(n)))))
    return 1.0 - distinct / total


def has_consecutive_repeat(text: str, min_chars: int, max_chars: int, max_repeats: int) -> bool:
    """Whether some substring of ``min_chars..max_chars`` characters occurs more than
    ``max_repeats`` times back to back, i.e. ``re.search(r"(?s)(.{m,M}?)\\1{k}", text)``.

    Same answer as that regex (the tests check it), computed as a lag test: a unit
    of length L repeated k+1 times is a stretch where ``text[i] == text[i + L]`` for
    k·L consecutive i. One vectorised comparison per L is ~6x faster than the
    back-tracking regex, which tries every L at every start position
    (~0.3 s for a 48K-character response on one core).
    """
    n = len(text)
    k = max_repeats
    if n < (k + 1) * min_chars:
        return False
    # UTF-32 gives one array element per Python character (code point).
    a = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    for L in range(min_chars, min(max_chars, n // (k + 1)) + 1):
        need = k * L
        eq = a[L:] == a[:-L]
        if int(np.count_nonzero(eq)) < need:  # cheap necessary condition
            continue
        run = np.concatenate(([0], np.cumsum(eq)))
        if bool(np.any(run[need:] - run[:-need] == need)):
            return True
    return False


def filter_response(
    text: str,
    *,
    num_tokens: Optional[int] = None,
    finished: bool = True,
    cfg: ResponseFilterConfig,
) -> FilterVerdict:
    """Check one response against ``cfg``; the verdict names the first failing rule.

    Args:
        text: the response (the completion only, not the prompt).
        num_tokens: its length in the student's tokens; required when
            ``cfg.max_tokens`` is set.
        finished: False when generation stopped at the length limit (vLLM
            ``finish_reason == "length"``) rather than at EOS/stop.
    """
    stripped = text.strip()
    if not stripped:
        return FilterVerdict(False, "empty")
    if len(stripped) < cfg.min_chars:
        return FilterVerdict(False, "too_short")
    if cfg.require_finished and not finished:
        return FilterVerdict(False, "unfinished")
    if cfg.max_tokens is not None:
        if num_tokens is None:
            # Silently skipping the rule would let over-long samples through.
            raise ValueError("ResponseFilterConfig.max_tokens is set: pass num_tokens (the length in student tokens)")
        if num_tokens > cfg.max_tokens:
            return FilterVerdict(False, "too_long")
    for src, rx in zip(cfg.forbid_patterns, cfg._forbid_re):
        if rx.search(text):
            return FilterVerdict(False, f"forbidden:{src}")
    for src, rx in zip(cfg.require_patterns, cfg._require_re):
        if not rx.search(text):
            return FilterVerdict(False, f"missing:{src}")
    if cfg.max_consecutive_repeats is not None and has_consecutive_repeat(
        text, cfg.min_repeat_chars, cfg.max_repeat_chars, cfg.max_consecutive_repeats
    ):
        return FilterVerdict(False, "repeated_substring")
    if (
        cfg.max_repeated_ngram_fraction is not None
        and repeated_ngram_fraction(text, cfg.ngram_size) > cfg.max_repeated_ngram_fraction
    ):
        return FilterVerdict(False, "repetitive_ngrams")
    return KEEP


@dataclass
class FilterReport:
    """Kept count and dropped counts per reason; add reports of several shards with ``+``."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def add(self, verdict: FilterVerdict) -> None:
        if verdict.keep:
            self.kept += 1
        else:
            self.dropped[verdict.reason] += 1

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def total(self) -> int:
        return self.kept + self.num_dropped

    def __add__(self, other: "FilterReport") -> "FilterReport":
        return FilterReport(self.kept + other.kept, self.dropped + other.dropped)

    def table(self) -> str:
        """A plain-text table: kept, dropped, then each reason (most frequent first)."""
        total = self.total
        rows = [("kept", self.kept), ("dropped", self.num_dropped)]
        # Sorted by count then name, so equal inputs print identically.
        rows += [(f"  {r}", c) for r, c in sorted(self.dropped.items(), key=lambda rc: (-rc[1], rc[0]))]
        rows.append(("total", total))
        width = max(len(name) for name, _ in rows)
        cwidth = max(5, len(str(total)))
        lines = [f"{'reason':<{width}}  {'count':>{cwidth}}  {'share':>6}"]
        for name, count in rows:
            share = f"{100.0 * count / total:.1f}%" if total else "-"
            lines.append(f"{name:<{width}}  {count:>{cwidth}}  {share:>6}")
        return "\n".join(lines)

    __str__ = table

    def print_table(self, file: Optional[TextIO] = None) -> None:
        print(self.table(), file=file or sys.stdout)


T = TypeVar("T")


def filter_responses(
    items: Iterable[T],
    cfg: ResponseFilterConfig,
    *,
    get_text: Optional[Callable[[T], str]] = None,
    get_num_tokens: Optional[Callable[[T], Optional[int]]] = None,
    get_finished: Optional[Callable[[T], bool]] = None,
) -> Tuple[List[T], FilterReport]:
    """Filter ``items`` (strings, or records read through the getters), keeping order.

    Example: ``filter_responses(rows, cfg, get_text=lambda r: r["response"],
    get_finished=lambda r: r["finish_reason"] != "length")``.
    Without ``get_num_tokens`` no length is known (an error if ``cfg.max_tokens``
    is set); without ``get_finished`` every item counts as finished.
    """
    kept: List[T] = []
    report = FilterReport()
    for i, item in enumerate(items):
        if get_text is not None:
            text = get_text(item)
        elif isinstance(item, str):
            text = item
        else:
            raise TypeError(f"item {i} is a {type(item).__name__}, not a string: pass get_text")
        verdict = filter_response(
            text,
            num_tokens=get_num_tokens(item) if get_num_tokens is not None else None,
            finished=get_finished(item) if get_finished is not None else True,
            cfg=cfg,
        )
        report.add(verdict)
        if verdict.keep:
            kept.append(item)
    return kept, report
