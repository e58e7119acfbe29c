"""UTF-8 byte spans of tokens, for any Hugging Face fast tokenizer.

Cross-tokenizer alignment compares *bytes*, not characters or token strings: a
byte-level BPE (GPT-2 / Llama-3 / Qwen) can split one emoji into several tokens
that each hold part of its UTF-8 bytes, a SentencePiece model with byte fallback
(Llama-2 / Mistral / Gemma) emits ``<0xF0><0x9F><0x99><0x82>`` for it, and both
report the *same* character span for every piece. Bytes are the unit in which
every tokenisation of a text tiles it exactly.

Per token we compute its raw bytes once per vocabulary (:class:`TokenBytes`):

* byte-level BPE (a ``ByteLevel`` pre-tokenizer/decoder): each character of the
  token string is one byte through GPT-2's ``bytes_to_unicode`` table (``Ġ`` is the
  space byte, ``Ċ`` the newline, ...);
* SentencePiece style: ``▁`` is a space, ``<0xXX>`` is the single byte ``0xXX``,
  everything else is its UTF-8;
* added tokens: what they decode to in the rendered text – a special token
  (``<|im_end|>``, ``</s>``) the UTF-8 of its content, a non-special one its content
  with the markers the tokenizer round-trips put back (a ``▁`` is a space where the
  normaliser/pre-tokenizer writes spaces as ``▁`` and the decoder reads ``▁`` as a space:
  Gemma-3's added whitespace tokens ``▁▁`` … are runs of spaces, like byte-level ``ĠĠ`` …).

:func:`token_byte_spans` then gives each token of an encoded text its ``[start,
end)`` byte span:

1. *exact path*: when the tokens' bytes concatenate to the text's UTF-8 (the normal
   case for both families), the spans are their cumulative lengths, exact to the
   byte even inside a split character. A SentencePiece "dummy prefix" (the ``▁``
   prepended to the first word, a space that is not in the text) is recognised and
   given to no byte (the first token's span shrinks by one; a lone ``▁`` becomes
   zero-width).
2. *offset path* (a normaliser changed the text: NFC on decomposed input, NFKC,
   lower-casing, ...): spans are computed in the *original* text's bytes from the
   tokenizer's character offsets (which point into the original text), so a token made
   of normalised characters covers exactly those characters' original bytes (Qwen's
   NFC ``é`` covers the three bytes of ``e`` + U+0301). Only where the offsets are
   ambiguous – several tokens sharing a character (byte-fallback pieces, a byte-level
   token ending mid-character) – the tokens' own byte lengths split it; characters no
   token's offsets cover go to a deterministic neighbour (:func:`_spans_from_offsets`).

Either way the spans tile ``[0, end of last token)`` in order: ``start[i] =
end[i-1]``, ``end[i] >= start[i]`` (zero-width tokens are possible, e.g. a dummy
prefix), which is what :mod:`nemo_kd.align.groups` needs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class AlignmentError(ValueError):
    """A sample whose student and teacher renderings cannot be aligned."""


@lru_cache(maxsize=1)
def _byte_level_decoder() -> Dict[str, int]:
    """GPT-2's ``bytes_to_unicode`` inverted: printable stand-in character → byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _json_nodes(node) -> List[dict]:
    """Every component (a dict with a ``"type"``) in a (nested) tokenizers JSON component."""
    out: List[dict] = []
    if isinstance(node, dict):
        if "type" in node:
            out.append(node)
        for v in node.values():
            out.extend(_json_nodes(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_json_nodes(v))
    return out


def _backend_spec(tokenizer) -> Optional[dict]:
    """The ``tokenizer.json`` of a fast tokenizer as a dict (``None`` without a Rust backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())


def _style_of(spec: Optional[dict]) -> str:
    nodes = [] if spec is None else _json_nodes(spec.get("pre_tokenizer")) + _json_nodes(spec.get("decoder"))
    return "byte_level" if any(n["type"] == "ByteLevel" for n in nodes) else "sentencepiece"


def tokenizer_style(tokenizer) -> str:
    """``"byte_level"`` (GPT-2-style byte alphabet) or ``"sentencepiece"`` (``▁`` + ``<0xXX>``)."""
    return _style_of(_backend_spec(getattr(tokenizer, "tokenizer", tokenizer)))


def _marker_replacements(spec: Optional[dict]) -> List[Tuple[str, str]]:
    """``(marker, text)`` pairs the tokenizer round-trips: its input side turns ``text`` into
    ``marker`` (a normaliser ``Replace`` with a string pattern, a ``Metaspace`` pre-tokenizer:
    ``" "`` → ``"▁"``) and its decoder turns ``marker`` back into ``text`` (a decoder ``Replace``, a
    ``Metaspace`` decoder). Only such a pair says what a marker in an added token stands for."""
    if spec is None:
        return []
    encode, decode = set(), set()
    for node in _json_nodes(spec.get("normalizer")) + _json_nodes(spec.get("pre_tokenizer")):
        if node["type"] == "Replace" and "String" in (node.get("pattern") or {}):
            encode.add((str(node["content"]), str(node["pattern"]["String"])))
        elif node["type"] == "Metaspace":
            encode.add((str(node.get("replacement", "▁")), " "))
    for node in _json_nodes(spec.get("decoder")):
        if node["type"] == "Replace" and "String" in (node.get("pattern") or {}):
            decode.add((str(node["pattern"]["String"]), str(node["content"])))
        elif node["type"] == "Metaspace":
            decode.add((str(node.get("replacement", "▁")), " "))
    return sorted(encode & decode)


@dataclass
class TokenBytes:
    """Raw bytes of every token id of one tokenizer (built once, reused per sample).

    ``table[i]`` are the bytes token ``i`` stands for (``b""`` for ids without a
    token); ``lengths`` is ``len(table[i])`` as an int64 array; ``special[i]`` marks
    added special tokens (template tokens: ``<|im_end|>``, ``</s>``, ...);
    ``byte_fallback[i]`` marks SentencePiece ``<0xXX>`` byte tokens; ``normalizer`` is
    the tokenizer's normaliser (``normalize_str``), ``None`` without one.

    An added token stands for what it decodes to in the rendered text: a special token
    (``<|im_end|>``, ``<end_of_turn>``) for the UTF-8 of its content, a non-special one for
    its content with the tokenizer's round-tripped markers put back
    (:func:`_marker_replacements`): Gemma-3's whitespace tokens ``▁▁`` … (added tokens, ids
    138–167) are runs of spaces, as its model pieces and every byte-level ``ĠĠ…`` are.
    """

    table: List[bytes]
    lengths: np.ndarray
    special: np.ndarray
    byte_fallback: np.ndarray
    style: str
    normalizer: Optional[object] = None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenBytes":
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        spec = _backend_spec(tokenizer)
        style = _style_of(spec)
        markers = _marker_replacements(spec)
        vocab = tokenizer.get_vocab()
        size = max(max(vocab.values()) + 1, len(tokenizer))
        table = [b""] * size
        special = np.zeros(size, dtype=bool)
        byte_fb = np.zeros(size, dtype=bool)
        added = {}
        for tid, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
            added[int(tid)] = tok
        dec = _byte_level_decoder()
        for piece, tid in vocab.items():
            if tid in added:
                content = str(added[tid].content)
                special[tid] = bool(getattr(added[tid], "special", False))
                if not special[tid]:
                    for marker, text in markers:
                        content = content.replace(marker, text)
                table[tid] = content.encode("utf-8")
                continue
            if style == "byte_level":
                try:
                    table[tid] = bytes(dec[c] for c in piece)
                except KeyError:  # a token outside the byte alphabet: take it literally
                    table[tid] = piece.encode("utf-8")
            else:
                m = _BYTE_TOKEN.match(piece)
                if m is not None:
                    table[tid] = bytes([int(m.group(1), 16)])
                    byte_fb[tid] = True
                else:
                    table[tid] = piece.replace("▁", " ").encode("utf-8")
        lengths = np.fromiter((len(b) for b in table), dtype=np.int64, count=size)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return cls(table=table, lengths=lengths, special=special, byte_fallback=byte_fb, style=style,
                   normalizer=None if backend is None else backend.normalizer)


_TOKEN_BYTES_CACHE: Dict[int, Tuple[object, TokenBytes]] = {}


def get_token_bytes(tokenizer) -> TokenBytes:
    """:class:`TokenBytes` of ``tokenizer``, cached per tokenizer object."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    key = id(tokenizer)
    hit = _TOKEN_BYTES_CACHE.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    tb = TokenBytes.from_tokenizer(tokenizer)
    _TOKEN_BYTES_CACHE[key] = (tokenizer, tb)
    return tb


def _char_to_byte_index(text: str) -> np.ndarray:
    """``pos[c]`` = UTF-8 byte offset of character ``c`` (``len(text)+1`` entries)."""
    if text.isascii():
        return np.arange(len(text) + 1, dtype=np.int64)
    lens = np.fromiter((len(ch.encode("utf-8")) for ch in text), dtype=np.int64, count=len(text))
    out = np.zeros(len(text) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _merges(normalizer, left: str, char: str) -> bool:
    """Whether the normaliser joins ``char`` to ``left`` (NFC composes ``e`` + U+0301 into ``é``,
    Hangul jamo into a syllable): normalising them together differs from normalising them apart."""
    if normalizer is None or not left:
        return False
    return normalizer.normalize_str(left + char) != normalizer.normalize_str(left) + normalizer.normalize_str(char)


def _spans_from_offsets(token_bytes: TokenBytes, ids: np.ndarray, text: str,
                        char_offsets: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Byte spans from character offsets (the fallback path of :func:`token_byte_spans`).

    The tokenizer's offsets point into the *original* text, so the spans are its bytes:

    * a *unit* is a run of consecutive tokens that share characters (the pieces of one
      character: ``<0xF0>`` … byte fallback, a byte-level ``ĠðŁ`` ``Ļ`` ``Ĥ`` all reporting the
      character span of 🙂); a token that shares no character is a unit of its own;
    * a unit covers the original bytes of its characters: a token made of normalised
      characters (Qwen's NFC ``é`` from ``e`` + U+0301) covers exactly their bytes;
    * characters no token's offsets cover (a composing mark the normaliser folded into the
      character before it, a trimmed space) go to the unit before them while the normaliser
      joins them to it (:func:`_merges`), else to the unit after them; the first unit starts
      at 0; past the last unit they stay uncovered (they belong to a next token, e.g. of a
      truncated completion);
    * inside a unit the tokens are split by their own byte lengths, cumulatively and clamped
      to the unit, the last one ending at the unit's end (exact when the pieces are those
      characters' bytes, the only case where a unit has several tokens without a normaliser);
    * a token whose offsets cover no character is zero-width where it stands.

    Spans are monotone and tile ``[0, end of the last unit)``.
    """
    n = len(ids)
    pos = _char_to_byte_index(text).tolist()
    offs = np.asarray(char_offsets, dtype=np.int64).reshape(n, 2).clip(0, len(text)).tolist()
    own = token_bytes.lengths[ids].tolist()
    if n and token_bytes.table[int(ids[0])][:1] == b" " and not text.startswith(" "):
        own[0] = max(own[0] - 1, 0)  # a SentencePiece dummy prefix: the "▁" is not in the text
    units: List[List[int]] = []  # [char start, char end, token indices...]
    for i, (a, b) in enumerate(offs):
        if b <= a:
            continue
        if units and a < units[-1][1]:  # shares a character with the unit before
            units[-1][1] = max(units[-1][1], b)
            units[-1].append(i)
        else:
            units.append([a, b, i])
    # Uncovered characters between units: the earlier unit keeps those the normaliser joins to it.
    norm = token_bytes.normalizer
    for u, unit in enumerate(units):
        unit[0] = 0 if u == 0 else units[u - 1][1]
        limit = units[u + 1][0] if u + 1 < len(units) else len(text)
        while unit[1] < limit and _merges(norm, text[unit[0]:unit[1]], text[unit[1]]):
            unit[1] += 1
    ends = [-1] * n
    for unit in units:
        at, stop = pos[unit[0]], pos[unit[1]]
        for i in unit[2:-1]:
            at = min(at + own[i], stop)
            ends[i] = at
        ends[unit[-1]] = stop
    prev = 0
    for i in range(n):  # zero-width tokens sit where the previous token ends
        if ends[i] < 0:
            ends[i] = prev
        prev = ends[i]
    ends = np.asarray(ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]]) if n else ends
    return np.stack([starts, ends], axis=1)


def token_byte_spans(tokenizer, token_ids: Sequence[int], text: str,
                     char_offsets: Optional[Sequence[Tuple[int, int]]] = None) -> np.ndarray:
    """``[n, 2]`` int64 UTF-8 byte spans ``[start, end)`` in ``text`` of its tokens ``token_ids``.

    ``token_ids`` must be the tokenisation of exactly ``text`` (``add_special_tokens=
    False``), or a prefix of it (a truncated completion). ``char_offsets`` (the
    tokenizer's ``offset_mapping``, relative to ``text``) are only used when the
    tokens' bytes do not reproduce the text (a normaliser changed it); without them
    the text is re-encoded to get them. The spans tile ``[0, spans[-1, 1])`` in
    order (module docstring).
    """
    tb = get_token_bytes(tokenizer)
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if (ids < 0).any() or (ids >= len(tb.table)).any():
        raise AlignmentError(f"token ids outside the tokenizer's vocabulary [0, {len(tb.table)})")
    raw = text.encode("utf-8")
    joined = b"".join([tb.table[i] for i in ids.tolist()])
    lens = tb.lengths[ids]
    if raw.startswith(joined) and len(joined) > 0:
        ends = np.cumsum(lens)
    elif joined[:1] == b" " and raw.startswith(joined[1:]):  # SentencePiece dummy prefix "▁"
        ends = np.cumsum(lens) - 1
        ends[0] = max(int(ends[0]), 0)
        ends = np.maximum(ends, 0)
    else:
        if char_offsets is None:
            enc = getattr(tokenizer, "tokenizer", tokenizer)(text, add_special_tokens=False,
                                                             return_offsets_mapping=True)
            char_offsets = enc["offset_mapping"][:n]
        return _spans_from_offsets(tb, ids, text, char_offsets)
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1]
    return np.stack([starts, ends], axis=1)


def common_prefix_length(a: str, i: int, b: str, j: int) -> int:
    """Length of the common prefix of ``a[i:]`` and ``b[j:]`` (doubling, then halving, slice compares)."""
    n = min(len(a) - i, len(b) - j)
    k, step = 0, 1
    while k + step <= n and a[i + k:i + k + step] == b[j + k:j + k + step]:
        k += step
        step *= 2
    while step > 1:
        step //= 2
        if k + step <= n and a[i + k:i + k + step] == b[j + k:j + k + step]:
            k += step
    return k


def locate_content(completion_text: str, contents: Sequence[str],
                   template: Optional[Sequence[str]] = None) -> List[Tuple[int, int]]:
    """Character ranges of the assistant contents, in order, inside a rendered completion.

    ``template`` is the template's own text around the contents, ``[P_0, …, P_m]`` for ``m``
    contents (before the first, between them, after the last: the completion would be
    ``P_0 + c_1 + P_1 + … + c_m + P_m`` if the template kept every content verbatim; see
    :func:`nemo_kd.align.groups.template_pieces`). With it, content ``j`` is searched from the end
    of content ``j − 1``: its *last* verbatim occurrence that starts within the stretch where the
    text agrees with ``P_j``. So a content that also occurs in the template text before it
    (Qwen3's ``<think>\\n\\n</think>\\n\\n`` before an answer ``<``, ``/``, ``k`` or ``think``) is
    found after that text, never inside it, while a content that begins like the template (a
    think block Qwen3 keeps verbatim) may start earlier. A content not there verbatim was
    rewritten by the template (Llama-2 and Gemma strip contents, Qwen3 re-formats a leading think
    block); its range is then the text the template put in its place, from where the text stops
    agreeing with ``P_j`` to where ``P_{j+1}`` starts (after the last content: to where the text's
    end agrees with ``P_m``, the end of turn), and the caller compares it with the content.

    Without ``template`` each content is searched after the previous one (the first occurrence,
    else the first of its stripped form): right only when no template text before a content
    contains it. Raises :class:`AlignmentError` when a content cannot be placed.
    """
    text, out, at = completion_text, [], 0
    if template is None:
        for c in contents:
            k = text.find(c, at)
            if k < 0 and c.strip():
                c = c.strip()
                k = text.find(c, at)
            if k < 0:
                raise AlignmentError(f"assistant content {c[:40]!r} not found in the rendered completion")
            out.append((k, k + len(c)))
            at = k + len(c)
        return out
    if len(template) != len(contents) + 1:
        raise AlignmentError(f"{len(template)} template pieces for {len(contents)} contents")
    for j, c in enumerate(contents):
        head = at + common_prefix_length(text, at, template[j], 0)
        k = text.rfind(c, at, head + len(c)) if c else -1
        if k >= 0:
            out.append((k, k + len(c)))
            at = k + len(c)
            continue
        if j + 1 == len(contents):
            end = len(text) - common_prefix_length(text[head:][::-1], 0, template[j + 1][::-1], 0)
        else:
            end = text.find(template[j + 1], head)
            if end < 0:
                raise AlignmentError(f"the template text after assistant content {c[:40]!r} is not in the "
                                     "rendered completion")
        out.append((head, end))
        at = end
    return out


def char_ranges_to_bytes(text: str, ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Character ranges of ``text`` as UTF-8 byte ranges."""
    if text.isascii():
        return [(int(a), int(b)) for a, b in ranges]
    pos = _char_to_byte_index(text)
    return [(int(pos[a]), int(pos[b])) for a, b in ranges]
