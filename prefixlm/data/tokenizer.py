"""Tokenizers for prepare-sft and the loader: the built-in byte tokenizer and HuggingFace `tokenizers`.

Rendering (the one place it is defined; prepare-sft writes exactly this):

    prefix   = [inst_begin] [condition tokens]  encode(instruction)  [inst_end]
    response = encode(response) [eoa]

`inst_begin` / `inst_end` may be disabled (set to None); `eoa` and `pad` are required. A chat row's
instruction text is rendered by `rows.render_chat`.

The byte tokenizer maps UTF-8 bytes to ids 0..255 and puts the special tokens after them (pad, inst_begin,
inst_end, eoa, then one id per declared condition), so it runs with nothing to download.
A HuggingFace `tokenizer.json` is read with the optional `tokenizers` library (`pip install
prefixlm[hf]`); every special token must already be in its vocabulary, and a missing one is an error
that names it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_SPECIAL_TOKENS", "condition_token", "ByteTokenizer", "HFTokenizer",
           "load_tokenizer", "parse_special_tokens"]

SPECIAL_ROLES = ("inst_begin", "inst_end", "eoa", "pad")
REQUIRED_ROLES = ("eoa", "pad")
DEFAULT_SPECIAL_TOKENS = {
    "inst_begin": "<|inst|>",
    "inst_end": "<|/inst|>",
    "eoa": "<|eoa|>",
    "pad": "<|pad|>",
}
TOKENIZER_FILE = "tokenizer.json"
BYTE_FORMAT = "prefixlm-byte-tokenizer"


def condition_token(name: str) -> str:
    """Default token string of condition `name`."""
    return f"<|cond:{name}|>"


def parse_special_tokens(items: list[str] | None) -> dict[str, str | None]:
    """`["eoa=</s>", "inst_begin="]` -> `{"eoa": "</s>", "inst_begin": None}` (CLI helper)."""
    out: dict[str, str | None] = {}
    for item in items or []:
        role, sep, token = item.partition("=")
        if not sep:
            raise ValueError(f"--special-token {item!r}: expected ROLE=TOKEN with ROLE one of "
                             f"{', '.join(SPECIAL_ROLES)}")
        out[role.strip()] = token if token else None
    return out


def _resolve_specials(special_tokens: dict | None) -> dict[str, str | None]:
    specials = dict(DEFAULT_SPECIAL_TOKENS)
    for role, token in (special_tokens or {}).items():
        if role not in SPECIAL_ROLES:
            raise ValueError(f"unknown special token role {role!r}; expected one of "
                             f"{', '.join(SPECIAL_ROLES)}")
        if token is None and role in REQUIRED_ROLES:
            raise ValueError(f"special token {role!r} is required and cannot be disabled")
        if token is not None and not isinstance(token, str):
            raise ValueError(f"special token {role!r} must be a string, got {type(token).__name__}")
        specials[role] = token
    return specials


def _resolve_conditions(conditions) -> dict[str, str]:
    if conditions is None:
        return {}
    if isinstance(conditions, dict):
        items = list(conditions.items())
    else:
        items = [(name, condition_token(name)) for name in conditions]
    out = {}
    for name, token in items:
        if not isinstance(name, str) or not name:
            raise ValueError(f"condition names must be non-empty strings, got {name!r}")
        if not isinstance(token, str) or not token:
            raise ValueError(f"condition {name!r}: token must be a non-empty string, got {token!r}")
        out[name] = token
    return out


class _Base:
    """Shared rendering; subclasses set ids and implement `_encode_many` / `decode`."""

    kind: str
    vocab_size: int
    pad_id: int
    eoa_id: int
    inst_begin_id: int | None
    inst_end_id: int | None
    condition_ids: dict[str, int]
    special_tokens: dict[str, str | None]
    conditions: dict[str, str]

    def encode(self, text: str) -> list[int]:
        flat, _ = self._encode_many([text])
        return flat.tolist()

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode many texts at once: (all ids concatenated as int32, per-text lengths as int64)."""
        return self._encode_many(texts)

    def prefix_head(self, condition: str | None = None) -> list[int]:
        """Marker ids before the instruction text: inst_begin, then one token per name of the
        comma-separated `condition`, in order ("synth,cot" is two tokens, as HRM-Text and
        data_io render it); None or "" adds none."""
        head = [] if self.inst_begin_id is None else [self.inst_begin_id]
        for name in (condition or "").split(","):
            name = name.strip()
            if not name and not condition:
                continue
            if name not in self.condition_ids:
                known = ", ".join(sorted(self.condition_ids)) or "none declared"
                raise ValueError(f"unknown condition {name!r} (known: {known}); declare it "
                                 f"with --conditions")
            head.append(self.condition_ids[name])
        return head

    def prefix_tail(self) -> list[int]:
        return [] if self.inst_end_id is None else [self.inst_end_id]

    def encode_prefix(self, instruction: str, condition: str | None = None) -> list[int]:
        return self.prefix_head(condition) + self.encode(instruction) + self.prefix_tail()

    def encode_response(self, response: str) -> list[int]:
        return self.encode(response) + [self.eoa_id]

    def special_ids(self) -> dict[str, int | None]:
        return {"inst_begin": self.inst_begin_id, "inst_end": self.inst_end_id,
                "eoa": self.eoa_id, "pad": self.pad_id}

    def info(self) -> dict:
        """What metadata.json stores under `tokenizer_info` (enough to rebuild this tokenizer)."""
        return {"kind": self.kind, "vocab_size": int(self.vocab_size),
                "special_tokens": dict(self.special_tokens), "special_ids": self.special_ids(),
                "conditions": dict(self.conditions),
                "condition_ids": {k: int(v) for k, v in self.condition_ids.items()}}

    def token_name(self, token_id: int) -> str:
        """Readable form of one id (special tokens by name), for `inspect`."""
        return self.decode([token_id])


class ByteTokenizer(_Base):
    """UTF-8 bytes (ids 0..255) + special tokens; needs no files and no extra packages."""

    kind = "byte"

    def __init__(self, special_tokens: dict | None = None, conditions=None):
        self.special_tokens = _resolve_specials(special_tokens)
        self.conditions = _resolve_conditions(conditions)
        next_id = 256
        ids = {}
        for role in ("pad", "inst_begin", "inst_end", "eoa"):
            if self.special_tokens[role] is None:
                ids[role] = None
            else:
                ids[role] = next_id
                next_id += 1
        self.pad_id, self.eoa_id = ids["pad"], ids["eoa"]
        self.inst_begin_id, self.inst_end_id = ids["inst_begin"], ids["inst_end"]
        self.condition_ids = {}
        for name in self.conditions:
            self.condition_ids[name] = next_id
            next_id += 1
        self.vocab_size = next_id
        self._names = {i: tok for role, tok in self.special_tokens.items()
                       if (i := ids[role]) is not None}
        self._names.update({self.condition_ids[n]: t for n, t in self.conditions.items()})

    def _encode_many(self, texts):
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int32)
        return flat, lengths

    def decode(self, ids) -> str:
        out, buf = [], bytearray()
        for i in (int(x) for x in ids):
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            out.append(self._names.get(i, f"<|unk:{i}|>"))
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_name(self, token_id: int) -> str:
        token_id = int(token_id)
        if 32 <= token_id < 127:
            return chr(token_id)
        if 0 <= token_id < 256:
            return f"<0x{token_id:02X}>"
        return self._names.get(token_id, f"<|unk:{token_id}|>")

    def save(self, directory: str | os.PathLike) -> None:
        payload = {"format": BYTE_FORMAT, "version": 1, "special_tokens": self.special_tokens,
                   "conditions": self.conditions}
        Path(directory, TOKENIZER_FILE).write_text(json.dumps(payload, indent=1) + "\n")


def _import_tokenizers():
    try:
        import tokenizers  # noqa: F401  (optional dependency)
    except ImportError as exc:
        raise ImportError("reading a HuggingFace tokenizer.json needs the `tokenizers` package: "
                          "pip install 'prefixlm[hf]' (or use --tokenizer byte)") from exc
    return tokenizers


class HFTokenizer(_Base):
    """A HuggingFace `tokenizer.json` (byte-level BPE, WordPiece, ...) through `tokenizers`."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike, special_tokens: dict | None = None,
                 conditions=None):
        tokenizers = _import_tokenizers()
        self.path = Path(path)
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the Rust error says what is wrong with the file
            raise ValueError(f"{self.path}: not a readable tokenizer.json: {exc}") from exc
        self.special_tokens = _resolve_specials(special_tokens)
        self.conditions = _resolve_conditions(conditions)

        def lookup(what: str, token: str) -> int:
            token_id = self._tok.token_to_id(token)
            if token_id is None:
                raise ValueError(
                    f"{self.path}: {what} {token!r} is not in the tokenizer's vocabulary; add it as "
                    f"a special token or choose an existing one (--special-token ROLE=TOKEN, "
                    f"--condition-token NAME=TOKEN)")
            return int(token_id)

        ids = {role: (None if tok is None else lookup(f"special token {role}", tok))
               for role, tok in self.special_tokens.items()}
        self.pad_id, self.eoa_id = ids["pad"], ids["eoa"]
        self.inst_begin_id, self.inst_end_id = ids["inst_begin"], ids["inst_end"]
        self.condition_ids = {name: lookup(f"condition token for {name!r}", tok)
                              for name, tok in self.conditions.items()}
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        # encode_batch_fast (tokenizers >= 0.20) skips offsets, which we never use.
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _encode_many(self, texts):
        encodings = self._batch(list(texts), add_special_tokens=False)
        lengths = np.fromiter((len(e) for e in encodings), np.int64, count=len(encodings))
        flat = np.fromiter(itertools.chain.from_iterable(e.ids for e in encodings), np.int32,
                           count=int(lengths.sum()))
        return flat, lengths

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_name(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        return token if token is not None else f"<|unk:{token_id}|>"

    def save(self, directory: str | os.PathLike) -> None:
        shutil.copyfile(self.path, Path(directory, TOKENIZER_FILE))


def _from_dataset(directory: Path):
    meta_path = directory / "metadata.json"
    try:
        info = json.loads(meta_path.read_text()).get("tokenizer_info", {})
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path}: cannot read the dataset metadata: {exc}") from exc
    kind = info.get("kind")
    if kind == "byte":
        return ByteTokenizer(info.get("special_tokens"), info.get("conditions"))
    tok_file = directory / TOKENIZER_FILE
    if not tok_file.is_file():
        raise FileNotFoundError(f"{directory}: the dataset has no {TOKENIZER_FILE}")
    if kind == "hf":
        return HFTokenizer(tok_file, info.get("special_tokens"), info.get("conditions"))
    # A dataset from another writer (e.g. HRM-Text data_io): the tokenizer file decides.
    return load_tokenizer(str(tok_file))


def load_tokenizer(spec, special_tokens: dict | None = None, conditions=None):
    """`"byte"`, a path to a `tokenizer.json`, or a prepared dataset directory.

    special_tokens: role -> token string overrides (roles inst_begin, inst_end, eoa, pad; None
      disables inst_begin / inst_end). conditions: names (default tokens `<|cond:NAME|>`) or a dict
      name -> token. Both are ignored for a dataset directory, which records its own.
    """
    if isinstance(spec, _Base):
        return spec
    if spec == "byte":
        return ByteTokenizer(special_tokens, conditions)
    path = Path(spec)
    if path.is_dir():
        if (path / "metadata.json").is_file():
            return _from_dataset(path)
        if (path / TOKENIZER_FILE).is_file():
            path = path / TOKENIZER_FILE
        else:
            raise FileNotFoundError(f"{path}: neither a prepared dataset nor a folder with "
                                    f"{TOKENIZER_FILE}")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {spec!r}: no such file; expected 'byte', a "
                                f"tokenizer.json or a prepared dataset directory")
    try:
        with open(path, "rb") as f:
            head = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(head, dict) and head.get("format") == BYTE_FORMAT:
        return ByteTokenizer(special_tokens if special_tokens else head.get("special_tokens"),
                             conditions if conditions else head.get("conditions"))
    return HFTokenizer(path, special_tokens, conditions)
