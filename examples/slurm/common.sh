# Sourced by the *.sbatch scripts: one task per GPU, rendezvous on the first node.
# Override any of these in the environment before `sbatch`.
#   CONTAINER   – a NeMo container image (pyxis/enroot); empty: run on the host's environment
#   MOUNTS      – container mounts, e.g. "/lustre:/lustre"
#   NEMO_KD_DIR – this repository on a shared filesystem
set -euo pipefail
NEMO_KD_DIR=${NEMO_KD_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
# nemo_kd.parallel reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID when RANK etc. are unset.
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron: ordered TP/SP communication kernels
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}

run_srun() {
  local args=(--kill-on-bad-exit=1 --cpu-bind=none)
  if [ -n "${CONTAINER:-}" ]; then
    args+=(--container-image="$CONTAINER" --container-workdir="$NEMO_KD_DIR" --no-container-mount-home)
    [ -n "${MOUNTS:-}" ] && args+=(--container-mounts="$MOUNTS")
  fi
  echo "srun ${args[*]} $*" >&2
  srun "${args[@]}" "$@"
}
