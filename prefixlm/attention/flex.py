"""`backend="flex"`: FlexAttention with a document + prefix block mask.

The mask is attention-gym's composition: same sample AND (key in the sample's prefix OR key <= query),
with padding rows in no sample (so they attend nothing and come out 0). The block mask is built from
the device tensors of `SeqInfo` (no host sync) once per `SeqInfo` and reused by forward and backward;
FlexAttention's own autograd gives the backward. Outside `torch.compile` the call goes through a
compiled FlexAttention on CUDA (eager Flex is a slow reference implementation); on CPU it runs eagerly.
"""

from __future__ import annotations

import functools
import warnings

import torch

from .mask import prefixlm_allowed

NAME = "flex"
USES_OP = False

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None


def unavailable_reason(q, k, v):
    if flex_attention is None:
        return "torch.nn.attention.flex_attention is missing (needs torch >= 2.5)"
    if q.device.type not in ("cuda", "cpu"):
        return f"FlexAttention does not run on {q.device.type}"
    if q.device.type == "cpu" and any(t.requires_grad for t in (q, k, v)):
        return "FlexAttention has no backward on CPU (forward only there)"
    return None


def _block_mask(info, rows: int, device):
    cu = info.cu_seqlens.long()
    token = torch.arange(rows, device=device)
    # sample[t] = how many samples end at or before t: a scatter of the ends and a running sum
    # (torch 2.11's inductor cannot lower searchsorted over a slice of cu_seqlens on CUDA).
    ends = torch.zeros(rows + 1, dtype=torch.long, device=device).scatter_add(
        0, cu[1:].clamp(max=rows), torch.ones_like(cu[1:]))
    sample = ends.cumsum(0)[:rows].clamp(max=info.slots - 1)
    prefix_end = cu[sample] + info.prefix_lens.long()[sample]       # absolute end of the prefix
    sample = torch.where(token < cu[-1], sample, -1)                 # padding: in no sample

    def mask_mod(b, h, q_idx, kv_idx):
        same = (sample[q_idx] == sample[kv_idx]) & (sample[q_idx] >= 0)
        return same & prefixlm_allowed(q_idx, kv_idx, prefix_end[q_idx])

    return create_block_mask(mask_mod, None, None, rows, rows, device=device)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def attention(q, k, v, info, softmax_scale, deterministic):
    rows = q.shape[0]
    if info.slots == 0:
        return q * 0  # an empty batch: zero output, zero gradient, still attached to q
    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    kwargs = dict(scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    # One block mask per SeqInfo and row count, shared by every layer's call. Under torch.compile
    # the cache fill is a traced side effect, so layers after the first reuse the traced mask.
    block_mask = info.cached(("flex_block_mask", rows), lambda: _block_mask(info, rows, q.device))
    if torch.compiler.is_compiling():
        out = flex_attention(*args, block_mask=block_mask, **kwargs)
    elif q.is_cuda:
        out = _compiled_flex()(*args, block_mask=block_mask, **kwargs)
    else:
        with warnings.catch_warnings():
            # Eager Flex on CPU warns that it is unfused; on CPU that is the intended portable path.
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(*args, block_mask=block_mask, **kwargs)
    out = out[0].transpose(0, 1)
    # Rows with no allowed key (padding) come out as 0 from Flex; `where` keeps that exact.
    is_token = (torch.arange(rows, device=q.device) < info.cu_seqlens[-1])[:, None, None]
    return torch.where(is_token, out, 0).contiguous()
