"""`prefixlm` command line: one subcommand per task, each defined next to the code it drives."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define subcommands: each has `register(subparsers)`, which adds its parsers and sets
# `func(args) -> int` on them.
COMMAND_MODULES = (
    "prefixlm.attention.cli",
    "prefixlm.train.cli",
    "prefixlm.data.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixlm", description="Train language models on packed PrefixLM sequences.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


class CLIError(Exception):
    """An error the user can fix; printed without a traceback."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option, so `train a=1 --resume b=2`
    # would leave `b=2` over: KEY=VALUE overrides may stand on either side of an option.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotImplementedError) as exc:
        print(f"prefixlm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prefixlm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
