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
    args = parser.parse_args(argv)
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
