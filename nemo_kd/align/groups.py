"""Align student and teacher completion tokens into groups through their byte spans.

Both models see the same conversation, each rendered with its *own* template
(:class:`~nemo_kd.data.tokenization.ConversationTokenizer`), so their completions
share the assistant *content* but not the template text around it (ChatML's
``<|im_end|>\\n``, Llama-2's leading space and `` </s>``, Llama-3's ``<|eot_id|>``).

Algorithm (:func:`align_token_spans`, vectorised, ``O(n_s + n_t)``):

1. Each rendering's completion tokens get UTF-8 byte spans that tile the completion
   (:func:`~nemo_kd.align.spans.token_byte_spans`).
2. The shared ranges (the assistant messages located in each rendering, extended
   over template text identical on both sides, e.g. an end-of-turn marker of the
   same template) define *content coordinates*: ``f(p)`` = number of content bytes before completion byte
   ``p``; the concatenated content is the same byte string on both sides. A token's
   content span is ``[f(start), f(end))``, so template bytes vanish and a token that
   straddles template and content keeps only its content bytes. Content spans still
   tile ``[0, C)`` (``f`` is monotone), with zero-width tokens for pure template.
3. Two-pointer walk, as a set intersection: a *group boundary* is a byte position
   where a positive-width student token and a positive-width teacher token both end.
   Group ``g`` is the byte range between consecutive boundaries; its tokens are the
   positive-width tokens ending in ``(b_{g-1}, b_g]`` on each side, contiguous token
   ranges. Every group has ≥ 1 token on each side; groups tile ``[0, B)`` where ``B``
   is the last boundary (``C`` unless a side was truncated: content past the last
   common boundary is unaligned).
4. Zero-width tokens (pure template, a SentencePiece dummy prefix) and tokens after
   ``B`` are *unaligned*: they carry no KD signal (the student's own CE still applies).

Group kinds: one-to-one (1 student, 1 teacher token), one-to-many, many-to-one,
many-to-many. :class:`AlignmentGroups` keeps them as one compact int32 array
(per group: student token range, teacher token range, content byte range), which
is what the v2 store saves per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np

from nemo_kd.align.spans import AlignmentError, char_ranges_to_bytes, locate_content, token_byte_spans

# Alignment algorithm identifier stored with the groups (bump on any behaviour change).
ALIGNMENT_ALGORITHM = "byte-span-groups"
ALIGNMENT_VERSION = 1

# Columns of AlignmentGroups.array.
S_START, S_END, T_START, T_END, B_START, B_END = range(6)


@dataclass
class AlignmentGroups:
    """Student↔teacher completion-token groups of one sample.

    ``array`` is int32 ``[G, 6]``: per group ``(s_start, s_end, t_start, t_end,
    b_start, b_end)`` – half-open student and teacher *completion-token* index ranges
    (0 = the first completion token of that side) and the content-byte range they
    cover. Groups are in order, token ranges are disjoint and increasing, byte ranges
    tile ``[0, aligned_bytes)``. ``num_student_tokens`` / ``num_teacher_tokens`` are
    the completion token counts of the two sides (aligned or not); ``content_bytes``
    is the length of the shared content in bytes.
    """

    array: np.ndarray
    num_student_tokens: int
    num_teacher_tokens: int
    content_bytes: int

    def __post_init__(self):
        self.array = np.ascontiguousarray(np.asarray(self.array, dtype=np.int32).reshape(-1, 6))

    # ------------------------------------------------------------------ views
    @property
    def num_groups(self) -> int:
        return int(self.array.shape[0])

    @property
    def student_sizes(self) -> np.ndarray:
        return self.array[:, S_END] - self.array[:, S_START]

    @property
    def teacher_sizes(self) -> np.ndarray:
        return self.array[:, T_END] - self.array[:, T_START]

    @property
    def one_to_one(self) -> np.ndarray:
        """bool ``[G]``: groups of exactly one student and one teacher token."""
        return (self.student_sizes == 1) & (self.teacher_sizes == 1)

    @property
    def aligned_bytes(self) -> int:
        return int(self.array[-1, B_END]) if self.num_groups else 0

    @property
    def num_aligned_student_tokens(self) -> int:
        return int(self.student_sizes.sum())

    @property
    def num_aligned_teacher_tokens(self) -> int:
        return int(self.teacher_sizes.sum())

    @property
    def fraction_one_to_one(self) -> float:
        """Fraction of the student's completion tokens aligned one-to-one."""
        return float(self.one_to_one.sum()) / max(self.num_student_tokens, 1)

    @property
    def fraction_aligned(self) -> float:
        """Fraction of the student's completion tokens in some group."""
        return self.num_aligned_student_tokens / max(self.num_student_tokens, 1)

    def kinds(self) -> Dict[str, int]:
        """Group counts by kind (``one_to_one``, ``one_to_many``, ``many_to_one``, ``many_to_many``)."""
        s, t = self.student_sizes, self.teacher_sizes
        return {
            "one_to_one": int(((s == 1) & (t == 1)).sum()),
            "one_to_many": int(((s == 1) & (t > 1)).sum()),
            "many_to_one": int(((s > 1) & (t == 1)).sum()),
            "many_to_many": int(((s > 1) & (t > 1)).sum()),
        }

    def student_group_index(self) -> np.ndarray:
        """int64 ``[num_student_tokens]``: the group of each student completion token, −1 if unaligned."""
        return _token_group_index(self.array[:, S_START], self.array[:, S_END], self.num_student_tokens)

    def teacher_group_index(self) -> np.ndarray:
        """int64 ``[num_teacher_tokens]``: the group of each teacher completion token, −1 if unaligned."""
        return _token_group_index(self.array[:, T_START], self.array[:, T_END], self.num_teacher_tokens)

    def metrics(self) -> Dict[str, float]:
        out = {"fraction_one_to_one": self.fraction_one_to_one, "fraction_aligned": self.fraction_aligned,
               "num_groups": float(self.num_groups)}
        out.update({f"groups_{k}": float(v) for k, v in self.kinds().items()})
        return out

    # ------------------------------------------------------------------ storage
    def to_numpy(self) -> np.ndarray:
        """int32 ``[G + 1, 6]``: a header row ``(G, n_student, n_teacher, content_bytes, version, 0)``
        followed by :attr:`array` – one self-describing array per sample for the store."""
        head = np.array([[self.num_groups, self.num_student_tokens, self.num_teacher_tokens,
                          self.content_bytes, ALIGNMENT_VERSION, 0]], dtype=np.int32)
        return np.concatenate([head, self.array], axis=0)

    @classmethod
    def from_numpy(cls, packed: np.ndarray) -> "AlignmentGroups":
        packed = np.asarray(packed, dtype=np.int32).reshape(-1, 6)
        g, ns, nt, cb, version, _ = (int(x) for x in packed[0])
        if version != ALIGNMENT_VERSION:
            raise ValueError(f"alignment version {version} is not supported (this reader: {ALIGNMENT_VERSION})")
        if packed.shape[0] != g + 1:
            raise ValueError(f"packed alignment has {packed.shape[0] - 1} group rows, header says {g}")
        return cls(array=packed[1:].copy(), num_student_tokens=ns, num_teacher_tokens=nt, content_bytes=cb)

    def validate(self) -> None:
        """Raise ``AssertionError`` unless the groups are well formed (ranges ordered, bytes tiling)."""
        a = self.array.astype(np.int64)
        if not len(a):
            return
        assert (a[:, S_END] > a[:, S_START]).all() and (a[:, T_END] > a[:, T_START]).all()
        assert (a[1:, S_START] >= a[:-1, S_END]).all() and (a[1:, T_START] >= a[:-1, T_END]).all()
        assert a[0, B_START] == 0 and (a[1:, B_START] == a[:-1, B_END]).all() and (a[:, B_END] > a[:, B_START]).all()
        assert a[-1, S_END] <= self.num_student_tokens and a[-1, T_END] <= self.num_teacher_tokens
        assert a[-1, B_END] <= self.content_bytes


def _token_group_index(starts: np.ndarray, ends: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    sizes = (ends - starts).astype(np.int64)
    if sizes.sum():
        pos = np.repeat(starts.astype(np.int64), sizes) + (np.arange(int(sizes.sum())) - np.repeat(np.cumsum(sizes) - sizes, sizes))
        out[pos] = np.repeat(np.arange(len(starts)), sizes)
    return out


def content_coordinates(spans: np.ndarray, content_ranges: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Map completion byte spans ``[n, 2]`` to content coordinates (module docstring, step 2)."""
    if not len(content_ranges):
        return np.zeros_like(spans)
    r = np.asarray(content_ranges, dtype=np.int64).reshape(-1, 2)
    widths = r[:, 1] - r[:, 0]
    flat = spans.reshape(-1)
    if len(r) == 1:
        f = np.clip(flat - r[0, 0], 0, widths[0])
    else:  # f(p) = Σ_j clip(p − start_j, 0, width_j)
        f = np.clip(flat[:, None] - r[None, :, 0], 0, widths[None, :]).sum(axis=1)
    return f.reshape(spans.shape)


def align_token_spans(student_spans: np.ndarray, teacher_spans: np.ndarray, content_bytes: int) -> AlignmentGroups:
    """Groups from content-coordinate spans ``[n_s, 2]`` / ``[n_t, 2]`` (module docstring, step 3)."""
    s_end, t_end = student_spans[:, 1], teacher_spans[:, 1]
    s_pos = np.flatnonzero(student_spans[:, 1] > student_spans[:, 0])
    t_pos = np.flatnonzero(teacher_spans[:, 1] > teacher_spans[:, 0])
    es, et = s_end[s_pos], t_end[t_pos]  # strictly increasing (positive widths, tiling)
    bounds = np.intersect1d(es, et, assume_unique=True)
    g = len(bounds)
    arr = np.zeros((g, 6), dtype=np.int64)
    if g:
        sg = np.searchsorted(bounds, es, side="left")  # group of each positive student token (g: unaligned)
        tg = np.searchsorted(bounds, et, side="left")
        ks = np.arange(g)
        s_first = np.searchsorted(sg, ks, side="left")
        s_last = np.searchsorted(sg, ks, side="right") - 1
        t_first = np.searchsorted(tg, ks, side="left")
        t_last = np.searchsorted(tg, ks, side="right") - 1
        arr[:, S_START], arr[:, S_END] = s_pos[s_first], s_pos[s_last] + 1
        arr[:, T_START], arr[:, T_END] = t_pos[t_first], t_pos[t_last] + 1
        arr[:, B_END] = bounds
        arr[1:, B_START] = bounds[:-1]
    return AlignmentGroups(array=arr, num_student_tokens=len(student_spans),
                           num_teacher_tokens=len(teacher_spans), content_bytes=int(content_bytes))


def completion_byte_spans(sample, tokenizer) -> Tuple[str, np.ndarray]:
    """``(completion_text, spans)``: a :class:`TokenizedSample`'s completion text and the
    ``[n_completion, 2]`` UTF-8 byte spans of its completion tokens in it."""
    start = sample.completion_char_start
    text = sample.text[start:]
    ids = sample.input_ids[sample.num_prompt_tokens:]
    offs = [(a - start, b - start) for a, b in sample.token_char_spans[sample.num_prompt_tokens:]]
    return text, token_byte_spans(tokenizer, ids, text, offs)


def _shared_char_ranges(s_text: str, t_text: str, contents: Sequence[str]):
    """Character ranges of the text both completions share: the contents, extended over
    template text that is identical on both sides (before, between, after them)."""
    try:
        s_rng, t_rng = locate_content(s_text, contents), locate_content(t_text, contents)
    except AlignmentError:  # a template rewrote the content (Llama-2 strips it): align the stripped text
        stripped = [c.strip() for c in contents]
        s_rng, t_rng = locate_content(s_text, stripped), locate_content(t_text, stripped)
    if not s_rng:
        return [], []
    # Identical template pieces (same template family, or the very same template) are shared text too.
    s_cuts = [0] + [x for r in s_rng for x in r] + [len(s_text)]
    t_cuts = [0] + [x for r in t_rng for x in r] + [len(t_text)]
    s_out, t_out = [list(s_rng[0])], [list(t_rng[0])]
    if s_text[:s_cuts[1]] == t_text[:t_cuts[1]]:
        s_out[0][0], t_out[0][0] = 0, 0
    for j in range(1, len(s_rng)):
        if s_text[s_rng[j - 1][1]:s_rng[j][0]] == t_text[t_rng[j - 1][1]:t_rng[j][0]]:
            s_out[-1][1], t_out[-1][1] = s_rng[j][1], t_rng[j][1]
        else:
            s_out.append(list(s_rng[j]))
            t_out.append(list(t_rng[j]))
    if s_text[s_rng[-1][1]:] == t_text[t_rng[-1][1]:]:
        s_out[-1][1], t_out[-1][1] = len(s_text), len(t_text)
    return [tuple(r) for r in s_out], [tuple(r) for r in t_out]


def align_samples(student_sample, teacher_sample, student_tokenizer, teacher_tokenizer,
                  contents: Sequence[str]) -> AlignmentGroups:
    """Align two renderings (:class:`~nemo_kd.data.tokenization.TokenizedSample`) of one conversation.

    ``contents`` are the completion's assistant message contents, in order. The
    shared text is those contents plus any template text that is identical in both
    completions at the same place (so equal templates align their end-of-turn
    tokens too, and equal tokenizers + templates give all one-to-one groups). If a
    template rewrites the content (Llama-2's ``strip()``), the stripped contents are
    located on both sides instead, and whitespace the renderings do not share is
    unaligned.
    """
    s_text, s_spans = completion_byte_spans(student_sample, student_tokenizer)
    t_text, t_spans = completion_byte_spans(teacher_sample, teacher_tokenizer)
    s_chr, t_chr = _shared_char_ranges(s_text, t_text, contents)
    s_rng, t_rng = char_ranges_to_bytes(s_text, s_chr), char_ranges_to_bytes(t_text, t_chr)
    content_bytes = sum(b - a for a, b in s_rng)
    return align_token_spans(content_coordinates(s_spans, s_rng), content_coordinates(t_spans, t_rng),
                             content_bytes)


def completion_contents(messages) -> list:
    """The non-empty assistant contents of a conversation's completion, in order (what both renderings share)."""
    from nemo_kd.data.tokenization import split_prompt_completion

    return [m["content"] for m in split_prompt_completion(messages)[1] if m.get("content")]


def align_rendered(messages, student_sample, teacher_sample, student_tokenizer, teacher_tokenizer,
                   sample_name: str = "sample") -> AlignmentGroups:
    """:func:`align_samples` for two renderings of ``messages``, either of which may be ``None``
    (dropped as over-long): then an empty alignment with the other side's token count.
    Alignment failures are re-raised naming ``sample_name``."""
    n_s = 0 if student_sample is None else student_sample.num_completion_tokens
    n_t = 0 if teacher_sample is None else teacher_sample.num_completion_tokens
    if student_sample is None or teacher_sample is None:
        return AlignmentGroups(np.zeros((0, 6), dtype=np.int32), n_s, n_t, 0)
    try:
        return align_samples(student_sample, teacher_sample, student_tokenizer, teacher_tokenizer,
                             completion_contents(messages))
    except AlignmentError as e:
        raise AlignmentError(f"{sample_name}: {e}") from None


def align_conversation(messages, student_ct, teacher_ct, sample_name: str = "sample"):
    """Render + tokenise ``messages`` for both models and align them.

    ``student_ct`` / ``teacher_ct`` are :class:`~nemo_kd.data.tokenization.ConversationTokenizer`
    instances (each with its own tokenizer, template and ``max_seq_length``). Returns
    ``(student_sample, teacher_sample, groups)``, or ``None`` when either side dropped
    the sample as over-long.
    """
    s = student_ct(messages, sample_name)
    t = teacher_ct(messages, sample_name)
    if s is None or t is None:
        return None
    return s, t, align_rendered(messages, s, t, student_ct.tokenizer, teacher_ct.tokenizer, sample_name)
