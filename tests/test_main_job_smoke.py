"""The embedded main job end to end (tiny ``--smoke`` configuration), plus greedy decoding
and exact match on a hand-made example."""

import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("main_job") / "run"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "main_job.py"), "--smoke", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_smoke_pipeline_artefacts_and_table(smoke_run):
    out, stdout = smoke_run
    for rel in ("data/teacher_train.jsonl", "data/transfer.jsonl", "data/test.jsonl", "data/task.json",
                "tokenizer/tokenizer.json", "teacher.nemo", "student_KD_SFT.nemo", "student_SFT_only.nemo",
                "store", "store_test", "logs/student_KD_SFT/run",
                "results.md", "results.json", "loss_curves.png", "eval/results.md", "eval/results.json",
                "eval/scores.png", "eval/lengths.png", "eval/samples/student_KD_SFT.jsonl"):
        assert os.path.exists(out / rel), rel
    assert os.path.getsize(out / "loss_curves.png") > 1000
    md = (out / "results.md").read_text()
    for row in ("| teacher |", "| student KD+SFT |", "| student SFT only |"):
        assert row in md and row in stdout, row
    res = json.loads((out / "results.json").read_text())
    for name in ("teacher", "student KD+SFT", "student SFT only"):
        r = res["results"][name]
        for key in ("loss", "kl", "reverse_kl", "token_agreement", "exact_match", "rouge_l"):
            assert r[key] == r[key], (name, key)  # not NaN
        assert 0.0 <= r["exact_match"] <= 1.0
        assert r["reverse_kl"] >= -1e-6  # a KL (the teacher against its own store: 0 up to rounding)
        # every score has a bootstrap interval around its point estimate, and the mean is the samples' mean
        samples = [json.loads(line) for line in (out / "eval" / "samples" / (name.replace(" ", "_").replace("+", "_")
                                                                            + ".jsonl")).open()]
        assert len(samples) == r["evaluation"]["num_samples"] == 32
        for score in ("rouge_l", "exact_match", "checker"):
            iv = r["evaluation"]["scores"][score]
            assert iv["low"] <= iv["mean"] <= iv["high"] and iv["confidence"] == 0.95, (name, score, iv)
            assert iv["mean"] == pytest.approx(sum(x[score] for x in samples) / len(samples)), (name, score)
        assert r[score] == r["evaluation"]["scores"][score]["mean"]
        for subset in ("confused", "other"):
            iv = r["subsets"][subset]["scores"]["exact_match"]
            assert iv["low"] <= iv["mean"] <= iv["high"], (name, subset, iv)
        assert r["subsets"]["confused"]["num_samples"] + r["subsets"]["other"]["num_samples"] == 32
    # the paired KD+SFT − SFT only differences: the difference of the two means, inside its interval
    ev = json.loads((out / "eval" / "results.json").read_text())
    diffs = {d["score"]: d for d in ev["paired_differences"]}
    assert set(diffs) == {"rouge_l", "exact_match", "checker"}
    for score, d in diffs.items():
        assert (d["a"], d["b"]) == ("student KD+SFT", "student SFT only")
        kd_mean = res["results"]["student KD+SFT"]["evaluation"]["scores"][score]["mean"]
        sft_mean = res["results"]["student SFT only"]["evaluation"]["scores"][score]["mean"]
        assert d["mean"] == pytest.approx(kd_mean - sft_mean, abs=1e-12)
        assert d["low"] <= d["mean"] <= d["high"]
        assert d["significant"] == (not d["low"] <= 0.0 <= d["high"])
    assert "KD+SFT − SFT only on the same prompts (paired 95% bootstrap intervals)" in md
    assert "Paired differences a − b" in md
    kd = res["histories"]["student KD+SFT"]
    assert kd["loss"][-1] < 0.8 * kd["loss"][0], (kd["loss"][0], kd["loss"][-1])
    assert kd["val_kl"][-1] < kd["val_kl"][0]


def test_task_is_deterministic_and_splits_disjoint(tmp_path):
    from nemo_kd.data.synthetic_task import CipherTask, TaskConfig, write_task

    cfg = TaskConfig(sizes={"teacher_train": 50, "transfer": 40, "validation": 10, "test": 10})
    a, b = write_task(str(tmp_path / "a"), cfg), write_task(str(tmp_path / "b"), cfg)
    for split in a:
        assert open(a[split]).read() == open(b[split]).read()
    rows = {s: [json.loads(line) for line in open(p)] for s, p in a.items()}
    prompts = [r["prompt"] for s in rows for r in rows[s]]
    assert len(prompts) == len(set(prompts))
    task = CipherTask(cfg)
    assert all(task.answer(r["prompt"]) == r["response"] for s in ("teacher_train", "test") for r in rows[s])
    noisy = sum(task.answer(r["prompt"]) != r["response"] for r in rows["transfer"])
    assert noisy > 0  # the annotator's confusions show up in the transfer set


class _ScriptedModel(torch.nn.Module):
    """Megatron-like forward(tokens, position_ids, mask) -> [b, s, V_padded] logits that continue each
    known prompt with a scripted answer; the padding rows of the vocabulary carry the largest logit."""

    def __init__(self, scripts, padded_vocab):
        super().__init__()
        self.scripts, self.padded_vocab = scripts, padded_vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens, position_ids, mask):
        b, s = tokens.shape
        logits = torch.zeros(b, s, self.padded_vocab)
        logits[..., -1] = 100.0  # a padding row: must never be generated
        for row in range(b):
            for prompt, answer in self.scripts:
                p = len(prompt)
                if tokens[row, :p].tolist() == prompt:
                    for t in range(p - 1, s):
                        logits[row, t, answer[min(t - p + 1, len(answer) - 1)]] = 50.0
        return logits


def test_greedy_generate_and_exact_match_on_hand_example():
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.evaluation import exact_match, greedy_generate
    from nemo_kd.evaluation.generate import prompt_ids

    tok = train_byte_level_bpe([f"encode: a b c\nq r s {i}" for i in range(20)] + ["hello world"], vocab_size=280)
    eos = tok.eos_token_id
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]
    # Different prompt lengths in one batch (right padding); answers of different lengths, EOS-terminated.
    p1, p2 = "encode: a b c", "encode: a"
    scripts = [(prompt_ids(tok, p1), enc("q r s") + [eos]), (prompt_ids(tok, p2), enc("q") + [eos])]
    model = _ScriptedModel(scripts, padded_vocab=len(tok) + 20)
    preds = greedy_generate(model, tok, [p1, p2, p1], max_new_tokens=10, batch_size=2)
    assert preds == ["q r s", "q", "q r s"]
    assert exact_match(preds, ["q r s", "q", "q r t"]) == pytest.approx(2 / 3)
    assert exact_match([" q  r s "], ["q r s"]) == 1.0
    # Without an EOS within the budget, decoding stops at max_new_tokens.
    loop = _ScriptedModel([(prompt_ids(tok, p2), enc("q") * 50)], padded_vocab=len(tok) + 20)
    (out,) = greedy_generate(loop, tok, [p2], max_new_tokens=4)
    assert out == "q" * 4


def test_students_start_from_the_same_weights(smoke_run):
    """Both students begin at the same point: their held-out metrics before the first step agree."""
    out, _ = smoke_run
    res = json.loads((out / "results.json").read_text())
    kd, sft = res["histories"]["student KD+SFT"], res["histories"]["student SFT only"]
    assert kd["val_step"][0] == sft["val_step"][0] == 0
    assert kd["val_loss"][0] == pytest.approx(sft["val_loss"][0], rel=1e-6)
    assert kd["val_kl"][0] == pytest.approx(sft["val_kl"][0], rel=1e-6)
