"""Sampling throughput: Megatron's KV cache vs re-running the prefix, same model, prompts and draws.

    python benchmarks/bench_sampling.py                      # CPU default: 4 layers, h 256, 32 prompts
    python benchmarks/bench_sampling.py --layers 8 --hidden 1024 --prompts 64 --new-tokens 256   # GPU

Prints tokens/s of both decoders and their ratio, measured in the same run, and checks the two
produced the same tokens (they must: same logits to float rounding, same per-row draws).
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    a = p.parse_args(argv)

    from nemo_kd.generation.sampling import SamplingConfig, generate
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    initialize_parallel(ParallelConfig(seed=1))
    try:
        cfg = GPTModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                             ffn_hidden_size=4 * a.hidden, vocab_size=a.vocab,
                             max_position_embeddings=a.prompt_len + a.new_tokens)
        model = build_gpt_model(cfg)
        if torch.cuda.is_available():
            model = model.cuda()
        g = torch.Generator().manual_seed(0)
        # prompts of different lengths (half to full prompt-len): the KV path prefills to the shortest
        prompts = [torch.randint(0, a.vocab, (int(l),), generator=g).tolist()
                   for l in torch.randint(a.prompt_len // 2, a.prompt_len + 1, (a.prompts,), generator=g)]
        sc = SamplingConfig(temperature=1.0, max_new_tokens=a.new_tokens, seed=3)
        results, outs = {}, {}
        for name, kv in (("re-run prefix", False), ("KV cache", True)):
            best = float("inf")
            for _ in range(a.repeat):
                t0 = time.perf_counter()
                outs[name] = generate(model, prompts, sc, eos_id=None, pad_id=0, vocab_size=a.vocab,
                                      batch_size=a.batch, use_kv_cache=kv)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            tokens = sum(len(x.token_ids) for x in outs[name])
            results[name] = tokens / best
            print(f"{name:>14}: {tokens} tokens in {best:.2f} s = {tokens / best:,.0f} tokens/s", flush=True)
        same = all(x.token_ids == y.token_ids for x, y in zip(outs["re-run prefix"], outs["KV cache"]))
        ratio = results["KV cache"] / results["re-run prefix"]
        print(f"KV cache / re-run: {ratio:.2f}x faster; identical tokens: {same}", flush=True)
        return {"tokens_per_s": results, "speedup": ratio, "identical": same}
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
