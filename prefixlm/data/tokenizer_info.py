"""tokenizer_info: how a dataset's tokens were made (in either tool's keys), and its tokenizer.

A dataset's metadata.json holds it under `tokenizer_info`; a tokenizer folder (a checkpoint's
tokenizer/, an export, HRM-Text's SFT output, data_io's tokenized root) in tokenizer_info.json.

  HRM-Text's keys (its trainer, inference engine and HF converter read them; data_io writes them):
    tokenizer_path     the tokenizer: a folder holding tokenizer.json, or the file itself. data_io
                       stores its --tokenizer-path verbatim, HRM-Text's SFT script its output
                       folder as typed: either may be relative to wherever that tool ran, or a
                       Hugging Face Hub id.
    boq, eoq, eoa      prefix start, prefix end, end of answer (our inst_begin, inst_end, eoa)
    condition_mapping  {name: token}
    vocab_size         with added tokens
  prefixlm's keys, written beside them: kind, special_tokens, special_ids, conditions,
    condition_ids, default_condition, special_text ("plain" | "parsed").
Ours win where both are present; with HRM-Text's keys only, pad is the `pad` key's token when
there is one (model directories write it), else id 0 (as HRM-Text pads), and the default condition
follows `tokenizer.DEFAULT_CONDITION`.

Where the tokenizer file is looked for, first hit wins (a folder stands for FOLDER/tokenizer.json):
  1. the override (`tokenizer=` of the train config, `inspect --tokenizer`);
  2. DIR/tokenizer.json, the dataset's own copy (prefixlm and HRM-Text's SFT script write one);
  3. tokenizer_path, when it is absolute;
  4. tokenizer_path relative to the dataset folder DIR;
  5. tokenizer_path relative to the current directory (where HRM-Text's tools resolve it);
  6. tokenizer_path as a Hub id ORG/NAME in the local Hugging Face cache ($HF_HUB_CACHE, else
     $HF_HOME/hub, else ~/.cache/huggingface/hub), at its `main` revision; nothing is downloaded.
When none exists the error names every place looked. The tokenizer found must have the recorded
vocab_size (and, in our datasets, the recorded marker and condition ids): a stale path naming
another tokenizer is an error, never silently wrong tokens.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tokenizer import (AUTO, INFO_FILE, TOKENIZER_FILE, ByteTokenizer, load_tokenizer,
                        tokenizer_from_file)

__all__ = ["read_folder_info", "rendering_of", "tokenizer_candidates", "resolve_tokenizer_file",
           "tokenizer_of_folder", "check_matches"]

METADATA_FILE = "metadata.json"


def read_folder_info(directory: Path) -> tuple[dict | None, Path | None]:
    """(tokenizer_info, the file it came from) of a dataset folder (metadata.json) or a tokenizer
    folder (tokenizer_info.json); (None, None) when the folder has neither."""
    for name, key in ((METADATA_FILE, "tokenizer_info"), (INFO_FILE, None)):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read it: {exc}") from exc
        info = data.get(key, {}) if key and isinstance(data, dict) else data
        if not isinstance(info, dict):
            raise ValueError(f"{path}: {key or 'the file'} must be a JSON object, got "
                             f"{type(info).__name__}")
        return info, path
    return None, None


def _is_ours(info: dict) -> bool:
    return isinstance(info.get("special_tokens"), dict)


def _is_hrm_text(info: dict) -> bool:
    return any(k in info for k in ("boq", "eoq", "eoa", "condition_mapping"))


def rendering_of(info: dict, source: Path) -> dict:
    """load_tokenizer's keyword arguments for the markers, conditions and rendering options that
    `info` records (empty: it records none, prefixlm's defaults apply)."""
    if _is_ours(info):
        # A dataset we wrote before default conditions existed gave rows without one none.
        return {"special_tokens": info["special_tokens"], "conditions": info.get("conditions"),
                "default_condition": info.get("default_condition"),
                "parse_special_tokens": info.get("special_text") == "parsed"}
    if _is_hrm_text(info):
        missing = [k for k in ("eoa",) if not isinstance(info.get(k), str) or not info[k]]
        if missing:
            raise ValueError(f"{source}: tokenizer_info has HRM-Text's keys but no "
                             f"{missing[0]!r} (the end-of-answer token)")
        mapping = info.get("condition_mapping") or {}
        if not isinstance(mapping, dict):
            raise ValueError(f"{source}: tokenizer_info.condition_mapping must be an object "
                             f"{{name: token}}, got {type(mapping).__name__}")
        return {"special_tokens": {"inst_begin": info.get("boq") or None,
                                   "inst_end": info.get("eoq") or None,
                                   "eoa": info["eoa"], "pad": info.get("pad") or None},
                "conditions": mapping}
    return {}


def _hub_cache_file(repo_id: str) -> Path | None:
    """Where the Hugging Face cache keeps `repo_id`'s tokenizer.json (None: not a Hub id)."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or repo_id.startswith((".", "~")):
        return None
    if os.environ.get("HF_HUB_CACHE"):
        root = Path(os.environ["HF_HUB_CACHE"])
    else:
        root = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
    repo = root / f"models--{parts[0]}--{parts[1]}"
    ref = repo / "refs" / "main"
    try:
        revision = ref.read_text().strip() if ref.is_file() else "<main>"
    except OSError:
        revision = "<main>"
    return repo / "snapshots" / revision / TOKENIZER_FILE


def tokenizer_candidates(info: dict, directory: Path, override=None) -> list[tuple[str, Path]]:
    """(what, path) for every place the tokenizer file is looked for, in order (module
    docstring)."""
    out = []
    if override:
        out.append(("tokenizer= override", Path(override)))
    out.append(("the dataset's own copy", directory / TOKENIZER_FILE))
    stored = info.get("tokenizer_path")
    if isinstance(stored, str) and stored:
        path = Path(stored).expanduser()
        if path.is_absolute():
            out.append(("tokenizer_path", path))
        else:
            out.append(("tokenizer_path relative to the dataset", directory / path))
            out.append(("tokenizer_path relative to the current directory", Path.cwd() / path))
            hub = _hub_cache_file(stored)
            if hub is not None:
                out.append(("tokenizer_path as a Hub id in the local cache", hub))
    return out


def _as_file(path: Path) -> Path:
    return path / TOKENIZER_FILE if path.is_dir() else path


def resolve_tokenizer_file(info: dict, directory: Path, override=None, source=None) -> Path:
    """The first tokenizer file that exists among `tokenizer_candidates`; else FileNotFoundError
    naming every place looked."""
    candidates = tokenizer_candidates(info, directory, override)
    for what, path in candidates:
        if _as_file(path).is_file():
            return _as_file(path)
        if what.startswith("tokenizer= override"):
            raise FileNotFoundError(f"tokenizer={override}: no such file, or a folder without "
                                    f"{TOKENIZER_FILE}")
    looked = "; ".join(f"{what}: {_as_file(path)}" for what, path in candidates)
    stored = info.get("tokenizer_path")
    hint = (f" (tokenizer_path {stored!r} may be a Hugging Face Hub id: download its "
            f"{TOKENIZER_FILE}, e.g. with `huggingface-cli download {stored} {TOKENIZER_FILE}`)"
            if isinstance(stored, str) and _hub_cache_file(stored) is not None else "")
    raise FileNotFoundError(f"{source or directory}: cannot find the dataset's tokenizer (a "
                            f"tokenizer.json, or a folder holding one); looked at {looked}{hint}; "
                            f"pass tokenizer=PATH")


def check_matches(tok, info: dict, source: Path, where) -> None:
    """ValueError unless `tok` has the vocabulary size and (where recorded) the marker and
    condition ids that `info` says the dataset's tokens were made with."""
    vocab = info.get("vocab_size")
    if isinstance(vocab, int) and not isinstance(vocab, bool) and tok.vocab_size != vocab:
        raise ValueError(f"{source}: the tokenizer found at {where} has {tok.vocab_size} tokens "
                         f"but tokenizer_info.vocab_size is {vocab}: not the tokenizer these "
                         f"tokens were made with; pass tokenizer=PATH")
    recorded = dict(info.get("special_ids") or {})
    recorded.update({f"condition {k}": v for k, v in (info.get("condition_ids") or {}).items()})
    mine = dict(tok.special_ids())
    mine.update({f"condition {k}": v for k, v in tok.condition_ids.items()})
    for role, token_id in recorded.items():
        if token_id is not None and mine.get(role) != token_id:
            raise ValueError(f"{source}: the tokenizer found at {where} gives {role} the id "
                             f"{mine.get(role)} but the dataset was written with {token_id}; pass "
                             f"tokenizer=PATH of the tokenizer it was made with")


def tokenizer_of_folder(directory: Path, override=None, *, special_tokens=None, conditions=None,
                        default_condition=AUTO, parse_special_tokens=None):
    """The tokenizer of a dataset or tokenizer folder (module docstring). `override` names the
    tokenizer file (or "byte"); the markers and conditions still come from the folder's info.
    The other arguments, where given, win over what the info records."""
    directory = Path(directory)
    info, source = read_folder_info(directory)
    if info is None:
        if override:
            raise ValueError(f"{directory}: no {METADATA_FILE} or {INFO_FILE}: not a dataset or "
                             f"tokenizer folder")
        if (directory / TOKENIZER_FILE).is_file():
            return load_tokenizer(str(directory / TOKENIZER_FILE), special_tokens, conditions,
                                  default_condition=default_condition,
                                  parse_special_tokens=parse_special_tokens)
        raise FileNotFoundError(f"{directory}: neither a prepared dataset nor a folder with "
                                f"{TOKENIZER_FILE} or {INFO_FILE}")
    options = {"default_condition": AUTO, "parse_special_tokens": False,
               **rendering_of(info, source)}
    given = {"special_tokens": special_tokens, "conditions": conditions,
             "parse_special_tokens": parse_special_tokens}
    options.update({k: v for k, v in given.items() if v is not None})
    if default_condition != AUTO:
        options["default_condition"] = default_condition
    if override == "byte" or (not override and info.get("kind") == "byte"):
        tok = ByteTokenizer(options.get("special_tokens"), options.get("conditions"),
                            default_condition=options["default_condition"],
                            parse_special_tokens=bool(options["parse_special_tokens"]))
        where = "byte"
    else:
        path = resolve_tokenizer_file(info, directory, override, source)
        tok = tokenizer_from_file(path, **options)
        where = path
    if special_tokens is None and conditions is None:
        check_matches(tok, info, source, where)
    return tok
