"""`backend="sdpa"`: PyTorch's scaled_dot_product_attention over buckets of similar-length samples.

The portable path (CPU, CUDA, MPS, ROCm). Samples are sorted by length and grouped into buckets whose
lengths differ by at most 25%; each bucket is gathered into a padded (B, H, L, D) batch with a
(B, 1, L, L) boolean mask, so memory is O(sum of L^2) over buckets, never O(T^2). Padded positions
repeat the sample's last row and are masked as keys, so no row of another sample is ever read.

Backward recomputes the forward under autograd: nothing but the inputs is kept between the passes.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..mask import dense_tiles

NAME = "sdpa"
USES_OP = True

_BUCKET_RATIO = 1.25           # longest / shortest sample in one bucket
_BUCKET_MASK_ELEMENTS = 1 << 26  # B * L * L cap per bucket, bounds the mask's memory


def unavailable_reason(inputs):
    return None


def lse_shape(q):
    return (q.shape[1], 0)  # the backward recomputes; nothing saved


def _buckets(seqlens: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(-seqlens, kind="stable")
    order = order[seqlens[order] > 0]
    buckets, begin = [], 0
    while begin < len(order):
        longest = int(seqlens[order[begin]])
        end = begin + 1
        while (end < len(order) and seqlens[order[end]] * _BUCKET_RATIO >= longest
               and (end - begin + 1) * longest * longest <= _BUCKET_MASK_ELEMENTS):
            end += 1
        buckets.append(order[begin:end])
        begin = end
    return buckets


def _attend(q, k, v, meta, softmax_scale):
    """Differentiable PrefixLM attention (T, Hq, D); padding rows are zero."""
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        # CPUs have no fast half-precision matmul and PyTorch's CPU math keeps intermediates in
        # half precision; computing in fp32 is as fast there and rounds once, at the end.
        return _attend(q.float(), k.float(), v.float(), meta, softmax_scale).to(q.dtype)
    group = q.shape[1] // k.shape[1]
    seqlens = meta.prefix_host + meta.causal_host
    rows, values = [], []
    for ids in _buckets(seqlens):
        tiles = dense_tiles(meta.starts_host[ids], seqlens[ids], meta.prefix_host[ids], q.device)
        qb, kb, vb = (t[tiles.gather].transpose(1, 2) for t in (q, k, v))      # (B, H, L, D)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=tiles.allowed[:, None],
                                             scale=softmax_scale, enable_gqa=group > 1)
        rows.append(tiles.rows)
        values.append(out.transpose(1, 2).flatten(0, 1).index_select(0, tiles.flat))
    if not rows:
        return q.new_zeros(q.shape)
    return q.new_zeros(q.shape).index_copy(0, torch.cat(rows), torch.cat(values))


def forward(q, k, v, meta, softmax_scale):
    with torch.no_grad():
        out = _attend(q, k, v, meta, softmax_scale)
    return out, q.new_empty(lse_shape(q), dtype=torch.float32)


@contextlib.contextmanager
def _autograd_inside_op():
    """Custom-op implementations run below the Autograd dispatch key, so the ops they call record
    no graph. This backward differentiates a recomputation, so it puts autograd back meanwhile."""
    autograd = (torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradFunctionality)
                | torch._C.DispatchKeySet(torch._C.DispatchKey.ADInplaceOrView))
    exclude = torch._C._dispatch_tls_local_exclude_set() - autograd
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude):
        with torch.enable_grad():
            yield


def backward(dout, q, k, v, out, lse, meta, softmax_scale, deterministic):
    with _autograd_inside_op():
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        recomputed = _attend(q_, k_, v_, meta, softmax_scale)
        if not recomputed.requires_grad:  # a batch with no tokens: the output is constant zero
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        return torch.autograd.grad(recomputed, (q_, k_, v_), dout)
