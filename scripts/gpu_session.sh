#!/usr/bin/env bash
# On a lent GPU machine (the `device` tool), one call per stage; results under $OUT:
#
#   bash scripts/gpu_wheels.sh                          # here, once: .whl/ (megatron-core cp312, liger-kernel)
#   run(command="bash scripts/gpu_session.sh kernels", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_session.sh step",    carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_session.sh extract", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_session.sh losses",  carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_session.sh cp",      carry=[".whl"], timeout_s=600)   # needs 2 GPUs
#   run(command="bash scripts/gpu_session.sh moe",     carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_session.sh packing", carry=[".whl"], timeout_s=600)
#
# Stages (each well inside the 10-minute limit of one call):
#   kernels  issue 7: fused top-k and online kernels vs naive / torch / HBM floor, block-size sweep,
#            lm_head rows (materialised vs deferred projection) and Liger's fused-linear JSD
#   step     issue 7: a Megatron step of a ~1.7B GPT (V=128256), SFT vs top-k KD vs online KD,
#            logits materialised vs deferred (kd.fuse_output_layer); the KD / SFT time ratio
#   extract  issue 3: compute_topk_logits throughput vs the teacher's forward-only pass at V=128256,
#            whole logits and deferred projection
#   losses   issue 14: the loss benchmark's GPU rows: every divergence, top-k and full vocabulary, fp32 and
#            bf16, nemo_kd fused (and in-place) vs torch vs naive vs Liger's Triton JSD / KLDiv, time and
#            extra memory as ratios to naive from the same run
#   cp       issue 16: context parallelism on the TE spec, CP=2 vs CP=1 (DP=2) on two GPUs, same weights and
#            global batch (offline top-k KD + SFT + DPKD pairs, bf16, seq 8192): loss and grad norm per step
#            within tolerance, ms/step and tokens/s of each layout. Needs 2 GPUs: with fewer it says so and
#            exits 0 (a lent machine has one)
#   moe      issue 17: a KD step of an MoE student vs a dense one of the same active size, TE spec (experts as
#            TEGroupedMLP: grouped GEMM) and local spec (SequentialMLP), bf16; EP=2 vs EP=1 with 2 GPUs
#   packing  issue 16: packed rows in Megatron's THD layout through TE's attention (cu_seqlens) vs the local
#            spec, bf16: the whole dataset's objective packed == padded from the same weights, then real
#            tokens/s packed vs padded (log-normal lengths, median ~300, rows of 4096)
# GPU_SESSION_SMOKE=1 runs every stage at CPU smoke size (checks this script, not the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-kernels}
OUT=${OUT:-/tmp/gpu_session_out}
mkdir -p "$OUT"
smoke=${GPU_SESSION_SMOKE:-0}
PY=${PYTHON:-python3}
if [ "$smoke" = 0 ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.md"
else
    export TRITON_INTERPRET=1
    echo "smoke run (CPU)" | tee "$OUT/summary.md"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1

step() {  # step NAME CMD...: full log in $OUT/NAME.log, its tail in summary.md
    local name=$1; shift
    echo "== $name: $*" | tee -a "$OUT/summary.md"
    local t0=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 60 "$OUT/$name.log" >> "$OUT/summary.md"
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.md"
}

case "$stage" in
kernels)
    if [ "$smoke" = 1 ]; then
        step kernels "$PY" benchmarks/bench_fused_kernel.py --cpu-smoke --liger-hidden 32 --projection-chunk 8
    else
        step kernels_topk "$PY" benchmarks/bench_fused_kernel.py --tune --quick --case topk
        step kernels_full "$PY" benchmarks/bench_fused_kernel.py --quick --case full --full-loss jsd
        step kernels_skew "$PY" benchmarks/bench_fused_kernel.py --quick --case full --full-loss skew_rkl
    fi
    ;;
step)
    if [ "$smoke" = 1 ]; then
        step train_step "$PY" benchmarks/bench_train_step.py --repeat 1 --steps 1 --warmup 1 --inplace on \
            --projection both --variants sft topk-torch
    else
        step train_step "$PY" benchmarks/bench_train_step.py --gpu --inplace on --projection both \
            --variants sft topk-fused online-fused --out "$OUT/train_step.md"
    fi
    ;;
extract)
    if [ "$smoke" = 1 ]; then
        args=(--vocab 4096 --hidden 64 --layers 2 --heads 4 --seq 128 --batch 2 --samples 4 --k 16 --repeats 1)
    else
        args=(--vocab 128256 --hidden 2048 --layers 16 --heads 16 --seq 2048 --batch 8 --samples 64 --k 64
              --params-dtype bf16)
    fi
    step extract_whole "$PY" benchmarks/bench_extract.py "${args[@]}"
    step extract_deferred "$PY" benchmarks/bench_extract.py "${args[@]}" --fuse-output-layer
    ;;
losses)
    if [ "$smoke" = 1 ]; then
        step kd_divergences "$PY" benchmarks/bench_kd_divergences.py --device cpu --tokens 64 --vocab 512 --k 16 \
            --reps 1 --formulations "naive;nemo_kd torch" --json "$OUT/kd_divergences.json"
    else
        step kd_divergences "$PY" benchmarks/bench_kd_divergences.py --device cuda --reps 3 \
            --formulations "naive;nemo_kd torch;nemo_kd fused;nemo_kd fused, in-place grad;Liger JSD (Triton);Liger KLDiv (Triton)" \
            --json "$OUT/kd_divergences.json"
    fi
    ;;
moe)
    if [ "$smoke" = 1 ]; then
        step moe_local "$PY" benchmarks/bench_moe.py --hidden 32 --moe-ffn 32 --experts 4 --vocab 256 --seq 32 \
            --steps 1 --warmup 0 --variants dense moe-ep1
    else
        variants=(dense moe-ep1)
        [ "$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" -ge 2 ] && variants+=(moe-ep2)
        args=(--hidden 1024 --heads 16 --layers 4 --experts 8 --topk 2 --moe-ffn 1024 --vocab 32768 --seq 2048
              --gbs 8 --mbs 2 --warmup 2 --steps 5 --params-dtype bf16 --variants "${variants[@]}")
        step moe_te_grouped_gemm "$PY" benchmarks/bench_moe.py "${args[@]}" --transformer-impl transformer_engine
        step moe_local_sequential "$PY" benchmarks/bench_moe.py "${args[@]}" --transformer-impl local
    fi
    ;;
packing)
    if [ "$smoke" = 1 ]; then
        step packing_local "$PY" benchmarks/bench_packing.py --samples 8 --seq-length 512 --hidden 32
    else
        args=(--samples 256 --seq-length 4096 --rows-per-step 4 --micro-batch 1 --layers 4 --hidden 1024
              --vocab 32768 --k 64 --params-dtype bf16)
        step packing_te_thd "$PY" benchmarks/bench_packing.py "${args[@]}" --transformer-impl transformer_engine
        step packing_local "$PY" benchmarks/bench_packing.py "${args[@]}" --transformer-impl local
    fi
    ;;
cp)
    if [ "$smoke" = 1 ]; then  # the local spec with tests/cp_attention.py's exact reference CP attention, gloo
        step cp_local_reference "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
            benchmarks/bench_context_parallel.py --impl local-reference --seq 32 --hidden 32 --layers 2 --heads 4 \
            --vocab 256 --topk 8 --params-dtype fp32 --steps 2 --json "$OUT/context_parallel.json"
    else
        ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
        if [ "$ngpu" -lt 2 ]; then
            echo "== cp: context_parallel_size=2 needs 2 GPUs, $ngpu visible: skipped (nothing run)" \
                | tee -a "$OUT/summary.md"
            exit 0
        fi
        step cp_transformer_engine "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 \
            benchmarks/bench_context_parallel.py --impl transformer_engine --json "$OUT/context_parallel.json"
    fi
    ;;
*)
    echo "unknown stage $stage (kernels | step | extract | losses | cp)" >&2
    exit 2
    ;;
esac
