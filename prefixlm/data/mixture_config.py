"""The mixture file (`prefixlm prepare --mixture mix.yaml`) and data_io's prefix_config.yaml rules,
read and validated: a bad key or value is a one-line error naming the file, line and key.

    # mix.yaml (paths relative to this file)
    tokenizer: tok/                 # optional: 'byte', a tokenizer.json or folder (else the first
                                    # data_io folder's tokenizer, else 'byte')
    context_size: 4097              # inst_len + resp_len <= context_size (default 4097)
    long_context: truncate          # default for every source: drop | truncate | truncate-prefix
    rules: prefix_config.yaml       # data_io's rules file as it is, or a list in its schema
    sources:
      - path: data/gsm8k_train.jsonl          # a file, a glob or a folder (sources.py)
        repeat: 3
      - path: "data_clustered/**/*.parquet"
        max_per_file: 20_000                   # or max_per_epoch
      - path: data_io_tokenized/               # every tokenized file in it is a source
      - path: chats/*.jsonl
        weight: 0.5                            # instead of max_per_file / repeat
        chat_template: tokenizer               # plain | tokenizer
        turns: all                             # last | all
        columns: {messages: conversation}      # the schema's field -> the file's field

Top-level keys: TOP_KEYS. A source entry (SOURCE_KEYS) and a rule (RULE_KEYS: data_io's
`prefix`, `max_per_file`, `repeat`, `long_context`, plus `weight`, `max_per_epoch`) set how many
of a source's kept rows an epoch draws:
  max_per_file (= max_per_epoch) m, repeat r   min(m, kept) * r rows (m null: every kept row)
  weight w                                     round(w * kept) rows (0.5: half, 2.5: all twice
                                               and half again)
A source's settings come from its entry, then from the first rule whose `prefix` its name starts
with (a second matching rule is reported, as data_io warns), then from the defaults (every row
once, the top-level long_context). `weight` and max_per_file/repeat exclude each other in one
mapping; the entry's choice replaces the rule's. `long_context` is data_io's `drop` (the sample must
fit) or `truncate` (the response is cut to fit; prefixlm's truncate-response), or prefixlm's
`truncate-prefix`; a cut that would leave fewer than min_response_tokens causal tokens drops the
row (counted in the report) where data_io would write a response that is empty after the shift.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .chat import CHAT_TEMPLATES
from .rows import FIELDS, TURNS

__all__ = ["LONG_CONTEXT", "TOP_KEYS", "SOURCE_KEYS", "RULE_KEYS", "MixtureFile", "Sampling",
           "read_mixture", "read_rules", "load_yaml", "resolve_sampling"]

# data_io's names first; the value is prefixlm's truncation policy (render.py)
LONG_CONTEXT = {"drop": "drop", "truncate": "truncate-response",
                "truncate-response": "truncate-response", "truncate-prefix": "truncate-prefix"}
TOP_KEYS = ("sources", "rules", "tokenizer", "context_size", "long_context",
            "min_response_tokens", "min_prefix_tokens", "seed", "epochs", "cache_dir",
            "chat_template", "chat_template_kwargs", "turns", "skip_invalid")
SAMPLING_KEYS = ("max_per_file", "max_per_epoch", "repeat", "weight", "long_context")
SOURCE_KEYS = ("path", "name", "format", "columns", "chat_template", "turns", "skip_invalid",
               *SAMPLING_KEYS)
RULE_KEYS = ("prefix", *SAMPLING_KEYS)


class _Where:
    """Error messages naming the file, the line and the key path."""

    def __init__(self, path: Path, lines: dict):
        self.path, self.lines = path, lines

    def name(self, keys: tuple) -> str:
        out = ""
        for k in keys:
            out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
        return out

    def error(self, keys: tuple, message: str) -> ValueError:
        line = None
        for n in range(len(keys), -1, -1):
            line = self.lines.get(tuple(keys[:n]))
            if line is not None:
                break
        at = f"{self.path}:{line}" if line else str(self.path)
        return ValueError(f"{at}: {self.name(keys)}: {message}" if keys else f"{at}: {message}")


def load_yaml(path: Path):
    """(data, {key path: line}) of a YAML file; ValueError with the line for bad YAML and for a
    key given twice in one mapping (which YAML would silently resolve to the last one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it: {exc}") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ValueError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") \
            from None
    finally:
        loader.dispose()
    lines: dict = {}

    def walk(n, keys):
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                key = k.value
                if key in seen:
                    raise ValueError(f"{path}:{k.start_mark.line + 1}: "
                                     f"{_Where(path, {}).name(keys + (key,))}: given twice")
                seen.add(key)
                lines[keys + (key,)] = k.start_mark.line + 1
                walk(v, keys + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[keys + (i,)] = v.start_mark.line + 1
                walk(v, keys + (i,))

    if node is not None:
        walk(node, ())
    return data, lines


def _int(where, keys, value, low, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = f"an int >= {low}" + (" or null" if allow_none else "")
        raise where.error(keys, f"expected {what}, got {value!r}")
    return value


def _choice(where, keys, value, choices):
    if value not in choices:
        raise where.error(keys, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _mapping(where, keys, value, allowed, required=()):
    if not isinstance(value, dict):
        raise where.error(keys, f"expected a mapping of {', '.join(allowed)}, got "
                                f"{type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise where.error(keys + (key,), f"unknown key (expected one of "
                                             f"{', '.join(allowed)})")
    for key in required:
        if key not in value:
            raise where.error(keys, f"missing key {key!r}")
    return value


def _sampling(where, keys, item: dict) -> dict:
    """The sampling keys of an entry or a rule, validated; keys absent stay absent."""
    out = {}
    if "max_per_file" in item and "max_per_epoch" in item:
        raise where.error(keys + ("max_per_epoch",), "max_per_file and max_per_epoch are the "
                                                     "same setting; give one")
    for key in ("max_per_file", "max_per_epoch"):
        if key in item:
            out["max_per_epoch"] = _int(where, keys + (key,), item[key], 0, allow_none=True)
    if "repeat" in item:
        out["repeat"] = _int(where, keys + ("repeat",), item["repeat"], 0)
    if "weight" in item:
        w = item["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise where.error(keys + ("weight",), f"expected a number >= 0, got {w!r}")
        if "max_per_epoch" in out or "repeat" in out:
            clash = "max_per_file" if "max_per_file" in item else (
                "max_per_epoch" if "max_per_epoch" in item else "repeat")
            raise where.error(keys + ("weight",), f"weight and {clash} exclude each other: "
                                                  f"weight sets the rows per epoch by itself")
        out["weight"] = float(w)
    if "long_context" in item:
        out["long_context"] = LONG_CONTEXT[_choice(where, keys + ("long_context",),
                                                   item["long_context"], tuple(LONG_CONTEXT))]
    return out


@dataclass
class Sampling:
    """How many of a source's kept rows an epoch draws, and its truncation policy."""

    max_per_epoch: int | None = None
    repeat: int = 1
    weight: float | None = None
    long_context: str = "truncate-response"
    rule: str = "default"                     # where the settings came from
    also_matched: list = field(default_factory=list)  # later rules that matched too

    def rows_per_epoch(self, kept: int) -> int:
        if self.weight is not None:
            return int(round(self.weight * kept))
        return (kept if self.max_per_epoch is None else min(self.max_per_epoch, kept)) * \
            self.repeat

    def describe(self) -> str:
        if self.weight is not None:
            return f"weight {self.weight:g}"
        parts = []
        if self.max_per_epoch is not None:
            parts.append(f"max {self.max_per_epoch:,}")
        if self.repeat != 1:
            parts.append(f"repeat {self.repeat}")
        return ", ".join(parts) or "all"

    def seed_words(self, seed: int, name: str) -> list[int]:
        """Entropy of this source's draws: the seed and its name (not its place in the list, so
        adding a source leaves the others' draws alone)."""
        digest = hashlib.sha256(name.encode()).digest()
        return [int(seed)] + [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]


def _apply(target: Sampling, given: dict) -> None:
    if "weight" in given:
        target.weight, target.max_per_epoch, target.repeat = given["weight"], None, 1
    if "max_per_epoch" in given or "repeat" in given:
        target.weight = None
        target.max_per_epoch = given.get("max_per_epoch", target.max_per_epoch)
        target.repeat = given.get("repeat", target.repeat)
    if "long_context" in given:
        target.long_context = given["long_context"]


def read_rules(value, base: Path, where: _Where, keys: tuple) -> list[dict]:
    """data_io's rules: a path to a prefix_config.yaml (relative to `base`) or an inline list."""
    if isinstance(value, str):
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise where.error(keys, f"rules file {value!r} does not exist (looked at {path})")
        data, lines = load_yaml(path)
        where, keys = _Where(path, lines), ()
        value = [] if data is None else data
    if not isinstance(value, list):
        raise where.error(keys, f"expected a list of rules (prefix_config.yaml's schema) or the "
                                f"path of such a file, got {type(value).__name__}")
    rules = []
    for i, item in enumerate(value):
        _mapping(where, keys + (i,), item, RULE_KEYS, required=("prefix",))
        if not isinstance(item["prefix"], str):
            raise where.error(keys + (i, "prefix"), f"expected a string, got "
                                                    f"{item['prefix']!r}")
        rules.append({"prefix": item["prefix"], "index": i,
                      "where": f"{where.path}:{where.lines.get(keys + (i,), '?')}",
                      "given": _sampling(where, keys + (i,), item)})
    return rules


def resolve_sampling(name: str, entry: dict, rules: list[dict], default_policy: str) -> Sampling:
    """A source's Sampling: its entry, then the first rule matching its name, then defaults."""
    out = Sampling(long_context=default_policy)
    matched = [r for r in rules if name.startswith(r["prefix"])]
    if matched:
        _apply(out, matched[0]["given"])
        out.rule = f"rule {matched[0]['prefix']!r}"
        out.also_matched = [r["prefix"] for r in matched[1:]]
    if entry:
        _apply(out, entry)
        out.rule = "source entry" if not matched else f"source entry over {out.rule}"
    return out


@dataclass
class MixtureFile:
    """A validated mixture file: top-level settings and the raw entries (sources.expand_entry
    turns them into sources)."""

    path: Path
    settings: dict
    entries: list
    rules: list


def read_mixture(path) -> MixtureFile:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mixture file {path} does not exist")
    data, lines = load_yaml(path)
    where = _Where(path, lines)
    _mapping(where, (), data if data is not None else {}, TOP_KEYS, required=("sources",))
    base = path.resolve().parent
    settings = {}
    for key, low in (("context_size", 2), ("min_response_tokens", 1), ("min_prefix_tokens", 0),
                     ("seed", 0), ("epochs", 1)):
        if key in data:
            settings[key] = _int(where, (key,), data[key], low)
    for key in ("tokenizer", "cache_dir"):
        if key in data:
            if not isinstance(data[key], str) or not data[key]:
                raise where.error((key,), f"expected a path, got {data[key]!r}")
            settings[key] = data[key] if data[key] == "byte" and key == "tokenizer" else \
                str(_relative(data[key], base))
    if "long_context" in data:
        settings["long_context"] = LONG_CONTEXT[_choice(where, ("long_context",),
                                                        data["long_context"],
                                                        tuple(LONG_CONTEXT))]
    if "chat_template" in data:
        settings["chat_template"] = _choice(where, ("chat_template",), data["chat_template"],
                                            CHAT_TEMPLATES)
    if "turns" in data:
        settings["turns"] = _choice(where, ("turns",), data["turns"], TURNS)
    if "skip_invalid" in data:
        if not isinstance(data["skip_invalid"], bool):
            raise where.error(("skip_invalid",), f"expected true or false, got "
                                                 f"{data['skip_invalid']!r}")
        settings["skip_invalid"] = data["skip_invalid"]
    if "chat_template_kwargs" in data:
        if not isinstance(data["chat_template_kwargs"], dict):
            raise where.error(("chat_template_kwargs",), "expected a mapping")
        settings["chat_template_kwargs"] = data["chat_template_kwargs"]
    rules = read_rules(data["rules"], base, where, ("rules",)) if "rules" in data else []
    sources = data["sources"]
    if not isinstance(sources, list) or not sources:
        raise where.error(("sources",), "expected a non-empty list of source entries")
    entries = []
    for i, item in enumerate(sources):
        keys = ("sources", i)
        if isinstance(item, str):
            item = {"path": item}
        _mapping(where, keys, item, SOURCE_KEYS, required=("path",))
        entry = {"path": item["path"], "where": f"{path}:{lines.get(keys, '?')}: sources[{i}]",
                 "sampling": _sampling(where, keys, item)}
        if not isinstance(item["path"], str) or not item["path"]:
            raise where.error(keys + ("path",), f"expected a path or glob, got {item['path']!r}")
        if "name" in item:
            if not isinstance(item["name"], str) or not item["name"] or "/" in item["name"]:
                raise where.error(keys + ("name",), f"expected a name without '/', got "
                                                    f"{item['name']!r}")
            entry["name"] = item["name"]
        if "format" in item:
            entry["format"] = _choice(where, keys + ("format",), item["format"],
                                      ("jsonl", "parquet"))
        if "columns" in item:
            columns = _mapping(where, keys + ("columns",), item["columns"], FIELDS)
            for k, v in columns.items():
                if not isinstance(v, str) or not v:
                    raise where.error(keys + ("columns", k), f"expected a field name, got {v!r}")
            entry["columns"] = dict(columns)
        for key, choices in (("chat_template", CHAT_TEMPLATES), ("turns", TURNS)):
            if key in item:
                entry[key] = _choice(where, keys + (key,), item[key], choices)
        if "skip_invalid" in item:
            if not isinstance(item["skip_invalid"], bool):
                raise where.error(keys + ("skip_invalid",), f"expected true or false, got "
                                                            f"{item['skip_invalid']!r}")
            entry["skip_invalid"] = item["skip_invalid"]
        entries.append(entry)
    return MixtureFile(path=path, settings=settings, entries=entries, rules=rules)


def _relative(value: str, base: Path) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else base / p
