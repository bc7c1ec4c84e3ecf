"""Speed and quality of the multipack planner on synthetic lengths (CPU, one process).

For each (ranks, capacity) it plans one epoch of lognormal prefix and causal lengths and prints:
the time to build the sampler and plan the epoch (wall and CPU seconds, median of --repeats; CPU
time is less disturbed by other processes on a shared machine), the packing efficiency (tokens /
batch capacity), the attention-cost balance (mean over steps of max rank cost / mean rank cost;
1.0 is perfect), the worst step's, the same balance for tokens, and the dropped samples. --json
writes the records with the machine and its load average.

--hrm-text adds, on the same shuffled samples, HRM-Text's planner (`multipack_sampler.py`,
`MultipackDistributedBatchSampler` with `drop_last_batch=True` as its training uses it), as
reimplemented here in Python from reading that code; it is not their code (a numba kernel), so its
time says nothing about theirs, only its plan is comparable.

    python bench/planner.py [--samples 1000000] [--world 1,8] [--capacity 4096,16384]
                            [--repeats 3] [--hrm-text] [--json PATH]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import sys
import time

import numpy as np

from prefixlm.data.sampler import MultipackSampler, PackPlan, attention_cost


def lengths(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    c = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    return p, c


# -- HRM-Text's planner, reimplemented -------------------------------------------------------------
# Per step, from where the last one ended in stored order: take samples until their tokens reach
# W * C; binary-search the longest prefix of them that LPT on tokens (a min-heap of W rank loads)
# packs with no rank over C; place it by that LPT. The epoch ends at the first step that cannot
# give every rank a sample, and the step that reaches the end of the samples is skipped; all the
# samples left are dropped. Ranks are balanced by tokens, not by attention cost.

def _lpt_fits(sizes: list, world: int, capacity: int) -> bool:
    """Whether LPT puts `sizes` on `world` ranks with none over `capacity`. The multiset of loads
    LPT reaches does not depend on how ties between equal loads are broken, so a heapq heap
    decides the same as theirs."""
    loads = [0] * world
    for size in sorted(sizes, reverse=True):
        low = loads[0] + size
        if low > capacity:
            return False
        heapq.heapreplace(loads, low)
    return True


def _lpt_ranks(sizes: np.ndarray, world: int) -> np.ndarray:
    """The rank of each sample under their LPT, ties broken as theirs: samples visited by a
    stable ascending sort reversed, a 1-based binary min-heap sifted down, rank ids moving with
    the loads."""
    visit = np.argsort(sizes, kind="stable")[::-1]
    heap = [0] * (world + 1)
    ids = list(range(-1, world))
    rank = np.empty(len(sizes), np.int64)
    for i, size in zip(visit.tolist(), sizes[visit].tolist()):
        heap[1] += size
        rank[i] = ids[1]
        u = 1
        while 2 * u <= world:
            v = 2 * u
            if v + 1 <= world and heap[v + 1] < heap[v]:
                v += 1
            if heap[u] <= heap[v]:
                break
            heap[u], heap[v] = heap[v], heap[u]
            ids[u], ids[v] = ids[v], ids[u]
            u = v
    return rank


def hrm_text_plan(prefix, causal, capacity: int, world: int, stream: np.ndarray) -> PackPlan:
    """HRM-Text's plan of the samples in `stream` order, as a PackPlan."""
    sizes = (prefix + causal)[stream]
    cost = attention_cost(prefix, causal)[stream]
    size_list = sizes.tolist()
    cum = np.cumsum(sizes)
    order, counts, tokens, costs = [], [], [], []
    start, n = 0, len(sizes)
    while start < n:
        base = int(cum[start - 1]) if start else 0
        end = min(int(np.searchsorted(cum, base + world * capacity, "left")) + 1, n)
        lo, hi = 1, 1 + end - start  # the longest fitting prefix is in [lo, hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _lpt_fits(size_list[start:start + mid], world, capacity):
                lo = mid
            else:
                hi = mid
        taken = np.arange(start, start + lo)
        start += lo
        if lo < world or start >= n:
            break
        rank = _lpt_ranks(sizes[taken], world)
        for r in range(world):
            mine = taken[rank == r]
            order.append(stream[mine])
            counts.append(len(mine))
            tokens.append(int(sizes[mine].sum()))
            costs.append(int(cost[mine].sum()))
    steps = len(counts) // world
    placed = np.concatenate(order) if order else np.empty(0, np.int64)
    offsets = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    return PackPlan(order=placed, offsets=offsets, world_size=world, capacity=capacity,
                    tokens=np.asarray(tokens, np.int64).reshape(steps, world),
                    costs=np.asarray(costs, np.int64).reshape(steps, world),
                    dropped=np.setdiff1d(stream, placed))


# -- the benchmark ---------------------------------------------------------------------------------

def quality(plan: PackPlan) -> dict:
    """The plan's stats plus the worst step's cost balance and the mean token balance."""
    out = plan.stats()
    costs, tokens = plan.costs.astype(np.float64), plan.tokens.astype(np.float64)
    ok = costs.mean(axis=1) > 0
    step_balance = costs.max(axis=1)[ok] / costs.mean(axis=1)[ok]
    out["worst_imbalance"] = round(float(step_balance.max()), 6) if ok.any() else 1.0
    out["token_imbalance"] = (round(float((tokens.max(axis=1) / tokens.mean(axis=1)).mean()), 6)
                              if plan.num_steps else 1.0)
    return out


def timed(make, repeats: int):
    """(plan, median wall seconds, median CPU seconds) of `repeats` calls of make()."""
    walls, cpus, plan = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        plan = make()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return plan, float(np.median(walls)), float(np.median(cpus))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--world", default="1,8")
    parser.add_argument("--capacity", default="4096,16384")
    parser.add_argument("--repeats", type=int, default=3, help="plans per setting (median time)")
    parser.add_argument("--hrm-text", action="store_true",
                        help="also plan with the reimplementation of HRM-Text's planner (pure "
                             "Python: tens of seconds per million samples)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    p, c = lengths(args.samples)
    load_before = os.getloadavg()
    print(f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"{os.cpu_count()} cores")
    records = []
    print(f"| planner | samples | ranks | capacity | wall s | CPU s (median of {args.repeats}) | "
          "efficiency | balance | worst step | token balance | dropped |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.world.split(",")):
        for capacity in (int(x) for x in args.capacity.split(",")):
            keep = p + c <= capacity
            pk, ck = p[keep], c[keep]
            runs = [("prefixlm", lambda: MultipackSampler(pk, ck, capacity,
                                                          world_size=world).plan(0))]
            if args.hrm_text:
                stream = MultipackSampler(pk, ck, capacity, world_size=world).permutation(0)
                runs.append(("HRM-Text (reimplemented)",
                             lambda: hrm_text_plan(pk, ck, capacity, world, stream)))
            for name, make in runs:
                plan, wall, cpu = timed(make, args.repeats)
                q = quality(plan)
                records.append(dict(q, planner=name, seconds=wall, cpu_seconds=cpu, world=world))
                print(f"| {name} | {len(pk)} | {world} | {capacity} | {wall:.2f} | {cpu:.2f} | "
                      f"{q['efficiency']:.4f} | {q['imbalance']:.3f} | "
                      f"{q['worst_imbalance']:.3f} | {q['token_imbalance']:.4f} | "
                      f"{q['dropped']} |", flush=True)
    load_after = os.getloadavg()
    if args.json:
        machine = dict(python=sys.version.split()[0], numpy=np.__version__,
                       cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                       load_average_before=load_before, load_average_after=load_after)
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine, argv=sys.argv[1:], records=records), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
