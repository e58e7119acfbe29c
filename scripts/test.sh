#!/usr/bin/env bash
# The README's test command: install (idempotent) and run the whole CPU test suite,
# multi-process gloo tests (TP=2, PP=2, DP=2) and Triton interpreter tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
set +e
# Two workers, a file per worker at a time (--dist loadfile: module fixtures are built once, the Slurm
# tests share one worker): many tests wait on subprocess start-up, servers and Slurm polling, and the
# other worker's tests fill those waits. PYTEST_WORKERS=0 runs everything in one process.
.venv/bin/python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=15 tests "$@"
rc=$?
set -e
# pytest exits 5 when no test was collected: that is a failure of the suite, say so.
if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
exit "$rc"
