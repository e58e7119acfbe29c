#!/usr/bin/env bash
# Set up nemo_kd on a fresh machine: a virtual environment in .venv with the pinned
# CPU stack (Python 3.11, torch 2.13.0, megatron-core 0.16.1, NeMo 3.0.0) and the
# package itself in editable mode. Safe to re-run: pip skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so nothing later pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python -c "import torch, megatron.core, nemo_kd; print('nemo_kd', nemo_kd.__version__, '| torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
