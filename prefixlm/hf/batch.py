"""Packed batches for transformers' `hrm_text` with `attn_implementation="prefixlm"`.

`packed_batch` lays samples out as prefixlm's loader does (`data.loader.assemble_batch`): a sample
(prefix, response) contributes prefix + response[:-1], the last prefix row predicts the first
response token and every response row the next one, -100 elsewhere. transformers' causal-LM loss
shifts `labels` by one across the whole row, which pairs a sample's last row with the next
sample's first token; `shift_labels` (already aligned) is used as given, so the batch passes its
labels as both (`labels` only switches the loss on).
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention import SeqInfo
from ..data.dataset import EpochIndex
from ..data.loader import IGNORE_INDEX, assemble_batch

__all__ = ["packed_batch", "shift_labels"]


def packed_batch(samples, capacity: int | None = None, pad_id: int = 0, device=None) -> dict:
    """Keyword arguments of `HrmTextForCausalLM.forward` for one packed row of `samples`, a list
    of (prefix ids, response ids), each with at least one token: input_ids and position_ids
    (1, T), prefixlm_info (SeqInfo), labels = shift_labels (1, T). T = capacity (default: the
    samples' tokens); padding rows get pad_id and no label. Call the model with use_cache=False
    (a cache is of no use in training, and transformers allocates one by default)."""
    if not samples:
        raise ValueError("packed_batch needs at least one sample")
    tokens, starts, lens = [], [], []
    at = 0
    for i, (prefix, response) in enumerate(samples):
        prefix, response = list(prefix), list(response)
        if not prefix or not response:
            raise ValueError(f"sample {i}: the prefix and the response need at least one token "
                             f"each (got {len(prefix)} and {len(response)})")
        tokens += prefix + response
        starts += [at, at + len(prefix)]
        lens += [len(prefix), len(response)]
        at += len(prefix) + len(response)
    starts = np.array(starts, np.int64).reshape(-1, 2)
    lens = np.array(lens, np.int64).reshape(-1, 2)
    index = EpochIndex(starts[:, 0], lens[:, 0], starts[:, 1], lens[:, 1])
    total = int((lens.sum(1) - 1).sum())
    capacity = total if capacity is None else capacity
    rows, prefix_lens, causal_lens = assemble_batch(np.array(tokens, np.int64), index,
                                                    np.arange(len(samples)), capacity, pad_id)
    rows = torch.from_numpy(rows).to(device)
    info = SeqInfo.from_lengths(prefix_lens, causal_lens, capacity=capacity, device=device)
    labels = rows[1][None]
    return {"input_ids": rows[0][None], "position_ids": rows[2][None], "prefixlm_info": info,
            "labels": labels, "shift_labels": labels}


def shift_labels(input_ids: torch.Tensor, info: SeqInfo) -> torch.Tensor:
    """Aligned labels (same shape as input_ids, (T,) or (1, T)) for a packed row whose samples
    are laid out by `info`: row r of a sample predicts input_ids[r + 1] of the same sample from
    its last prefix row on; a sample's last row, the rest of its prefix and padding get -100.
    (Its last row's target is not in input_ids; `packed_batch` keeps it.)"""
    ids = input_ids.reshape(-1)
    labels = torch.full_like(ids, IGNORE_INDEX)
    prefix, causal = info.host_lens.numpy()
    start = 0
    for p, c in zip(prefix[:info.num_samples], causal[:info.num_samples]):
        end = start + int(p) + int(c)
        first = start + max(int(p) - 1, 0)
        labels[first:end - 1] = ids[first + 1:end]
        start = end
    return labels.reshape(input_ids.shape)
