#!/usr/bin/env bash
# The benchmark's OWN environment for benchmarks/bench_kd_divergences.py (and bench_kd_loss.py): nemo_kd plus the baselines it
# compares against (TRL's generalized_jsd_loss, Liger-Kernel's JSD / KL losses), which are never
# dependencies of the package. A fresh venv (no --system-site-packages, so nothing leaks in or out
# of .venv), torch pinned to the CPU build the project uses, so no dependency resolution can pull
# a multi-GB CUDA torch (a constraints file holds torch at that version for every later install).
#
#   bash benchmarks/bench_env.sh [VENV_DIR]          # default /tmp/nemo_kd_benchenv
#   VENV_DIR/bin/python benchmarks/bench_kd_divergences.py   # every divergence, top-k and full vocabulary
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/nemo_kd_benchenv}
PY=${PYTHON:-python3}
TORCH_VERSION=2.13.0
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q)
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first and pinned (scripts/install.sh does the same); the CPU wheel index is a fallback
# for machines whose default index would resolve the CUDA build.
"${PIP[@]}" "torch==$TORCH_VERSION" || "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
CONSTRAINTS="$VENV/torch-constraint.txt"
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" > "$CONSTRAINTS"
# The loss library needs only torch (and triton for its fused kernels, the version
# requirements.txt pins): not Megatron or NeMo, which the benchmark never imports.
"${PIP[@]}" -c "$CONSTRAINTS" "$(grep -E '^triton' requirements.txt)" numpy
# The baselines. TRL's and Liger's declared dependencies (transformers, accelerate, datasets,
# triton) carry no CUDA build of their own; the constraint keeps torch where it is.
"${PIP[@]}" -c "$CONSTRAINTS" trl liger-kernel
"${PIP[@]}" --no-deps -e .
# Fail loudly if anything CUDA slipped in.
if "$VENV/bin/python" -m pip list 2>/dev/null | grep -i -E '^nvidia-|^torch .*\+cu'; then
  echo "bench_env.sh: a CUDA package was installed into $VENV" >&2
  exit 1
fi
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as md
import torch
print("benchmark env: torch", torch.__version__, "| trl", md.version("trl"), "| liger-kernel", md.version("liger-kernel"),
      "| nemo_kd", md.version("nemo_kd"))
EOF
