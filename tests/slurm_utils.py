"""The test suite's Slurm cluster and job helpers (tests/test_slurm.py).

One one-node cluster per session, started by ``scripts/slurm_cluster.sh`` (which ``.ci/run`` runs
before the suite; the ``slurm_cluster`` fixture runs it too when ``sinfo`` does not answer, so
``bash scripts/test.sh`` alone works). Where the cluster cannot start, every Slurm test FAILS with
the script's output: the suite's Slurm coverage is never skipped.

Jobs are submitted exactly as a user submits them: ``sbatch examples/slurm/X.sbatch`` from the
repository root (Slurm runs its spool copy of the script; ``SLURM_SUBMIT_DIR`` is the checkout),
with the resources of a 2-core CPU node on the command line and ``--chdir`` a tmp directory.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "scripts" / "slurm_cluster.sh"
# Two tasks on one CPU node. Command-line options override the scripts' #SBATCH GPU defaults:
# a node without GRES accepts --gpus-per-node=0; --oversubscribe undoes the headers' --exclusive
# so that two jobs can share the node (the requeue test runs its reference beside it).
CPU_RESOURCES = ("-N1", "-n2", "--ntasks-per-node=2", "--gpus-per-node=0", "--oversubscribe", "--time=10")
# Launcher variables of the pytest process (torchrun-style or a test's world of one) must not leak
# into the jobs: the scripts derive the rendezvous from the allocation.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def cluster_answers() -> bool:
    """``sinfo`` reaches a controller and some node takes jobs."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = out.stdout.split()
    return out.returncode == 0 and any(s.rstrip("*~#") in ("idle", "mixed", "allocated", "completing") for s in states)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The session's Slurm cluster: started by scripts/slurm_cluster.sh unless one answers already."""
    if not cluster_answers():
        try:
            proc = subprocess.run(["bash", str(CLUSTER_SCRIPT)], capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{CLUSTER_SCRIPT} did not finish in 900 s:\n{e.stdout}\n{e.stderr}", pytrace=False)
        if proc.returncode != 0 or not cluster_answers():
            pytest.fail(f"the Slurm test cluster did not start ({CLUSTER_SCRIPT} exited {proc.returncode}):\n"
                        f"{proc.stdout}\n{proc.stderr}", pytrace=False)
    return REPO


def job_env(**extra: str) -> Dict[str, str]:
    """The submitting shell's environment for a job: this one, minus launcher variables, plus ``extra``.

    ``PYTHON`` is the suite's interpreter (the scripts default to ``python``), one thread per task
    (two tasks share two cores)."""
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update(PYTHON=str(REPO / ".venv" / "bin" / "python"), OMP_NUM_THREADS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Job:
    job_id: int
    returncode: Optional[int]  # sbatch --wait's status (the job's exit code); None: submitted without --wait
    output: Path  # the job's stdout/stderr file

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else f"<no output file {self.output}>"

    def info(self) -> Dict[str, str]:
        """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", str(self.job_id)], capture_output=True, text=True,
                             timeout=30)
        if out.returncode != 0:
            raise AssertionError(f"scontrol show job {self.job_id}: {out.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def fail(self, why: str):
        pytest.fail(f"job {self.job_id}: {why}\n--- {self.output}:\n{self.log()}", pytrace=False)


def sbatch(script: str, args: Iterable[str] = (), *, workdir: Path, env: Dict[str, str], wait: bool = True,
           timeout: float = 240, job_name: Optional[str] = None, submit_dir: Path = REPO) -> Job:
    """``sbatch [--wait] <CPU resources> --chdir=workdir examples/slurm/<script> args...`` from ``submit_dir``.

    With ``wait``, a job still running after ``timeout`` seconds is cancelled and the test fails
    with its output."""
    name = job_name or Path(script).stem
    output = Path(workdir) / f"{name}-%j.out"
    cmd = ["sbatch", "--parsable", *CPU_RESOURCES, f"--chdir={workdir}", f"--output={output}", f"--job-name={name}"]
    cmd += ["--wait"] if wait else []
    # From the checkout the relative path a user types; from elsewhere the script's absolute path.
    cmd += [str(Path("examples") / "slurm" / script if submit_dir == REPO else REPO / "examples" / "slurm" / script)]
    cmd += list(args)
    proc = subprocess.Popen(cmd, cwd=submit_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline().strip()  # --parsable: "<jobid>[;cluster]" as soon as it is queued
    if not first:
        proc.wait(timeout=60)
        pytest.fail(f"{' '.join(cmd)} did not submit: {proc.stderr.read()}", pytrace=False)
    job_id = int(first.split(";")[0])
    job = Job(job_id, None, Path(str(output).replace("%j", str(job_id))))
    if not wait:
        proc.wait(timeout=60)
        return job
    try:
        job.returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", str(job_id)], timeout=30)
        proc.kill()
        job.fail(f"still running after {timeout:.0f} s (cancelled)")
    return job


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED")


def wait_for_end(job: Job, timeout: float, restarts: int = 0) -> Dict[str, str]:
    """``scontrol show job`` once the job's run number ``restarts`` (0: the first) reached a final state.

    (A requeued job passes through PENDING/RUNNING again with Restarts incremented; MinJobAge keeps a
    finished job visible for 4 s, polled every 0.5 s.)"""
    def ended():
        info = job.info()
        return info if info["JobState"] in FINAL_STATES and int(info["Restarts"]) == restarts else None

    return wait_for(ended, timeout, f"job {job.job_id} (run {restarts}) to end", job)


def wait_for(predicate, timeout: float, what: str, job: Optional[Job] = None, poll: float = 0.5):
    """Poll ``predicate`` until it returns a true value (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    if job is not None:
        subprocess.run(["scancel", str(job.job_id)], timeout=30)
        job.fail(f"timed out after {timeout:.0f} s waiting for {what} (cancelled)")
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}", pytrace=False)
