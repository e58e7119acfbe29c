#!/usr/bin/env python
"""Top-k extraction throughput vs the same teacher's forward-only throughput, and bytes/token.

Builds a random Megatron GPT teacher (local full-state-dict format), a synthetic
prompt/response dataset and a small BPE tokenizer, then in one process:

1. forward-only: the teacher over exactly the padded batches the extraction will
   run (same batching code), logits discarded – completion tokens/s;
2. extraction: :func:`nemo_kd.teacher.extract.compute_topk_logits` into a fresh store
   (top-k + LSE + label log-prob on the logits, store append/commit/finalize).

Reports both throughputs, their ratio, the overhead ``(t_extract - t_forward) /
t_forward`` (issue 3 target on GPU at realistic vocabularies: < 10%), and the
store's bytes per completion token (default layout: at most ``6k + 16``).
The teacher vocabulary (``--vocab``) is the model's; the tokenizer is small (its ids
are a subset), which is enough to exercise top-k over the full vocab width.

    python benchmarks/bench_extract.py                       # CPU defaults
    python benchmarks/bench_extract.py --vocab 128256 --hidden 1024 --layers 8 --seq 1024 --batch 8   # GPU
    python benchmarks/bench_extract.py ... --fuse-output-layer   # project only completion positions
    python benchmarks/bench_extract.py --experts 8 --moe-topk 2  # an MoE teacher (issue 17)

With ``--fuse-output-layer`` the extraction skips the output layer at prompt and padding
positions (and never holds ``[batch, seq, V]`` logits), so it can beat the forward-only
baseline, which keeps Megatron's full output layer.
"""

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dataset(path, n, words, rng):
    vocab = ["alpha", "beta", "gamma", "delta", "number", "plus", "minus", "the", "answer", "is", "because", "so"]
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choice(vocab) for _ in range(words // 4))
            response = " ".join(rng.choice(vocab) + str(rng.randint(0, 99)) for _ in range(words))
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="max_seq_length")
    p.add_argument("--words", type=int, default=60, help="response words per sample (~3 tokens each)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--values-dtype", default="bfloat16")
    p.add_argument("--params-dtype", default="fp32")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--fuse-output-layer", action="store_true",
                   help="extraction projects only completion positions (fuse_output_layer); the forward-only "
                        "baseline keeps the full output layer")
    p.add_argument("--chunk-tokens", type=int, default=2048, help="output_layer_chunk_tokens with --fuse-output-layer")
    p.add_argument("--experts", type=int, default=0,
                   help="an MoE teacher: this many experts in every layer (dropless, Megatron's sequential experts "
                        "on the local spec), --moe-topk of them per token, each of FFN --moe-ffn")
    p.add_argument("--moe-topk", type=int, default=2)
    p.add_argument("--moe-ffn", type=int, default=0, help="expert FFN size (0: 4 x hidden / moe-topk)")
    p.add_argument("--log-tail-cost", action="store_true",
                   help="also extract without the teacher's log tail mass (log_tail=false), interleaved: its cost")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29587")

    from nemo_kd.data import read_records
    from nemo_kd.data.tokenization import ConversationTokenizer
    from nemo_kd.data.tokenizer_builder import train_byte_level_bpe
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel
    from nemo_kd.teacher import extract
    from nemo_kd.teacher.store import StoreReader, shard_sample_range
    from nemo_kd.teacher.teachers import MegatronTeacher, save_full_checkpoint

    work = tempfile.mkdtemp(prefix="bench_extract_")
    rng = random.Random(0)
    try:
        data = os.path.join(work, "data.jsonl")
        _dataset(data, args.samples, args.words, rng)
        tok = train_byte_level_bpe([open(data).read()], vocab_size=400)
        moe = dict(num_moe_experts=args.experts, moe_router_topk=args.moe_topk,
                   moe_ffn_hidden_size=args.moe_ffn or 4 * args.hidden // args.moe_topk) if args.experts else {}
        cfg = GPTModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                             vocab_size=args.vocab, max_position_embeddings=args.seq, params_dtype=args.params_dtype,
                             **moe)
        initialize_parallel(ParallelConfig(seed=1))
        try:
            model = build_gpt_model(cfg, wrap_float16=False)
            full = {k: v for k, v in model.state_dict().items() if torch.is_tensor(v)}
            full["output_layer.weight"] = full["output_layer.weight"] * 20
            del model
            save_full_checkpoint(os.path.join(work, "teacher"), full, cfg)
            del full
            teacher = MegatronTeacher(os.path.join(work, "teacher"))
            ecfg = extract.ExtractConfig(data_path=data, output_path="", top_k=args.k, values_dtype=args.values_dtype,
                                         max_seq_length=args.seq, batch_size=args.batch, progress=False,
                                         fuse_output_layer=args.fuse_output_layer,
                                         output_layer_chunk_tokens=args.chunk_tokens)
            records = read_records(data)
            ctok = ConversationTokenizer(tok, "chat", args.seq)
            block = shard_sample_range(len(records), 0, 1)
            samples = extract._tokenize_block(records, ctok, block)
            batches = []
            for idx in extract._batches(block, block.start, args.batch):
                batches.append(extract._pad_batch([samples[i] for i in idx], idx, args.batch)[0])
            n_tokens = sum(s.num_completion_tokens for s in samples if s is not None)
            n_positions = sum(b.numel() for b in batches)

            def sync():
                if torch.cuda.is_available():
                    torch.cuda.synchronize()

            def forward_only():
                sync()
                t0 = time.perf_counter()
                for b in batches:
                    teacher.run(b, lambda first, logits, group: None, args.batch)
                sync()
                return time.perf_counter() - t0

            def extraction(i, log_tail=True):
                out = os.path.join(work, f"store{i}{'' if log_tail else '_no_tail'}")
                sync()
                t0 = time.perf_counter()
                s = extract.compute_topk_logits(extract.ExtractConfig(**dict(vars(ecfg), output_path=out,
                                                                             log_tail=log_tail)),
                                                teacher, tok, records=records)
                sync()
                return time.perf_counter() - t0, s, out

            forward_only()  # warm-up
            t_fwd, t_ext, summaries, out = [], [], [], None
            no_tail = []  # (seconds, summary) without the log tail mass
            for i in range(args.repeats):  # interleaved, best of
                t_fwd.append(forward_only())
                t, summary, out = extraction(i)
                t_ext.append(t)
                summaries.append(summary)
                if args.log_tail_cost:
                    no_tail.append(extraction(i, log_tail=False)[:2])
            t_f, t_e = min(t_fwd), min(t_ext)
            summary = summaries[t_ext.index(t_e)]
            reader = StoreReader(out)
            bound = 6 * args.k + 16 if args.values_dtype != "float32" else 8 * args.k + 16
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
            print(f"device {device}; teacher {args.layers}L h{args.hidden} V={args.vocab} {args.params_dtype}"
                  f"{f', MoE {args.experts} experts top-{args.moe_topk}' if args.experts else ''}; "
                  f"k={args.k} values={args.values_dtype}; extraction output layer: "
                  f"{f'deferred (completion rows only, chunks of {args.chunk_tokens})' if args.fuse_output_layer else 'whole logits'}")
            print(f"{len(records)} samples, {n_tokens} completion tokens, {n_positions} padded positions, "
                  f"{len(batches)} batches of {args.batch}")
            print(f"forward only : {t_f:8.3f} s  {n_tokens / t_f:10.1f} completion tok/s")
            print(f"extraction   : {t_e:8.3f} s  {n_tokens / t_e:10.1f} completion tok/s "
                  f"(top-k/LSE {summary.stats_s:.3f} s, store writes {summary.write_s:.3f} s)")
            print(f"ratio extraction/forward throughput: {t_f / t_e:.3f}; overhead (t_ext - t_fwd)/t_fwd: "
                  f"{(t_e - t_f) / t_f * 100:.1f}%")
            # The per-token cost, without the run's fixed costs (reading and hashing the dataset,
            # tokenising, hashing the teacher, opening the store), which a real dataset amortises.
            print(f"extraction loop: {summary.elapsed_s:.3f} s; loop overhead (t_loop - t_fwd)/t_fwd: "
                  f"{(summary.elapsed_s - t_f) / t_f * 100:.1f}%; top-k/LSE + writes alone: "
                  f"{(summary.stats_s + summary.write_s) / t_f * 100:.1f}% of the forward")
            print(f"bytes/token: {summary.bytes_per_token:.2f} (bound {bound}: {'ok' if summary.bytes_per_token <= bound else 'EXCEEDED'});"
                  f" store {summary.store_bytes} bytes, {reader.manifest.num_tokens} tokens")
            if no_tail:
                t_n, s_n = min(no_tail, key=lambda x: x[0])
                print(f"without the log tail: extraction {t_n:.3f} s (top-k/LSE {s_n.stats_s:.3f} s), bytes/token "
                      f"{s_n.bytes_per_token:.2f}; the tail costs x{t_e / t_n:.3f} extraction time, x"
                      f"{summary.stats_s / s_n.stats_s:.3f} top-k/LSE time, +{summary.bytes_per_token - s_n.bytes_per_token:.2f}"
                      " bytes/token")
        finally:
            destroy_parallel()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
