#!/usr/bin/env python
"""Served-teacher extraction vs in-process extraction, and the HTTP client's own cost per token.

Builds a random Megatron GPT teacher (local full-state-dict format), a synthetic dataset and a
small BPE tokenizer, then:

1. in process: :func:`nemo_kd.teacher.extract.compute_topk_logits` with the teacher loaded here;
2. served: the same teacher behind ``examples/serve_teacher.py`` (its own process, as on its own
   node) and the same extraction with ``teacher.type=served`` – completion tokens/s of both and their
   ratio (issue 15 target: >= 0.8 with enough concurrency);
3. client cost: a server answering canned vLLM responses (precomputed for the dataset's prompts, k =
   ``--k``, one extra out-of-top-k entry per position as vLLM sends) in its own process; the client
   process's CPU seconds (``time.process_time``: every thread of it) per scored token, reported as
   scored tokens/s per client core (target: >= 50k at k = 20).

Also the bytes per completion token of the served store.

    python benchmarks/bench_served_teacher.py                    # CPU defaults
    python benchmarks/bench_served_teacher.py --hidden 1024 --layers 8 --vocab 128256 --samples 256   # GPU
"""

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _dataset(path, n, words, rng):
    vocab = ["alpha", "beta", "gamma", "delta", "number", "plus", "minus", "the", "answer", "is", "because", "so"]
    with open(path, "w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choice(vocab) for _ in range(words // 4))
            response = " ".join(rng.choice(vocab) + str(rng.randint(0, 99)) for _ in range(words))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def _canned_server(port_queue, responses_file):
    """A vLLM-shaped server that answers each prompt with its precomputed response (no model)."""
    import asyncio

    from aiohttp import web

    with open(responses_file) as f:
        canned = {tuple(json.loads(line)["ids"]): line for line in f}
    texts = {key: json.dumps(json.loads(line)["body"]) for key, line in canned.items()}

    async def completions(request):
        body = await request.json()
        return web.Response(text=texts[tuple(body["prompt"])], content_type="application/json")

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "canned", "object": "model",
                                                              "max_model_len": 4096}]})

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        app.router.add_get("/v1/models", models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port_queue.put(site._server.sockets[0].getsockname()[1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _canned_body(ids, k, rng):
    positions = [None]
    for j in range(1, len(ids)):
        cands = rng.sample(range(100, 30000), k)
        d = {str(ids[j]): {"logprob": -7.25 - rng.random(), "rank": k + 3, "decoded_token": "Ġtok"}}
        for r, t in enumerate(cands):  # normalised: p_r = 0.4 · 0.6^r · (1 − jitter), summing to < 1
            lp = math.log(0.4 * 0.6 ** r) - 0.05 * rng.random()
            d[str(t)] = {"logprob": lp, "rank": r + 1, "decoded_token": "Ġtok"}
        positions.append(d)
    return {"id": "cmpl-x", "object": "text_completion", "created": 0, "model": "canned",
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "prompt_logprobs": positions, "prompt_token_ids": ids}],
            "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--words", type=int, default=60, help="response words per sample (~3 tokens each)")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--canned-samples", type=int, default=400)
    p.add_argument("--threads", type=int, default=0, help="torch threads of the in-process teacher and the server")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29591")

    from nemo_kd.data import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher import extract
    from nemo_kd.teacher.served import ServedTeacher, ServedTeacherConfig
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    work = tempfile.mkdtemp(prefix="bench_served_")
    rng = random.Random(0)
    server = None
    try:
        data = os.path.join(work, "data.jsonl")
        _dataset(data, args.samples, args.words, rng)
        tok = train_byte_level_bpe([open(data).read()], vocab_size=400)
        cfg = GPTModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             vocab_size=args.vocab, max_position_embeddings=args.seq)
        initialize_parallel(ParallelConfig(seed=1))
        try:
            model = build_gpt_model(cfg, wrap_float16=False)
            full = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
            full["output_layer.weight"] = full["output_layer.weight"] * 20
            del model
            teacher_dir = os.path.join(work, "teacher")
            save_full_checkpoint(teacher_dir, full, cfg)
            del full
            teacher = MegatronTeacher(teacher_dir)
            records = read_records(data)
            ecfg = dict(data_path=data, top_k=args.k, max_seq_length=args.seq, batch_size=args.batch, progress=False)

            # 1. in process (a warm-up run first: the first forward pays allocation and kernel selection)
            extract.compute_topk_logits(extract.ExtractConfig(output_path=os.path.join(work, "warm"), **ecfg),
                                        teacher, tok, records=records)
            local = extract.compute_topk_logits(extract.ExtractConfig(output_path=os.path.join(work, "local"), **ecfg),
                                                teacher, tok, records=records)
            del teacher

            # 2. served: the server in its own process
            env = dict(os.environ, PYTHONPATH=REPO, MASTER_PORT=str(int(os.environ["MASTER_PORT"]) + 1))
            if args.threads:
                env["NEMO_KD_NUM_THREADS"] = str(args.threads)
            server = subprocess.Popen([sys.executable, os.path.join(REPO, "examples", "serve_teacher.py"),
                                       f"teacher.path={teacher_dir}", "port=0", f"max_logprobs={args.k}",
                                       f"max_batch_tokens={args.batch * args.seq}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            url = None
            for line in server.stdout:
                if line.startswith("serving "):
                    url = line.split(" on ")[1].strip()
                    break
            if url is None:
                raise RuntimeError("the teacher server did not start")
            served_cfg = ServedTeacherConfig(url=url, concurrency=args.concurrency)
            st = ServedTeacher(served_cfg, tokenizer_size=len(tok))
            extract.compute_topk_logits(extract.ExtractConfig(output_path=os.path.join(work, "swarm"), **ecfg),
                                        st, tok, records=records)
            served = extract.compute_topk_logits(extract.ExtractConfig(output_path=os.path.join(work, "served"),
                                                                       **ecfg), st, tok, records=records)
            st.close()
            server.send_signal(signal.SIGTERM)
            server.wait()
            server = None

            # 3. client cost against canned responses
            ctok = ConversationTokenizer(tok, "chat", args.seq)
            crng = random.Random(1)
            canned_path = os.path.join(work, "canned.jsonl")
            samples = []
            with open(canned_path, "w") as f:
                for i in range(args.canned_samples):
                    s = ctok(records[i % len(records)].messages)
                    ids = list(s.input_ids)
                    ids[0] = 1000 + i  # distinct prompts (the canned server looks them up)
                    s.input_ids = ids
                    samples.append(s)
                    f.write(json.dumps({"ids": ids, "body": _canned_body(ids, args.k, crng)}) + "\n")
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            canned = ctx.Process(target=_canned_server, args=(q, canned_path), daemon=True)
            canned.start()
            port = q.get(timeout=120)
            ct = ServedTeacher(ServedTeacherConfig(url=f"http://127.0.0.1:{port}", concurrency=args.concurrency),
                               tokenizer_size=30000)
            scored = sum(s.num_completion_tokens for s in samples)
            best = None
            for _ in range(2):
                stream = ct.stream(enumerate(samples), args.k, lambda i: f"sample {i}")
                c0, w0 = time.process_time(), time.perf_counter()
                for b in range(0, len(samples), args.batch):
                    idx = range(b, min(len(samples), b + args.batch))
                    stream.next_batch(idx, [samples[i] for i in idx])
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                best = min(best or (cpu, wall), (cpu, wall))
            ct.close()
            canned.terminate()
            # yardstick on this machine: the standard library's json.loads of the same response bodies
            with open(canned_path) as f:
                raws = [json.dumps(json.loads(line)["body"]).encode() for line in f]
            c0 = time.process_time()
            for raw in raws:
                json.loads(raw)
            json_cpu = time.process_time() - c0
            wire_bytes = sum(map(len, raws))
        finally:
            destroy_parallel()
        report = {
            "teacher": f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, k={args.k}",
            "completion_tokens": local.num_tokens,
            "in_process_tokens_per_s": round(local.tokens_per_s, 1),
            "served_tokens_per_s": round(served.tokens_per_s, 1),
            "served_over_in_process": round(served.tokens_per_s / local.tokens_per_s, 3),
            "served_store_bytes_per_token": round(served.bytes_per_token, 2),
            "concurrency": args.concurrency,
            "client_scored_tokens": scored,
            "client_tokens_per_cpu_s": round(scored / best[0], 0),
            "client_tokens_per_wall_s": round(scored / best[1], 0),
            "wire_bytes_per_scored_token": round(wire_bytes / scored, 1),
            "stdlib_json_loads_tokens_per_cpu_s": round(scored / json_cpu, 0),
            "client_cpu_over_json_loads": round(best[0] / json_cpu, 3),
        }
        print(json.dumps(report, indent=2))
    finally:
        if server is not None:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
