"""prepare-sft: JSONL -> a tokenized HRM-Text "V1" dataset.

Rows follow `rows.py` (instruction rows or chat rows: their last assistant turn, or every one with
turns="all"; rendered plainly, or by the tokenizer's own chat template, `chat.py`); `render.py`
renders them to samples and applies the truncation policy (its docstring gives the length rules);
`writer.py` writes the folder (atomically: a temporary sibling, fsynced, renamed into place at the
end; `--overwrite` only replaces a dataset prefixlm wrote). A mixture of many sources is
`mixture.py`'s.

Output:
  tokens.npy (int32), epoch_k/{inst_start,inst_len,resp_start,resp_len}.npy (int64; epoch k is the
  kept samples in an order shuffled by (seed, k)), metadata.json (HRM-Text's keys, with
  tokenizer_info carrying both HRM-Text's and prefixlm's tokenizer keys), tokenizer.json and
  tokenizer_info.json (so HRM-Text's inference can load the folder as its tokenizer), report.json
  (the counts) and rows.jsonl (one line per input row, in input order: file, line, outcome, prefix
  and response lengths before and after, and why a malformed row was skipped).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .dataset import FORMAT, INDEX_FIELDS, WRITER, EpochIndex, length_histogram
from .chat import (CHAT_TEMPLATES, copy_template, encoded_from_ids, load_chat_tokenizer,
                   parse_chat_record, special_text)
from .render import OUTCOMES, TRUNCATION_POLICIES, Truncation, render_encoded, render_rows
from .rows import MALFORMED_EXAMPLES, TURNS, InputError, RowError, decode_row, parse_record
from .sampler import MultipackSampler
from .tokenizer import AUTO, load_tokenizer
from .writer import DatasetWriter, shuffled_epochs

__all__ = ["prepare_sft", "TRUNCATION_POLICIES", "InputError", "FORMAT", "ROWS_REPORT"]

ROWS_REPORT = "rows.jsonl"
CHUNK_ROWS = 4096
MALFORMED = OUTCOMES.index("dropped_malformed")


def prepare_sft(inputs, output, tokenizer="byte", context_size: int = 4097, epochs: int = 1,
                seed: int = 0, truncation: str = "drop", min_response_tokens: int = 1,
                skip_invalid: bool = False, progress: bool = True, *, special_tokens=None,
                conditions=None, default_condition=AUTO, parse_special_tokens: bool | None = None,
                min_prefix_tokens: int = 1, overwrite: bool = False, log=None,
                chat_template: str = "plain", turns: str = "last",
                chat_template_kwargs: dict | None = None) -> dict:
    """Tokenize JSONL files into a V1 dataset at `output`; returns the report (also in report.json).

    tokenizer: "byte", a tokenizer.json, a folder (see `load_tokenizer`) or a tokenizer object.
    special_tokens / conditions / default_condition / parse_special_tokens: see `load_tokenizer`.
    min_prefix_tokens: truncate-prefix keeps at least this many instruction text tokens (else the
    row is dropped). overwrite: replace a dataset prefixlm wrote at `output` (see `writer.py`).
    log: callable for the summary lines (default: stderr when progress is on, silent otherwise).
    chat_template: chat rows rendered "plain" (`rows.render_chat`) or by the "tokenizer" folder's
    own template (`chat.py`; chat_template_kwargs go to it). turns: "last" assistant turn of a chat
    row, or "all" (one sample each; rows.jsonl then has a line per sample, with its turn).
    """
    started = time.perf_counter()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("no input files given")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    decide = Truncation(context_size, truncation, min_response_tokens, min_prefix_tokens)
    for p in inputs:
        if not p.is_file():
            raise FileNotFoundError(f"input file {p} does not exist")
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)

    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"chat_template must be one of {', '.join(CHAT_TEMPLATES)}, got "
                         f"{chat_template!r}")
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {', '.join(TURNS)}, got {turns!r}")
    chat = None
    if chat_template == "tokenizer":
        tok, chat = load_chat_tokenizer(tokenizer, special_tokens, conditions, default_condition,
                                        parse_special_tokens, chat_template_kwargs)
    else:
        tok = load_tokenizer(tokenizer, special_tokens, conditions,
                             default_condition=default_condition,
                             parse_special_tokens=parse_special_tokens)
    writer = DatasetWriter(output, inputs, overwrite=overwrite, log=log)
    try:
        with writer:
            report = _prepare_into(writer, inputs, tok, decide, int(epochs), int(seed),
                                   skip_invalid, progress, _Samples(tok, chat, turns))
            report["leftovers_removed"] = [str(p) for p in writer.removed_leftovers]
            report["elapsed_s"] = round(time.perf_counter() - started, 3)
            report["tokens_per_s"] = round(report["tokens"]["read"] /
                                           max(report["elapsed_s"], 1e-9))
            writer.write_json("report.json", report)
            writer.commit()
    except OSError as exc:
        if exc.filename is None:  # a failed write() names no file: name the dataset
            raise OSError(exc.errno, exc.strerror or str(exc), str(output)) from exc
        raise
    report["output"] = str(output)
    for line in format_report(report):
        log(line)
    return report


class _RowsReport:
    """rows.jsonl: one JSON line per input row, in input order (written by hand for speed: a
    json.dumps per row would cost as much as a tenth of the tokenization)."""

    def __init__(self, f):
        self.f = f

    def malformed(self, path, lineno, error):
        self.f.write(json.dumps({"file": str(path), "line": lineno, "outcome": OUTCOMES[MALFORMED],
                                 "error": error}, ensure_ascii=False) + "\n")

    def rendered(self, path, lines, turns, r):
        """The rows of a rendered chunk; `lines` their line numbers, `turns` their chat turns
        (None: not reported)."""
        head = '{"file":' + json.dumps(str(path), ensure_ascii=False) + ',"line":'
        names = [',"outcome":"' + name + '","inst_len":[' for name in OUTCOMES]
        out = []
        for lineno, turn, code, ib, ia, rb, ra, special, default in zip(
                lines, turns, r.outcome.tolist(), r.inst_before.tolist(), r.inst_after.tolist(),
                r.resp_before.tolist(), r.resp_after.tolist(), r.special_text.tolist(),
                r.default_condition.tolist()):
            extra = (',"special_text":true' if special else "") + \
                (',"default_condition":true' if default else "") + \
                (f',"turn":{turn}' if turn is not None else "")
            out.append(f'{head}{lineno}{names[code]}{ib},{ia}],"resp_len":[{rb},{ra}]'
                       f'{extra}}}\n')
        self.f.write("".join(out))


def _slice_rows(r, start: int, end: int):
    """The per-row fields of rows [start, end) of a RenderedRows (for the rows report)."""
    return SimpleNamespace(**{name: getattr(r, name)[start:end] for name in (
        "outcome", "inst_before", "inst_after", "resp_before", "resp_after", "special_text",
        "default_condition")})


class _Samples:
    """One JSONL line -> its samples: ((instruction, response, condition) or, with a chat
    template, (prefix ids, response ids, special text)), turn), and the trailing turns."""

    def __init__(self, tok, chat, turns: str):
        self.tok, self.chat, self.turns = tok, chat, turns

    def __call__(self, raw: bytes):
        row, surrogates = decode_row(raw)
        if self.chat is None:
            samples, trailing = parse_record(row, self.tok.condition_ids, self.turns,
                                             surrogates=surrogates)
            return [(s[:3], self._turn(s[3])) for s in samples], trailing
        messages, tools, picked, trailing = parse_chat_record(row, self.turns)
        special = special_text(self.tok, messages)
        return [((prefix, response, special), self._turn(k)) for (prefix, response), k in
                zip(self.chat.render(messages, tools, picked), picked)], trailing

    def _turn(self, k: int):
        return k if self.turns == "all" and k >= 0 else None

    def render(self, samples, decide: Truncation):
        if self.chat is None:
            return render_rows(self.tok, samples, decide)
        return render_encoded(encoded_from_ids([s[:2] for s in samples],
                                               [s[2] for s in samples]), decide)


def _prepare_into(writer: DatasetWriter, inputs, tok, decide: Truncation, epochs: int, seed: int,
                  skip_invalid: bool, progress: bool, samples: _Samples) -> dict:
    counts = dict.fromkeys(OUTCOMES, 0)
    counts.update(rows=0, blank_lines=0, chat_turns_ignored=0, empty_files=0,
                  special_text_rows=0, default_condition_rows=0)
    malformed_examples: list[str] = []
    files_report = []
    tokens_read = 0
    index_parts = {k: [] for k in INDEX_FIELDS}
    total_bytes = sum(p.stat().st_size for p in inputs)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare-sft",
                   mininterval=0.5, disable=total_bytes < (8 << 20), file=sys.stderr)

    rows_file = open(writer.path / ROWS_REPORT, "w", encoding="utf-8")
    report_rows = _RowsReport(rows_file)

    def flush(path, chunk):
        """Render the chunk's good rows; rows.jsonl gets every row of it, in order."""
        nonlocal tokens_read
        good = [entry for entry in chunk if entry[1] is not None]
        rendered = samples.render([entry[1] for entry in good], decide) if good else None
        if rendered is not None:
            tokens_read += int(rendered.inst_before.sum() + rendered.resp_before.sum())
            for code, name in enumerate(OUTCOMES[:MALFORMED]):
                counts[name] += int((rendered.outcome == code).sum())
            counts["special_text_rows"] += int(rendered.special_text.sum())
            counts["default_condition_rows"] += int(rendered.default_condition.sum())
            start = writer.append_tokens(rendered.tokens)
            sample_len = rendered.inst_len + rendered.resp_len
            inst_start = np.full(len(sample_len), start, np.int64)
            inst_start[1:] += np.cumsum(sample_len[:-1])
            index_parts["inst_start"].append(inst_start)
            index_parts["inst_len"].append(rendered.inst_len)
            index_parts["resp_start"].append(inst_start + rendered.inst_len)
            index_parts["resp_len"].append(rendered.resp_len)
        run: list[tuple] = []  # (line, turn) of consecutive rendered samples, not yet reported
        at = 0
        for lineno, parsed, error, turn in chunk + [(None, None, None, None)]:
            if parsed is not None:
                run.append((lineno, turn))
                continue
            if run:
                report_rows.rendered(path, [r[0] for r in run], [r[1] for r in run],
                                     _slice_rows(rendered, at, at + len(run)))
                at += len(run)
                run = []
            if lineno is not None:
                report_rows.malformed(path, lineno, error)

    with rows_file:
        for path in inputs:
            file_rows = 0
            chunk = []
            with open(path, "rb") as f:
                for lineno, raw in enumerate(f, 1):
                    if bar is not None:
                        bar.update(len(raw))
                    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                        raw = raw[3:]
                    if not raw.strip():
                        counts["blank_lines"] += 1
                        continue
                    file_rows += 1
                    try:
                        parsed, trailing = samples(raw)
                    except RowError as exc:
                        where = f"{path}:{lineno}: {exc}"
                        if not skip_invalid:
                            raise InputError(where + " (use --skip-invalid to skip bad rows)")
                        counts["dropped_malformed"] += 1
                        if len(malformed_examples) < MALFORMED_EXAMPLES:
                            malformed_examples.append(where)
                        chunk.append((lineno, None, str(exc), None))
                        continue
                    counts["chat_turns_ignored"] += trailing
                    chunk += [(lineno, sample, None, turn) for sample, turn in parsed]
                    if len(chunk) >= CHUNK_ROWS:
                        flush(path, chunk)
                        chunk = []
            flush(path, chunk)
            counts["rows"] += file_rows
            if file_rows == 0:
                if not skip_invalid:
                    raise InputError(f"{path}: the file has no rows (empty file); use "
                                     f"--skip-invalid to skip it")
                counts["empty_files"] += 1
            files_report.append({"path": str(path), "rows": file_rows})
    if bar is not None:
        bar.close()

    index = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in index_parts.items()}
    num = len(index["inst_len"])
    if num == 0:
        raise InputError(f"no samples kept out of {counts['rows']} rows: "
                         + ", ".join(f"{k}={counts[k]}" for k in OUTCOMES if counts[k]))
    writer.finish_tokens()
    for k, epoch_index in shuffled_epochs(index, epochs, seed):
        writer.write_epoch(k, epoch_index)
    tok.save(writer.path, tokenizer_path=str(writer.final))
    if samples.chat is not None:
        copy_template(samples.chat, writer.path)

    kept = EpochIndex(**index)
    inst_len, resp_len, causal = kept.inst_len, kept.resp_len, kept.causal_lens
    plan = MultipackSampler(inst_len, causal, decide.N - 1, seed=seed).plan(0)
    longest = int(np.argmax(inst_len + resp_len))
    metadata = {
        "format": FORMAT,
        "writer": WRITER,
        "tokenizer_info": tok.info(tokenizer_path=str(writer.final)),
        "max_seq_len": decide.N,
        "total_length": int(writer.num_tokens),
        "num_samples": int(num),
        "num_epochs": epochs,
        "seed": seed,
        "context_size": decide.N,
        "truncation": decide.policy,
        "min_response_tokens": decide.K,
        "min_prefix_tokens": decide.min_prefix,
        "chat_template": "plain" if samples.chat is None else "tokenizer",
        "turns": samples.turns,
        "label_convention": "inputs = inst + resp[:-1]; labels = (inst + resp)[1:], -100 on all "
                            "prefix positions but the last; causal_len = resp_len - 1",
    }
    writer.write_json("metadata.json", metadata)
    return {
        "inputs": files_report,
        "counts": counts,
        "malformed_examples": malformed_examples,
        "rows_report": ROWS_REPORT,
        "samples": int(num),
        "tokens": {"read": tokens_read, "written": int(writer.num_tokens),
                   "prefix": int(inst_len.sum()), "response": int(resp_len.sum()),
                   "supervised": int(resp_len.sum())},
        "context_size": decide.N,
        "truncation": decide.policy,
        "min_response_tokens": decide.K,
        "min_prefix_tokens": decide.min_prefix,
        "default_condition": tok.default_condition,
        "special_text": "parsed" if tok.parse_special else "plain",
        "longest_sample": {"index": longest, "inst_len": int(inst_len[longest]),
                           "resp_len": int(resp_len[longest]),
                           "seq_len": int(inst_len[longest] + resp_len[longest] - 1)},
        "histograms": {"inst_len": length_histogram(inst_len), "resp_len": length_histogram(resp_len),
                       "seq_len": length_histogram(inst_len + causal)},
        "packing": {"capacity": decide.N - 1, **plan.stats()},
    }


def format_report(report: dict) -> list[str]:
    c = report["counts"]
    rows_file = Path(report.get("output", ""), report.get("rows_report", ROWS_REPORT))
    lines = [f"prepare-sft: {report.get('output', '')}",
             f"  rows {c['rows']}: kept {c['kept']}, truncated-prefix {c['truncated_prefix']}, "
             f"truncated-response {c['truncated_response']}, dropped: empty response "
             f"{c['dropped_empty']}, too long {c['dropped_too_long']}, prefix too short "
             f"{c['dropped_short_prefix']}, malformed {c['dropped_malformed']} "
             f"(every row: {rows_file})"]
    if c["dropped_empty"]:
        lines.append(f"  {c['dropped_empty']} samples dropped: fewer than "
                     f"{report['min_response_tokens']} causal tokens (causal_len = resp_len - 1)")
    if c["dropped_too_long"]:
        lines.append(f"  {c['dropped_too_long']} samples dropped: longer than --context-size "
                     f"{report['context_size']} under --truncation {report['truncation']}")
    if c["dropped_short_prefix"]:
        lines.append(f"  {c['dropped_short_prefix']} samples dropped: truncate-prefix would keep "
                     f"fewer than --min-prefix-tokens {report['min_prefix_tokens']} instruction "
                     f"tokens")
    if c["chat_turns_ignored"]:
        lines.append(f"  {c['chat_turns_ignored']} chat turns after the last assistant turn ignored")
    if c["default_condition_rows"]:
        lines.append(f"  {c['default_condition_rows']} rows without a condition got the default "
                     f"condition {report['default_condition']!r}")
    if c["special_text_rows"]:
        how = ("parsed into their ids" if report["special_text"] == "parsed"
               else "encoded as plain text")
        lines.append(f"  {c['special_text_rows']} rows held special-token strings, {how}")
    if c["dropped_malformed"]:
        shown = report["malformed_examples"][:5]
        lines.append(f"  {c['dropped_malformed']} malformed rows skipped"
                     + (f", the first {len(shown)}:" if len(shown) < c["dropped_malformed"]
                        else ":"))
        lines += [f"    {ex}" for ex in shown]
        if len(shown) < c["dropped_malformed"]:
            lines.append(f"    ... all {c['dropped_malformed']} in {rows_file} "
                         f"(outcome dropped_malformed)")
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
