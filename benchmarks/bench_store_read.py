"""What verified reads cost: samples/s of the logits store read with and without per-sample checksums.

Writes a store shaped like a training one (bf16 log-prob values, k top-k entries per token), then reads every
sample through ``StoreReader.__getitem__`` (what the training dataset calls) in alternating passes: verified
(xxh3_64 of each sample's ids, LSE and values) and not verified (the same reader with its checksum table
detached), sample by sample in alternating order. The page cache is warm in both, so the ratio is the CPU cost of the checks against the rest of the
read (decode, copies, tensors); ``--cold`` drops the page cache before every pass (root), so that the reads
come from the disk as a store larger than memory does in training. Also prints what
opening the store costs (manifest vs shard records, layout check, hashing the index and checksum files).

    .venv/bin/python benchmarks/bench_store_read.py               # 2000 samples x 512 tokens, k=32
    .venv/bin/python benchmarks/bench_store_read.py --k 100 --tokens 1024 --samples 500
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nemo_kd.teacher.store import StoreManifest, StoreReader, StoreWriter  # noqa: E402


def _write(path: str, samples: int, tokens: int, k: int) -> None:
    m = StoreManifest(k=k, values_dtype="bfloat16", values_encoding="logprobs", format_version=3,
                      min_reader_version=3, max_seq_length=tokens, num_samples=samples, teacher_vocab_size=32000)
    rng = np.random.default_rng(0)
    w = StoreWriter(path, m)
    for i in w.remaining():
        n = int(rng.integers(tokens // 2, tokens + 1))
        values = -np.sort(-rng.normal(size=(n, k)).astype(np.float32) * 3, axis=1)
        w.append(i, values, rng.integers(0, 32000, size=(n, k)), values[:, 0] + 1.0, -1.0)
    w.finalize()


def _pass_one_way(reader: StoreReader, sums, checked: bool) -> float:
    """Seconds to read every sample, verified (``checked``) or not."""
    reader._sums = sums if checked else []
    start = time.perf_counter()
    for i in range(len(reader)):
        reader[i]
    elapsed = time.perf_counter() - start
    reader._sums = sums
    return elapsed


def _pass(reader: StoreReader, sums) -> tuple:
    """One read of every sample both ways, interleaved sample by sample (alternating which goes first), so that
    load from other processes on this machine falls on both alike; returns (verified, not verified) seconds."""
    clock = time.perf_counter
    verified = plain = 0.0
    for i in range(len(reader)):
        for checked in ((True, False) if i % 2 else (False, True)):
            reader._sums = sums if checked else []
            start = clock()
            reader[i]
            if checked:
                verified += clock() - start
            else:
                plain += clock() - start
    reader._sums = sums
    return verified, plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before every pass (root only): reads come from the disk")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        _write(path, args.samples, args.tokens, args.k)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        opens = []
        for _ in range(args.passes):
            start = time.perf_counter()
            reader = StoreReader(path)
            opens.append(time.perf_counter() - start)
        sums = reader._sums
        _pass(reader, sums)  # warm the page cache

        def drop_cache():
            reader.close()
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:  # PermissionError without root: say so
                f.write("1\n")
            reader.__init__(path)

        if args.cold:
            # One way per pass, each from a dropped cache (interleaving sample by sample would let the second
            # read of each sample hit the cache the first one filled); the order alternates between passes.
            verified, plain = [], []
            for i in range(args.passes):
                for checked in ((True, False) if i % 2 else (False, True)):
                    drop_cache()
                    (verified if checked else plain).append(_pass_one_way(reader, reader._sums, checked))
        else:
            verified, plain = zip(*(_pass(reader, sums) for _ in range(args.passes)))
        v, p = statistics.median(verified), statistics.median(plain)
        n = len(reader)
        print(f"page cache: {'dropped before each pass (reads from disk)' if args.cold else 'warm'}")
        print(f"store: {n} samples, {reader.manifest.num_tokens} tokens, k={args.k} bf16, {size / 2**20:.0f} MiB")
        print(f"open (cross-checks + index/checksum sha256): median {1e3 * statistics.median(opens):.1f} ms")
        print(f"read, verified:     {n / v:9.0f} samples/s  ({size / 2**20 / v:6.0f} MiB/s)  median of {args.passes}")
        print(f"read, not verified: {n / p:9.0f} samples/s  ({size / 2**20 / p:6.0f} MiB/s)")
        print(f"verification overhead: {100 * (v / p - 1):+.2f}% of the read time (target <= 2%)")


if __name__ == "__main__":
    main()
