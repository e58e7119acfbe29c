#!/usr/bin/env bash
# The main job on the embedded default: install (idempotent), then an end-to-end
# distillation on CPU – tokenizer, teacher, top-k store, KD+SFT and SFT-only students,
# held-out evaluation, comparison table (runs/main_job/results.md) and loss curves
# (runs/main_job/loss_curves.png). Extra arguments go to examples/main_job.py
# (e.g. --smoke, --teacher-steps N, --student-steps N, --seed S).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python examples/main_job.py --out runs/main_job "$@"
