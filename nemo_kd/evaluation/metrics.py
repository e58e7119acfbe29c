"""Held-out metrics: exact match of generations, and loss / teacher–student KL via the engine.

:func:`heldout_metrics` runs :meth:`DistillationEngine.eval_step` over held-out batches
that carry the teacher's top-k (a logits store built on the held-out set) with an
*evaluation* objective – ``kd_loss_weight=1, sft_loss_weight=1`` – swapped in for the
duration, whatever the engine was trained with (SFT-only engines included). Token-
weighted over all batches it returns:

* ``loss`` – cross-entropy of the reference completions (nats/token);
* ``kl`` – forward KL(teacher ‖ student) per completion token over the teacher's top-k
  (``exact_tail`` convention: the tail mass is kept as one bucket);
* ``token_agreement`` – fraction of tokens where the student's argmax is the teacher's.

Generation scores, one number per sample (the bootstrap of :mod:`nemo_kd.evaluation.stats`
resamples them): :func:`exact_match_scores` (1/0 after :func:`normalize_answer`; the
optional SQuAD-style steps – lowercase, punctuation, articles – are off by default, since
a cipher answer ``"a"`` is a letter, not an article) and :func:`rouge_l_scores` (ROUGE-L F1
of Google's ``rouge-score`` package, the scorer of the DPKD / MiniLLM / Super-NaturalInstructions
evaluations; Porter stemming on by default as there; ×100 is the papers' scale).
"""

from __future__ import annotations

import functools
import math
import re
import string
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["normalize_answer", "exact_match", "exact_match_scores", "rouge_l_scores", "heldout_metrics"]

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.IGNORECASE)


def normalize_answer(text: str, lowercase: bool = False, strip_punctuation: bool = False,
                     drop_articles: bool = False) -> str:
    """Collapse whitespace and strip: generations are compared modulo spacing.

    Optional, in SQuAD's order: ``lowercase``; ``strip_punctuation`` (ASCII punctuation
    removed); ``drop_articles`` (the words a / an / the, in any case);
    whitespace is collapsed last.
    """
    if lowercase:
        text = text.lower()
    if strip_punctuation:
        text = _PUNCTUATION.sub("", text)
    if drop_articles:
        text = _ARTICLES.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")


def exact_match_scores(predictions: Sequence[str], references: Sequence[str], **normalization) -> List[float]:
    """1.0 where a prediction equals its reference after :func:`normalize_answer` (``normalization``: its
    keyword options), else 0.0."""
    _check_pairs(predictions, references)
    return [float(normalize_answer(p, **normalization) == normalize_answer(r, **normalization))
            for p, r in zip(predictions, references)]


def exact_match(predictions: Sequence[str], references: Sequence[str], **normalization) -> float:
    """Fraction of predictions equal to their reference (after :func:`normalize_answer`)."""
    scores = exact_match_scores(predictions, references, **normalization)
    return sum(scores) / len(scores) if scores else math.nan


class _WhitespaceTokenizer:
    """rouge-score tokenizer for text its default one would empty (it keeps only ``[a-z0-9]``): lowercase,
    split on whitespace. Used for non-ASCII answers; tokenisation only, the scoring is rouge-score's."""

    def tokenize(self, text: str) -> List[str]:
        return text.lower().split()


@functools.lru_cache(maxsize=4)
def _rouge_scorer(use_stemmer: bool, tokenizer: str):
    from rouge_score import rouge_scorer

    if tokenizer not in ("default", "whitespace"):
        raise ValueError(f"rouge tokenizer must be 'default' or 'whitespace', got {tokenizer!r}")
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer,
                                    tokenizer=_WhitespaceTokenizer() if tokenizer == "whitespace" else None)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str], use_stemmer: bool = True,
                   tokenizer: str = "default") -> List[float]:
    """ROUGE-L F1 in [0, 1] of each prediction against its reference (``rouge_score.rouge_scorer``).

    ``tokenizer``: ``default`` (rouge-score's: lowercase, non-alphanumerics as spaces; non-ASCII text
    scores 0) or ``whitespace`` (lowercase, split on whitespace)."""
    _check_pairs(predictions, references)
    scorer = _rouge_scorer(bool(use_stemmer), tokenizer)
    return [float(scorer.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references)]


def heldout_metrics(engine, batches: Iterable[List[dict]], loss_type: str = "forward_kl",
                    topk_convention: str = "exact_tail") -> Dict[str, float]:
    """Token-weighted held-out ``loss``, ``kl`` and ``token_agreement`` (see the module doc).

    ``batches``: each a list of ``engine.num_microbatches`` microbatches from
    :func:`nemo_kd.data.kd_dataset.collate` *with* teacher fields.
    """
    from nemo_kd.losses.objective import DistillationLossConfig, DistillationObjective
    from nemo_kd.parallel import state

    eval_cfg = DistillationLossConfig(kd_loss_type=loss_type, topk_convention=topk_convention,
                                      kd_loss_weight=1.0, sft_loss_weight=1.0)
    saved = engine.loss_cfg, engine.objective
    engine.loss_cfg, engine.objective = eval_cfg, DistillationObjective(
        eval_cfg, group=state.tp_group(), vocab_size=engine.student_cfg.vocab_size)
    tot = {"loss": 0.0, "kl": 0.0, "token_agreement": 0.0}
    n_tokens = 0.0
    try:
        for mbs in batches:
            tokens = float(sum(mb["loss_mask"].sum() for mb in mbs))
            m = engine.eval_step(mbs)
            tot["loss"] += m["sft_loss"] * tokens
            tot["kl"] += m["kd_loss"] * tokens
            tot["token_agreement"] += m["token_agreement"] * tokens
            n_tokens += tokens
    finally:
        engine.loss_cfg, engine.objective = saved
    if n_tokens == 0:
        return {k: math.nan for k in tot}
    return {k: v / n_tokens for k, v in tot.items()}
