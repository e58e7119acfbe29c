"""nemo_kd.evaluation: ROUGE-L (rouge-score), normalised exact match, bootstrap and paired intervals,
length statistics, and the ``nemo-kd-evaluate`` command on one student in three formats.

References are independent of the code under test: ROUGE-L against ``rouge_score`` itself and against
LCS values worked out by hand; interval coverage against the known mean of synthetic draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nemo_kd.evaluation.metrics import exact_match, exact_match_scores, normalize_answer, rouge_l_scores
from nemo_kd.evaluation.stats import bootstrap_interval, length_statistics, paired_difference

# ----------------------------------------------------------------------------- ROUGE-L

PAIRS = [  # (prediction, reference)
    ("the cat on the mat", "the cat sat on the mat"),
    ("d c b a", "a b c d"),
    ("a x c y e z", "a b c d e"),
    ("", "something"),
    ("The running dogs!", "a dog runs"),
    ("police killed the gunman", "the gunman police killed"),
    ("m q b x", "m q b x"),
    ("Encoded: m, q; b.", "m q b x"),
]


def _f1(lcs, n_pred, n_ref):
    p, r = lcs / n_pred, lcs / n_ref
    return 0.0 if lcs == 0 else 2 * p * r / (p + r)


@pytest.mark.parametrize("use_stemmer", [True, False])
def test_rouge_l_equals_rouge_score(use_stemmer):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    got = rouge_l_scores([p for p, _ in PAIRS], [r for _, r in PAIRS], use_stemmer=use_stemmer)
    want = [scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS]
    assert got == want  # the same library call, not a re-implementation: equal to the bit


def test_rouge_l_hand_computed_lcs():
    got = rouge_l_scores([p for p, _ in PAIRS[:4]], [r for _, r in PAIRS[:4]], use_stemmer=False)
    want = [_f1(5, 5, 6), _f1(1, 4, 4), _f1(3, 6, 5), 0.0]  # LCS: "the cat on the mat"; one letter; "a c e"
    assert got == pytest.approx(want, abs=1e-12)
    assert got[0] == pytest.approx(10 / 11) and got[2] == pytest.approx(6 / 11)
    # stemming: running->run, dogs->dog, runs->run; "the"/"a" stay: LCS("the run dog", "a dog run") = 1 word
    stem, plain = (rouge_l_scores(["The running dogs!"], ["a dog runs"], use_stemmer=s)[0] for s in (True, False))
    assert stem == pytest.approx(_f1(1, 3, 3)) and plain == 0.0
    # punctuation and case are rouge-score's tokenizer's business: "encoded m q b" vs "m q b x" share m q b
    assert rouge_l_scores(["Encoded: m, q; b."], ["m q b x"])[0] == pytest.approx(_f1(3, 4, 4))
    # non-ASCII: the default tokenizer keeps [a-z0-9] only; the whitespace one keeps words
    assert rouge_l_scores(["привет"], ["привет мир"])[0] == 0.0
    assert rouge_l_scores(["привет"], ["привет мир"], tokenizer="whitespace")[0] == pytest.approx(_f1(1, 1, 2))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        rouge_l_scores(["a", "b"], ["a"])


# ----------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("text, options, want", [
    ("  m  q\tb\n x ", {}, "m q b x"),
    ("The Cat.", {}, "The Cat."),
    ("The Cat.", {"lowercase": True}, "the cat."),
    ("The Cat.", {"lowercase": True, "strip_punctuation": True}, "the cat"),
    ("The Cat, a hat.", {"strip_punctuation": True, "drop_articles": True}, "Cat hat"),
    ("an anthem, then", {"drop_articles": True}, "anthem, then"),  # whole words only
    ("a b c", {}, "a b c"),  # cipher letters: articles are kept unless asked
])
def test_normalize_answer(text, options, want):
    assert normalize_answer(text, **options) == want


def test_exact_match_scores():
    preds, refs = ["m q b", "The answer.", "x  y", "no"], ["m q b", "the answer", "x y", "yes"]
    assert exact_match_scores(preds, refs) == [1.0, 0.0, 1.0, 0.0]
    assert exact_match_scores(preds, refs, lowercase=True, strip_punctuation=True) == [1.0, 1.0, 1.0, 0.0]
    assert exact_match(preds, refs) == 0.5
    assert math.isnan(exact_match([], []))


# ----------------------------------------------------------------------------- intervals

REPS = 400
MARGIN = 0.035  # ~3 binomial standard errors of a coverage measured on 400 repetitions at 0.95


def _coverage(draw, true_mean, n, seed=0):
    rng = np.random.default_rng(seed)
    hits = 0
    for rep in range(REPS):
        iv = bootstrap_interval(draw(rng, n), num_resamples=1000, seed=rep)
        hits += iv.low <= true_mean <= iv.high
    return hits / REPS


def test_bootstrap_coverage_normal():
    cov = _coverage(lambda rng, n: rng.normal(0.3, 1.0, n), 0.3, n=80)
    assert abs(cov - 0.95) <= MARGIN, cov


def test_bootstrap_coverage_bernoulli():  # exact match: 0/1 scores
    cov = _coverage(lambda rng, n: (rng.random(n) < 0.6).astype(float), 0.6, n=100, seed=1)
    assert abs(cov - 0.95) <= MARGIN, cov


def test_bootstrap_interval_basics():
    x = np.random.default_rng(3).normal(size=200)
    a, b = bootstrap_interval(x, seed=5), bootstrap_interval(x, seed=5)
    assert a == b and a.n == 200 and a.mean == pytest.approx(x.mean()) and a.low < a.mean < a.high
    # the 95% half-width of a mean is ~1.96 standard errors
    assert (a.high - a.low) / 2 == pytest.approx(1.96 * x.std() / math.sqrt(200), rel=0.12)
    narrow = bootstrap_interval(x, confidence=0.5, seed=5)
    assert a.low < narrow.low < narrow.high < a.high
    assert bootstrap_interval([0.7]) .low == bootstrap_interval([0.7]).high == 0.7
    assert bootstrap_interval([]).n == 0 and math.isnan(bootstrap_interval([]).mean)
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_interval([1.0, float("nan")])


def test_paired_difference_coverage_and_power():
    """Two students on the same prompts, sharing prompt difficulty (sd 1) with small own noise (sd 0.2):
    the paired interval covers the true difference at ~95% and finds a difference of 0.1 that two
    separate intervals cannot tell apart."""
    rng = np.random.default_rng(7)
    n, delta = 100, 0.1
    covered = significant = overlapping = 0
    for rep in range(REPS):
        difficulty = rng.normal(0.0, 1.0, n)
        a = difficulty + delta + rng.normal(0, 0.2, n)
        b = difficulty + rng.normal(0, 0.2, n)
        d = paired_difference(a, b, num_resamples=1000, seed=rep)
        assert d.mean == pytest.approx(a.mean() - b.mean())
        covered += d.low <= delta <= d.high
        significant += d.significant
        ia, ib = bootstrap_interval(a, num_resamples=1000, seed=rep), bootstrap_interval(b, num_resamples=1000,
                                                                                           seed=rep)
        overlapping += ia.low <= ib.high and ib.low <= ia.high
    assert abs(covered / REPS - 0.95) <= MARGIN, covered / REPS
    assert significant / REPS > 0.9, significant / REPS  # paired SE 0.028: delta is ~3.5 SE
    assert overlapping / REPS > 0.9, overlapping / REPS  # separate SEs 0.14 each: they overlap
    with pytest.raises(ValueError, match="same prompts"):
        paired_difference([1.0, 2.0], [1.0])


def test_length_statistics():
    s = length_statistics([1, 2, 3, 4, 10])
    assert s == {"mean": 4.0, "std": pytest.approx(np.std([1, 2, 3, 4, 10])), "min": 1.0, "median": 3.0,
                 "p90": pytest.approx(4 + 0.6 * 6), "max": 10.0}
    assert math.isnan(length_statistics([])["mean"])
