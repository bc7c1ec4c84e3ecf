"""Multipack sampler: coverage, capacity, determinism, LPT balance, window mechanics."""


import numpy as np
import pytest

from prefixlm.data import sampler as sampler_module
from prefixlm.data.sampler import MultipackSampler, attention_cost


def _lengths(n, seed=0, skew=False):
    rng = np.random.default_rng(seed)
    if skew:  # mostly short samples and a heavy tail of long ones
        p = np.where(rng.random(n) < 0.1, rng.integers(500, 2000, n), rng.integers(1, 60, n))
    else:
        p = rng.integers(1, 300, n)
    return p, rng.integers(1, 300, n)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_sample_once_and_capacity(world):
    """Guards loss/duplication of samples across ranks and batches over the capacity."""
    p, c = _lengths(3001)
    s = MultipackSampler(p, c, 2048, world_size=world, seed=3)
    for epoch in (0, 1):
        plan = s.plan(epoch)
        seen = np.concatenate([plan.batch(st, r) for st in range(plan.num_steps)
                               for r in range(world)] + [plan.dropped])
        assert np.array_equal(np.sort(seen), np.arange(3001))
        assert len(plan.dropped) < world
        assert plan.tokens.max() <= 2048
        for st in range(plan.num_steps):
            for r in range(world):
                ids = plan.batch(st, r)
                assert len(ids) > 0 and (p[ids] + c[ids]).sum() == plan.tokens[st, r] <= 2048
        assert plan.efficiency > 0.95


def test_last_step_that_cannot_fill_ranks_is_dropped_and_counted():
    """Guards the end of an epoch: fewer samples than ranks are dropped (counted), not left empty."""
    s = MultipackSampler([100, 100, 100], [10, 10, 10], 120, world_size=2)
    plan = s.plan(0)
    assert plan.num_steps == 1 and len(plan.dropped) == 1
    assert plan.stats()["dropped"] == 1


def test_deterministic_and_epoch_dependent():
    """Guards determinism from (seed, epoch): equal across instances (ranks), different by epoch."""
    p, c = _lengths(2000)
    a = MultipackSampler(p, c, 1024, world_size=2, seed=5).plan(3)
    b = MultipackSampler(p, c, 1024, world_size=2, seed=5).plan(3)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.offsets, b.offsets)
    d = MultipackSampler(p, c, 1024, world_size=2, seed=5).plan(4)
    e = MultipackSampler(p, c, 1024, world_size=2, seed=6).plan(3)
    assert not np.array_equal(a.order, d.order) and not np.array_equal(a.order, e.order)


def test_lpt_balances_better_than_greedy():
    """Guards the cost balancing: on skewed lengths LPT's max/mean rank cost beats first-fit's."""
    p, c = _lengths(20000, skew=True)
    lpt = MultipackSampler(p, c, 8192, world_size=4, strategy="lpt").plan(0)
    greedy = MultipackSampler(p, c, 8192, world_size=4, strategy="first-fit").plan(0)
    assert lpt.imbalance < greedy.imbalance - 0.1, (lpt.imbalance, greedy.imbalance)
    assert lpt.efficiency > 0.97


def test_cost_formula():
    """Guards the attention-cost formula p^2 + c*p + c(c+1)/2 (pairs the PrefixLM mask allows)."""
    for p, c in [(0, 1), (3, 0), (4, 5), (1, 1)]:
        mask = np.zeros((p + c, p + c), bool)
        mask[:, :p] = True
        for q in range(p, p + c):
            mask[q, : q + 1] = True
        assert attention_cost([p], [c])[0] == mask.sum()


def test_rejects_sample_over_capacity():
    """Guards that a sample longer than the capacity is an error naming it, not a silent overflow."""
    with pytest.raises(ValueError, match="sample 1 has 300 tokens"):
        MultipackSampler([10, 200], [10, 100], 256)


def _lognormal(n, seed=0):
    """bench/planner.py's lengths: lognormal prefix and causal parts (median e^5), clipped."""
    rng = np.random.default_rng(seed)
    p = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    c = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    return p, c


def _placement_ok(plan, lengths):
    """Every sample once (or dropped, fewer than the ranks), no batch empty or over capacity, and
    the plan's tokens and costs are those of its batches."""
    n, world = len(lengths), plan.world_size
    placed = np.concatenate([plan.order, plan.dropped])
    assert len(placed) == n and np.array_equal(np.sort(placed), np.arange(n))
    assert len(plan.dropped) < world
    counts = np.diff(plan.offsets)
    assert len(counts) == plan.num_steps * world and (counts > 0).all()
    tokens = np.add.reduceat(lengths[plan.order], plan.offsets[:-1]) if len(counts) else counts
    assert np.array_equal(tokens, plan.tokens.reshape(-1))
    assert plan.tokens.max(initial=0) <= plan.capacity


@pytest.mark.parametrize("world,capacity,window,strategy", [
    (1, 700, 1, "lpt"), (3, 700, 1, "lpt"), (8, 1024, 1, "lpt"), (5, 1024, 100, "lpt"),
    (3, 700, 1, "first-fit")])
def test_many_windows_place_every_sample_once(world, capacity, window, strategy):
    """Guards the window mechanics (carry into the next window, the merged last window, the step
    and rank shuffles) against losing, duplicating or overfilling: small windows, odd ranks."""
    p, c = _lognormal(6000, seed=world)
    p, c = np.minimum(p, capacity // 2), np.minimum(c, capacity // 2)
    s = MultipackSampler(p, c, capacity, world_size=world, seed=1, window=window,
                         strategy=strategy)
    assert s.window % world == 0 and s.window >= max(window, 16 * world)  # whole steps, >= 16
    for epoch in (0, 1):
        plan = s.plan(epoch)
        assert plan.num_steps > 3 * s.window // world  # several windows were planned
        _placement_ok(plan, p + c)


def test_small_capacity_balance():
    """Guards the cost balance where one long sample dominates its batch (capacity 4096, 8 ranks):
    batches matched by cost across a step. On this fixed seed the plan measures 1.0084 mean and
    1.29 worst step; the first-fit baseline measures 2.07."""
    p, c = _lognormal(100_000)
    keep = p + c <= 4096
    plan = MultipackSampler(p[keep], c[keep], 4096, world_size=8).plan(0)
    steps = plan.costs.max(axis=1) / plan.costs.mean(axis=1)
    assert plan.imbalance < 1.015, plan.imbalance
    assert steps.max() < 1.6, steps.max()
    assert plan.efficiency > 0.995, plan.efficiency
    _placement_ok(plan, (p + c)[keep])


def test_large_capacity_quality():
    """Guards the issue's quality targets at capacity 16384 on 8 ranks (balance <= 1.02,
    efficiency >= 99 %): this fixed seed measures 1.0039 and 0.9996, nothing dropped."""
    p, c = _lognormal(200_000)
    plan = MultipackSampler(p, c, 16384, world_size=8).plan(0)
    assert plan.imbalance < 1.01 and plan.efficiency > 0.999, plan.stats()
    assert len(plan.dropped) == 0


def test_samples_stay_near_their_place_in_the_shuffle():
    """Guards against starving samples: what a window leaves over goes first in the next one, so
    no sample (the smallest would be) is carried window after window to the end of the epoch.
    Measured: at most about two windows from its place in the shuffled order."""
    p, c = _lognormal(200_000)
    s = MultipackSampler(p, c, 16384, world_size=8)
    plan = s.plan(0)
    stream_pos = np.empty(len(p), np.int64)
    stream_pos[s.permutation(0)] = np.arange(len(p))
    moved = np.abs(np.arange(len(plan.order)) - stream_pos[plan.order])
    per_window = len(plan.order) / plan.num_steps * (s.window // s.world_size)
    assert moved.max() < 3 * per_window, moved.max() / per_window


def test_last_window_uses_fewest_steps_and_stays_balanced():
    """Guards the epoch's end: the rest of the stream joins the last window, packed into as few
    steps as the tokens allow (plus one at most), not a short window of half-empty or badly
    matched steps (its few batches have few to be matched with: measured 1.08 mean balance over
    the last 16 steps with a short last window, at most 1.0053 with the merged one)."""
    for n in (500, 20_000, 200_000, 300_000):
        p, c = _lognormal(n)
        keep = p + c <= 4096
        s = MultipackSampler(p[keep], c[keep], 4096, world_size=8)
        plan = s.plan(0)
        fewest = -(-int((p + c)[keep].sum()) // (8 * 4096))
        assert fewest <= plan.num_steps <= fewest + 1 + plan.num_steps // 200, (n, plan.num_steps)
        assert len(plan.dropped) == 0
        if plan.num_steps > 2 * s.window // 8:  # the epoch is more than its last window
            last = plan.costs[-16:]
            assert (last.max(axis=1) / last.mean(axis=1)).mean() < 1.01, n


def test_best_fit_leaves_only_what_fits_nowhere():
    """Guards the vectorised best-fit fill (one sample per batch per round, Hall's condition):
    nothing is left that still fits some batch, no batch goes over capacity, no sample is placed
    twice."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        bins, capacity = int(rng.integers(1, 12)), int(rng.integers(5, 60))
        used = rng.integers(0, capacity + 1, bins).astype(np.int64)
        load = np.zeros(bins, np.int64)
        sizes = rng.integers(1, capacity + 1, int(rng.integers(0, 40))).astype(np.int64)
        before = used.copy()
        bin_of = np.full(len(sizes), -1, np.int64)
        left = sampler_module._best_fit(sizes, sizes * sizes, np.arange(len(sizes)), used, load,
                                        capacity, bin_of)
        assert (used <= capacity).all()
        placed = bin_of >= 0
        assert np.array_equal(np.sort(left), np.flatnonzero(~placed))
        assert np.array_equal(used - before, np.bincount(bin_of[placed], sizes[placed],
                                                         minlength=bins).astype(np.int64))
        if len(left):
            assert sizes[left].min() > (capacity - used).max(), trial


@pytest.mark.parametrize("top", [1000, 1 << 40, 1 << 62])
def test_fast_argsort_is_the_stable_sort(top):
    """Guards determinism: each route of the fast sort (16-bit radix, quicksort of unique keys,
    numpy's stable sort for keys too large) gives exactly the stable order, so every machine
    computes the same plan."""
    rng = np.random.default_rng(0)
    keys = rng.integers(0, min(top, 50), 5000).astype(np.int64) * (top // 50 or 1)
    assert np.array_equal(sampler_module._argsort(keys, top), np.argsort(keys, kind="stable"))


def test_empty_and_invalid():
    """Guards the edges: no samples gives no steps (the loader reports it), and bad window or
    slack values are errors naming them."""
    plan = MultipackSampler([], [], 64, world_size=2).plan(0)
    assert plan.num_steps == 0 and len(plan.dropped) == 0 and plan.costs.shape == (0, 2)
    with pytest.raises(ValueError, match="window must be a positive int"):
        MultipackSampler([1], [1], 8, window=0)
    with pytest.raises(ValueError, match="pool_slack must be >= 0"):
        MultipackSampler([1], [1], 8, pool_slack=-0.1)


def test_large_plan_places_every_sample_once():
    """Guards the packer at scale (its speed is measured by bench/planner.py, not here): 200k
    lognormal samples over 8 ranks, each placed once or dropped at the epoch's end, no batch over
    capacity."""
    rng = np.random.default_rng(0)
    n = 200_000
    p = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    c = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    plan = MultipackSampler(p, c, 16384, world_size=8).plan(0)
    placed = np.concatenate([plan.order, plan.dropped])
    assert len(placed) == n and len(np.unique(placed)) == n
    assert plan.tokens.max() <= 16384
