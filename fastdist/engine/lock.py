"""An exclusive lock on a training save dir, so that two runs never write the same checkpoints.

``train.py`` (rank 0) holds ``<save-dir>/train.lock`` for the whole run: an ``flock`` on the open
file, which the kernel releases on *any* exit (return, exception, SIGKILL, a crash), so a lock left by
a dead run is never in the way. The file names the holder (pid, host, start time) for the message
a second run gets; it is never deleted (deleting it would let a waiting and a new process lock two
different files), only its content is replaced by the next holder. When the named pid no longer runs
but the lock is still held, a child it forked (say, a data loader worker) still has the file open:
the message says so. Needs a file system with working ``flock`` (local disks, most cluster file
systems; on one without it the lock is refused with the OS error).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time

__all__ = ["LOCK_NAME", "SaveDirLock", "SaveDirLockError"]

LOCK_NAME = "train.lock"


class SaveDirLockError(RuntimeError):
    """Another live run holds the save dir, or its lock file cannot be created."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(raw: str) -> tuple[int, str, str] | None:
    """(pid, host, start time) from the lock file's content; None when it names no holder."""
    try:
        info = json.loads(raw)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return int(info["pid"]), str(info["host"]), started
    except (ValueError, KeyError, TypeError):
        return None


def _live_holder_text(raw: str) -> str:
    holder = _holder(raw)
    if holder is None:
        return "another process (the lock file names no holder yet)"
    pid, host, started = holder
    text = f"pid {pid} on {host}, started {started}"
    if host == socket.gethostname() and not _pid_alive(pid):
        text += "; that pid has ended, but a process it started (a data loader worker?) still holds the lock"
    return text


class SaveDirLock:
    """``with SaveDirLock(save_dir):`` or `acquire` / `release`; `acquire` raises `SaveDirLockError`."""

    def __init__(self, save_dir: str) -> None:
        self.path = os.path.join(save_dir, LOCK_NAME)
        self._fd: int | None = None
        self.stale: str | None = None  # who held the lock before, when it ended without releasing it

    def acquire(self) -> SaveDirLock:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise SaveDirLockError(f"cannot create the lock file {self.path}: {err.strerror or err}; check "
                                   "that --save-dir is a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _live_holder_text(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            raise SaveDirLockError(
                f"--save-dir {os.path.dirname(self.path)} is in use by another train.py ({holder}; lock "
                f"{self.path}): wait for it to end, or choose another --save-dir") from None
        except OSError as err:
            os.close(fd)
            raise SaveDirLockError(f"cannot lock {self.path}: {err.strerror or err} (this file system may "
                                   "not support flock; use a --save-dir on a local disk)") from None
        # content left behind: its holder ended without `release` (killed, crashed): a stale lock
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            holder = _holder(previous)
            self.stale = (f"pid {holder[0]} on {holder[1]}, started {holder[2]}" if holder
                          else "an unreadable holder")
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Unlock and empty the file (an empty file reads as 'ended cleanly' to the next holder)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)  # explicit: forked children sharing the descriptor keep no lock
        os.close(fd)

    def __enter__(self) -> SaveDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
