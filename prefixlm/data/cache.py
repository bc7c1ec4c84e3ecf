"""The tokenized-source cache of mixtures: each JSONL or Parquet source tokenized once, found
again by its content and by everything else that decides its tokens.

    CACHE/<key>/meta.json      written last: an entry is complete when it holds this file
    CACHE/<key>/tokens.bin     int32: the source's whole samples, concatenated (render.EncodedRows)
    CACHE/<key>/<field>.bin    one value per sample (SAMPLE_FIELDS): head_len, inst_len, tail_len,
                               resp_len (int32), line (int64: JSONL line, Parquet row index), turn
                               (int32: index of the response's message, -1 for an instruction row),
                               flags (uint8: 1 special-token text, 2 default condition)

`key` is the sha256 of the file's sha256 and of the settings that decide the tokens (the
tokenizer's fingerprint, the chat template's, the reading options, CACHE_VERSION). A changed file
gets another key and is tokenized again; an unchanged one is read from here whatever it is called
and wherever it lies. An entry is filled in `.tmp-PID@HOST-RANDOM` and renamed into place when
complete: a killed run leaves the entries it completed (the next run reads them) and a temporary
folder, which the next run removes once its process is gone. Entries are never evicted; delete
old ones (or the whole folder) to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..fsutil import fsync_dir, host_name, pid_alive, write_json

__all__ = ["CACHE_VERSION", "SAMPLE_FIELDS", "cache_key", "SourceCache",
           "CachedSource", "EntryWriter"]

CACHE_VERSION = 1
SAMPLE_FIELDS = {"head_len": np.int32, "inst_len": np.int32, "tail_len": np.int32,
                 "resp_len": np.int32, "line": np.int64, "turn": np.int32, "flags": np.uint8}
SPECIAL_TEXT, DEFAULT_CONDITION = 1, 2
_TMP = re.compile(r"\.tmp-(\d+)@(.+)-[0-9a-f]{8}")


def cache_key(content_sha256: str, settings: dict) -> str:
    payload = json.dumps({"version": CACHE_VERSION, "content": content_sha256,
                          "settings": settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class CachedSource:
    """A complete cache entry, memory-mapped: `meta`, `tokens`, and one array per SAMPLE_FIELDS."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: damaged cache entry ({exc}); remove the folder") \
                from exc
        n = int(self.meta["samples"])
        self.tokens = self._map("tokens", np.int32, int(self.meta["tokens"]))
        for name, dtype in SAMPLE_FIELDS.items():
            setattr(self, name, self._map(name, dtype, n))

    def _map(self, name: str, dtype, count: int) -> np.ndarray:
        path = self.path / f"{name}.bin"
        size = path.stat().st_size if path.is_file() else -1
        if size != count * np.dtype(dtype).itemsize:
            raise ValueError(f"{path}: {size} bytes where {count} values of {np.dtype(dtype)} "
                             f"belong: a damaged cache entry; remove the folder {self.path}")
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))

    @property
    def starts(self) -> np.ndarray:
        """Offset of each sample in `tokens`."""
        lengths = self.inst_len.astype(np.int64) + self.resp_len
        return np.cumsum(lengths) - lengths


class EntryWriter:
    """A cache entry being filled: `append(encoded, line, turn)` chunk by chunk, then
    `commit(meta)`; `abort()` removes it."""

    def __init__(self, cache: "SourceCache", key: str):
        self.final = cache.root / key
        self.path = cache.root / f".tmp-{os.getpid()}@{host_name()}-{uuid.uuid4().hex[:8]}"
        self.path.mkdir(parents=True)
        self.files = {name: open(self.path / f"{name}.bin", "wb")
                      for name in ("tokens", *SAMPLE_FIELDS)}
        self.samples = self.tokens = 0

    def append(self, encoded, line: np.ndarray, turn: np.ndarray) -> None:
        flags = (encoded.special_text.astype(np.uint8) * SPECIAL_TEXT |
                 encoded.default_condition.astype(np.uint8) * DEFAULT_CONDITION)
        values = {"tokens": encoded.tokens, "head_len": encoded.head_len,
                  "inst_len": encoded.inst_len, "tail_len": encoded.tail_len,
                  "resp_len": encoded.resp_len, "line": line, "turn": turn, "flags": flags}
        for name, value in values.items():
            dtype = np.int32 if name == "tokens" else SAMPLE_FIELDS[name]
            self.files[name].write(np.ascontiguousarray(value, dtype).tobytes())
        self.samples += len(encoded.inst_len)
        self.tokens += len(encoded.tokens)

    def commit(self, meta: dict) -> CachedSource:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        write_json(self.path / "meta.json", {**meta, "samples": self.samples,
                                             "tokens": self.tokens})
        fsync_dir(self.path)
        if self.final.exists():  # another run finished the same entry meanwhile: same contents
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
            fsync_dir(self.final.parent)
        return CachedSource(self.final)

    def abort(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.path, ignore_errors=True)


class SourceCache:
    """The cache folder (module docstring)."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()

    def _clean_leftovers(self) -> None:
        """Remove the temporary entries of runs that were killed (same host, process gone)."""
        host = host_name()
        for entry in self.root.iterdir():
            match = _TMP.fullmatch(entry.name)
            if match and match.group(2) == host and not pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)

    def get(self, key: str) -> CachedSource | None:
        entry = self.root / key
        if not (entry / "meta.json").is_file():
            return None
        cached = CachedSource(entry)
        if cached.meta.get("version") != CACHE_VERSION:
            return None
        return cached

    def writer(self, key: str) -> EntryWriter:
        return EntryWriter(self, key)
