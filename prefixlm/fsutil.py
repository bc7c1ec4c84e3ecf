"""Durable file writes: what the dataset writer and the checkpointer use to put bytes on disk; and
the content hash that caches and results name their inputs by.

A durable write flushes the file and fsyncs it before returning, so that a rename or a commit marker
written after it can never point at data still in the page cache when the machine dies. The
directory holding a renamed or new entry is fsynced too (`fsync_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["durable_open", "write_bytes", "write_json", "save_npy", "fsync_dir", "write_atomic",
           "file_sha256"]


@contextlib.contextmanager
def durable_open(path: str | os.PathLike, mode: str = "wb"):
    """`open(path, mode)` whose contents are flushed and fsynced when the block ends normally."""
    with open(path, mode) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with durable_open(path) as f:
        f.write(data)


def write_json(path: str | os.PathLike, obj) -> None:
    """`obj` as indented JSON with a final newline."""
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with durable_open(path) as f:
        np.save(f, array)


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step: a reader sees the old file or the new one, never a
    partial one (temporary sibling, fsync, rename, fsync of the directory)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write_bytes(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a directory entry (after a rename or a new file) to disk; a no-op where the platform
    cannot open directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike, progress=None) -> str:
    """sha256 of a file's contents (hex), read in 1 MiB blocks; `progress(bytes)` after each."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()
