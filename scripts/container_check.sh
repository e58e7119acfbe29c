#!/usr/bin/env bash
# Does nemo_kd work in this Python environment? Run at `docker build` time (Dockerfile), in the
# built container on a GPU node, and in the CPU test suite (tests/test_container_check.py):
#
#   1. prints the versions of the stack (python, torch + CUDA, megatron-core, NeMo, Lightning,
#      transformers, triton, transformer_engine and apex when present);
#   2. imports EVERY module of the nemo_kd package (pkgutil walk, cross-checked against the .py files
#      on disk); any import error fails the check, naming the module;
#   3. runs a 2-step DistillationEngine smoke (top-k KD + SFT on random data with a random teacher,
#      Megatron schedule + DDP + Adam) with transformer_impl=local, on CUDA when available, else CPU.
#      On CPU, an installed TE / apex (NVIDIA's image at `docker build` time: no GPU) is hidden from
#      the smoke's process: Megatron binds their CUDA-only fused Adam and multi-tensor kernels at
#      import, and nemo_kd's CPU path is Megatron without them;
#   4. when transformer_engine imports and CUDA is available, the same smoke with
#      transformer_impl=transformer_engine (TE layers need a GPU); otherwise one line says why not.
#
# Exits non-zero on any failure; the last line of a passing run is `container_check: OK (...)`.
#
#   bash scripts/container_check.sh [--python PY] [--package-root DIR] [--imports-only] [--require-te]
#
#   --python PY         interpreter to check (default: $PYTHON, else python3)
#   --package-root DIR  check the nemo_kd package under DIR (prepended to PYTHONPATH; the check fails if
#                       nemo_kd is imported from anywhere else), e.g. a checkout or a modified copy
#   --imports-only      versions and the import walk only (no training smoke)
#   --require-te        a transformer_engine that does not import, or no CUDA for its smoke, is a failure
#                       (use on GPU nodes: `docker run --gpus all ... bash scripts/container_check.sh --require-te`)
set -euo pipefail

PY=${PYTHON:-python3}
PACKAGE_ROOT=""
IMPORTS_ONLY=0
REQUIRE_TE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY=${2:?--python needs an interpreter}; shift 2 ;;
        --package-root) PACKAGE_ROOT=${2:?--package-root needs a directory}; shift 2 ;;
        --imports-only) IMPORTS_ONLY=1; shift ;;
        --require-te) REQUIRE_TE=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "container_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
PY_PATH=$(command -v "$PY" 2>/dev/null) || { echo "container_check: FAILED: no interpreter $PY" >&2; exit 1; }
case "$PY_PATH" in /*) PY=$PY_PATH ;; *) PY="$PWD/$PY_PATH" ;; esac  # the check runs from a temp dir
if [ -n "$PACKAGE_ROOT" ]; then
    if [ ! -d "$PACKAGE_ROOT/nemo_kd" ]; then
        echo "container_check: FAILED: no nemo_kd package under $PACKAGE_ROOT" >&2
        exit 1
    fi
    PACKAGE_ROOT=$(cd "$PACKAGE_ROOT" && pwd)
    export PYTHONPATH="$PACKAGE_ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
export CONTAINER_CHECK_PACKAGE_ROOT="$PACKAGE_ROOT"
# The smoke is one process: a launcher's environment (torchrun, srun inside an allocation) must not
# make it wait for ranks that will never come.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE SLURM_PROCID SLURM_NTASKS SLURM_LOCALID MASTER_ADDR MASTER_PORT
# Megatron's and NeMo's optional-dependency warnings (TE/apex absent on CPU) are not this check's news.
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/container_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"  # nothing the check runs writes into the checkout

# ---------------------------------------------------------------- 1 + 2: versions and the import walk
"$PY" - > "$WORK/stage1.out" <<'EOF' || { cat "$WORK/stage1.out"; exit 1; }
import importlib
import importlib.metadata as md
import os
import pkgutil
import platform
import sys
import traceback


def say(msg):
    print(f"container_check: {msg}", flush=True)


def dist_version(*names):
    for name in names:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            continue
    return None


say(f"python {platform.python_version()} ({sys.executable})")
import torch  # noqa: E402

cuda = torch.cuda.is_available()
device = f", device {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if cuda else ""
say(f"torch {torch.__version__} (built with CUDA {torch.version.cuda or 'none'}; CUDA available: {cuda}{device})")
for label, names in (("megatron-core", ("megatron-core", "megatron_core")),
                     ("nemo_toolkit", ("nemo_toolkit", "nemo-toolkit")), ("lightning", ("lightning",)),
                     ("transformers", ("transformers",)), ("triton", ("triton", "pytorch-triton"))):
    say(f"{label} {dist_version(*names) or 'NOT INSTALLED'}")
for label, names in (("transformer_engine", ("transformer_engine", "transformer-engine", "transformer_engine_torch")),
                     ("apex", ("apex",))):
    v = dist_version(*names)
    say(f"{label} {v}" if v else f"{label} not installed (optional: GPU extras)")

root = os.environ.get("CONTAINER_CHECK_PACKAGE_ROOT") or None
try:
    import nemo_kd
except BaseException as e:
    say(f"FAILED import nemo_kd: {type(e).__name__}: {e}")
    traceback.print_exc(file=sys.stdout)
    sys.exit(1)

pkg_dir = os.path.dirname(os.path.abspath(nemo_kd.__file__))
if root and not pkg_dir.startswith(os.path.join(root, "nemo_kd")):
    say(f"FAILED: nemo_kd imported from {pkg_dir}, not from --package-root {root}")
    sys.exit(1)
say(f"nemo_kd {getattr(nemo_kd, '__version__', '?')} from {pkg_dir}")

failures = {}
walked = ["nemo_kd"]


def walk(package_name, package_path):
    """Import every module of a package, depth first (pkgutil.iter_modules: what Python can import)."""
    for info in pkgutil.iter_modules(package_path, package_name + "."):
        walked.append(info.name)
        try:
            module = importlib.import_module(info.name)
        except BaseException:  # a module that calls sys.exit() or raises anything at import time is broken
            failures[info.name] = traceback.format_exc()
            continue
        if info.ispkg:
            walk(info.name, module.__path__)


walk("nemo_kd", nemo_kd.__path__)
on_disk = set()
for dirpath, dirnames, filenames in os.walk(pkg_dir):
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    rel = os.path.relpath(dirpath, os.path.dirname(pkg_dir)).replace(os.sep, ".")
    for f in filenames:
        if f.endswith(".py"):
            on_disk.add(rel if f == "__init__.py" else f"{rel}.{f[:-3]}")
for name, tb in sorted(failures.items()):
    last = tb.strip().splitlines()[-1]
    say(f"FAILED import {name}: {last}")
    frames = [ln for ln in tb.strip().splitlines() if "<frozen importlib" not in ln]  # the import system's own
    print("    " + "\n    ".join(frames[-8:]), flush=True)
unreached = sorted(on_disk - set(walked) - set(failures))
# Modules of a package that failed to import cannot be walked: they are reported with their package.
unreached = [m for m in unreached if not any(m.startswith(f + ".") for f in failures)]
for name in unreached:
    say(f"FAILED: {name} is a .py file of the package that the import walk cannot reach "
        "(a folder without __init__.py?)")
if failures or unreached:
    say(f"FAILED: {len(failures)} of {len(walked)} nemo_kd modules did not import"
        + (f", {len(unreached)} not reachable" if unreached else "") + ": " + ", ".join(sorted(failures) + unreached))
    sys.exit(1)
say(f"imported {len(walked)} nemo_kd modules (every .py file of the package)")
EOF
cat "$WORK/stage1.out"
summary_re='s/^container_check: \(python\|torch\|megatron-core\|nemo_toolkit\) \([^ ]*\).*/\1 \2/p'
summary=$(sed -n "$summary_re" "$WORK/stage1.out" | paste -sd, - | sed 's/,/, /g')
modules=$(sed -n 's/^container_check: imported \([0-9]*\) nemo_kd modules.*/\1/p' "$WORK/stage1.out")

# Can the Transformer Engine path run here? Asked before the smokes, so --require-te fails fast.
te_state=$("$PY" -c '
import torch
try:
    import transformer_engine.pytorch  # noqa: F401
except BaseException as e:
    msg = str(e).splitlines()[0] if str(e) else repr(e)
    print(f"absent|{type(e).__name__}: {msg}")
else:
    print("ready" if torch.cuda.is_available() else "nocuda|it imports, but there is no CUDA device (TE layers need one)")
' 2>/dev/null || echo "absent|the probe itself failed")
if [ "$te_state" != ready ] && [ "$REQUIRE_TE" = 1 ]; then
    echo "container_check: FAILED: --require-te, and transformer_engine cannot run here (${te_state#*|})"
    exit 1
fi

if [ "$IMPORTS_ONLY" = 1 ]; then
    echo "container_check: OK ($summary; $modules modules imported; smoke not run: --imports-only)"
    exit 0
fi

# ---------------------------------------------------------------- 3 + 4: the training smoke
smoke() {  # smoke IMPL: 2 engine steps with transformer_impl=IMPL; prints one result line
    "$PY" - "$1" <<'EOF'
import math
import os
import socket
import sys
import time

import torch

impl = sys.argv[1]
t0 = time.perf_counter()
hidden = []
if not torch.cuda.is_available():
    # Megatron binds Transformer Engine's / apex's fused Adam and multi-tensor kernels at import when
    # they are installed (the NVIDIA image, built without a GPU), and those run on CUDA only. The CPU
    # path is Megatron without them (nemo_kd.parallel.cpu_shim): hide them from this process.
    import importlib.abc
    import importlib.util

    CUDA_ONLY = ("transformer_engine", "transformer_engine_torch", "apex", "amp_C")
    hidden = [n for n in CUDA_ONLY if importlib.util.find_spec(n) is not None]

    class _HideCudaOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in CUDA_ONLY:
                raise ModuleNotFoundError(f"{name}: hidden by container_check (CUDA-only kernels, CPU run)", name=name)
            return None

    sys.meta_path.insert(0, _HideCudaOnly())
from nemo_kd.losses.objective import DistillationLossConfig  # noqa: E402
from nemo_kd.models import GPTModelConfig  # noqa: E402
from nemo_kd.models.engine import BatchConfig, DistillationEngine, OptimConfig  # noqa: E402
from nemo_kd.parallel import ParallelConfig, destroy_parallel, initialize_parallel  # noqa: E402

SEQ, MICRO, GBS, VOCAB, K, SFT_W, STEPS = 16, 2, 4, 256, 8, 0.5, 2


def global_batch():
    """Random sequences and a random teacher that prefers token (x+1) mod V, as its top-k + log-sum-exp."""
    g = torch.Generator().manual_seed(100)
    tokens = torch.randint(0, VOCAB, (GBS, SEQ + 1), generator=g)
    mask = torch.ones(GBS, SEQ)
    mask[:, :4] = 0  # prompt positions
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    t_logits = torch.randn(GBS, SEQ, VOCAB, generator=g)
    t_logits.scatter_add_(-1, ((inputs + 1) % VOCAB)[..., None], torch.full((GBS, SEQ, 1), 6.0))
    vals, ids = t_logits.topk(K, dim=-1)
    return dict(inputs=inputs, labels=labels, loss_mask=mask, position_ids=torch.arange(SEQ).expand(GBS, SEQ),
                teacher_values=vals, teacher_ids=ids, teacher_lse=torch.logsumexp(t_logits, -1))


with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
initialize_parallel(ParallelConfig(seed=5))
try:
    model = GPTModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                           ffn_hidden_size=128, vocab_size=VOCAB, max_position_embeddings=SEQ, transformer_impl=impl)
    loss = DistillationLossConfig(kd_loss_weight=1.0, sft_loss_weight=SFT_W, topk_convention="exact_tail")
    engine = DistillationEngine(model, loss, OptimConfig(lr=1e-2, clip_grad=1.0),
                                BatchConfig(micro_batch_size=MICRO, global_batch_size=GBS, seq_length=SEQ),
                                max_steps=STEPS)
    before = [p.detach().clone() for p in engine.module.parameters()]
    batch = global_batch()
    mbs = [{k: v[i:i + MICRO] for k, v in batch.items()} for i in range(0, GBS, MICRO)]
    history = [engine.train_step(mbs) for _ in range(STEPS)]
    moved = max((p.detach() - b).abs().max().item() for p, b in zip(engine.module.parameters(), before))
    device = "cuda" if torch.cuda.is_available() else "cpu"
finally:
    destroy_parallel()
problems = []
for i, m in enumerate(history):
    values = [m["loss"], m["kd_loss"], m["sft_loss"], m["grad_norm"]]
    if not all(math.isfinite(v) for v in values):
        problems.append(f"step {i}: non-finite metrics {m}")
    elif abs(m["loss"] - (m["kd_loss"] + SFT_W * m["sft_loss"])) > 1e-4 * max(1.0, abs(m["loss"])):
        problems.append(f"step {i}: loss {m['loss']} != kd_loss + {SFT_W} * sft_loss "
                        f"({m['kd_loss']}, {m['sft_loss']})")
    elif m["grad_norm"] <= 0 or m.get("update_skipped", 0.0):
        problems.append(f"step {i}: no update (grad_norm {m['grad_norm']}, skipped {m.get('update_skipped')})")
if not moved > 0:
    problems.append("the weights did not change over the steps")
if problems:
    print(f"container_check: FAILED smoke {impl} ({device}): " + "; ".join(problems), flush=True)
    sys.exit(1)
losses = " -> ".join(f"{m['loss']:.4f}" for m in history)
note = f" (hidden on CPU: {', '.join(hidden)})" if hidden else ""
print(f"container_check: smoke {impl} ({device}): {STEPS} DistillationEngine steps (top-k KD + SFT), "
      f"loss {losses}, kd {history[-1]['kd_loss']:.4f}, grad norm {history[-1]['grad_norm']:.3f}, "
      f"{time.perf_counter() - t0:.1f} s{note}", flush=True)
EOF
}

smoke local | tee "$WORK/smoke_local.out"
done_smokes="local ($(sed -n 's/.*smoke local (\([a-z]*\)).*/\1/p' "$WORK/smoke_local.out"))"

if [ "$te_state" = ready ]; then
    smoke transformer_engine
    done_smokes="$done_smokes, transformer_engine (cuda)"
    te_note="TE smoke passed"
else
    echo "container_check: transformer_engine cannot run here (${te_state#*|}): TE smoke skipped"
    te_note="TE smoke skipped"
fi
echo "container_check: OK ($summary; $modules modules imported; smoke: $done_smokes; $te_note)"
