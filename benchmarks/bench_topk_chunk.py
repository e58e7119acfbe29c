"""Rows per chunk of the top-k log-prob primitive's torch path on CPU: time of forward + backward.

``vocab_parallel_logprobs_at`` (top-k KD and the label log-prob) over ``[N, V]`` logits at k ids per
row, for several ``token_chunk`` values in the same process (min of ``--reps``), fp32 and bf16. The
default on CPU is ``CPU_TOKEN_CHUNK_ELEMENTS // V`` rows (``nemo_kd.losses.vocab_parallel``).

    .venv/bin/python benchmarks/bench_topk_chunk.py            # N 2048, V 32000, k 64
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemo_kd.losses.vocab_parallel import default_token_chunk, vocab_parallel_logprobs_at  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 64, 4096])
    args = ap.parse_args()
    default = default_token_chunk(args.vocab, torch.device("cpu"))
    chunks = sorted(set(args.chunks + [default]))
    torch.manual_seed(0)
    print(f"N {args.tokens}, V {args.vocab}, k {args.k}; default chunk {default} rows; ms, min of {args.reps}")
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(args.tokens, args.vocab) * 2).to(dtype)
        ids = torch.randint(0, args.vocab, (args.tokens, args.k))
        best = {c: float("inf") for c in chunks}
        for _ in range(args.reps):
            for c in chunks:  # interleaved: load from other processes falls on every chunk size alike
                xx = x.clone().requires_grad_(True)
                start = time.perf_counter()
                lp, _ = vocab_parallel_logprobs_at(xx, ids, token_chunk=c)
                lp.sum().backward()
                best[c] = min(best[c], time.perf_counter() - start)
        print(f"{str(dtype):15s} " + "  ".join(f"{c} rows: {1e3 * t:.0f}" + (" (default)" if c == default else "")
                                           for c, t in best.items()))


if __name__ == "__main__":
    main()
