"""The dual preference data pipeline end to end on tiny random Megatron models: teacher positives vs
student negatives, rule-based and teacher-judged scores, the pair-wise filter, resumable stages, and
the pairs file read back as preference records."""

import json
import math
import os

import pytest
import torch

MAX_LEN = 48


def _arch(vocab, hidden):
    return dict(num_layers=1, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=2 * hidden,
                vocab_size=vocab, max_position_embeddings=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from tests.dist_utils import WorldOfOne
    from nemo_kd.teacher.teachers import save_full_checkpoint

    d = tmp_path_factory.mktemp("pref")
    tok = train_byte_level_bpe([f"encode: {w} answer {w[::-1]}" for w in ("abc", "def", "ghi", "jkl")] * 20,
                               vocab_size=280, save_dir=str(d / "tok"))
    with WorldOfOne():
        for name, hidden, scale in (("teacher", 32, 30.0), ("student", 16, 3.0)):
            cfg = GPTModelConfig(**_arch(len(tok), hidden))
            full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
            full["output_layer.weight"] = full["output_layer.weight"] * scale  # a peaked teacher, a loose student
            save_full_checkpoint(str(d / name), full, cfg)
    return dict(dir=d, tok=tok, tok_dir=str(d / "tok"))


def _cfg(world, out, prompts, **over):
    from nemo_kd.generation.preference_pipeline import PreferencePipelineConfig

    d = dict(prompts=prompts, output_dir=str(out), max_seq_length=MAX_LEN, batch_size=8, progress=False,
             teacher=dict(checkpoint=str(world["dir"] / "teacher"), tokenizer=world["tok_dir"], num_samples=1,
                          sampling=dict(temperature=0.0, max_new_tokens=6)),
             student=dict(checkpoint=str(world["dir"] / "student"), tokenizer=world["tok_dir"], num_samples=3,
                          sampling=dict(temperature=1.0, max_new_tokens=6, seed=3)),
             response_filter=dict(require_finished=False, max_repeated_ngram_fraction=None,
                                  max_consecutive_repeats=None, forbid_patterns=[], min_chars=0),
             pair_filter=dict(min_margin=1.0))
    d.update(over)
    return PreferencePipelineConfig.from_dict(d)


def _teacher_greedy(world, prompts):
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.generation.sampling import SamplingConfig, generate
    from nemo_kd.teacher.teachers import load_megatron_teacher

    model, arch = load_megatron_teacher(str(world["dir"] / "teacher"), 0, 1, 0, 1)
    ct = ConversationTokenizer(world["tok"], "chat", MAX_LEN)
    ids = [world["tok"](ct.render_prompt([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
           for p in prompts]
    gens = generate(model.eval(), ids, SamplingConfig(temperature=0.0, max_new_tokens=6), eos_id=world["tok"].eos_token_id,
                    pad_id=world["tok"].pad_token_id, vocab_size=arch.vocab_size, tokenizer=world["tok"])
    return model, ct, [g.text for g in gens]


def test_reference_scored_pairs_resume_and_read_back(world, tmp_path):
    from nemo_kd.data import read_records
    from nemo_kd.generation.preference_pipeline import run
    from tests.dist_utils import WorldOfOne

    texts = [f"encode: {w}" for w in ("abc", "def", "ghi", "jkl", "cab", "fed")]
    with WorldOfOne():
        _, _, greedy = _teacher_greedy(world, texts)
    # the reference of even prompts is what the (greedy) teacher answers: only those can form a pair
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t, "reference": greedy[i] if i % 2 == 0 else "zzz"})
                               + "\n" for i, t in enumerate(texts)))
    with WorldOfOne():
        report = run(_cfg(world, tmp_path / "out", str(prompts)))
    pairs = [json.loads(line) for line in open(tmp_path / "out" / "pairs.jsonl")]
    student_rows = [json.loads(line) for line in open(tmp_path / "out" / "student_responses.jsonl")]
    assert len(student_rows) == 3 * len(texts)
    wrong = {r["prompt_index"] for r in student_rows if r["response"] != greedy[r["prompt_index"]]}
    expected = [i for i in range(0, len(texts), 2) if i in wrong]  # teacher right, some student sample wrong
    assert [p["id"] for p in pairs] == [f"p{i}" for i in expected] and report["pairs"] == len(expected) >= 2
    for p in pairs:
        i = int(p["id"][1:])
        assert p["chosen"] == greedy[i] and p["chosen_score"] == 1.0 and p["rejected_score"] == 0.0
        first_wrong = next(r for r in student_rows if r["prompt_index"] == i and r["response"] != greedy[i])
        assert p["rejected"] == first_wrong["response"]  # all negatives score 0: the first in order
    assert report["mean_score_teacher"] == pytest.approx(0.5)
    # stages resume: a rerun reads the outputs back; other settings are refused
    mtime = os.path.getmtime(tmp_path / "out" / "student_responses.jsonl")
    with WorldOfOne():
        assert run(_cfg(world, tmp_path / "out", str(prompts)))["pairs"] == report["pairs"]
        assert os.path.getmtime(tmp_path / "out" / "student_responses.jsonl") == mtime
        with pytest.raises(FileExistsError, match="other settings"):
            run(_cfg(world, tmp_path / "out", str(prompts),
                     student=dict(checkpoint=str(world["dir"] / "student"), tokenizer=world["tok_dir"],
                                  num_samples=2, sampling=dict(temperature=1.0, max_new_tokens=6))))
    recs = read_records(str(tmp_path / "out" / "pairs.jsonl"))
    assert recs.is_preference and recs.num_pairs == len(pairs)
    assert recs[0].completion_text == pairs[0]["chosen"] and recs[1].completion_text == pairs[0]["rejected"]


def test_teacher_judge_scores_are_its_mean_token_logprob(world, tmp_path):
    from nemo_kd.generation.preference_pipeline import run
    from tests.dist_utils import WorldOfOne

    texts = ["encode: abc", "encode: ghi"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    with WorldOfOne():
        report = run(_cfg(world, tmp_path / "out", str(prompts), score="teacher_logprob",
                          pair_filter=dict(min_margin=0.5)))
        model, ct, _ = _teacher_greedy(world, texts)
        judged = [json.loads(line) for line in open(tmp_path / "out" / "student_responses_judged.jsonl")]
        for r in judged:  # float64 hand computation of the teacher's mean log-prob of the response tokens
            tok = ct(r["messages"] + [{"role": "assistant", "content": r["response"]}])
            ids = torch.tensor([tok.input_ids])
            with torch.no_grad():
                logits = model(ids, torch.arange(ids.shape[1])[None], None).double()[0, :, :len(world["tok"])]
            lp = torch.log_softmax(logits, -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
            content = [j for j in range(tok.num_prompt_tokens, len(tok.input_ids))
                       if tok.token_char_spans[j][0] < tok.completion_char_start + len(r["response"])]
            want = lp[[j - 1 for j in content]].mean().item() if r["response"] else 0.0
            assert r["teacher_mean_logprob"] == pytest.approx(want, abs=1e-4)
    pairs = [json.loads(line) for line in open(tmp_path / "out" / "pairs.jsonl")]
    assert report["pairs"] == len(pairs)
    for p in pairs:
        assert p["chosen_score"] - p["rejected_score"] >= 0.5


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_sampled_rows_token_offsets_tile_the_response(tmp_path, kind):
    """Each sampled token's character span: the spans tile the response in order (SentencePiece's
    word-start spaces, byte-fallback pieces, random bytes that never complete a character)."""
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.generation.responses import Prompt, sample_responses
    from nemo_kd.generation.sampling import SamplingConfig

    texts = ["encode: abc déf", "the answer is ünïcode 42.", "x y z! 3.14"] * 20
    if kind == "bpe":
        from nemo_kd.data.tokenizer_builder import train_byte_level_bpe

        tok = train_byte_level_bpe(texts, vocab_size=290, save_dir=str(tmp_path / "tok"))
    else:
        from nemo_kd.data.sentencepiece_builder import train_sentencepiece_unigram

        tok = train_sentencepiece_unigram(texts, vocab_size=320, save_dir=str(tmp_path / "tok"))

    class Uniform(torch.nn.Module):  # every token equally likely: random text, multi-byte pieces included
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, tokens, position_ids, mask):
            return torch.zeros(*tokens.shape, len(tok)) + self.w

    ct = ConversationTokenizer(tok, "chat", 64)
    prompts = [Prompt(i, i, ({"role": "user", "content": "abc"},)) for i in range(6)]
    rows = sample_responses(Uniform(), ct, prompts, SamplingConfig(temperature=1.0, max_new_tokens=12, seed=4),
                            num_samples=2, vocab_size=len(tok))
    checked = 0
    for r in rows:
        spans, text = r["token_offsets"], r["response"]
        assert len(spans) == r["num_tokens"] == len(r["logprobs"])
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        assert spans[-1][1] == len(text) if spans else text == ""
        checked += sum(1 for s in spans if s[1] > s[0])
    assert checked > 50
    # a uniform model: every token's log-prob at temperature 1 is −log(V)
    assert all(x == pytest.approx(-math.log(len(tok)), abs=1e-5) for r in rows for x in r["logprobs"])


def _dp_run(rank, world_size, world, prompts, out):
    from nemo_kd.generation.preference_pipeline import run
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    initialize_parallel(ParallelConfig(seed=5))
    try:
        report = run(_cfg(world, out, prompts, score="teacher_logprob", pair_filter=dict(min_margin=0.2)))
    finally:
        destroy_parallel()
    return report


@pytest.mark.distributed
def test_data_parallel_pipeline_equals_one_process(world, tmp_path):
    """Two data-parallel ranks (each samples and judges its block of prompts) write the same responses,
    judgements and pairs as one process: the sampler's draws depend on the prompt index only."""
    from nemo_kd.generation.preference_pipeline import run
    from tests.dist_utils import WorldOfOne, run_distributed

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"encode: {w}"}) + "\n" for w in ("abc", "def", "ghi", "jkl", "cab")))
    with WorldOfOne():
        one = run(_cfg(world, tmp_path / "one", str(prompts), score="teacher_logprob", pair_filter=dict(min_margin=0.2)))
    reports = run_distributed(_dp_run, 2, world, str(prompts), str(tmp_path / "two"))
    assert reports[1] is None and reports[0]["pairs"] == one["pairs"]
    for name in ("student_responses.jsonl", "teacher_responses.jsonl", "student_responses_judged.jsonl", "pairs.jsonl"):
        a = [json.loads(line) for line in open(tmp_path / "one" / name)]
        b = [json.loads(line) for line in open(tmp_path / "two" / name)]
        assert len(a) == len(b) > 0, name
        for x, y in zip(a, b):
            for key in ("prompt_index", "sample", "response", "chosen", "rejected"):
                assert x.get(key) == y.get(key), (name, key)
            for key in ("teacher_mean_logprob", "chosen_score", "rejected_score"):
                if key in x:
                    assert x[key] == pytest.approx(y[key], abs=1e-5), (name, key)


def test_hugging_face_teacher_backend(world, tmp_path):
    """backend: hf — a transformers teacher (never converted) samples the positives and judges the
    student's samples; its judgement equals a float64 forward of the HF model itself."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.generation.preference_pipeline import run
    from tests.dist_utils import WorldOfOne

    torch.manual_seed(0)
    tok = world["tok"]
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 24, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64))
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)
    hf.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"encode: {w}"}) + "\n" for w in ("abc", "ghi", "jkl")))
    with WorldOfOne():
        run(_cfg(world, tmp_path / "out", str(prompts), score="teacher_logprob", pair_filter=dict(min_margin=0.1),
                 teacher=dict(checkpoint=str(tmp_path / "hf"), backend="hf", num_samples=2,
                              sampling=dict(temperature=1.0, max_new_tokens=6, seed=1))))
    teacher_rows = [json.loads(line) for line in open(tmp_path / "out" / "teacher_responses.jsonl")]
    assert len(teacher_rows) == 6
    judged = [json.loads(line) for line in open(tmp_path / "out" / "student_responses_judged.jsonl")]
    ct = ConversationTokenizer(tok, "chat", MAX_LEN)
    hf.eval()
    for r in judged[:4]:
        t = ct(r["messages"] + [{"role": "assistant", "content": r["response"]}])
        ids = torch.tensor([t.input_ids])
        with torch.no_grad():
            logits = hf.double()(input_ids=ids).logits[0, :, :len(tok)]  # rows past the tokenizer are no tokens
        lp = torch.log_softmax(logits, -1)[:-1].gather(-1, ids[0, 1:, None])[:, 0]
        content = [j for j in range(t.num_prompt_tokens, len(t.input_ids))
                   if t.token_char_spans[j][0] < t.completion_char_start + len(r["response"])]
        want = lp[[j - 1 for j in content]].mean().item() if content else 0.0
        assert r["teacher_mean_logprob"] == pytest.approx(want, abs=1e-4)
