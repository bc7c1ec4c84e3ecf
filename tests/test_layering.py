"""The package's layers import downward only, and only `prefixlm.cli` parses arguments.

Layers, lowest first: the base modules (fsutil, devices, extras) < attention < data < model <
evaluate < train < bench, hf and lmeval (interop) < cli, and the package root (`prefixlm`, the
public facade, and `python -m prefixlm`) above all. A module may import its own layer or a lower one; every import
counts, top-level or inside a function.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "prefixlm"
LAYERS = {"fsutil": 0, "devices": 0, "extras": 0, "attention": 1, "data": 2, "model": 3,
          "evaluate": 4, "train": 5, "bench": 6, "hf": 6, "lmeval": 6, "cli": 7, "__main__": 8}
FACADE = 8  # the package root


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, module: str, is_package: bool):
    """Every module named by an import statement in `tree`, as an absolute dotted name."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            yield node.lineno, target
            for alias in node.names:  # `from . import data` names a module too
                yield node.lineno, f"{target}.{alias.name}"


def _layer(name: str, root_name: str):
    parts = name.split(".")
    if parts[0] != root_name:
        return None
    if len(parts) == 1:
        return FACADE
    return LAYERS.get(parts[1])


def violations(root: Path) -> list[str]:
    """'file:line: message' for every upward import and every argparse import outside cli/."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        own = _layer(module, root.name)
        tree = ast.parse(path.read_text(), str(path))
        in_cli = module.split(".")[1:2] == ["cli"]
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            where = f"{path.relative_to(root.parent)}:{line}"
            if target.split(".")[0] == "argparse" and not in_cli:
                found.append(f"{where}: imports argparse outside {root.name}/cli")
            theirs = _layer(target, root.name)
            if own is not None and theirs is not None and theirs > own:
                found.append(f"{where}: {module} (layer {own}) imports {target} (layer {theirs})")
    return found


def test_the_package_imports_downward_only():
    """Guards the architecture: rows -> dataset -> sampler -> loader -> model -> attention, no
    layer reaching up (a kernel importing the trainer's helpers, a data module importing the
    CLI), no argument parsing outside the CLI."""
    assert violations(PACKAGE) == []


def test_the_check_finds_planted_upward_imports(tmp_path):
    """The check itself can fail: a planted upward import (attention -> train), a relative one
    (data -> ..cli) and argparse in a library module are each reported with file and line."""
    root = tmp_path / "prefixlm"
    for folder in ("attention", "data", "train", "cli"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "attention" / "op.py").write_text("import os\nfrom prefixlm.train import trainer\n")
    (root / "data" / "loader.py").write_text("def f():\n    from ..cli import main\n")
    (root / "data" / "rows.py").write_text("import argparse\nfrom ..attention import op\n")
    (root / "cli" / "main.py").write_text("import argparse\nfrom ..train import trainer\n")
    assert violations(root) == [
        "prefixlm/attention/op.py:2: prefixlm.attention.op (layer 1) imports prefixlm.train "
        "(layer 5)",
        "prefixlm/attention/op.py:2: prefixlm.attention.op (layer 1) imports "
        "prefixlm.train.trainer (layer 5)",
        "prefixlm/data/loader.py:2: prefixlm.data.loader (layer 2) imports prefixlm.cli (layer 7)",
        "prefixlm/data/loader.py:2: prefixlm.data.loader (layer 2) imports prefixlm.cli.main "
        "(layer 7)",
        "prefixlm/data/rows.py:1: imports argparse outside prefixlm/cli",
    ]
