"""Writing a V1 dataset: into a temporary folder beside the output, put in place by one rename.

    writer = DatasetWriter(output, inputs=[...], overwrite=False)   # checks, cleans leftovers
    with writer:                                  # an exception removes the temporary folder
        writer.append_tokens(int32 array) ...     # the token stream, in order
        writer.finish_tokens()                    # -> tokens.npy
        writer.write_epoch(k, {inst_start, inst_len, resp_start, resp_len})   # int64 arrays
        writer.write_json("metadata.json", {...})
        writer.commit()                           # the output now holds the new dataset

What may be replaced. `output` must be a new path, an empty folder, or (with `overwrite`) a folder
that is a dataset prefixlm wrote and holds nothing else; never a file, a link, a folder holding an
input, the current directory or one of its parents. Anything else is a ValueError giving the reason.
Nothing is deleted before the new dataset is complete: the old one is swapped out by the commit
and removed afterwards.

Crashes. The temporary folder is `.NAME.tmp-PID@HOST-RANDOM`. A killed writer leaves it behind; the
next writer of the same output removes every such folder whose process is gone (same host, PID not
running), never one a live writer is filling. A folder created with `os.mkdir` gets the user's
umask (not mkdtemp's 0700), and keeps it when renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..fsutil import (clean_leftovers, durable_open, fsync_dir, replace_dir, save_npy,
                      temp_dir_beside, write_json)
from .dataset import INDEX_FIELDS, OUR_WRITERS

__all__ = ["DatasetWriter", "check_output", "shuffled_epochs", "epoch_order", "DATASET_FILES"]

# Everything a dataset we write holds (epoch_K folders hold the four index files).
DATASET_FILES = ("tokens.npy", "metadata.json", "tokenizer.json", "tokenizer_info.json",
                 "report.json", "rows.jsonl", "coverage.json", "coverage.md", "mixture.json",
                 "tokenizer_config.json", "chat_template.jinja", "chat_template.json",
                 "special_tokens_map.json")
_EPOCH_DIR = re.compile(r"epoch_\d+")


def _foreign_entries(path: Path) -> list[str]:
    """Entries of a dataset folder that prefixlm does not write."""
    out = []
    for entry in sorted(path.iterdir()):
        if entry.name in DATASET_FILES and entry.is_file() and not entry.is_symlink():
            continue
        if _EPOCH_DIR.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            out += [f"{entry.name}/{sub.name}" for sub in sorted(entry.iterdir())
                    if sub.name not in {f"{k}.npy" for k in INDEX_FIELDS}]
            continue
        out.append(entry.name)
    return out


def _is_our_dataset(path: Path) -> str | None:
    """None if `path` is a dataset prefixlm wrote holding nothing else; else why not."""
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except FileNotFoundError:
        return "it has no metadata.json (not a prepared dataset)"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its metadata.json cannot be read ({exc})"
    if not isinstance(meta, dict) or not str(meta.get("writer", "")).startswith(OUR_WRITERS):
        return (f"it is not a dataset prefixlm wrote (metadata.json names writer "
                f"{meta.get('writer') if isinstance(meta, dict) else None!r}, e.g. HRM-Text's or "
                f"data_io's output)")
    foreign = _foreign_entries(path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        return f"it holds files prefixlm did not write: {shown}"
    return None


def check_output(output, inputs=(), overwrite: bool = False) -> Path:
    """`output` as a Path if a dataset may be written there (module docstring); else ValueError."""
    output = Path(output)
    resolved = output.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"--output {output} is the current directory or one of its parents; "
                         f"give a folder of its own, e.g. {output / 'dataset'}")
    for p in inputs:
        source = Path(p).resolve()
        if resolved in source.parents:
            raise ValueError(f"--output {output} holds the input file {p}; write the dataset to "
                             f"another folder")
        if resolved == source:
            raise ValueError(f"--output {output} is the input file {p}")
    for ancestor in [output.parent, *output.parent.parents]:
        if ancestor.exists() or ancestor.is_symlink():
            if not ancestor.is_dir():
                raise ValueError(f"--output {output}: {ancestor} is a file, not a directory")
            break
    if output.is_symlink():
        raise ValueError(f"--output {output} is a symbolic link; give the real folder")
    if not output.exists():
        return output
    if not output.is_dir():
        raise ValueError(f"--output {output} is a file, not a dataset folder; choose another path")
    if not any(output.iterdir()):
        return output
    if not overwrite:
        raise ValueError(f"output {output} already exists; choose another path or pass "
                         f"--overwrite")
    why = _is_our_dataset(output)
    if why:
        raise ValueError(f"--overwrite refuses to replace {output}: {why}; remove it yourself or "
                         f"choose another path")
    return output


def _write_npy_from_raw(raw_path: Path, npy_path: Path, count: int, dtype) -> None:
    """An .npy file from a raw stream of `count` values of `dtype`, without loading it."""
    with durable_open(npy_path) as out:
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                  "fortran_order": False, "shape": (count,)})
        with open(raw_path, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch `epoch`'s `count` samples: a permutation seeded by (seed, epoch)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch]))) \
        .permutation(count)


def shuffled_epochs(index: dict, epochs: int, seed: int):
    """(k, index arrays of epoch k) for k < epochs: the samples in `epoch_order(.., seed, k)`."""
    num = len(index["inst_len"])
    for k in range(epochs):
        order = epoch_order(num, seed, k)
        yield k, {name: index[name][order] for name in INDEX_FIELDS}


class DatasetWriter:
    """One dataset being written (module docstring). `path` is the temporary folder."""

    def __init__(self, output, inputs=(), *, overwrite: bool = False, tokens_dtype=np.int32,
                 log=None):
        # Leftovers first: a restored `.old-` dataset must then count as existing.
        self.removed_leftovers = clean_leftovers(Path(output), log)
        self.output = check_output(output, inputs, overwrite)
        self.final = self.output.resolve()
        self.tokens_dtype = np.dtype(tokens_dtype)
        self.log = log
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.path = temp_dir_beside(self.output)
        self._raw_path = self.path / "tokens.raw"
        self._raw = open(self._raw_path, "wb")
        self.num_tokens = 0
        self.done = False

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None:
            self.abort()
        return False

    def append_tokens(self, tokens: np.ndarray) -> int:
        """Append to the token stream; returns the offset of the first appended token."""
        at = self.num_tokens
        self._raw.write(np.ascontiguousarray(tokens, self.tokens_dtype).tobytes())
        self.num_tokens += len(tokens)
        return at

    def finish_tokens(self) -> None:
        """tokens.npy from the stream (after the last append_tokens)."""
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        _write_npy_from_raw(self._raw_path, self.path / "tokens.npy", self.num_tokens,
                            self.tokens_dtype)
        self._raw_path.unlink()

    def write_epoch(self, k: int, index: dict) -> None:
        folder = self.path / f"epoch_{k}"
        folder.mkdir()
        for name in INDEX_FIELDS:
            save_npy(folder / f"{name}.npy", np.asarray(index[name], np.int64))
        fsync_dir(folder)

    def write_json(self, name: str, obj) -> None:
        write_json(self.path / name, obj)

    def commit(self) -> Path:
        fsync_dir(self.path)
        replace_dir(self.path, self.output)
        self.done = True
        return self.output

    def abort(self) -> None:
        if not self._raw.closed:
            self._raw.close()
        if not self.done:
            shutil.rmtree(self.path, ignore_errors=True)
