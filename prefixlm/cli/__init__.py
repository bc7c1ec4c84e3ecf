"""`prefixlm` command line: the only place that parses arguments. One module per command group
(`attention`: verify; `data`: prepare-sft, prepare, inspect; `train`: train, generate, eval, export;
`evaluate`: eval --tasks, lm-eval; `bench`: bench attention, bench train), each importing the
library downward, and one mapping from exceptions to a one-line error."""

from __future__ import annotations

import argparse
import errno
import signal
import sys

from . import attention, bench, data, evaluate, train

# Each has `register(subparsers)`, which adds its parsers and sets `func(args) -> int` on them.
COMMAND_GROUPS = (attention, bench, data, evaluate, train)
# Commands whose arguments all belong to another tool's command line, passed on verbatim.
PASSTHROUGH = {"lm-eval": "lm_eval_args"}
ERROR_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixlm", description="Train language models on packed PrefixLM sequences.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    for sub in _all_subparsers(parser):
        if "--debug" not in sub._option_string_actions:
            sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show tracebacks of errors")
    return parser


def _all_subparsers(parser: argparse.ArgumentParser):
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for sub in action.choices.values():
            yield sub
            yield from _all_subparsers(sub)


def error_message(exc: BaseException) -> str | None:
    """One line for an error the user can act on, or None for a bug (which keeps its traceback)."""
    if isinstance(exc, ImportError):
        text = str(exc)
        if "pip install" not in text:
            text += " (install the matching extra, e.g. pip install 'prefixlm[hf]'; see README)"
        return text
    if isinstance(exc, OSError):
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
        reason = exc.strerror or str(exc)
        hint = {
            errno.ENOSPC: "free some space or write elsewhere",
            errno.EDQUOT: "free some space or write elsewhere",
            errno.EACCES: "check the path's owner and mode, or choose another path",
            errno.EPERM: "check the path's owner, mode and attributes, or choose another path",
            errno.EROFS: "the file system is read-only: choose another path",
            errno.ENOTDIR: "a part of the path is a file, not a directory",
            errno.EISDIR: "the path is a directory where a file is expected",
            errno.ENOENT: "check the path",
        }.get(exc.errno)
        return f"{reason}: {where}" + (f" ({hint})" if hint else "") if where else \
            f"{reason}" + (f" ({hint})" if hint else "")
    if isinstance(exc, (ValueError, NotImplementedError)):
        return str(exc) or type(exc).__name__
    return None


def _split_passthrough(argv: list[str]) -> tuple[list[str], tuple[str, list[str]] | None]:
    """(prefixlm's own arguments, (attribute, verbatim rest)) for a PASSTHROUGH command."""
    for i, item in enumerate(argv):
        if not item.startswith("-"):
            if item in PASSTHROUGH:
                return argv[:i + 1], (PASSTHROUGH[item], argv[i + 1:])
            break
    return argv, None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv, passthrough = _split_passthrough(sys.argv[1:] if argv is None else list(argv))
    args, extra = parser.parse_known_args(argv)
    if passthrough is not None:
        setattr(args, *passthrough)
    # argparse stops filling a positional list at the first option, so `train a=1 --resume b=2`
    # would leave `b=2` over: KEY=VALUE overrides may stand on either side of an option.
    if extra and isinstance(getattr(args, "overrides", None), list) and all(
            "=" in item and not item.startswith("-") for item in extra):
        args.overrides.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return ERROR_EXIT
    command = " ".join(filter(None, (args.command, getattr(args, "bench_command", None))))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as exc:
        # A second SIGTERM/SIGINT during training (train.signals.Interrupted) names its signal.
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"prefixlm {command}: interrupted ({signal.Signals(signum).name})", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 -- mapped to one line below, or re-raised
        message = None if getattr(args, "debug", False) else error_message(exc)
        if message is None:
            raise
        print(f"prefixlm {command}: error: {message}", file=sys.stderr)
        return ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
