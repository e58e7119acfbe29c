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

import contextlib
import functools
import math
import re
import string
from typing import Dict, Iterable, List, Optional, Sequence

__all__ = ["normalize_answer", "exact_match", "exact_match_scores", "rouge_l_scores", "heldout_metrics",
           "heldout_per_sample", "heldout_intervals"]

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


@contextlib.contextmanager
def _evaluation_objective(engine, loss_type: str, topk_convention: str):
    """The engine with the evaluation objective (``kd_loss_weight=1, sft_loss_weight=1``) swapped in."""
    from nemo_kd.losses.objective import DistillationLossConfig, DistillationObjective
    from nemo_kd.parallel import state

    eval_cfg = DistillationLossConfig(kd_loss_type=loss_type, topk_convention=topk_convention,
                                      kd_loss_weight=1.0, sft_loss_weight=1.0)
    saved = engine.loss_cfg, engine.objective
    engine.loss_cfg, engine.objective = eval_cfg, DistillationObjective(
        eval_cfg, group=state.tp_group(), vocab_size=engine.student_cfg.vocab_size)
    try:
        yield engine
    finally:
        engine.loss_cfg, engine.objective = saved


def heldout_metrics(engine, batches: Iterable[List[dict]], loss_type: str = "forward_kl",
                    topk_convention: str = "exact_tail") -> Dict[str, float]:
    """Token-weighted held-out ``loss``, ``kl`` and ``token_agreement`` (see the module doc).

    ``batches``: each a list of ``engine.num_microbatches`` microbatches from
    :func:`nemo_kd.data.kd_dataset.collate` *with* teacher fields.
    """
    tot = {"loss": 0.0, "kl": 0.0, "token_agreement": 0.0}
    n_tokens = 0.0
    with _evaluation_objective(engine, loss_type, topk_convention):
        for mbs in batches:
            tokens = float(sum(mb["loss_mask"].sum() for mb in mbs))
            m = engine.eval_step(mbs)
            tot["loss"] += m["sft_loss"] * tokens
            tot["kl"] += m["kd_loss"] * tokens
            tot["token_agreement"] += m["token_agreement"] * tokens
            n_tokens += tokens
    if n_tokens == 0:
        return {k: math.nan for k in tot}
    return {k: v / n_tokens for k, v in tot.items()}


def heldout_per_sample(engine, samples: Sequence[dict], max_length: int, pad_id: int,
                       topk_convention: str = "exact_tail") -> Dict[str, List[float]]:
    """Each held-out sample's own terms, for intervals over samples: ``tokens`` (its completion tokens) and its
    per-token ``loss``, ``kl`` (forward, KL(t‖s)), ``reverse_kl`` (KL(s‖t)) and ``token_agreement``.

    ``samples``: :class:`~nemo_kd.data.kd_dataset.DistillationDataset` items with teacher fields; each runs as a
    batch of one (the engine reduces a batch to its token mean), so the token-weighted means of these lists
    are :func:`heldout_metrics`' numbers on the same samples. Samples without a completion token are left out
    (they carry no held-out term)."""
    from nemo_kd.data.kd_dataset import collate

    batches = [[collate([s], max_length, pad_id)] for s in samples]
    tokens = [float(b[0]["loss_mask"].sum()) for b in batches]
    keep = [i for i, t in enumerate(tokens) if t > 0]
    out: Dict[str, List[float]] = {"tokens": [tokens[i] for i in keep]}
    for loss_type, kl_name in (("forward_kl", "kl"), ("reverse_kl", "reverse_kl")):
        with _evaluation_objective(engine, loss_type, topk_convention):
            reports = [engine.eval_step(batches[i]) for i in keep]
        out[kl_name] = [m["kd_loss"] for m in reports]
        if loss_type == "forward_kl":
            out["loss"] = [m["sft_loss"] for m in reports]
            out["token_agreement"] = [m["token_agreement"] for m in reports]
    return out


def heldout_intervals(per_sample: Dict[str, List[float]], confidence: float = 0.95, num_resamples: int = 2000,
                      seed: int = 0) -> Dict[str, dict]:
    """Bootstrap intervals of the token-weighted held-out terms over samples (:func:`heldout_per_sample`'s
    lists): for each term, ``sum_i t_i x_i / sum_i t_i`` with ``x_i`` sample i's per-token value and ``t_i``
    its token count, resampling whole samples (:func:`nemo_kd.evaluation.stats.bootstrap_interval` with
    weights). The interval measures the held-out set's sampling noise only, like the generation scores'."""
    from nemo_kd.evaluation.stats import bootstrap_interval

    return {name: bootstrap_interval(values, confidence, num_resamples, seed, weights=per_sample["tokens"]).to_dict()
            for name, values in per_sample.items() if name != "tokens"}
