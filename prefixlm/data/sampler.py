"""Multipack sampler: packs an epoch's samples into per-rank batches of at most `capacity` tokens,
with the ranks of each step balanced by attention cost.

One *step* is one batch for each of the W ranks. The epoch's shuffled order (seeded by (seed,
epoch), so every rank computes the same plan with no communication) is cut into *windows* of B
batches (`window`, whole steps), each planned on its own in two phases:

1. Pack: the window's pool (what the previous window left over, then the stream until the pool
   holds `(1 + pool_slack) * B * capacity` tokens) goes into B batches. In waves of B samples by
   attention cost, largest first, the k-th sample of a wave goes to the k-th cheapest batch if it
   has room (LPT a wave at a time). The waves stop short of the last tokens; the samples left (the
   smallest, and any that found no room) fill the remaining room best-fit, largest first. What
   fits nowhere is carried into the next window, where it goes first: the slack is the spare small
   samples that let batches fill to their last tokens, and no sample is carried twice in a row
   unless it fits nowhere again.
2. Match: the B batches sorted by cost, each W consecutive ones form a step. At small capacity one
   long sample dominates its batch, and no packing balances a step unless its other batches hold
   long samples too; sorting gives every step batches of near-equal cost. The window's steps are
   put in a random order, and each step's batches in a random order of ranks.

The attention cost of a sample with prefix p and causal part c is p^2 + c*p + c(c+1)/2 (the
number of (query, key) pairs its mask allows), so ranks are balanced by the work their attention
does, not by tokens alone. The first wave gives every batch a sample, so no batch is empty. The
epoch's last window is packed into the fewest steps that take all it holds; if fewer samples are
left than ranks, those are dropped (and counted): every rank must get a batch.

The per-sample work is numpy on a window's arrays; Python loops over windows and waves only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..attention.mask import allowed_pairs

__all__ = ["PLANNER_VERSION", "attention_cost", "PackPlan", "MultipackSampler"]


# A sample's attention cost: the (query, key) pairs its mask allows, p^2 + c*p + c(c+1)/2 (int64).
attention_cost = allowed_pairs


@dataclass
class PackPlan:
    """The batches of one epoch for all ranks.

    Batch (step s, rank r) holds samples `order[offsets[s * W + r] : offsets[s * W + r + 1]]`.
    """

    order: np.ndarray        # sample indices, batch after batch
    offsets: np.ndarray      # (num_steps * world_size + 1,)
    world_size: int
    capacity: int
    tokens: np.ndarray       # (num_steps, world_size) tokens per batch
    costs: np.ndarray        # (num_steps, world_size) attention cost per batch
    dropped: np.ndarray      # sample indices left out at the end of the epoch

    @property
    def num_steps(self) -> int:
        return self.tokens.shape[0]

    def batch(self, step: int, rank: int) -> np.ndarray:
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} out of range [0, {self.num_steps})")
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range [0, {self.world_size})")
        k = step * self.world_size + rank
        return self.order[self.offsets[k]: self.offsets[k + 1]]

    @property
    def efficiency(self) -> float:
        """Fraction of the batch tokens (steps x ranks x capacity) that hold samples."""
        total = self.num_steps * self.world_size * self.capacity
        return float(self.tokens.sum() / total) if total else 0.0

    @property
    def imbalance(self) -> float:
        """Mean over steps of (max rank cost / mean rank cost); 1.0 is perfect balance."""
        if self.num_steps == 0:
            return 1.0
        mean = self.costs.mean(axis=1)
        ok = mean > 0
        return float((self.costs.max(axis=1)[ok] / mean[ok]).mean()) if ok.any() else 1.0

    def stats(self) -> dict:
        return {"steps": self.num_steps, "world_size": self.world_size, "capacity": self.capacity,
                "samples": int(len(self.order)), "dropped": int(len(self.dropped)),
                "efficiency": round(self.efficiency, 6), "imbalance": round(self.imbalance, 6)}



# The waves place the samples, by cost, that fill this fraction of a window's tokens; best-fit then
# fills the rest of the room with what is left. Both the balance (the waves' work) and the packing
# (best-fit's) are worse when one phase does it all.
_WAVE_FILL = 0.98


def _argsort(keys: np.ndarray, top: int) -> np.ndarray:
    """Stable argsort of int64 keys in [0, top] (ties keep their order), by the fastest exact route:
    numpy's stable sort of 16-bit keys (a radix sort), else a quicksort of the keys made unique by
    their index (unique keys have one sorted order, whatever the algorithm), else numpy's stable
    sort of the keys as they are."""
    n = len(keys)
    if top < 1 << 16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    if (top + 1) * max(n, 1) < 1 << 62:
        return np.argsort(keys * n + np.arange(n), kind="quicksort")
    return np.argsort(keys, kind="stable")


def _best_fit(sizes, costs, rest, used, load, capacity, bin_of) -> np.ndarray:
    """Fill the batches' room with the samples `rest`, largest first, each into the batch with the
    least room that takes it; one sample per batch per round. Returns the samples left over."""
    num_bins = len(used)
    rest = rest[_argsort(capacity - sizes[rest], capacity)]  # largest first
    nowhere = []
    while len(rest):
        room = capacity - used
        by_room = _argsort(room, capacity)
        tightest = np.searchsorted(room[by_room], sizes[rest], "left")  # least room that fits
        fits = tightest < num_bins
        if not fits.all():  # room only shrinks: a sample that fits nowhere now never will
            nowhere.append(rest[~fits])
            rest, tightest = rest[fits], tightest[fits]
            if not len(rest):
                break
        # Largest first, at most one sample per batch: sample k is taken iff fewer than
        # (batches that fit it) larger samples were taken, a running minimum (Hall's condition).
        k = np.arange(len(rest))
        taken_after = np.minimum(k + 1, np.minimum.accumulate(num_bins - tightest - k) + k)
        taken = np.diff(taken_after, prepend=0) > 0
        # The taken samples, smallest first, each get the tightest batch no smaller one took.
        chosen, lowest = rest[taken][::-1], tightest[taken][::-1]
        j = np.arange(len(chosen))
        bins = by_room[j + np.maximum.accumulate(lowest - j)]
        bin_of[chosen] = bins
        used[bins] += sizes[chosen]
        load[bins] += costs[chosen]
        rest = rest[~taken]
    return np.concatenate([rest, *nowhere])


def _pack_lpt(sizes, costs, num_bins: int, capacity: int, carried: int = 0):
    """Pack samples (their sizes and costs) into `num_bins` batches: LPT waves, then best-fit.

    The first `carried` samples are those an earlier window left over: they go first wherever
    there is a choice, so that no sample is carried from window to window (the smallest would be,
    to the end of the epoch). Returns (batch of each sample or -1 if left over, tokens per batch,
    cost per batch). Needs at least `num_bins` samples, each at most `capacity`: the first wave
    gives every batch one.
    """
    n = len(sizes)
    top = int(costs.max())
    by_cost = _argsort(top - costs, top)  # largest first, ties in pool order
    # The waves take the carried samples and the largest new ones up to _WAVE_FILL of the tokens.
    is_new = by_cost >= carried
    room_for_new = _WAVE_FILL * num_bins * capacity - int(sizes[:carried].sum())
    cut = int(np.searchsorted(np.cumsum(sizes[by_cost[is_new]]), room_for_new, "right"))
    cut = max(cut, num_bins - carried)
    in_waves = ~is_new | (np.cumsum(is_new) <= cut)
    waves, rest = by_cost[in_waves], [by_cost[~in_waves]]
    used = np.zeros(num_bins, np.int64)
    load = np.zeros(num_bins, np.int64)
    bin_of = np.full(n, -1, np.int64)
    for start in range(0, len(waves), num_bins):
        wave = waves[start:start + num_bins]
        # The cheapest batch for the largest sample (a batch's cost is below capacity^2).
        bins = _argsort(load, capacity * capacity)[:len(wave)]
        fits = used[bins] + sizes[wave] <= capacity
        wave, bins, failed = wave[fits], bins[fits], wave[~fits]
        bin_of[wave] = bins
        used[bins] += sizes[wave]
        load[bins] += costs[wave]
        if len(failed):
            # A cheap batch may be full of small samples: the sample goes where it fits best now,
            # while there is room for it, rather than be stranded when the batches have filled.
            rest.append(_best_fit(sizes, costs, failed, used, load, capacity, bin_of))
    rest = np.concatenate(rest)
    old = rest < carried
    _best_fit(sizes, costs, rest[old], used, load, capacity, bin_of)
    _best_fit(sizes, costs, rest[~old], used, load, capacity, bin_of)
    return bin_of, used, load


def _pack_first_fit(sizes, costs, num_bins: int, capacity: int):
    """Tokens only, in pool order: each sample into the first batch with room (the baseline)."""
    used, load = [0] * num_bins, [0] * num_bins
    bins = []
    for size, cost in zip(sizes.tolist(), costs.tolist()):
        b = next((r for r in range(num_bins) if used[r] + size <= capacity), -1)
        if b >= 0:
            used[b] += size
            load[b] += cost
        bins.append(b)
    return (np.asarray(bins, np.int64), np.asarray(used, np.int64),
            np.asarray(load, np.int64))


# Bumped whenever the same (lengths, seed, epoch, world size, capacity) plan different batches:
# a loader state records it, so that a resume never continues with other batches unnoticed.
PLANNER_VERSION = 2


class MultipackSampler:
    """Deterministic cost-balanced packing of samples into per-rank batches.

    prefix_lens, causal_lens: per-sample lengths (the causal part is the response after the shift).
    strategy: "lpt" (balance attention cost, the module docstring's two phases) or "first-fit"
      (tokens only, one step at a time in stream order; kept as the baseline that the tests compare
      LPT against).
    window: batches planned together (rounded up to whole steps, at least 16): the more, the closer
      the costs of the batches of a step, and the further samples move from their place in the
      shuffled order (a few windows at most).
    pool_slack: tokens drawn into a window beyond its batches' capacity, as a fraction of it: the
      spare small samples that fill the batches' last room; what is left goes to the next window.
    """

    def __init__(self, prefix_lens, causal_lens, capacity: int, *, world_size: int = 1,
                 seed: int = 0, strategy: str = "lpt", pool_slack: float = 0.05,
                 window: int = 1024):
        prefix = np.asarray(prefix_lens, dtype=np.int64)
        causal = np.asarray(causal_lens, dtype=np.int64)
        if prefix.ndim != 1 or prefix.shape != causal.shape:
            raise ValueError(f"prefix_lens and causal_lens must be 1-D of equal length, got "
                             f"{prefix.shape} and {causal.shape}")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if strategy not in ("lpt", "first-fit"):
            raise ValueError(f"strategy must be 'lpt' or 'first-fit', got {strategy!r}")
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not pool_slack >= 0:
            raise ValueError(f"pool_slack must be >= 0, got {pool_slack!r}")
        if (prefix < 0).any() or (causal < 0).any():
            raise ValueError("sample lengths must be >= 0")
        self.lengths = prefix + causal
        if len(self.lengths) and (self.lengths < 1).any():
            bad = int(np.flatnonzero(self.lengths < 1)[0])
            raise ValueError(f"sample {bad} is empty (prefix 0 + causal 0 tokens)")
        if len(self.lengths) and self.lengths.max() > capacity:
            bad = int(np.argmax(self.lengths))
            raise ValueError(f"sample {bad} has {int(self.lengths[bad])} tokens (prefix "
                             f"{int(prefix[bad])} + causal {int(causal[bad])}), more than the batch "
                             f"capacity {capacity}; raise the capacity or prepare with a smaller "
                             f"--context-size")
        self.costs = attention_cost(prefix, causal)
        self.capacity = int(capacity)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.strategy = strategy
        self.pool_slack = float(pool_slack)
        self.window = max(-(-int(window) // self.world_size), 16) * self.world_size
        self._cache: tuple[int, PackPlan] | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, int(epoch)])))
        return rng.permutation(len(self.lengths))

    def plan(self, epoch: int) -> PackPlan:
        """The epoch's batches (cached for the most recent epoch)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        # The order of steps and ranks has its own stream, so the shuffle stays permutation(epoch).
        rng = np.random.Generator(np.random.PCG64(
            np.random.SeedSequence([self.seed, int(epoch), 1])))
        plan = self._pack(self.permutation(epoch), rng)
        self._cache = (epoch, plan)
        return plan

    def _pack(self, stream: np.ndarray, rng: np.random.Generator) -> PackPlan:
        W, C = self.world_size, self.capacity
        lpt = self.strategy == "lpt"
        num_bins = self.window if lpt else W
        n = len(stream)
        sizes, costs = self.lengths[stream], self.costs[stream]  # by stream position
        cumlen = np.concatenate([[0], np.cumsum(sizes)])
        budget = int((1.0 + self.pool_slack) * num_bins * C)

        order: list[np.ndarray] = []   # sample ids, batch after batch
        counts: list[np.ndarray] = []  # samples per batch
        tokens: list[np.ndarray] = []  # (steps, W) per window
        loads: list[np.ndarray] = []
        steps = 0
        carry = np.empty(0, np.int64)
        pos = 0
        while True:
            carried = int(sizes[carry].sum())
            if pos < n and carried < budget:
                end = min(int(np.searchsorted(cumlen, cumlen[pos] + budget - carried, "left")), n)
                if cumlen[n] - cumlen[end] < budget:
                    end = n  # the rest joins the last window rather than form a short one
                pool = np.concatenate([carry, np.arange(pos, end)])
                pos = end
            else:
                pool = carry
            if pos < n:
                if lpt:
                    bin_of, used, load = _pack_lpt(sizes[pool], costs[pool], num_bins, C,
                                                   len(carry))
                else:
                    bin_of, used, load = _pack_first_fit(sizes[pool], costs[pool], num_bins, C)
            else:
                # The last window: the fewest steps that take all it holds, each rank a sample.
                most = len(pool) // W * W
                if most == 0:
                    break  # fewer samples than ranks: counted as dropped
                bins = min(-(-int(sizes[pool].sum()) // (W * C)) * W, most)
                while True:
                    bin_of, used, load = _pack_lpt(sizes[pool], costs[pool], bins, C, len(carry))
                    if bin_of.min() >= 0 or bins == most:
                        break
                    # At least the batches the left-over tokens fill: few retries even when most
                    # samples need a batch of their own.
                    short = -(-int(sizes[pool[bin_of < 0]].sum()) // (W * C)) * W
                    bins = min(bins + short, most)
            num_window_bins = len(used)
            window_steps = num_window_bins // W
            # Bins by cost, W consecutive ones a step (first-fit keeps its one step as packed);
            # steps, and ranks in a step, in random order.
            by_cost = _argsort(load, C * C) if lpt else np.arange(num_window_bins)
            step = rng.permutation(window_steps)
            rank = rng.permuted(np.tile(np.arange(W), (window_steps, 1)), axis=1)
            slot_of_bin = np.empty(num_window_bins, np.int64)
            slot_of_bin[by_cost] = (step[:, None] * W + rank).reshape(-1)
            ok = bin_of >= 0
            slot = slot_of_bin[bin_of[ok]]
            order.append(stream[pool[ok][_argsort(slot, num_window_bins)]])  # batch: pool order
            counts.append(np.bincount(slot, minlength=num_window_bins))
            bin_at_slot = np.argsort(slot_of_bin)
            tokens.append(used[bin_at_slot].reshape(window_steps, W))
            loads.append(load[bin_at_slot].reshape(window_steps, W))
            steps += window_steps
            carry = pool[~ok]
            if pos >= n and not len(carry):
                break

        offsets = np.zeros(steps * W + 1, np.int64)
        if steps:
            np.cumsum(np.concatenate(counts), out=offsets[1:])
        empty = np.empty((0, W), np.int64)
        return PackPlan(order=np.concatenate(order) if order else np.empty(0, np.int64),
                        offsets=offsets, world_size=W, capacity=C,
                        tokens=np.concatenate(tokens) if tokens else empty,
                        costs=np.concatenate(loads) if loads else empty,
                        dropped=np.sort(stream[carry]))
