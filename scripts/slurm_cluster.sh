#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the test suite (tests/test_slurm.py) and CI.
#
#   bash scripts/slurm_cluster.sh          # install (if needed), configure, start; idempotent
#   SLURM_CLUSTER_STOP=1 bash scripts/slurm_cluster.sh   # stop the daemons this script started
#
# What it does, and why:
# * installs Debian's slurmctld / slurmd / slurm-client / munge when `sbatch` is missing (a clean CI
#   machine has none; `apt-get update` only when the package lists are empty or the install fails);
# * writes /etc/slurm/slurm.conf for this host: its real CPUs / RealMemory from `slurmd -C`, no GRES
#   (jobs ask `--gpus-per-node=0`), `proctrack/linuxproc` and `task/none` (no cgroups in a
#   container), `select/cons_tres` + `CR_Core` with `OverSubscribe=FORCE:4`: a 2-task job runs on
#   2 cores and a second one may share them (the requeue test runs its reference beside the
#   interrupted job), no accounting database; the host name must resolve (added to /etc/hosts
#   as 127.0.0.1 when it does not: the jobs' MASTER_ADDR is this name);
# * requeue: `JobRequeue=1` (batch jobs are requeueable unless --no-requeue), `ReturnToService=2`.
#   Slurm holds a requeued job back (Reason=BeginTime) for the job-step credential lifetime + 1 s,
#   `AuthInfo=cred_expire`, 120 s by default (checked here on 22.05: requeued at 08:53:08, eligible
#   at 08:55:09); 10 s keeps the requeue test short and is ample for srun -> slurmd on one host;
# * `sbatch --wait` polls the job after 2 s, then multiplies its sleep by 4 (to 32 s) while the sleep
#   is under MinJobAge/2: a 10 s job returned after 42 s. MinJobAge=4 (completed jobs are kept in
#   memory at least 4 s, well above the 2 s the manual asks for) keeps the poll at 2 s;
# * `sched_interval=2,bf_interval=1`: a job that becomes eligible (submitted, or requeued after the
#   delay above) starts within a second or two instead of at the next 30-60 s scheduling pass;
# * a munge key (generated once), munged, slurmctld (clean state: -c) and slurmd, then waits until
#   `sinfo` shows the node idle, resuming it if it came up down/drained. A daemon counts as running
#   only when its pidfile names a live process of its name: CI machines are restored from snapshots
#   whose /run/slurm still holds the pidfiles of daemons that are gone.
# Every failure prints what failed and the daemon's log tail, and exits non-zero.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
CLUSTER=nemo_kd_ci
HOST=$(hostname -s)

die() {
  echo "slurm_cluster.sh: error: $*" >&2
  for log in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    [ -f "$log" ] && { echo "--- tail of $log" >&2; tail -n 20 "$log" >&2; }
  done
  exit 1
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else
    die "need root (or passwordless sudo) to run: $*"; fi
}

daemon_alive() {  # daemon_alive <slurmd|slurmctld>: its pidfile names a live process of that name
  # A machine restored from a snapshot (CI reuses them) keeps /run/slurm/*.pid of daemons that are
  # gone, and their pids may now belong to other processes: check the process name, not just kill -0.
  local pidfile="$RUN_DIR/$1.pid" pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$1" ]
}

start_daemon() {  # start_daemon <slurmd|slurmctld> args...: wait until it has written its pidfile
  local name=$1; shift
  as_root rm -f "$RUN_DIR/$name.pid"  # stale: a daemon of an earlier boot (daemon_alive said no)
  as_root "$name" "$@" || die "$name did not start"
  # The command returns when the daemon has forked; the child writes the pidfile a moment later.
  for _ in $(seq 1 50); do daemon_alive "$name" && return 0; sleep 0.1; done
  die "$name exited during start-up (no live process in $RUN_DIR/$name.pid after 5 s)"
}

node_state() {
  sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n 1 || true
}

node_up() {  # the node takes jobs
  case "$(node_state)" in idle|mixed|allocated|completing) return 0 ;; *) return 1 ;; esac
}

if [ "${SLURM_CLUSTER_STOP:-0}" = 1 ]; then
  for daemon in slurmd slurmctld; do
    if daemon_alive "$daemon"; then as_root kill "$(cat "$RUN_DIR/$daemon.pid")"; fi
  done
  echo "slurm_cluster.sh: stopped slurmd and slurmctld (munged left running)"
  exit 0
fi

# 1. Packages.
PACKAGES=(slurmctld slurmd slurm-client munge)
if ! command -v sbatch >/dev/null || ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null; then
  echo "slurm_cluster.sh: installing ${PACKAGES[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null \
      || ! as_root apt-get install -y --no-install-recommends "${PACKAGES[@]}"; then
    as_root apt-get update || die "apt-get update failed"
    as_root apt-get install -y --no-install-recommends "${PACKAGES[@]}" || die "apt-get install ${PACKAGES[*]} failed"
  fi
fi
for cmd in sbatch srun sinfo scontrol slurmctld slurmd munged; do
  command -v "$cmd" >/dev/null || die "'$cmd' not found after installing ${PACKAGES[*]}"
done

# 2. Configuration for this host.
if ! getent hosts "$HOST" >/dev/null; then
  echo "slurm_cluster.sh: '$HOST' does not resolve; adding '127.0.0.1 $HOST' to /etc/hosts"
  echo "127.0.0.1 $HOST  # nemo_kd scripts/slurm_cluster.sh" | as_root tee -a /etc/hosts >/dev/null
fi
as_root mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
NODE_LINE=$(slurmd -C | head -n 1) || die "slurmd -C failed"
CPUS=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
REAL_MEMORY=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$NODE_LINE")
[ -n "$CPUS" ] && [ -n "$REAL_MEMORY" ] || die "cannot read CPUs/RealMemory from 'slurmd -C': $NODE_LINE"
# slurmd -C reports the whole topology; keep it (Slurm refuses a node whose CPUs disagree with it).
NODE_TOPOLOGY=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ UpTime=.*//' <<<"$NODE_LINE")
SLURM_USER=root  # slurmctld runs as root: no slurm account needed on a CI machine

CONF_TMP=$(mktemp)
cat >"$CONF_TMP" <<EOF
# Written by nemo_kd scripts/slurm_cluster.sh: a one-node test cluster on $HOST.
ClusterName=$CLUSTER
SlurmctldHost=$HOST
SlurmUser=$SLURM_USER
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=4
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
Waittime=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$HOST $NODE_TOPOLOGY State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
CHANGED=1
if [ -f "$CONF" ] && cmp -s "$CONF_TMP" "$CONF"; then CHANGED=0; fi
as_root install -m 0644 "$CONF_TMP" "$CONF"
rm -f "$CONF_TMP"
# Same configuration and the node takes jobs (a previous call, or the fixture after .ci/run): done.
if [ "$CHANGED" = 0 ] && node_up; then
  echo "slurm_cluster.sh: cluster already up ($HOST: $(node_state))"
  exit 0
fi

# 3. munge.
if [ ! -s /etc/munge/munge.key ]; then
  as_root mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then as_root mungekey --create --keyfile=/etc/munge/munge.key --force \
    || die "mungekey failed"
  else as_root dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none || die "munge key"; fi
fi
MUNGE_USER=$(id -un munge 2>/dev/null || echo root)
as_root mkdir -p /run/munge /var/log/munge /var/lib/munge
as_root chown "$MUNGE_USER" /etc/munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
as_root chmod 0700 /etc/munge
as_root chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ "$MUNGE_USER" = root ]; then as_root munged --force || die "munged did not start"
  else as_root runuser -u "$MUNGE_USER" -- munged || die "munged did not start"; fi
  for _ in $(seq 1 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
  munge -n </dev/null | unmunge >/dev/null || die "munge credentials do not round-trip (munged not answering)"
fi

# 4. slurmctld and slurmd (restarted when the configuration changed).
if [ "$CHANGED" = 1 ]; then
  for daemon in slurmd slurmctld; do
    if daemon_alive "$daemon"; then as_root kill "$(cat "$RUN_DIR/$daemon.pid")"; sleep 1; fi
  done
fi
if ! daemon_alive slurmctld; then
  # -c: start from a clean state. Jobs recovered from an earlier boot's StateSaveLocation belong to
  # processes that no longer exist; a test cluster must not hold its CPUs for them.
  start_daemon slurmctld -c -i
fi
for _ in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer 'scontrol ping'"
if ! daemon_alive slurmd; then
  start_daemon slurmd
fi

# 5. Wait for the node.
state=""
for _ in $(seq 1 150); do
  state=$(node_state || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*|drained*|fail*)
      as_root scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
  esac
  daemon_alive slurmd || die "slurmd exited (node state '$state')"
  sleep 0.2
done
case "$state" in
  idle|mixed|allocated) ;;
  *) die "node $HOST is '$state' after 30 s (sinfo: $(sinfo -N 2>&1 | tail -n +2))" ;;
esac
echo "slurm_cluster.sh: cluster $CLUSTER up: $HOST CPUs=$CPUS RealMemory=$REAL_MEMORY ($state)"
