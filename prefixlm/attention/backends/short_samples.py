"""Exact gradients of short samples, recomputed densely in fp32, for any backend.

Fused backwards take D_i = rowsum(dO_i * O_i) from the output O as rounded to 16 bits. In a row with
only a few keys that rounding is a large part of dP_ij - D_i (with one key, dS must be exactly 0),
so the gradients of samples of one or two tokens miss the accuracy rule. Long samples average the
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

import numpy as np
import torch

from ..mask import DenseTiles, dense_tiles

SHORT_SAMPLE = 32  # samples of 1..SHORT_SAMPLE tokens get exact D / gradients


def short_sample_tiles(meta, like: torch.Tensor) -> DenseTiles | None:
    """Dense tiles (`mask.dense_tiles`) of the samples of 1..SHORT_SAMPLE tokens, on `like`'s
    device. None when there are none, decided from the host lengths before `like` is touched (no
    device work, no sync). Built once per batch: every layer of a step asks for the same tiles."""
    lens = meta.prefix_host + meta.causal_host
    short = np.flatnonzero((lens > 0) & (lens <= SHORT_SAMPLE))
    if not len(short):
        return None
    return meta.cached(("short_sample_tiles", like.device), lambda: dense_tiles(
        meta.starts_host[short], lens[short], meta.prefix_host[short], like.device))


def _dense(tiles: DenseTiles, q, k, v, dout, softmax_scale):
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


def _per_token(tiles: DenseTiles, tile: torch.Tensor, tail: tuple) -> torch.Tensor:
    """(B, L, ...) tile -> (R, *tail) values of the real tokens, in `tiles.rows` order."""
    return tile.reshape(-1, *tail).index_select(0, tiles.flat)


def exact_delta(tiles: DenseTiles, q, k, v, dout, softmax_scale) -> torch.Tensor:
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
