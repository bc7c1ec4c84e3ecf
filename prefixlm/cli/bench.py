"""`prefixlm bench attention` and `prefixlm bench train` (GPU benchmarks)."""

from __future__ import annotations

import sys

__all__ = ["register"]

# Defaults shown in --help without importing the benchmark modules (they import torch and the
# trainer); the modules check the names, and a test keeps these lists equal to theirs.
ATTENTION_CASES = "A,B,C,D,E,F,G"
ATTENTION_METHODS = "triton,cudnn,cudnn_flex,flex,sdpa_padded,fa3,fa4,fa3_causal,fa3_full"
TRAIN_BACKENDS = "triton,cudnn_flex,cudnn,flex,sdpa,fa3"
TRAIN_ARCHS = "transformer,hrm"
PEAK_TFLOPS = 989.0


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _attention(args) -> int:
    from ..bench.attention import run_attention_bench

    run_attention_bench(_names(args.cases), _names(args.backends), args.iters, args.json)
    return 0


def _train(args) -> int:
    from ..bench.train import run_train_bench
    from ..train.distributed import teardown

    try:
        records = run_train_bench(
            preset=args.preset, capacity=args.capacity, steps=args.steps, warmup=args.warmup,
            backends=_names(args.backends), archs=_names(args.archs),
            compile_=not args.no_compile, vocab=args.vocab, seed=args.seed,
            zero_causal_frac=args.zero_causal_frac, max_prefix=args.max_prefix,
            max_causal=args.max_causal, device=args.device, peak_tflops=args.peak_tflops,
            overrides=args.overrides, json_path=args.json, command=" ".join(sys.argv),
            profile=args.profile, trace_dir=args.trace)
    finally:
        teardown()
    return 0 if any(not r["error"] for r in records) else 1


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (GPU)")
    commands = bench.add_subparsers(dest="bench_command", metavar="BENCH")

    p = commands.add_parser(
        "attention", help="PrefixLM attention backends side by side on the spec batches",
        description="Every case of the attention spec for every available method, in one "
                    "process: CUDA events, warm-up, median of --iters runs; useful TFLOP/s.")
    p.add_argument("--cases", default=ATTENTION_CASES,
                   help=f"comma-separated case names from {ATTENTION_CASES} (default: all)")
    p.add_argument("--backends", default=ATTENTION_METHODS,
                   help=f"comma-separated methods from {ATTENTION_METHODS} (default: all)")
    p.add_argument("--iters", type=int, default=30, help="timed runs per entry (>= 20)")
    p.add_argument("--json", default=None, help="write the records to this JSON file")
    p.set_defaults(func=_attention)

    p = commands.add_parser(
        "train", help="training throughput per attention backend (tokens/s, MFU, memory)",
        description="Optimizer steps of a model preset on packed PrefixLM batches drawn like "
                    "the attention spec, for each attention backend and architecture, in one "
                    "process (or under torchrun with FSDP2). Prints a table; --json writes the "
                    "records.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="train config overrides applied to every run (e.g. model.kv_heads=2)")
    p.add_argument("--preset", default="L", help="model preset (default L)")
    p.add_argument("--capacity", type=int, default=16384, help="tokens per GPU per step")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--backends", default=TRAIN_BACKENDS,
                   help="comma-separated attention backends (fa3 runs only where its backward "
                        "works)")
    p.add_argument("--archs", default=TRAIN_ARCHS, help=TRAIN_ARCHS)
    p.add_argument("--no-compile", action="store_true", help="run the blocks eagerly")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seed", type=int, default=1, help="seed of the first batch's lengths")
    p.add_argument("--zero-causal-frac", type=float, default=0.0)
    p.add_argument("--max-prefix", type=int, default=2048, help="spec: 2048 (tests: less)")
    p.add_argument("--max-causal", type=int, default=1024, help="spec: 1024 (tests: less)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
                   help="dense bf16 peak per GPU for MFU (H100/H200: 989)")
    p.add_argument("--json", default=None, metavar="PATH", help="write meta and records here")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps: device time per kernel category "
                        "(attention, matmul, ...) and the top kernels")
    p.add_argument("--trace", default=None, metavar="DIR",
                   help="with --profile: write each run's Chrome trace of the profiled steps to "
                        "DIR/ARCH_BACKEND_rankR.json.gz (chrome://tracing, Perfetto)")
    p.set_defaults(func=_train)
