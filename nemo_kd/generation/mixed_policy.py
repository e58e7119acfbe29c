"""Mixed-policy distillation data: a student prefix continued by the teacher (DASD).

DASD (arXiv 2601.09088, §mixed-policy distillation): the student samples a response with
a budget of ``length_ratio`` (1.5) times the teacher's response length for the same
question. A student response that runs out of budget (no end token) is cut at a random
token past its middle, ``c ~ U{⌈min_cut_fraction·n⌉, …, n−1}``, and the **teacher
continues** from the student's prefix; continuations that pass the response filters
become training samples ``prompt → student prefix + teacher continuation``. The student
prefix is *not* masked from the loss (the paper found masking it hurt): the samples are
ordinary records. Student responses that finish within budget are not mixed samples.

The prefix travels as text, so student and teacher may use different tokenizers and chat
templates: the teacher sees the prompt rendered with its own template, the generation
prompt, then the prefix text (:func:`continuation_prompt_ids`). A cut inside a multi-byte
character (byte-level BPE) is moved forward to the next token boundary that decodes
cleanly (:func:`clean_prefix`).

Randomness: the cut of sample ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass
class MixedPolicyConfig:
    length_ratio: float = 1.5  # student budget = ⌈length_ratio · teacher response tokens⌉
    min_cut_fraction: float = 0.5  # the cut lies past this fraction of the student's tokens
    seed: int = 0

    def validate(self) -> None:
        if not self.length_ratio > 0:
            raise ValueError(f"length_ratio must be > 0, got {self.length_ratio}")
        if not 0.0 <= self.min_cut_fraction < 1.0:
            raise ValueError(f"min_cut_fraction must be in [0, 1), got {self.min_cut_fraction}")


@dataclass
class MixedSample:
    """One mixed-policy sample: the student's prefix (``cut`` of its ``student_tokens``
    tokens) and the teacher's continuation of it."""

    index: int
    prefix: str
    continuation: str
    cut: int
    student_tokens: int
    finished: bool  # the teacher's continuation ended with its end token

    @property
    def response(self) -> str:
        return self.prefix + self.continuation


def student_token_budget(teacher_num_tokens: int, cfg: MixedPolicyConfig) -> int:
    return max(1, math.ceil(cfg.length_ratio * teacher_num_tokens))


def cut_point(num_tokens: int, cfg: MixedPolicyConfig, index: int) -> int:
    """The prefix length ``c ∈ [⌈min_cut_fraction·n⌉, n−1]`` (at least 1) for sample ``index``."""
    if num_tokens < 2:
        return num_tokens
    lo = min(max(1, math.ceil(cfg.min_cut_fraction * num_tokens)), num_tokens - 1)
    digest = hashlib.sha256(f"mixed-policy:{cfg.seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little")).randint(lo, num_tokens - 1)


def clean_prefix(tokenizer, token_ids: Sequence[int], cut: int) -> Tuple[int, str]:
    """``(cut', text)``: the decoded prefix, ``cut`` moved forward past a split character."""
    cut = max(0, min(cut, len(token_ids)))
    text = tokenizer.decode(list(token_ids[:cut]), skip_special_tokens=True)
    while text.endswith("\ufffd") and cut < len(token_ids):  # a partial UTF-8 sequence
        cut += 1
        text = tokenizer.decode(list(token_ids[:cut]), skip_special_tokens=True)
    return cut, text


def continuation_prompt_ids(ctok, prompt_messages: Sequence[Dict[str, str]], prefix: str) -> List[int]:
    """The teacher's input: the prompt rendered as the teacher's
    :class:`~nemo_kd.data.tokenization.ConversationTokenizer` renders it (its own template and
    generation prompt), then the student's prefix text (the start of the assistant turn)."""
    return list(ctok.tokenizer(ctok.render_prompt(prompt_messages) + prefix, add_special_tokens=False)["input_ids"])


def mixed_policy_samples(student, teacher, student_ctok, teacher_ctok,
                         prompts: Sequence[Sequence[Dict[str, str]]], teacher_lengths: Sequence[int],
                         cfg: MixedPolicyConfig, student_sampling, teacher_sampling, *, student_vocab_size: int,
                         teacher_vocab_size: int, max_length: Optional[int] = None, batch_size: int = 64,
                         sample_offset: int = 0, progress=None) -> Tuple[List[MixedSample], Dict[str, int]]:
    """Student rollouts with a budget, cut and continued by the teacher (module docstring).

    ``student_ctok`` / ``teacher_ctok``: each model's
    :class:`~nemo_kd.data.tokenization.ConversationTokenizer` (template and tokenizer).
    ``prompts``: the prompt turns of each question; ``teacher_lengths``: the teacher
    response's length *in student tokens* for the budget. ``student_sampling`` /
    ``teacher_sampling``: :class:`~nemo_kd.generation.sampling.SamplingConfig` (the
    ``max_new_tokens`` of the former is replaced by each budget; the latter bounds the
    continuation). Returns the samples and counts (``finished_within_budget``,
    ``truncated``, ``continued``).
    """
    from dataclasses import replace

    from nemo_kd.generation.sampling import generate

    cfg.validate()
    student_tokenizer, teacher_tokenizer = student_ctok.tokenizer, teacher_ctok.tokenizer
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    s_pad = student_tokenizer.pad_token_id if student_tokenizer.pad_token_id is not None else s_eos
    t_pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else t_eos
    budgets = [student_token_budget(n, cfg) for n in teacher_lengths]
    # One batched rollout up to the largest budget, each row then cut at its own: a row's
    # draws depend only on (seed, index, step), so its first `budget` tokens are exactly
    # what a rollout with that budget would have produced.
    ids = [continuation_prompt_ids(student_ctok, p, "") for p in prompts]
    rollouts = generate(student, ids, replace(student_sampling, max_new_tokens=max(budgets, default=0)),
                        eos_id=s_eos, pad_id=s_pad, vocab_size=student_vocab_size, max_length=max_length,
                        batch_size=batch_size, sample_offset=sample_offset, progress=progress)
    counts = {"finished_within_budget": 0, "truncated": 0, "continued": 0}
    cut_rows, cut_info = [], []
    for i, (g, budget) in enumerate(zip(rollouts, budgets)):
        if g.finished and len(g.token_ids) <= budget:
            counts["finished_within_budget"] += 1
            continue
        counts["truncated"] += 1
        tokens = g.token_ids[:budget]
        c, prefix = clean_prefix(student_tokenizer, tokens, cut_point(len(tokens), cfg, sample_offset + i))
        cut_rows.append(continuation_prompt_ids(teacher_ctok, prompts[i], prefix))
        cut_info.append((i, c, prefix, len(tokens)))
    conts = generate(teacher, cut_rows, teacher_sampling, eos_id=t_eos, pad_id=t_pad, vocab_size=teacher_vocab_size,
                     max_length=max_length, batch_size=batch_size, tokenizer=teacher_tokenizer,
                     sample_offset=sample_offset) if cut_rows else []
    samples = []
    for (i, c, prefix, n), g in zip(cut_info, conts):
        samples.append(MixedSample(sample_offset + i, prefix, g.text, c, n, g.finished))
        counts["continued"] += 1
    return samples, counts
