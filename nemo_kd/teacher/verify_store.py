"""``nemo-kd-verify-store``: check a teacher logits store completely before (or after) a long run.

Opening a store already checks its manifest against the shard records, the sizes the manifest implies and the
small files (indices, checksums); training then checks each sample's fields as it reads them. This command does
the rest up front: every file hashed whole against the manifest's sha256, then every sample read through its
per-sample checks. It exits 0 and prints what it checked, or exits 1 naming the first damaged file or sample::

    nemo-kd-verify-store /stores/train            # whole files + every sample
    nemo-kd-verify-store /stores/train --files-only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from nemo_kd.teacher.store import StoreError, StoreReader

__all__ = ["main"]


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="nemo-kd-verify-store", description=__doc__.split("\n\n")[0])
    parser.add_argument("store", nargs="+", help="store directory (several may be given)")
    parser.add_argument("--files-only", action="store_true",
                        help="hash the files whole only; skip reading every sample through its checksums")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    failed = 0
    for path in args.store:
        start = time.perf_counter()
        try:
            with StoreReader(path) as reader:
                m = reader.manifest
                files = reader.verification_steps(samples=False)
                steps = reader.verification_steps(samples=not args.files_only)
                bar = None
                if not args.no_progress:
                    from tqdm import tqdm

                    bar = tqdm(total=steps, unit="step", dynamic_ncols=True, file=sys.stderr, desc=f"verifying {path}")
                reader.verify_checksums(samples=not args.files_only, progress=bar.update if bar else None)
                if bar is not None:
                    bar.close()
        except (StoreError, OSError) as e:
            print(f"CORRUPT {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        seconds = time.perf_counter() - start
        per_sample = ("every sample's fields against their xxh3_64 checksums" if reader.has_sample_checksums else
                      "no per-sample checksums (written before nemo_kd 0.2): the whole files are all there is")
        print(f"OK {path}: {m.num_samples} samples, {m.num_tokens} tokens, k={m.k} {m.values_dtype}, "
              f"{_size(path) / 2**20:.1f} MiB; checked: manifest vs shard records and sizes, {files} files' sha256"
              + ("" if args.files_only else f", {per_sample}") + f" ({seconds:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
