"""`prefixlm prepare --mixture mix.yaml`: many sources -> one V1 dataset whose epochs draw from
each source by data_io-style rules, with a coverage report per source and epoch.

Steps:
  1. the mixture file (`mixture_config.py`) names the sources (`sources.py`) and how each is
     sampled;
  2. every JSONL and Parquet source is tokenized once into the cache (`encode.py`, `cache.py`; in
     parallel, streaming); data_io tokenized folders are read as they are;
  3. each source's samples meet the context size under its `long_context` policy (render.py's
     Truncation: the kept, the truncated and the dropped);
  4. epoch k draws `Sampling.rows_per_epoch(kept)` rows from each source: consecutive positions of
     an endless chain of permutations of the kept rows, permutation j seeded by (seed, the
     source's name, j) and epoch k taking positions [k * rows, (k + 1) * rows). So every epoch is
     a function of its own number (adding epochs or sources changes no other draw), a capped
     source walks through all its rows before repeating one (epochs hold different subsets, as
     data_io's do), and an uncapped one gives every row `repeat` times per epoch. The epoch's
     samples are then shuffled by (seed, k);
  5. the rows drawn in some epoch are written once (tokens.npy, int32) and indexed by every epoch
     that draws them (epoch_k/*.npy), with metadata.json (total_length = mean tokens per epoch,
     data_io's convention, which HRM-Text's trainer reads for its schedule), tokenizer.json and
     tokenizer_info.json, mixture.json (every source resolved: file, sha256, cache entry,
     settings) and the coverage report, coverage.json and coverage.md (`coverage.py`).
The output is written like prepare-sft's (writer.py: atomic, --overwrite replaces only a dataset
prefixlm wrote).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..fsutil import file_sha256, write_bytes
from .cache import CACHE_VERSION, SourceCache, cache_key
from .chat import copy_template, load_chat_tokenizer
from .coverage import format_coverage, source_outcomes
from .dataset import FORMAT, INDEX_FIELDS, MIXTURE_WRITER
from .encode import ReadOptions, encode_sources
from .mixture_config import read_mixture, resolve_sampling
from .render import TRUNCATED_RESPONSE, Truncation, gather_samples, truncate
from .rows import InputError
from .sources import data_io_info, expand_entry, read_data_io_source
from .tokenizer import AUTO, load_tokenizer
from .tokenizer_info import resolve_tokenizer_file
from .writer import DatasetWriter, check_output, epoch_order

__all__ = ["prepare_mixture", "epoch_draw", "InputError", "FORMAT"]

WRITE_ROWS = 1 << 16  # rows gathered into tokens.npy at a time


def epoch_draw(kept: int, rows: int, epoch: int, seed_words: list[int]) -> np.ndarray:
    """Indices (into a source's kept rows) that epoch `epoch` draws (module docstring, step 4)."""
    if kept == 0 or rows == 0:
        return np.zeros(0, np.int64)
    start, end = epoch * rows, (epoch + 1) * rows
    parts = []
    for j in range(start // kept, (end - 1) // kept + 1):
        perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence(
            [*seed_words, j]))).permutation(kept)
        parts.append(perm[max(start, j * kept) - j * kept: min(end, (j + 1) * kept) - j * kept])
    return np.concatenate(parts).astype(np.int64)


class _Rows:
    """A source's samples as the sampler sees them: lengths, where their tokens are, flags."""

    def __init__(self, tokens, inst_start, head_len, inst_len, tail_len, resp_start, resp_len,
                 flags=None, line=None, turn=None):
        self.tokens = tokens
        self.inst_start, self.resp_start = inst_start, resp_start
        self.head_len = np.asarray(head_len, np.int64)
        self.inst_len = np.asarray(inst_len, np.int64)
        self.tail_len = np.asarray(tail_len, np.int64)
        self.resp_len = np.asarray(resp_len, np.int64)
        n = len(self.inst_len)
        self.flags = np.zeros(n, np.uint8) if flags is None else np.asarray(flags)
        self.line, self.turn = line, turn

    @classmethod
    def cached(cls, c):
        starts = c.starts
        return cls(c.tokens, starts, c.head_len, c.inst_len, c.tail_len,
                   starts + c.inst_len, c.resp_len, c.flags, c.line, c.turn)

    @classmethod
    def data_io(cls, d):
        # Only the whole prefix is known: no markers to keep apart from the text.
        return cls(d.tokens, d.inst_start, d.inst_len, d.inst_len, np.zeros(len(d.inst_len)),
                   d.resp_start, d.resp_len)


def _tokenizer(spec, mixture, sources, options, chat_needed: bool):
    """The mixture's tokenizer: --tokenizer, the file's `tokenizer:`, the first data_io folder's,
    else the byte tokenizer (with a chat template: `chat.load_chat_tokenizer`)."""
    spec = spec or mixture.settings.get("tokenizer")
    if not spec:
        roots = [s.data_io_root for s in sources if s.kind == "data_io"]
        spec = str(roots[0]) if roots else "byte"
    if chat_needed:
        tok, chat = load_chat_tokenizer(spec, template_kwargs=mixture.settings.get(
            "chat_template_kwargs"), **options)
        return tok, chat, spec
    tok = load_tokenizer(spec, options.get("special_tokens"), options.get("conditions"),
                         default_condition=options.get("default_condition", AUTO),
                         parse_special_tokens=options.get("parse_special_tokens"))
    return tok, None, spec


def _check_data_io(root: Path, tok) -> list[str]:
    """ValueError unless the data_io folder `root` was tokenized with the mixture's vocabulary
    and markers; the notes for the report (what could not be checked)."""
    info = data_io_info(root)
    where = root / "tokenizer_info.json"
    vocab = info.get("vocab_size")
    if isinstance(vocab, int) and vocab != tok.vocab_size:
        raise ValueError(f"{where}: vocab_size {vocab}, but the mixture's tokenizer has "
                         f"{tok.vocab_size} tokens: tokenized with another tokenizer")
    ours = {"boq": tok.special_tokens["inst_begin"] or "", "eoq": tok.special_tokens["inst_end"]
            or "", "eoa": tok.special_tokens["eoa"]}
    for key, token in ours.items():
        if key in info and info[key] != token:
            raise ValueError(f"{where}: {key} is {info[key]!r} but the mixture's tokenizer uses "
                             f"{token!r} (pass --tokenizer {root}, or "
                             f"--hrm-text-tokens)")
    for name, token in (info.get("condition_mapping") or {}).items():
        if tok.conditions.get(name, token) != token:
            raise ValueError(f"{where}: condition {name!r} is {token!r} there but "
                             f"{tok.conditions[name]!r} in the mixture's tokenizer")
    notes = []
    try:
        theirs = resolve_tokenizer_file(info, root)
    except FileNotFoundError:
        notes.append(f"{root}: its tokenizer_path {info.get('tokenizer_path')!r} "
                     f"is not found here: only vocab_size and markers were compared")
    else:
        mine = getattr(tok, "path", None)
        if mine is not None and Path(theirs).read_bytes() != Path(mine).read_bytes():
            raise ValueError(f"{where}: tokenized with {theirs}, which differs from the "
                             f"mixture's tokenizer {mine}")
    return notes


def _sources(mix, default_policy: str, defaults: ReadOptions) -> list:
    """The mixture's sources with their settings (entry, then rules, then `defaults`)."""
    sources, seen = [], {}
    for entry in mix.entries:
        read = ReadOptions(names=tuple(sorted(entry.get("columns", {}).items())),
                           **{k: entry.get(k, getattr(defaults, k))
                              for k in ("turns", "chat_template", "skip_invalid")})
        for source in expand_entry(entry["path"], mix.path.resolve().parent, entry["where"],
                                   entry.get("name"), entry.get("format")):
            if source.name in seen:
                raise ValueError(f"{source.where}: source name {source.name!r} is taken by "
                                 f"{seen[source.name]}; give the entries distinct name: keys")
            seen[source.name] = source.path
            source.options = {"sampling": resolve_sampling(source.name, entry["sampling"],
                                                           mix.rules, default_policy),
                              "read": read}
            if source.kind == "data_io" and \
                    source.options["sampling"].long_context == "truncate-prefix":
                raise ValueError(f"{source.where}: long_context truncate-prefix cuts instruction "
                                 f"text, but the data_io folder {source.path} holds tokens only; "
                                 f"use drop or truncate for it")
            if source.kind == "data_io" and read.chat_template == "tokenizer":
                raise ValueError(f"{source.where}: a data_io folder is already tokenized; "
                                 f"chat_template: tokenizer applies to JSONL and Parquet sources")
            sources.append(source)
    return sources


def _stat(path: Path) -> tuple:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ino


def _cache_jobs(sources, tok, chat, progress: bool) -> list:
    """(source, cache key, entry metadata) of every JSONL and Parquet source; hashes the files."""
    fingerprint = tok.fingerprint()
    files = [src for src in sources if src.kind != "data_io"]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(src.path.stat().st_size for src in files), unit="B",
                   unit_scale=True, desc="hashing", file=sys.stderr, mininterval=0.5,
                   disable=None)
    jobs = []
    for source in files:
        read = source.options["read"]
        source.options["stat"] = _stat(source.path)
        digest = file_sha256(source.path, progress=bar.update if bar is not None else None)
        settings = {"tokenizer": fingerprint, "read": read.settings(), "kind": source.kind,
                    "chat": chat.fingerprint() if read.chat_template == "tokenizer" else None}
        key = cache_key(digest, settings)
        source.options.update(sha256=digest, cache_key=key)
        jobs.append((source, key, {"version": CACHE_VERSION, "source": str(source.path),
                                   "sha256": digest, "settings": settings}))
    if bar is not None:
        bar.close()
    return jobs


def _truncated(source, entries: dict, policy: Truncation) -> tuple:
    """(source, rows, counts, malformed examples, outcome, cut_left, resp_keep): its samples
    under its long_context policy."""
    if source.kind == "data_io":
        rows = _Rows.data_io(read_data_io_source(source.path))
        counts, malformed = {"rows": len(rows.inst_len)}, []
    else:
        entry = entries[source.name]
        rows = _Rows.cached(entry)
        counts, malformed = dict(entry.meta["counts"]), entry.meta.get("malformed_examples", [])
    return (source, rows, counts, malformed, *truncate(rows, policy))


def prepare_mixture(mixture, output, epochs: int | None = None, tokenizer=None, *,
                    context_size: int | None = None, seed: int | None = None,
                    workers: int | None = None, chunk_mb: float = 8.0, cache_dir=None,
                    chat_template: str | None = None, turns: str | None = None,
                    skip_invalid: bool | None = None, special_tokens=None, conditions=None,
                    default_condition=AUTO, parse_special_tokens: bool | None = None,
                    overwrite: bool = False, progress: bool = True, log=None) -> dict:
    """Prepare the mixture file `mixture` into a V1 dataset at `output`; returns the coverage
    report (also coverage.json / coverage.md in `output`), with `tokenized` and `cached` (the
    sources tokenized by this run, and those read from the cache).

    Arguments given win over the mixture file's keys of the same name; `workers` defaults to the
    cores this process may use, `cache_dir` to `.prefixlm-cache` beside the mixture file.
    """
    started = time.perf_counter()
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    mix = read_mixture(mixture)
    s = mix.settings
    epochs = epochs if epochs is not None else s.get("epochs", 1)
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    seed = int(seed if seed is not None else s.get("seed", 0))
    N = int(context_size if context_size is not None else s.get("context_size", 4097))
    K = s.get("min_response_tokens", 1)
    min_prefix = s.get("min_prefix_tokens", 1)
    default_policy = s.get("long_context", "truncate-response")
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
    if chunk_mb <= 0:
        raise ValueError(f"chunk_mb must be > 0, got {chunk_mb!r}")

    sources = _sources(mix, default_policy, ReadOptions(
        turns=turns or s.get("turns", "last"),
        chat_template=chat_template or s.get("chat_template", "plain"),
        skip_invalid=skip_invalid if skip_invalid is not None else s.get("skip_invalid", False)))
    check_output(output, [src.path for src in sources], overwrite)

    chat_needed = any(src.options["read"].chat_template == "tokenizer" for src in sources)
    tok, chat, tok_spec = _tokenizer(tokenizer, mix, sources, {
        "special_tokens": special_tokens, "conditions": conditions,
        "default_condition": default_condition, "parse_special_tokens": parse_special_tokens},
        chat_needed)
    # Every tokenized file of a data_io folder is a source of its own; the folder is checked once.
    notes = []
    for root in dict.fromkeys(src.data_io_root for src in sources if src.kind == "data_io"):
        notes += _check_data_io(root, tok)
    for source in sources:
        also = source.options["sampling"].also_matched
        if also:
            notes.append(f"source {source.name} matches several rules; the first one applies, "
                         f"not {', '.join(map(repr, also))}")

    cache = SourceCache(cache_dir or s.get("cache_dir") or
                        mix.path.resolve().parent / ".prefixlm-cache")
    jobs = _cache_jobs(sources, tok, chat, progress)
    cached_before = {src.name for src, key, _ in jobs if cache.get(key) is not None}
    entries = encode_sources(jobs, tok, chat, cache, workers, chunk_mb, progress, log)
    for source, _, _ in jobs:
        if source.name not in cached_before and _stat(source.path) != source.options["stat"]:
            shutil.rmtree(entries[source.name].path, ignore_errors=True)
            raise InputError(f"{source.path} changed while it was being tokenized; run again")

    decide = Truncation(N, "drop", K, min_prefix)
    per_source = [_truncated(source, entries, Truncation(
        N, source.options["sampling"].long_context, K, min_prefix)) for source in sources]
    run = {"tokenizer": str(tok_spec), "cache_dir": str(cache.root),
           "tokenized": sorted(src.name for src, _, _ in jobs if src.name not in cached_before),
           "cached": sorted(cached_before)}
    report = _write(output, overwrite, per_source, tok, chat, decide, epochs, seed, N, mix,
                    notes, run, progress, log)
    report["elapsed_s"] = round(time.perf_counter() - started, 3)
    for line in format_coverage(report, short=True):
        log(line)
    return report


def _write(output, overwrite, per_source, tok, chat, decide, epochs, seed, N, mix, notes, run,
           progress, log) -> dict:
    """Draw the epochs, write the dataset, return the coverage report."""
    drawn = []  # per source: per epoch, indices into its kept rows
    for source, rows, counts, malformed, outcome, cut_left, resp_keep in per_source:
        kept = int(np.count_nonzero(outcome <= TRUNCATED_RESPONSE))
        sampling = source.options["sampling"]
        want = sampling.rows_per_epoch(kept)
        words = sampling.seed_words(seed, source.name)
        drawn.append([epoch_draw(kept, want, k, words) for k in range(epochs)])
    total_epoch = [sum(len(d[k]) for d in drawn) for k in range(epochs)]
    if not any(total_epoch):
        raise InputError("no samples in any epoch: " + "; ".join(
            f"{src.name}: {int(np.count_nonzero(out <= TRUNCATED_RESPONSE))} kept of {len(out)}"
            for src, _, _, _, out, _, _ in per_source))

    writer = DatasetWriter(output, [src.path for src, *_ in per_source], overwrite=overwrite,
                           log=log)
    sources_report = []
    with writer:
        epoch_parts = [{k: [] for k in INDEX_FIELDS} for _ in range(epochs)]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=sum(len(r.inst_len) for _, r, *_ in per_source), unit="rows",
                       desc="writing", file=sys.stderr, mininterval=0.5)
        for (source, rows, counts, malformed, outcome, cut_left, resp_keep), draws in zip(
                per_source, drawn):
            kept_rows = np.flatnonzero(outcome <= TRUNCATED_RESPONSE)
            used = np.unique(np.concatenate(draws)) if draws else np.zeros(0, np.int64)
            sel = kept_rows[used]
            out_start = np.empty(len(sel), np.int64)
            out_inst = np.empty(len(sel), np.int64)
            out_resp = np.empty(len(sel), np.int64)
            for lo in range(0, len(sel), WRITE_ROWS):
                part = sel[lo:lo + WRITE_ROWS]
                tokens, inst_len, resp_len = gather_samples(
                    rows.tokens, np.asarray(rows.inst_start)[part], rows.head_len[part],
                    rows.inst_len[part], np.asarray(rows.resp_start)[part], cut_left[part],
                    resp_keep[part])
                if len(tokens) and (int(tokens.max()) >= tok.vocab_size or int(tokens.min()) < 0):
                    bad = int(tokens.max()) if int(tokens.max()) >= tok.vocab_size else \
                        int(tokens.min())
                    raise ValueError(f"{source.path}: token id {bad} is outside the mixture's "
                                     f"vocabulary [0, {tok.vocab_size})")
                at = writer.append_tokens(tokens)
                lengths = inst_len + resp_len
                out_start[lo:lo + len(part)] = at + np.cumsum(lengths) - lengths
                out_inst[lo:lo + len(part)] = inst_len
                out_resp[lo:lo + len(part)] = resp_len
            if bar is not None:
                bar.update(len(rows.inst_len))
            for k, d in enumerate(draws):
                pos = np.searchsorted(used, d)
                epoch_parts[k]["inst_start"].append(out_start[pos])
                epoch_parts[k]["inst_len"].append(out_inst[pos])
                epoch_parts[k]["resp_start"].append(out_start[pos] + out_inst[pos])
                epoch_parts[k]["resp_len"].append(out_resp[pos])
            sources_report.append(source_outcomes(source, rows, counts, malformed, outcome,
                                                  cut_left, resp_keep, draws, decide, tok))
        if bar is not None:
            bar.close()
        writer.finish_tokens()
        epoch_tokens = []
        for k, parts in enumerate(epoch_parts):
            index = {f: np.concatenate(parts[f]) if parts[f] else np.zeros(0, np.int64)
                     for f in INDEX_FIELDS}
            order = epoch_order(len(index["inst_len"]), seed, k)
            writer.write_epoch(k, {f: index[f][order] for f in INDEX_FIELDS})
            epoch_tokens.append(int(index["inst_len"].sum() + index["resp_len"].sum()))
        tok.save(writer.path, tokenizer_path=str(writer.final))
        if chat is not None:
            copy_template(chat, writer.path)
        report = {
            "output": str(writer.final), "mixture": str(mix.path), "epochs": epochs,
            "seed": seed, "context_size": N, "min_response_tokens": decide.K,
            "samples_per_epoch": total_epoch, "tokens_per_epoch": epoch_tokens,
            "tokens_written": int(writer.num_tokens), **run, "notes": notes,
            "sources": sources_report,
        }
        meta = {
            "format": FORMAT, "writer": MIXTURE_WRITER,
            "tokenizer_info": tok.info(tokenizer_path=str(writer.final)),
            "max_seq_len": N,
            "total_length": int(round(sum(epoch_tokens) / epochs)),
            "num_tokens": int(writer.num_tokens), "num_epochs": epochs,
            "samples_per_epoch": total_epoch, "seed": seed, "context_size": N,
            "min_response_tokens": decide.K, "min_prefix_tokens": decide.min_prefix,
            "chat_template": "tokenizer" if chat is not None else "plain",
            "label_convention": "inputs = inst + resp[:-1]; labels = (inst + resp)[1:], -100 on "
                                "all prefix positions but the last; causal_len = resp_len - 1",
        }
        writer.write_json("metadata.json", meta)
        writer.write_json("mixture.json", {
            "mixture": str(mix.path.resolve()), "tokenizer": tok.fingerprint(),
            "sources": [{"name": src.name, "kind": src.kind, "path": str(src.path.resolve()),
                         "sha256": src.options.get("sha256"),
                         "cache_key": src.options.get("cache_key"),
                         "read": src.options["read"].settings(),
                         "sampling": vars(src.options["sampling"])}
                        for src, *_ in per_source]})
        writer.write_json("coverage.json", report)
        write_bytes(writer.path / "coverage.md", ("\n".join(format_coverage(report)) + "\n")
                    .encode())
        writer.commit()
    return report
