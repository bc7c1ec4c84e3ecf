"""Registers, spills and shared memory of the Triton backward kernels for sm90, without a GPU.

Compiles `_bwd_dkdv_kernel` (and the deterministic path's `_bwd_dq_kernel`) ahead of time for
GPUTarget("cuda", 90) with the specialisation a launch on the spec batches gets (pointers and
strides divisible by 16), then runs the ptxas that Triton bundles with `-v`: the same numbers
ncu reports on the card (checked: the two-kernel dK/dV entry gives 255 registers and 164,864 bytes
of shared memory here and in `bench/results/triton_sweep_ncu_h200_2026-11-28.txt`).

    python bench/triton_bwd_registers.py            # the variants of bench/triton_sweep.py
    python bench/triton_bwd_registers.py "128,32,8,1,128,64,8,3,1,1,0,1"
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefixlm.attention.backends import triton_kernels as kernels  # noqa: E402
from triton_sweep import DEFAULT_BWD, parse_configs  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
FP32_POINTERS = {"LSE", "DELTA", "DQACC"}
INT_POINTERS = {"cu_seqlens", "prefix_lens", "tiles"}


def _signature(fn, constexprs, dtype):
    """Triton signature and divisibility attributes of `fn` as a launch specialises them."""
    signature, attrs = {}, {}
    for i, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INT_POINTERS:
            signature[name], attrs[(i,)] = "*i32", [["tt.divisibility", 16]]
        elif name.isupper():
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name.startswith("stride") or name in ("rows_total", "dq_rows"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, attrs


def resources(fn, constexprs, num_warps, num_stages, dtype="bf16"):
    """(registers, spill store bytes, spill load bytes, shared memory bytes) on sm90a."""
    signature, attrs = _signature(fn, constexprs, dtype)
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(PTXAS), "-arch=sm_90a", "-v", "-o", os.devnull, str(ptx)],
                                capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return regs, int(spills.group(1)), int(spills.group(2)), compiled.metadata.shared


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("configs", nargs="?", default=DEFAULT_BWD, help="BwdConfig list, as the sweep")
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args(argv)
    print(f"{'BwdConfig (key-major kernel part)':<44} {'path':<6} {'regs':>4} "
          f"{'spill st/ld B':>14} {'smem B':>7}")
    for cfg in parse_configs(args.configs, kernels.BwdConfig):
        for fused in ((False, True) if cfg.atomic_dq else (False,)):
            constexprs = dict(HEAD_DIM=args.head_dim, BLOCK_M=cfg.kv_block_m,
                              BLOCK_N=cfg.kv_block_n, FUSED_DQ=fused, DQ_TMA=fused and cfg.dq_tma,
                              USE_TMA=cfg.use_tma, PREC="tf32", STAGES=cfg.kv_stages)
            regs, st, ld, smem = resources(kernels._bwd_dkdv_kernel, constexprs, cfg.kv_warps,
                                           cfg.kv_stages)
            name = (f"n{cfg.kv_block_n} m{cfg.kv_block_m} w{cfg.kv_warps} s{cfg.kv_stages} "
                    f"tma_loads={int(cfg.use_tma)} dq_tma={int(cfg.dq_tma)}")
            print(f"{name:<44} {'fused' if fused else 'two':<6} {regs:>4} {st:>6}/{ld:<7} "
                  f"{smem:>7}", flush=True)
    cfg = parse_configs(args.configs, kernels.BwdConfig)[0]
    constexprs = dict(HEAD_DIM=args.head_dim, BLOCK_M=cfg.q_block_m, BLOCK_N=cfg.q_block_n,
                      PREC="tf32", STAGES=cfg.q_stages)
    regs, st, ld, smem = resources(kernels._bwd_dq_kernel, constexprs, cfg.q_warps, cfg.q_stages)
    name = f"dQ kernel m{cfg.q_block_m} n{cfg.q_block_n} w{cfg.q_warps} s{cfg.q_stages}"
    print(f"{name:<44} {'two':<6} {regs:>4} {st:>6}/{ld:<7} {smem:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
