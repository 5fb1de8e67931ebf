"""One writer per output folder: ``output_dir/run.lock``, held for the life of a run (docs/pretraining.md).

Two runs writing into one folder interleave their ``metrics.jsonl`` and write the same checkpoints twice (a
requeued copy of a job that still runs, or the same command started twice). The main process takes the lock
before anything in the folder is touched and releases it when the run ends; the other processes of a
multi-process run learn the outcome from it, so all of them go on or all stop with the same message.

The lock is an ``fcntl.flock`` on the open file, which the kernel drops when the process dies however it
dies, plus a record inside the file (host, pid, start time) and a heartbeat (the file's modification time,
touched every :data:`HEARTBEAT_S` seconds). The record is what decides on filesystems where ``flock`` is not
shared between hosts: a lock whose process is gone from this host is stale at once, and a lock recorded by
another host is stale once its heartbeat is older than :data:`STALE_AFTER_S`. A stale lock is taken over
with a line saying whose it was.
"""
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Any, Dict, Optional, Tuple

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 150.0          # five missed heartbeats


class OutputDirLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # alive, another user's
        return True
    return True


def _describe(record: Dict[str, Any]) -> str:
    pid, host, started = (record.get(key, "?") for key in ("pid", "host", "started"))
    return f"process {pid} on host {host} (started {started})"


class OutputDirLock:
    """The lock on one output folder: ``acquire()`` or :class:`OutputDirLockedError`; ``release()`` removes
    the file. ``logger`` gets the line of a stale-lock take-over (``print`` if none is given)."""

    def __init__(self, output_dir: str, logger: Any = None):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.logger = logger
        self._fd: Optional[int] = None
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _warn(self, message: str) -> None:
        if self.logger is not None:
            self.logger.warning(message)
        else:
            print(message)

    def _open_locked(self) -> int:
        """An fd of the lock file with the flock taken, or raise with the holder's record."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                record = self._read(fd)
                os.close(fd)
                raise OutputDirLockedError(self._refusal(record, "it holds the lock")) from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                return fd
            os.close(fd)          # the holder released (removed) the file between our open and our flock: retry
        raise OutputDirLockedError(f"could not lock {self.path}: it keeps being replaced by another run")

    @staticmethod
    def _read(fd: int) -> Optional[Dict[str, Any]]:
        """The holder's record; ``None`` for an empty file, ``{}`` for an unreadable one."""
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 65536)
        if not raw.strip():
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return {}
        return record if isinstance(record, dict) else {}

    def _refusal(self, record: Optional[Dict[str, Any]], why: str) -> str:
        who = _describe(record) if record else "another process"
        return (f"{self.output_dir} is in use by another run: {who}; {why}. Two runs writing into one folder "
                f"mix their logs and checkpoints. Wait for that run to end (a requeued job: cancel the old one "
                f"first), or choose another --output_dir. If you are sure it is gone, delete {self.path}")

    @staticmethod
    def _judge(fd: int, record: Dict[str, Any]) -> Tuple[bool, str]:
        """(whether the recorded holder is gone, so the lock may be taken over; why, or why not)."""
        age = time.time() - os.fstat(fd).st_mtime
        host, pid = record.get("host"), record.get("pid")
        if host == socket.gethostname() and isinstance(pid, int):
            if not _process_alive(pid):
                return True, f"process {pid} no longer exists on this host"
            if age > STALE_AFTER_S:
                return True, (f"process {pid} exists but does not hold the lock and its heartbeat stopped "
                              f"{age:.0f} s ago (the pid was reused)")
            return False, f"process {pid} is alive on this host and its heartbeat is {age:.0f} s old"
        if age > STALE_AFTER_S:
            return True, f"its last heartbeat was {age:.0f} s ago (stale after {STALE_AFTER_S:.0f} s)"
        return False, (f"its heartbeat is {age:.0f} s old (stale after {STALE_AFTER_S:.0f} s); this filesystem may "
                       f"not share locks between hosts")

    def acquire(self) -> "OutputDirLock":
        os.makedirs(self.output_dir, exist_ok=True)
        fd = self._open_locked()
        try:
            record = self._read(fd)
            if record is not None:
                # The flock is ours, so no process on a host sharing our locks holds it; the record decides for
                # the rest (a killed run's, or one on another host of a filesystem without shared flock).
                stale, why = self._judge(fd, record) if record else (True, "its record is unreadable")
                if not stale:
                    raise OutputDirLockedError(self._refusal(record, why))
                self._warn(f"taking over the stale lock {self.path} of {_describe(record)}: {why}")
            mine = {"host": socket.gethostname(), "pid": os.getpid(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="cgns-run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self._fd)
            except (OSError, TypeError):
                pass              # released meanwhile, or a filesystem hiccup: the next beat tries again

    def release(self) -> None:
        """Stop the heartbeat, delete the lock file and drop the flock; a no-op if not held."""
        if self._fd is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                os.remove(self.path)        # removed while still locked: a newcomer never sees our record
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


__all__ = [
    "LOCK_FILE",
    "HEARTBEAT_S",
    "STALE_AFTER_S",
    "OutputDirLockedError",
    "OutputDirLock",
]
