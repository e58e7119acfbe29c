"""``benchmarks/bench_methods.py --tiny`` end to end: every method and bound over 3 seeds, pooled intervals,
paired differences to SFT recomputed from the per-sample rows, the "what differs significantly" line."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

SEEDS = ("1", "2", "3")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_methods") / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_methods.py"), "--tiny",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _samples(out, name):
    from nemo_kd.evaluation.report import sample_file_name

    return [json.loads(line) for line in (out / "eval" / "samples" / sample_file_name(name)).open()]


@pytest.mark.slow
def test_tiny_comparison_lists_every_method_over_three_seeds(tiny_run):
    from bench_methods import BOUNDS, METHODS

    out = tiny_run
    for rel in ("results.md", "results.json", "eval/results.json", "eval/results.md", "eval/scores.png",
                "eval/lengths.png"):
        assert os.path.exists(out / rel), rel
    assert os.path.getsize(out / "eval" / "scores.png") > 1000
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == set(METHODS) | set(BOUNDS)
    num_test = res["config"]["sizes"]["test"]
    for name in METHODS + ("warm start",):
        assert sorted(res["per_seed"][name]) == list(SEEDS), name
        assert res["methods"][name]["num_samples"] == 3 * num_test, name
    # the teacher is trained once (shared by every seed) and scored once
    assert list(res["per_seed"]["teacher"]) == ["0"] and res["methods"]["teacher"]["num_samples"] == num_test
    for name, summary in res["methods"].items():
        rows = _samples(out, name)
        assert len(rows) == summary["num_samples"], name
        for score in ("rouge_l", "exact_match", "checker"):
            iv = summary["scores"][score]
            assert iv["low"] <= iv["mean"] <= iv["high"] and iv["confidence"] == 0.95, (name, score, iv)
            # the pooled mean is the mean over every (seed, prompt) cell, and the mean of the per-seed means
            assert iv["mean"] == pytest.approx(math.fsum(r[score] for r in rows) / len(rows), abs=1e-12)
            per_seed = [s[score]["mean"] for s in res["per_seed"][name].values()]
            assert iv["mean"] == pytest.approx(sum(per_seed) / len(per_seed), abs=1e-12), (name, score)
    # the seeds are different runs: the warm starts (different initial weights) answer differently
    warm = _samples(out, "warm start")
    by_seed = {s: [r["response"] for r in warm if str(r["seed"]) == s] for s in SEEDS}
    assert by_seed["1"] != by_seed["2"] or by_seed["2"] != by_seed["3"]


@pytest.mark.slow
def test_tiny_comparison_scores_and_paired_differences(tiny_run):
    from rouge_score import rouge_scorer

    out = tiny_run
    res = json.loads((out / "results.json").read_text())
    # ROUGE-L of every per-sample row against the rouge-score library itself (stemmer on, its tokenizer)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for name in ("SFT", "on-policy GKD", "teacher"):
        for r in _samples(out, name):
            assert r["rouge_l"] == pytest.approx(scorer.score(r["reference"], r["response"])["rougeL"].fmeasure,
                                                 abs=1e-12), (name, r["id"])
            assert r["exact_match"] == float(r["response"].split() == r["reference"].split()), (name, r["id"])
    sft = {(r["seed"], r["id"]): r for r in _samples(out, "SFT")}
    paired = res["paired_vs_sft"]
    assert {(d["a"], d["score"]) for d in paired} == {(n, s) for n in res["methods"] if n not in ("SFT", "teacher")
                                                      for s in ("rouge_l", "exact_match")}
    for d in paired:
        rows = {(r["seed"], r["id"]): r for r in _samples(out, d["a"])}
        assert rows.keys() == sft.keys(), d["a"]
        # the difference of the two methods' per-sample means, recomputed from eval/samples
        expected = (math.fsum(r[d["score"]] for r in rows.values()) - math.fsum(r[d["score"]] for r in sft.values())
                    ) / len(rows)
        assert d["b"] == "SFT" and d["n"] == len(rows)
        assert d["mean"] == pytest.approx(expected, abs=1e-12), (d["a"], d["score"])
        assert d["low"] <= d["mean"] <= d["high"], d
        assert d["significant"] == (not d["low"] <= 0.0 <= d["high"]), d
        seeds_above = sum(res["per_seed"][d["a"]][s][d["score"]]["mean"] > res["per_seed"]["SFT"][s][d["score"]]["mean"]
                          for s in SEEDS)
        assert d["seeds_above"] == seeds_above and d["seeds"] == 3, d
    # the verdict line of results.md says exactly what the intervals say
    md = (out / "results.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("What differs significantly from SFT")]
    m = re.fullmatch(r"What differs significantly from SFT \(95%, paired\): above SFT: (.*); below SFT: (.*); "
                     r"not distinguishable from SFT on either score: (.*)\.", line)
    assert m, line
    above, below, same = m.groups()
    label = lambda d: f"{d['a']} ({'ROUGE-L' if d['score'] == 'rouge_l' else 'EM'} "
    for d in paired:
        assert (label(d) in above) == (d["significant"] and d["mean"] > 0), (d, line)
        assert (label(d) in below) == (d["significant"] and d["mean"] < 0), (d, line)
    undistinguished = {d["a"] for d in paired} - {d["a"] for d in paired if d["significant"]}
    assert (set(same.split(", ")) if same != "none" else set()) == undistinguished, line
    for name in res["methods"]:
        assert f"| {name} |" in md, name


def test_verdict_names_methods_with_parentheses():
    """A significant "KD (forward KL)" is not also listed as indistinguishable (names hold parentheses)."""
    from bench_methods import _verdict

    row = lambda a, score, mean, low, high: dict(a=a, b="SFT", score=score, mean=mean, low=low, high=high, n=10,
                                                 confidence=0.95, significant=not low <= 0.0 <= high)
    paired = [row("KD (forward KL)", "rouge_l", 0.05, 0.02, 0.07), row("KD (forward KL)", "exact_match", 0.0, 0.0, 0.0),
              row("reverse KL", "rouge_l", -0.05, -0.07, -0.03), row("reverse KL", "exact_match", 0.0, 0.0, 0.0),
              row("AKL", "rouge_l", 0.01, -0.01, 0.03), row("AKL", "exact_match", 0.0, 0.0, 0.0)]
    assert _verdict(paired) == ("above SFT: KD (forward KL) (ROUGE-L 5.0 [2.0, 7.0]); below SFT: reverse KL "
                                "(ROUGE-L -5.0 [-7.0, -3.0]); not distinguishable from SFT on either score: AKL.")
