"""An exclusive lock on a run directory, so that two trainers never write one run.

The lock is an OS file lock (`fcntl.flock`) on `<run_dir>/train.lock`, held from the start of a run
to its end; the file records the holder's pid and host. The kernel releases a flock when its
process dies however it dies, so a lock file left behind by a killed run (kill -9, a crashed node)
is free and the next run takes it over. The file itself is never deleted: removing it would let a
run that opened the old file and a run that creates a new one both believe they hold the lock.
Under torchrun only rank 0 locks (one holder per run); every rank learns the outcome through one
all-reduce, so a refused run stops on every rank instead of leaving the others waiting.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch

from .distributed import all_reduce

__all__ = ["LOCK_FILE", "RunLocked", "RunLock", "lock_run_dir"]

LOCK_FILE = "train.lock"


class RunLocked(ValueError):
    """The run directory is held by another live process; the message names its pid and host."""


class RunLock:
    """Holds the lock on `run_dir` until `release()` (or the process's end)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.fd: int | None = None
        self.stale: dict | None = None  # what a dead holder's file said, when we took it over

    def acquire(self) -> "RunLock":
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ValueError(f"run_dir {self.run_dir} is a file, not a directory: choose "
                             "another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
                   if holder else "another process")
            since = f", since {holder['started']}" if holder.get("started") else ""
            raise RunLocked(
                f"run_dir {self.run_dir} is in use by {who}{since} (lock {self.path}); wait "
                f"for that run to end or stop it, or choose another run_dir") from None
        except BaseException:
            os.close(fd)
            raise
        # A file with content whose flock was free: its holder died without releasing it.
        self.stale = _read_holder(fd) or None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self):
        """Unlock, leaving an empty file (an empty file means the last holder ended cleanly)."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing the descriptor releases the flock
        self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}


def lock_run_dir(run_dir: str | Path, rank: int) -> RunLock | None:
    """Rank 0 takes the lock on `run_dir` (returned; None on the other ranks). Any failure to take
    it (held by a live run, not a directory, not writable) is raised on rank 0 and, as a
    RunLocked naming rank 0, on every other rank, after all ranks have met in one all-reduce."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(run_dir).acquire()
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the vote
            error = exc
    failed = all_reduce(torch.tensor([0.0 if error is None else 1.0]))
    if failed.item() == 0:
        return lock
    if error is not None:
        raise error
    raise RunLocked(f"rank 0 could not lock run_dir {run_dir} (its error says why)")
