"""Align student and teacher completion tokens into groups through their byte spans.

Both models see the same conversation, each rendered with its *own* template
(:class:`~nemo_kd.data.tokenization.ConversationTokenizer`), so their completions
share the assistant *content* but not the template text around it (ChatML's
``<|im_end|>\\n``, Llama-2's leading space and `` </s>``, Llama-3's ``<|eot_id|>``).

Algorithm (:func:`align_token_spans`, vectorised, ``O(n_s + n_t)``):

1. Each rendering's completion tokens get UTF-8 byte spans that tile the completion
   (:func:`~nemo_kd.align.spans.token_byte_spans`).
2. The shared ranges define *content coordinates*. Each rendering's contents are placed
   where its template put them (:func:`content_ranges`: a content found once is there;
   otherwise after the template's own text, rendered with placeholder contents, so an
   answer ``<`` is not taken from Qwen3's ``<think>``); the content characters both
   renderings hold (all of them, or those a rewriting template kept: Llama-2's ``strip()``,
   Qwen3's think-block formatting) are shared, extended over template text identical on
   both sides (an end-of-turn marker of the same template). ``f(p)`` = number of shared
   bytes before completion byte ``p``; the concatenated shared text is the same byte string
   on both sides. A token's content span is ``[f(start), f(end))``, so template bytes
   vanish and a token that straddles template and content keeps only its content bytes.
   Content spans still tile ``[0, C)`` (``f`` is monotone), with zero-width tokens for
   pure template.
3. Two-pointer walk, as a set intersection: a *group boundary* is a byte position
   where a positive-width student token and a positive-width teacher token both end.
   Group ``g`` is the byte range between consecutive boundaries; its tokens are the
   positive-width tokens ending in ``(b_{g-1}, b_g]`` on each side, contiguous token
   ranges. Every group has ≥ 1 token on each side; groups tile ``[0, B)`` where ``B``
   is the last boundary (``C`` unless a side was truncated: content past the last
   common boundary is unaligned).
4. Zero-width tokens (pure template, a SentencePiece dummy prefix) and tokens after
   ``B`` are *unaligned*: they carry no KD signal (the student's own CE still applies).

Template tokens. Text one template renders and the other does not has no teacher
counterpart and is not distilled: Qwen3's empty think block ``<think>\\n\\n</think>\\n\\n``
before every answer (4 tokens) when the other model's template has none. Such student
tokens are counted, as unaligned completion tokens (``num_student_tokens −
num_aligned_student_tokens``; in training ``xtok_completion_tokens − kd_tokens``), and get
only the SFT term (``sft_loss_weight``; none at 0): the teacher renders its own template,
so there is no teacher distribution for the student's. With the same template on both
sides the block is identical template text, shared, and distilled one-to-one. The end of
turn after the content is the exception: it is one more group (the probability of
stopping, :mod:`nemo_kd.align.loss`).

Group kinds: one-to-one (1 student, 1 teacher token), one-to-many, many-to-one,
many-to-many. :class:`AlignmentGroups` keeps them as one compact int32 array
(per group: student token range, teacher token range, content byte range), which
is what the v2 store saves per sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nemo_kd.align.spans import (
    AlignmentError,
    char_ranges_to_bytes,
    common_prefix_length,
    locate_content,
    token_byte_spans,
)
from nemo_kd.data.tokenization import ConversationTokenizer, TokenizationError, split_prompt_completion

# Alignment algorithm identifier stored with the groups (bump on any behaviour change).
ALIGNMENT_ALGORITHM = "byte-span-groups"
ALIGNMENT_VERSION = 2
# What each version changed. The group format is the same in every version, so groups an older
# version computed stay readable (training says what they lack, alignment_version_notice); a
# version newer than this reader is refused.
ALIGNMENT_VERSION_CHANGES = {
    2: "added tokens' bytes are what they decode to (Gemma-3's whitespace runs), a normalising tokenizer's "
       "spans are in the original text (NFC on NFD text), a content is placed where the template put it "
       "(a one-symbol answer that also occurs in the template), a rewritten content shares what both "
       "renderings keep, and an empty think block is not distilled",
}


def alignment_version_notice(version: int, where: str) -> Optional[str]:
    """``None`` for groups of this version; for an older one, what they lack (a warning to log:
    they are what that version computed, not corrupt); a newer or unknown one is refused
    (:class:`ValueError` naming ``where``)."""
    version = int(version)
    if version == ALIGNMENT_VERSION:
        return None
    if not 1 <= version < ALIGNMENT_VERSION:
        raise ValueError(f"{where}: alignment version {version} is not supported (this reader: 1 to "
                         f"{ALIGNMENT_VERSION})")
    changes = "; ".join(f"v{v}: {ALIGNMENT_VERSION_CHANGES[v]}" for v in range(version + 1, ALIGNMENT_VERSION + 1))
    return (f"{where}: cross-tokenizer alignment version {version} (this version is {ALIGNMENT_VERSION}): its groups "
            f"lack {changes}. Re-extract the store to train on the current alignment.")

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
        alignment_version_notice(version, "packed alignment")  # an older version reads as it was computed
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


# Placeholder contents for rendering a template's own text (template_pieces): private-use characters,
# which no chat template strips, escapes or looks for (Qwen3 splits contents on "</think>").
_PLACEHOLDER = "\ue000{}\ue001"
_PLACEHOLDER_RE = re.compile("\ue000([0-9]+)\ue001")

# A content a template rewrote is matched to its rendering by a shortest edit script of at most
# this many edits (strip()/trim and think-block re-formatting take a handful); past it only their
# common prefix and suffix are shared (_content_blocks), which bounds the cost on unrelated text.
MAX_REWRITE_EDITS = 256


def template_pieces(tokenizer, messages, sample) -> Optional[List[str]]:
    """The template's own text around the completion's contents, ``[P_0, …, P_m]``
    (:func:`~nemo_kd.align.spans.locate_content`), from rendering ``messages`` with placeholder
    contents the way ``sample`` was rendered: with the chat template or in the plain format,
    whichever gives the sample's prompt. ``None`` when neither does."""
    prompt_msgs, completion_msgs = split_prompt_completion(messages)
    msgs, k = list(prompt_msgs), 0
    for m in completion_msgs:
        if m.get("content"):  # the contents completion_contents() lists
            m = dict(m, content=_PLACEHOLDER.format(k))
            k += 1
        msgs.append(m)
    prompt_text = sample.text[:sample.completion_char_start]
    for prompt_format in ("chat", "plain"):
        try:
            prompt, completion = ConversationTokenizer(tokenizer, prompt_format).render(msgs)
        except TokenizationError:  # no chat template, or one that cannot render this conversation
            continue
        parts = _PLACEHOLDER_RE.split(completion)
        if prompt == prompt_text and parts[1::2] == [str(i) for i in range(k)]:
            return parts[0::2]
    return None


def _unambiguous(text: str, contents: Sequence[str]) -> bool:
    """Each content occurs verbatim, after the previous one, exactly once."""
    at = 0
    for c in contents:
        k = text.find(c, at)
        if k < 0 or text.find(c, k + 1) >= 0:
            return False
        at = k + len(c)
    return True


def content_ranges(text: str, contents: Sequence[str], tokenizer, messages, sample) -> List[Tuple[int, int]]:
    """Where the contents are in one completion. A content found once, verbatim, can only be
    there; otherwise (a content also in the template text, a content the template rewrote) the
    template's own text is rendered (:func:`template_pieces`) and the content placed after it:
    searching from the start would find ``<`` inside Qwen3's ``<think>``, and searching back from
    the end would find it inside ``<|im_end|>``; only the template knows where its text ends."""
    if messages is None or _unambiguous(text, contents):
        return locate_content(text, contents)
    return locate_content(text, contents, template_pieces(tokenizer, messages, sample))


def _matching_blocks(a: str, b: str, max_edits: int) -> Optional[List[Tuple[int, int, int]]]:
    """``(i, j, n)`` runs with ``a[i:i+n] == b[j:j+n]``, in order, of a shortest edit script
    (Myers' O((|a|+|b|)·D) greedy diff; the matched characters are a longest common
    subsequence). ``None`` when ``a`` and ``b`` differ by more than ``max_edits`` edits."""
    n, m = len(a), len(b)
    v: Dict[int, int] = {1: 0}
    trace = []
    for d in range(max_edits + 1):
        trace.append(dict(v))
        for k in range(-d, d + 1, 2):
            x = v[k + 1] if k == -d or (k != d and v[k - 1] < v[k + 1]) else v[k - 1] + 1
            x += common_prefix_length(a, x, b, x - k)
            v[k] = x
            if x >= n and x - k >= m:
                return _backtrack(trace, n, m)
    return None


def _backtrack(trace, n: int, m: int) -> List[Tuple[int, int, int]]:
    """The diagonal runs of the path :func:`_matching_blocks` found, walked back from ``(n, m)``
    (``trace[d]``: the furthest-reaching x per diagonal before round ``d``)."""
    blocks = []
    x, y = n, m
    for d in range(len(trace) - 1, -1, -1):
        v, k = trace[d], x - y
        if d == 0:
            mid_x = 0
        else:
            down = k == -d or (k != d and v[k - 1] < v[k + 1])
            prev_k = k + 1 if down else k - 1
            mid_x = v[prev_k] if down else v[prev_k] + 1
        if x > mid_x:  # the diagonal run (snake) that ends at (x, y)
            blocks.append((mid_x, mid_x - k, x - mid_x))
        if d:
            x = v[prev_k]
            y = x - prev_k
    return blocks[::-1]


def content_offsets(content: str, region: str) -> List[int]:
    """For each offset ``0..len(region)`` of ``region`` (where a rendering put ``content``,
    :func:`content_ranges`), the offset in ``content`` of the same character: through the runs
    both hold (:func:`_content_blocks`); text the template inserted maps to where the content
    resumes after it, text it removed is skipped. Non-decreasing, so a token's span in the
    rendering maps to a span of the original content (empty for template-only text)."""
    out: List[Optional[int]] = [None] * (len(region) + 1)
    for i, j, n in _content_blocks(content, region):
        for t in range(n + 1):
            out[j + t] = i + t
    nxt = len(content)
    for p in range(len(region), -1, -1):  # an unmatched offset takes the next matched one
        if out[p] is None:
            out[p] = nxt
        else:
            nxt = out[p]
    return out  # type: ignore[return-value]


def _content_blocks(content: str, region: str) -> List[Tuple[int, int, int]]:
    """``(content offset, region offset, length)`` runs of ``content`` that ``region`` (where a
    rendering put it) holds verbatim: all of it, a stripped part, or, for a re-formatted content,
    the matching runs of a shortest edit script (its common prefix and suffix past
    :data:`MAX_REWRITE_EDITS` edits)."""
    if region == content:
        return [(0, 0, len(content))]
    if region and region == content.strip():  # the template trimmed it (Llama-2, Gemma)
        return [(content.find(region), 0, len(region))]
    blocks = _matching_blocks(content, region, MAX_REWRITE_EDITS)
    if blocks is None:
        p = common_prefix_length(content, 0, region, 0)
        q = common_prefix_length(content[::-1], 0, region[::-1], 0) if p < min(len(content), len(region)) else 0
        q = min(q, len(content) - p, len(region) - p)
        blocks = [(0, 0, p)] + [(len(content) - q, len(region) - q, q)]
    return [blk for blk in blocks if blk[2] > 0]


def _shared_char_ranges(s_text: str, t_text: str, contents: Sequence[str], s_rng, t_rng):
    """Character ranges of the text both completions share: the content characters both renderings
    hold (``s_rng`` / ``t_rng``: where each put each content, :func:`content_ranges`), extended over
    template text that is identical on both sides (before, between, after them)."""
    pairs = []  # [s_start, s_end, t_start, t_end] of identical text, in order
    for c, (sa, sb), (ta, tb) in zip(contents, s_rng, t_rng):
        s_blocks, t_blocks = _content_blocks(c, s_text[sa:sb]), _content_blocks(c, t_text[ta:tb])
        i = j = 0
        while i < len(s_blocks) and j < len(t_blocks):  # content characters present on both sides
            (cs, xs, ns), (ct, xt, nt) = s_blocks[i], t_blocks[j]
            lo, hi = max(cs, ct), min(cs + ns, ct + nt)
            if lo < hi:
                pairs.append([sa + xs + lo - cs, sa + xs + hi - cs, ta + xt + lo - ct, ta + xt + hi - ct])
            if cs + ns <= ct + nt:
                i += 1
            else:
                j += 1
    if not pairs:
        return [], []
    # Identical template pieces (same template family, or the very same template) are shared text too.
    out = [pairs[0]]
    if s_text[:pairs[0][0]] == t_text[:pairs[0][2]]:
        out[0][0], out[0][2] = 0, 0
    for p in pairs[1:]:
        if s_text[out[-1][1]:p[0]] == t_text[out[-1][3]:p[2]]:
            out[-1][1], out[-1][3] = p[1], p[3]
        else:
            out.append(p)
    if s_text[out[-1][1]:] == t_text[out[-1][3]:]:
        out[-1][1], out[-1][3] = len(s_text), len(t_text)
    return [(p[0], p[1]) for p in out], [(p[2], p[3]) for p in out]


def align_samples(student_sample, teacher_sample, student_tokenizer, teacher_tokenizer,
                  contents: Sequence[str], messages=None) -> AlignmentGroups:
    """Align two renderings (:class:`~nemo_kd.data.tokenization.TokenizedSample`) of one conversation.

    ``contents`` are the completion's assistant message contents, in order; ``messages`` the
    conversation, needed to place a content that also occurs in template text or that a template
    rewrote (:func:`content_ranges`; without it the first occurrence is taken). The shared text is
    the content characters both renderings hold plus any template text that is identical in both
    completions at the same place (so equal templates align their end-of-turn tokens too, and
    equal tokenizers + templates give all one-to-one groups). Where a template rewrites a content
    (Llama-2's ``strip()``, Gemma's ``trim``, Qwen3's think-block formatting) only the characters
    it kept are shared; the whitespace and markers the renderings do not share are unaligned.
    """
    s_text, s_spans = completion_byte_spans(student_sample, student_tokenizer)
    t_text, t_spans = completion_byte_spans(teacher_sample, teacher_tokenizer)
    s_loc = content_ranges(s_text, contents, student_tokenizer, messages, student_sample)
    t_loc = content_ranges(t_text, contents, teacher_tokenizer, messages, teacher_sample)
    s_chr, t_chr = _shared_char_ranges(s_text, t_text, contents, s_loc, t_loc)
    s_rng, t_rng = char_ranges_to_bytes(s_text, s_chr), char_ranges_to_bytes(t_text, t_chr)
    content_bytes = sum(b - a for a, b in s_rng)
    return align_token_spans(content_coordinates(s_spans, s_rng), content_coordinates(t_spans, t_rng),
                             content_bytes)


def completion_contents(messages) -> list:
    """The non-empty assistant contents of a conversation's completion, in order (what both renderings share)."""
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
                             completion_contents(messages), messages)
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
