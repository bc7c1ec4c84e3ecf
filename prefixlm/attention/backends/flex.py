"""`backend="flex"`: FlexAttention with a document + prefix block mask.

The mask is attention-gym's composition: same sample AND (key in the sample's prefix OR
key <= query), with padding rows in no sample (so they attend nothing and come out 0). The block
mask is built from the device tensors of `SeqInfo` (no host sync, no `create_block_mask`: see
`_block_mask`) once per `SeqInfo` and reused by every layer's forward and backward (the model
builds it before its layers, `prepare`; a caller that does not gets it built by the first call,
inside its compiled graph if it has one); FlexAttention's own autograd gives the backward.
Outside `torch.compile` the call goes through a compiled FlexAttention on CUDA (eager Flex is a
slow reference implementation); on CPU it runs eagerly.
"""

from __future__ import annotations

import functools
import warnings

import torch

from ..mask import prefixlm_allowed

NAME = "flex"
USES_OP = False

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch < 2.5
    flex_attention = None


def unavailable_reason(inputs):
    if flex_attention is None:
        return "torch.nn.attention.flex_attention is missing (needs torch >= 2.5)"
    if inputs.device.type not in ("cuda", "cpu"):
        return f"FlexAttention does not run on {inputs.device.type}"
    if inputs.device.type == "cpu" and inputs.requires_grad:
        return "FlexAttention has no backward on CPU (forward only there)"
    if inputs.head_dim & (inputs.head_dim - 1):
        return f"FlexAttention needs a power-of-two head_dim, got {inputs.head_dim}"
    return None


BLOCK = 128  # FlexAttention's default sparse block size


def _kv_blocks(selected: torch.Tensor):
    """(counts, indices) of a (q blocks, kv blocks) selection in BlockMask's layout: per q block,
    how many kv blocks, then their indices first (ascending) and the rest after."""
    counts = selected.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~selected).to(torch.int32), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


def _block_mask(info, rows: int, device):
    """The BlockMask, classified block by block from each row's interval of allowed keys.

    Row t of sample s (start a, prefix end e) may attend exactly the keys [a, max(e, t + 1)); a
    padding row attends nothing. A (q block, kv block) pair is "full" when every row's interval
    covers the kv block, "partial" (mask_mod applied) when some row's interval meets it, else
    skipped. O(rows + blocks^2) tensor ops, no host sync; `create_block_mask` would evaluate
    mask_mod on all rows^2 pairs through a compiled graph whose compile takes minutes at training
    batch sizes (BENCHMARKS.md, "Flex")."""
    q_block, kv_block = min(BLOCK, rows), BLOCK  # Flex's own rule for short queries
    q_blocks, kv_blocks = -(-rows // q_block), -(-rows // kv_block)
    span = max(q_blocks * q_block, kv_blocks * kv_block)  # rows mask_mod may be asked about
    cu = info.cu_seqlens.long()
    token = torch.arange(span, device=device)
    # sample[t] = how many samples end at or before t: a scatter of the ends and a running sum
    # (torch 2.11's inductor cannot lower searchsorted over a slice of cu_seqlens on CUDA).
    ends = torch.zeros(span + 1, dtype=torch.long, device=device).scatter_add(
        0, cu[1:].clamp(max=span), torch.ones_like(cu[1:]))
    sample = ends.cumsum(0)[:span].clamp(max=info.slots - 1)
    start = cu[sample]
    prefix_end = start + info.prefix_lens.long()[sample]            # absolute end of the prefix
    is_token = token < cu[-1]
    sample = torch.where(is_token, sample, -1)                       # padding: in no sample

    def mask_mod(b, h, q_idx, kv_idx):
        same = (sample[q_idx] == sample[kv_idx]) & (sample[q_idx] >= 0)
        return same & prefixlm_allowed(q_idx, kv_idx, prefix_end[q_idx])

    # Each row's allowed keys [lo, hi), empty for padding and rows past the end.
    q_rows = q_blocks * q_block
    lo = torch.where(is_token, start, 0)[:q_rows]
    hi = torch.where(is_token, torch.maximum(prefix_end, token + 1), 0)[:q_rows]
    k0 = torch.arange(kv_blocks, device=device) * kv_block
    # Full: every row covers [k0, k0 + kv_block), i.e. the block's largest lo <= k0 and its
    # smallest hi >= k0 + kv_block (a padding row, hi = 0, covers nothing).
    covers = ((lo.view(q_blocks, q_block).amax(1)[:, None] <= k0)
              & (hi.view(q_blocks, q_block).amin(1)[:, None] >= k0 + kv_block))
    # Met: a row meets the kv blocks first..last of its interval. Mark +1 at (q block, first) and
    # -1 at (q block, last + 1) and take a running sum along the kv blocks; empty rows mark a
    # spare column (kv_blocks) twice, which cancels.
    nonempty = hi > lo
    first = torch.where(nonempty, lo // kv_block, kv_blocks)
    after = torch.where(nonempty, (hi - 1) // kv_block + 1, kv_blocks)
    base = (torch.arange(q_rows, device=device) // q_block) * (kv_blocks + 1)
    marks = torch.zeros(q_blocks * (kv_blocks + 1), dtype=torch.int32, device=device)
    ones = torch.ones(q_rows, dtype=torch.int32, device=device)
    marks.scatter_add_(0, base + first, ones).scatter_add_(0, base + after, -ones)
    meets = marks.view(q_blocks, kv_blocks + 1).cumsum(1)[:, :kv_blocks] > 0
    partial, full = _kv_blocks(meets & ~covers), _kv_blocks(covers)
    return BlockMask.from_kv_blocks(*partial, *full, BLOCK_SIZE=(q_block, kv_block),
                                    mask_mod=mask_mod, seq_lengths=(rows, rows))


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def _cached_block_mask(info, rows: int):
    """The batch's block mask for `rows` query rows, built on first use and kept in `info`."""
    return info.cached(("flex_block_mask", rows), lambda: _block_mask(info, rows, info.device))


def prepare(info, inputs) -> None:
    """Build the batch's block mask now, outside compiled code: every compiled layer then reads
    the same cached mask and traces to one graph (built inside the first layer, that layer's
    graph differs from the rest and Flex's kernels compile twice)."""
    if flex_attention is not None and info.slots:
        _cached_block_mask(info, inputs.rows)


def attention(q, k, v, info, softmax_scale, deterministic):
    rows = q.shape[0]
    if info.slots == 0:
        return q * 0  # an empty batch: zero output, zero gradient, still attached to q
    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    kwargs = dict(scale=softmax_scale, enable_gqa=q.shape[1] != k.shape[1])
    # One block mask per SeqInfo and row count, shared by every layer's call. Under torch.compile
    # the cache fill is a traced side effect, so layers after the first reuse the traced mask.
    block_mask = _cached_block_mask(info, rows)
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
