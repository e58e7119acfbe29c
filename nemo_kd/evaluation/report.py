"""What ``nemo-kd-evaluate`` writes: per-sample JSONL, ``results.json``, ``results.md``, PNG plots (all atomic).

Layout of ``output_dir``::

    samples/<student>.jsonl   one row per prompt: prompt, reference, response, lengths, scores
    results.json              settings, each student's summary (scores with intervals, lengths, held-out terms),
                              the paired differences
    results.md                the table a user reads (ROUGE-L ×100 and exact match with 95% intervals,
                              paired differences with intervals, significant ones marked)
    scores.png                each score by student with its interval
    lengths.png               response-length histograms (tokens), one per student, overlaid

Each file is written to a per-process temp name and renamed into place (the pipelines' writers), so
a killed run leaves the previous file or none, never half of one.
"""

from __future__ import annotations

import io
import os
import re
from typing import Dict, List, Sequence

from nemo_kd.evaluation.stats import Interval
from nemo_kd.generation.stages import atomic_write_json, atomic_write_jsonl
from nemo_kd.output_lock import temp_tag

__all__ = ["write_report", "markdown_table", "sample_file_name", "write_text"]

_SCALE = {"rouge_l": 100.0}  # the papers print ROUGE-L ×100
_TITLES = {"rouge_l": "ROUGE-L", "exact_match": "exact match", "checker": "checker"}
_HELDOUT = (("loss", "CE"), ("kl", "KL(t‖s)"), ("reverse_kl", "KL(s‖t)"), ("token_agreement", "agreement"))


def sample_file_name(student: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", student).strip("_") + ".jsonl"


def _write_bytes(path: str, data: bytes) -> None:
    from nemo_kd.teacher.store import _atomic_write  # the store's fsync'ed temp + rename

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(path, data, temp_tag())


def write_text(path: str, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically (a recipe's own results.md beside this module's outputs)."""
    _write_bytes(path, text.encode("utf-8"))


def _interval(d: dict) -> Interval:
    return Interval(**d)


def _heldout_cell(h: dict, key: str) -> str:
    """``value [low, high]`` of a held-out term (its interval over samples), the value alone without one."""
    if key not in h:
        return ""
    iv = (h.get("intervals") or {}).get(key)
    return _interval(iv).format(digits=4) if iv else f"{h[key]:.4f}"


def markdown_table(results: dict) -> str:
    """The students' table and the paired differences (``results``: what ``results.json`` holds)."""
    students: Dict[str, dict] = results["students"]
    conf = int(round(100 * results["settings"]["confidence"]))
    names = [n for n in ("rouge_l", "exact_match", "checker") if any(n in s["scores"] for s in students.values())]
    heldout = [(k, t) for k, t in _HELDOUT if any(k in (s.get("heldout") or {}) for s in students.values())]
    head = ["student", "n"] + [f"{_TITLES[n]}{' ×100' if n in _SCALE else ''} [{conf}% CI]" for n in names]
    head += ["tokens mean [CI]", "finished"] + [t for _, t in heldout]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for student, s in students.items():
        cells = [student, str(s["num_samples"])]
        cells += [_interval(s["scores"][n]).format(_SCALE.get(n, 1.0), 1 if n in _SCALE else 3)
                  if n in s["scores"] else "" for n in names]
        cells += [_interval(s["lengths"]["tokens_interval"]).format(digits=1), f"{s['finished']:.3f}"]
        cells += [_heldout_cell(s.get("heldout") or {}, k) for k, _ in heldout]
        lines.append("| " + " | ".join(cells) + " |")
    diffs = results.get("paired_differences") or []
    if diffs:
        lines += ["", f"Paired differences a − b on the same prompts ({conf}% bootstrap intervals; * : the interval "
                      "excludes 0):", "", "| a − b | score | difference [CI] | |", "|---|---|---|---|"]
        for d in diffs:
            iv = Interval(d["mean"], d["low"], d["high"], d["n"], d["confidence"])
            lines.append(f"| {d['a']} − {d['b']} | {_TITLES[d['score']]} | "
                         f"{iv.format(_SCALE.get(d['score'], 1.0), 1 if d['score'] in _SCALE else 3)} | "
                         f"{'*' if d['significant'] else ''} |")
    lines += ["", f"Intervals: percentile bootstrap over prompts ({results['settings']['bootstrap_resamples']} "
                  f"resamples, seed {results['settings']['bootstrap_seed']}); they measure the eval set's sampling "
                  "noise, not training noise across seeds."]
    return "\n".join(lines) + "\n"


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plots(out_dir: str, results: dict, rows_by_student: Dict[str, Sequence[dict]]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = results["students"]
    names = [n for n in ("rouge_l", "exact_match", "checker") if any(n in s["scores"] for s in students.values())]
    conf = int(round(100 * results["settings"]["confidence"]))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels = [st for st, s in students.items() if name in s["scores"]]
        ivs = [students[st]["scores"][name] for st in labels]
        scale = _SCALE.get(name, 1.0)
        means = [iv["mean"] * scale for iv in ivs]
        err = [[(iv["mean"] - iv["low"]) * scale for iv in ivs], [(iv["high"] - iv["mean"]) * scale for iv in ivs]]
        ax.errorbar(range(len(labels)), means, yerr=err, fmt="o", capsize=5, color="tab:blue")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_title(f"{_TITLES[name]}{' ×100' if scale != 1 else ''} ({conf}% CI)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    written = [os.path.join(out_dir, "scores.png")]
    _write_bytes(written[-1], _png(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    longest = max((r["response_tokens"] for rows in rows_by_student.values() for r in rows), default=0)
    bins = range(0, longest + 2)
    for student, rows in rows_by_student.items():
        ax.hist([r["response_tokens"] for r in rows], bins=bins, histtype="step", linewidth=1.6, label=student)
    ax.set_xlabel("response length (tokens)")
    ax.set_ylabel("prompts")
    ax.legend()
    fig.tight_layout()
    written.append(os.path.join(out_dir, "lengths.png"))
    _write_bytes(written[-1], _png(fig))
    plt.close(fig)
    return written


def write_report(out_dir: str, results: dict, rows_by_student: Dict[str, Sequence[dict]], plots: bool = True) -> List[str]:
    """Write every output file (see the module docstring); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for student, rows in rows_by_student.items():
        written.append(os.path.join(out_dir, "samples", sample_file_name(student)))
        atomic_write_jsonl(written[-1], rows)
    written.append(os.path.join(out_dir, "results.json"))
    atomic_write_json(written[-1], results)
    written.append(os.path.join(out_dir, "results.md"))
    _write_bytes(written[-1], ("# nemo-kd-evaluate\n\n" + markdown_table(results)).encode("utf-8"))
    if plots:
        written += _plots(out_dir, results, rows_by_student)
    return written
