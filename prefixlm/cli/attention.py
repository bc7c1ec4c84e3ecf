"""`prefixlm verify`: check a backend against the reference over the edge-case matrix."""

from __future__ import annotations

import time

__all__ = ["register"]


def _verify(args) -> int:
    import torch

    from ..attention.verify import DTYPES, verify_matrix

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"prefixlm verify: backend={args.backend} device={device} dtype={args.dtype} "
          f"seed={args.seed} max_len={args.max_len} grad={not args.no_grad} "
          f"layout={args.layout} nan_padding={args.nan_padding}")
    print(f"{'kind':<17} {'heads':<5} {'D':>4} {'layout':<8} {'tokens':>7} {'tensor':<4} "
          f"{'max err':>9} {'bound':>9} {'mean err':>9} {'bound':>9}  result")
    start = time.perf_counter()
    passed = failed = 0
    for entry in verify_matrix(args.backend, device=device, dtype=DTYPES[args.dtype],
                               seed=args.seed, max_len=args.max_len, heads=args.heads,
                               head_dims=args.head_dims, grad=not args.no_grad,
                               deterministic=args.deterministic, layout=args.layout,
                               nan_padding=args.nan_padding):
        where = (f"{entry.kind:<17} {entry.heads:<5} {entry.head_dim:>4} {entry.layout:<8} "
                 f"{entry.tokens:>7}")
        if entry.skipped:
            print(f"{where} skipped: {entry.skipped}")
            continue
        for s in entry.stats:
            passed += s.ok
            failed += not s.ok
            verdict = "pass" if s.ok else (
                "FAIL" + ("" if s.finite else " (non-finite)")
                + ("" if s.padding_zero else " (padding not zero)"))
            print(f"{where} {s.name:<4} {s.max_err:>9.2e} {s.max_bound:>9.2e} {s.mean_err:>9.2e} "
                  f"{s.mean_bound:>9.2e}  {verdict}")
    print(f"{passed} passed, {failed} failed ({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


def register(subparsers) -> None:
    from ..attention.registry import backend_names
    from ..attention.verify import DTYPES, HEADS, LAYOUTS

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
                   help="q/k/v as separate tensors, as the model's views of its fused gate|q|k|v "
                        "projection, as views with rows of no 16-byte multiple, or cycling "
                        "through the three")
    p.add_argument("--nan-padding", action="store_true",
                   help="fill the padding rows of q, k, v and dout with NaN (must not leak into "
                        "real rows; flex cannot promise it)")
    p.set_defaults(func=_verify)
