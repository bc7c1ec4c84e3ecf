"""Speed and quality of the multipack planner on synthetic lengths (CPU, one process).

For each (samples, ranks, capacity) it plans one epoch of lognormal prefix and causal lengths
and prints the time, packing efficiency (tokens / batch capacity), attention-cost balance (mean
over steps of max rank cost / mean rank cost; 1.0 is perfect) and dropped samples; --json writes
the records with the machine.

    python bench/planner.py [--samples 1000000] [--world 1,8] [--capacity 4096,16384]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from prefixlm.data.sampler import MultipackSampler


def lengths(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    c = np.clip(rng.lognormal(5, 1, n), 1, 4000).astype(np.int64)
    return p, c


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--world", default="1,8")
    parser.add_argument("--capacity", default="4096,16384")
    parser.add_argument("--repeats", type=int, default=3, help="plans per setting (median time)")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    p, c = lengths(args.samples)
    records = []
    print(f"| samples | ranks | capacity | seconds (median of {args.repeats}) | efficiency | "
          "balance | dropped |")
    print("|---|---|---|---|---|---|---|")
    for world in (int(w) for w in args.world.split(",")):
        for capacity in (int(x) for x in args.capacity.split(",")):
            keep = p + c <= capacity
            times, plan = [], None
            for _ in range(args.repeats):
                start = time.perf_counter()
                plan = MultipackSampler(p[keep], c[keep], capacity, world_size=world).plan(0)
                times.append(time.perf_counter() - start)
            seconds = float(np.median(times))
            stats = plan.stats()
            records.append(dict(stats, seconds=seconds, world=world))
            print(f"| {stats['samples']} | {world} | {capacity} | {seconds:.2f} | "
                  f"{stats['efficiency']:.4f} | {stats['imbalance']:.3f} | {stats['dropped']} |")
    if args.json:
        machine = dict(python=sys.version.split()[0], cpu=platform.processor() or platform.machine(),
                       cores=os.cpu_count(), load_average=os.getloadavg())
        with open(args.json, "w") as fh:
            json.dump(dict(machine=machine, records=records), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
