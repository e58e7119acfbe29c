"""Preference pairs for dual preference distillation: teacher positives vs student negatives.

Nanbeige4-3B report (arXiv 2512.06266, §3.3; no public code): for each query the large
teacher's samples are the candidate *positives* and the SFT student's samples the
candidate *negatives*; a **pair-wise preference filter** keeps a pair only when the
positive is clearly better ("Ensure Positive >> Negative"); the student then trains on
``L_DPO + L_pos + L_neg`` (:mod:`nemo_kd.losses.objective`: ``dpo_loss_weight``,
``positive_kd_weight``, ``negative_kd_weight``). The report publishes neither the scores
nor the margin, so both are configuration here:

* a candidate's **score** comes from a scorer: :func:`verifier_score` (rules: the
  extracted answer equals a reference, 1 or 0), the teacher's mean token log-prob of the
  response (the teacher as judge; :func:`nemo_kd.generation.sampling.response_logprobs`),
  or any number supplied with the candidate (an external reward model);
* the pair filter keeps ``(positive, negative)`` when
  ``score(pos) − score(neg) ≥ min_margin`` and, optionally, ``score(pos) ≥
  min_positive_score`` / ``score(neg) ≤ max_negative_score``.

Per query, positives are taken best first; each is paired with a distinct negative that
passes the filter: the *hardest* (highest-scoring) one by default – the most informative
contrast, the DPO practice of mining hard negatives – or the *easiest*. Ties keep
generation order, so the result is deterministic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

NEGATIVE_CHOICES = ("hardest", "easiest")


@dataclass
class Candidate:
    """One sampled response and its score (higher is better)."""

    text: str
    score: float = 0.0
    num_tokens: int = 0
    finished: bool = True


@dataclass
class PairFilterConfig:
    """The pair-wise preference filter (module docstring). Defaults suit 0/1 verifier scores:
    a correct positive against an incorrect negative."""

    min_margin: float = 1.0
    min_positive_score: Optional[float] = None
    max_negative_score: Optional[float] = None
    negative_choice: str = "hardest"
    pairs_per_prompt: int = 1

    def validate(self) -> None:
        if self.negative_choice not in NEGATIVE_CHOICES:
            raise ValueError(f"negative_choice={self.negative_choice!r} is not one of {list(NEGATIVE_CHOICES)}")
        if self.pairs_per_prompt < 1:
            raise ValueError(f"pairs_per_prompt must be >= 1, got {self.pairs_per_prompt}")
        if self.min_margin < 0:
            raise ValueError(f"min_margin must be >= 0 (a positive is never worse than its negative), "
                             f"got {self.min_margin}")


def passes_filter(positive: Candidate, negative: Candidate, cfg: PairFilterConfig) -> bool:
    if cfg.min_positive_score is not None and positive.score < cfg.min_positive_score:
        return False
    if cfg.max_negative_score is not None and negative.score > cfg.max_negative_score:
        return False
    return positive.score - negative.score >= cfg.min_margin


def select_pairs(positives: Sequence[Candidate], negatives: Sequence[Candidate],
                 cfg: PairFilterConfig) -> List[Tuple[int, int]]:
    """``[(positive index, negative index)]`` for one query, at most ``pairs_per_prompt``,
    each candidate used once (module docstring for the order)."""
    cfg.validate()
    pos_order = sorted(range(len(positives)), key=lambda i: -positives[i].score)
    sign = -1.0 if cfg.negative_choice == "hardest" else 1.0
    neg_order = sorted(range(len(negatives)), key=lambda j: sign * negatives[j].score)
    used, pairs = set(), []
    for i in pos_order:
        for j in neg_order:
            if j not in used and passes_filter(positives[i], negatives[j], cfg):
                pairs.append((i, j))
                used.add(j)
                break
        if len(pairs) == cfg.pairs_per_prompt:
            break
    return pairs


def verifier_score(response: str, reference: str, extract: Optional[str] = None,
                   normalize: Callable[[str], str] = lambda s: " ".join(s.split())) -> float:
    """Rule-based score: 1.0 when the response's answer equals the reference, else 0.0.

    ``extract``: a regex whose first group (or whole match) is the answer, searched in the
    response *and* the reference (e.g. ``r"\\\\boxed\\{(.*?)\\}"``, ``r"answer:\\s*(\\S+)"``); no
    match in the response scores 0. Without it, the whole texts are compared. Both
    sides go through ``normalize`` (whitespace collapsed by default).
    """
    if extract is not None:
        pattern = re.compile(extract, re.DOTALL)

        def answer(text: str) -> Optional[str]:
            m = pattern.search(text)
            return None if m is None else (m.group(1) if m.groups() else m.group(0))

        got, want = answer(response), answer(reference)
        if want is None:
            want = reference
        if got is None:
            return 0.0
    else:
        got, want = response, reference
    return float(normalize(got) == normalize(want))


def build_preference_pairs(prompts, positives: Dict[int, List[dict]], negatives: Dict[int, List[dict]],
                           score: Callable[[object, dict], float], cfg: PairFilterConfig,
                           response_filter=None) -> Tuple[List[dict], Dict[str, object]]:
    """Pair rows for :func:`nemo_kd.data.read_records` (``messages`` + ``chosen`` + ``rejected``).

    ``prompts``: :class:`~nemo_kd.generation.responses.Prompt` list; ``positives`` /
    ``negatives``: response rows grouped by prompt index (teacher samples / student samples,
    :func:`~nemo_kd.generation.responses.group_by_prompt`); ``score(prompt, row)``: higher is
    better. Rows failing ``response_filter`` (a
    :class:`~nemo_kd.generation.filters.ResponseFilterConfig`) are no candidates. Returns the
    pairs and a report: prompts without a pair, filter counts per side.
    """
    from nemo_kd.generation.filters import FilterReport, filter_responses

    def candidates(rows, report):
        if response_filter is not None:
            rows, rep = filter_responses(rows, response_filter, get_text=lambda r: r["response"],
                                         get_num_tokens=lambda r: r.get("num_tokens"),
                                         get_finished=lambda r: r.get("finished", True))
            report += rep
        return rows, report

    pos_report, neg_report = FilterReport(), FilterReport()
    out, no_pair = [], 0
    for p in prompts:
        pos_rows, pos_report = candidates(positives.get(p.index, []), pos_report)
        neg_rows, neg_report = candidates(negatives.get(p.index, []), neg_report)
        pos = [Candidate(r["response"], score(p, r), r.get("num_tokens", 0), r.get("finished", True)) for r in pos_rows]
        neg = [Candidate(r["response"], score(p, r), r.get("num_tokens", 0), r.get("finished", True)) for r in neg_rows]
        chosen = select_pairs(pos, neg, cfg)
        no_pair += not chosen
        for k, (i, j) in enumerate(chosen):
            out.append({"id": f"{p.id}" if len(chosen) == 1 else f"{p.id}#{k}", "messages": [dict(m) for m in p.messages],
                        "chosen": pos[i].text, "rejected": neg[j].text,
                        "chosen_score": pos[i].score, "rejected_score": neg[j].score})
    return out, {"prompts": len(prompts), "pairs": len(out), "prompts_without_pair": no_pair,
                 "positive_filter": pos_report, "negative_filter": neg_report}
