"""Rows -> tokens of samples, and what the truncation policy does to each row.

`encode_rows(tokenizer, rows)` renders a chunk of (instruction, response, condition) rows the way
`tokenizer.py` defines it into whole samples (`EncodedRows`: prefix markers, instruction text,
end-of-prefix marker, response, end of answer). `Truncation` decides per sample what a context
size does to it, and `gather_samples` cuts the kept samples out of a token stream accordingly.
`render_rows` is the three in one step (prepare-sft); a mixture encodes once into its cache and
truncates when it samples. Every writer of datasets goes through these.

Lengths. A sample is `inst_len` prefix tokens and `resp_len` response tokens, the response ending
with the end-of-answer token; the model reads `inst_len + resp_len - 1` of them, `causal_len =
resp_len - 1` causal. The context N bounds `inst_len + resp_len <= N` (HRM-Text: N = 4097 for 4096
positions); no sample with `causal_len < K` (min_causal) is kept. For a sample that does not fit:
  drop               it is dropped as too long;
  truncate-prefix    instruction text tokens are cut from the left (markers kept) so that the whole
                     response fits, keeping at least `min_prefix_tokens` of them; else dropped
                     (`dropped_short_prefix`): a prompt cut down to its markers teaches nothing;
  truncate-response  the response is cut from the right to fit, keeping at least K causal tokens; a
                     cut response has no end-of-answer token (the model must not learn to stop
                     there); dropped if the instruction leaves less than K + 1 response tokens.
A response shorter than K + 1 tokens (e.g. empty) is dropped as empty under every policy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["OUTCOMES", "TRUNCATION_POLICIES", "Truncation", "EncodedRows", "encode_rows",
           "gather_ranges", "gather_samples", "truncate", "RenderedRows", "render_rows",
           "render_encoded"]

TRUNCATION_POLICIES = ("drop", "truncate-prefix", "truncate-response")
OUTCOMES = ("kept", "truncated_prefix", "truncated_response", "dropped_empty", "dropped_too_long",
            "dropped_short_prefix", "dropped_malformed")
KEPT, TRUNCATED_PREFIX, TRUNCATED_RESPONSE, EMPTY, TOO_LONG, SHORT_PREFIX = range(6)


class Truncation:
    """The per-row decision of a truncation policy (module docstring), vectorised over a chunk."""

    def __init__(self, context_size: int, policy: str = "drop", min_causal: int = 1,
                 min_prefix_tokens: int = 1):
        if policy not in TRUNCATION_POLICIES:
            raise ValueError(f"truncation must be one of {', '.join(TRUNCATION_POLICIES)}, "
                             f"got {policy!r}")
        for name, value, low in (("context_size", context_size, 2), ("min_causal", min_causal, 1),
                                 ("min_prefix_tokens", min_prefix_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                extra = (" (a sample needs at least one causal token; causal_len = resp_len - 1)"
                         if name == "min_causal" else "")
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}{extra}")
        self.N, self.policy = int(context_size), policy
        self.K, self.min_prefix = int(min_causal), int(min_prefix_tokens)

    def __call__(self, head, body, tail, resp_body):
        """Per row: outcome code, instruction text tokens cut from the left, response tokens kept
        (the end-of-answer included when the response is whole)."""
        N, K = self.N, self.K
        inst = head + body + tail
        resp = resp_body + 1  # + end of answer
        outcome = np.full(len(inst), KEPT, np.int8)
        cut_left = np.zeros(len(inst), np.int64)
        resp_keep = resp.copy()
        empty = resp - 1 < K
        too_long = (inst + resp > N) & ~empty
        outcome[empty] = EMPTY
        if self.policy == "drop":
            outcome[too_long] = TOO_LONG
        elif self.policy == "truncate-prefix":
            room = N - resp - head - tail  # instruction text tokens that fit
            ok = too_long & (room >= self.min_prefix)
            outcome[ok] = TRUNCATED_PREFIX
            cut_left[ok] = body[ok] - room[ok]
            outcome[too_long & ~ok & (room >= 0)] = SHORT_PREFIX
            outcome[too_long & (room < 0)] = TOO_LONG  # the response alone leaves no room
        else:  # truncate-response: the first N - inst tokens, no end-of-answer
            keep = N - inst
            ok = too_long & (keep - 1 >= K)
            outcome[ok] = TRUNCATED_RESPONSE
            resp_keep[ok] = keep[ok]
            outcome[too_long & ~ok] = TOO_LONG
        return outcome, cut_left, resp_keep


@dataclass
class EncodedRows:
    """Whole samples, untruncated: per sample its prefix (head markers, instruction text, tail
    markers) then its response (text, then the end-of-answer token), all concatenated."""

    tokens: np.ndarray           # int32
    head_len: np.ndarray         # int32 per sample: markers before the instruction text
    inst_len: np.ndarray         # int64 per sample: head + text + tail
    tail_len: np.ndarray         # int32 per sample: markers after the instruction text
    resp_len: np.ndarray         # int64 per sample: response text + end of answer
    special_text: np.ndarray     # bool per sample: the text held a special-token string
    default_condition: np.ndarray  # bool per sample: no condition given, the default applied

    @property
    def starts(self) -> np.ndarray:
        """Offset of each sample in `tokens`."""
        lengths = self.inst_len + self.resp_len
        return np.cumsum(lengths) - lengths


def gather_ranges(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tokens[starts[0]: starts[0] + lengths[0]] ++ tokens[starts[1]: ...] ++ ..., in one
    fancy-indexing step."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int32)
    offsets = np.cumsum(lengths) - lengths
    index = np.repeat(np.asarray(starts, np.int64) - offsets, lengths) + np.arange(total)
    return np.asarray(tokens[index], np.int32)


def gather_samples(tokens, inst_start, head_len, inst_len, resp_start, cut_left, resp_keep):
    """The kept samples' tokens, concatenated: per sample its head markers, its instruction text
    without the `cut_left` tokens after the head (truncate-prefix), the tail markers, and the first
    `resp_keep` response tokens. Returns (tokens, new inst_len, new resp_len)."""
    inst_start = np.asarray(inst_start, np.int64)
    head_len = np.asarray(head_len, np.int64)
    cut_left = np.asarray(cut_left, np.int64)
    rest = np.asarray(inst_len, np.int64) - head_len - cut_left
    starts = np.stack([inst_start, inst_start + head_len + cut_left,
                       np.asarray(resp_start, np.int64)], axis=1).ravel()
    lengths = np.stack([head_len, rest, np.asarray(resp_keep, np.int64)], axis=1).ravel()
    return gather_ranges(tokens, starts, lengths), head_len + rest, \
        np.asarray(resp_keep, np.int64)


def encode_rows(tok, rows) -> EncodedRows:
    """Render and tokenize `rows`, a list of (instruction, response, condition or None)."""
    n = len(rows)
    inst_flat, inst_lens = tok.encode_batch([r[0] for r in rows])
    resp_flat, resp_lens = tok.encode_batch([r[1] for r in rows])
    heads = [tok.prefix_head(r[2]) for r in rows]
    head_lens = np.fromiter((len(h) for h in heads), np.int64, count=n)
    head_flat = np.fromiter((i for h in heads for i in h), np.int32, count=int(head_lens.sum()))
    tail = np.asarray(tok.prefix_tail(), np.int32)
    # One source array holding every piece once; each sample is five ranges of it.
    pieces = [head_flat, np.asarray(inst_flat, np.int32), np.asarray(resp_flat, np.int32), tail,
              np.asarray([tok.eoa_id], np.int32)]
    at = np.cumsum([0] + [len(p) for p in pieces])
    source = np.concatenate(pieces)

    def offsets(lengths, base):
        return base + np.cumsum(lengths) - lengths

    tail_lens = np.full(n, len(tail), np.int64)
    starts = np.stack([offsets(head_lens, at[0]), offsets(inst_lens, at[1]), np.full(n, at[3]),
                       offsets(resp_lens, at[2]), np.full(n, at[4])], axis=1).ravel()
    lengths = np.stack([head_lens, inst_lens, tail_lens, resp_lens, np.ones(n, np.int64)],
                       axis=1).ravel()
    special = np.fromiter((tok.holds_special_text(r[0]) or tok.holds_special_text(r[1])
                           for r in rows), bool, count=n)
    defaulted = np.fromiter((r[2] is None and tok.default_condition is not None for r in rows),
                            bool, count=n)
    return EncodedRows(tokens=gather_ranges(source, starts, lengths),
                       head_len=head_lens.astype(np.int32), inst_len=head_lens + inst_lens +
                       tail_lens, tail_len=tail_lens.astype(np.int32), resp_len=resp_lens + 1,
                       special_text=special, default_condition=defaulted)


def truncate(encoded, truncation: Truncation):
    """`truncation` applied to samples given by their lengths (EncodedRows or alike): per sample
    the outcome code, the instruction tokens cut from the left, the response tokens kept."""
    head = np.asarray(encoded.head_len, np.int64)
    tail = np.asarray(encoded.tail_len, np.int64)
    body = np.asarray(encoded.inst_len, np.int64) - head - tail
    return truncation(head, body, tail, np.asarray(encoded.resp_len, np.int64) - 1)


@dataclass
class RenderedRows:
    """One chunk of rows rendered: the kept samples' tokens, and per row what happened."""

    tokens: np.ndarray           # int32: every kept sample's prefix then response, concatenated
    inst_len: np.ndarray         # int64 per kept row
    resp_len: np.ndarray         # int64 per kept row
    outcome: np.ndarray          # int8 per row: index into OUTCOMES
    inst_before: np.ndarray      # int64 per row: rendered prefix length before truncation
    resp_before: np.ndarray      # int64 per row: response length (end of answer included)
    inst_after: np.ndarray       # int64 per row: as written (0: dropped)
    resp_after: np.ndarray       # int64 per row
    special_text: np.ndarray     # bool per row: the text held a special-token string
    default_condition: np.ndarray  # bool per row: the row had no condition and got the default


def render_rows(tok, rows, truncation: Truncation) -> RenderedRows:
    """Render and tokenize `rows`, a list of (instruction, response, condition or None), and apply
    `truncation`."""
    return render_encoded(encode_rows(tok, rows), truncation)


def render_encoded(encoded: EncodedRows, truncation: Truncation) -> RenderedRows:
    """`truncation` applied to whole samples: the kept samples' tokens and every row's outcome."""
    n = len(encoded.inst_len)
    outcome, cut_left, resp_keep = truncate(encoded, truncation)
    kept = np.flatnonzero(outcome <= TRUNCATED_RESPONSE)
    inst_start = encoded.starts
    tokens, inst_len, resp_len = gather_samples(
        encoded.tokens, inst_start[kept], encoded.head_len[kept], encoded.inst_len[kept],
        inst_start[kept] + encoded.inst_len[kept], cut_left[kept], resp_keep[kept])
    inst_after = np.zeros(n, np.int64)
    resp_after = np.zeros(n, np.int64)
    inst_after[kept] = inst_len
    resp_after[kept] = resp_len
    return RenderedRows(tokens=tokens, inst_len=inst_len, resp_len=resp_len,
                        outcome=outcome, inst_before=np.asarray(encoded.inst_len, np.int64),
                        resp_before=np.asarray(encoded.resp_len, np.int64),
                        inst_after=inst_after, resp_after=resp_after,
                        special_text=encoded.special_text,
                        default_condition=encoded.default_condition)
