"""`prefixlm prepare-sft`, `prefixlm prepare --mixture` and `prefixlm inspect`."""

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


def _marker_options(args) -> dict:
    """The tokenizer options of --hrm-text-tokens, --special-token, --conditions, ..."""
    from ..data.tokenizer import (AUTO, HRM_TEXT_CONDITIONS, HRM_TEXT_SPECIAL_TOKENS,
                                  condition_token, parse_special_tokens)

    special_tokens = dict(HRM_TEXT_SPECIAL_TOKENS) if args.hrm_text_tokens else {}
    special_tokens.update(parse_special_tokens(args.special_token))
    conditions = dict(HRM_TEXT_CONDITIONS) if args.hrm_text_tokens else None
    if args.conditions or args.condition_token:
        conditions = conditions or {}
        names = [c for c in (args.conditions or "").split(",") if c]
        conditions.update({name: condition_token(name) for name in names})
        conditions.update(_key_values(args.condition_token, "--condition-token"))
    if args.no_default_condition and args.default_condition:
        raise ValueError("--default-condition and --no-default-condition exclude each other")
    default = None if args.no_default_condition else (args.default_condition or AUTO)
    return {"special_tokens": special_tokens or None, "conditions": conditions,
            "default_condition": default,
            "parse_special_tokens": True if args.parse_special_tokens else None}


def _prepare_sft(args) -> int:
    from ..data.prepare import prepare_sft

    report = prepare_sft(args.input, args.output, tokenizer=args.tokenizer,
                         context_size=args.context_size, epochs=args.epochs, seed=args.seed,
                         truncation=args.truncation, min_response_tokens=args.min_response_tokens,
                         min_prefix_tokens=args.min_prefix_tokens,
                         skip_invalid=args.skip_invalid, progress=not args.quiet,
                         overwrite=args.overwrite, log=(lambda m: None) if args.quiet else print,
                         chat_template=args.chat_template, turns=args.turns,
                         **_marker_options(args))
    return 0 if report["samples"] else 1


def _prepare(args) -> int:
    from ..data.mixture import prepare_mixture

    prepare_mixture(args.mixture, args.output, epochs=args.epochs, tokenizer=args.tokenizer,
                    context_size=args.context_size, seed=args.seed, workers=args.workers,
                    chunk_mb=args.chunk_mb, cache_dir=args.cache_dir,
                    chat_template=args.chat_template, turns=args.turns,
                    skip_invalid=True if args.skip_invalid else None,
                    overwrite=args.overwrite, progress=not args.quiet,
                    log=(lambda m: None) if args.quiet else print, **_marker_options(args))
    return 0


def _inspect(args) -> int:
    from ..data.dataset import V1Dataset
    from ..data.inspect import describe_tokenizer, format_summary, render_batch, summarize

    dataset = V1Dataset(args.dir)
    try:
        tokenizer = dataset.tokenizer(args.tokenizer)
        about_tokenizer = describe_tokenizer(tokenizer)
    except (ValueError, OSError, ImportError) as exc:
        if args.tokenizer:
            raise
        tokenizer, about_tokenizer = None, str(exc)
    # Every index and every token id is checked: a bad one is an error here, not in training.
    vocab = dataset.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    dataset.validate(vocab, progress=True)
    summary = summarize(dataset, args.epoch, args.min_causal)
    summary["tokenizer"] = about_tokenizer
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
    if args.batch is not None:
        from ..data.loader import PackedLoader
        capacity = args.capacity or dataset.max_seq_len - 1
        loader = PackedLoader(dataset, capacity, rank=args.rank, world_size=args.world_size,
                              seed=args.seed, prefetch=0, min_causal=args.min_causal)
        steps = loader.steps_in_epoch(args.epoch)
        if not 0 <= args.batch < steps:
            raise ValueError(f"--batch {args.batch}: epoch {args.epoch} has {steps} batches "
                             f"at capacity {capacity}")
        print()
        print(render_batch(loader, args.epoch, args.batch, tokenizer, args.max_tokens))
    return 0


def _chat_arguments(p, template_default, turns_default) -> None:
    p.add_argument("--chat-template", choices=("plain", "tokenizer"), default=template_default,
                   help="chat rows: 'plain' renders 'role: content' turns (the default), "
                        "'tokenizer' the tokenizer folder's own chat template (needs "
                        "transformers; no markers or conditions around it)")
    p.add_argument("--turns", choices=("last", "all"), default=turns_default,
                   help="chat rows: one sample for the last assistant turn (the default) or one "
                        "per assistant turn, its prefix everything before it")


def _marker_arguments(p) -> None:
    p.add_argument("--special-token", action="append", metavar="ROLE=TOKEN",
                   help="override a special token (roles inst_begin, inst_end, eoa, pad; "
                        "inst_begin= or inst_end= disables that marker)")
    p.add_argument("--conditions", metavar="A,B", help="condition names (tokens <|cond:NAME|>)")
    p.add_argument("--condition-token", action="append", metavar="NAME=TOKEN",
                   help="condition with an explicit token")
    p.add_argument("--hrm-text-tokens", action="store_true",
                   help="HRM-Text's and data_io's default markers and conditions: inst_begin "
                        "<|im_start|>, inst_end <|im_end|>, eoa <|box_end|>, no pad token (id 0), "
                        "conditions direct, cot, noisy, synth (--special-token and "
                        "--condition-token change single ones)")
    p.add_argument("--default-condition", metavar="NAME",
                   help="condition of rows without one (default: 'direct' when declared, what "
                        "HRM-Text's inference prepends; else none)")
    p.add_argument("--no-default-condition", action="store_true",
                   help="rows without a condition get no condition token")
    p.add_argument("--parse-special-tokens", action="store_true",
                   help="special-token strings inside the text become their ids (default: plain "
                        "text, as data_io encodes them; the report counts such rows)")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare-sft", help="tokenize SFT JSONL into a V1 dataset",
        description="Tokenize instruction/response (or chat) JSONL into an HRM-Text V1 dataset.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="FILE", help="JSONL files")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--tokenizer", default="byte",
                   help="'byte', a tokenizer.json, or a folder: a prepared dataset (ours, "
                        "HRM-Text's or data_io's) or a tokenizer folder with tokenizer_info.json, "
                        "whose markers and conditions are then used")
    p.add_argument("--context-size", type=int, required=True, metavar="N",
                   help="inst_len + resp_len <= N (the model reads N - 1 tokens per sample)")
    p.add_argument("--epochs", type=int, default=1, help="epoch_k folders, each its own order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", choices=("drop", "truncate-prefix", "truncate-response"),
                   default="drop")
    p.add_argument("--min-response-tokens", type=int, default=1, metavar="K",
                   help="drop samples with fewer causal tokens (causal_len = resp_len - 1)")
    p.add_argument("--min-prefix-tokens", type=int, default=1, metavar="K",
                   help="truncate-prefix keeps at least K instruction tokens, else drops the row")
    p.add_argument("--skip-invalid", action="store_true", help="count and skip bad rows")
    _chat_arguments(p, "plain", "last")
    _marker_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset prefixlm wrote (nothing else is replaced)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_prepare_sft)

    m = subparsers.add_parser(
        "prepare", help="tokenize a mixture of sources into a V1 dataset (--mixture mix.yaml)",
        description="Tokenize the sources of a mixture file (JSONL, Parquet, data_io tokenized "
                    "folders; data_io's prefix_config.yaml rules or per-source weights) into one "
                    "HRM-Text V1 dataset whose epochs each draw their own sample of every source, "
                    "with coverage.json / coverage.md. Sources are tokenized once and cached by "
                    "content. Options given here win over the mixture file's keys.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--mixture", required=True, metavar="YAML", help="the mixture file")
    m.add_argument("--output", required=True, metavar="DIR")
    m.add_argument("--epochs", type=int, help="epoch_k folders (default: the file's epochs, 1)")
    m.add_argument("--tokenizer",
                   help="'byte', a tokenizer.json or folder (default: the file's tokenizer, else "
                        "the first data_io folder's, else byte)")
    m.add_argument("--context-size", type=int, metavar="N",
                   help="inst_len + resp_len <= N (default: the file's context_size, 4097)")
    m.add_argument("--seed", type=int, help="seed of the draws and orders (default: the file's, 0)")
    m.add_argument("--workers", type=int, metavar="N",
                   help="tokenizer processes (default: the usable cores; 1 tokenizes in this "
                        "process)")
    m.add_argument("--chunk-mb", type=float, default=8.0, metavar="MB",
                   help="text read per chunk; memory grows with chunk size x workers, not with "
                        "the corpus")
    m.add_argument("--cache-dir", metavar="DIR",
                   help="tokenized-source cache (default: the file's cache_dir, else "
                        ".prefixlm-cache beside it)")
    _chat_arguments(m, None, None)
    m.add_argument("--skip-invalid", action="store_true", help="count and skip bad rows")
    _marker_arguments(m)
    m.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset prefixlm wrote (nothing else is replaced)")
    m.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    m.set_defaults(func=_prepare)

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
    q.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json to use instead of the one the dataset names")
    q.add_argument("--min-causal", type=int, default=1, metavar="K",
                   help="count (and, with --batch, skip) samples with fewer causal tokens, as "
                        "training does with min_causal")
    q.set_defaults(func=_inspect)
