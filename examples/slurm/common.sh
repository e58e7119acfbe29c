# Sourced by examples/slurm/*.sbatch: one task per GPU, rendezvous on the first node.
#
# Slurm runs a COPY of the batch script from its spool directory (/var/spool/slurmd/jobN/), so
# neither the script nor this file may locate the repository through $0 or BASH_SOURCE. Each
# .sbatch finds it first (NEMO_KD_DIR, else the directory `sbatch` was run from,
# SLURM_SUBMIT_DIR, checked to hold nemo_kd/) and then sources this file from there.
#
# Environment read here (set before `sbatch`; sbatch exports the submitting shell's environment):
#   NEMO_KD_DIR  this repository on a filesystem every node sees (default: $SLURM_SUBMIT_DIR)
#   PYTHON       the interpreter inside the job (default: python), e.g. $NEMO_KD_DIR/.venv/bin/python
#   CONTAINER    a container image for pyxis/enroot (srun --container-image), e.g.
#                nvcr.io/nvidia/nemo:25.09 or /lustre/images/nemo_kd.sqsh; empty: the host's environment
#   MOUNTS       extra container mounts for data and checkpoints, "src:dst[,src:dst...]", e.g.
#                "/lustre/data:/data,/lustre/ckpt:/ckpt". The repository and the job's working
#                directory are always mounted at their own paths; the working directory is the
#                container's workdir.
#   MASTER_ADDR  rendezvous host (default: the allocation's first host)
#   MASTER_PORT  rendezvous port (default: 10000 + SLURM_JOB_ID % 50000: two jobs sharing a node
#                do not collide, and a requeued job, which keeps its id, gets the same port)
# The repository is put on PYTHONPATH (srun and pyxis pass the environment on), so a plain NeMo
# image without nemo_kd installed imports it from the mounted checkout.
set -euo pipefail

[ -n "${NEMO_KD_DIR:-}" ] && [ -d "$NEMO_KD_DIR/nemo_kd" ] || {
  echo "common.sh: NEMO_KD_DIR='${NEMO_KD_DIR:-}' is not a nemo_kd checkout" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || { echo "common.sh: not inside a Slurm job (submit with sbatch)" >&2; exit 2; }

PYTHON=${PYTHON:-python}
export PYTHONPATH="$NEMO_KD_DIR${PYTHONPATH:+:$PYTHONPATH}"
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}
# nemo_kd.parallel reads RANK / WORLD_SIZE / LOCAL_RANK before SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID: values left over from a torchrun shell would give every task the same rank.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
export CUDA_DEVICE_MAX_CONNECTIONS=1   # Megatron: ordered TP/SP communication kernels
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
GPUS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}  # processes per node (one per GPU): trainer.devices

SRUN_ARGS=(--kill-on-bad-exit=1 --cpu-bind=none)
if [ -n "${CONTAINER:-}" ]; then
  _mounts="$NEMO_KD_DIR:$NEMO_KD_DIR"
  case "$PWD/" in "$NEMO_KD_DIR"/*) ;; *) _mounts+=",$PWD:$PWD" ;; esac
  SRUN_ARGS+=(--container-image="$CONTAINER" --container-mounts="$_mounts${MOUNTS:+,$MOUNTS}"
              --container-workdir="$PWD" --no-container-mount-home)
fi

echo "nemo_kd: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST," \
  "repository $NEMO_KD_DIR, python $PYTHON, rendezvous $MASTER_ADDR:$MASTER_PORT${CONTAINER:+, container $CONTAINER}" >&2

# run_srun CMD...: one task per GPU of the allocation.
run_srun() {
  echo "srun ${SRUN_ARGS[*]} $*" >&2
  srun "${SRUN_ARGS[@]}" "$@"
}

# run_srun_preemptible CMD...: run_srun for training scripts that save a checkpoint and exit 0 on
# SIGUSR1. The job asks for the signal ahead of its time limit (#SBATCH --signal=B:USR1@120: the
# batch shell only, 120 s before the end); a preemption handler may send it too
# (scancel --batch --signal=USR1 JOBID). This shell runs srun in the background so that its USR1
# trap runs at once, forwards the signal to srun (which delivers it to every task), waits for the
# tasks to finish, and, when they exited 0 after the signal, requeues the job: the requeued job
# (same id, same log directory, #SBATCH --requeue) resumes from that checkpoint
# (exp_manager.resume_if_exists=true). Without a signal the exit status is srun's.
run_srun_preemptible() {
  local srun_pid rc forwarded=0
  NEMO_KD_SIGNALS=0
  trap 'NEMO_KD_SIGNALS=$((NEMO_KD_SIGNALS + 1))' USR1
  echo "srun ${SRUN_ARGS[*]} $*" >&2
  srun "${SRUN_ARGS[@]}" "$@" &
  srun_pid=$!
  while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    if [ "$NEMO_KD_SIGNALS" -ne "$forwarded" ]; then
      forwarded=$NEMO_KD_SIGNALS
      echo "nemo_kd: SIGUSR1: asking the tasks to checkpoint and stop" >&2
      kill -USR1 "$srun_pid" 2>/dev/null || true
      # The trapped signal interrupted `wait` (status 128+10) while srun still runs: wait again.
      if [ "$rc" -gt 128 ]; then continue; fi
    fi
    break
  done
  trap - USR1
  if [ "$NEMO_KD_SIGNALS" -gt 0 ]; then
    if [ "$rc" -eq 0 ]; then
      echo "nemo_kd: tasks checkpointed after SIGUSR1; requeueing job $SLURM_JOB_ID" >&2
      scontrol requeue "$SLURM_JOB_ID"
      return 0
    fi
    echo "nemo_kd: srun exited $rc after SIGUSR1; not requeueing" >&2
  fi
  return "$rc"
}
