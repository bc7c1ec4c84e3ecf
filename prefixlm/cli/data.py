"""`prefixlm prepare-sft` and `prefixlm inspect`."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def _key_values(items, flag):
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: expected NAME=TOKEN")
        out[key] = value
    return out


def _prepare(args) -> int:
    from ..data.prepare import prepare_sft
    from ..data.tokenizer import condition_token, parse_special_tokens

    conditions = None
    if args.conditions or args.condition_token:
        names = [c for c in (args.conditions or "").split(",") if c]
        conditions = {name: condition_token(name) for name in names}
        conditions.update(_key_values(args.condition_token, "--condition-token"))
    report = prepare_sft(args.input, args.output, tokenizer=args.tokenizer,
                         context_size=args.context_size, epochs=args.epochs, seed=args.seed,
                         truncation=args.truncation, min_response_tokens=args.min_response_tokens,
                         skip_invalid=args.skip_invalid, progress=not args.quiet,
                         special_tokens=parse_special_tokens(args.special_token),
                         conditions=conditions, overwrite=args.overwrite,
                         log=(lambda m: None) if args.quiet else print)
    return 0 if report["samples"] else 1


def _inspect(args) -> int:
    from ..data.dataset import V1Dataset
    from ..data.inspect import format_summary, render_batch, summarize

    dataset = V1Dataset(args.dir)
    if args.json:
        print(json.dumps(summarize(dataset, args.epoch), indent=1))
    else:
        print(format_summary(summarize(dataset, args.epoch)))
    if args.batch is not None:
        from ..data.loader import PackedLoader
        capacity = args.capacity or dataset.max_seq_len - 1
        loader = PackedLoader(dataset, capacity, rank=args.rank, world_size=args.world_size,
                              seed=args.seed, prefetch=0)
        steps = loader.steps_in_epoch(args.epoch)
        if not 0 <= args.batch < steps:
            raise ValueError(f"--batch {args.batch}: epoch {args.epoch} has {steps} batches "
                             f"at capacity {capacity}")
        try:
            tokenizer = dataset.tokenizer()
        except (ValueError, FileNotFoundError, ImportError):
            tokenizer = None
        print()
        print(render_batch(loader, args.epoch, args.batch, tokenizer, args.max_tokens))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-sft", help="tokenize SFT JSONL into a V1 dataset",
        description="Tokenize instruction/response (or chat) JSONL into an HRM-Text V1 dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL files")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json")
    p.add_argument("--context-size", type=int, required=True, metavar="N",
                   help="inst_len + resp_len <= N (the model reads N - 1 tokens per sample)")
    p.add_argument("--epochs", type=int, default=1, help="epoch_k folders, each its own order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", choices=("drop", "truncate-prefix", "truncate-response"),
                   default="drop")
    p.add_argument("--min-response-tokens", type=int, default=1, metavar="K",
                   help="drop samples with fewer causal tokens (causal_len = resp_len - 1)")
    p.add_argument("--skip-invalid", action="store_true", help="count and skip bad rows")
    p.add_argument("--special-token", action="append", metavar="ROLE=TOKEN",
                   help="override a special token (roles inst_begin, inst_end, eoa, pad; "
                        "inst_begin= or inst_end= disables that marker)")
    p.add_argument("--conditions", metavar="A,B", help="condition names (tokens <|cond:NAME|>)")
    p.add_argument("--condition-token", action="append", metavar="NAME=TOKEN",
                   help="condition with an explicit token")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_prepare)

    q = subparsers.add_parser(
        "inspect", help="summarize a prepared dataset and show a packed batch",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("dir", metavar="DIR")
    q.add_argument("--epoch", type=int, default=0)
    q.add_argument("--batch", type=int, metavar="N", help="print packed batch N with its regions")
    q.add_argument("--capacity", type=int, help="batch capacity (default: max_seq_len - 1)")
    q.add_argument("--world-size", type=int, default=1)
    q.add_argument("--rank", type=int, default=0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--max-tokens", type=int, default=400, help="tokens shown by --batch")
    q.add_argument("--json", action="store_true", help="summary as JSON")
    q.set_defaults(func=_inspect)
