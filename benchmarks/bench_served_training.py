"""How long a training step waits for a served teacher (``model.teacher.mode: served``), with and without prefetch.

Same run, same data: a tiny student trains against ``nemo-kd-serve-teacher`` (in this process, on
loopback) behind a proxy that delays every request by ``--latency-ms`` (a remote GPU server's round
trip). Per configuration it reports the median step time, ``teacher_wait_s`` and ``teacher_wait_frac``
over the steps after the first (the first step has nothing prefetched), for

* supervised steps with the next step's rows prefetched (the default);
* supervised steps without prefetch (each step requests its rows when it starts: the baseline);
* on-policy steps (``on_policy.fraction=1``: each microbatch's samples are scored as soon as drawn).

    python benchmarks/bench_served_training.py --latency-ms 0 100 --steps 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LatencyProxy:
    """aiohttp proxy on a thread: every request waits ``latency_s`` and is forwarded to ``target``."""

    def __init__(self, target: str, latency_s: float):
        self.target, self.latency_s = target, latency_s
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    async def _start(self) -> str:
        from aiohttp import ClientSession, web

        self.session = ClientSession()

        async def forward(request):
            await asyncio.sleep(self.latency_s)
            async with self.session.request(request.method, self.target + request.path_qs, data=await request.read(),
                                            headers={k: v for k, v in request.headers.items()
                                                     if k.lower() in ("content-type", "authorization")}) as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = _free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}"


def _assets(d: str, n: int, vocab: int, hidden: int, layers: int):
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.teacher.teachers import save_full_checkpoint

    texts = [f"question {i}: what is {i} plus {i * 3}? answer: {i + i * 3}, because adding numbers works." for i in range(60)]
    tok = train_byte_level_bpe(texts, vocab_size=vocab, save_dir=os.path.join(d, "tok"))
    data = os.path.join(d, "train.jsonl")
    with open(data, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "prompt": f"what is {i} plus {i * 3}?",
                                "response": f"{i + i * 3} because adding" + " numbers" * (i % 5)}) + "\n")
    arch = dict(num_layers=layers, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                ffn_hidden_size=2 * hidden, vocab_size=len(tok), max_position_embeddings=128)
    full = {k: v for k, v in build_gpt_model(GPTModelConfig(**arch)).state_dict().items() if torch.is_tensor(v)}
    save_full_checkpoint(os.path.join(d, "teacher"), full, GPTModelConfig(**arch))
    return os.path.join(d, "tok"), data, arch


def _run(args, url, tok, data, arch, prefetch: bool, on_policy: bool, tmp: str):
    import lightning.pytorch as pl
    from omegaconf import OmegaConf

    from nemo_kd.models.distillation_model import GPTDistillationModel
    from nemo_kd.parallel.strategy import MegatronStrategy

    ds = dict(file_path=data, logits_store=None, tokenizer=tok, prompt_format="chat", max_seq_length=args.seq,
              micro_batch_size=args.micro, global_batch_size=args.gbs, seed=1)
    cfg = OmegaConf.create(dict(
        student=arch, teacher=dict(mode="served", url=url, model="bench-teacher", top_k=args.k, concurrency=16),
        kd=dict(kd_loss_type="forward_kl", topk_convention="exact_tail", sft_loss_weight=0.0),
        optim=dict(lr=1e-3), parallel=dict(seed=7), data=dict(train_ds=ds, validation_ds=None), max_steps=args.steps,
        on_policy=dict(fraction=1.0 if on_policy else 0.0, max_new_tokens=args.new_tokens, seed=3),
    ))

    class Record(pl.Callback):
        def __init__(self):
            self.rows, self.t0 = [], 0.0

        def on_train_batch_start(self, trainer, *a):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *a):
            row = {k: float(v) for k, v in trainer.callback_metrics.items()}
            self.rows.append(dict(row, step_s=time.perf_counter() - self.t0))

    rec = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=MegatronStrategy(), max_steps=args.steps,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[rec], default_root_dir=tmp)
    model = GPTDistillationModel(cfg, trainer=trainer)
    if not prefetch:
        model._prefetch_served_rows = lambda step: None
    trainer.fit(model)
    rows = rec.rows[1:]  # the first step has nothing prefetched
    return dict(step_ms=1e3 * statistics.median(r["step_s"] for r in rows),
                wait_ms=1e3 * statistics.median(r["teacher_wait_s"] for r in rows),
                wait_frac=statistics.median(r["teacher_wait_frac"] for r in rows),
                prefetch_hits=model._served.prefetch_hits)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 100.0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--gbs", type=int, default=8)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["prefetch", "no-prefetch", "on-policy"])
    args = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    from nemo_kd.parallel import ParallelConfig, initialize_parallel
    from nemo_kd.teacher.server import ServeConfig, serve_in_background
    from nemo_kd.teacher.teachers import MegatronTeacher

    initialize_parallel(ParallelConfig(seed=5))
    with tempfile.TemporaryDirectory() as d:
        tok, data, arch = _assets(d, args.gbs * (args.steps + 1), 300, args.hidden, args.layers)
        server = serve_in_background(MegatronTeacher(os.path.join(d, "teacher")),
                                     ServeConfig(port=0, max_logprobs=args.k, model_id="bench-teacher"))
        direct = server.__enter__()
        print(f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f} steps={args.steps} gbs={args.gbs} "
              f"micro={args.micro} seq={args.seq} k={args.k} hidden={args.hidden} layers={args.layers}")
        print("| latency ms | mode | step ms (median) | teacher_wait ms (median) | teacher_wait_frac (median) "
              "| prefetch hits |")
        print("|---:|---|---:|---:|---:|---:|")
        for latency in args.latency_ms:
            proxy = LatencyProxy(direct, latency / 1e3)
            for mode in args.modes:
                r = _run(args, proxy.url, tok, data, arch, prefetch=mode == "prefetch", on_policy=mode == "on-policy",
                         tmp=os.path.join(d, f"run-{latency}-{mode}"))
                print(f"| {latency:.0f} | {mode} | {r['step_ms']:.0f} | {r['wait_ms']:.1f} | {r['wait_frac']:.3f} | "
                      f"{r['prefetch_hits']} |", flush=True)
        print(f"load after: {os.getloadavg()[0]:.2f}")
        server.__exit__(None, None, None)


if __name__ == "__main__":
    main()
