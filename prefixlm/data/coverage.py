"""The coverage report of a mixture: per source what its rows became and what each epoch drew.

Per source: rows read (blank lines and malformed rows apart), samples (one per row; one per
supervised assistant turn with turns=all), and what the context size made of them:
  kept                     whole
  truncated_prefix         instruction text cut from the left (truncate-prefix)
  truncated_response       response cut from the right, end of answer lost (truncate)
  dropped_empty            fewer than min_response_tokens causal tokens to begin with
  dropped_too_long         does not fit (drop), or the instruction alone fills the context
  dropped_short_prefix     truncate-prefix would keep too little instruction text
  dropped_truncation_guard truncate would leave fewer than min_response_tokens causal tokens
                           (data_io writes these, with a response that is empty after the shift)
with their tokens (read, kept, cut by truncation, dropped). Per source and epoch: samples drawn,
distinct rows among them, repeated draws (drawn - distinct), kept rows not drawn, truncated ones
drawn, prefix and response tokens, the source's share of the epoch; over all epochs, the kept rows
drawn at least once (covered).
"""

from __future__ import annotations

import numpy as np

from .cache import DEFAULT_CONDITION, SPECIAL_TEXT
from .render import (EMPTY, KEPT, SHORT_PREFIX, TOO_LONG, TRUNCATED_PREFIX,
                     TRUNCATED_RESPONSE)

__all__ = ["source_outcomes", "format_coverage"]


def source_outcomes(source, rows, counts, malformed, outcome, cut_left, resp_keep, draws,
                    truncation, tok) -> dict:
    """One source's entry of the report (module docstring)."""
    inst, resp = rows.inst_len, rows.resp_len
    sampling = source.options["sampling"]
    guard = (outcome == TOO_LONG) & (sampling.long_context == "truncate-response") & \
        (inst < truncation.N)
    codes = {"kept": outcome == KEPT, "truncated_prefix": outcome == TRUNCATED_PREFIX,
             "truncated_response": outcome == TRUNCATED_RESPONSE, "dropped_empty":
             outcome == EMPTY, "dropped_too_long": (outcome == TOO_LONG) & ~guard,
             "dropped_short_prefix": outcome == SHORT_PREFIX, "dropped_truncation_guard": guard}
    kept_mask = outcome <= TRUNCATED_RESPONSE
    before = inst + resp
    after = inst - cut_left + resp_keep
    kept_rows = np.flatnonzero(kept_mask)
    truncated = np.isin(outcome, (TRUNCATED_PREFIX, TRUNCATED_RESPONSE))
    epochs = []
    ever = np.zeros(len(kept_rows), bool)
    for d in draws:
        rows_of = kept_rows[d]
        distinct = np.unique(d)
        ever[distinct] = True
        epochs.append({"drawn": int(len(d)), "distinct": int(len(distinct)),
                       "repeated": int(len(d) - len(distinct)),
                       "not_drawn": int(len(kept_rows) - len(distinct)),
                       "truncated": int(truncated[rows_of].sum()),
                       "prefix_tokens": int((inst - cut_left)[rows_of].sum()),
                       "response_tokens": int(resp_keep[rows_of].sum())})
    return {
        "name": source.name, "kind": source.kind, "path": str(source.path),
        "rule": sampling.rule, "sampling": sampling.describe(),
        "long_context": sampling.long_context,
        "rows": int(counts.get("rows", 0)), "samples": int(len(outcome)),
        "blank_lines": int(counts.get("blank_lines", 0)),
        "malformed": int(counts.get("malformed", 0)), "malformed_examples": list(malformed),
        "chat_turns_ignored": int(counts.get("chat_turns_ignored", 0)),
        "special_text_rows": int(np.count_nonzero(rows.flags & SPECIAL_TEXT)),
        "default_condition_rows": int(np.count_nonzero(rows.flags & DEFAULT_CONDITION)),
        "outcomes": {name: int(mask.sum()) for name, mask in codes.items()},
        "tokens": {"read": int(before.sum()), "kept": int(after[kept_mask].sum()),
                   "cut": int((before - after)[truncated].sum()),
                   "dropped": int(before[~kept_mask].sum())},
        "rows_per_epoch": int(len(draws[0])) if draws else 0,
        "epochs": epochs,
        "covered": int(ever.sum()), "covered_tokens": int(after[kept_rows[ever]].sum()),
    }


def _n(value) -> str:
    return f"{value:,}"


def _pct(part, whole) -> str:
    return f"{_n(part)} ({part / max(1, whole):.1%})"


def format_coverage(report: dict, short: bool = False) -> list[str]:
    """The report as Markdown lines (short: the summary printed after a run)."""
    sources = report["sources"]
    kept = sum(s["outcomes"]["kept"] + s["outcomes"]["truncated_prefix"] +
               s["outcomes"]["truncated_response"] for s in sources)
    covered = sum(s["covered"] for s in sources)
    lines = [f"# Mixture coverage: {report['output']}", "",
             f"{len(sources)} sources from {report['mixture']}; {report['epochs']} epochs, seed "
             f"{report['seed']}, context size {report['context_size']} (inst_len + resp_len), "
             f"min_response_tokens {report['min_response_tokens']}.",
             f"Samples per epoch: {', '.join(map(_n, report['samples_per_epoch']))}; tokens per "
             f"epoch: {', '.join(map(_n, report['tokens_per_epoch']))}; tokens.npy holds "
             f"{_n(report['tokens_written'])} (each drawn sample once).",
             f"Kept rows drawn at least once: {_pct(covered, kept)}."]
    if "tokenized" in report:
        lines.append(f"Tokenized by this run: {', '.join(report['tokenized']) or 'none'}; from "
                     f"the cache ({report['cache_dir']}): {', '.join(report['cached']) or 'none'}.")
    lines += [f"Note: {note}" for note in report.get("notes", [])]
    if short:
        return lines + [f"Per source and epoch: {report['output']}/coverage.md"]
    lines += ["", "## Sources", "",
              "| Source | Settings (from) | Rows | Samples | Kept (whole or truncated) | "
              "Truncated | Dropped | Tokens kept | Per epoch | Covered |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sources:
        o = s["outcomes"]
        n_kept = o["kept"] + o["truncated_prefix"] + o["truncated_response"]
        lines.append(
            f"| {s['name']} | {s['sampling']}, {s['long_context']} ({s['rule']}) | "
            f"{_n(s['rows'])} | {_n(s['samples'])} | {_pct(n_kept, s['samples'])} | "
            f"{_n(o['truncated_prefix'] + o['truncated_response'])} | "
            f"{_n(s['samples'] - n_kept)} | {_n(s['tokens']['kept'])} | "
            f"{_n(s['rows_per_epoch'])} | {_pct(s['covered'], n_kept)} |")
    lines += ["", "## Dropped, truncated and skipped", "",
              "| Source | Empty response | Too long | Prefix too short | Truncation guard | "
              "Truncated prefix | Truncated response | Tokens cut | Tokens dropped | Malformed | "
              "Blank lines | Chat turns ignored |",
              "|---|" + "---:|" * 11]
    for s in sources:
        o = s["outcomes"]
        lines.append(
            f"| {s['name']} | {_n(o['dropped_empty'])} | {_n(o['dropped_too_long'])} | "
            f"{_n(o['dropped_short_prefix'])} | {_n(o['dropped_truncation_guard'])} | "
            f"{_n(o['truncated_prefix'])} | {_n(o['truncated_response'])} | "
            f"{_n(s['tokens']['cut'])} | {_n(s['tokens']['dropped'])} | {_n(s['malformed'])} | "
            f"{_n(s['blank_lines'])} | {_n(s['chat_turns_ignored'])} |")
    lines += ["", "## Epochs", "",
              "| Epoch | Source | Drawn (share) | Distinct | Repeated | Not drawn | Truncated | "
              "Prefix tokens | Response tokens |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in range(report["epochs"]):
        total = report["samples_per_epoch"][k]
        for s in sources:
            e = s["epochs"][k]
            lines.append(f"| {k} | {s['name']} | {_pct(e['drawn'], total)} | "
                         f"{_n(e['distinct'])} | {_n(e['repeated'])} | {_n(e['not_drawn'])} | "
                         f"{_n(e['truncated'])} | {_n(e['prefix_tokens'])} | "
                         f"{_n(e['response_tokens'])} |")
        sums = {key: sum(s["epochs"][k][key] for s in sources) for key in (
            "distinct", "repeated", "not_drawn", "truncated", "prefix_tokens", "response_tokens")}
        lines.append(f"| {k} | **all** | {_n(total)} | {_n(sums['distinct'])} | "
                     f"{_n(sums['repeated'])} | {_n(sums['not_drawn'])} | "
                     f"{_n(sums['truncated'])} | {_n(sums['prefix_tokens'])} | "
                     f"{_n(sums['response_tokens'])} |")
    bad = [(s["name"], ex) for s in sources for ex in s["malformed_examples"]]
    if bad:
        lines += ["", "## Malformed rows skipped (first examples)", ""]
        lines += [f"- {ex}" for _, ex in bad]
    return lines
