#!/usr/bin/env bash
# Run HERE (not on the GPU machine): fetch the cp312 wheels the lent GPU machine lacks into .whl/
# (git-ignored through .git/info/exclude), for scripts/gpu_session.sh. Its image already has torch,
# triton, transformers, tokenizers, numpy, packaging, tqdm (/work/.library/device/KINDS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    megatron-core==0.16.1 liger-kernel==0.8.5
ls -la .whl
