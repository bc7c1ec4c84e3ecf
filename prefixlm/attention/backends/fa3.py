"""`backend="fa3"`: the two-pass FlashAttention-3 decomposition (needs `flash_attn_interface`).

Pass 1 (bidirectional): queries and keys are each sample's prefix
  (cu_seqlens as is, seqused_q = seqused_k = prefix_lens, causal=False).
Pass 2 (causal): queries are each sample's causal span, keys the whole sample
  (cu_seqlens_q shifted by the prefixes, seqused_q = causal_lens, seqused_k = seqlens, causal=True;
  FA3 aligns the causal mask bottom-right, so causal query j sees the prefix and causal keys 0..j).
The passes write disjoint output rows of one buffer. The seed's rules hold: a batch whose max
causal length is 0 skips pass 2 in forward and backward, FA3 never sees max_seqlen_q = 0, and no
K/V-sized buffer is zeroed on the hot path. Last in the backward, the rows of samples of <= 32
tokens are overwritten with exact fp32 gradients (`short_samples`).
"""

from __future__ import annotations

import numpy as np
import torch

from ...devices import to_device
from .short_samples import exact_grads_of_short_samples

try:
    import flash_attn_interface as fa3  # registers torch.ops.flash_attn_3, which we call directly
except ImportError:
    fa3 = None

NAME = "fa3"
USES_OP = True


def unavailable_reason(inputs):
    if fa3 is None:
        return "flash_attn_interface (FlashAttention-3) is not importable"
    if inputs.device.type != "cuda":
        return "FlashAttention-3 needs a CUDA device"
    if torch.cuda.get_device_capability(inputs.device)[0] != 9:
        return "FlashAttention-3 needs a Hopper GPU (sm90)"
    if inputs.dtype not in (torch.float16, torch.bfloat16):
        return f"FlashAttention-3 supports fp16/bf16, got {inputs.dtype}"
    if inputs.head_dim % 8 or inputs.head_dim > 256:
        return f"FlashAttention-3 needs head_dim a multiple of 8 up to 256, got {inputs.head_dim}"
    return None


def lse_shape(q):
    # One LSE per pass, each (Hq, T): lse[0] on prefix rows, lse[1] on causal rows, 0 elsewhere.
    return (2, q.shape[1], q.shape[0])


def _passes(meta):
    """Device arguments of the two passes, over the used slots only (FA3 launches work per batch
    entry, so empty padding slots would cost time)."""
    n = meta.used_slots
    cu, prefix, causal = meta.cu_seqlens[:n + 1], meta.prefix_lens[:n], meta.causal_lens[:n]
    seqlens = (cu[1:] - cu[:-1]).to(torch.int32)
    return {
        "prefix": dict(cu_seqlens_q=cu, cu_seqlens_k=cu, seqused_q=prefix, seqused_k=prefix,
                       max_seqlen_q=meta.max_prefix, max_seqlen_k=meta.max_prefix),
        # Only the start offsets of cu_seqlens_q matter (seqused_q gives the lengths); the last
        # entry keeps it at batch + 1 entries.
        "causal": dict(cu_seqlens_q=torch.cat([cu[:-1] + prefix, cu[-1:]]), cu_seqlens_k=cu,
                       seqused_q=causal, seqused_k=seqlens, max_seqlen_q=meta.max_causal,
                       max_seqlen_k=meta.max_seqlen),
    }


def _prefix_rows(meta, which: str, device) -> torch.Tensor:
    """Packed row indices of the prefix rows of the samples with causal tokens ("with_causal")
    or without ("without_causal")."""
    keep = meta.causal_host > 0 if which == "with_causal" else meta.causal_host == 0
    starts, prefix = meta.starts_host[keep], meta.prefix_host[keep]
    rows = np.repeat(starts - np.cumsum(prefix) + prefix, prefix) + np.arange(prefix.sum())
    return to_device(torch.from_numpy(rows), device)


def _pass_of_rows(meta, rows: int) -> np.ndarray:
    """int8 (rows,): 1 + the index of the pass whose query each row is (1 on prefix rows, 2 on
    causal rows), 0 on the padding tail."""
    spans = np.stack([meta.prefix_host, meta.causal_host], 1).ravel()  # p0, c0, p1, c1, ...
    pass_of_rows = np.zeros(rows, np.int8)
    pass_of_rows[:meta.total] = np.repeat(np.tile(np.array([1, 2], np.int8), meta.used_slots),
                                          spans)
    return pass_of_rows


def add_prefix_pass(meta, grads, prefix_grads) -> None:
    """Combine the prefix pass's (dq, dk, dv) into the causal pass's, in place.

    Pass 1's gradients are nonzero only on prefix rows (its queries and keys are the prefixes), so
    combining touches only those rows and is exact: dq rows of the two passes are disjoint (copy);
    dK/dV of prefix rows are the sum of both passes (add), except in samples without causal
    tokens, whose rows pass 2 never covered (copy). The rest of the pass-1 buffers is never read,
    so they need no memset. Shared by every two-pass decomposition on varlen kernels."""
    (dq, dk, dv), (dq1, dk1, dv1) = grads, prefix_grads
    add = _prefix_rows(meta, "with_causal", dq.device)
    copy = _prefix_rows(meta, "without_causal", dq.device)
    rows = torch.cat([add, copy])
    dq.index_copy_(0, rows, dq1.index_select(0, rows))
    for full, part in ((dk, dk1), (dv, dv1)):
        full.index_add_(0, add, part.index_select(0, add))
        full.index_copy_(0, copy, part.index_select(0, copy))


def forward(q, k, v, meta, softmax_scale):
    # The passes write disjoint rows (seqused_q) of one output buffer: FA3's own op declares
    # `out` as written in place, so no copy and no memset; only the padding tail is zeroed.
    passes = _passes(meta)
    out = torch.empty_like(q)
    lse = q.new_empty(lse_shape(q), dtype=torch.float32)
    # FA3 returns a fresh (Hq, T) LSE and writes only the rows of its pass's queries; the rest is
    # uninitialised memory. Keeping 0 there makes the op's outputs defined (repeated runs agree,
    # as torch.library.opcheck checks) at no extra pass over the LSE: the copy into `lse` masks.
    pass_of_rows = to_device(torch.from_numpy(_pass_of_rows(meta, q.shape[0])), q.device)
    zero = lse.new_zeros(())
    for i, (name, causal) in enumerate((("prefix", False), ("causal", True))):
        if passes[name]["max_seqlen_q"] == 0:   # no queries in this pass: FA3 is never called
            lse[i].zero_()
            continue
        _, pass_lse, *_ = torch.ops.flash_attn_3.fwd(q, k, v, out=out,
                                                     softmax_scale=softmax_scale,
                                                     is_causal=causal, **passes[name])
        torch.where(pass_of_rows == i + 1, pass_lse, zero, out=lse[i])
    out[meta.total:].zero_()
    return out, lse


def backward(dout, q, k, v, out, lse, meta, softmax_scale, deterministic):
    passes = _passes(meta)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def run(name, causal, dq_, dk_, dv_):
        torch.ops.flash_attn_3.bwd(dout, q, k, v, out, lse[int(causal)], dq=dq_, dk=dk_, dv=dv_,
                                   softmax_scale=softmax_scale, is_causal=causal,
                                   deterministic=deterministic, **passes[name])

    if meta.max_causal > 0:
        # Pass 2's keys are every row of every sample with causal tokens: dk, dv get all of them.
        run("causal", True, dq, dk, dv)
    if meta.max_prefix > 0:
        dq1, dk1, dv1 = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        run("prefix", False, dq1, dk1, dv1)
        add_prefix_pass(meta, (dq, dk, dv), (dq1, dk1, dv1))
    for grad in (dq, dk, dv):
        grad[meta.total:].zero_()
    # FA3 takes rowsum(dO * O) from the 16-bit O, which dominates dS in 1-2 token samples.
    exact_grads_of_short_samples(dq, dk, dv, q, k, v, dout, meta, softmax_scale)
    return dq, dk, dv
