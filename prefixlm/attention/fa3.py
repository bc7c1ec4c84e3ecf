"""`backend="fa3"`: the two-pass FlashAttention-3 decomposition (needs `flash_attn_interface`).

Pass 1 (bidirectional): queries and keys are each sample's prefix
  (cu_seqlens as is, seqused_q = seqused_k = prefix_lens, causal=False).
Pass 2 (causal): queries are each sample's causal span, keys the whole sample
  (cu_seqlens_q shifted by the prefixes, seqused_q = causal_lens, seqused_k = seqlens, causal=True;
  FA3 aligns the causal mask bottom-right, so causal query j sees the prefix and causal keys 0..j).
The passes write disjoint output rows of one buffer. The seed's rules hold: a batch whose max
causal length is 0 skips pass 2 in forward and backward, FA3 never sees max_seqlen_q = 0, and no
K/V-sized buffer is zeroed on the hot path.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import flash_attn_interface as fa3
except ImportError:
    fa3 = None

NAME = "fa3"
USES_OP = True


def unavailable_reason(q, k, v):
    if fa3 is None:
        return "flash_attn_interface (FlashAttention-3) is not importable"
    if not q.is_cuda:
        return "FlashAttention-3 needs a CUDA device"
    if torch.cuda.get_device_capability(q.device)[0] != 9:
        return "FlashAttention-3 needs a Hopper GPU (sm90)"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-3 supports fp16/bf16, got {q.dtype}"
    if q.shape[-1] % 8 or q.shape[-1] > 256:
        return f"FlashAttention-3 needs head_dim a multiple of 8 up to 256, got {q.shape[-1]}"
    return None


def lse_shape(q):
    return (2, q.shape[1], q.shape[0])  # one LSE per pass, each (Hq, T)


def _passes(meta):
    """Device arguments of the two passes."""
    cu = meta.cu_seqlens
    seqlens = cu[1:] - cu[:-1]
    return {
        "prefix": dict(cu_seqlens_q=cu, cu_seqlens_k=cu, seqused_q=meta.prefix_lens,
                       seqused_k=meta.prefix_lens, max_seqlen_q=meta.max_prefix,
                       max_seqlen_k=meta.max_prefix),
        # Only the start offsets of cu_seqlens_q matter (seqused_q gives the lengths); the last
        # entry keeps it at batch + 1 entries.
        "causal": dict(cu_seqlens_q=torch.cat([cu[:-1] + meta.prefix_lens, cu[-1:]]),
                       cu_seqlens_k=cu,
                       seqused_q=meta.causal_lens, seqused_k=seqlens.to(torch.int32),
                       max_seqlen_q=meta.max_causal, max_seqlen_k=meta.max_seqlen),
    }


def _prefix_rows(meta, which: str, device) -> torch.Tensor:
    """Packed row indices of the prefix rows of every sample ("all"), of the samples with causal
    tokens ("with_causal"), or of those without ("without_causal")."""
    keep = {"all": np.ones_like(meta.causal_host, dtype=bool),
            "with_causal": meta.causal_host > 0,
            "without_causal": meta.causal_host == 0}[which]
    starts, prefix = meta.starts_host[keep], meta.prefix_host[keep]
    rows = np.repeat(starts - np.cumsum(prefix) + prefix, prefix) + np.arange(prefix.sum())
    return torch.from_numpy(rows).to(device, non_blocking=True)


def _run_pass(q, k, v, softmax_scale, causal, args):
    out, lse, *_ = fa3._flash_attn_forward(q, k, v, softmax_scale=softmax_scale, causal=causal,
                                           **args)
    return out, lse


def forward(q, k, v, meta, softmax_scale):
    # Each pass writes only its own rows (seqused_q), into its own buffer (FA3's op may not write
    # into a buffer we pass in and return). The causal pass's buffer becomes the output and the
    # prefix rows are copied over from the bidirectional pass: only prefix rows are touched.
    passes = _passes(meta)
    lse = q.new_empty(lse_shape(q), dtype=torch.float32)
    out = None
    if meta.max_causal > 0:    # FA3 is never called with max_seqlen_q = 0
        out, lse[1] = _run_pass(q, k, v, softmax_scale, True, passes["causal"])
    if meta.max_prefix > 0:
        out_prefix, lse[0] = _run_pass(q, k, v, softmax_scale, False, passes["prefix"])
        if out is None:
            out = out_prefix
        else:
            rows = _prefix_rows(meta, "all", q.device)
            out.index_copy_(0, rows, out_prefix.index_select(0, rows))
    if out is None:
        out = torch.empty_like(q)
    out[meta.total:].zero_()   # padding rows: only the tail, never the whole buffer
    return out, lse


def backward(dout, q, k, v, out, lse, meta, softmax_scale, deterministic):
    passes = _passes(meta)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if meta.max_causal > 0:
        # Pass 2's keys are every row of every sample with causal tokens: dk, dv get all of them.
        fa3._flash_attn_backward(dout, q, k, v, out, lse[1], dq=dq, dk=dk, dv=dv,
                                 softmax_scale=softmax_scale, is_causal=True,
                                 deterministic=deterministic, **_bwd_args(passes["causal"]))
    if meta.max_prefix > 0:
        # Pass 1's gradients are nonzero only on prefix rows (its queries and keys are the
        # prefixes), so combining touches only those rows and is exact: dq rows of the two passes
        # are disjoint (copy); dK/dV of prefix rows are the sum of both passes (add), except in
        # samples without causal tokens, where pass 2 never ran over them (copy). The rest of the
        # pass-1 buffers is never read, so they need no memset.
        dq1, dk1, dv1 = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        fa3._flash_attn_backward(dout, q, k, v, out, lse[0], dq=dq1, dk=dk1, dv=dv1,
                                 softmax_scale=softmax_scale, is_causal=False,
                                 deterministic=deterministic, **_bwd_args(passes["prefix"]))
        rows = _prefix_rows(meta, "all", q.device)
        dq.index_copy_(0, rows, dq1.index_select(0, rows))
        add = _prefix_rows(meta, "with_causal", q.device)
        copy = _prefix_rows(meta, "without_causal", q.device)
        for full, part in ((dk, dk1), (dv, dv1)):
            full.index_add_(0, add, part.index_select(0, add))
            full.index_copy_(0, copy, part.index_select(0, copy))
    for grad in (dq, dk, dv):
        grad[meta.total:].zero_()
    return dq, dk, dv


def _bwd_args(p):
    return dict(cu_seqlens_q=p["cu_seqlens_q"], cu_seqlens_k=p["cu_seqlens_k"],
                sequed_q=p["seqused_q"], sequed_k=p["seqused_k"],
                max_seqlen_q=p["max_seqlen_q"], max_seqlen_k=p["max_seqlen_k"])
