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
* added/special tokens (``<|im_end|>``, ``</s>``): the UTF-8 of their content, as
  they appear in the rendered text.

:func:`token_byte_spans` then gives each token of an encoded text its ``[start,
end)`` byte span:

1. *exact path*: when the tokens' bytes concatenate to the text's UTF-8 (the normal
   case for both families), the spans are their cumulative lengths, exact to the
   byte even inside a split character. A SentencePiece "dummy prefix" (the ``▁``
   prepended to the first word, a space that is not in the text) is recognised and
   given to no byte (the first token's span shrinks by one; a lone ``▁`` becomes
   zero-width).
2. *offset path* (a normaliser changed the text: NFKC, lower-casing, ...): the
   tokenizer's character offsets bound each token's byte end to its last character;
   inside it the token's own byte length decides (pieces of one character, tokens
   ending mid-character), else the character end; gaps (trimmed spaces) go to the
   next token. The spans are monotone, so they still tile.

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


def _json_types(node) -> List[str]:
    """Every ``"type"`` value in a (nested) tokenizers JSON component."""
    out: List[str] = []
    if isinstance(node, dict):
        if "type" in node:
            out.append(str(node["type"]))
        for v in node.values():
            out.extend(_json_types(v))
    elif isinstance(node, list):
        for v in node:
            out.extend(_json_types(v))
    return out


def tokenizer_style(tokenizer) -> str:
    """``"byte_level"`` (GPT-2-style byte alphabet) or ``"sentencepiece"`` (``▁`` + ``<0xXX>``)."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        types = _json_types(spec.get("pre_tokenizer")) + _json_types(spec.get("decoder"))
        if "ByteLevel" in types:
            return "byte_level"
    return "sentencepiece"


@dataclass
class TokenBytes:
    """Raw bytes of every token id of one tokenizer (built once, reused per sample).

    ``table[i]`` are the bytes token ``i`` stands for (``b""`` for ids without a
    token); ``lengths`` is ``len(table[i])`` as an int64 array; ``special[i]`` marks
    added special tokens (template tokens: ``<|im_end|>``, ``</s>``, ...);
    ``byte_fallback[i]`` marks SentencePiece ``<0xXX>`` byte tokens.
    """

    table: List[bytes]
    lengths: np.ndarray
    special: np.ndarray
    byte_fallback: np.ndarray
    style: str

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenBytes":
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        style = tokenizer_style(tokenizer)
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
                table[tid] = str(added[tid].content).encode("utf-8")
                special[tid] = bool(getattr(added[tid], "special", False))
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
        return cls(table=table, lengths=lengths, special=special, byte_fallback=byte_fb, style=style)


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


def _spans_from_offsets(token_bytes: TokenBytes, ids: np.ndarray, text: str,
                        char_offsets: Sequence[Tuple[int, int]]) -> np.ndarray:
    """Byte spans from character offsets (the fallback path of :func:`token_byte_spans`).

    Greedy, left to right: a token ends ``own`` bytes (its own byte length) after the
    previous one when that lands inside its last character (``pos[e−1] < end ≤
    pos[e]``, ``e`` its character end) – exact for pieces of a multi-byte character
    (``ĠðŁ`` ``Ļ`` ``Ĥ`` all report the character span of 🙂) and for tokens ending
    mid-character; otherwise (a normaliser changed the bytes) it ends at its
    character end. Gaps (trimmed spaces) go to the next token.
    """
    pos = _char_to_byte_index(text).tolist()
    n = len(ids)
    ends_char = np.asarray(char_offsets, dtype=np.int64).reshape(n, 2)[:, 1].clip(0, len(text)).tolist()
    own = token_bytes.lengths[ids].tolist()
    if n and token_bytes.table[int(ids[0])][:1] == b" " and not text.startswith(" "):
        own[0] -= 1  # a SentencePiece dummy prefix: the "▁" is not in the text
    ends = [0] * n
    prev = 0
    for i in range(n):
        e = ends_char[i]
        cand = prev + own[i]
        if own[i] == 0:
            end = prev
        elif e > 0 and pos[e - 1] < cand <= pos[e]:
            end = cand
        else:
            end = max(pos[e], prev)
        ends[i] = end
        prev = end
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


def locate_content(completion_text: str, contents: Sequence[str]) -> List[Tuple[int, int]]:
    """Character ranges of the assistant contents, in order, inside a rendered completion.

    Each content is searched after the previous one; a template that trims content
    (``content.strip()``, as Llama-2's does) is handled by the caller retrying with
    stripped contents. Raises :class:`AlignmentError` when a content is not found.
    """
    out = []
    at = 0
    for c in contents:
        k = completion_text.find(c, at)
        if k < 0:
            raise AlignmentError(f"assistant content {c[:40]!r} not found in the rendered completion")
        out.append((k, k + len(c)))
        at = k + len(c)
    return out


def char_ranges_to_bytes(text: str, ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Character ranges of ``text`` as UTF-8 byte ranges."""
    if text.isascii():
        return [(int(a), int(b)) for a, b in ranges]
    pos = _char_to_byte_index(text)
    return [(int(pos[a]), int(pos[b])) for a, b in ranges]
