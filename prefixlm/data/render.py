"""Rows -> tokens of samples, and what the truncation policy does to each row.

`render_rows(tokenizer, rows, truncation)` renders a chunk of (instruction, response, condition)
rows the way `tokenizer.py` defines it, decides per row with `Truncation`, and returns the kept
samples' tokens (concatenated, prefix then response per sample) with per-row outcomes and lengths
before and after. Every writer of datasets (prepare-sft, mixtures) goes through it.

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

__all__ = ["OUTCOMES", "TRUNCATION_POLICIES", "Truncation", "RenderedRows", "render_rows"]

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
class RenderedRows:
    """One chunk of rows rendered: the kept samples' tokens, and per row what happened."""

    tokens: np.ndarray           # int32: every kept sample's prefix then response, concatenated
    kept: np.ndarray             # int64 indices (into the chunk) of the kept rows, in row order
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
    """Render and tokenize `rows`, a list of (instruction, response, condition or None)."""
    n = len(rows)
    inst_flat, inst_lens = tok.encode_batch([r[0] for r in rows])
    resp_flat, resp_lens = tok.encode_batch([r[1] for r in rows])
    heads = [tok.prefix_head(r[2]) for r in rows]
    tail = np.asarray(tok.prefix_tail(), np.int32)
    head_lens = np.fromiter((len(h) for h in heads), np.int64, count=n)
    tail_lens = np.full(n, len(tail), np.int64)
    outcome, cut_left, resp_keep = truncation(head_lens, inst_lens, tail_lens, resp_lens)
    inst_off = np.concatenate([[0], np.cumsum(inst_lens)])
    resp_off = np.concatenate([[0], np.cumsum(resp_lens)])
    kept = np.flatnonzero(outcome <= TRUNCATED_RESPONSE)
    eoa = np.asarray([tok.eoa_id], np.int32)
    pieces = []
    inst_len = np.empty(len(kept), np.int64)
    for j, i in enumerate(kept.tolist()):
        head = np.asarray(heads[i], np.int32)
        body = inst_flat[inst_off[i] + cut_left[i]: inst_off[i + 1]]
        whole = resp_keep[i] == resp_lens[i] + 1
        resp = resp_flat[resp_off[i]: resp_off[i] + (resp_keep[i] - 1 if whole else resp_keep[i])]
        pieces += [head, body, tail, resp] + ([eoa] if whole else [])
        inst_len[j] = len(head) + len(body) + len(tail)
    tokens = np.concatenate(pieces).astype(np.int32, copy=False) if pieces else \
        np.zeros(0, np.int32)
    inst_after = np.zeros(n, np.int64)
    resp_after = np.zeros(n, np.int64)
    inst_after[kept] = inst_len
    resp_after[kept] = resp_keep[kept]
    special = np.fromiter((tok.holds_special_text(r[0]) or tok.holds_special_text(r[1])
                           for r in rows), bool, count=n)
    defaulted = np.fromiter((r[2] is None and tok.default_condition is not None for r in rows),
                            bool, count=n)
    return RenderedRows(tokens=tokens, kept=kept, inst_len=inst_len, resp_len=resp_keep[kept],
                        outcome=outcome, inst_before=head_lens + inst_lens + tail_lens,
                        resp_before=resp_lens + 1, inst_after=inst_after, resp_after=resp_after,
                        special_text=special, default_condition=defaulted)
