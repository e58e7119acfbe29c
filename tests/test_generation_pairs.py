"""The pair-wise preference filter of dual preference distillation, checked by hand."""

import pytest

from nemo_kd.generation.pairs import Candidate, PairFilterConfig, passes_filter, select_pairs, verifier_score


def _c(*scores):
    return [Candidate(f"r{i}", s) for i, s in enumerate(scores)]


def test_margin_and_thresholds():
    cfg = PairFilterConfig(min_margin=0.5)
    assert passes_filter(Candidate("a", 1.0), Candidate("b", 0.5), cfg)  # margin exactly 0.5
    assert not passes_filter(Candidate("a", 1.0), Candidate("b", 0.6), cfg)
    cfg = PairFilterConfig(min_margin=0.0, min_positive_score=0.9, max_negative_score=0.2)
    assert not passes_filter(Candidate("a", 0.8), Candidate("b", 0.1), cfg)  # positive not good enough
    assert not passes_filter(Candidate("a", 1.0), Candidate("b", 0.3), cfg)  # negative too good
    assert passes_filter(Candidate("a", 0.9), Candidate("b", 0.2), cfg)


def test_select_pairs_best_positive_hardest_negative_each_used_once():
    pos, neg = _c(0.2, 0.9, 0.7), _c(0.1, 0.5, 0.45, -1.0)
    cfg = PairFilterConfig(min_margin=0.3, pairs_per_prompt=3)
    # positives best first: 1 (0.9), 2 (0.7), 0 (0.2). Hardest passing negative for 0.9: 0.5 (j=1);
    # for 0.7: 0.45 is not >= 0.3 below... 0.7-0.45=0.25 < 0.3, so 0.1 (j=0); for 0.2: -1.0 (j=3).
    assert select_pairs(pos, neg, cfg) == [(1, 1), (2, 0), (0, 3)]
    easiest = PairFilterConfig(min_margin=0.3, pairs_per_prompt=2, negative_choice="easiest")
    assert select_pairs(pos, neg, easiest) == [(1, 3), (2, 0)]
    assert select_pairs(pos, neg, PairFilterConfig(min_margin=0.3)) == [(1, 1)]
    assert select_pairs(_c(1.0), _c(1.0, 1.0), PairFilterConfig()) == []  # nothing clearly worse
    # ties keep generation order
    assert select_pairs(_c(1.0, 1.0), _c(0.0, 0.0), PairFilterConfig(pairs_per_prompt=2)) == [(0, 0), (1, 1)]
    with pytest.raises(ValueError, match="negative_choice"):
        select_pairs(pos, neg, PairFilterConfig(negative_choice="random"))


def test_verifier_score():
    assert verifier_score(" k  q z ", "k q z") == 1.0
    assert verifier_score("k q", "k q z") == 0.0
    box = r"\\boxed\{(.*?)\}"
    assert verifier_score("so the answer is \\boxed{42}.", "\\boxed{42}", extract=box) == 1.0
    assert verifier_score("so the answer is 42.", "\\boxed{42}", extract=box) == 0.0  # no answer found
    assert verifier_score("answer: 7", "7", extract=r"answer:\s*(\S+)") == 1.0  # reference without the pattern
