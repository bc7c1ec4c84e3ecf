"""Durable file writes: what the dataset writer, the exporter and the checkpointer use to put bytes
and whole directories on disk; and the content hash that caches and results name their inputs by.

A durable write flushes the file and fsyncs it before returning, so that a rename or a commit marker
written after it can never point at data still in the page cache when the machine dies. The
directory holding a renamed or new entry is fsynced too (`fsync_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import uuid
from pathlib import Path

import numpy as np

__all__ = ["durable_open", "write_bytes", "write_json", "save_npy", "fsync_dir", "write_atomic",
           "file_sha256", "temp_dir_beside", "replace_dir", "clean_leftovers", "leftover_pattern",
           "host_name", "pid_alive"]


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


# -- a directory put in place whole ----------------------------------------------------------

def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def leftover_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-(\d+)@(.+)-[0-9a-f]{{8}}")


def temp_dir_beside(output: Path) -> Path:
    """A new empty folder `.NAME.tmp-PID@HOST-RANDOM` beside `output`, to fill and then put in
    place with `replace_dir`. Made by `os.mkdir`, so it has the user's umask (mkdtemp's 0700 would
    stay on the renamed result), and named so that `clean_leftovers` removes it once its process
    is gone."""
    output = Path(output)
    path = output.parent / f".{output.name}.tmp-{os.getpid()}@{host_name()}-{uuid.uuid4().hex[:8]}"
    try:
        os.mkdir(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot create a folder beside the output ({exc.strerror})",
                      str(output)) from exc
    return path


def clean_leftovers(output: Path, log=None) -> list[Path]:
    """Remove the temporary folders of killed writers of `output` (`.NAME.tmp-PID@HOST-RANDOM`,
    same host, PID not running); an `.old-` folder (the previous directory, moved aside by a
    `replace_dir` that did not finish) goes back into place when the output is missing. Returns
    the folders removed."""
    parent = output.parent
    if not parent.is_dir():
        return []
    pattern = leftover_pattern(output.name)
    host = host_name()
    removed = []
    for entry in sorted(parent.iterdir()):
        match = pattern.fullmatch(entry.name)
        if not match or match.group(3) != host or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not output.exists():
            os.replace(entry, output)
            fsync_dir(parent)
            if log:
                log(f"  restored {output} from {entry.name} (a commit killed midway)")
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    if removed and log:
        log(f"  removed {len(removed)} leftover folder(s) of killed writers of {output}")
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def replace_dir(tmp: Path, output: Path) -> None:
    """Put the finished directory `tmp` in place of `output`; an older one is removed only
    afterwards.

    Replacing an existing directory swaps the two directories atomically where the OS can; elsewhere
    it takes two renames, and a crash between them leaves the old one under `.NAME.old-*` (put
    back by the next writer's `clean_leftovers`).
    """
    if output.exists() and _exchange(tmp, output):
        fsync_dir(output.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = None
    if output.exists():
        old = output.parent / (f".{output.name}.old-{os.getpid()}@{host_name()}-"
                               f"{uuid.uuid4().hex[:8]}")
        os.replace(output, old)
    os.replace(tmp, output)
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
