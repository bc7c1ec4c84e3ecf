"""The PrefixLM mask, defined once for every backend and the reference.

Inside one sample with `prefix_len` prefix tokens, query position `q` may attend key position `kv`
when the key is in the prefix or not after the query:

    allowed(q, kv) = kv < prefix_len  or  kv <= q

For a prefix query (q < prefix_len) the second clause adds nothing new (kv <= q < prefix_len), so
prefix tokens see exactly the whole prefix; a causal query sees the prefix and the causal tokens up
to itself. Nothing crosses samples: callers combine this with "same sample".
"""

import numpy as np
import torch


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
