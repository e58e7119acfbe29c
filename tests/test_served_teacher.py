"""Served teachers (issue 15): nemo-kd-serve-teacher + the HTTP client, over real loopback HTTP.

One tiny Megatron teacher (as tests/test_extract.py builds it: output layer scaled so the top-k
has no near-ties), served by ``nemo_kd.teacher.server`` on a free port; extraction through it is
compared with the in-process store. Wire fixtures follow vLLM's ``CompletionResponse`` /
``Logprob`` models and SGLang's ``meta_info``; a fault-injecting proxy (aiohttp) sits between
client and server for the retry / refusal tests.
"""

import asyncio
import glob
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import requests
import pytest
import torch
from aiohttp import ClientSession, web

from dist_utils import WorldOfOne, run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, MAX_LEN, BATCH, N_SAMPLES = 8, 48, 4, 12
SECRET = "sk-test-SECRET-9f8e7d"


def _texts():
    return [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works." for i in range(40)]


def _write_data(path):
    with open(path, "w") as f:
        for i in range(N_SAMPLES):
            response = f"{i + i * 3} because adding" + " numbers" * (i % 4)
            if i == 7:
                response = " ".join(f"plus {j}" for j in range(40))  # over-long: truncated
            f.write(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?", "response": response}) + "\n")


def _cfg(out, data, **kw):
    from nemo_kd.teacher.extract import ExtractConfig

    base = dict(data_path=data, output_path=out, top_k=K, max_seq_length=MAX_LEN, values_dtype="bfloat16",
                batch_size=BATCH, progress=False)
    base.update(kw)
    return ExtractConfig(**base)


def _served(url, **kw):
    from nemo_kd.teacher.served import ServedTeacher, ServedTeacherConfig

    base = dict(url=url, concurrency=4, max_retries=4, backoff_initial_s=0.01, backoff_max_s=0.05,
                request_timeout_s=20)
    base.update(kw)
    return ServedTeacher(ServedTeacherConfig(**base), tokenizer_size=300)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    d = tmp_path_factory.mktemp("served")
    tok = train_byte_level_bpe(_texts(), vocab_size=300, save_dir=str(d / "tok"))
    data = str(d / "data.jsonl")
    _write_data(data)
    cfg = GPTModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                         vocab_size=len(tok), max_position_embeddings=64)
    world = WorldOfOne(seed=5)
    world.__enter__()
    full = {k: v for k, v in build_gpt_model(cfg).state_dict().items() if torch.is_tensor(v)}
    full["output_layer.weight"] = full["output_layer.weight"] * 40
    save_full_checkpoint(str(d / "teacher"), full, cfg)
    teacher = MegatronTeacher(str(d / "teacher"))
    compute_topk_logits(_cfg(str(d / "inproc"), data), teacher, tok)
    compute_topk_logits(_cfg(str(d / "inproc_x"), data, align_teacher_template=True), teacher, tok,
                        student_tokenizer=tok)
    from nemo_kd.teacher.server import ServeConfig, serve_in_background

    server = serve_in_background(teacher, ServeConfig(port=0, max_logprobs=K, model_id="tiny-teacher"))
    url = server.__enter__()
    compute_topk_logits(_cfg(str(d / "served"), data), _served(url), tok)
    yield dict(dir=d, tok=tok, tok_dir=str(d / "tok"), data=data, teacher=teacher, teacher_path=str(d / "teacher"),
               url=url, server=server.server, inproc=str(d / "inproc"), inproc_x=str(d / "inproc_x"),
               served=str(d / "served"))
    server.__exit__(None, None, None)
    world.__exit__(None, None, None)


def _read(path):
    from nemo_kd.teacher.store import StoreReader

    with StoreReader(path, verify_checksums=True) as r:
        return r.manifest, [r.read_numpy(i) for i in range(len(r))], (
            [r.alignment(i) for i in range(len(r))] if r.cross_tokenizer else None)


def _files(path):
    out = {}
    for f in sorted(glob.glob(os.path.join(path, "*"))):
        with open(f, "rb") as fh:
            out[os.path.basename(f)] = fh.read()
    return out


def _assert_equals_inproc(path, ref):
    """ids equal; log-probs (value − LSE) within the bf16 rounding the store applied; seq log-probs close."""
    m, arrays, al = _read(path)
    rm, ref_arrays, ref_al = _read(ref)
    assert m.num_samples == rm.num_samples and m.num_tokens == rm.num_tokens and m.k == rm.k
    assert m.tokenizer_hash == rm.tokenizer_hash and m.dataset_hash == rm.dataset_hash
    for i, ((v, ids, lse, slp), (rv, rids, rlse, rslp)) in enumerate(zip(arrays, ref_arrays)):
        assert np.array_equal(ids, rids), i
        assert (lse == 0).all()
        lp, rlp = v - lse[:, None], rv - rlse[:, None]
        # both sides are bf16 log-probs (8 bits of mantissa): one rounding step apart at most
        assert np.all(np.abs(lp - rlp) <= np.abs(rlp) * 2 ** -7 + 1e-5), i
        assert abs(slp - rslp) <= 1e-4 * max(1.0, abs(rslp)), i
    if ref_al is not None:
        for a, b in zip(al, ref_al):
            assert np.array_equal(a.teacher_ids, b.teacher_ids)
            np.testing.assert_allclose(a.teacher_logprobs, b.teacher_logprobs, rtol=1e-5, atol=1e-5)
    return m


# ----------------------------------------------------------------------------- equality with in-process


def test_served_store_equals_in_process(assets):
    m = _assert_equals_inproc(assets["served"], assets["inproc"])
    rec = m.extensions["served_teacher"]
    assert rec["model"] == "tiny-teacher" and rec["dialect"] == "vllm" and rec["lse_available"] is False
    assert rec["server_reports"]["nemo_kd"]["teacher_hash"] == assets["teacher"].hash
    text = open(os.path.join(assets["served"], "manifest.json")).read()
    assert assets["url"].split("//")[1] not in text  # no host:port (nor credentials) in the manifest
    assert m.teacher_name == "tiny-teacher" and m.teacher_vocab_size == 300
    assert assets["server"].forwards < m.num_samples  # requests that arrived together shared forwards


def test_served_cross_tokenizer_store_equals_in_process(assets, tmp_path):
    from nemo_kd.teacher.extract import compute_topk_logits

    out = str(tmp_path / "x")
    compute_topk_logits(_cfg(out, assets["data"], align_teacher_template=True), _served(assets["url"]),
                        assets["tok"], student_tokenizer=assets["tok"])
    _assert_equals_inproc(out, assets["inproc_x"])


def _dp_client(rank, world, url, tok_dir, data, out):
    from transformers import AutoTokenizer

    from nemo_kd.teacher.extract import compute_topk_logits

    teacher = _served(url)
    try:
        return compute_topk_logits(_cfg(out, data), teacher, AutoTokenizer.from_pretrained(tok_dir)).num_tokens
    finally:
        teacher.close()


def test_two_client_processes_write_their_shards(assets, tmp_path):
    out = str(tmp_path / "dp2")
    run_distributed(_dp_client, 2, assets["url"], assets["tok_dir"], assets["data"], out)
    m = _assert_equals_inproc(out, assets["inproc"])
    assert m.world_size == 2 and [s.rank for s in m.shards] == [0, 1]


def test_config_entry_point_and_key_checks(assets, tmp_path):
    from omegaconf import OmegaConf

    from nemo_kd.teacher.extract import run_from_config

    base = dict(data_path=assets["data"], output_path=str(tmp_path / "cli"), top_k=K, max_seq_length=MAX_LEN,
                batch_size=BATCH, progress=False, tokenizer_path=assets["tok_dir"],
                teacher=dict(type="served", url=assets["url"], model="tiny-teacher", dialect="vllm", concurrency=3))
    summary = run_from_config(OmegaConf.create(base))
    assert summary.num_tokens > 0
    assert _files(str(tmp_path / "cli")).keys() == _files(assets["served"]).keys()
    with pytest.raises(ValueError, match="teacher.url: for teacher.type=served only"):
        run_from_config(OmegaConf.create(dict(base, teacher=dict(type="megatron", path=assets["teacher_path"],
                                                                 url=assets["url"]))))
    with pytest.raises(ValueError, match="needs tokenizer_path"):
        run_from_config(OmegaConf.create(dict(base, tokenizer_path=None)))


# ----------------------------------------------------------------------------- a fault-injecting proxy


class FaultProxy:
    """aiohttp proxy in front of ``backend``; ``plan(n, body) -> action`` per POST (n counts from 0).

    Actions: None (forward), a (status, text) answer, an int status (answered with ``Retry-After: 0``), "timeout" (answers after the
    client gave up), "reset" (connection dropped), or a callable mutating the backend's answer text.
    """

    def __init__(self, backend, plan=None):
        self.backend, self.plan, self.posts, self.prompts = backend, plan or (lambda n, body: None), 0, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def _handle(self, request):
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        action = None
        if request.method == "POST":
            n, self.posts = self.posts, self.posts + 1
            parsed = json.loads(body)
            self.prompts.append(parsed.get("prompt"))
            action = self.plan(n, parsed)
        if isinstance(action, tuple) and action[0] == "retry-after":  # ("retry-after", status, header value)
            return web.Response(status=action[1], text="busy", headers={"Retry-After": action[2]})
        if isinstance(action, tuple):  # (status, body text)
            return web.Response(status=action[0], text=action[1], content_type="application/json")
        if isinstance(action, int):
            return web.Response(status=action, text=json.dumps({"error": {"message": f"injected {action}"}}),
                                headers={"Retry-After": "0"})
        if action == "timeout":
            await asyncio.sleep(1.5)
        if action == "reset":
            request.transport.abort()
            return web.Response(status=200)
        async with self.session.request(request.method, self.backend + request.path, data=body,
                                        headers=dict(headers, **{"Content-Type": "application/json"})) as r:
            text = await r.text()
            status = r.status
        if callable(action):
            text = action(text)
        return web.Response(status=status, text=text, content_type="application/json")

    async def _start(self):
        self.session = ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    async def _stop(self):
        await self.session.close()
        await self.runner.cleanup()

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()}"

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


@pytest.fixture(scope="module")
def det(assets):
    """A server that runs every prompt alone (batch-invariant numerics: bytes reproducible) and its store."""
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.server import ServeConfig, serve_in_background

    os.environ["TEST_TEACHER_KEY"] = SECRET
    server = serve_in_background(assets["teacher"], ServeConfig(port=0, max_logprobs=K, model_id="tiny-teacher",
                                                                max_batch_tokens=1, api_key_env="TEST_TEACHER_KEY"))
    url = server.__enter__()
    ref = str(assets["dir"] / "det_ref")
    compute_topk_logits(_cfg(ref, assets["data"]), _served(url, api_key_env="TEST_TEACHER_KEY"), assets["tok"])
    yield dict(url=url, ref=ref)
    server.__exit__(None, None, None)


def _ids_of(assets, i):
    from nemo_kd.data import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer

    return ConversationTokenizer(assets["tok"], "chat", MAX_LEN, "truncate")(read_records(assets["data"])[i].messages).input_ids


def test_retries_429_503_timeouts_resets_complete_the_store(assets, det, tmp_path, caplog):
    from nemo_kd.teacher.extract import compute_topk_logits

    faults = {0: 429, 1: 503, 3: "reset", 4: "timeout", 6: 500, 7: 408, 9: "reset"}
    with caplog.at_level(logging.INFO, logger="nemo_kd.teacher.served"), \
            FaultProxy(det["url"], lambda n, body: faults.get(n)) as url:
        teacher = _served(url, api_key_env="TEST_TEACHER_KEY", request_timeout_s=0.7)
        out = str(tmp_path / "faults")
        compute_topk_logits(_cfg(out, assets["data"]), teacher, assets["tok"])
        assert teacher.client.retries == len(faults)
        teacher.close()
    assert _files(out) == _files(det["ref"])  # nothing lost, nothing different
    assert "retry" in caplog.text and SECRET not in caplog.text


def test_retry_after_is_honoured_and_other_4xx_are_not_retried(assets):
    import email.utils

    from nemo_kd.teacher.served import ServedTeacherError

    ids = _ids_of(assets, 0)
    when = email.utils.formatdate(time.time() + 2.5, usegmt=True)  # the HTTP-date form: >= 1.5 s from now
    answers = {0: ("retry-after", 429, "0.6"), 1: ("retry-after", 503, when)}
    with FaultProxy(assets["url"], lambda n, body: answers.get(n)) as url:
        teacher = _served(url, backoff_initial_s=0.01, backoff_max_s=5)
        try:
            t0 = time.perf_counter()
            got = teacher._loop.run(teacher.client.score(ids, 3, K, "sample 0"))
            waited = time.perf_counter() - t0
        finally:
            teacher.close()
    assert teacher.client.retries == 2 and waited >= 0.6 + 0.8  # backoff alone would be ~0.03 s
    assert got.ids.shape == (len(ids) - 3, K)
    for status in (400, 404, 422):
        with FaultProxy(assets["url"], lambda n, body: (status, json.dumps({"error": {"message": "no"}}))) as url:
            teacher = _served(url)
            try:
                with pytest.raises(ServedTeacherError, match=f"sample 0: POST .*: HTTP {status}: no"):
                    teacher._loop.run(teacher.client.score(ids, 3, K, "sample 0"))
                assert teacher.client.retries == 0
            finally:
                teacher.close()


@pytest.mark.parametrize("fault, message", [
    ("malformed", "malformed response \\(not JSON"),
    ("positions", r"scored (\d+) positions for the (?!\1)\d+ token ids sent"),
    ("echoed", "echoed other token ids than were sent"),
    ("scored_id", "is not among the server's entries"),
    ("nan", "non-finite \\(NaN/Inf\\) teacher log-prob"),
    ("positive", "positive log-prob"),
    ("refused", "HTTP 400: injected"),
])
def test_bad_answers_name_the_sample_and_nothing_is_lost(assets, det, tmp_path, fault, message):
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.store import StoreReader

    bad = 5
    target = _ids_of(assets, bad)

    def mutate(text):
        body = json.loads(text)
        ch = body["choices"][0]
        if fault == "malformed":
            return text[: len(text) // 2]
        if fault == "positions":
            ch["prompt_logprobs"].pop()
            ch.pop("prompt_token_ids")
        if fault == "echoed":
            ch["prompt_token_ids"][3] += 1
        if fault == "scored_id":
            ch.pop("prompt_token_ids")
            pos = ch["prompt_logprobs"][-1]
            pos[str(int(max(pos, key=int)) + 1)] = pos.pop(str(target[-1]))
        if fault in ("nan", "positive"):
            pos = ch["prompt_logprobs"][-2]
            next(iter(pos.values()))["logprob"] = float("nan") if fault == "nan" else 0.5
        return json.dumps(body)

    def plan(n, body):
        if body["prompt"] != target:
            return None
        return 400 if fault == "refused" else mutate

    out = str(tmp_path / "bad")
    with FaultProxy(det["url"], plan) as url:
        with pytest.raises(Exception, match=message) as e:
            compute_topk_logits(_cfg(out, assets["data"]), _served(url, api_key_env="TEST_TEACHER_KEY"), assets["tok"])
    text = str(e.value)
    assert f"sample {bad} (" in text and f"data.jsonl:{bad + 1})" in text and "/v1/completions" in text
    assert SECRET not in text
    # the batches before the bad sample are committed; a clean rerun asks only for the rest
    proxy = FaultProxy(det["url"])
    with proxy as url:
        compute_topk_logits(_cfg(out, assets["data"]), _served(url, api_key_env="TEST_TEACHER_KEY"), assets["tok"])
    assert proxy.prompts[0] == _ids_of(assets, (bad // BATCH) * BATCH)  # the committed batches are not asked again
    assert _files(out) == _files(det["ref"])


def test_resume_requests_only_uncommitted_samples(assets, det, tmp_path):
    from nemo_kd.teacher.extract import compute_topk_logits

    bad = 6
    target = _ids_of(assets, bad)
    out = str(tmp_path / "resume")
    with FaultProxy(det["url"], lambda n, body: 400 if body["prompt"] == target else None) as url:
        with pytest.raises(Exception, match=f"sample {bad} "):
            compute_topk_logits(_cfg(out, assets["data"]), _served(url, api_key_env="TEST_TEACHER_KEY"),
                                assets["tok"])
    proxy = FaultProxy(det["url"])
    with proxy as url:
        compute_topk_logits(_cfg(out, assets["data"]), _served(url, api_key_env="TEST_TEACHER_KEY"), assets["tok"])
    committed = (bad // BATCH) * BATCH
    assert proxy.prompts == [_ids_of(assets, i) for i in range(committed, N_SAMPLES)]
    assert _files(out) == _files(det["ref"])


def test_api_key_required_and_never_shown(assets, det, tmp_path, caplog):
    from nemo_kd.teacher.served import ServedTeacherError

    with pytest.raises(ServedTeacherError, match="HTTP 401: invalid or missing API key|401"):
        _served(det["url"]).close()
    os.environ["WRONG_TEACHER_KEY"] = SECRET + "x"

    # a server that echoes the Authorization header back in its error message: the client scrubs it
    def echo(n, body):
        return 400, json.dumps({"error": {"message": f"bad header Bearer {SECRET}"}})

    with caplog.at_level(logging.DEBUG), FaultProxy(det["url"], echo) as url:
        teacher = _served(url, api_key_env="TEST_TEACHER_KEY")
        from nemo_kd.teacher.extract import compute_topk_logits

        with pytest.raises(ServedTeacherError) as e:
            compute_topk_logits(_cfg(str(tmp_path / "k"), assets["data"]), teacher, assets["tok"])
    assert SECRET not in str(e.value) and "***" in str(e.value)
    assert SECRET not in caplog.text
    for f in glob.glob(os.path.join(det["ref"], "*")):
        assert SECRET.encode() not in open(f, "rb").read()
    with pytest.raises(ValueError, match="NOT_SET_TEACHER_KEY: that environment variable is not set"):
        _served(det["url"], api_key_env="NOT_SET_TEACHER_KEY")


# ----------------------------------------------------------------------------- wire conformance


def _vllm_position(top, scored=None):
    """One vLLM prompt_logprobs entry: {token_id: Logprob(logprob, rank, decoded_token)} as JSON sends it."""
    d = {}
    if scored is not None:  # vLLM puts the scored token first when it is outside the top-k
        d[str(scored[0])] = {"logprob": scored[1], "rank": scored[2], "decoded_token": "x"}
    for r, (t, lp) in enumerate(top):
        d.setdefault(str(t), {"logprob": lp, "rank": r + 1, "decoded_token": "y"})
    return d


def _vllm_body(positions, ids=None):
    choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
              "prompt_logprobs": positions}
    if ids is not None:
        choice["prompt_token_ids"] = ids
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": len(positions), "completion_tokens": 1, "total_tokens": len(positions) + 1}}


def test_vllm_wire_shapes():
    from nemo_kd.teacher.served import ServedTeacherError, parse_vllm_completion

    ids = [5, 7, 9, 11]
    positions = [None,
                 _vllm_position([(7, -0.1), (3, -2.5)]),  # scored token inside the top-k: k entries
                 _vllm_position([(1, -0.2), (2, -1.9)], scored=(9, -4.0, 7)),  # outside: k + 1, listed first
                 _vllm_position([(4, -0.7), (11, -0.7)])]  # a tie: lower id first, as in-process
    got = parse_vllm_completion(_vllm_body(positions, ids), ids, 1, 2, "sample 0")
    assert got.ids.tolist() == [[7, 3], [1, 2], [4, 11]]
    np.testing.assert_allclose(got.values, [[-0.1, -2.5], [-0.2, -1.9], [-0.7, -0.7]], rtol=1e-6)
    np.testing.assert_allclose(got.label_logprobs, [-0.1, -4.0, -0.7], rtol=1e-6)
    got = parse_vllm_completion(_vllm_body(positions), ids, 3, 2, "sample 0")  # no prompt_token_ids (older vLLM)
    assert got.ids.tolist() == [[4, 11]]
    with pytest.raises(ServedTeacherError, match="top log-probs, expected k=3"):
        parse_vllm_completion(_vllm_body(positions), ids, 1, 3, "sample 0")
    with pytest.raises(ServedTeacherError, match="scored 3 positions for the 4 token ids"):
        parse_vllm_completion(_vllm_body(positions[:3]), ids, 1, 2, "sample 0")


def test_vllm_fast_decoder_equals_an_independent_reference():
    """The client's fast path (msgspec + numpy) on vLLM-shaped bodies built from a known log_softmax: the same
    top-k (value descending, lower id on ties), labels and checks as the field-by-field parser."""
    from nemo_kd.teacher.served import _fast_vllm, decode_vllm_completion, parse_vllm_completion

    rng = np.random.default_rng(3)
    k, vocab, length, first = 20, 64, 40, 9
    ids = rng.integers(0, vocab, size=length).tolist()
    logits = rng.normal(size=(length, vocab)) * 2
    logits[5, :4] = logits[5, 10]  # exact ties across the top-k boundary
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    positions, outside = [None], 0
    want_ids = np.empty((length - first, k), np.int64)
    for j in range(1, length):
        order = sorted(range(vocab), key=lambda t: (-lp[j - 1, t], t))[:k]  # position j is predicted by row j-1
        scored = None
        if ids[j] not in order:  # vLLM adds the scored token with its rank
            scored = (ids[j], float(lp[j - 1, ids[j]]), 1 + int((lp[j - 1] > lp[j - 1, ids[j]]).sum()))
            outside += 1
        shuffled = list(order)
        rng.shuffle(shuffled)  # the server's dict order is not the sort order
        positions.append(_vllm_position([(t, float(lp[j - 1, t])) for t in shuffled], scored=scored))
        if j >= first:
            want_ids[j - first] = order
    assert outside > 5  # both shapes (k and k + 1 entries) are exercised
    raw = json.dumps(_vllm_body(positions, ids)).encode()
    assert _fast_vllm(raw, ids, first, k) is not None  # the fast path is taken for a well-formed answer
    got = decode_vllm_completion(raw, ids, first, k, "sample 0")
    slow = parse_vllm_completion(json.loads(raw), ids, first, k, "sample 0")
    rows = np.arange(first - 1, length - 1)
    assert np.array_equal(got.ids, want_ids) and np.array_equal(slow.ids, want_ids)
    want_v = np.take_along_axis(lp[rows], want_ids, 1).astype(np.float32)
    assert np.array_equal(got.values, want_v) and np.array_equal(slow.values, want_v)
    want_l = lp[rows, np.asarray(ids[first:])].astype(np.float32)
    assert np.array_equal(got.label_logprobs, want_l) and np.array_equal(slow.label_logprobs, want_l)


@pytest.mark.parametrize("fault, error, message", [
    ("nan", "NonFiniteLogitsError", "non-finite \\(NaN/Inf\\) teacher log-prob in sample 4, token position 2, "
                                    "candidate 1"),
    ("inf", "NonFiniteLogitsError", "non-finite"),
    ("logits", "ServedTeacherError", "sample 4: token position 1: the top-k probabilities sum to .* > 1.*"
                                     "--logprobs-mode raw_logprobs"),
    ("string", "ServedTeacherError", "sample 4: malformed response: token position 2, candidate 2 is '-1.9'"),
    ("missing", "ServedTeacherError", "sample 4: malformed response: no choices\\[0\\].prompt_logprobs"),
    ("truncated", "ServedTeacherError", "sample 4: malformed response \\(not JSON"),
])
def test_vllm_decoder_refuses_bad_bodies_by_name(fault, error, message):
    from nemo_kd.teacher import served

    ids = [5, 7, 9, 11]
    positions = [None, _vllm_position([(7, -0.1), (3, -2.5)]), _vllm_position([(1, -0.2), (2, -1.9)], scored=(9, -4.0, 7)),
                 _vllm_position([(4, -0.7), (11, -0.7)])]
    if fault == "nan":
        positions[2]["1"]["logprob"] = float("nan")  # json.dumps writes NaN, as a Python server would
    if fault == "inf":
        positions[3]["4"]["logprob"] = float("-inf")
    if fault == "logits":
        positions[1] = _vllm_position([(7, -0.01), (3, -0.02)])
    if fault == "string":
        positions[2]["2"]["logprob"] = "-1.9"
    body = _vllm_body(positions, ids)
    if fault == "missing":
        del body["choices"][0]["prompt_logprobs"]
    raw = json.dumps(body).encode()
    if fault == "truncated":
        raw = raw[:-10]
    with pytest.raises(getattr(served, error), match=message) as e:
        served.decode_vllm_completion(raw, ids, 1, 2, "sample 4")
    assert type(e.value).__name__ == error


def test_sglang_wire_shapes():
    from nemo_kd.teacher.served import ServedTeacherError, parse_sglang_generate

    ids = [5, 7, 9]
    meta = {"prompt_tokens": 3, "completion_tokens": 1,
            "input_token_logprobs": [[None, 5, None], [-0.1, 7, None], [-4.0, 9, None]],
            "input_top_logprobs": [None, [[-0.1, 7, None], [-2.5, 3, None]], [[-0.2, 1, None], [-1.9, 2, None]]],
            "output_token_logprobs": [[-0.3, 4, None]]}
    got = parse_sglang_generate({"text": "", "meta_info": meta}, ids, 1, 2, "sample 2")
    assert got.ids.tolist() == [[7, 3], [1, 2]]
    np.testing.assert_allclose(got.label_logprobs, [-0.1, -4.0], rtol=1e-6)
    meta["input_token_logprobs"][2][1] = 8
    with pytest.raises(ServedTeacherError, match="sample 2: token position 2: the server scored token 8, the id sent is 9"):
        parse_sglang_generate({"meta_info": meta}, ids, 1, 2, "sample 2")


def _sglang_from_vllm(text, k):
    """The SGLang /generate answer for what the nemo_kd server said in vLLM's dialect (same numbers)."""
    ch = json.loads(text)["choices"][0]
    ids, pl = ch["prompt_token_ids"], ch["prompt_logprobs"]
    tok = [[None, ids[0], None]] + [[pl[j][str(ids[j])]["logprob"], ids[j], None] for j in range(1, len(ids))]
    top = [None] + [[[v["logprob"], int(t), None] for t, v in pl[j].items() if v["rank"] <= k][:k]
                    for j in range(1, len(ids))]
    return json.dumps({"text": "", "meta_info": {"id": "x", "prompt_tokens": len(ids), "completion_tokens": 1,
                                                 "input_token_logprobs": tok, "input_top_logprobs": top}})


def test_sglang_dialect_auto_detected_end_to_end(assets, det, tmp_path):
    """A fake SGLang (its /get_model_info and /generate shapes) backed by the nemo_kd server: same store bytes."""
    from nemo_kd.teacher.extract import compute_topk_logits

    async def model_info(request):
        return web.json_response({"model_path": "tiny-teacher", "tokenizer_path": "tok", "is_generation": True})

    async def generate(request):
        body = await request.json()
        assert body["return_logprob"] and body["logprob_start_len"] == 0 and body["top_logprobs_num"] == K
        async with ClientSession(headers={"Authorization": f"Bearer {SECRET}"}) as s:
            async with s.post(det["url"] + "/v1/completions", json={
                    "prompt": body["input_ids"], "prompt_logprobs": K, "max_tokens": 1, "temperature": 0,
                    "return_token_ids": True}) as r:
                return web.Response(text=_sglang_from_vllm(await r.text(), K), content_type="application/json")

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start():
        app = web.Application()
        app.router.add_get("/get_model_info", model_info)
        app.router.add_post("/generate", generate)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]

    runner, port = asyncio.run_coroutine_threadsafe(start(), loop).result()
    try:
        teacher = _served(f"http://127.0.0.1:{port}", vocab_size=300)
        assert teacher.client.dialect == "sglang" and teacher.name == "tiny-teacher"
        out = str(tmp_path / "sgl")
        compute_topk_logits(_cfg(out, assets["data"]), teacher, assets["tok"])
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    ref = _files(det["ref"])
    got = _files(out)
    assert got.keys() == ref.keys()
    for name in ref:  # the payload is the same; the manifest and shard records name another dialect/server
        if name.endswith((".bin", ".idx", ".sum")):
            assert got[name] == ref[name], name


def test_max_logprobs_refusal_names_the_flag(assets):
    from nemo_kd.teacher.served import ServedTeacherError

    # vLLM's refusal as its OpenAI server sends it (HTTP 400, ErrorResponse: older releases flat, newer nested)
    message = "Requested prompt logprobs of 8, which is greater than max allowed: 5"
    for shape in ({"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400},
                  {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}):
        with FaultProxy(assets["url"], lambda n, body: (400, json.dumps(shape))) as url:
            teacher = _served(url)
            try:
                with pytest.raises(ServedTeacherError, match="sample 0: POST .*/v1/completions: the server refuses "
                                                             "top_k=8 .* restart it with --max-logprobs >= 8"):
                    teacher._loop.run(teacher.client.score([1, 2, 3], 1, K, "sample 0"))
                assert teacher.client.retries == 0  # a 400 is not retried
            finally:
                teacher.close()
    teacher = _served(assets["url"])  # the nemo_kd server's own cap (max_logprobs=K) answers the same way
    with pytest.raises(ServedTeacherError, match=r"sample 3: POST .*/v1/completions: the server refuses top_k=9 "
                                                 r"log-probs \(HTTP 400: Requested prompt logprobs of 9"):
        teacher._loop.run(teacher.client.score([1, 2, 3], 1, K + 1, "sample 3"))
    teacher.close()


@pytest.mark.parametrize("body, message", [
    ({"prompt": "text"}, "prompt must be token ids"),
    ({"prompt": [1, 2], "n": 99}, r"n=99 exceeds max_n=16 \(start the server with max_n >= 99\)"),
    ({"prompt": [1, 2], "max_tokens": 99999}, "max_tokens=99999 exceeds max_tokens_limit=4096"),
    ({"prompt": list(range(40)), "max_tokens": 30}, "maximum context length is 64 tokens"),
    ({"prompt": [1, 2], "max_tokens": 1, "temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"prompt": [1, 2], "max_tokens": 3, "logprobs": K + 1}, f"Requested sample logprobs of {K + 1}, which is greater"),
    ({"prompt": [1, 2], "max_tokens": 3, "top_p": 0}, r"top_p must be in \(0, 1\]"),
    ({"prompt": [1, 2], "prompt_logprobs": K + 1}, "greater than max allowed"),
    ({"prompt": list(range(65))}, "more than max_prompt_tokens=64"),
    ({"prompt": [1, 999]}, r"token ids must be ints in \[0, 300\)"),
    ({"prompt": [1, 2], "model": "other"}, "does not exist"),
])
def test_server_limits_answer_4xx_naming_the_limit(assets, body, message):
    import re

    import requests

    r = requests.post(assets["url"] + "/v1/completions", json=body, timeout=30)
    assert 400 <= r.status_code < 500 and re.search(message, r.json()["error"]["message"]), r.text
    assert requests.get(assets["url"] + "/health", timeout=30).json() == {"status": "ok"}


# ----------------------------------------------------------------------------- server killed and restarted


def _start_server(assets, tmp_path, name, launcher=(), overrides=("max_batch_tokens=1",)):
    """examples/serve_teacher.py in its own process (``launcher``: e.g. torchrun's argv), and its URL."""
    cmd = [sys.executable, *launcher, os.path.join(REPO, "examples", "serve_teacher.py"),
           f"teacher.path={assets['teacher_path']}", "port=0", f"max_logprobs={K}", "model_id=tiny-teacher", *overrides]
    env = dict(os.environ, PYTHONPATH=REPO, MASTER_PORT=str(_free_port()), NEMO_KD_NUM_THREADS="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("serving "):
            return proc, line.split(" on ")[1].strip()
    raise AssertionError("".join(lines))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_server_killed_mid_extraction_then_rerun_is_byte_identical(assets, det, tmp_path):
    from nemo_kd.teacher.extract import compute_topk_logits
    from nemo_kd.teacher.served import ServedTeacherError

    out = str(tmp_path / "killed")
    proc, url = _start_server(assets, tmp_path, "first")
    progress = os.path.join(out, "shard-00000.progress.json")

    def kill_after_first_commit():
        while not os.path.exists(progress):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_after_first_commit)
    killer.start()
    os.environ["NEMO_KD_EXTRACT_BATCH_DELAY"] = "0.3"
    try:
        with pytest.raises(ServedTeacherError, match=r"sample \d+ .*failed after 2 attempt"):
            compute_topk_logits(_cfg(out, assets["data"]), _served(url, max_retries=1, concurrency=1),
                                assets["tok"])
    finally:
        os.environ.pop("NEMO_KD_EXTRACT_BATCH_DELAY")
        killer.join()
        proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json"))
    proc, url = _start_server(assets, tmp_path, "second")  # another port: the store does not record it
    try:
        compute_topk_logits(_cfg(out, assets["data"]), _served(url), assets["tok"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    ref = str(tmp_path / "ref")  # the same server, uninterrupted, without the API key the det server has
    proc, url = _start_server(assets, tmp_path, "ref")
    try:
        compute_topk_logits(_cfg(ref, assets["data"]), _served(url), assets["tok"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    assert _files(out) == _files(ref)
    # another process (its own thread count) than the det server: the same store up to float rounding
    _assert_equals_inproc(out, assets["inproc"])


# ----------------------------------------------------------------------------- a TP / PP teacher served under torchrun


def _prompt_logprobs(url, prompt):
    body = {"model": "tiny-teacher", "prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": K}
    r = requests.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_tp_pp_teacher_served_under_torchrun_equals_world_of_one(assets, tmp_path, tp, pp):
    """Rank 0 serves, every rank runs the forward: the answers and the store equal the world-of-one server's."""
    from nemo_kd.teacher.extract import compute_topk_logits

    proc, url = _start_server(assets, tmp_path, "parallel", ("-m", "torch.distributed.run", "--nproc_per_node",
                                                             str(tp * pp), "--master_port", str(_free_port())),
                              (f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}"))
    try:
        # the wire answer, position by position: the same ids, ranks (the scored token's included) and greedy
        # token as the TP = PP = 1 server's, log-probs to fp32 rounding of another reduction order
        prompt = [5, 17, 60, 61, 62, 9, 250, 3]
        got, ref = _prompt_logprobs(url, prompt), _prompt_logprobs(assets["url"], prompt)
        assert got["prompt_logprobs"][0] is None and len(got["prompt_logprobs"]) == len(prompt)
        for g, r in zip(got["prompt_logprobs"][1:], ref["prompt_logprobs"][1:]):
            assert list(g) == list(r)
            for t in r:
                assert g[t]["rank"] == r[t]["rank"]
                assert abs(g[t]["logprob"] - r[t]["logprob"]) <= 1e-5 * max(1.0, abs(r[t]["logprob"]))
        assert got["text"] == ref["text"] or got.get("token_ids") == ref.get("token_ids")
        out = str(tmp_path / "store")
        compute_topk_logits(_cfg(out, assets["data"]), _served(url), assets["tok"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    _assert_equals_inproc(out, assets["inproc"])


# ----------------------------------------------------------------------------- vLLM's own protocol models


def test_server_answers_validate_against_vllm_protocol_models(assets):
    """The server's /v1/completions, error and /v1/models bodies parse with vLLM 0.34's own pydantic models
    (``pip install vllm --no-deps``, tests/vllm_protocol.py), and the client decodes the body as vLLM
    re-serialises it exactly as it decodes the server's own."""
    from vllm_protocol import validate

    from nemo_kd.teacher.served import decode_vllm_completion

    prompt = [5, 17, 60, 61, 62, 9, 250, 3, 77, 12]
    body = {"model": "tiny-teacher", "prompt": prompt, "max_tokens": 1, "temperature": 0, "prompt_logprobs": K,
            "echo": True, "return_token_ids": True}
    ok = requests.post(assets["url"] + "/v1/completions", json=body, timeout=60)
    refused = requests.post(assets["url"] + "/v1/completions", json=dict(body, prompt_logprobs=K + 1), timeout=60)
    models = requests.get(assets["url"] + "/v1/models", timeout=60)
    assert ok.status_code == 200 and refused.status_code == 400 and models.status_code == 200
    positions = ok.json()["choices"][0]["prompt_logprobs"]
    assert any(len(p) == K + 1 for p in positions[1:]), "no scored token outside the top-k: the case is not covered"
    completion, error, model_list = validate([{"kind": "completion", "body": ok.json()},
                                              {"kind": "error", "body": refused.json()},
                                              {"kind": "models", "body": models.json()}])
    choice = completion["choices"][0]
    assert choice["prompt_logprobs"][0] is None and choice["prompt_token_ids"] == prompt
    for ours, theirs in zip(positions[1:], choice["prompt_logprobs"][1:]):
        assert ours == theirs  # every entry: logprob, rank, decoded_token, as vLLM dumps its Logprob
    assert error["error"]["code"] == 400 and "greater than max allowed" in error["error"]["message"]
    assert model_list["data"][0]["id"] == "tiny-teacher" and model_list["data"][0]["max_model_len"] == 64
    a = decode_vllm_completion(ok.content, prompt, 1, K, "sample 0")
    b = decode_vllm_completion(json.dumps(completion).encode(), prompt, 1, K, "sample 0")
    for x, y in zip((a.values, a.ids, a.label_logprobs), (b.values, b.ids, b.label_logprobs)):
        np.testing.assert_array_equal(x, y)
