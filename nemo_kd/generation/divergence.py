"""Divergence-aware sampling (DASD, arXiv 2601.09088): pick, per question, the teacher
response whose sentences the teacher is much surer of than the student.

For a teacher response split into sentences s_1..s_m, a model's probability of a
sentence is the geometric mean of its tokens' probabilities::

    p(s) = (prod_{t in s} p(t)) ** (1/|s|) = exp(mean_{t in s} log p(t))

p_T uses the teacher's own log-probs from sampling, p_S the student's log-probs of
the same text from a teacher-forced forward pass. With Δ = p_T(s) − p_S(s)::

    teacher sentence   Δ >  β        (the student has yet to learn it: most informative)
    student sentence  −Δ >  β        (the student is over-confident relative to the teacher)
    common             |Δ| <= β

β = 0.1 (the value of the companion paper arXiv 2512.20908). Per question the
candidate with the most teacher sentences (absolute count, not a rate) is kept.

Both log-probs must be on the same footing: the log-probs of the unmodified
(temperature 1) distributions, or both at the sampling temperature.

Teacher and student may use different tokenizers. Each side gives its own token
character spans over the *same* response text; tokens are mapped to sentences by
character position (:func:`sentence_logprob_means`), so the comparison is per
sentence and never needs a token alignment.

Everything here is pure Python/torch; a sampler supplies the spans and log-probs.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "DEFAULT_BETA",
    "DivergenceScore",
    "SentenceDivergence",
    "SentenceLabel",
    "SentenceLogProbs",
    "assign_tokens",
    "classify_sentences",
    "select_candidates",
    "sentence_divergence",
    "sentence_logprob_means",
    "split_sentences",
]

DEFAULT_BETA = 0.1

Spans = Union[Sequence[Tuple[int, int]], torch.Tensor]

# ----------------------------------------------------------------------------- sentences

# A sentence ends after (a) a run of ASCII terminators, optionally followed by
# closing quotes/brackets/markdown emphasis, when whitespace or the end of the text
# follows ("3.14", "a.b" and "x?y" do not end one); (b) a run of full-width
# terminators, whether or not whitespace follows, because Chinese/Japanese put no
# space between sentences and never use 。！？ inside numbers; (c) every newline.
_CLOSERS = "\"'”’)\\]}*»」』"
_BOUNDARY = re.compile(rf"[.!?]+[{_CLOSERS}]*(?=\s|\Z)|[。！？]+[{_CLOSERS}]*|\n")

# Words whose trailing period is not a sentence end. Deliberately short: only
# abbreviations that are common in technical/maths prose and almost never end a
# sentence ("etc." and "No." often do, so they are not here).
_ABBREVIATIONS = frozenset({"e.g", "i.e", "cf", "vs", "mr", "mrs", "ms", "dr", "prof", "fig", "eq", "eqs", "approx"})
_OPENERS = "([{\"'“‘"
_MAX_WORD = 16  # longer words are neither abbreviations nor list numbers


def _is_false_boundary(text: str, m: re.Match) -> bool:
    """A single '.' after an abbreviation, or after a list number at a line start ("2. Then ...")."""
    if m.group(0)[:1] != "." or m.group(0)[:2] == "..":
        return False
    start = m.start()
    k = start
    while k > 0 and start - k <= _MAX_WORD and not text[k - 1].isspace() and text[k - 1] not in _OPENERS:
        k -= 1
    word = text[k:start]
    if word.lower() in _ABBREVIATIONS:
        return True
    if word.isdigit():
        line_start = text.rfind("\n", 0, start) + 1
        return text[line_start : start - len(word)].strip() == ""
    return False


def split_sentences(text: str) -> List[Tuple[int, int]]:
    """Sentence spans ``[start, end)`` of ``text``, in order.

    Rule: the text is cut after every sentence boundary (see ``_BOUNDARY``: ASCII
    ``.!?`` runs followed by whitespace or the end, full-width ``。！？`` runs
    anywhere, and every newline), except a single ``.`` after a known abbreviation
    (``e.g.``, ``i.e.``, ``Fig.``, ...) or after a list number at the start of a
    line (``"1. "``). Each piece is trimmed of surrounding whitespace and dropped
    if nothing is left, so:

    * every span starts and ends on a non-whitespace character;
    * every non-whitespace character of ``text`` is in exactly one span (the spans
      cover the text up to the whitespace between sentences).
    """
    cuts = [0]
    for m in _BOUNDARY.finditer(text):
        if not _is_false_boundary(text, m):
            cuts.append(m.end())
    cuts.append(len(text))
    spans = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = text[a:b]
        lead = len(piece) - len(piece.lstrip())
        trail = len(piece) - len(piece.rstrip())
        if lead < len(piece):  # not whitespace-only
            spans.append((a + lead, b - trail))
    return spans


# ----------------------------------------------------------------------------- token -> sentence


class SentenceLogProbs(NamedTuple):
    mean: torch.Tensor  # [num_sentences] float64: mean token log-prob; NaN where count == 0
    count: torch.Tensor  # [num_sentences] int64: tokens assigned to each sentence


def _spans_array(spans: Spans, what: str) -> np.ndarray:
    # numpy, not torch: torch's CPU searchsorted is ~10x slower at these sizes.
    a = spans.detach().cpu().numpy() if isinstance(spans, torch.Tensor) else np.asarray(spans)
    a = a.astype(np.int64, copy=False)
    if a.size == 0:
        return a.reshape(0, 2)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{what} must be [N, 2] (start, end) pairs, got shape {a.shape}")
    bad = np.flatnonzero(a[:, 1] < a[:, 0])
    if bad.size:
        raise ValueError(f"{what}[{bad[0]}] = {tuple(a[bad[0]].tolist())} has end < start")
    return a


def assign_tokens(token_char_spans: Spans, sentences: Spans) -> torch.Tensor:
    """Sentence index of every token (int64), -1 for tokens in no sentence.

    A token ``[ts, te)`` belongs to the *first* sentence its characters overlap. With
    :func:`split_sentences`'s whitespace-trimmed spans, that is exactly the sentence
    holding the token's first non-whitespace character ("\\n\\nThe" goes to the
    sentence of "The"); a token spanning a sentence boundary (".\\n\\nThe", "。我")
    goes to the sentence where it starts. Tokens overlapping no sentence are left
    out (-1): whitespace-only tokens between sentences (tokenizers differ in whether
    whitespace is its own token, so leaving it out on both sides keeps the two
    sides comparable), zero-width tokens (special tokens with empty offsets) and
    tokens outside the text (e.g. prompt tokens, spans shifted below 0).
    Sentences must be non-empty, sorted and non-overlapping.
    """
    tok = _spans_array(token_char_spans, "token_char_spans")
    sen = _spans_array(sentences, "sentences")
    if np.any(sen[:, 1] <= sen[:, 0]):
        raise ValueError("sentences must be non-empty spans (end > start)")
    if np.any(sen[1:, 0] < sen[:-1, 1]):
        raise ValueError("sentences must be sorted and non-overlapping")
    out = np.full(tok.shape[0], -1, dtype=np.int64)
    if sen.shape[0] and tok.shape[0]:
        ts, te = tok[:, 0], tok[:, 1]
        # The first sentence ending after ts is the only candidate for the first
        # overlap: every later one starts even later.
        idx = np.searchsorted(sen[:, 1], ts, side="right")
        idx_c = np.minimum(idx, sen.shape[0] - 1)
        overlaps = (idx < sen.shape[0]) & (sen[idx_c, 0] < te) & (ts < te)
        out[overlaps] = idx_c[overlaps]
    return torch.from_numpy(out)


def sentence_logprob_means(
    token_char_spans: Spans,
    token_logprobs: Union[Sequence[float], torch.Tensor],
    sentences: Spans,
) -> SentenceLogProbs:
    """Mean token log-prob per sentence (``log`` of the geometric-mean probability).

    ``mean[j] = (1/|s_j|) · sum_{t assigned to s_j} logprob[t]`` with tokens assigned
    by :func:`assign_tokens`; computed in float64 (thousands of log-probs are summed).
    A sentence that gets no token (e.g. a one-character sentence swallowed by a
    token that started in the previous one) has ``mean = NaN`` and ``count = 0``:
    there is no evidence for it, and :func:`classify_sentences` labels it UNSCORED.
    """
    lp = torch.as_tensor(token_logprobs, dtype=torch.float64).reshape(-1)
    assignment = assign_tokens(token_char_spans, sentences)
    if lp.shape[0] != assignment.shape[0]:
        raise ValueError(f"{assignment.shape[0]} token spans but {lp.shape[0]} token log-probs")
    if bool(torch.isnan(lp).any()):
        raise ValueError(f"token_logprobs contains NaN (token {int(torch.isnan(lp).nonzero()[0])})")
    num_sentences = len(sentences)
    keep = assignment >= 0
    idx = assignment[keep]
    sums = torch.zeros(num_sentences, dtype=torch.float64).index_add_(0, idx, lp[keep])
    count = torch.zeros(num_sentences, dtype=torch.long).index_add_(0, idx, torch.ones_like(idx))
    mean = torch.where(count > 0, sums / count.clamp(min=1), torch.full_like(sums, float("nan")))
    return SentenceLogProbs(mean, count)


# ----------------------------------------------------------------------------- classification


class SentenceLabel(enum.IntEnum):
    STUDENT = -1
    COMMON = 0
    TEACHER = 1
    UNSCORED = 2  # no token on at least one side: no evidence either way


def classify_sentences(
    p_teacher: Union[Sequence[float], torch.Tensor],
    p_student: Union[Sequence[float], torch.Tensor],
    beta: float = DEFAULT_BETA,
) -> torch.Tensor:
    """Per-sentence :class:`SentenceLabel` values (int8 tensor) from sentence probabilities.

    Δ = p_T − p_S; TEACHER if Δ > β, STUDENT if −Δ > β (both strict), else COMMON;
    UNSCORED where either probability is NaN (a sentence without tokens on that side).
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    pt = torch.as_tensor(p_teacher, dtype=torch.float64).reshape(-1)
    ps = torch.as_tensor(p_student, dtype=torch.float64).reshape(-1)
    if pt.shape != ps.shape:
        raise ValueError(f"p_teacher has {pt.numel()} sentences, p_student {ps.numel()}")
    delta = pt - ps
    labels = torch.full(pt.shape, int(SentenceLabel.COMMON), dtype=torch.int8)
    labels[delta > beta] = int(SentenceLabel.TEACHER)
    labels[-delta > beta] = int(SentenceLabel.STUDENT)
    labels[torch.isnan(delta)] = int(SentenceLabel.UNSCORED)  # NaN compares False above
    return labels


@dataclass(frozen=True)
class DivergenceScore:
    """Sentence counts of one candidate response."""

    num_teacher: int
    num_student: int
    num_common: int
    num_unscored: int = 0

    @property
    def num_sentences(self) -> int:
        return self.num_teacher + self.num_student + self.num_common + self.num_unscored

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> "DivergenceScore":
        def n(label):
            return int((labels == int(label)).sum())

        return cls(n(SentenceLabel.TEACHER), n(SentenceLabel.STUDENT), n(SentenceLabel.COMMON), n(SentenceLabel.UNSCORED))

    def to_dict(self) -> Dict[str, int]:
        return {
            "num_teacher": self.num_teacher,
            "num_student": self.num_student,
            "num_common": self.num_common,
            "num_unscored": self.num_unscored,
        }


@dataclass(frozen=True)
class SentenceDivergence:
    """Per-sentence details of one response (for inspection); ``.score`` summarises them."""

    sentences: List[Tuple[int, int]]
    p_teacher: torch.Tensor  # [S] float64, NaN where the teacher side has no token
    p_student: torch.Tensor  # [S] float64
    teacher_token_counts: torch.Tensor  # [S] int64
    student_token_counts: torch.Tensor  # [S] int64
    labels: torch.Tensor  # [S] int8 SentenceLabel values

    @property
    def score(self) -> DivergenceScore:
        return DivergenceScore.from_labels(self.labels)


def sentence_divergence(
    text: str,
    teacher_token_spans: Spans,
    teacher_logprobs: Union[Sequence[float], torch.Tensor],
    student_token_spans: Spans,
    student_logprobs: Union[Sequence[float], torch.Tensor],
    beta: float = DEFAULT_BETA,
    sentences: Optional[Sequence[Tuple[int, int]]] = None,
) -> SentenceDivergence:
    """Split ``text`` (or use ``sentences``), compute p_T, p_S per sentence, classify.

    Token spans index ``text`` itself: spans over a longer rendering (prompt +
    completion, as :class:`nemo_kd.data.tokenization.TokenizedSample` gives) must be
    shifted by ``-completion_char_start`` first; tokens then left outside the text
    are ignored.
    """
    sentences = split_sentences(text) if sentences is None else list(sentences)
    t = sentence_logprob_means(teacher_token_spans, teacher_logprobs, sentences)
    s = sentence_logprob_means(student_token_spans, student_logprobs, sentences)
    p_t, p_s = t.mean.exp(), s.mean.exp()  # exp(NaN) stays NaN -> UNSCORED
    return SentenceDivergence(sentences, p_t, p_s, t.count, s.count, classify_sentences(p_t, p_s, beta))


def select_candidates(scores_per_question: Sequence[Optional[DivergenceScore]]) -> Optional[int]:
    """Index of the candidate to keep among one question's candidates.

    Most teacher sentences (absolute count, as in DASD); ties go to fewer student
    sentences (less of what the student already over-predicts), then to the lowest
    index (deterministic). ``None`` entries are ineligible candidates (e.g. dropped
    by the response filters) and keep the indices aligned with the candidate list;
    returns ``None`` when no candidate is eligible.
    """
    eligible = [(i, s) for i, s in enumerate(scores_per_question) if s is not None]
    if not eligible:
        return None
    return min(eligible, key=lambda e: (-e[1].num_teacher, e[1].num_student, e[0]))[0]
