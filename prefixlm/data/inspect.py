"""`prefixlm inspect`: what a prepared dataset holds, and one packed batch with its regions marked."""

from __future__ import annotations

import numpy as np

from .dataset import V1Dataset, length_histogram
from .loader import IGNORE_INDEX

__all__ = ["summarize", "format_summary", "render_batch"]


def summarize(dataset: V1Dataset, epoch: int = 0, min_causal: int = 1) -> dict:
    e = dataset.epoch(epoch)
    seq = e.prefix_lens + e.causal_lens
    longest = int(np.argmax(seq)) if len(seq) else 0
    return {
        "path": str(dataset.path),
        "origin": dataset.origin,
        "epochs": dataset.num_epochs,
        "epoch": epoch,
        "samples": len(e),
        "samples_per_epoch": [len(dataset.epoch(k)) for k in range(dataset.num_epochs)],
        "min_causal": min_causal,
        "skipped_per_epoch": dataset.count_short(min_causal),
        "tokens_file": int(len(dataset.tokens)),
        "tokens_dtype": str(dataset.tokens.dtype),
        "vocab_size": dataset.vocab_size,
        "total_length": dataset.total_length_note(),
        "prefix_tokens": int(e.inst_len.sum()),
        "response_tokens": int(e.resp_len.sum()),
        "batch_tokens": int(seq.sum()),
        "causal_len_zero": int((e.causal_lens == 0).sum()),
        "max_seq_len": dataset.max_seq_len,
        "longest": {"index": longest, "seq_len": int(seq[longest]) if len(seq) else 0,
                    "inst_len": int(e.inst_len[longest]) if len(seq) else 0,
                    "resp_len": int(e.resp_len[longest]) if len(seq) else 0},
        "histograms": {"inst_len": length_histogram(e.inst_len), "causal_len": length_histogram(e.causal_lens),
                       "seq_len": length_histogram(seq)},
    }


def describe_tokenizer(tokenizer) -> dict:
    """Markers and conditions of a tokenizer, by string and id, for the summary."""
    def named(token_id):
        return None if token_id is None else f"{tokenizer.token_name(token_id)} ({token_id})"
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "file": str(getattr(tokenizer, "path", "built in")),
            "markers": {role: named(i) for role, i in tokenizer.special_ids().items()},
            "conditions": {name: named(i) for name, i in tokenizer.condition_ids.items()},
            "default_condition": tokenizer.default_condition,
            "special_text": "parsed" if tokenizer.parse_special else "plain"}


def format_summary(s: dict) -> str:
    lg = s["longest"]
    per_epoch = ", ".join(f"epoch {k}: {n} of {m}" for k, (n, m) in
                          enumerate(zip(s["skipped_per_epoch"], s["samples_per_epoch"])))
    skipped = sum(s["skipped_per_epoch"])
    lines = [
        f"dataset   {s['path']}",
        f"written by {s['origin']}",
        f"epochs    {s['epochs']} (samples per epoch: "
        f"{', '.join(map(str, s['samples_per_epoch']))})",
        f"samples   {s['samples']} in epoch {s['epoch']} (the figures below are of this epoch)",
        f"tokens    {s['batch_tokens']} in batches (prefix {s['prefix_tokens']}, response "
        f"{s['response_tokens']}); tokens.npy holds {s['tokens_file']} ({s['tokens_dtype']}, "
        f"ids checked below vocab_size {s['vocab_size']}); {s['total_length']}",
        f"causal_len == 0: {s['causal_len_zero']} samples in epoch {s['epoch']}"
        + ("  (they would train only the last prefix position)" if s["causal_len_zero"] else ""),
        f"skipped by the loader (fewer than min_causal={s['min_causal']} causal tokens): "
        + (f"{skipped} ({per_epoch})" if skipped else "none"),
        f"longest   sample {lg['index']}: {lg['seq_len']} tokens (prefix {lg['inst_len']}, response "
        f"{lg['resp_len']}) against a context of {s['max_seq_len'] - 1} "
        f"(max_seq_len {s['max_seq_len']} before the shift)"
        + ("  ** LONGER THAN THE CONTEXT **" if lg["seq_len"] > s["max_seq_len"] - 1 else ""),
    ]
    for name, hist in s["histograms"].items():
        lines.append(f"{name:11s}" + "  ".join(f"{k}:{v}" for k, v in hist.items()))
    tok = s.get("tokenizer")
    if isinstance(tok, dict):
        lines.append(f"tokenizer {tok['kind']}, {tok['vocab_size']} tokens, {tok['file']}")
        lines.append("  markers " + ", ".join(f"{k} {v}" for k, v in tok["markers"].items()))
        lines.append("  conditions " + (", ".join(f"{k} {v}" for k, v in tok["conditions"].items())
                                        or "none")
                     + f"; new text: rows without a condition get "
                       f"{tok['default_condition'] or 'none'}, special-token strings are "
                       f"{tok['special_text']} text")
    elif tok:
        lines.append(f"tokenizer not found: {tok}")
    return "\n".join(lines)


def render_batch(loader, epoch: int, step: int, tokenizer=None, max_tokens: int = 400) -> str:
    """One batch of `loader`, token by token, with its regions marked.

    Region codes: P prefix (bidirectional, unsupervised), P* last prefix position (labelled with the
    first response token), C causal, - padding.
    """
    rows, prefix, causal = loader.host_batch(epoch, step)
    inputs, labels, positions = rows
    ids = loader.batch_ids(epoch, step)
    total = int((prefix + causal).sum())
    name = (lambda i: repr(tokenizer.token_name(int(i)))) if tokenizer is not None else str
    lines = [f"epoch {epoch} step {step} rank {loader.rank}/{loader.world_size}: {len(ids)} samples, "
             f"{total} tokens + {loader.capacity - total} padding = capacity {loader.capacity}",
             "regions: P prefix (bidirectional, no label)  P* last prefix (labelled with the first "
             "response token)  C causal  - padding"]
    start = 0
    shown = 0
    for k, (sid, p, c) in enumerate(zip(ids.tolist(), prefix.tolist(), causal.tolist())):
        lines.append(f"-- sample {k} (dataset index {sid}): prefix {p}, causal {c}, tokens "
                     f"[{start}, {start + p + c})")
        for t in range(start, start + p + c):
            if shown >= max_tokens:
                break
            region = "C " if t - start >= p else ("P*" if t - start == p - 1 else "P ")
            label = "-" if labels[t] == IGNORE_INDEX else f"{int(labels[t])} {name(labels[t])}"
            lines.append(f"{t:7d} {region} pos {int(positions[t]):5d}  in {int(inputs[t]):6d} "
                         f"{name(inputs[t]):>14s}  -> {label}")
            shown += 1
        start += p + c
    if shown >= max_tokens:
        lines.append(f"... (showing the first {max_tokens} tokens; --max-tokens to see more)")
    pad = loader.capacity - total
    if pad:
        lines.append(f"-- padding: {pad} tokens [{total}, {loader.capacity}): input "
                     f"{int(inputs[total])}, label -, pos 0")
    return "\n".join(lines)
