"""Parallel, streaming tokenization of mixture sources into the cache (`cache.py`).

A JSONL or Parquet source missing from the cache is read in chunks of about `chunk_mb` MB (JSONL:
whole lines; Parquet: record batches); `workers` processes tokenize the chunks (each chunk in one
worker: rows parsed by rows.py or chat.py, rendered by render.encode_rows or the chat template) and
the results are appended, in order, to the source's cache entry. At most two chunks per worker are
in flight, so memory is bounded by the chunk size times the workers, not by the corpus. With one
worker the chunks are tokenized in this process (and `tokenizers` may use its own threads).

A bad row stops the run with `file:line` (Parquet: `file: row N, column C`) unless skip_invalid,
which counts it and keeps the first examples. Sources finished before a failure or a kill stay
cached: the next run starts after them.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import sys
from dataclasses import dataclass, field

import numpy as np

from .cache import CachedSource, SourceCache
from .chat import encoded_from_ids, parse_chat_record, special_text
from .render import encode_rows
from .rows import FIELDS, MALFORMED_EXAMPLES, InputError, RowError, decode_row, parse_record
from .sources import jsonl_chunks, parquet_chunks, parquet_columns

__all__ = ["ReadOptions", "ChunkResult", "encode_chunk", "encode_sources", "InputError",
           "MALFORMED_EXAMPLES"]

MIN_CHUNK = 1 << 16  # bytes: below this a chunk costs more to ship than to tokenize
_STATE: dict = {}  # the worker's tokenizer and chat template (set by _init_worker)


@dataclass(frozen=True)
class ReadOptions:
    """How a source's rows become samples (part of its cache key)."""

    names: tuple = ()                # (schema field, the source's field) pairs: columns: mapping
    turns: str = "last"              # rows.TURNS
    chat_template: str = "plain"     # chat.CHAT_TEMPLATES
    skip_invalid: bool = False

    def settings(self) -> dict:
        return {"names": dict(self.names), "turns": self.turns,
                "chat_template": self.chat_template, "skip_invalid": self.skip_invalid}


@dataclass
class ChunkResult:
    """What a worker made of one chunk."""

    encoded: object = None           # render.EncodedRows of the chunk's samples (None: none)
    line: np.ndarray = None          # int64 per sample
    turn: np.ndarray = None          # int32 per sample
    counts: dict = field(default_factory=dict)
    malformed: list = field(default_factory=list)  # "file:line: error", the first few
    fatal: str | None = None         # the first bad row's error when not skip_invalid


def _init_worker(tok, chat, parallel: bool) -> None:
    if not parallel:  # one process per core: the tokenizer's own threads would oversubscribe
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _STATE.update(tok=tok, chat=chat)


def _records(kind: str, path: str, first: int, payload, counts: dict):
    """(location text, row dict, may hold a lone surrogate) for every row of a chunk."""
    if kind == "jsonl":
        lines = payload.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        for offset, raw in enumerate(lines):
            lineno = first + offset
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                counts["blank_lines"] += 1
                continue
            counts["rows"] += 1
            where = f"{path}:{lineno}"
            try:
                row, surrogates = decode_row(raw)
            except RowError as exc:
                yield where, lineno, exc, False
                continue
            yield where, lineno, row, surrogates
    else:
        for offset, row in enumerate(payload.to_pylist()):
            counts["rows"] += 1
            yield f"{path}: row {first + offset}", first + offset, row, False


def _located(where: str, kind: str, exc: RowError) -> str:
    if kind == "parquet" and exc.field:
        return f"{where}, column {exc.field!r}: {exc}"
    return f"{where}: {exc}"


def encode_chunk(task) -> ChunkResult:
    """Tokenize one chunk: task = (kind, path, first line or row, payload, ReadOptions)."""
    kind, path, first, payload, options = task
    tok, chat = _STATE["tok"], _STATE["chat"]
    names = dict(options.names)
    counts = {"rows": 0, "blank_lines": 0, "malformed": 0, "chat_turns_ignored": 0}
    result = ChunkResult(counts=counts)
    plain, rendered, special, lines, turns = [], [], [], [], []
    for where, locator, row, surrogates in _records(kind, path, first, payload, counts):
        try:
            if isinstance(row, RowError):
                raise row
            if options.chat_template == "tokenizer":
                messages, tools, picked, trailing = parse_chat_record(row, options.turns, names)
                samples = chat.render(messages, tools, picked)
                rendered += samples
                special += [special_text(tok, messages)] * len(samples)
            else:
                samples, trailing = parse_record(row, tok.condition_ids, options.turns, names,
                                                 surrogates)
                plain += [s[:3] for s in samples]
                picked = [s[3] for s in samples]
        except RowError as exc:
            message = _located(where, kind, exc)
            if not options.skip_invalid:
                result.fatal = message + " (skip_invalid: true, or --skip-invalid, skips bad rows)"
                return result
            counts["malformed"] += 1
            if len(result.malformed) < MALFORMED_EXAMPLES:
                result.malformed.append(message)
            continue
        counts["chat_turns_ignored"] += trailing
        lines += [locator] * len(picked)
        turns += picked
    if plain:
        result.encoded = encode_rows(tok, plain)
    elif rendered:
        result.encoded = encoded_from_ids(rendered, special)
    result.line = np.asarray(lines, np.int64)
    result.turn = np.asarray(turns, np.int32)
    return result


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _Inline:
    """The pool's interface, tokenizing in this process."""

    def __init__(self, tok, chat):
        _init_worker(tok, chat, parallel=True)

    def apply_async(self, fn, args):
        return _Done(fn(*args))

    def terminate(self):
        pass

    def join(self):
        pass


def _pool(workers: int, tok, chat):
    if workers <= 1:
        return _Inline(tok, chat)
    methods = multiprocessing.get_all_start_methods()
    # fork shares the loaded tokenizer and skips re-importing torch in every worker.
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return context.Pool(workers, initializer=_init_worker, initargs=(tok, chat, False))


@dataclass
class _Pending:
    source: object
    key: str
    meta: dict
    writer: object
    submitted: int = 0
    handled: int = 0
    done_reading: bool = False
    counts: dict = field(default_factory=lambda: collections.Counter())
    malformed: list = field(default_factory=list)


def encode_sources(jobs, tok, chat, cache: SourceCache, workers: int, chunk_mb: float,
                   progress: bool = True, log=None) -> dict:
    """Tokenize every job (source, key, meta) into `cache`; returns {source name: CachedSource}.

    Jobs already cached are not read again."""
    done: dict[str, CachedSource] = {}
    todo = []
    for source, key, meta in jobs:
        cached = cache.get(key)
        if cached is not None:
            done[source.name] = cached
        else:
            todo.append((source, key, meta))
    if not todo:
        return done
    chunk_bytes = max(1, int(chunk_mb * (1 << 20)))
    total = sum(s.path.stat().st_size for s, _, _ in todo)
    if log:
        log(f"  tokenizing {len(todo)} source(s) ({total:,} bytes) with {workers} worker(s); "
            f"{len(done)} cached")
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    pool = _pool(workers, tok, chat)  # before tqdm starts its monitor thread: fork copies none
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
                   mininterval=0.5)
    in_flight: collections.deque = collections.deque()
    states: list[_Pending] = []

    def handle(state: _Pending, result: ChunkResult, size: int) -> None:
        state.handled += 1
        if result.fatal:
            raise InputError(result.fatal)
        state.counts.update(result.counts)
        room = MALFORMED_EXAMPLES - len(state.malformed)
        state.malformed += result.malformed[:max(0, room)]
        if result.encoded is not None:
            state.writer.append(result.encoded, result.line, result.turn)
        if bar is not None:
            bar.update(size)
        if state.done_reading and state.handled == state.submitted:
            finish(state)

    def finish(state: _Pending) -> None:
        counts = dict(state.counts)
        if counts.get("rows", 0) == 0 and not state.source.options["read"].skip_invalid:
            raise InputError(f"{state.source.path}: the source has no rows (empty file); "
                             f"skip_invalid: true skips it")
        meta = {**state.meta, "counts": counts, "malformed_examples": state.malformed}
        done[state.source.name] = state.writer.commit(meta)
        state.writer = None

    try:
        for source, key, meta in todo:
            state = _Pending(source, key, meta, cache.writer(key))
            states.append(state)
            options = source.options["read"]
            # Small files in chunks small enough that every worker gets several.
            size = max(MIN_CHUNK, min(chunk_bytes, source.path.stat().st_size // (4 * workers)))
            if source.kind == "jsonl":
                chunks = jsonl_chunks(source.path, size)
            else:
                names = {**{f: f for f in FIELDS}, **dict(options.names)}
                chunks = parquet_chunks(source.path, size, parquet_columns(source.path, names))
            for first, payload, size in chunks:
                while len(in_flight) >= 2 * max(1, workers):
                    handle(*_wait(in_flight.popleft()))
                task = (source.kind, str(source.path), first, payload, options)
                in_flight.append((state, pool.apply_async(encode_chunk, (task,)), size))
                state.submitted += 1
            state.done_reading = True
            if state.handled == state.submitted:
                finish(state)
        while in_flight:
            handle(*_wait(in_flight.popleft()))
    finally:
        pool.terminate()
        pool.join()
        if saved is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
        for state in states:
            if state.writer is not None:
                state.writer.abort()
        if bar is not None:
            bar.close()
    return done


def _wait(item):
    state, pending, size = item
    return state, pending.get(), size
