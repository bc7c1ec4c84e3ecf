"""Log-likelihood of continuations: the prefix attended bidirectionally, the continuation causally.

Teacher forcing in one packed forward per batch, the training path: a (prefix, continuation)
pair is the sample prefix + continuation[:-1] with `len(continuation) - 1` causal rows; row
`len(prefix) - 1 + j` predicts continuation[j], and only the rows that are scored get logits
(`rows=`). Pairs are packed longest first into batches of at most `capacity` tokens (a longer
pair gets a batch of its own).
"""

from __future__ import annotations

import numpy as np
import torch

from ..attention import SeqInfo
from ..devices import to_device

__all__ = ["continuation_logprobs"]


@torch.no_grad()
def continuation_logprobs(model, items: list[tuple[list[int], list[int], int]], *,
                          capacity: int = 8192, progress: bool = False
                          ) -> list[tuple[float, bool]]:
    """For each (prefix ids, continuation ids, scored): the summed log-probability (fp32 or
    wider) of the last `scored` continuation tokens, and whether each is the model's argmax."""
    device = next(model.parameters()).device
    results: list[tuple[float, bool] | None] = [None] * len(items)
    sizes = []
    for i, (prefix, continuation, scored) in enumerate(items):
        if not prefix:
            raise ValueError(f"item {i}: the prefix is empty (a continuation is predicted from "
                             "the prefix's last row)")
        if not 0 <= scored <= len(continuation):
            raise ValueError(f"item {i}: scores {scored} of {len(continuation)} tokens")
        if scored == 0:
            results[i] = (0.0, True)
        sizes.append(len(prefix) + len(continuation) - 1)
    order = sorted((i for i in range(len(items)) if results[i] is None), key=lambda i: -sizes[i])
    batches, current, used = [], [], 0
    for i in order:
        if current and used + sizes[i] > capacity:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += sizes[i]
    if current:
        batches.append(current)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(order), desc="loglikelihood", unit="request", dynamic_ncols=True)
    try:
        for batch in batches:
            _score_batch(model, items, batch, results, device)
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results


def _score_batch(model, items, batch, results, device):
    ids, positions, rows, targets, owners = [], [], [], [], []
    prefix_lens, causal_lens, offset = [], [], 0
    for i in batch:
        prefix, continuation, scored = items[i]
        sequence = list(prefix) + list(continuation[:-1])
        ids.extend(sequence)
        positions.extend(range(len(sequence)))
        first = len(continuation) - scored
        rows.extend(offset + len(prefix) - 1 + j for j in range(first, len(continuation)))
        targets.extend(continuation[first:])
        owners.extend([i] * scored)
        prefix_lens.append(len(prefix))
        causal_lens.append(len(continuation) - 1)
        offset += len(sequence)
    info = SeqInfo.from_lengths(prefix_lens, causal_lens, device=device)

    def dev(values):
        return to_device(torch.as_tensor(np.asarray(values, np.int64)), device)

    logits = model(dev(ids), dev(positions), info, rows=dev(rows))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    targets = dev(targets)
    logprobs = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    greedy = logits.argmax(-1) == targets
    owners = np.asarray(owners)
    logprobs, greedy = logprobs.cpu().numpy(), greedy.cpu().numpy()
    for i in batch:
        mine = owners == i
        results[i] = (float(logprobs[mine].astype(np.float64).sum()), bool(greedy[mine].all()))
