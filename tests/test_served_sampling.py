"""Served teachers, sampling (issue 15): nemo-kd-serve-teacher's /v1/completions sampling, the client's sampling
call in both dialects, and the pipelines' teacher.type=served, over real loopback HTTP.

References: the in-process sampler (same seeds: the draws must be identical), an independent teacher-forced
forward in float64 (the served log-probs and top-k), vLLM's own protocol models (tests/vllm_protocol.py), and
the in-process pipelines' outputs (teacher.type=served must write the same rows).
"""

import asyncio
import json
import math
import os
import threading

import pytest
import torch
from aiohttp import web

MAX_LEN, MAX_NEW, K = 64, 12, 4
CORPUS = ["The cat sat. A dog ran!\nIs it red? Yes. No way.\nWe add 2 and 3. So 5!", "x = 1. y = 2? Done.\nOk."] * 20
PROMPTS = ["Is it red?", "The cat sat.", "We add 2 and 3."]


def _bias(tok):
    """Readable tokens up, sentence ends more (short finished responses), the rest down."""
    b = torch.full((len(tok),), -2.0)
    for i in range(len(tok)):
        s = tok.decode([i])
        if s and not s.startswith("<") and all(c.isascii() and (c.isprintable() or c == "\n") for c in s):
            b[i] = 2.0 if s.rstrip(" ")[-1:] in ".!?\n" else 1.0
    b[tok.eos_token_id] = 2.2
    return b


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Megatron teacher and student (own tokenizers), the teacher served on loopback with its tokenizer."""
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.server import ServeConfig, serve_in_background
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint
    from tests.dist_utils import WorldOfOne

    d = tmp_path_factory.mktemp("served_sampling")
    toks = {"teacher": train_byte_level_bpe(CORPUS, vocab_size=300, save_dir=str(d / "tok_teacher")),
            "student": train_byte_level_bpe(CORPUS, vocab_size=270, save_dir=str(d / "tok_student"))}
    torch.manual_seed(0)
    w = WorldOfOne()
    w.__enter__()
    # the teacher has 2 layers so that it can be served at PP=2 (the sampling refusal there)
    for name, layers, hidden, scale in (("teacher", 2, 32, 30.0), ("student", 1, 16, 6.0)):
        tok = toks[name]
        cfg = GPTModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=2 * hidden,
                             vocab_size=len(tok), max_position_embeddings=MAX_LEN)
        full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
        full["embedding.word_embeddings.weight"][:, 0] = 0.1
        out = full["output_layer.weight"] * scale
        out[:len(tok), 0] = _bias(tok)
        full["output_layer.weight"] = out
        save_full_checkpoint(str(d / name), full, cfg)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": t, "reference": "Yes."}) + "\n"
                               for i, t in enumerate(PROMPTS)))
    teacher = MegatronTeacher(str(d / "teacher"))
    server = serve_in_background(teacher, ServeConfig(port=0, max_logprobs=K, model_id="tiny-teacher"),
                                 tokenizer=toks["teacher"])
    url = server.__enter__()
    yield dict(dir=d, tok=toks, prompts=str(prompts), teacher=teacher, url=url, server=server.server)
    server.__exit__(None, None, None)
    w.__exit__(None, None, None)


def _prompt_ids(world, texts):
    from nemo_kd.data.tokenization import ConversationTokenizer

    tok = world["tok"]["teacher"]
    ct = ConversationTokenizer(tok, "chat", MAX_LEN)
    return [list(tok(ct.render_prompt([{"role": "user", "content": t}]), add_special_tokens=False)["input_ids"])
            for t in texts]


def _in_process(world, prompts, cfg, offset=0):
    from nemo_kd.generation.sampling import generate

    tok = world["tok"]["teacher"]
    return generate(world["teacher"].model, prompts, cfg, eos_id=tok.eos_token_id, pad_id=0,
                    vocab_size=len(tok), max_length=MAX_LEN, sample_offset=offset)


def _post(world, body):
    import requests

    return requests.post(world["url"] + "/v1/completions", json=body, timeout=60)


def _float64_logprobs(world, seq):
    """log softmax of an independent full forward (no KV cache, no server), in float64: [len(seq), V]."""
    model = world["teacher"].model
    tokens = torch.tensor([seq])
    with torch.no_grad():
        logits = model(tokens, torch.arange(len(seq))[None], None)[0, :, :len(world["tok"]["teacher"])]
    return torch.log_softmax(logits.double(), -1)


# ----------------------------------------------------------------------------- the server


def test_server_sampling_equals_in_process_draws_and_a_float64_forward(world):
    from nemo_kd.generation.sampling import SamplingConfig
    from tests.vllm_protocol import validate

    prompts = _prompt_ids(world, PROMPTS[:2])
    eos = world["tok"]["teacher"].eos_token_id
    body = {"model": "tiny-teacher", "prompt": prompts, "n": 3, "temperature": 0.9, "top_p": 0.95,
            "max_tokens": MAX_NEW, "seed": 11, "logprobs": K, "return_token_ids": True,
            "return_tokens_as_token_ids": True}
    r = _post(world, body)
    assert r.status_code == 200, r.text
    out = r.json()
    validate([{"kind": "completion", "body": out}])  # vLLM's own CompletionResponse accepts it
    ref = _in_process(world, [p for p in prompts for _ in range(3)],
                      SamplingConfig(temperature=0.9, top_p=0.95, max_new_tokens=MAX_NEW, seed=11))
    assert [c["index"] for c in out["choices"]] == list(range(6))
    assert any(g.finished for g in ref) and len({tuple(g.token_ids) for g in ref}) > 2  # stops and varies
    generated = 0
    for ch, g, p in zip(out["choices"], ref, [p for p in prompts for _ in range(3)]):
        tokens = g.token_ids + ([eos] if g.finished else [])
        assert ch["token_ids"] == tokens and ch["prompt_token_ids"] == p  # the same draw, the end token kept
        assert ch["finish_reason"] == ("stop" if g.finished else "length") and ch["stop_reason"] is None
        assert ch["text"] == world["tok"]["teacher"].decode(tokens, skip_special_tokens=True)
        lp = ch["logprobs"]
        assert lp["tokens"] == [f"token_id:{t}" for t in tokens]
        ref_lp = _float64_logprobs(world, p + tokens)
        for j, t in enumerate(tokens):
            row = ref_lp[len(p) - 1 + j]
            assert lp["token_logprobs"][j] == pytest.approx(float(row[t]), abs=2e-5)  # raw, temperature 1
            top = row.topk(K)
            entry = lp["top_logprobs"][j]
            want = {f"token_id:{i}": float(v) for i, v in zip(top.indices.tolist(), top.values.tolist())}
            want.setdefault(f"token_id:{t}", float(row[t]))  # vLLM's k + 1-th entry: the sampled token
            assert set(entry) == set(want)
            for key, v in want.items():
                assert entry[key] == pytest.approx(v, abs=2e-5)
        generated += len(tokens)
    assert out["usage"] == {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": generated,
                            "total_tokens": sum(map(len, prompts)) + generated}
    # reproducible by construction: prompt 1 alone, at its sample offset, draws the same tokens
    alone = _post(world, dict(body, prompt=prompts[1], nemo_kd_sample_offset=3, logprobs=None)).json()
    assert [c["token_ids"] for c in alone["choices"]] == [c["token_ids"] for c in out["choices"][3:]]
    assert alone["choices"][0]["logprobs"] is None


def test_server_stop_tokens_greedy_and_refusals(world):
    from nemo_kd.generation.sampling import SamplingConfig

    p = _prompt_ids(world, PROMPTS[2:])[0]
    greedy = _in_process(world, [p], SamplingConfig(temperature=0.0, max_new_tokens=MAX_NEW, seed=0))[0]
    got = _post(world, {"prompt": p, "temperature": 0, "max_tokens": MAX_NEW, "return_token_ids": True,
                        "ignore_eos": True}).json()["choices"][0]
    assert len(got["token_ids"]) == MAX_NEW and got["finish_reason"] == "length"
    n_eos = len(greedy.token_ids)
    assert got["token_ids"][:n_eos] == greedy.token_ids
    stop = got["token_ids"][2]  # a stop token id cuts the completion after it, named in stop_reason
    cut = _post(world, {"prompt": p, "temperature": 0, "max_tokens": MAX_NEW, "return_token_ids": True,
                        "ignore_eos": True, "stop_token_ids": [stop], "logprobs": 0}).json()["choices"][0]
    first = got["token_ids"].index(stop)
    assert cut["token_ids"] == got["token_ids"][:first + 1] and cut["finish_reason"] == "stop"
    assert cut["stop_reason"] == stop and len(cut["logprobs"]["token_logprobs"]) == first + 1
    assert list(cut["logprobs"]["top_logprobs"][0].values()) == [cut["logprobs"]["token_logprobs"][0]]
    for body, message in [({"prompt": p, "max_tokens": 3, "top_k": -2}, "top_k must be"),
                          ({"prompt": p, "max_tokens": 3, "seed": "x"}, "seed must be an integer"),
                          ({"prompt": p, "max_tokens": 3, "prompt_logprobs": 1}, "prompt_logprobs together"),
                          ({"prompt": p, "max_tokens": 3, "stop_token_ids": [999]}, "stop_token_ids must be")]:
        r = _post(world, body)
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert r.json()["error"]["param"] == message.split()[0]


# ----------------------------------------------------------------------------- the client


def _client(url, **kw):
    from nemo_kd.teacher.served import ServedTeacher, ServedTeacherConfig

    return ServedTeacher(ServedTeacherConfig(url=url, concurrency=4, max_retries=2, backoff_initial_s=0.01,
                                             backoff_max_s=0.02, request_timeout_s=30, **kw), tokenizer_size=300)


def test_client_samples_both_dialects_and_refuses_bad_answers(world):
    """vLLM dialect against the nemo_kd server; SGLang's /generate shape from a canned server built from the same
    draws; NaN / positive log-probs, other echoed prompt ids and a missing choice are refused naming the sample."""
    from nemo_kd.teacher.served import ServedTeacherError
    from nemo_kd.losses.token_stats import NonFiniteLogitsError

    p = _prompt_ids(world, PROMPTS[:1])[0]
    eos = world["tok"]["teacher"].eos_token_id
    teacher = _client(world["url"])
    try:
        got = teacher._loop.run(teacher.client.sample(p, 3, temperature=0.9, max_tokens=MAX_NEW, seed=4,
                                                      stop_token_ids=[eos], sample_offset=6, where="sample 2"))
    finally:
        teacher.close()
    raw = _post(world, {"prompt": p, "n": 3, "temperature": 0.9, "max_tokens": MAX_NEW, "seed": 4, "logprobs": 0,
                        "return_token_ids": True, "nemo_kd_sample_offset": 6, "stop_token_ids": [eos]}).json()
    for s, ch in zip(got, raw["choices"]):
        finished = ch["finish_reason"] == "stop"
        assert s.finished == finished and s.token_ids == ch["token_ids"][:len(ch["token_ids"]) - finished]
        assert s.logprobs == ch["logprobs"]["token_logprobs"]

    state = {"mode": "ok"}

    def sglang_body():
        items = []
        for ch in raw["choices"]:
            lps = ch["logprobs"]["token_logprobs"]
            items.append({"text": ch["text"], "output_ids": list(ch["token_ids"]),
                          "meta_info": {"prompt_tokens": len(p), "completion_tokens": len(ch["token_ids"]),
                                        "finish_reason": ({"type": "stop", "matched": eos} if ch["finish_reason"]
                                                          == "stop" else {"type": "length", "length": MAX_NEW}),
                                        "output_token_logprobs": [[lp, t, None] for lp, t in
                                                                  zip(lps, ch["token_ids"])]}})
        if state["mode"] == "nan":
            items[1]["meta_info"]["output_token_logprobs"][0][0] = float("nan")
        return items

    async def model_info(request):
        return web.json_response({"model_path": "tiny-teacher", "tokenizer_path": "tok"})

    async def generate(request):
        body = await request.json()
        assert body["sampling_params"]["n"] == 3 and body["sampling_params"]["sampling_seed"] == 4
        assert body["input_ids"] == p and body["return_logprob"] is True
        return web.Response(text=json.dumps(sglang_body()), content_type="application/json")

    with _AppServer({"/get_model_info": ("GET", model_info), "/generate": ("POST", generate)}) as url:
        teacher = _client(url, dialect="auto")
        try:
            assert teacher.client.dialect == "sglang"
            sg = teacher._loop.run(teacher.client.sample(p, 3, temperature=0.9, max_tokens=MAX_NEW, seed=4,
                                                         stop_token_ids=[eos], where="sample 2"))
            assert [(s.token_ids, s.finished, s.logprobs) for s in sg] == [(s.token_ids, s.finished, s.logprobs)
                                                                           for s in got]
            state["mode"] = "nan"
            with pytest.raises(NonFiniteLogitsError, match="sample 2: POST .*/generate choice 1.*generated token 0"):
                teacher._loop.run(teacher.client.sample(p, 3, temperature=0.9, max_tokens=MAX_NEW, seed=4,
                                                        stop_token_ids=[eos], where="sample 2"))
        finally:
            teacher.close()

    from nemo_kd.teacher.served import parse_vllm_sampled

    def broken(change):
        body = json.loads(json.dumps(raw))
        change(body)
        return body

    cases = [(lambda b: b["choices"][2]["logprobs"]["token_logprobs"].__setitem__(1, 0.5),
              ServedTeacherError, "sample 9 choice 2: generated token 1 is a positive log-prob"),
             (lambda b: b["choices"][0].__setitem__("prompt_token_ids", p[:-1] + [p[-1] + 1]),
              ServedTeacherError, "sample 9 choice 0: the server echoed other prompt token ids"),
             (lambda b: b["choices"].pop(), ServedTeacherError, "sample 9: 2 choices for n=3"),
             (lambda b: b["choices"][1]["logprobs"]["token_logprobs"].pop(), ServedTeacherError,
              "sample 9 choice 1: .* token_logprobs for .* generated tokens")]
    for change, err, message in cases:
        with pytest.raises(err, match=message):
            parse_vllm_sampled(broken(change), p, 3, [eos], "sample 9", 300)


class _AppServer:
    """A canned aiohttp app on a loopback port, on its own thread."""

    def __init__(self, routes):
        self.routes = routes

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start():
            app = web.Application()
            for path, (method, handler) in self.routes.items():
                app.router.add_route(method, path, handler)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner, site._server.sockets[0].getsockname()[1]

        self.runner, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


# ----------------------------------------------------------------------------- the pipelines


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _assert_rows_equal(served, local):
    assert len(served) == len(local)
    for a, b in zip(served, local):
        assert {k: v for k, v in a.items() if k != "logprobs"} == {k: v for k, v in b.items() if k != "logprobs"}
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=2e-5)


def _dasd_cfg(world, out, teacher, **over):
    from nemo_kd.generation.dasd_pipeline import DASDPipelineConfig

    d = dict(prompts=world["prompts"], output_dir=str(out), max_seq_length=MAX_LEN, batch_size=16, progress=False,
             teacher=dict(teacher, tokenizer=str(world["dir"] / "tok_teacher"),
                          sampling=dict(max_new_tokens=MAX_NEW, seed=3)),
             student=dict(checkpoint=str(world["dir"] / "student"), tokenizer=str(world["dir"] / "tok_student")),
             stages=[dict(name="low", temperature=0.0, num_samples=1), dict(name="high", temperature=1.0,
                                                                              num_samples=3)],
             response_filter=dict(require_finished=False, max_repeated_ngram_fraction=None,
                                  max_consecutive_repeats=None, forbid_patterns=[], min_chars=0))
    d.update(over)
    return DASDPipelineConfig.from_dict(d)


def test_pipelines_with_a_served_teacher_equal_the_in_process_teacher(world, tmp_path):
    """DASD (greedy and seeded T=1 stages) and dual preference pairs (teacher judge): the served teacher's stage
    files equal the in-process teacher's (tokens exactly, log-probs to float rounding); the rescored log-probs
    (sampled_logprobs=rescore) equal the server's; the stage record names the served teacher."""
    from nemo_kd.generation import dasd_pipeline, preference_pipeline

    served = dict(type="served", url=world["url"], model="tiny-teacher", dialect="vllm", concurrency=3)
    local = dict(checkpoint=str(world["dir"] / "teacher"))
    dasd_pipeline.run(_dasd_cfg(world, tmp_path / "local", local))
    dasd_pipeline.run(_dasd_cfg(world, tmp_path / "served", served))
    dasd_pipeline.run(_dasd_cfg(world, tmp_path / "rescored", dict(served, sampled_logprobs="rescore")))
    for stage in ("low", "high"):
        a = _jsonl(tmp_path / "served" / stage / "teacher_responses.jsonl")
        _assert_rows_equal(a, _jsonl(tmp_path / "local" / stage / "teacher_responses.jsonl"))
        _assert_rows_equal(_jsonl(tmp_path / "rescored" / stage / "teacher_responses.jsonl"), a)
        assert _jsonl(tmp_path / "served" / stage / "train.jsonl") == _jsonl(tmp_path / "local" / stage / "train.jsonl")
    assert any(r["finished"] for r in a) and len({r["response"] for r in a}) > 1
    meta = json.load(open(tmp_path / "served" / "high" / "teacher_responses.jsonl.meta.json"))
    assert meta["served_teacher"]["model"] == "tiny-teacher" and "temperature 1" in meta["teacher_logprobs"]
    assert world["url"] not in json.dumps(meta)
    meta = json.load(open(tmp_path / "rescored" / "high" / "teacher_responses.jsonl.meta.json"))
    assert meta["teacher_logprobs"].startswith("rescored with prompt_logprobs")
    # a rerun against the served teacher resumes (no request): the stage files are kept
    mtime = os.path.getmtime(tmp_path / "served" / "high" / "teacher_responses.jsonl")
    dasd_pipeline.run(_dasd_cfg(world, tmp_path / "served", dict(served, url=world["url"] + "/")))
    assert os.path.getmtime(tmp_path / "served" / "high" / "teacher_responses.jsonl") == mtime

    def pref(out, teacher):
        return preference_pipeline.run(preference_pipeline.PreferencePipelineConfig.from_dict(dict(
            prompts=world["prompts"], output_dir=str(out), max_seq_length=MAX_LEN, batch_size=8, progress=False,
            score="teacher_logprob", pair_filter=dict(min_margin=0.0),
            teacher=dict(teacher, tokenizer=str(world["dir"] / "tok_teacher"), num_samples=2,
                         sampling=dict(temperature=0.8, max_new_tokens=MAX_NEW, seed=5)),
            student=dict(checkpoint=str(world["dir"] / "student"), tokenizer=str(world["dir"] / "tok_student"),
                         num_samples=2, sampling=dict(temperature=1.0, max_new_tokens=MAX_NEW, seed=6)),
            response_filter=dict(require_finished=False, max_repeated_ngram_fraction=None,
                                 max_consecutive_repeats=None, forbid_patterns=[], min_chars=0))))

    pref(tmp_path / "pref_local", local)
    pref(tmp_path / "pref_served", served)
    for name in ("teacher_responses.jsonl", "student_responses_judged.jsonl"):
        a, b = _jsonl(tmp_path / "pref_served" / name), _jsonl(tmp_path / "pref_local" / name)
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert x["response"] == y["response"]
            assert x["teacher_mean_logprob"] == pytest.approx(y["teacher_mean_logprob"], abs=2e-5)
    a, b = _jsonl(tmp_path / "pref_served" / "pairs.jsonl"), _jsonl(tmp_path / "pref_local" / "pairs.jsonl")
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):  # the same pairs; the teacher-judge scores to float rounding
        assert {k: v for k, v in x.items() if not k.endswith("_score")} == \
            {k: v for k, v in y.items() if not k.endswith("_score")}
        assert (x["chosen_score"], x["rejected_score"]) == pytest.approx((y["chosen_score"], y["rejected_score"]),
                                                                         abs=2e-5)


def test_served_sample_errors_name_the_sample(world, tmp_path):
    """A server refusal inside a stage names the prompt and its samples; mixed policy with a served teacher and a
    served teacher without a tokenizer are refused at configuration time."""
    from nemo_kd.generation import dasd_pipeline
    from nemo_kd.teacher.served import ServedTeacherError

    served = dict(type="served", url=world["url"], model="tiny-teacher", dialect="vllm")
    big = dict(stages=[dict(name="s", temperature=1.0, num_samples=99)])  # above the server's max_n
    with pytest.raises(ServedTeacherError, match=r"prompt 0 \(samples 0\.\.98\): POST .*/v1/completions: HTTP 400: "
                                                 r"n=99 exceeds max_n=16"):
        dasd_pipeline.run(_dasd_cfg(world, tmp_path / "bad", served, **big))
    with pytest.raises(ValueError, match="mixed_policy.enabled with teacher.type=served"):
        _dasd_cfg(world, tmp_path / "m", served, mixed_policy=dict(enabled=True))
    from nemo_kd.generation.stages import PolicySpec

    with pytest.raises(ValueError, match="type=served needs `tokenizer`"):
        PolicySpec.from_dict(served)
    with pytest.raises(ValueError, match="needs teacher.url"):
        PolicySpec.from_dict(dict(served, url=None, tokenizer="t"))
    with pytest.raises(ValueError, match=r"\['url'\] are keys of a served teacher: set type=served"):
        PolicySpec.from_dict(dict(checkpoint="c", url="http://h:1"))
    # the shipped configs take the served teacher as command-line overrides of their listed keys
    from omegaconf import OmegaConf

    for name in ("build_dasd_data", "build_preference_pairs"):
        c = OmegaConf.load(os.path.join(os.path.dirname(__file__), "..", "conf", f"{name}.yaml"))
        over = OmegaConf.from_dotlist(["teacher.type=served", "teacher.url=http://teacher:8000", "teacher.tokenizer=t",
                                       "teacher.dialect=sglang"])
        spec = PolicySpec.from_dict(OmegaConf.to_container(OmegaConf.merge(c, over).teacher))
        assert spec.type == "served" and spec.served["url"] == "http://teacher:8000"
        assert spec.identity()["served"] == {"model": None, "dialect": "sglang", "sampled_logprobs": "auto"}
        local = PolicySpec.from_dict(OmegaConf.to_container(OmegaConf.merge(
            c, OmegaConf.from_dotlist(["teacher.checkpoint=/ckpt"])).teacher))
        assert "type" not in local.identity() and local.served == {}  # local stage settings as before


@pytest.mark.slow
@pytest.mark.distributed
def test_tp2_teacher_samples_under_torchrun_as_the_world_of_one_server(world, tmp_path):
    """Rank 0 serves, both TP ranks decode (the sampling command broadcast): the same seeded draws and log-probs as
    the TP = 1 server; a PP = 2 server refuses sampling with a 400 naming PP (scoring still works there)."""
    import signal

    from test_served_teacher import _free_port, _start_server

    assets = {"teacher_path": str(world["dir"] / "teacher")}
    p = _prompt_ids(world, PROMPTS[:2])
    eos = world["tok"]["teacher"].eos_token_id
    body = {"prompt": p, "n": 2, "temperature": 0.9, "max_tokens": MAX_NEW, "seed": 21, "logprobs": 2,
            "stop_token_ids": [eos], "return_token_ids": True, "return_tokens_as_token_ids": True}
    ref = _post(world, body).json()
    import requests

    for tp, pp in ((2, 1), (1, 2)):
        proc, url = _start_server(assets, tmp_path, "tp", ("-m", "torch.distributed.run", "--nproc_per_node", "2",
                                                           "--master_port", str(_free_port())),
                                  (f"parallel.tensor_model_parallel_size={tp}",
                                   f"parallel.pipeline_model_parallel_size={pp}"))
        try:
            r = requests.post(url + "/v1/completions", json=body, timeout=120)
            if pp == 2:
                assert r.status_code == 400 and "sampling needs the whole model" in r.json()["error"]["message"]
                continue
            got = r.json()
            assert [c["token_ids"] for c in got["choices"]] == [c["token_ids"] for c in ref["choices"]]
            for a, b in zip(got["choices"], ref["choices"]):
                assert a["finish_reason"] == b["finish_reason"]
                assert a["logprobs"]["token_logprobs"] == pytest.approx(b["logprobs"]["token_logprobs"], abs=1e-5)
                assert [set(x) for x in a["logprobs"]["top_logprobs"]] == [set(x) for x in
                                                                          b["logprobs"]["top_logprobs"]]
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
