"""Host-side cost of the attention op's per-call bookkeeping (no GPU needed).

Builds spec case A's batch (seed 1, capacity 65536: 42 samples in 65536 slots) and times, per
call, what every op call does on the host before launching kernels: the batch summary
(`BatchMeta.from_op_args`), the Triton tile schedule lookup, and the short-sample check of the
Triton backward. A model calls the op once per layer in the forward and once in the backward, so
these costs repeat 2 x layers times per step.

    python bench/host_overhead.py
"""

import time

import torch

from prefixlm.attention.seqinfo import BatchMeta, SeqInfo
from prefixlm.bench.spec import spec_lengths


def spec_case_a():
    return SeqInfo.from_lengths(*spec_lengths(65536), capacity=65536)


def per_call_us(fn, calls=200):
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    info = spec_case_a()
    meta = BatchMeta.from_info(info)
    rows = [("BatchMeta.from_op_args", per_call_us(lambda: BatchMeta.from_info(info)))]
    try:
        from prefixlm.attention.backends import triton_kernels as kernels
    except ImportError:
        kernels = None
    if kernels is not None:
        cpu = torch.device("cpu")
        rows.append(("triton tile schedule (cached)",
                     per_call_us(lambda: kernels._schedule(meta, 128, 128, False, cpu))))
        rows.append(("triton short-sample D check", per_call_us(
            lambda: kernels._exact_delta_of_short_samples(None, None, None, None, None, meta, 1.0))))
    print(f"case A: {info.num_samples} samples in {info.slots} slots")
    for name, us in rows:
        print(f"  {name:<32} {us:8.1f} us per call")


if __name__ == "__main__":
    main()
