"""The PrefixLM mask, defined once for every backend and the reference, and the one dense tile
builder that gathers packed samples into padded (B, L) tiles under it.

Inside one sample with `prefix_len` prefix tokens, query position `q` may attend key position `kv`
when the key is in the prefix or not after the query:

    allowed(q, kv) = kv < prefix_len  or  kv <= q

For a prefix query (q < prefix_len) the second clause adds nothing new (kv <= q < prefix_len), so
prefix tokens see exactly the whole prefix; a causal query sees the prefix and the causal tokens up
to itself. Nothing crosses samples: callers combine this with "same sample".
"""

from typing import NamedTuple

import numpy as np
import torch

from ..devices import to_device


def prefixlm_allowed(q_pos: torch.Tensor, kv_pos: torch.Tensor, prefix_len) -> torch.Tensor:
    """Boolean mask from sample-local positions (broadcasting) and the sample's prefix length."""
    return (kv_pos < prefix_len) | (kv_pos <= q_pos)


def sample_mask(seqlen: int, prefix_len: int, device=None) -> torch.Tensor:
    """(seqlen, seqlen) mask of one sample: rows are queries, columns keys."""
    pos = torch.arange(seqlen, device=device)
    return prefixlm_allowed(pos[:, None], pos[None, :], prefix_len)


def allowed_pairs(prefix_lens, causal_lens) -> np.ndarray:
    """Per sample, the (query, key) pairs the mask allows, int64: p*p + c*p + c*(c+1)/2 (the
    prefix block, the causal rows' view of the prefix, the causal triangle)."""
    p = np.asarray(prefix_lens, dtype=np.int64)
    c = np.asarray(causal_lens, dtype=np.int64)
    return p * p + c * p + c * (c + 1) // 2


class DenseTiles(NamedTuple):
    """Samples of a packed batch gathered into dense (B, L) tiles, one sample per tile row, L the
    longest of them. Position j of tile b is packed row `gather[b, j]`: the sample's row j, or its
    last row past its end (so no other sample is ever read), where `valid` is False and the
    position is masked as a key."""

    gather: torch.Tensor   # (B, L) int64: packed row of every tile position
    valid: torch.Tensor    # (B, L) bool: position < sample length
    allowed: torch.Tensor  # (B, L, L) bool: query i may attend key j (real keys only)
    rows: torch.Tensor     # (R,) int64: packed rows of the samples' tokens, tile by tile
    flat: torch.Tensor     # (R,) int64: where those tokens sit in the flattened (B * L) tiles


def dense_tiles(starts, lens, prefix, device) -> DenseTiles:
    """Tiles of the samples with first rows `starts`, lengths `lens` (all >= 1) and prefix lengths
    `prefix` (host arrays), on `device`. The indices are built on the host and copied at once
    (selecting them with a device mask would sync); the (B, L, L) mask is built on the device
    from the lengths, so the copy is O(B L), not O(B L^2)."""
    starts, lens, prefix = (np.asarray(a, np.int64) for a in (starts, lens, prefix))
    width = int(lens.max())
    pos = np.arange(width)
    gather = starts[:, None] + np.minimum(pos[None, :], lens[:, None] - 1)
    valid = pos[None, :] < lens[:, None]
    rows, flat = gather[valid], np.flatnonzero(valid)
    host = torch.from_numpy(np.concatenate([gather.ravel(), rows, flat, lens, prefix]))
    gather_t, rows_t, flat_t, lens_t, prefix_t = to_device(host, device).split(
        (gather.size, rows.size, flat.size, len(lens), len(lens)))
    pos_t = torch.arange(width, device=gather_t.device)
    valid_t = pos_t[None, :] < lens_t[:, None]
    allowed = (prefixlm_allowed(pos_t[:, None], pos_t[None, :], prefix_t[:, None, None])
               & valid_t[:, None, :])
    return DenseTiles(gather_t.view(gather.shape), valid_t, allowed, rows_t, flat_t)
