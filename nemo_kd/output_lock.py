"""One writer per output directory: an exclusive advisory lock file that names its holder.

Two processes writing one output directory (a logits store, a pipeline stage, a checkpoint's
temporary directory) destroy each other's work: they pick the same temporary names, delete
each other's temporary files and leave mixed outputs behind. :class:`OutputLock` makes the
second writer fail at once with an :class:`OutputLockedError` that names the first (host,
pid, when it started, its Slurm job, its command line) and says what to do.

Design
------
* **The lock** is ``<directory>/.<name>.lock``, held with ``fcntl.flock(LOCK_EX | LOCK_NB)``
  on a descriptor kept open for the lock's lifetime. The kernel drops a flock when its
  holder dies however it dies (SIGKILL, OOM killer, node reboot on a local file system), so
  a dead holder's lock is free by construction: the next writer gets it, finds the dead
  holder's record still in the file and reports it as :attr:`OutputLock.took_over` (and a
  warning in the log). The flock, not the file's content, is the lock; the content is
  there to be read by a refused writer.
* **The record** is JSON: ``host``, ``pid``, ``start_time`` (when the lock was taken,
  ISO-8601 UTC), ``argv``, ``slurm_job_id`` and, for liveness checks, ``boot_id`` and
  ``process_start_ticks`` (field 22 of ``/proc/<pid>/stat``). It is written by truncate +
  write + fsync right after the flock is taken; a refused writer that reads an empty file
  (the holder between its flock and its write) rereads for a moment.
* **Release** truncates and unlinks the file while still holding the flock, then closes
  the descriptor: a finished output keeps no lock file. Unlinking under a flock has a known
  race (a writer that opened the old file before the unlink takes a flock on an orphaned
  inode): after every flock the writer checks that the path still names the inode it
  locked (``os.stat`` vs ``os.fstat``) and otherwise starts over, so two writers never
  both hold the lock.
* **One writer per process too.** Linux refuses a second flock on a separate open of the
  same file even in the same process, but flock emulated over POSIX locks (NFS) is
  per-process and would let it through, so the module keeps a per-process table of held
  locks: a second ``acquire`` of the same lock file in one process (e.g. two writer
  objects for one output) raises :class:`OutputLockedError` saying the holder is this
  process. A process forked while holding a lock does not hold it in the child (the
  child's copy of the descriptor is closed and never releases or unlinks the parent's
  lock), so a fork-started worker cannot keep a dead parent's lock alive.
* **Without flock** (``flock`` fails with ENOLCK / EOPNOTSUPP / EINVAL / ENOSYS, as on some
  NFS and Lustre mounts) the lock falls back to an exclusively created file
  (``O_CREAT | O_EXCL``) with the same record. Its holder's death is not seen by the
  kernel, so it is judged from the record: a holder on this host whose pid is gone (or a
  zombie, or a pid reused by a process that started later, or recorded before the host's
  last boot) is stale and is taken over: a ``.<name>.lock.takeover`` guard, created
  exclusively and holding the new record, is renamed over the stale file, so one writer takes
  over and the path is never free for a third one in between; a live
  holder is refused; a holder on another host cannot be checked and is refused with the
  instruction to remove the lock file if that process is known to be dead. Release
  removes the file only if it still holds this process's record.
  ``NEMO_KD_OUTPUT_LOCK=exclusive`` forces this mechanism (for mounts whose flock is local
  to each node, e.g. Lustre ``localflock``, NFS ``local_lock=flock``); ``=flock`` forbids
  the fallback; the default ``auto`` tries flock first.
* **Temporary names** carry :func:`temp_tag`: ``p<pid>-<host>-<time>``, unique per process
  on a shared file system (pid reuse included). :func:`remove_stale_temps`, called with the
  lock held, removes the temporary files a killed writer left (anything matching the
  caller's pattern except this process's own tag) and returns them for the caller to log.

Pure Python, no imports of the rest of the package: every layer may use it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import threading
import time
from typing import Any, Dict, List, Optional

__all__ = ["OutputLock", "OutputLockedError", "describe_holder", "remove_stale_temps", "temp_tag"]

logger = logging.getLogger(__name__)

ENV_MECHANISM = "NEMO_KD_OUTPUT_LOCK"
MECHANISMS = ("auto", "flock", "exclusive")
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP), errno.EINVAL,
             errno.ENOSYS}
_RECORD_WAIT_S = 1.0  # how long a refused writer rereads an empty record (the holder is writing it)
_STALE_EMPTY_S = 60.0  # exclusive mode: an empty / unreadable lock file older than this is a crashed writer's
_TAKEOVER_STALE_S = 60.0  # exclusive mode: a take-over guard older than this is a crashed writer's
_LOCK_FILE = re.compile(r"^\..*\.lock(\.takeover)?$")


class OutputLockedError(RuntimeError):
    """Another writer holds this output (the message names it and says what to do)."""

    def __init__(self, message: str, directory: Optional[str] = None, holder: Optional[dict] = None,
                 lock_path: Optional[str] = None):
        super().__init__(message)
        self.directory, self.holder, self.lock_path = directory, holder, lock_path

    def __reduce__(self):  # keep the fields across pickling (multiprocessing, torch.distributed objects)
        return type(self), (str(self), self.directory, self.holder, self.lock_path)


class _NoFlock(Exception):
    pass


# ---------------------------------------------------------------------------------------------- process facts


def _host() -> str:
    return socket.gethostname()


def _boot_id() -> Optional[str]:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> Optional[List[bytes]]:
    """Fields 3.. of ``/proc/<pid>/stat`` (after the command name, which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()
    except (OSError, ValueError):
        return None


def _process_start_ticks(pid: int) -> Optional[int]:
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None  # field 22: start time in clock ticks since boot
    except (IndexError, ValueError):
        return None


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _new_record(mechanism: str) -> Dict[str, Any]:
    pid = os.getpid()
    return {"host": _host(), "pid": pid, "start_time": _now_iso(), "argv": list(sys.argv),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "boot_id": _boot_id(),
            "process_start_ticks": _process_start_ticks(pid), "mechanism": mechanism}


def _holder_state(rec: Optional[dict]) -> str:
    """``alive`` | ``dead`` | ``remote`` (another host: cannot tell) | ``unknown`` (no usable record)."""
    if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int) or rec["pid"] <= 0:
        return "unknown"
    if rec.get("host") != _host():
        return "remote"
    boot = _boot_id()
    if rec.get("boot_id") and boot and rec["boot_id"] != boot:
        return "dead"  # recorded before this host's last boot
    pid = rec["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # alive, another user's
    fields = _proc_stat(pid)
    if fields and fields[0] == b"Z":
        return "dead"  # killed, not yet reaped
    ticks, now = rec.get("process_start_ticks"), _process_start_ticks(pid)
    if ticks is not None and now is not None and ticks != now:
        return "dead"  # the pid now belongs to a later process
    return "alive"


def describe_holder(rec: Optional[dict]) -> str:
    """``host h, pid p, since t, Slurm job j, command: ...`` of a lock record."""
    if not isinstance(rec, dict) or not rec:
        return "an unknown process (the lock file names no holder yet)"
    parts = [f"host {rec.get('host')}", f"pid {rec.get('pid')}", f"since {rec.get('start_time')}"]
    if rec.get("slurm_job_id"):
        parts.append(f"Slurm job {rec['slurm_job_id']}")
    argv = rec.get("argv")
    if argv:
        cmd = shlex.join(str(a) for a in argv) if isinstance(argv, list) else str(argv)
        parts.append("command: " + (cmd if len(cmd) <= 300 else cmd[:297] + "..."))
    return ", ".join(parts)


def _parse(text: bytes) -> Optional[dict]:
    if not text.strip():
        return None
    try:
        rec = json.loads(text.decode("utf-8", "replace"))
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def _read_fd(fd: int) -> bytes:
    chunks, off = [], 0
    while True:
        b = os.pread(fd, 65536, off)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        off += len(b)


def _write_fd(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    off = 0
    while off < len(data):
        off += os.pwrite(fd, data[off:], off)
    os.fsync(fd)


def _read_path(path: str) -> Optional[bytes]:
    """The lock file's bytes, ``None`` if there is none."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------ locks held by this process

_registry_lock = threading.Lock()
_held: Dict[str, "OutputLock"] = {}  # realpath of the lock file -> the object holding (or acquiring) it


def _after_fork_in_child() -> None:
    """A forked child does not hold its parent's locks: close its copies, touch nothing else."""
    global _registry_lock
    _registry_lock = threading.Lock()
    for lock in list(_held.values()):
        lock._forget()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


# ------------------------------------------------------------------------------------------------------ the lock


class OutputLock:
    """An exclusive writer's lock on ``directory`` (module docstring).

    ``name`` picks the lock file (``<directory>/.<name>.lock``: writers that must exclude each
    other use the same name); ``what`` words the refusal (``"logits store"``, ``"pipeline output
    directory"``). Use as a context manager or ``acquire()`` / ``release()``.
    """

    def __init__(self, directory, name: str = "writer", what: str = "output directory", *,
                 mechanism: Optional[str] = None):
        if not name or "/" in name or os.sep in name:
            raise ValueError(f"lock name must be a plain file name part, got {name!r}")
        mech = mechanism or os.environ.get(ENV_MECHANISM) or "auto"
        if mech not in MECHANISMS:
            raise ValueError(f"lock mechanism {mech!r} (argument or ${ENV_MECHANISM}) is not one of {list(MECHANISMS)}")
        self.directory = os.fspath(directory)
        self.name, self.what, self.mechanism = name, what, mech
        self.path = os.path.join(self.directory, f".{name}.lock")
        self.took_over: Optional[dict] = None
        self._fd: Optional[int] = None
        self._held_by: Optional[str] = None  # "flock" | "exclusive" while held
        self._owner_pid: Optional[int] = None
        self._written: Optional[bytes] = None
        self._key: Optional[str] = None

    # -------------------------------------------------------------------------------------------------- public

    @property
    def held(self) -> bool:
        """Whether this object holds the lock (in this process)."""
        return self._held_by is not None and self._owner_pid == os.getpid()

    @property
    def holder(self) -> Optional[dict]:
        """The record now in the lock file (``None``: no lock file, or an empty one)."""
        if self._fd is not None and self.held:
            return _parse(_read_fd(self._fd))
        other = _held.get(os.path.realpath(self.path))
        if other is not None and other._fd is not None and other.held:
            return _parse(_read_fd(other._fd))  # never open+close a file this process flocks (NFS: POSIX locks)
        return _parse(_read_path(self.path) or b"")

    def acquire(self) -> "OutputLock":
        """Take the lock now or raise :class:`OutputLockedError` naming its holder (never waits)."""
        if self.held:
            raise RuntimeError(f"{self.path}: this OutputLock is already held; acquire it once, release it once")
        os.makedirs(self.directory, exist_ok=True)
        key = os.path.realpath(self.path)
        with _registry_lock:
            other = _held.get(key)
            if other is not None:
                raise OutputLockedError(
                    f"{self.directory}: this {self.what} is already being written by this process ("
                    f"{describe_holder(other._record_or_self())}) through another lock object; one writer per "
                    f"{self.what}: release the first writer before starting a second, or give the second another "
                    f"output directory", self.directory, other._record_or_self(), self.path)
            _held[key] = self
        self.took_over = None
        try:
            if self.mechanism == "exclusive":
                self._acquire_exclusive()
            else:
                try:
                    self._acquire_flock()
                except _NoFlock as e:
                    if self.mechanism == "flock":
                        raise OSError(e.args[0].errno, f"{self.path}: this file system does not support flock "
                                                       f"({e.args[0]}) and {ENV_MECHANISM}=flock forbids the "
                                                       "exclusive-create fallback") from e.args[0]
                    logger.info("%s: flock is not supported here (%s); using an exclusively created lock file",
                                self.path, e.args[0])
                    self._acquire_exclusive()
        except BaseException:
            with _registry_lock:
                if _held.get(key) is self:
                    del _held[key]
            raise
        self._key = key
        if self.took_over is not None:
            logger.warning("%s: took over the lock of a writer that died while holding it (%s)", self.directory,
                           describe_holder(self.took_over))
        return self

    def release(self) -> None:
        """Give the lock up and remove the lock file (idempotent; a no-op in a forked child)."""
        if self._held_by is None:
            return
        try:
            if self._owner_pid == os.getpid():
                if self._held_by == "flock":
                    self._release_flock()
                else:
                    self._release_exclusive()
        finally:
            if self._fd is not None:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._fd, self._held_by, self._written = None, None, None
            with _registry_lock:
                if self._key is not None and _held.get(self._key) is self:
                    del _held[self._key]
            self._key = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"OutputLock({self.path!r}, held={self.held})"

    # ------------------------------------------------------------------------------------------------- helpers

    def _record_or_self(self) -> dict:
        if self._written:
            rec = _parse(self._written)
            if rec:
                return rec
        return {"host": _host(), "pid": os.getpid(), "start_time": None, "argv": list(sys.argv)}

    def _forget(self) -> None:
        """In a forked child: drop this object's copy of the parent's lock without releasing it."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._fd, self._held_by, self._written, self._key = None, None, None, None

    def _refusal(self, holder: Optional[dict], hint: str = "") -> OutputLockedError:
        msg = (f"{self.directory}: this {self.what} is being written by another process ({describe_holder(holder)}). "
               f"One writer per {self.what}: wait for that run to finish (or stop it), or give this run another "
               f"output directory.")
        return OutputLockedError(msg + (" " + hint if hint else ""), self.directory, holder, self.path)

    @staticmethod
    def _busy_record(read) -> Optional[bytes]:
        """The holder's lock file bytes, reread for a moment while they hold no record (the holder
        is between creating the file and writing it); ``None`` once the file is gone."""
        deadline = time.monotonic() + _RECORD_WAIT_S
        while True:
            text = read()
            if text is None or _parse(text) is not None or time.monotonic() > deadline:
                return text
            time.sleep(0.02)

    # ------------------------------------------------------------------------------------------------- flock

    def _acquire_flock(self) -> None:
        for _ in range(1000):
            created = True
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # released meanwhile
            keep = False
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in _BUSY:
                        raise self._refusal(_parse(self._busy_record(lambda: _read_fd(fd)) or b""))
                    if e.errno in _NO_FLOCK:
                        if created:  # leave no empty file for the exclusive-create fallback to trip on
                            with contextlib.suppress(OSError):
                                os.unlink(self.path)
                        raise _NoFlock(e)
                    raise
                try:
                    st = os.stat(self.path)
                except FileNotFoundError:
                    continue  # released (unlinked) between our open and our flock: start over
                fst = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (fst.st_dev, fst.st_ino):
                    continue  # we locked an unlinked file; the path names a newer one
                old = _parse(_read_fd(fd))
                data = json.dumps(_new_record("flock"), indent=1).encode() + b"\n"
                _write_fd(fd, data)
                self._fd, self._held_by, self._owner_pid, self._written = fd, "flock", os.getpid(), data
                self.took_over = old
                keep = True
                return
            finally:
                if not keep:
                    os.close(fd)
        raise OutputLockedError(f"{self.path}: the lock file keeps being replaced under this process; another "
                                f"writer is starting in {self.directory}", self.directory, None, self.path)

    def _release_flock(self) -> None:
        fd = self._fd
        try:
            st, fst = os.stat(self.path), os.fstat(fd)
            if (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino):
                os.ftruncate(fd, 0)
                os.unlink(self.path)  # still under our flock: see the inode check in _acquire_flock
        except FileNotFoundError:
            pass
        except OSError as e:
            logger.warning("%s: could not remove the lock file on release (%s); the lock is released anyway",
                           self.path, e)

    # --------------------------------------------------------------------------------- exclusive-create fallback

    def _acquire_exclusive(self) -> None:
        for _ in range(1000):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                pass
            else:
                data = json.dumps(_new_record("exclusive"), indent=1).encode() + b"\n"
                try:
                    _write_fd(fd, data)
                finally:
                    os.close(fd)
                self._held_by, self._owner_pid, self._written = "exclusive", os.getpid(), data
                return
            text = self._busy_record(lambda: _read_path(self.path))
            if text is None:
                continue  # released meanwhile
            rec = _parse(text)
            state = _holder_state(rec)
            if state == "unknown":
                try:
                    age = time.time() - os.stat(self.path).st_mtime
                except FileNotFoundError:
                    continue
                if age > _STALE_EMPTY_S:
                    state = "dead"  # a writer that died between creating the file and writing its record
            if state == "dead":
                data = self._take_over(text)
                if data is not None:
                    self._held_by, self._owner_pid, self._written = "exclusive", os.getpid(), data
                    self.took_over = rec if rec is not None else {
                        "host": None, "pid": None, "start_time": None,
                        "unreadable_record": text[:200].decode("utf-8", "replace")}
                    return
                time.sleep(0.02)  # another writer is taking over: look again
                continue
            if state == "remote":
                raise self._refusal(rec, f"The holder runs on another host ({rec.get('host')}), so this process "
                                         f"cannot tell whether it is alive: if it is known to be dead, remove "
                                         f"{self.path} and rerun.")
            if state == "unknown":
                raise self._refusal(rec, f"If no other run is starting, remove {self.path} and rerun.")
            raise self._refusal(rec)
        raise OutputLockedError(f"{self.path}: could not take over the stale lock file (it keeps changing)",
                                self.directory, None, self.path)

    def _take_over(self, stale: bytes) -> Optional[bytes]:
        """Replace the lock file by our record if it still holds ``stale``; our record if it did.

        Under the take-over guard (``<lock>.takeover``, created exclusively: one writer takes over
        at a time) the guard itself, holding our record, is renamed over the stale lock file: the
        lock passes from the dead holder to us with no moment where the path is free for a third
        writer to grab.
        """
        guard = self.path + ".takeover"
        try:
            gfd = os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            try:
                if time.time() - os.stat(guard).st_mtime > _TAKEOVER_STALE_S:
                    os.unlink(guard)  # its writer died during a take-over
            except FileNotFoundError:
                pass
            return None
        data = json.dumps(_new_record("exclusive"), indent=1).encode() + b"\n"
        try:
            try:
                _write_fd(gfd, data)
            finally:
                os.close(gfd)
            if _read_path(self.path) != stale:
                os.unlink(guard)
                return None  # someone else's lock by now
            os.rename(guard, self.path)
            return data
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(guard)
            raise

    def _release_exclusive(self) -> None:
        cur = _read_path(self.path)
        if cur is None:
            logger.warning("%s: the lock file was removed while this process held it", self.path)
            return
        if cur != self._written:
            logger.warning("%s: the lock file now names another writer (%s); left in place", self.path,
                           describe_holder(_parse(cur)))
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------------------------ temporary names

_tags: Dict[int, str] = {}


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", s)


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def temp_tag(prefix: str = "") -> str:
    """This process's temp-name tag, ``<prefix>p<pid>-<host>-<t>`` (file-name safe).

    Unique per process on a shared file system: the pid and host tell live processes apart,
    ``t`` (the time of the process's first call, base 36 milliseconds) a process from an
    earlier one that had the same pid. Stable within a process; a forked child gets its own.
    """
    pid = os.getpid()
    base = _tags.get(pid)
    if base is None:
        base = _tags[pid] = f"p{pid}-{_safe(_host())[:64]}-{_base36(time.time_ns() // 1_000_000)}"
    return _safe(prefix) + base


def remove_stale_temps(directory, pattern_glob: str, keep_tag: Optional[str] = None) -> List[str]:
    """Remove the files and directories under ``directory`` matching ``pattern_glob`` (``glob``
    syntax relative to ``directory``, ``**`` recursive, e.g. ``"*.tmp-*"``) except those whose
    name contains ``keep_tag`` (this process's own, :func:`temp_tag`); returns what was removed.

    Lock files (``.<name>.lock``) are never removed. Only call it while holding the
    directory's :class:`OutputLock`: then no live writer owns what it removes.
    """
    removed: List[str] = []
    pattern = os.path.join(glob.escape(os.fspath(directory)), pattern_glob)
    for p in sorted(glob.glob(pattern, recursive=True)):
        base = os.path.basename(p.rstrip(os.sep))
        if (keep_tag and keep_tag in base) or _LOCK_FILE.match(base):
            continue
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed
