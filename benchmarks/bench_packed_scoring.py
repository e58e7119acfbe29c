"""What packing buys the sampler's scoring passes: scored tokens/s, packed vs padded, same model and pairs.

Teacher-forced scoring (:func:`~nemo_kd.generation.sampling.response_logprobs`, what DASD's student scores,
the preference pipeline's teacher judge and ``score_responses`` run) of (prompt, response) pairs whose
lengths follow the skew of sampled responses: prompts uniform in ``[32, 128)`` tokens, responses
log-normal (median ``--median`` tokens, σ 1.0: a long tail of rambling or unfinished samples), each pair
capped at ``--max-seq-length``. The pairs come in sampling order (shuffled lengths), as the pipelines
score them.

* ``padded`` – ``--batch`` pairs a forward, right-padded to the batch's longest (``pack_length=None``);
* ``packed`` – the pairs in rows of ``--max-seq-length`` positions (``pack_length``; first-fit decreasing,
  Megatron's THD layout: the local spec's SDPA attends inside each pair), ``--batch`` rows a forward.

Reported: response tokens scored per second of each (median of ``--repeat`` alternating passes), the ratio
packed / padded from the same run, the positions each computed, and the largest difference of a log-prob
between the two (they must agree to float32 rounding). No assertion: a benchmark.

    .venv/bin/python benchmarks/bench_packed_scoring.py                       # CPU: 96 pairs, rows of 1024
    .venv/bin/python benchmarks/bench_packed_scoring.py --pairs 512 --layers 8 --hidden 1024 --batch 16   # GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pair_lengths(n: int, max_seq_length: int, median: float, seed: int):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(32, 128, size=n)
    responses = np.maximum(1, rng.lognormal(mean=np.log(median), sigma=1.0, size=n).astype(np.int64))
    responses = np.minimum(responses, max_seq_length - prompts)
    return prompts.tolist(), responses.tolist()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--max-seq-length", type=int, default=1024)
    ap.add_argument("--median", type=float, default=150.0, help="median response tokens")
    ap.add_argument("--batch", type=int, default=8, help="pairs (padded) or rows (packed) per forward")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from nemo_kd.data.packing import pack_plan, sample_positions
    from nemo_kd.generation.sampling import response_logprobs
    from nemo_kd.models import GPTModelConfig, build_gpt_model
    from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29563")
    initialize_parallel(ParallelConfig(seed=1))
    try:
        cfg = GPTModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads,
                             ffn_hidden_size=4 * a.hidden, vocab_size=a.vocab, max_position_embeddings=a.max_seq_length)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = build_gpt_model(cfg).to(device).eval()
        p_len, r_len = pair_lengths(a.pairs, a.max_seq_length, a.median, a.seed)
        g = torch.Generator().manual_seed(a.seed)
        prompts = [torch.randint(0, a.vocab, (n,), generator=g).tolist() for n in p_len]
        responses = [torch.randint(0, a.vocab, (n,), generator=g).tolist() for n in r_len]
        scored_tokens = sum(r_len)

        def run(pack_length):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = response_logprobs(model, prompts, responses, batch_size=a.batch, vocab_size=a.vocab,
                                    pack_length=pack_length)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, out

        run(None), run(a.max_seq_length)  # warm-up (allocator, kernels)
        times = {"padded": [], "packed": []}
        for _ in range(a.repeat):
            t, padded = run(None)
            times["padded"].append(t)
            t, packed = run(a.max_seq_length)
            times["packed"].append(t)
        diff = max(float((x - y).abs().max()) for x, y in zip(padded, packed) if x.numel())
        seqs = [p + r for p, r in zip(p_len, r_len)]
        padded_positions = sum(len(seqs[s:s + a.batch]) * max(seqs[s:s + a.batch]) for s in range(0, len(seqs),
                                                                                                    a.batch))
        rows = pack_plan([sample_positions(n) for n in seqs], a.max_seq_length, shuffle=False)
        packed_positions = sum(len(rows[s:s + a.batch]) * max(sum(sample_positions(seqs[i]) for i in row)
                                                              for row in rows[s:s + a.batch])
                               for s in range(0, len(rows), a.batch))
        res = {name: scored_tokens / statistics.median(ts) for name, ts in times.items()}
        res["ratio"] = res["packed"] / res["padded"]
        print(f"device {device.type}; {a.pairs} pairs, {sum(seqs)} tokens ({scored_tokens} scored), responses median "
              f"{int(np.median(r_len))} / p90 {int(np.percentile(r_len, 90))} / max {max(r_len)} tokens; model "
              f"{a.layers} layers, hidden {a.hidden}, vocab {a.vocab}; batch {a.batch}")
        print(f"padded: {res['padded']:,.0f} scored tokens/s ({padded_positions} positions)")
        print(f"packed: {res['packed']:,.0f} scored tokens/s ({packed_positions} positions, {len(rows)} rows of "
              f"{a.max_seq_length})")
        print(f"packed / padded: {res['ratio']:.2f}x (same run, median of {a.repeat}); largest log-prob "
              f"difference {diff:.2e}")
        return res
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
