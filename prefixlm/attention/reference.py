"""Dense masked attention, one sample at a time: the test oracle.

O(L^2) memory per sample and a Python loop over samples; meant for checking other backends, not for
training. Differentiable with plain autograd.
"""

from __future__ import annotations

import torch

from .mask import sample_mask
from .seqinfo import SeqInfo


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: SeqInfo,
                        softmax_scale: float | None = None,
                        compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """PrefixLM attention computed densely per sample in `compute_dtype`.

    Matmuls run in `compute_dtype`; the softmax runs in fp32 (fp64 for fp64) and is cast back to `compute_dtype`
    (as FlashAttention's reference does), so `compute_dtype=torch.bfloat16` gives "the same math in
    the kernel's dtype" for the tolerance rule. Returns (T, Hq, D) in `compute_dtype` with padding
    rows (past `info.total`) equal to zero.
    """
    total_rows, num_q_heads, head_dim = q.shape
    group = num_q_heads // k.shape[1]
    scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    starts = info.host_lens.sum(0).cumsum(0) - info.host_lens.sum(0)
    pieces = []
    for i in range(info.num_samples):
        start = int(starts[i])
        prefix_len, causal_len = (int(x) for x in info.host_lens[:, i])
        seqlen = prefix_len + causal_len
        if seqlen == 0:
            continue
        qs, ks, vs = (t[start:start + seqlen].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~sample_mask(seqlen, prefix_len, q.device), float("-inf"))
        softmax_dtype = torch.promote_types(compute_dtype, torch.float32)
        probs = torch.softmax(scores.to(softmax_dtype), dim=-1).to(compute_dtype)
        pieces.append((probs @ vs).transpose(0, 1))
    # Padding rows: zeros that stay attached to q (a `where`, not `* 0`, so NaN padding cannot leak
    # in), so that even a batch without tokens can be differentiated.
    pieces.append(torch.where(q.new_zeros((), dtype=torch.bool), q[info.total:], 0))
    return torch.cat(pieces, 0)


# `backend="reference"`: the oracle, selectable like any backend (slow; for checks).
NAME = "reference"
USES_OP = False


def unavailable_reason(inputs):
    return None


def attention(q, k, v, info, softmax_scale, deterministic):
    return reference_attention(q, k, v, info, softmax_scale, torch.float32).to(q.dtype)
