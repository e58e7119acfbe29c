"""nemo_kd.evaluation: ROUGE-L (rouge-score), normalised exact match, bootstrap and paired intervals,
length statistics, and the ``nemo-kd-evaluate`` command on one student in three formats.

References are independent of the code under test: ROUGE-L against ``rouge_score`` itself and against
LCS values worked out by hand; interval coverage against the known mean of synthetic draws.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from dist_utils import WorldOfOne, run_distributed

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


# ----------------------------------------------------------------------------- nemo-kd-evaluate, three formats

# 150 SFT steps: greedy answers already differ by prompt (7 distinct of 8, ROUGE-L 0.21, no exact match) while the
# assertions ask for >= 4 distinct and 0 < ROUGE-L < 1; 60 steps give one answer for all, 100 exactly 4.
N_PROMPTS, MAX_LEN, STEPS = 8, 40, 150


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A 2-layer student trained 150 SFT steps on the cipher task (cheap: partly right answers, 0 < ROUGE-L < 1), saved
    as a .nemo; its Megatron checkpoint saved at TP=2 and its HF export (llama) of the same weights."""
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from nemo_kd.convert import convert_megatron_to_hf
    from nemo_kd.data.synthetic_task import TaskConfig, write_task
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel.strategy import MegatronStrategy

    d = tmp_path_factory.mktemp("evaluate")
    env = pytest.MonkeyPatch()
    env.setenv("NEMO_KD_CACHE_DIR", str(d / "cache"))
    paths = write_task(str(d / "data"), TaskConfig(sizes={"teacher_train": 1024, "transfer": 8, "validation": 8,
                                                          "test": N_PROMPTS}, seed=3))
    texts = [f"{r['prompt']}\n{r['response']}" for r in map(json.loads, open(paths["teacher_train"]))]
    tok_dir = str(d / "tok")
    tok = train_byte_level_bpe(texts, vocab_size=300, template="chatml", save_dir=tok_dir)
    cfg = OmegaConf.create(dict(
        student=dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                     vocab_size=len(tok), max_position_embeddings=64),
        teacher=dict(mode="none"), kd=dict(kd_loss_weight=0.0, sft_loss_weight=1.0),
        optim=dict(lr=5e-3, warmup_steps=10), parallel=dict(seed=7), max_steps=STEPS,
        data=dict(train_ds=dict(file_path=paths["teacher_train"], tokenizer=tok_dir, prompt_format="chat",
                                max_seq_length=MAX_LEN, micro_batch_size=32, global_batch_size=32, seed=1),
                  validation_ds=None)))
    nemo = str(d / "student.nemo")
    with WorldOfOne(seed=7):
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=STEPS,
                             use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                             limit_val_batches=0, default_root_dir=str(d / "fit"))
        model = GPTDistillationModel(cfg, trainer=trainer)
        trainer.fit(model)
        model.save_to(nemo)
        del model, trainer
    hf_dir = str(d / "hf")
    with WorldOfOne():
        convert_megatron_to_hf(nemo, hf_dir, family="llama", tokenizer_dir=tok_dir, progress=False)
    megatron_dir = str(d / "megatron_tp2")
    run_distributed(_save_tp2, 2, nemo, megatron_dir, tok_dir)
    env.undo()
    return dict(dir=d, nemo=nemo, hf=hf_dir, megatron=megatron_dir, test=paths["test"], tok=tok_dir,
                task=os.path.join(os.path.dirname(paths["test"]), "task.json"))


def _save_tp2(rank, world, nemo, out, tok_dir):
    from nemo_kd.convert import build_and_load, save_megatron_checkpoint
    from nemo_kd.parallel import ParallelConfig, destroy_parallel

    try:
        loaded = build_and_load(nemo, ParallelConfig(tensor_model_parallel_size=2))
        save_megatron_checkpoint(loaded.model_chunks, loaded.arch, out, tokenizer_dir=tok_dir)
    finally:
        destroy_parallel()


def _eval_config(student, out, tp=1):
    return dict(data_path=student["test"], output_dir=out, max_seq_length=MAX_LEN, progress=False,
                students={"nemo": student["nemo"], "megatron_tp2": student["megatron"], "hf": student["hf"]},
                generation=dict(max_new_tokens=MAX_LEN, batch_size=3),
                metrics=dict(checker="cipher", checker_task=student["task"]),
                bootstrap=dict(resamples=500), parallel=dict(tensor_model_parallel_size=tp))


def _evaluate_tp2(rank, world, cfg):
    from nemo_kd.evaluation.cli import run_from_config

    return run_from_config(cfg)


def _rows(out, name):
    with open(os.path.join(out, "samples", f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f]


def _hf_greedy(student, prompts):
    """The independent reference decoder: transformers' own greedy generate on the HF export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student["hf"])
    model = AutoModelForCausalLM.from_pretrained(student["hf"], torch_dtype=torch.float32).eval()
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=MAX_LEN - ids.shape[1], do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_same_scores_nemo_megatron_tp2_hf(student, tmp_path):
    from rouge_score import rouge_scorer

    from nemo_kd.evaluation.cli import run_from_config

    out1, out2 = str(tmp_path / "tp1"), str(tmp_path / "tp2")
    with WorldOfOne():
        res1 = run_from_config(_eval_config(student, out1))
    res2 = run_distributed(_evaluate_tp2, 2, _eval_config(student, out2, tp=2))[0]
    names = ["nemo", "megatron_tp2", "hf"]
    ref_rows = _rows(out1, "nemo")
    assert len(ref_rows) == N_PROMPTS
    responses = [r["response"] for r in ref_rows]
    # an independent decoder agrees with ours, and the student is neither hopeless nor perfect
    assert responses == _hf_greedy(student, [r["prompt"] for r in ref_rows])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    want_rouge = [scorer.score(r["reference"], r["response"])["rougeL"].fmeasure for r in ref_rows]
    want_em = [float(" ".join(r["response"].split()) == r["reference"]) for r in ref_rows]
    assert [r["rouge_l"] for r in ref_rows] == want_rouge and [r["exact_match"] for r in ref_rows] == want_em
    assert 0 < np.mean(want_rouge) < 1, want_rouge
    assert len(set(responses)) >= N_PROMPTS // 2, responses  # not one answer for every prompt
    for out, res in ((out1, res1), (out2, res2)):
        for name in names:
            rows = _rows(out, name)
            assert [(r["response"], r["rouge_l"], r["exact_match"], r["checker"]) for r in rows] == \
                [(r["response"], r["rouge_l"], r["exact_match"], r["checker"]) for r in ref_rows], (out, name)
            s = res["students"][name]["scores"]
            assert s == res1["students"]["nemo"]["scores"], (out, name)
            assert s["rouge_l"]["mean"] == pytest.approx(np.mean(want_rouge))
            assert s["rouge_l"]["low"] <= s["rouge_l"]["mean"] <= s["rouge_l"]["high"]
        # identical students: every paired difference is exactly 0 with a zero-width interval
        assert all(d["mean"] == d["low"] == d["high"] == 0.0 and not d["significant"]
                   for d in res["paired_differences"])
        for f in ("results.json", "results.md", "scores.png", "lengths.png"):
            assert os.path.getsize(os.path.join(out, f)) > 0, f
        with open(os.path.join(out, "results.json")) as f:
            assert json.load(f)["students"]["hf"]["scores"] == res1["students"]["nemo"]["scores"]
        with open(os.path.join(out, "scores.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert res2["settings"]["tensor_model_parallel_size"] == 2
    md = open(os.path.join(out1, "results.md")).read()
    assert "| nemo | 8 | " in md and "ROUGE-L ×100" in md and "megatron_tp2 − hf" in md


@pytest.mark.slow
def test_evaluate_heldout_against_a_live_teacher(student, tmp_path):
    """``heldout`` with the student itself as the live teacher: both KLs are 0 and the argmaxes agree everywhere;
    the CE is the references' mean NLL scored independently (a plain forward and log-softmax here)."""
    from transformers import AutoTokenizer

    from nemo_kd.convert import build_and_load
    from nemo_kd.data.records import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.evaluation.cli import run_from_config

    cfg = dict(_eval_config(student, str(tmp_path / "out")), students={"nemo": student["nemo"], "hf": student["hf"]},
               heldout=dict(enabled=True, teacher_path=student["nemo"], batch_size=3), plots=False)
    with WorldOfOne():
        res = run_from_config(cfg)
        tok = AutoTokenizer.from_pretrained(student["tok"])
        ctok = ConversationTokenizer(tok, "chat", MAX_LEN, "truncate")
        samples = [ctok(list(r.messages)) for r in read_records(student["test"])]
        loaded = build_and_load(student["nemo"])
        model, vocab = loaded.model_chunks[0].eval(), loaded.arch.model.vocab_size
        total, count, per_sample = 0.0, 0, []
        for smp in samples:  # teacher-forced, log-softmax over the real vocabulary (Megatron's padding rows cut)
            ids = torch.tensor([smp.input_ids])
            with torch.no_grad():
                logits = model(ids, torch.arange(ids.shape[1])[None], None).double()
                assert logits.shape[-1] > vocab  # the padding is there to be cut
                logp = torch.log_softmax(logits[..., :vocab], -1)[0]
            nll_i = [-float(logp[j - 1, smp.input_ids[j]]) for j, m in enumerate(smp.loss_mask) if m]
            total, count = total + sum(nll_i), count + len(nll_i)
            per_sample.append(sum(nll_i) / len(nll_i))
    nll = total / count
    h = res["students"]["nemo"]["heldout"]
    assert h["heldout_samples"] == N_PROMPTS
    assert abs(h["kl"]) < 1e-6 and abs(h["reverse_kl"]) < 1e-6 and h["token_agreement"] == 1.0, h
    assert h["loss"] == pytest.approx(nll, rel=1e-6), (h["loss"], nll)
    # intervals over samples: the token-weighted mean is the point value, the bounds lie between the samples'
    # own per-token NLLs (scored independently above) and around the mean; KL 0 on every sample: [0, 0]
    ce = h["intervals"]["loss"]
    assert ce["mean"] == pytest.approx(nll, rel=1e-6) and ce["n"] == N_PROMPTS
    assert min(per_sample) - 1e-9 <= ce["low"] < nll < ce["high"] <= max(per_sample) + 1e-9, (ce, per_sample)
    assert abs(h["intervals"]["kl"]["low"]) < 1e-6 and abs(h["intervals"]["kl"]["high"]) < 1e-6
    # The HF export carries the real vocabulary only; loaded back, Megatron's padding rows are new (logit 0,
    # where training pushed the .nemo's down). The objective masks padded columns, so the same weights score the
    # same: KL 0 against the .nemo teacher and the same CE.
    hf = res["students"]["hf"]["heldout"]
    assert abs(hf["kl"]) < 1e-6 and abs(hf["reverse_kl"]) < 1e-6 and hf["token_agreement"] == 1.0, hf
    assert hf["loss"] == pytest.approx(nll, rel=1e-6), (hf["loss"], nll)
    md = open(tmp_path / "out" / "results.md").read()
    assert "KL(t‖s)" in md and "agreement" in md
    assert f"{ce['mean']:.4f} [{ce['low']:.4f}, {ce['high']:.4f}]" in md  # the CE column with its interval
