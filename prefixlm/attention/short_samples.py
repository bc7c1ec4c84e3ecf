"""Exact gradients of short samples, recomputed densely in fp32, for any backend.

Fused backwards take D_i = rowsum(dO_i * O_i) from the output O as rounded to 16 bits. In a row with
only a few keys that rounding is a large part of dP_ij - D_i (with one key, dS must be exactly 0),
so samples of one or two tokens miss the accuracy rule (cuDNN on an H200, one 2-token sample, MQA
8:1, head dim 128, bf16: dQ mean error 5.1e-4 against a bound of 4.2e-4). Long samples average the
rounding out; samples of at most SHORT_SAMPLE tokens are cheap to redo exactly, gathered into dense
(B, L) tiles of one sample each: O(sum L^2) work.

Per sample (scale s, PrefixLM mask, query head h reads key/value head h // G, G = Hq / Hkv):
  P = softmax(s Q K^T + mask),  dP = dO V^T,  D_i = sum_j P_ij dP_ij  (exact: no rounded O),
  dS = P * (dP - D),  dQ = s dS K,  dK = s dS^T Q,  dV = P^T dO  (dK, dV summed over the G heads).

The Triton backward replaces only D on these rows (`exact_delta`, before its kernels); the cuDNN and
FA3 backwards overwrite the finished gradient rows (`exact_grads_of_short_samples`). A sample's
gradient rows depend on that sample alone, so overwriting them is exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from .mask import prefixlm_allowed

SHORT_SAMPLE = 32  # samples of 1..SHORT_SAMPLE tokens get exact D / gradients


class ShortSampleTiles(NamedTuple):
    """The short samples of a batch as dense tiles on the device, one sample per tile row.
    Positions past a sample's end repeat its last row (no other sample is read) and are masked as
    keys."""

    gather: torch.Tensor   # (B, L) int64: packed row of every tile position
    valid: torch.Tensor    # (B, L) bool: position < sample length
    allowed: torch.Tensor  # (B, L, L) bool: query i may attend key j (real keys only)
    rows: torch.Tensor     # (R,) int64: packed rows of the short samples' tokens
    flat: torch.Tensor     # (R,) int64: where those tokens sit in the flattened (B * L) tile


def short_sample_tiles(meta, like: torch.Tensor) -> ShortSampleTiles | None:
    """Tiles of the samples of 1..SHORT_SAMPLE tokens, on `like`'s device. None when there are
    none, decided from the host lengths before `like` is touched (no device work, no sync).
    Every layer of a step asks for the same batch's tiles: they are built once and cached."""
    lens = meta.prefix_host + meta.causal_host
    if not np.any((lens > 0) & (lens <= SHORT_SAMPLE)):
        return None
    prefix = np.ascontiguousarray(meta.prefix_host, dtype=np.int64)
    return _cached_tiles(prefix.tobytes(), np.ascontiguousarray(lens, dtype=np.int64).tobytes(),
                         like.device)


@functools.lru_cache(maxsize=8)
def _cached_tiles(prefix_bytes: bytes, lens_bytes: bytes, device: torch.device) -> ShortSampleTiles:
    prefix_all, lens_all = np.frombuffer(prefix_bytes, np.int64), np.frombuffer(lens_bytes, np.int64)
    starts_all = np.cumsum(lens_all) - lens_all
    short = np.flatnonzero((lens_all > 0) & (lens_all <= SHORT_SAMPLE))
    lens, prefix = lens_all[short], prefix_all[short]
    width = int(lens.max())
    pos = np.arange(width)
    gather = starts_all[short, None] + np.minimum(pos[None, :], lens[:, None] - 1)
    valid = pos[None, :] < lens[:, None]
    # Row indices are built on the host (selecting them with a device mask would sync) and copied
    # at once, pinned and asynchronously; the (B, L, L) mask is built on the device from the
    # lengths, so the copy is O(B L), not O(B L^2).
    rows, flat = gather[valid], np.flatnonzero(valid)
    host = torch.from_numpy(np.concatenate([gather.ravel(), rows, flat, lens, prefix]))
    cuda = device.type == "cuda"
    dev = (host.pin_memory() if cuda else host).to(device, non_blocking=True)
    gather_t, rows_t, flat_t, lens_t, prefix_t = dev.split(
        (gather.size, rows.size, flat.size, len(short), len(short)))
    pos_t = torch.arange(width, device=device)
    valid_t = pos_t[None, :] < lens_t[:, None]
    allowed = (prefixlm_allowed(pos_t[:, None], pos_t[None, :], prefix_t[:, None, None])
               & valid_t[:, None, :])
    return ShortSampleTiles(gather_t.view(gather.shape), valid_t, allowed, rows_t, flat_t)


def _dense(tiles: ShortSampleTiles, q, k, v, dout, softmax_scale):
    """fp32 tiles: q and dO (B, L, Hkv, G, D), dO zero past each sample's end; k (B, L, Hkv, D);
    P and dP (B, Hkv, G, L, L)."""
    num_kv_heads = k.shape[1]
    qs = q[tiles.gather].float().unflatten(2, (num_kv_heads, -1))
    # Tile positions past a sample's end are no queries: with dO = 0 there they add nothing to
    # dK and dV.
    dos = dout[tiles.gather].float().masked_fill_(~tiles.valid[:, :, None, None], 0.0)
    dos = dos.unflatten(2, (num_kv_heads, -1))
    ks, vs = k[tiles.gather].float(), v[tiles.gather].float()
    scores = torch.einsum("bikgd,bjkd->bkgij", qs, ks) * softmax_scale
    probs = torch.softmax(scores.masked_fill_(~tiles.allowed[:, None, None], float("-inf")), -1)
    dprobs = torch.einsum("bikgd,bjkd->bkgij", dos, vs)
    return qs, ks, dos, probs, dprobs


def _per_token(tiles: ShortSampleTiles, tile: torch.Tensor, tail: tuple) -> torch.Tensor:
    """(B, L, ...) tile -> (R, *tail) values of the real tokens, in `tiles.rows` order."""
    return tile.reshape(-1, *tail).index_select(0, tiles.flat)


def exact_delta(tiles: ShortSampleTiles, q, k, v, dout, softmax_scale) -> torch.Tensor:
    """(R, Hq) fp32: D_i = sum_j P_ij dP_ij of every row in `tiles.rows`."""
    *_, probs, dprobs = _dense(tiles, q, k, v, dout, softmax_scale)
    delta = (probs * dprobs).sum(-1).permute(0, 3, 1, 2)  # (B, L, Hkv, G)
    return _per_token(tiles, delta, (q.shape[1],))


def exact_grads_of_short_samples(dq, dk, dv, q, k, v, dout, meta, softmax_scale) -> None:
    """Overwrite the rows of dq, dk, dv (T, H, D) that belong to samples of 1..SHORT_SAMPLE tokens
    with their exact gradients (fp32, cast to each gradient's dtype). Rows of other samples and
    padding rows are left as they are; without short samples nothing runs."""
    tiles = short_sample_tiles(meta, q)
    if tiles is None:
        return
    qs, ks, dos, probs, dprobs = _dense(tiles, q, k, v, dout, softmax_scale)
    dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    exact = ((dq, torch.einsum("bkgij,bjkd->bikgd", dscores, ks) * softmax_scale),
             (dk, torch.einsum("bkgij,bikgd->bjkd", dscores, qs) * softmax_scale),
             (dv, torch.einsum("bkgij,bikgd->bjkd", probs, dos)))
    for grad, tile in exact:
        grad.index_copy_(0, tiles.rows, _per_token(tiles, tile, grad.shape[1:]).to(grad.dtype))
