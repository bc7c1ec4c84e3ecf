"""The reference batches of the attention benchmark spec, shared by every benchmark.

Sample lengths are drawn exactly as `shared/bench_spec.md` says: one generator seeded with `seed`,
per sample `p = randint(16, 2049)`, `c = randint(1, 1025)`, `u = rand()`, `c = 0` when
`u < zero_causal_frac`; the sample that would push the total past the capacity ends the batch.
With seed 1 and capacity 65536 that is 42 samples and 63768 tokens. "Useful" FLOPs count only the
(query, key) pairs the PrefixLM mask allows: forward = 4 * pairs * D * Hq, forward + backward =
3.5 x forward.

Two batch builders: `AttentionBatch` (random bf16 q, k, v, dout and the SeqInfo of a spec case,
for the attention benchmark) and `token_batch` (a packed token batch for training benchmarks, in
the data layer's own label convention).
"""

from __future__ import annotations

import functools
import importlib.metadata
import statistics
from dataclasses import dataclass

import numpy as np
import torch

from ..attention import SeqInfo
from ..attention.mask import allowed_pairs
from ..data.dataset import EpochIndex
from ..data.loader import assemble_batch, batch_on_device, supervised_rows

__all__ = ["BenchCase", "CASES", "spec_lengths", "case_lengths", "useful_flops", "time_ms",
           "AttentionBatch", "token_batch", "SpecLoader", "package_version"]


@dataclass(frozen=True)
class BenchCase:
    name: str
    capacity: int
    q_heads: int
    kv_heads: int
    head_dim: int
    zero_causal_frac: float = 0.0
    pure_causal: bool = False
    note: str = ""


CASES = {
    "A": BenchCase("A", 65536, 12, 12, 128, note="main"),
    "B": BenchCase("B", 16384, 12, 12, 128, note="small"),
    "C": BenchCase("C", 65536, 16, 4, 128, note="GQA"),
    "D": BenchCase("D", 65536, 16, 16, 64, note="hd64"),
    "E": BenchCase("E", 65536, 12, 12, 128, zero_causal_frac=0.3, note="30% zero-causal"),
    "F": BenchCase("F", 65536, 12, 12, 128, zero_causal_frac=1.0, note="all zero-causal"),
    "G": BenchCase("G", 65536, 12, 12, 128, pure_causal=True, note="pure causal"),
}


def spec_lengths(capacity: int, seed: int = 1, zero_causal_frac: float = 0.0,
                 max_prefix: int = 2048, max_causal: int = 1024):
    """(prefix_lens, causal_lens) of one batch drawn as the spec says; `max_prefix` /
    `max_causal` shrink the ranges (CPU tests)."""
    if capacity < max_prefix + max_causal:
        raise ValueError(f"capacity {capacity} cannot hold the longest sample ({max_prefix} + "
                         f"{max_causal} tokens); lower max_prefix/max_causal or raise it")
    g = torch.Generator().manual_seed(seed)
    prefix, causal, total = [], [], 0
    while True:
        p = int(torch.randint(min(16, max_prefix), max_prefix + 1, (1,), generator=g))
        c = int(torch.randint(1, max_causal + 1, (1,), generator=g))
        u = torch.rand(1, generator=g).item()
        if u < zero_causal_frac:
            c = 0
        if total + p + c > capacity:
            return prefix, causal
        prefix.append(p)
        causal.append(c)
        total += p + c


def case_lengths(case: BenchCase):
    prefix, causal = spec_lengths(case.capacity, 1, case.zero_causal_frac)
    if case.pure_causal:
        prefix, causal = [0] * len(prefix), [p + c for p, c in zip(prefix, causal)]
    return prefix, causal


def useful_flops(prefix, causal, q_heads: int, head_dim: int) -> float:
    """Forward FLOPs of the allowed (query, key) pairs only."""
    return 4.0 * float(allowed_pairs(prefix, causal).sum()) * head_dim * q_heads


def time_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of `fn()` over `iters` runs, CUDA events around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def package_version(name: str) -> str | None:
    """The installed version of package `name` (for the records), None when it is missing."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


class AttentionBatch:
    """A spec case's batch: `info`, standard-normal bf16 `q`, `k`, `v`, `dout` (seed 0) of the
    case's shapes, and its useful forward `flops`."""

    def __init__(self, case: BenchCase, device, dtype=torch.bfloat16):
        self.case = case
        self.prefix, self.causal = case_lengths(case)
        self.info = SeqInfo.from_lengths(self.prefix, self.causal, capacity=case.capacity,
                                         device=device)
        g = torch.Generator(device=device).manual_seed(0)

        def randn(heads):
            return torch.randn((case.capacity, heads, case.head_dim), generator=g, device=device,
                               dtype=dtype)

        self.q, self.k, self.v = randn(case.q_heads), randn(case.kv_heads), randn(case.kv_heads)
        self.dout = randn(case.q_heads)
        self.flops = useful_flops(self.prefix, self.causal, case.q_heads, case.head_dim)


@functools.lru_cache(maxsize=4)
def _zipf(vocab: int) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return (weights / weights.sum()).float()


def token_batch(prefix, causal, capacity: int, vocab: int, seed: int, device="cpu"):
    """A packed `Batch` of samples with these lengths, built by the data layer
    (`assemble_batch`) from an in-memory dataset: sample i's prefix is p ids drawn from a Zipf law
    over the vocabulary, its response c + 1 ids (the prefix shifted by one id, cycled). Learnable
    on two time scales (unigram frequencies within tens of steps, then copying from the prefix),
    so a convergence curve falls instead of sitting at log(vocab)."""
    prefix, causal = np.asarray(prefix, np.int64), np.asarray(causal, np.int64)
    if (prefix < 1).any():
        raise ValueError("every sample needs a prefix token (the last one is labelled)")
    g = torch.Generator().manual_seed(seed)
    heads = torch.multinomial(_zipf(vocab), max(int(prefix.sum()), 1), replacement=True,
                              generator=g).numpy()
    pieces, at = [], 0
    for p, c in zip(prefix.tolist(), causal.tolist()):
        head = heads[at:at + p]
        at += p
        pieces += [head, (head[np.arange(c + 1) % p] + 1) % vocab]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(prefix + causal + 1)[:-1]])
    index = EpochIndex(inst_start=starts, inst_len=prefix, resp_start=starts + prefix,
                       resp_len=causal + 1)
    rows, prefix_lens, causal_lens = assemble_batch(tokens, index, np.arange(len(prefix)),
                                                    capacity)
    return batch_on_device(torch.from_numpy(rows), supervised_rows(rows[1]), prefix_lens,
                           causal_lens, capacity, device)


class SpecLoader:
    """Endless `token_batch`es over `spec_lengths`, with the Trainer's loader contract
    (iterable, state_dict / load_state_dict). Every `all_zero_causal_every`-th batch (0: none) has
    zero_causal_frac 1.0: every sample without causal tokens."""

    def __init__(self, capacity: int, vocab: int, *, seed: int = 1, rank: int = 0,
                 world_size: int = 1, device="cpu", zero_causal_frac: float = 0.0,
                 max_prefix: int = 2048, max_causal: int = 1024, all_zero_causal_every: int = 0):
        self.capacity, self.vocab, self.seed = capacity, vocab, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.zero_causal_frac, self.max_prefix, self.max_causal = (zero_causal_frac, max_prefix,
                                                                   max_causal)
        self.all_zero_causal_every = all_zero_causal_every
        self.position = 0

    def is_all_zero_causal(self, index: int) -> bool:
        every = self.all_zero_causal_every
        return bool(every) and index % every == every - 1

    def batch(self, index: int):
        seed = self.seed + index * self.world_size + self.rank
        frac = 1.0 if self.is_all_zero_causal(index) else self.zero_causal_frac
        prefix, causal = spec_lengths(self.capacity, seed, frac, self.max_prefix, self.max_causal)
        return token_batch(prefix, causal, self.capacity, self.vocab, seed, self.device)

    def __iter__(self):
        while True:
            batch = self.batch(self.position)
            self.position += 1
            yield batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
