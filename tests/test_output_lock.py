"""One writer per output directory (:mod:`nemo_kd.output_lock`), with real processes: a second
writer is refused naming the holder, a killed holder's lock is taken over, the exclusive-create
fallback judges holders by pid / start time / host, two processes racing never both hold the
lock, per-process temp names, and the pipeline stages (:mod:`nemo_kd.generation.stages`)."""

import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from nemo_kd import output_lock
from nemo_kd.output_lock import OutputLock, OutputLockedError, remove_stale_temps, temp_tag

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the lock of argv[1] (mechanism argv[2]) until a line arrives on stdin, then releases it.
HOLD = r"""
import json, os, sys
from nemo_kd.output_lock import OutputLock
lock = OutputLock(sys.argv[1], mechanism=sys.argv[2]).acquire()
print(json.dumps({"pid": os.getpid(), "took_over": lock.took_over}), flush=True)
sys.stdin.readline()
lock.release()
"""

# One attempt to acquire argv[1]'s lock: prints what happened.
TRY = r"""
import json, os, sys
from nemo_kd.output_lock import OutputLock, OutputLockedError
try:
    with OutputLock(sys.argv[1], mechanism=sys.argv[2]) as lock:
        print(json.dumps({"ok": True, "took_over": lock.took_over}))
except OutputLockedError as e:
    print(json.dumps({"ok": False, "error": str(e), "holder": e.holder}))
"""

# argv[3] rounds of acquire / hold / release against a rival: while holding, a marker file is
# created exclusively (it exists only while someone holds the lock: an existing one is an overlap).
RACE = r"""
import json, os, sys, time
from nemo_kd.output_lock import OutputLock, OutputLockedError
d, mech, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
open(os.path.join(d, "ready-%d" % os.getpid()), "w").close()
while len([f for f in os.listdir(d) if f.startswith("ready-")]) < 2:
    time.sleep(0.001)
held = refused = overlaps = 0
for _ in range(rounds):
    lock = OutputLock(d, mechanism=mech)
    try:
        lock.acquire()
    except OutputLockedError:
        refused += 1
        continue
    try:
        held += 1
        try:
            fd = os.open(os.path.join(d, "inside"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            overlaps += 1
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(0.0005)
            os.unlink(os.path.join(d, "inside"))
    finally:
        lock.release()
print(json.dumps({"held": held, "refused": refused, "overlaps": overlaps}))
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(output_lock.ENV_MECHANISM, None)
    return env


def _python(script, *args, **kw):
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=_env(), text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)


def _hold(directory, mechanism="auto"):
    """A process holding ``directory``'s lock, and what it printed once it held it."""
    p = _python(HOLD, directory, mechanism)
    line = p.stdout.readline()
    assert line, f"holder failed (rc {p.wait()})"
    return p, json.loads(line)


def _try(directory, mechanism="auto"):
    out, _ = _python(TRY, directory, mechanism).communicate(timeout=60)
    return json.loads(out)


def _finish(p):
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(timeout=60) == 0


def _kill(p):
    p.kill()
    p.wait(timeout=60)  # reaped: the pid is gone
    assert p.returncode == -signal.SIGKILL


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _no_flock(monkeypatch):
    def flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output_lock.fcntl, "flock", flock)


# ------------------------------------------------------------------------------------------------------- flock


@pytest.mark.parametrize("mechanism", ["auto", "exclusive"])
def test_second_writer_refused_naming_the_holder_then_free_after_exit(tmp_path, mechanism):
    d = str(tmp_path / "out")
    holder, info = _hold(d, mechanism)
    try:
        other = _try(d, mechanism)  # another process
        assert not other["ok"] and other["holder"]["pid"] == info["pid"]
        assert f"pid {info['pid']}" in other["error"] and f"host {socket.gethostname()}" in other["error"]
        assert "wait for that run to finish" in other["error"] and "another output directory" in other["error"]
        with pytest.raises(OutputLockedError, match=f"pid {info['pid']}") as e:  # this process
            OutputLock(d, mechanism=mechanism).acquire()
        assert e.value.holder["pid"] == info["pid"] and e.value.lock_path == os.path.join(d, ".writer.lock")
        assert e.value.holder["start_time"].endswith("+00:00") and e.value.holder["argv"][0] == "-c"
        assert OutputLock(d).holder["pid"] == info["pid"]
    finally:
        _finish(holder)
    assert not os.path.exists(os.path.join(d, ".writer.lock"))  # a clean release leaves no lock file
    with OutputLock(d, mechanism=mechanism) as lock:
        assert lock.took_over is None and lock.holder["pid"] == os.getpid()


@pytest.mark.parametrize("mechanism", ["auto", "exclusive"])
def test_holder_killed_with_sigkill_is_taken_over(tmp_path, caplog, mechanism):
    d = str(tmp_path / "out")
    holder, info = _hold(d, mechanism)
    _kill(holder)
    with caplog.at_level(logging.WARNING, logger="nemo_kd.output_lock"):
        with OutputLock(d, mechanism=mechanism) as lock:
            assert lock.took_over["pid"] == info["pid"] and lock.took_over["host"] == socket.gethostname()
            assert lock.holder["pid"] == os.getpid()
            assert _try(d, mechanism)["ok"] is False  # and it is ours now
    assert f"pid {info['pid']}" in caplog.text and "took over" in caplog.text
    assert _try(d, mechanism) == {"ok": True, "took_over": None}


def test_same_process_second_acquire_is_refused(tmp_path):
    import fcntl

    d = str(tmp_path)
    first = OutputLock(d).acquire()
    try:
        # Linux itself refuses a flock on a second open of the file in the same process ...
        fd = os.open(first.path, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        # ... and the module refuses before asking the kernel (flock over NFS would let it through)
        with pytest.raises(OutputLockedError, match="already being written by this process") as e:
            OutputLock(d).acquire()
        assert e.value.holder["pid"] == os.getpid()
        with pytest.raises(OutputLockedError, match="this process"):
            OutputLock(d + "/.", mechanism="exclusive").acquire()  # the same lock file, another spelling
        with pytest.raises(RuntimeError, match="already held"):
            first.acquire()
        assert OutputLock(d, name="other").acquire().held  # another lock name is another lock
    finally:
        first.release()
    first.release()  # idempotent
    second = OutputLock(d).acquire()
    second.release()


def test_forked_child_does_not_hold_the_parents_lock(tmp_path):
    import pickle

    lock = OutputLock(str(tmp_path)).acquire()
    try:
        pid = os.fork()
        if pid == 0:  # the child: not a holder, cannot release the parent's lock, is refused like anyone
            code = 1
            try:
                lock.release()
                try:
                    OutputLock(str(tmp_path)).acquire()
                except OutputLockedError as e:
                    code = 0 if e.holder["pid"] == os.getppid() else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert lock.held and lock.holder["pid"] == os.getpid() and _try(str(tmp_path))["ok"] is False
        with pytest.raises(OutputLockedError) as e:
            OutputLock(str(tmp_path)).acquire()
        again = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries whole
        assert str(again) == str(e.value) and again.holder == e.value.holder and again.lock_path == lock.path
    finally:
        lock.release()


def test_two_processes_racing_never_both_hold(tmp_path):
    runs = {}
    for mech in ("auto", "exclusive"):
        d = tmp_path / mech
        d.mkdir()
        runs[mech] = [_python(RACE, d, mech, 200) for _ in range(2)]
    for mech, procs in runs.items():
        results = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
        assert all(r["overlaps"] == 0 for r in results), (mech, results)
        assert all(r["held"] + r["refused"] == 200 for r in results) and sum(r["held"] for r in results) > 1
        assert not os.path.exists(tmp_path / mech / ".writer.lock")


# ---------------------------------------------------------------------------------- exclusive-create fallback


def _write_record(d, **rec):
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, ".writer.lock")
    base = {"host": socket.gethostname(), "pid": _dead_pid(), "start_time": "2020-01-01T00:00:00+00:00",
            "argv": ["train.py", "x=1"], "slurm_job_id": "4242"}
    base.update(rec)
    with open(path, "w") as f:
        json.dump(base, f)
    return path, base


def test_no_flock_falls_back_to_exclusive_create(tmp_path, monkeypatch, caplog):
    _no_flock(monkeypatch)
    d = str(tmp_path)
    with caplog.at_level(logging.INFO, logger="nemo_kd.output_lock"):
        with OutputLock(d) as lock:
            assert lock.holder["mechanism"] == "exclusive"
            with pytest.raises(OutputLockedError, match="this process"):
                OutputLock(d).acquire()
    assert "flock is not supported" in caplog.text and not os.path.exists(lock.path)
    with pytest.raises(OSError, match="forbids"):
        OutputLock(d, mechanism="flock").acquire()
    monkeypatch.setenv(output_lock.ENV_MECHANISM, "sometimes")
    with pytest.raises(ValueError, match="sometimes"):
        OutputLock(d)


def test_exclusive_stale_dead_pid_and_reused_pid_are_taken_over(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    path, rec = _write_record(str(tmp_path / "a"))
    with OutputLock(str(tmp_path / "a")) as lock:
        assert lock.took_over == rec and lock.holder["pid"] == os.getpid()
    # a live pid that started after the record was written: the pid was reused
    live = os.getpid()  # a live process (this one)
    path, rec = _write_record(str(tmp_path / "b"), pid=live,
                              process_start_ticks=output_lock._process_start_ticks(live) + 1)
    with OutputLock(str(tmp_path / "b")) as lock:
        assert lock.took_over["pid"] == live
    # recorded before the host's last boot
    path, rec = _write_record(str(tmp_path / "c"), pid=live, boot_id="not-this-boot")
    if output_lock._boot_id():
        with OutputLock(str(tmp_path / "c")) as lock:
            assert lock.took_over["boot_id"] == "not-this-boot"
    # an empty lock file: fresh (being written) is refused, old (a crash before the write) is taken over
    d = str(tmp_path / "e")
    os.makedirs(d)
    open(os.path.join(d, ".writer.lock"), "w").close()
    monkeypatch.setattr(output_lock, "_RECORD_WAIT_S", 0.05)
    with pytest.raises(OutputLockedError, match="unknown process"):
        OutputLock(d).acquire()
    os.utime(os.path.join(d, ".writer.lock"), (time.time() - 3600,) * 2)
    with OutputLock(d) as lock:
        assert lock.took_over["pid"] is None


def test_exclusive_live_pid_and_other_host_are_refused(tmp_path, monkeypatch):
    _no_flock(monkeypatch)
    live = os.getpid()  # a live process (this one, which holds no lock itself)
    path, rec = _write_record(str(tmp_path / "a"), pid=live, process_start_ticks=output_lock._process_start_ticks(live))
    with pytest.raises(OutputLockedError, match=f"pid {live}.*Slurm job 4242.*command: train.py x=1"):
        OutputLock(str(tmp_path / "a")).acquire()
    assert json.load(open(path)) == rec  # untouched
    path, rec = _write_record(str(tmp_path / "b"), host="some-other-node-17")
    with pytest.raises(OutputLockedError) as e:
        OutputLock(str(tmp_path / "b"), what="logits store").acquire()
    msg = str(e.value)
    assert "this logits store is being written by another process (host some-other-node-17" in msg
    assert "another host" in msg and f"remove {path}" in msg
    assert json.load(open(path)) == rec
    # a release does not remove a lock file that now names someone else
    lock = OutputLock(str(tmp_path / "c")).acquire()
    with open(lock.path, "w") as f:
        json.dump(dict(rec, pid=1), f)
    lock.release()
    assert json.load(open(lock.path))["pid"] == 1


# ------------------------------------------------------------------------------------------------- temp names


def test_temp_tag_is_per_process_and_file_name_safe(tmp_path):
    mine = temp_tag()
    assert mine == temp_tag() and re.fullmatch(r"[A-Za-z0-9_.-]+", mine) and f"p{os.getpid()}-" in mine
    assert temp_tag("r3/") == "r3_" + mine
    out, _ = _python("from nemo_kd.output_lock import temp_tag; print(temp_tag())").communicate(timeout=60)
    theirs = out.strip()
    assert theirs and theirs != mine and re.fullmatch(r"[A-Za-z0-9_.-]+", theirs)


def test_remove_stale_temps_keeps_our_own(tmp_path):
    d = tmp_path
    mine, other = temp_tag(), "p1-elsewhere-xyz"
    for name in (f"a.jsonl.tmp-{mine}", f"a.jsonl.tmp-{other}", "b.jsonl.tmp-12345", "a.jsonl", ".writer.lock"):
        (d / name).write_text("x")
    (d / f"ckpt.tmp-{other}").mkdir()
    (d / f"ckpt.tmp-{other}" / "model.pt").write_text("x")
    (d / "sub").mkdir()
    (d / "sub" / f"c.tmp-{other}").write_text("x")
    removed = remove_stale_temps(d, "*.tmp-*", keep_tag=mine)
    assert sorted(os.path.basename(p) for p in removed) == sorted(
        [f"a.jsonl.tmp-{other}", "b.jsonl.tmp-12345", f"ckpt.tmp-{other}"])
    assert sorted(os.listdir(d)) == sorted([f"a.jsonl.tmp-{mine}", "a.jsonl", ".writer.lock", "sub"])
    assert remove_stale_temps(d, "**/*.tmp-*", keep_tag=mine) == [str(d / "sub" / f"c.tmp-{other}")]
    assert remove_stale_temps(d, ".*") == []  # never a lock file


# ------------------------------------------------------------------------------------------ pipeline stages

# A stage writer: run_stage(argv[1]) whose work blocks (after leaving a temporary file, as a writer
# killed mid-write would) until a line arrives on stdin.
STAGE = r"""
import json, os, sys
from nemo_kd.generation.stages import run_stage
from nemo_kd.output_lock import temp_tag
path = sys.argv[1]
def work(block):
    open(path + ".tmp-" + temp_tag(), "w").write("half a file")
    print(json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    return [{"i": i, "x": i * i} for i in block]
run_stage(path, {"stage": "squares"}, 5, work)
"""


def _stage_rows(block):
    return [{"i": i, "x": i * i} for i in block]


def test_stage_second_writer_refused_first_completes_identical_output(tmp_path):
    from nemo_kd.generation.stages import output_writer, run_stage

    ref = str(tmp_path / "ref" / "squares.jsonl")
    run_stage(ref, {"stage": "squares"}, 5, _stage_rows)
    path = str(tmp_path / "out" / "squares.jsonl")
    first = _python(STAGE, path)
    info = json.loads(first.stdout.readline())
    try:
        with pytest.raises(OutputLockedError, match=f"stage output directory is being written.*pid {info['pid']}"):
            run_stage(path, {"stage": "squares"}, 5, _stage_rows)
        with pytest.raises(OutputLockedError, match=f"pid {info['pid']}"):  # a pipeline into the same directory
            with output_writer(os.path.dirname(path)):
                pass
    finally:
        _finish(first)
    assert open(path, "rb").read() == open(ref, "rb").read()
    assert sorted(os.listdir(tmp_path / "out")) == ["squares.jsonl", "squares.jsonl.meta.json"]
    assert run_stage(path, {"stage": "squares"}, 5, None) == _stage_rows(range(5))  # done: read back


def test_killed_stage_is_taken_over_and_its_temps_removed(tmp_path, caplog):
    from nemo_kd.generation.stages import output_writer, run_stage

    path = str(tmp_path / "out" / "squares.jsonl")
    first = _python(STAGE, path)
    info = json.loads(first.stdout.readline())
    _kill(first)
    left = [f for f in os.listdir(tmp_path / "out") if ".tmp-" in f]
    assert len(left) == 1 and f"p{info['pid']}-" in left[0]
    with caplog.at_level(logging.WARNING):
        assert run_stage(path, {"stage": "squares"}, 5, _stage_rows) == _stage_rows(range(5))
    assert "took over" in caplog.text and f"pid {info['pid']}" in caplog.text
    assert "removed 1 temporary file" in caplog.text and left[0] in caplog.text
    assert sorted(os.listdir(tmp_path / "out")) == ["squares.jsonl", "squares.jsonl.meta.json"]
    # a pipeline holds its directory for the whole run: its stages do not lock again, another writer is refused
    with output_writer(str(tmp_path / "pipe")) as lock:
        assert run_stage(str(tmp_path / "pipe" / "a.jsonl"), {"s": 1}, 2, _stage_rows) == _stage_rows(range(2))
        assert _try(str(tmp_path / "pipe"))["holder"]["pid"] == os.getpid()
        assert lock.held
    assert sorted(os.listdir(tmp_path / "pipe")) == ["a.jsonl", "a.jsonl.meta.json"]


def test_stage_of_a_checkpoint_rewritten_in_place_is_refused_not_reused(tmp_path):
    """A pipeline stage records its model's checkpoint files (path, size, mtime), not only the path: a stage
    resumed after the checkpoint was written again at the same path (a new warm start) is refused naming the
    change, instead of reusing samples of the old model; an untouched checkpoint resumes without running."""
    from nemo_kd.generation.stages import PolicySpec, checkpoint_fingerprint, run_stage

    ckpt = tmp_path / "warm"
    ckpt.mkdir()
    (ckpt / "model.pt").write_bytes(b"weights v1")
    (ckpt / "config.json").write_text("{}")
    out = str(tmp_path / "out" / "samples.jsonl")
    calls = []

    def work(block):
        calls.append(list(block))
        return [{"i": i} for i in block]

    def settings():
        return {"model": PolicySpec.from_dict({"checkpoint": str(ckpt)}).identity()}

    first = settings()
    assert first["model"]["checkpoint_files"] == checkpoint_fingerprint(str(ckpt)) is not None
    assert run_stage(out, first, 3, work) == [{"i": 0}, {"i": 1}, {"i": 2}] and calls == [[0, 1, 2]]
    assert run_stage(out, settings(), 3, work) == [{"i": 0}, {"i": 1}, {"i": 2}] and len(calls) == 1  # resumed

    st = os.stat(ckpt / "model.pt")
    (ckpt / "model.pt").write_bytes(b"weights v2")  # same size, same path: another model
    os.utime(ckpt / "model.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    changed = settings()
    assert changed["model"]["checkpoint_files"] != first["model"]["checkpoint_files"]
    with pytest.raises(FileExistsError, match="other settings.*checkpoint_files"):
        run_stage(out, changed, 3, work)
    assert len(calls) == 1
    # the settings of a DASD stage (a subset of keys) carry it too; a path not on this file system has none
    assert "checkpoint_files" in PolicySpec.from_dict({"checkpoint": str(ckpt)}).identity(("checkpoint", "tokenizer"))
    assert checkpoint_fingerprint(str(tmp_path / "absent")) is None
