"""`prefixlm verify`: check a backend against the reference over the edge-case matrix."""

from __future__ import annotations

import importlib
import itertools
import time

import torch

from .registry import backend_names
from .testing import BATCH_KINDS, LAYOUTS, check_backend, make_case

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS = {"mha": (8, 8), "gqa3": (12, 4), "mqa": (8, 1)}


def verify(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype]
    rows, failures = [], 0
    header = (f"{'kind':<17} {'heads':<5} {'D':>4} {'layout':<8} {'tokens':>7} {'tensor':<4} "
              f"{'max err':>9} {'bound':>9} {'mean err':>9} {'bound':>9}  result")
    print(f"prefixlm verify: backend={args.backend} device={device} dtype={args.dtype} "
          f"seed={args.seed} max_len={args.max_len} grad={not args.no_grad} "
          f"layout={args.layout} nan_padding={args.nan_padding}")
    print(header)
    start = time.perf_counter()
    combos = itertools.product(BATCH_KINDS, args.heads, args.head_dims)
    for i, (kind, heads, head_dim) in enumerate(combos):
        num_q, num_kv = HEADS[heads]
        # alternate: shifted by one per batch kind, so every (heads, D) pair gets both layouts
        flip = (i + BATCH_KINDS.index(kind)) % 2
        layout = LAYOUTS[flip] if args.layout == "alternate" else args.layout
        case = make_case(kind, args.seed + i, num_q_heads=num_q, num_kv_heads=num_kv,
                         head_dim=head_dim, dtype=dtype, device=device, max_len=args.max_len,
                         layout=layout, nan_padding=args.nan_padding)
        where = f"{kind:<17} {heads:<5} {head_dim:>4} {layout:<8} {case.info.total:>7}"
        try:
            stats = check_backend(args.backend, case, grad=not args.no_grad,
                                  deterministic=args.deterministic)
        except (NotImplementedError, ValueError) as exc:
            print(f"{where} skipped: {exc}")
            continue
        for s in stats:
            failures += not s.ok
            rows.append(s)
            verdict = "pass" if s.ok else (
                "FAIL" + ("" if s.finite else " (non-finite)")
                + ("" if s.padding_zero else " (padding not zero)"))
            print(f"{where} {s.name:<4} {s.max_err:>9.2e} {s.max_bound:>9.2e} {s.mean_err:>9.2e} "
                  f"{s.mean_bound:>9.2e}  {verdict}")
    print(f"{len(rows) - failures} passed, {failures} failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failures else 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check an attention backend against the fp32 reference",
        description="Runs the edge-case matrix (every batch kind x head layout x head dim) for one "
                    "backend and prints max/mean errors against the reference with the bound of "
                    "the FlashAttention rule. Exit code 1 if anything fails.")
    p.add_argument("--backend", default="auto", choices=backend_names())
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-len", type=int, default=4096,
                   help="longest sample (edge lengths up to 1025 are always included)")
    p.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--no-grad", action="store_true", help="check the forward only")
    p.add_argument("--deterministic", action="store_true")
    p.add_argument("--layout", default="alternate", choices=[*LAYOUTS, "alternate"],
                   help="q/k/v as separate tensors, as views of one fused q/k/v/gate projection "
                        "(rows of no 16-byte multiple, the model's layout before its projection "
                        "was padded), or alternating")
    p.add_argument("--nan-padding", action="store_true",
                   help="fill the padding rows of q, k, v and dout with NaN (must not leak into "
                        "real rows; flex cannot promise it)")
    p.set_defaults(func=verify)

    from . import bench
    bench_parser = subparsers.add_parser("bench", help="benchmarks (GPU)")
    bench_commands = bench_parser.add_subparsers(dest="bench_command", metavar="BENCH")
    bench.register(bench_commands)
    # `bench train` drives the trainer, a layer above this one: imported by name, for the CLI only.
    importlib.import_module("prefixlm.train.bench").register(bench_commands)
