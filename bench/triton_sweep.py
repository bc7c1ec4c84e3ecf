"""Time Triton kernel configs on one spec case (GPU), for tuning the tables in
`prefixlm/attention/backends/triton_kernels.py`. The first config of each list should be the table's
current entry: every other result is checked against it (max |difference| printed).

    python bench/triton_sweep.py [--case A] [--fwd "128,128,8,3,3,1,0;..."] [--bwd "..."]

A config is the comma-separated fields of `FwdConfig` / `BwdConfig` in order (booleans as 0/1).
Without --fwd/--bwd the lists below run: the current entries and what has not been measured yet
(BENCHMARKS.md lists what has).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixlm

from prefixlm.attention.backends.triton_kernels import BwdConfig, FwdConfig  # noqa: E402

DEFAULT_FWD = "128,128,8,3,3,1,0;256,128,16,3,3,1,0;256,64,16,3,3,1,0"
# 16 warps: half the accumulator registers per thread of 8 (the 8-warp dK/dV kernel spills; 64-key
# tiles, which avoid that, measured 1.5-1.9x slower: BENCHMARKS.md), and 256-row query tiles.
# The fused key-major backward (atomic_dq=1: each timed both ways, deterministic two kernels and
# fused): the table entry, Q/dO loads by TMA, dQ by pointer atomics, then the pipelining depths
# and 32-row steps that spill less or not at all (offline ptxas counts for sm90, spill stores of
# the two-kernel / fused dK/dV kernel: 64 rows 3 stages 1484 / 1864 bytes, 2 stages 764 / 916,
# 64 rows 1 stage 64 / 140, 32 rows 2 stages 192 / 192, 32 rows 1 stage 0 / 0;
# `python bench/triton_bwd_registers.py` prints them).
DEFAULT_BWD = ("128,64,8,3,128,64,8,3,1,1,0,1;128,64,8,3,128,64,8,3,1,1,1,1;"
               "128,64,8,3,128,64,8,3,1,1,0,0;128,64,8,2,128,64,8,3,1,1,0,1;"
               "128,32,8,2,128,64,8,3,1,1,0,1;128,32,8,1,128,64,8,3,1,1,0,1;"
               "128,64,8,1,128,64,8,3,1,1,0,1")

def parse_configs(text: str, kind):
    """'a,b,c;d,e,f' -> [kind(a, b, c), kind(d, e, f)], each field cast to the field's type."""
    configs = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        values = [int(v) for v in item.split(",")]
        if len(values) != len(kind._fields):
            raise ValueError(f"{kind.__name__} takes {len(kind._fields)} fields "
                             f"({', '.join(kind._fields)}), got {len(values)} in {item!r}")
        defaults = kind()
        configs.append(kind(*(type(getattr(defaults, name))(v)
                              for name, v in zip(kind._fields, values))))
    return configs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="A")
    p.add_argument("--fwd", default=DEFAULT_FWD, help="FwdConfig list ('' skips)")
    p.add_argument("--bwd", default=DEFAULT_BWD, help="BwdConfig list ('' skips)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, metavar="PATH")
    args = p.parse_args(argv)
    fwd, bwd = parse_configs(args.fwd, FwdConfig), parse_configs(args.bwd, BwdConfig)

    from prefixlm.bench.attention import sweep_configs

    rows = sweep_configs(args.case, fwd, bwd, iters=args.iters)
    print(f"\ncase {args.case}: ms, useful TFLOP/s, max |diff| to the first config")
    for kind, cfg, ms, tflops, err in rows:
        timing = f"{ms:8.3f} ms {tflops:5.0f}" if ms is not None else "  failed"
        print(f"{kind:<10} {timing}  {err}  {cfg}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([dict(kind=k, config=c._asdict(), ms=m, tflops=t, diff=e)
                       for k, c, m, t, e in rows], fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
