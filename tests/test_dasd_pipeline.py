"""The DASD data pipeline end to end on tiny random Megatron models with different tokenizers:
temperature stages, the student-token length filter, divergence-aware selection checked against
a float64 recomputation, mixed-policy samples, the training files read back, resumable stages."""

import json
import math
import os

import pytest
import torch

MAX_LEN = 96
MAX_NEW = 20
CORPUS = ["The cat sat. A dog ran!\nIs it red? Yes. No way.\nWe add 2 and 3. So 5!", "x = 1. y = 2? Done.\nOk."] * 20
PROMPTS = ["Is it red?", "The cat sat.", "We add 2 and 3.", "x = 1.", "A dog ran!"]


def _readable_bias(tok):
    """+1 for tokens that decode to printable ASCII (+1 more when they end a sentence), -2 else."""
    b = torch.full((len(tok),), -2.0)
    for i in range(len(tok)):
        s = tok.decode([i])
        if s and not s.startswith("<") and all(c.isascii() and (c.isprintable() or c == "\n") for c in s):
            b[i] = 2.0 if s.rstrip(" ")[-1:] in ".!?\n" else 1.0
    return b


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A peaked teacher and a flat student, each with its own byte-level BPE. Random weights, but
    the output layer reads a constant hidden direction (embedding column 0) with a per-token bias
    towards readable text with sentence ends, so responses have several sentences."""
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.teachers import save_full_checkpoint
    from tests.dist_utils import WorldOfOne

    d = tmp_path_factory.mktemp("dasd")
    toks = {"teacher": train_byte_level_bpe(CORPUS, vocab_size=300, save_dir=str(d / "tok_teacher")),
            "student": train_byte_level_bpe(CORPUS, vocab_size=270, save_dir=str(d / "tok_student"))}
    torch.manual_seed(0)
    with WorldOfOne():
        for name, hidden, scale in (("teacher", 32, 30.0), ("student", 16, 10.0)):
            tok = toks[name]
            cfg = GPTModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=2 * hidden,
                                 vocab_size=len(tok), max_position_embeddings=128)
            full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
            full["embedding.word_embeddings.weight"][:, 0] = 0.1
            w = full["output_layer.weight"] * scale
            w[:len(tok), 0] = _readable_bias(tok)
            full["output_layer.weight"] = w
            save_full_checkpoint(str(d / name), full, cfg)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t}) + "\n" for i, t in enumerate(PROMPTS)))
    return dict(dir=d, tok=toks, prompts=str(prompts))


def _cfg(world, out, **over):
    from nemo_kd.generation.dasd_pipeline import DASDPipelineConfig

    d = dict(prompts=world["prompts"], output_dir=str(out), max_seq_length=MAX_LEN, batch_size=32, progress=False,
             teacher=dict(checkpoint=str(world["dir"] / "teacher"), tokenizer=str(world["dir"] / "tok_teacher"),
                          sampling=dict(max_new_tokens=MAX_NEW, seed=1)),
             student=dict(checkpoint=str(world["dir"] / "student"), tokenizer=str(world["dir"] / "tok_student")),
             stages=[dict(name="low", temperature=0.6, num_samples=3),
                     dict(name="high", temperature=1.0, num_samples=3)],
             response_filter=dict(max_tokens=22, require_finished=False, max_repeated_ngram_fraction=None,
                                  max_consecutive_repeats=None, forbid_patterns=[], min_chars=0))
    d.update(over)
    return DASDPipelineConfig.from_dict(d)


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _student_counts_float64(world, row, model, ct):
    """Teacher / student / common / unscored sentences of ``row``, recomputed by hand: a float64
    student forward on the rendered conversation, tokens mapped to sentences by character
    overlap, geometric means, Δ = p_T − p_S against β = 0.1."""
    from nemo_kd.generation.divergence import split_sentences

    text = row["response"]
    tok = ct(row["messages"] + [{"role": "assistant", "content": text}])
    lo = tok.text.index(text, tok.completion_char_start)
    ids = torch.tensor([tok.input_ids])
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)[0, :, :len(world["tok"]["student"])]
    lp = torch.log_softmax(logits.double(), -1)
    s_spans, s_lps = [], []
    for j in range(tok.num_prompt_tokens, len(tok.input_ids)):
        s, e = tok.token_char_spans[j]
        if s - lo >= len(text):
            break
        s_spans.append((max(0, s - lo), min(len(text), e - lo)))
        s_lps.append(float(lp[j - 1, tok.input_ids[j]]))
    sentences = split_sentences(text)

    def means(spans, lps):
        acc = [[] for _ in sentences]
        for (s, e), v in zip(spans, lps):
            if e > s:
                hit = next((k for k, (a, b) in enumerate(sentences) if a < e and s < b), None)
                if hit is not None:
                    acc[hit].append(v)
        return [math.exp(sum(a) / len(a)) if a else None for a in acc]

    counts = {"num_teacher": 0, "num_student": 0, "num_common": 0, "num_unscored": 0}
    for pt, ps in zip(means(row["token_offsets"], row["logprobs"]), means(s_spans, s_lps)):
        if pt is None or ps is None:
            counts["num_unscored"] += 1
        elif pt - ps > 0.1:
            counts["num_teacher"] += 1
        elif ps - pt > 0.1:
            counts["num_student"] += 1
        else:
            counts["num_common"] += 1
    return counts


def test_stages_filter_selection_training_files_and_resume(world, tmp_path, monkeypatch):
    from nemo_kd.data import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.generation import dasd_pipeline
    from nemo_kd.teacher.teachers import load_megatron_teacher
    from tests.dist_utils import WorldOfOne

    out = tmp_path / "out"
    with WorldOfOne():
        report = dasd_pipeline.run(_cfg(world, out))
    stok = world["tok"]["student"]
    teacher_rows = {st: _jsonl(out / st / "teacher_responses.jsonl") for st in ("low", "high")}

    # (b) one stage per temperature, each drawn at its own
    for st, temp in (("low", 0.6), ("high", 1.0)):
        assert len(teacher_rows[st]) == 3 * len(PROMPTS)
        assert {r["temperature"] for r in teacher_rows[st]} == {temp}
        assert report["stages"][st]["temperature"] == temp and report["stages"][st]["sampling"]["temperature"] == temp
    assert [r["response"] for r in teacher_rows["low"]] != [r["response"] for r in teacher_rows["high"]]

    ct = ConversationTokenizer(stok, "chat", MAX_LEN)
    with WorldOfOne():  # the student's sentence counts of every candidate, in float64
        student, _ = load_megatron_teacher(str(world["dir"] / "student"), 0, 1, 0, 1)
        student = student.eval().double()
        by_hand = {(st, t["prompt_index"], t["sample"]): _student_counts_float64(world, t, student, ct)
                   for st in ("low", "high") for t in teacher_rows[st]}
    not_first = 0
    for st in ("low", "high"):
        scored = _jsonl(out / st / "scored.jsonl")
        assert [(r["prompt_index"], r["sample"], r["response"]) for r in scored] == \
               [(r["prompt_index"], r["sample"], r["response"]) for r in teacher_rows[st]]
        # (c) the length filter counts the student's tokens
        counts = [len(stok(r["response"], add_special_tokens=False)["input_ids"]) for r in teacher_rows[st]]
        want = [("empty" if not r["response"].strip() else "too_long" if n > 22 else None)
                for r, n in zip(teacher_rows[st], counts)]
        assert [r["student_num_tokens"] for r in scored] == counts
        assert [r["filter"] for r in scored] == want
        rep = report["stages"][st]
        assert rep["candidates"] == len(scored) and rep["filter"]["kept"] == want.count(None)
        assert rep["filter"]["reasons"] == {k: want.count(k) for k in set(want) - {None}}
        # (a) divergence counts and the selection, recomputed
        expect_sel = []
        for pi in range(len(PROMPTS)):
            group = [(r, t) for r, t in zip(scored, teacher_rows[st]) if r["prompt_index"] == pi]
            ok = []
            for r, t in group:
                if r["filter"] is None:
                    assert r["divergence"] == by_hand[(st, pi, r["sample"])], (st, pi, r["sample"])
                    ok.append(r)
                else:
                    assert r["divergence"] is None
            if ok:
                best = min(ok, key=lambda r: (-r["divergence"]["num_teacher"], r["divergence"]["num_student"],
                                              r["sample"]))
                expect_sel.append(best)
                not_first += best["sample"] != ok[0]["sample"]
        selected = _jsonl(out / st / "selected.jsonl")
        assert [(r["prompt_index"], r["sample"]) for r in selected] == [(r["prompt_index"], r["sample"])
                                                                        for r in expect_sel]
        assert [r["divergence"] for r in selected] == [r["divergence"] for r in expect_sel]
        assert rep["selected"] == len(selected) and rep["prompts_without_selection"] == len(PROMPTS) - len(selected)
        assert rep["selected_sentences"]["teacher"] == sum(r["divergence"]["num_teacher"] for r in selected) > 0
        # (d) the training file is the selected responses, as read_records reads them
        recs = read_records(str(out / st / "train.jsonl"))
        assert len(recs) == len(selected) == rep["train_samples"]
        for rec, r in zip(recs, selected):
            assert rec.id == r["id"] and rec.completion_text == r["response"]
            assert list(rec.messages[:-1]) == r["messages"]
    assert any(r["filter"] == "too_long" and r["num_tokens"] <= 22
               for st in ("low", "high") for r in _jsonl(out / st / "scored.jsonl"))  # teacher length alone passes
    assert not_first >= 1  # divergence-aware selection is not "take the first candidate"

    # (e) a rerun resumes from the stage outputs without loading a model; other settings are refused
    outputs = [out / st / f for st in ("low", "high") for f in ("teacher_responses.jsonl", "scored.jsonl")]
    mtimes = [os.path.getmtime(p) for p in outputs]

    def no_model(*a, **k):
        raise AssertionError("a finished stage loaded a model")

    monkeypatch.setattr(dasd_pipeline, "load_policy", no_model)
    with WorldOfOne():
        again = dasd_pipeline.run(_cfg(world, out))
        assert [os.path.getmtime(p) for p in outputs] == mtimes
        assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in report.items() if k != "seconds"}
        # the selection ablation re-selects from the stored scores
        first = dasd_pipeline.run(_cfg(world, out, selection="first"))
        sel = _jsonl(out / "low" / "selected.jsonl")
        ok = [r for r in _jsonl(out / "low" / "scored.jsonl") if r["filter"] is None]
        assert [(r["prompt_index"], r["sample"]) for r in sel] == \
               sorted({r["prompt_index"]: (r["prompt_index"], r["sample"]) for r in reversed(ok)}.values())
        assert first["stages"]["low"]["selected"] == report["stages"]["low"]["selected"]
        with pytest.raises(FileExistsError, match="other settings"):
            dasd_pipeline.run(_cfg(world, out, beta=0.2))
        with pytest.raises(FileExistsError, match="other settings"):
            dasd_pipeline.run(_cfg(world, out, stages=[dict(name="low", temperature=0.6, num_samples=2)]))
    assert [os.path.getmtime(p) for p in outputs] == mtimes


def test_mixed_policy_samples_are_appended(world, tmp_path):
    from nemo_kd.data import read_records
    from nemo_kd.generation.dasd_pipeline import run
    from tests.dist_utils import WorldOfOne

    out = tmp_path / "out"
    cfg = _cfg(world, out, stages=[dict(name="high", temperature=1.0, num_samples=2)], selection="all",
               mixed_policy=dict(enabled=True, teacher_sampling=dict(max_new_tokens=8, seed=7)),
               response_filter=dict(max_tokens=30, require_finished=False, max_repeated_ngram_fraction=None,
                                    max_consecutive_repeats=None, forbid_patterns=[], min_chars=0))
    with WorldOfOne():
        report = run(cfg)
    stok = world["tok"]["student"]
    selected = _jsonl(out / "high" / "selected.jsonl")
    scored = _jsonl(out / "high" / "scored.jsonl")
    assert [(r["prompt_index"], r["sample"]) for r in selected] == \
           [(r["prompt_index"], r["sample"]) for r in scored if r["filter"] is None]  # selection: all
    mixed = _jsonl(out / "high" / "mixed.jsonl")
    first_sel = {}
    for r in selected:
        first_sel.setdefault(r["prompt_index"], r)
    assert mixed and {r["prompt_index"] for r in mixed} <= set(first_sel)
    for m in mixed:
        assert m["response"] == m["prefix"] + m["continuation"] and m["prefix"] and m["temperature"] == 1.0
        # a truncated rollout used its whole budget: ⌈1.5 × the selected response's student tokens⌉
        budget = math.ceil(1.5 * first_sel[m["prompt_index"]]["student_num_tokens"])
        assert m["budget_from_student_num_tokens"] == first_sel[m["prompt_index"]]["student_num_tokens"]
        assert m["student_tokens"] == budget and math.ceil(0.5 * budget) <= m["cut"] <= budget
        n = len(stok(m["response"], add_special_tokens=False)["input_ids"])
        assert m["student_num_tokens"] == n and m["filter"] == ("too_long" if n > 30 else None)
    kept = [m for m in mixed if m["filter"] is None]
    assert 0 < len(kept) < len(mixed)  # the same filter drops over-long continuations
    assert all(r["student_num_tokens"] <= 30 for r in scored)  # ... while every teacher candidate passed
    rep = report["stages"]["high"]["mixed"]
    assert rep["rollouts"] == len(first_sel) and rep["truncated"] == len(mixed) and rep["kept"] == len(kept)
    recs = read_records(str(out / "high" / "train.jsonl"))
    assert [r.completion_text for r in recs] == [r["response"] for r in selected] + [m["response"] for m in kept]
    assert [r.id for r in recs] == [f"{r['id']}#{r['sample']}" for r in selected] + [f"{m['id']}#mixed" for m in kept]


@pytest.mark.parametrize("over, match", [
    (dict(selection="best"), "selection"),
    (dict(stages=[dict(name="a", temperature=0.6), dict(name="a", temperature=1.0)]), "unique"),
    (dict(stages=[dict(name="a/b", temperature=0.6)]), "directory name"),
    (dict(stages=[dict(name="a", temperature=0.6, sampling=dict(temperature=1.0))]), "stage's `temperature`"),
    (dict(stages=[]), "empty"),
    (dict(teacher=dict(checkpoint="t", num_samples=3)), "per stage"),
    (dict(mixed_policy=dict(length_ratio=0)), "length_ratio"),
    (dict(beta=1.5), "beta"),
    (dict(unknown=1), "unknown pipeline keys"),
])
def test_config_errors(over, match):
    from nemo_kd.generation.dasd_pipeline import DASDPipelineConfig

    d = dict(prompts="p.jsonl", output_dir="o", teacher=dict(checkpoint="t"), student=dict(checkpoint="s"))
    d.update(over)
    with pytest.raises(ValueError, match=match):
        DASDPipelineConfig.from_dict(d)
