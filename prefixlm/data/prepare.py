"""prepare-sft: JSONL -> a tokenized HRM-Text "V1" dataset.

Rows follow `rows.py` (instruction rows or chat rows); `tokenizer.py` renders them to tokens.

Lengths and the seed's boundary. A sample is `inst_len` prefix tokens and `resp_len` response tokens,
the response ending with the end-of-answer token. After the autoregressive shift the model reads
`inst_len + resp_len - 1` tokens, of which `causal_len = resp_len - 1` are causal. `--context-size N`
bounds `inst_len + resp_len <= N` (HRM-Text convention: N = 4097 for a model with 4096 positions), and
no sample with `causal_len < K` (`--min-response-tokens`) is ever written. For a sample that does not
fit:
  drop               it is dropped and counted as too long;
  truncate-prefix    instruction text tokens are cut from the left (markers kept) so the whole response
                     fits; dropped if the response alone leaves no room for the markers;
  truncate-response  the response is cut from the right to fit, keeping at least K causal tokens; a
                     cut response has no end-of-answer token (the model must not learn to stop there);
                     dropped if the instruction leaves less than K + 1 response tokens.
A response shorter than K + 1 tokens (e.g. empty) is dropped as empty under every policy.

Output (written to a temporary sibling directory, fsynced, renamed into place at the end):
  tokens.npy (int32), epoch_k/{inst_start,inst_len,resp_start,resp_len}.npy (int64; epoch k is the
  kept samples in an order shuffled by (seed, k)), metadata.json, tokenizer.json, report.json.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from ..fsutil import durable_open, fsync_dir, save_npy, write_json
from .dataset import INDEX_FIELDS, EpochIndex, length_histogram
from .rows import parse_row
from .sampler import MultipackSampler
from .tokenizer import load_tokenizer

__all__ = ["prepare_sft", "TRUNCATION_POLICIES", "InputError", "FORMAT"]

TRUNCATION_POLICIES = ("drop", "truncate-prefix", "truncate-response")
FORMAT = "hrm-text-v1"
CHUNK_ROWS = 4096
OUTCOMES = ("kept", "truncated_prefix", "truncated_response", "dropped_empty", "dropped_too_long",
            "dropped_malformed")


class InputError(ValueError):
    """Bad input data: the message names the file and line."""


def _write_npy_from_raw(raw_path: Path, npy_path: Path, count: int) -> None:
    """tokens.npy from the raw int32 stream written during tokenization (count unknown until the end)."""
    with durable_open(npy_path) as out:
        np.lib.format.write_array_header_1_0(
            out, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
                  "fortran_order": False, "shape": (count,)})
        with open(raw_path, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)


class _Decider:
    """Vectorised truncation decisions for one chunk."""

    def __init__(self, context_size: int, truncation: str, min_causal: int):
        self.N, self.policy, self.K = context_size, truncation, min_causal

    def __call__(self, head, body, tail, resp_body):
        """Per sample: outcome code, instruction tokens cut from the left, response tokens kept."""
        N, K = self.N, self.K
        inst = head + body + tail
        resp = resp_body + 1  # + end of answer
        outcome = np.zeros(len(inst), np.int8)  # 0 kept
        cut_left = np.zeros(len(inst), np.int64)
        resp_keep = resp.copy()
        empty = resp - 1 < K
        too_long = (inst + resp > N) & ~empty
        outcome[empty] = 3
        if self.policy == "drop":
            outcome[too_long] = 4
        elif self.policy == "truncate-prefix":
            room = N - resp - head - tail  # instruction text tokens that fit
            ok = too_long & (room >= 0)
            outcome[ok] = 1
            cut_left[ok] = body[ok] - room[ok]
            outcome[too_long & ~ok] = 4
        else:  # truncate-response: the first N - inst tokens, no end-of-answer
            keep = N - inst
            ok = too_long & (keep - 1 >= K)
            outcome[ok] = 2
            resp_keep[ok] = keep[ok]
            outcome[too_long & ~ok] = 4
        return outcome, cut_left, resp_keep


def prepare_sft(inputs, output, tokenizer="byte", context_size: int = 4097, epochs: int = 1,
                seed: int = 0, truncation: str = "drop", min_response_tokens: int = 1,
                skip_invalid: bool = False, progress: bool = True, *, special_tokens=None,
                conditions=None, overwrite: bool = False, log=None) -> dict:
    """Tokenize JSONL files into a V1 dataset at `output`; returns the report (also in report.json).

    tokenizer: "byte", a tokenizer.json path, or a tokenizer object from `load_tokenizer`.
    special_tokens / conditions: see `load_tokenizer`. overwrite: replace an existing dataset at
    `output` (otherwise that is an error). log: callable for the summary lines (default: stderr when
    progress is on, silent otherwise).
    """
    started = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input files given")
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, "
                         f"got {truncation!r}")
    for name, value, low in (("context_size", context_size, 2), ("epochs", epochs, 1),
                             ("min_response_tokens", min_response_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            extra = (" (a sample needs at least one causal token; causal_len = resp_len - 1)"
                     if name == "min_response_tokens" else "")
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}{extra}")
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
    output = Path(output)
    if output.exists() and not (output.is_dir() and not any(output.iterdir())) and not overwrite:
        raise ValueError(f"output {output} already exists; choose another path or pass --overwrite")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)

    tok = load_tokenizer(tokenizer, special_tokens, conditions)
    decide = _Decider(int(context_size), truncation, int(min_response_tokens))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        report = _prepare_into(tmp, inputs, tok, decide, int(epochs), int(seed), skip_invalid,
                               progress)
        report["elapsed_s"] = round(time.perf_counter() - started, 3)
        report["tokens_per_s"] = round(report["tokens"]["read"] / max(report["elapsed_s"], 1e-9))
        write_json(tmp / "report.json", report)
        fsync_dir(tmp)
        _commit(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["output"] = str(output)
    for line in format_report(report):
        log(line)
    return report


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


def _commit(tmp: Path, output: Path) -> None:
    """Put the finished directory in place of `output`; an older dataset is removed only afterwards.

    Replacing an existing dataset swaps the two directories atomically where the OS can; elsewhere it
    takes two renames, and a crash between them leaves the old dataset under `.NAME.old-*`.
    """
    old = None
    if output.exists() and _exchange(tmp, output):
        fsync_dir(output.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    if output.exists():
        old = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(output, old)
    os.replace(tmp, output)
    fsync_dir(output.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _prepare_into(tmp: Path, inputs, tok, decide: _Decider, epochs: int, seed: int,
                  skip_invalid: bool, progress: bool) -> dict:
    counts = dict.fromkeys(OUTCOMES, 0)
    counts["rows"] = 0
    counts["blank_lines"] = 0
    counts["chat_turns_ignored"] = 0
    counts["empty_files"] = 0
    malformed_examples: list[str] = []
    files_report = []
    tokens_read = 0
    index_parts = {k: [] for k in INDEX_FIELDS}
    written = 0
    raw_path = tmp / "tokens.raw"
    total_bytes = sum(p.stat().st_size for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare-sft",
                   mininterval=0.5, disable=total_bytes < (8 << 20), file=sys.stderr)

    def bad(path, lineno, msg):
        where = f"{path}:{lineno}: {msg}"
        if not skip_invalid:
            raise InputError(where + " (use --skip-invalid to skip bad rows)")
        counts["dropped_malformed"] += 1
        if len(malformed_examples) < 20:
            malformed_examples.append(where)

    with durable_open(raw_path) as raw_out:
        def flush(rows):
            nonlocal tokens_read, written
            if not rows:
                return
            inst_flat, inst_lens = tok.encode_batch([r[0] for r in rows])
            resp_flat, resp_lens = tok.encode_batch([r[1] for r in rows])
            tokens_read += int(inst_lens.sum() + resp_lens.sum())
            heads = [tok.prefix_head(r[2]) for r in rows]
            tail = tok.prefix_tail()
            head_lens = np.fromiter((len(h) for h in heads), np.int64, count=len(rows))
            tail_lens = np.full(len(rows), len(tail), np.int64)
            outcome, cut_left, resp_keep = decide(head_lens, inst_lens, tail_lens, resp_lens)
            inst_off = np.concatenate([[0], np.cumsum(inst_lens)])
            resp_off = np.concatenate([[0], np.cumsum(resp_lens)])
            for code, name in enumerate(OUTCOMES[:5]):
                counts[name] += int((outcome == code).sum())
            keep = np.flatnonzero(outcome <= 2)
            pieces = []
            tail_arr = np.asarray(tail, np.int32)
            eoa = np.asarray([tok.eoa_id], np.int32)
            starts = np.empty((4, len(keep)), np.int64)
            cursor = written
            for j, i in enumerate(keep.tolist()):
                head = np.asarray(heads[i], np.int32)
                body = inst_flat[inst_off[i] + cut_left[i]: inst_off[i + 1]]
                rk = int(resp_keep[i])
                full = rk == resp_lens[i] + 1
                resp = resp_flat[resp_off[i]: resp_off[i] + (rk - 1 if full else rk)]
                pieces += [head, body, tail_arr, resp]
                if full:
                    pieces.append(eoa)
                ilen = len(head) + len(body) + len(tail_arr)
                starts[:, j] = (cursor, ilen, cursor + ilen, rk)
                cursor += ilen + rk
            if pieces:
                chunk = np.concatenate(pieces).astype(np.int32, copy=False)
                raw_out.write(chunk.tobytes())
                written = cursor
            for k, name in enumerate(INDEX_FIELDS):
                index_parts[name].append(starts[k].copy())

        for path in inputs:
            file_rows = 0
            file_start = counts["rows"] + counts["dropped_malformed"]
            rows = []
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if bar is not None:
                        bar.update(len(raw))
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    if not raw.strip():
                        counts["blank_lines"] += 1
                        continue
                    try:
                        inst, resp, cond, trailing = parse_row(raw, tok.condition_ids)
                    except ValueError as exc:
                        bad(path, lineno, str(exc))
                        continue
                    counts["chat_turns_ignored"] += trailing
                    rows.append((inst, resp, cond))
                    file_rows += 1
                    if len(rows) >= CHUNK_ROWS:
                        flush(rows)
                        rows = []
            flush(rows)
            counts["rows"] += file_rows
            seen = counts["rows"] + counts["dropped_malformed"] - file_start
            if seen == 0:
                if not skip_invalid:
                    raise InputError(f"{path}: the file has no rows (empty file); use "
                                     f"--skip-invalid to skip it")
                counts["empty_files"] += 1
            files_report.append({"path": str(path), "rows": file_rows})
    if bar is not None:
        bar.close()
    counts["rows"] += counts["dropped_malformed"]

    index = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in index_parts.items()}
    num = len(index["inst_len"])
    if num == 0:
        raise InputError(f"no samples kept out of {counts['rows']} rows: "
                         + ", ".join(f"{k}={counts[k]}" for k in OUTCOMES if counts[k]))
    _write_npy_from_raw(raw_path, tmp / "tokens.npy", written)
    raw_path.unlink()
    for k in range(epochs):
        order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, k]))) \
            .permutation(num)
        (tmp / f"epoch_{k}").mkdir()
        for name in INDEX_FIELDS:
            save_npy(tmp / f"epoch_{k}" / f"{name}.npy", index[name][order])
        fsync_dir(tmp / f"epoch_{k}")
    tok.save(tmp)

    kept = EpochIndex(**index)
    inst_len, resp_len, causal = kept.inst_len, kept.resp_len, kept.causal_lens
    plan = MultipackSampler(inst_len, causal, decide.N - 1, seed=seed).plan(0)
    longest = int(np.argmax(inst_len + resp_len))
    metadata = {
        "format": FORMAT,
        "writer": "prefixlm prepare-sft",
        "tokenizer_info": tok.info(),
        "max_seq_len": decide.N,
        "total_length": int(written),
        "num_samples": int(num),
        "num_epochs": epochs,
        "seed": seed,
        "context_size": decide.N,
        "truncation": decide.policy,
        "min_response_tokens": decide.K,
        "label_convention": "inputs = inst + resp[:-1]; labels = (inst + resp)[1:], -100 on all "
                            "prefix positions but the last; causal_len = resp_len - 1",
    }
    write_json(tmp / "metadata.json", metadata)
    return {
        "inputs": files_report,
        "counts": counts,
        "malformed_examples": malformed_examples,
        "samples": int(num),
        "tokens": {"read": tokens_read, "written": int(written),
                   "prefix": int(inst_len.sum()), "response": int(resp_len.sum()),
                   "supervised": int(resp_len.sum())},
        "context_size": decide.N,
        "truncation": decide.policy,
        "min_response_tokens": decide.K,
        "longest_sample": {"index": longest, "inst_len": int(inst_len[longest]),
                           "resp_len": int(resp_len[longest]),
                           "seq_len": int(inst_len[longest] + resp_len[longest] - 1)},
        "histograms": {"inst_len": length_histogram(inst_len), "resp_len": length_histogram(resp_len),
                       "seq_len": length_histogram(inst_len + causal)},
        "packing": {"capacity": decide.N - 1, **plan.stats()},
    }


def format_report(report: dict) -> list[str]:
    c = report["counts"]
    lines = [f"prepare-sft: {report.get('output', '')}",
             f"  rows {c['rows']}: kept {c['kept']}, truncated-prefix {c['truncated_prefix']}, "
             f"truncated-response {c['truncated_response']}, dropped: empty response "
             f"{c['dropped_empty']}, too long {c['dropped_too_long']}, malformed "
             f"{c['dropped_malformed']}"]
    if c["dropped_empty"]:
        lines.append(f"  {c['dropped_empty']} samples dropped: fewer than "
                     f"{report['min_response_tokens']} causal tokens (causal_len = resp_len - 1)")
    if c["dropped_too_long"]:
        lines.append(f"  {c['dropped_too_long']} samples dropped: longer than --context-size "
                     f"{report['context_size']} under --truncation {report['truncation']}")
    if c["chat_turns_ignored"]:
        lines.append(f"  {c['chat_turns_ignored']} chat turns after the last assistant turn ignored")
    for ex in report["malformed_examples"][:5]:
        lines.append(f"  skipped {ex}")
    t = report["tokens"]
    pk = report["packing"]
    lines.append(f"  samples {report['samples']}, tokens {t['written']} (prefix {t['prefix']}, "
                 f"response {t['response']}), longest sample {report['longest_sample']['seq_len']} "
                 f"tokens of {report['context_size'] - 1}")
    lines.append(f"  packing at capacity {pk['capacity']}: {pk['steps']} batches, efficiency "
                 f"{pk['efficiency']:.1%}")
    for name in ("inst_len", "resp_len", "seq_len"):
        h = report["histograms"][name]
        lines.append(f"  {name:8s} " + " ".join(f"{k}:{v}" for k, v in h.items()))
    if "elapsed_s" in report:
        lines.append(f"  {report['elapsed_s']:.2f} s, {report['tokens_per_s']:,} tokens/s")
    return lines
