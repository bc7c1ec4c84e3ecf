"""Mixture sources: the files an entry of a mixture names, what each is called, and how its rows
are read (in chunks of bounded size, for the tokenizer workers).

An entry's `path` (relative to the mixture file) is
  a JSONL (.jsonl) or Parquet (.parquet) file;
  a glob (`data/*.jsonl`, `data/**/*.parquet`: `**` recurses), every match a source;
  a folder: every .jsonl and .parquet file under it (what data_io's tokenizer reads), or, when it
  holds tokenizer_info.json and tokenized sub-folders, a data_io tokenized folder: each sub-folder
  (one tokenized file) a source, read as it is (`read_data_io_source`).
A source's name is data_io's: its path relative to the entry's root (the folder, or a glob's
directory part before the first wildcard) with '/' turned into '__', extension kept
(`data/SYNTH/part0.parquet` under `data/` is `SYNTH__part0.parquet`); a data_io sub-folder keeps its
folder name, which its tokenizer made the same way. `name: X` on an entry names its one file X, or
prefixes the names of its files with `X__`. Sampling rules (prefix_config.yaml) match these names.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..extras import require
from .dataset import INDEX_FIELDS, load_npy

__all__ = ["Source", "KINDS", "expand_entry", "is_data_io_tokenized", "jsonl_chunks",
           "parquet_chunks", "parquet_columns", "read_data_io_source", "DataIoRows"]

KINDS = ("jsonl", "parquet", "data_io")
EXTENSIONS = {".jsonl": "jsonl", ".parquet": "parquet"}
DATA_IO_INFO = "tokenizer_info.json"


@dataclass
class Source:
    """One sampled unit of a mixture: a file, or one sub-folder of a data_io tokenized folder."""

    name: str
    path: Path
    kind: str                       # one of KINDS
    where: str                      # the mixture entry, for errors: "mix.yaml: sources[2]"
    options: dict = field(default_factory=dict)  # resolved settings (mixture.py)
    data_io_root: Path | None = None  # the tokenized folder holding it (kind data_io)


def is_data_io_tokenized(folder: Path) -> bool:
    """A data_io tokenized folder: tokenizer_info.json beside sub-folders holding tokens.npy."""
    return (folder / DATA_IO_INFO).is_file() and any(
        (sub / "tokens.npy").is_file() for sub in folder.iterdir() if sub.is_dir())


def _safe_name(path: Path, root: Path) -> str:
    return str(path.relative_to(root)).replace("/", "__").replace("\\", "__")


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def expand_entry(path_text: str, base: Path, where: str, name: str | None = None,
                 file_format: str | None = None) -> list[Source]:
    """The sources of one mixture entry (module docstring); ValueError naming `where` when it
    names nothing readable."""
    pattern = str(Path(path_text).expanduser())
    if not Path(pattern).is_absolute():
        pattern = str(base / pattern)
    kinds = {file_format: file_format} if file_format else EXTENSIONS

    def kind_of_file(p: Path):
        if file_format:
            return file_format
        return EXTENSIONS.get(p.suffix)

    if glob.has_magic(pattern):
        root = _glob_root(pattern)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        files = [p for p in files if p.is_file() and kind_of_file(p)]
        if not files:
            raise ValueError(f"{where}.path: {path_text!r} matches no "
                             f"{' or '.join(sorted(kinds))} file")
        found = [(p, _safe_name(p, root), kind_of_file(p)) for p in files]
    else:
        target = Path(pattern)
        if target.is_dir():
            if is_data_io_tokenized(target):
                subs = sorted(s for s in target.iterdir() if (s / "tokens.npy").is_file())
                found = [(s, s.name, "data_io") for s in subs]
            else:
                files = sorted(p for p in target.rglob("*") if p.is_file() and kind_of_file(p))
                if not files:
                    raise ValueError(f"{where}.path: the folder {path_text!r} holds no .jsonl or "
                                     f".parquet file (and is no data_io tokenized folder: no "
                                     f"{DATA_IO_INFO} beside sub-folders with tokens.npy)")
                found = [(p, _safe_name(p, target), kind_of_file(p)) for p in files]
        elif target.is_file():
            kind = kind_of_file(target)
            if kind is None:
                raise ValueError(f"{where}.path: {path_text!r} is neither .jsonl nor .parquet; "
                                 f"give format: jsonl|parquet")
            found = [(target, target.name, kind)]
        else:
            raise ValueError(f"{where}.path: {path_text!r} does not exist (looked at {target})")
    if name:
        found = [(p, name if len(found) == 1 else f"{name}__{n}", k) for p, n, k in found]
    root = Path(pattern) if found and found[0][2] == "data_io" else None
    return [Source(name=n, path=p, kind=k, where=where, data_io_root=root) for p, n, k in found]


# -- reading rows in chunks -------------------------------------------------------------------

def jsonl_chunks(path: Path, chunk_bytes: int):
    """(number of the chunk's first line, whole lines as bytes, bytes read) of about
    `chunk_bytes` each."""
    line = 1
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                return
            if not block.endswith(b"\n"):
                block += f.readline()
            yield line, block, len(block)
            line += block.count(b"\n")


def parquet_columns(path: Path, names: dict) -> list[str]:
    """The columns to read from a Parquet file: its chat column, or its instruction and response
    columns (and condition, tools where present); ValueError naming the missing ones."""
    pq = require("pyarrow.parquet", "parquet", "reading Parquet sources")
    try:
        schema = pq.ParquetFile(path).schema_arrow
    except Exception as exc:  # pyarrow's error says what is wrong with the file
        raise ValueError(f"{path}: not a readable Parquet file: {exc}") from exc
    have = set(schema.names)
    optional = [names[f] for f in ("condition", "tools") if names[f] in have]
    if names["messages"] in have:
        return [names["messages"]] + optional
    missing = [names[f] for f in ("instruction", "response") if names[f] not in have]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} (expected {names['instruction']!r} "
                         f"and {names['response']!r}, or {names['messages']!r}; the file has "
                         f"{', '.join(schema.names)}; map other names with columns:)")
    return [names["instruction"], names["response"]] + optional


def parquet_chunks(path: Path, chunk_bytes: int, columns: list[str]):
    """(index of the chunk's first row, pyarrow RecordBatch, its share of the file's bytes) of
    about `chunk_bytes` of text each, judged by the file's uncompressed column sizes."""
    pq = require("pyarrow.parquet", "parquet", "reading Parquet sources")
    f = pq.ParquetFile(path)
    meta = f.metadata
    wanted = set(columns)
    size = 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        for c in range(group.num_columns):
            column = group.column(c)
            if column.path_in_schema.split(".")[0] in wanted:
                size += column.total_uncompressed_size
    per_row = max(1, size // max(1, meta.num_rows))
    rows = max(1, chunk_bytes // per_row)
    on_disk = path.stat().st_size
    first = 0
    for batch in f.iter_batches(batch_size=rows, columns=columns):
        yield first, batch, on_disk * batch.num_rows // max(1, meta.num_rows)
        first += batch.num_rows


# -- data_io tokenized folders ----------------------------------------------------------------

@dataclass
class DataIoRows:
    """One data_io tokenized file: its token stream (memory-mapped) and per-row index arrays."""

    tokens: np.ndarray
    inst_start: np.ndarray
    inst_len: np.ndarray
    resp_start: np.ndarray
    resp_len: np.ndarray


def data_io_info(root: Path) -> dict:
    """The root tokenizer_info.json of a data_io tokenized folder."""
    path = root / DATA_IO_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it: {exc}") from exc
    if not isinstance(info, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return info


def read_data_io_source(folder: Path) -> DataIoRows:
    """A data_io per-file folder (tokens.npy <u4, the four index files <u8), validated: equal
    lengths, every row inside tokens.npy, non-negative lengths."""
    tokens = load_npy(folder / "tokens.npy", mmap=True)
    arrays = {k: load_npy(folder / f"{k}.npy", mmap=False).astype(np.int64) for k in
              INDEX_FIELDS}
    n = len(arrays["inst_start"])
    for k, arr in arrays.items():
        if len(arr) != n:
            raise ValueError(f"{folder}: {k}.npy has {len(arr)} entries, inst_start.npy {n}")
    for kind in ("inst", "resp"):
        start, length = arrays[f"{kind}_start"], arrays[f"{kind}_len"]
        bad = (start < 0) | (length < 0) | (start + length > len(tokens))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{folder}: row {i}: {kind}_start {int(start[i])}, {kind}_len "
                             f"{int(length[i])} outside tokens.npy ({len(tokens)} tokens); "
                             f"{int(bad.sum())} such rows")
    return DataIoRows(tokens=tokens, **arrays)
