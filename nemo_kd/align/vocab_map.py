"""Teacher → student vocabulary map by exact surface bytes.

Two tokens are the same outcome when they stand for the same bytes: after
normalising the word markers and byte tokens (:class:`~nemo_kd.align.spans.TokenBytes`)
a byte-level ``Ġhello`` and a SentencePiece ``▁hello`` are both ``b" hello"``, a
byte-level ``Ċ`` and a SentencePiece ``<0x0A>`` are both ``b"\\n"``, and a
byte-level ``ðŁ`` (the first two bytes of an emoji) maps only to a token of exactly
those two bytes. Special/added tokens (``<|im_end|>``, ``</s>``) match only other
special tokens with the same content (a template token is never a text token).

Where one vocabulary has several tokens with the same bytes (SentencePiece byte
fallback: the piece ``A`` and ``<0x41>``) the *canonical* one is used: a regular
piece before a byte token, then the lowest id. Several teacher ids can therefore map
to one student id (the loss merges their probabilities); a student id is the target
of the canonical teacher token of its bytes and of its byte-token duplicates.

**Boundary maps.** At the first token after a template, the two renderings may split
the same content differently around a separator the template owns: Llama-2's
``[/INST] `` ends with a space that SentencePiece folds into the answer's first piece
(``▁i`` = ``b" i"``), while ChatML's ``assistant\n`` leaves the answer's ``i`` bare. The
group is one-to-one over the *content* byte ``i``, but ``map(i) = i ≠ ▁i``: the plain map
would throw the teacher's distribution over the first token away. ``boundary_maps``
carry it over instead: for each separator ``b`` in :data:`BOUNDARY_PREFIXES` one row maps
teacher token ``x`` to the student token ``b + x`` (the student's pieces carry the
separator) and one maps ``b + x`` to ``x`` (the teacher's do). A one-to-one group whose
tokens differ exactly so is compared with the teacher's whole top-k carried through
that row (:func:`nemo_kd.align.loss.build_cross_tokenizer_batch` picks the row per group):
every candidate the teacher considers at that position is, in the student's
tokenisation, the same content with the student's separator in front.

Same tokenizer, different padded vocabulary sizes (Qwen2.5: 151,646 real tokens,
151,936 vs 152,064 model rows; Megatron pads to a multiple of 128·TP): when the two
tokenizers have the same vocabulary the map is the identity on the real rows and
``is_identity`` is set (the loss then skips the id remapping); teacher padding rows
are unmapped (−1), student padding rows are never targets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from nemo_kd.align.spans import get_token_bytes

# Separators a chat template may own in one rendering while the other tokenizer folds them
# into the content's first piece (module docstring, "Boundary maps").
BOUNDARY_PREFIXES = (b" ",)


@dataclass
class VocabMap:
    """``teacher_to_student[t]`` = student id of teacher id ``t`` or −1 (int64 ``[teacher_vocab_size]``).

    ``teacher_vocab_size`` / ``student_vocab_size`` are the models' (possibly padded)
    row counts; ``teacher_real_vocab`` / ``student_real_vocab`` the tokenizers' sizes.
    """

    teacher_to_student: np.ndarray
    student_vocab_size: int
    teacher_vocab_size: int
    student_real_vocab: int
    teacher_real_vocab: int
    is_identity: bool = False
    # [2·len(BOUNDARY_PREFIXES), teacher_vocab_size]: per prefix b, "student adds b", "teacher drops b"
    # (module docstring); None: no boundary maps (identity maps, hand-made maps).
    boundary_maps: Optional[np.ndarray] = None
    _tensors: Dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def tables(self) -> np.ndarray:
        """``[1 + n_boundary, teacher_vocab_size]``: row 0 the plain map, then the boundary maps."""
        rows = [self.teacher_to_student[None]]
        if self.boundary_maps is not None:
            rows.append(self.boundary_maps)
        return np.concatenate(rows, 0)

    @cached_property
    def num_mapped(self) -> int:
        return int((self.teacher_to_student >= 0).sum())

    @cached_property
    def injective(self) -> bool:
        """No two teacher ids map to the same student id (in every table)."""
        for row in self.tables:
            m = row[row >= 0]
            if len(np.unique(m)) != len(m):
                return False
        return True

    @cached_property
    def teacher_coverage(self) -> float:
        """Fraction of the teacher's real tokens with a student counterpart."""
        return self.num_mapped / max(self.teacher_real_vocab, 1)

    @cached_property
    def student_coverage(self) -> float:
        """Fraction of the student's real tokens that some teacher token maps to."""
        m = self.teacher_to_student[self.teacher_to_student >= 0]
        return len(np.unique(m)) / max(self.student_real_vocab, 1)

    def metrics(self) -> Dict[str, float]:
        return {"vocab_teacher_coverage": self.teacher_coverage, "vocab_student_coverage": self.student_coverage,
                "vocab_identity": float(self.is_identity)}

    def tensor(self, device=None) -> torch.Tensor:
        """:attr:`tables` as an int64 ``[n_tables, V_t]`` tensor on ``device`` (cached per device)."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        t = self._tensors.get(key)
        if t is None:
            t = torch.as_tensor(self.tables, dtype=torch.int64, device=device)
            self._tensors[key] = t
        return t

    def map_ids(self, teacher_ids: torch.Tensor, table_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Student ids (−1 where unmapped) of teacher ids ``[N, ...]``; ids outside the table are
        unmapped. ``table_index`` ``[N]`` picks a table per row (0: the plain map)."""
        tables = self.tensor(teacher_ids.device)
        ids = teacher_ids.long()
        v = tables.shape[1]
        ok = (ids >= 0) & (ids < v)
        flat = ids.clamp(0, v - 1)
        if table_index is not None:
            shape = (-1,) + (1,) * (ids.dim() - 1)
            flat = flat + table_index.long().reshape(shape) * v
        return torch.where(ok, tables.reshape(-1)[flat], torch.full_like(ids, -1))


def _keys(tokenizer) -> Tuple[list, np.ndarray, np.ndarray]:
    tb = get_token_bytes(tokenizer)
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    vocab_ids = set(tok.get_vocab().values())
    keys = []
    for i, b in enumerate(tb.table):
        if i not in vocab_ids:
            keys.append(None)
        elif tb.special[i]:
            keys.append(("special", b))
        else:
            keys.append(b)
    return keys, tb.special, tb.byte_fallback


def _same_vocab(a, b) -> bool:
    a, b = getattr(a, "tokenizer", a), getattr(b, "tokenizer", b)
    if a is b:
        return True
    return a.get_vocab() == b.get_vocab()


def build_vocab_map(student_tokenizer, teacher_tokenizer, student_vocab_size: Optional[int] = None,
                    teacher_vocab_size: Optional[int] = None) -> VocabMap:
    """Map teacher ids to student ids by exact normalised bytes (module docstring).

    ``student_vocab_size`` / ``teacher_vocab_size``: the models' output rows
    (default: the tokenizers' sizes); padding rows beyond a tokenizer's size are
    never mapped.
    """
    s_keys, _, s_fb = _keys(student_tokenizer)
    t_keys, _, _ = _keys(teacher_tokenizer)
    s_real, t_real = len(s_keys), len(t_keys)
    s_size = int(student_vocab_size) if student_vocab_size is not None else s_real
    t_size = int(teacher_vocab_size) if teacher_vocab_size is not None else t_real
    if s_size < s_real or t_size < t_real:
        raise ValueError(f"model vocabulary sizes ({s_size}, {t_size}) are below the tokenizers' "
                         f"({s_real}, {t_real})")
    t2s = np.full(t_size, -1, dtype=np.int64)
    if _same_vocab(student_tokenizer, teacher_tokenizer):
        t2s[:t_real] = np.arange(t_real)
        return VocabMap(t2s, s_size, t_size, s_real, t_real, is_identity=True)
    canon: Dict[object, int] = {}
    for i, k in enumerate(s_keys):  # canonical student id per key: regular piece first, then lowest id
        if k is None or k == b"":
            continue
        j = canon.get(k)
        if j is None or (s_fb[j] and not s_fb[i]):
            canon[k] = i
    for i, k in enumerate(t_keys):
        if k is not None:
            t2s[i] = canon.get(k, -1)
    ident = t_real <= s_real and bool((t2s[:t_real] == np.arange(t_real)).all())
    boundary = None if ident else _boundary_maps(t_keys, canon, t_size)
    return VocabMap(t2s, s_size, t_size, s_real, t_real, is_identity=ident, boundary_maps=boundary)


def _boundary_maps(t_keys, canon: Dict[object, int], t_size: int) -> np.ndarray:
    """Per prefix b: teacher x -> student (b + x), and teacher (b + x) -> student x (text tokens only)."""
    out = np.full((2 * len(BOUNDARY_PREFIXES), t_size), -1, dtype=np.int64)
    for p, prefix in enumerate(BOUNDARY_PREFIXES):
        for i, k in enumerate(t_keys):
            if not isinstance(k, bytes) or not k:
                continue
            out[2 * p, i] = canon.get(prefix + k, -1)
            if k.startswith(prefix) and len(k) > len(prefix):
                out[2 * p + 1, i] = canon.get(k[len(prefix):], -1)
    return out
