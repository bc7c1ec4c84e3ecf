"""Tokenizers for prepare-sft and the loader: the built-in byte tokenizer and HuggingFace `tokenizers`.

Rendering (the one place it is defined; prepare-sft writes exactly this, and so do HRM-Text's SFT
script and data_io's tokenizer, whose `boq`/`eoq` are our `inst_begin`/`inst_end`):

    prefix   = [inst_begin] [one token per condition tag]  encode(instruction)  [inst_end]
    response = encode(response) [eoa]

`inst_begin` / `inst_end` may be disabled (set to None); `eoa` is required. `pad` (what fills a
batch after its last sample) may be None: padding rows are never read by a real row, so id 0 serves
(HRM-Text pads with 0). A condition is one tag or comma-separated tags (`"synth,cot"`: one token
per tag, in the row's order, no trimming, as data_io renders them). A row without one gets the
tokenizer's `default_condition`: by default `direct` when the tokenizer declares it (HRM-Text's
inference and evaluation prepend `direct` unless told otherwise), else none. A chat row's
instruction text is rendered by `rows.render_chat`.

Special-token strings inside the text (`"ok<|box_end|>done"`) are plain text by default, as data_io
encodes them: the text never yields a marker id. `parse_special_tokens=True` turns them into their
ids (HRM-Text's SFT script does that). With a HuggingFace tokenizer the plain-text rule covers the
added tokens flagged `special` and our own markers; an added token flagged non-special is still
matched as one token (the `tokenizers` library's rule).

The byte tokenizer maps UTF-8 bytes to ids 0..255 and puts the special tokens after them (pad, inst_begin,
inst_end, eoa, then one id per declared condition), so it runs with nothing to download.
A HuggingFace `tokenizer.json` is read with the optional `tokenizers` library (`pip install
prefixlm[hf]`); every special token must already be in its vocabulary, and a missing one is an error
that names it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

__all__ = ["DEFAULT_SPECIAL_TOKENS", "HRM_TEXT_SPECIAL_TOKENS", "HRM_TEXT_CONDITIONS",
           "DEFAULT_CONDITION", "AUTO", "condition_token", "split_condition", "ByteTokenizer",
           "HFTokenizer", "load_tokenizer", "tokenizer_from_file", "parse_special_tokens"]

SPECIAL_ROLES = ("inst_begin", "inst_end", "eoa", "pad")
REQUIRED_ROLES = ("eoa",)
DEFAULT_SPECIAL_TOKENS = {
    "inst_begin": "<|inst|>",
    "inst_end": "<|/inst|>",
    "eoa": "<|eoa|>",
    "pad": "<|pad|>",
}
# The defaults of HRM-Text's scripts/prepare_sft_data.py and data_io's tokenizer (--boq, --eoq,
# --eoa, --conditions); they pad with id 0 and name no pad token.
HRM_TEXT_SPECIAL_TOKENS = {"inst_begin": "<|im_start|>", "inst_end": "<|im_end|>",
                           "eoa": "<|box_end|>", "pad": None}
HRM_TEXT_CONDITIONS = {"direct": "<|object_ref_start|>", "cot": "<|object_ref_end|>",
                       "noisy": "<|quad_start|>", "synth": "<|quad_end|>"}
# What HRM-Text's inference engine and evaluation prepend when given no condition.
DEFAULT_CONDITION = "direct"
AUTO = "auto"  # default_condition: DEFAULT_CONDITION when declared, else none
TOKENIZER_FILE = "tokenizer.json"
INFO_FILE = "tokenizer_info.json"
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


def split_condition(condition: str, known) -> list[str]:
    """The tags of a condition (comma-separated, no trimming, as data_io splits them), each one
    in `known`; else ValueError naming the bad tag."""
    tags = condition.split(",")
    for tag in tags:
        if tag not in known:
            names = ", ".join(sorted(known)) or "none declared"
            if len(tags) == 1 and tag:
                raise ValueError(f"unknown condition {condition!r} (declared: {names})")
            what = "an empty tag" if not tag else f"the unknown tag {tag!r}"
            raise ValueError(f"condition {condition!r} has {what} (declared: {names}; tags are "
                             f"comma-separated, without spaces)")
    return tags


def _resolve_default(default_condition, conditions: dict) -> str | None:
    if default_condition == AUTO:
        return DEFAULT_CONDITION if DEFAULT_CONDITION in conditions else None
    if default_condition is None:
        return None
    if default_condition not in conditions:
        known = ", ".join(sorted(conditions)) or "none declared"
        raise ValueError(f"default condition {default_condition!r} is not declared (declared: "
                         f"{known})")
    return default_condition


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
    default_condition: str | None
    parse_special: bool

    def _setup_rendering(self, default_condition, parse_special_tokens: bool) -> None:
        self.default_condition = _resolve_default(default_condition, self.conditions)
        self.parse_special = bool(parse_special_tokens)
        strings = set(self._special_strings())
        strings.update(t for t in self.special_tokens.values() if t)
        strings.update(self.conditions.values())
        # One alternation scans a text once (20x faster than a substring test per token).
        self._special_text = re.compile("|".join(map(re.escape, sorted(strings)))) if strings \
            else None

    def _special_strings(self) -> list[str]:
        return []

    def holds_special_text(self, text: str) -> bool:
        """Whether `text` holds a special-token string (plain text unless parse_special)."""
        return self._special_text is not None and self._special_text.search(text) is not None

    def encode(self, text: str) -> list[int]:
        flat, _ = self._encode_many([text])
        return flat.tolist()

    def encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode many texts at once: (all ids concatenated as int32, per-text lengths as int64)."""
        return self._encode_many(texts)

    def condition_tags(self, condition: str | None) -> list[str]:
        """The tags of `condition` (None: the default condition's; "": none at all), each
        declared; else ValueError."""
        if condition is None:
            condition = self.default_condition
            if condition is None:
                return []
        if condition == "":
            return []
        return split_condition(condition, self.condition_ids)

    def prefix_head(self, condition: str | None = None) -> list[int]:
        """Marker ids before the instruction text: inst_begin, then one id per condition tag."""
        head = [] if self.inst_begin_id is None else [self.inst_begin_id]
        head += [self.condition_ids[tag] for tag in self.condition_tags(condition)]
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

    def info(self, tokenizer_path: str | None = None) -> dict:
        """What metadata.json stores under `tokenizer_info`: HRM-Text's keys (`tokenizer_path`, the
        folder holding this tokenizer's tokenizer.json; `boq`, `eoq`, `eoa`, `condition_mapping`,
        `vocab_size`), read by HRM-Text's trainer, inference engine and HF converter, then ours
        (enough to rebuild this tokenizer exactly). A disabled marker is "" in HRM-Text's keys."""
        specials = self.special_tokens
        return {"tokenizer_path": tokenizer_path, "boq": specials["inst_begin"] or "",
                "eoq": specials["inst_end"] or "", "eoa": specials["eoa"],
                "condition_mapping": dict(self.conditions), "vocab_size": int(self.vocab_size),
                "kind": self.kind, "special_tokens": dict(specials),
                "special_ids": self.special_ids(), "conditions": dict(self.conditions),
                "condition_ids": {k: int(v) for k, v in self.condition_ids.items()},
                "default_condition": self.default_condition,
                "special_text": "parsed" if self.parse_special else "plain"}

    def save(self, directory: str | os.PathLike, tokenizer_path: str | None = None) -> None:
        """tokenizer.json and tokenizer_info.json (`info`) into `directory`, so that
        `load_tokenizer(directory)` rebuilds this tokenizer. tokenizer_path: what the info names as
        the tokenizer's folder (default: `directory`, absolute)."""
        directory = Path(directory)
        self._save_file(directory / TOKENIZER_FILE)
        path = tokenizer_path if tokenizer_path is not None else str(directory.resolve())
        (directory / INFO_FILE).write_text(json.dumps(self.info(path), indent=1) + "\n")

    def fingerprint(self) -> str:
        """A hash of everything that decides this tokenizer's ids (file contents, markers,
        conditions, rendering options), for cache keys."""
        digest = hashlib.sha256(self._file_bytes())
        info = self.info()
        info.pop("tokenizer_path")
        digest.update(json.dumps(info, sort_keys=True).encode())
        return digest.hexdigest()

    def token_name(self, token_id: int) -> str:
        """Readable form of one id (special tokens by name), for `inspect`."""
        return self.decode([token_id])


class ByteTokenizer(_Base):
    """UTF-8 bytes (ids 0..255) + special tokens; needs no files and no extra packages."""

    kind = "byte"

    def __init__(self, special_tokens: dict | None = None, conditions=None, *,
                 default_condition=AUTO, parse_special_tokens: bool = False):
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
        self.pad_id = 0 if self.pad_id is None else self.pad_id
        self._setup_rendering(default_condition, parse_special_tokens)
        by_string = {tok: i for i, tok in self._names.items()}
        self._parse_ids = by_string
        self._parse_re = re.compile("|".join(re.escape(t) for t in sorted(by_string, key=len,
                                                                           reverse=True)))

    def _encode_many(self, texts):
        if self.parse_special:
            return self._encode_parsed(texts)
        encoded = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter((len(b) for b in encoded), np.int64, count=len(encoded))
        flat = np.frombuffer(b"".join(encoded), np.uint8).astype(np.int32)
        return flat, lengths

    def _encode_parsed(self, texts):
        """Bytes, with every special-token string replaced by its id."""
        out, lengths = [], []
        for text in texts:
            ids, at = [], 0
            for match in self._parse_re.finditer(text):
                ids += text[at:match.start()].encode("utf-8")
                ids.append(self._parse_ids[match.group()])
                at = match.end()
            ids += text[at:].encode("utf-8")
            out += ids
            lengths.append(len(ids))
        return np.asarray(out, np.int32), np.asarray(lengths, np.int64)

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

    def _file_bytes(self) -> bytes:
        payload = {"format": BYTE_FORMAT, "version": 1, "special_tokens": self.special_tokens,
                   "conditions": self.conditions}
        return (json.dumps(payload, indent=1) + "\n").encode()

    def _save_file(self, path: Path) -> None:
        path.write_bytes(self._file_bytes())


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
                 conditions=None, *, default_condition=AUTO, parse_special_tokens: bool = False):
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
        self.pad_id = 0 if self.pad_id is None else self.pad_id
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self._setup_rendering(default_condition, parse_special_tokens)
        # Plain text: added tokens flagged special are split like any text (data_io's setting).
        self._tok.encode_special_tokens = not self.parse_special
        # encode_batch_fast (tokenizers >= 0.20) skips offsets, which we never use.
        self._batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)

    def _special_strings(self) -> list[str]:
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

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

    def _file_bytes(self) -> bytes:
        return self.path.read_bytes()

    def _save_file(self, path: Path) -> None:
        if path.resolve() != self.path.resolve():
            shutil.copyfile(self.path, path)


def load_tokenizer(spec, special_tokens: dict | None = None, conditions=None, *,
                   default_condition=AUTO, parse_special_tokens: bool | None = None):
    """A tokenizer from `spec`:

      "byte"             the built-in byte tokenizer;
      FILE               a HuggingFace tokenizer.json (or the byte tokenizer's own file);
      DIR                a prepared dataset (its metadata.json's tokenizer_info: ours, HRM-Text's
                         SFT output or data_io's sampled output), or a folder with a
                         tokenizer_info.json (what `save` writes; HRM-Text's and data_io's
                         tokenizer_info.json), or a folder holding only tokenizer.json.
    A folder's markers, conditions and rendering options come from its tokenizer_info (see
    `tokenizer_info.py` for how the tokenizer file it names is found).

    special_tokens: role -> token string (roles inst_begin, inst_end, eoa, pad; None disables
      inst_begin / inst_end / pad). conditions: names (default tokens `<|cond:NAME|>`) or a dict
      name -> token. default_condition: the condition of rows without one (AUTO: DEFAULT_CONDITION
      when declared; None: none). parse_special_tokens: special-token strings in the text become
      their ids (default: plain text). Each one given wins over what a folder records.
    """
    if isinstance(spec, _Base):
        return spec
    options = {"special_tokens": special_tokens, "conditions": conditions,
               "default_condition": default_condition,
               "parse_special_tokens": parse_special_tokens}
    if spec == "byte":
        return ByteTokenizer(special_tokens, conditions, default_condition=default_condition,
                             parse_special_tokens=bool(parse_special_tokens))
    path = Path(spec)
    if path.is_dir():
        from .tokenizer_info import tokenizer_of_folder
        return tokenizer_of_folder(path, **options)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(spec)!r}: no such file or directory; expected "
                                f"'byte', a tokenizer.json or a folder holding one (a prepared "
                                f"dataset, a checkpoint's tokenizer/)")
    return tokenizer_from_file(path, **options)


def tokenizer_from_file(path: Path, special_tokens=None, conditions=None, default_condition=AUTO,
                        parse_special_tokens=None):
    """The tokenizer of one file: the byte tokenizer's own format (which records its markers and
    conditions) or a HuggingFace tokenizer.json."""
    try:
        with open(path, "rb") as f:
            head = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    rendering = {"default_condition": default_condition,
                 "parse_special_tokens": bool(parse_special_tokens)}
    if isinstance(head, dict) and head.get("format") == BYTE_FORMAT:
        return ByteTokenizer(special_tokens if special_tokens else head.get("special_tokens"),
                             conditions if conditions else head.get("conditions"), **rendering)
    return HFTokenizer(path, special_tokens, conditions, **rendering)
