"""Optional dependencies: import them by name, or fail with the pip extra that brings them."""

from __future__ import annotations

import importlib

__all__ = ["MissingExtra", "require"]


class MissingExtra(ImportError):
    """An optional dependency is missing; the message names the `pip install` that adds it."""


def require(module: str, extra: str, purpose: str):
    """The imported `module`, or MissingExtra saying that `purpose` needs `prefixlm[extra]`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtra(f"{purpose} needs the `{module.split('.')[0]}` package: "
                           f"pip install 'prefixlm[{extra}]'") from exc
