"""The on-disk formats of HRM-Text and data_io, rebuilt from their documented behaviour.

Writers (what the foreign tools write; /work/notes/data_formats.md sections 1-3 describe them, and
the research recipe these follow was checked byte for byte against the real scripts):
  build_hf_tokenizer    a tiny byte-level BPE with data_io's 31 special tokens (vocab 400)
  data_io_tokenize      data_io's Rust `tokenizer`: one folder per source file (<u4 tokens, <u8
                        indices), special-token strings as plain text, multi-tag conditions
  data_io_sample        data_io's sample_tokenized.py: one V1 folder, uint16 tokens holding every
                        row of every source, epochs drawing different subsets (one Philox stream,
                        per-source permutations kept across epochs), `truncate` cutting responses
                        down to resp_len 1, total_length = mean sampled tokens per epoch
  hrm_prepare_sft       HRM-Text's scripts/prepare_sft_data.py: int32 tokens, one condition per
                        row (default `direct`), special-token strings parsed, empty responses
                        dropped, tokenizer.json + tokenizer_info.json copied in
Readers (the checks HRM-Text's code makes on a dataset; data_formats.md section 4):
  hrm_text_read         dataset_new.V1Dataset: metadata keys and types, vocab padding, the
                        per-sample inputs / labels / positions / prefix and causal lengths
  hrm_inference_prompt  simple_inference_engine.tokenize_prompt with the tokenizer at
                        tokenizer_path (a folder holding tokenizer.json loads as a plain
                        `tokenizers` backend in transformers)
No HRM-Text or data_io code is imported: these are re-statements of their formats.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

DATA_IO_SPECIAL_TOKENS = [
    "<|PAD|>", "<|direct|>", "<|cot|>", "<|noisy|>", "<|synth|>", "<|endoftext|>",
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<think>", "</think>",
]
BOQ, EOQ, EOA = "<|im_start|>", "<|im_end|>", "<|box_end|>"
CONDITIONS = {"direct": "<|object_ref_start|>", "cot": "<|object_ref_end|>",
              "noisy": "<|quad_start|>", "synth": "<|quad_end|>"}
CONTEXT_SIZE = 4097
INDEX_FIELDS = ("inst_start", "inst_len", "resp_start", "resp_len")
IGNORE = -100
CORPUS = [
    "What is two plus two? The answer is four.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May.",
    "Write a short poem about the sea. The sea is wide and deep and blue.",
    "Translate to French: good morning. Bonjour.",
    "Let x be the number of apples. Then x + 3 = 7, so x = 4.",
]


def _compact(obj) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def write_rows(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def build_hf_tokenizer(directory: Path):
    """tokenizer.json (+ data_io's config.json) of a tiny byte-level BPE, specials first."""
    from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers,
                            pre_tokenizers, trainers)

    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(s, special=True) for s in DATA_IO_SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text('{"model_type": "qwen3"}')
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def text_of_n_tokens(tok, n: int) -> str:
    """Text of exactly n tokens: '~' is not in the corpus, so BPE learned no merge with it."""
    text = "~" * n
    assert len(tok.encode(text, add_special_tokens=False).ids) == n
    return text


def data_io_tokenize(raw_dir: Path, out: Path, tokenizer_path: str, tok_file: Path) -> None:
    """What data_io's `tokenizer --tokenizer-path P -o OUT RAW_DIR` writes."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    tok.encode_special_tokens = True  # data_io: "treat all special tokens as text"
    out.mkdir(parents=True, exist_ok=True)
    info = {"tokenizer_path": tokenizer_path, "boq": BOQ, "eoq": EOQ, "eoa": EOA,
            "condition_mapping": dict(CONDITIONS),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    (out / "tokenizer_info.json").write_text(_compact(info))
    ids = {name: tok.token_to_id(t) for name, t in (("boq", BOQ), ("eoq", EOQ), ("eoa", EOA))}
    cond = {k: tok.token_to_id(v) for k, v in CONDITIONS.items()}
    for path in sorted(raw_dir.rglob("*.jsonl")):
        safe = str(path.relative_to(raw_dir)).replace("/", "__")
        toks, idx = [], {k: [] for k in INDEX_FIELDS}
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            inst = tok.encode(row["instruction"], add_special_tokens=False).ids
            resp = tok.encode(row["response"], add_special_tokens=False).ids
            start = len(toks)
            toks += [ids["boq"]] + [cond[c] for c in row["condition"].split(",")] + inst
            toks.append(ids["eoq"])
            idx["inst_start"].append(start)
            idx["inst_len"].append(len(toks) - start)
            idx["resp_start"].append(len(toks))
            toks += resp + [ids["eoa"]]
            idx["resp_len"].append(len(toks) - idx["resp_start"][-1])
        sub = out / safe
        sub.mkdir(parents=True, exist_ok=True)
        np.save(sub / "tokens.npy", np.asarray(toks, dtype="<u4"))
        for k in INDEX_FIELDS:
            np.save(sub / f"{k}.npy", np.asarray(idx[k], dtype="<u8"))
        st = path.stat()
        (sub / "metadata.json").write_text(_compact({"source_mtime": int(st.st_mtime),
                                                     "source_size": st.st_size}))


def _rule(name: str, rules: list[dict]) -> dict:
    hit = next((r for r in rules if name.startswith(r["prefix"])), {})  # first match wins
    return {"max_per_file": hit.get("max_per_file"),
            "long_context": hit.get("long_context", "truncate"),
            "repeat": int(hit.get("repeat", 1))}


def data_io_sample(tokenized: Path, out: Path, rules: list[dict], epochs: int, seed: int = 0,
                   context_size: int = CONTEXT_SIZE, min_resp_length: int = 2) -> None:
    """What data_io's `sample_tokenized.py tokenized_path=.. output_path=.. epochs=E` writes."""
    info = json.loads((tokenized / "tokenizer_info.json").read_text())
    tasks = [{"name": d.name, "cfg": _rule(d.name, rules),
              "idx": {k: np.load(d / f"{k}.npy") for k in INDEX_FIELDS}}
             for d in sorted(tokenized.iterdir()) if d.is_dir()]
    total = 0
    for t in tasks:  # every source's whole token stream, before any filtering
        t["base"] = total
        t["len"] = int(t["idx"]["inst_len"].sum() + t["idx"]["resp_len"].sum())
        total += t["len"]
    vocab = info.get("vocab_size")
    dtype = np.int32 if vocab is None else (np.uint8 if vocab <= 255 else
                                            np.uint16 if vocab <= 65535 else np.int32)
    out.mkdir(parents=True, exist_ok=True)
    tokens = np.lib.format.open_memmap(out / "tokens.npy", mode="w+", dtype=dtype, shape=(total,))
    for t in tasks:
        tokens[t["base"]: t["base"] + t["len"]] = np.load(tokenized / t["name"] / "tokens.npy")
    tokens.flush()
    del tokens
    for t in tasks:  # filter on the original resp_len, then truncate or drop
        ix = t["idx"]
        keep = ix["resp_len"] >= min_resp_length
        allowed = context_size - np.minimum(ix["inst_len"], context_size)
        if t["cfg"]["long_context"] == "truncate":
            keep &= allowed >= 1
            ix["resp_len"] = np.minimum(ix["resp_len"], allowed)
        else:
            keep &= ix["resp_len"] <= allowed
        for k in INDEX_FIELDS:
            ix[k] = ix[k][keep]
    rng = np.random.Generator(np.random.Philox(seed=seed))
    n_all = sum(len(t["idx"]["inst_start"]) for t in tasks)
    buf = {k: np.empty((n_all,), dtype=np.int64) for k in INDEX_FIELDS}
    sampled = 0
    for epoch in range(epochs):
        cur = 0
        for t in tasks:
            n = len(t["idx"]["inst_start"])
            cap = t["cfg"]["max_per_file"]
            want = (min(cap, n) if cap is not None else n) * t["cfg"]["repeat"]
            got = 0
            while got < want:
                if t.get("perm") is None or t["cursor"] >= len(t["perm"]):
                    t["perm"], t["cursor"] = rng.permutation(n), 0
                take = min(len(t["perm"]) - t["cursor"], want - got)
                sel = t["perm"][t["cursor"]: t["cursor"] + take]
                t["cursor"] += take
                got += take
                for k in INDEX_FIELDS:
                    v = t["idx"][k][sel]
                    buf[k][cur: cur + take] = v + t["base"] if k.endswith("_start") else v
                cur += take
        sampled += int(buf["inst_len"][:cur].sum() + buf["resp_len"][:cur].sum())
        perm = rng.permutation(cur)
        (out / f"epoch_{epoch}").mkdir(parents=True, exist_ok=True)
        for k in INDEX_FIELDS:
            np.save(out / f"epoch_{epoch}" / f"{k}.npy", buf[k][perm])
    meta = {"tokenizer_info": info, "vocab_size": None, "max_seq_len": context_size,
            "total_length": int(round(sampled / epochs))}
    (out / "metadata.json").write_text(_compact(meta))


def hrm_prepare_sft(jsonl: Path, tok_file: Path, out: Path, epochs: int, seed: int = 0,
                    context_size: int = CONTEXT_SIZE, output_as_typed: str | None = None) -> None:
    """What HRM-Text's `scripts/prepare_sft_data.py --train J --tokenizer T --output OUT
    --epochs E` writes; output_as_typed: the --output string as typed (its tokenizer_path)."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tok_file))  # special-token strings in the text are parsed
    boq, eoq, eoa = (tok.token_to_id(t) for t in (BOQ, EOQ, EOA))
    cond = {k: tok.token_to_id(v) for k, v in CONDITIONS.items()}
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    toks, idx = [], {k: [] for k in INDEX_FIELDS}
    for r in rows:
        inst = tok.encode(r["instruction"], add_special_tokens=False).ids
        resp = tok.encode(r["response"], add_special_tokens=False).ids
        if not resp:
            continue  # empty responses are dropped
        start = len(toks)
        toks += [boq, cond[r.get("condition", "direct")]] + inst + [eoq]
        idx["inst_start"].append(start)
        idx["inst_len"].append(len(toks) - start)
        idx["resp_start"].append(len(toks))
        toks += resp + [eoa]
        idx["resp_len"].append(len(toks) - idx["resp_start"][-1])
    arr = {k: np.array(v, dtype=np.int64) for k, v in idx.items()}
    lens = arr["inst_len"] + arr["resp_len"]
    assert int(lens.max()) < context_size  # the script refuses longer samples
    np.save(out / "tokens.npy", np.array(toks, dtype=np.int32))
    shutil.copyfile(tok_file, out / "tokenizer.json")
    info = {"tokenizer_path": str(Path(output_as_typed or out)), "boq": BOQ, "eoq": EOQ,
            "eoa": EOA, "condition_mapping": dict(CONDITIONS),
            "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
    (out / "tokenizer_info.json").write_text(json.dumps(info))
    meta = {"tokenizer_info": info, "vocab_size": None, "max_seq_len": context_size,
            "total_length": int(lens.sum())}
    (out / "metadata.json").write_text(json.dumps(meta))
    rng = np.random.Generator(np.random.Philox(seed=seed))
    for e in range(epochs):
        perm = rng.permutation(len(arr["inst_start"]))
        (out / f"epoch_{e}").mkdir(exist_ok=True)
        for k in INDEX_FIELDS:
            np.save(out / f"epoch_{e}" / f"{k}.npy", arr[k][perm])


SAMPLING_RULES = [
    {"prefix": "SYNTH__", "max_per_file": 6},
    {"prefix": "flan__cot_"},
    {"prefix": "flan__", "max_per_file": 2, "long_context": "drop"},
    {"prefix": "gsm8k_train.jsonl", "repeat": 3},
]
SFT_ROWS = [
    {"instruction": "What is two plus two?", "response": "four"},           # -> direct
    {"instruction": "Let x + 3 = 7.", "response": "x = 4", "condition": "cot"},
    {"instruction": "Say ok.", "response": "ok<|box_end|>done"},  # parsed into a real eoa here
    {"instruction": "Empty response is dropped", "response": ""},
]


def build_fixtures(root: Path, relative_tokenizer_path: bool = False) -> dict:
    """Every layout under `root`; returns their paths (see the module docstring)."""
    tok = build_hf_tokenizer(root / "hf_tokenizer")
    long_inst = text_of_n_tokens(tok, 4096 - 3)   # + boq + 1 condition + eoq = inst_len 4096
    long_inst2 = text_of_n_tokens(tok, 4097 - 3)  # inst_len 4097 >= context: always dropped
    raw = root / "raw"
    write_rows(raw / "gsm8k_train.jsonl", [
        {"condition": "synth,cot", "instruction": "What is two plus two?", "response": "four"},
        {"condition": "direct", "instruction": "Translate to French: good morning.",
         "response": "ok<|box_end|>done"},
        {"condition": "cot", "instruction": "Let x + 3 = 7.", "response": "x = 4"}])
    write_rows(raw / "SYNTH" / "part0.jsonl", [
        {"condition": "synth", "instruction": f"Question number {i}?", "response": f"Answer {i}."}
        for i in range(20)])
    write_rows(raw / "flan__cot_a.jsonl", [
        {"condition": "cot,noisy", "instruction": "Write a short poem about the sea.",
         "response": "The sea is wide."}])
    write_rows(raw / "flan__b.jsonl", [
        {"condition": "noisy", "instruction": f"Item {i}", "response": "yes"} for i in range(4)])
    write_rows(raw / "long__x.jsonl", [
        {"condition": "direct", "instruction": long_inst, "response": "The answer is four."},
        {"condition": "direct", "instruction": long_inst2, "response": "dropped"},
        {"condition": "direct", "instruction": "empty response", "response": ""}])
    tok_dir = root / "hf_tokenizer"
    data_io_tokenize(raw, root / "data_io_tokenized",
                     "../hf_tokenizer" if relative_tokenizer_path else str(tok_dir),
                     tok_dir / "tokenizer.json")
    data_io_sample(root / "data_io_tokenized", root / "data_io_sampled", SAMPLING_RULES, epochs=2)
    sft_input = write_rows(root / "hrm_sft_input.jsonl", SFT_ROWS)
    hrm_prepare_sft(sft_input, tok_dir / "tokenizer.json", root / "hrm_sft", epochs=2,
                    output_as_typed="hrm_sft" if relative_tokenizer_path else None)
    return {"root": root, "tokenizer": tok_dir / "tokenizer.json", "raw": raw,
            "tokenized": root / "data_io_tokenized", "sampled": root / "data_io_sampled",
            "sft_input": sft_input, "sft": root / "hrm_sft"}


# -- HRM-Text's reader ------------------------------------------------------------------------

def _find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


def hrm_text_read(path: Path, epochs: int) -> dict:
    """What HRM-Text's dataset_new.V1Dataset does with a folder, as far as a dataset decides it:
    the metadata checks (AssertionError / KeyError / TypeError where HRM-Text's would fail) and,
    per epoch, every sample's model inputs in stored order."""
    meta = json.loads((path / "metadata.json").read_text())
    for key in ("max_seq_len", "total_length"):  # pydantic V1DatasetMeta: required ints
        if not isinstance(meta[key], int) or isinstance(meta[key], bool):
            raise TypeError(f"metadata.json {key} must be an int, got {meta[key]!r}")
    info = dict(meta.get("tokenizer_info", {}))
    assert isinstance(info, dict)
    assert meta.get("vocab_size") is None, "top-level vocab_size must be null or absent"
    vocab = _find_multiple(info.pop("vocab_size"), 256)  # KeyError when it is missing
    tokens = np.load(path / "tokens.npy", mmap_mode="r")
    assert tokens.ndim == 1 and np.issubdtype(tokens.dtype, np.integer)
    out = {"max_seq_len": meta["max_seq_len"] - 1, "vocab_size": vocab, "tokenizer_info": info,
           "total_length": meta["total_length"], "epochs": []}
    for k in range(epochs):  # its trainer reads exactly config.epochs folders, no wrap-around
        idx = {f: np.load(path / f"epoch_{k}" / f"{f}.npy", mmap_mode="r") for f in INDEX_FIELDS}
        assert len({len(a) for a in idx.values()}) == 1
        samples = []
        for s in range(len(idx["inst_len"])):
            i = tokens[idx["inst_start"][s]: idx["inst_start"][s] + idx["inst_len"][s]]
            o = tokens[idx["resp_start"][s]: idx["resp_start"][s] + idx["resp_len"][s]]
            i, o = i.astype(np.int32), o.astype(np.int32)
            assert len(i) == idx["inst_len"][s] and len(o) == idx["resp_len"][s]
            samples.append({
                "inputs": np.concatenate([i, o[:-1]]),
                "labels": np.concatenate([np.full(len(i) - 1, IGNORE, np.int32), o]),  # target_only
                "positions": np.arange(len(i) + len(o) - 1),
                "prefix_len": len(i), "causal_len": len(o) - 1})
        out["epochs"].append(samples)
    return out


def hrm_inference_tokenizer(tokenizer_info: dict):
    """The tokenizer HRM-Text's inference engine loads from tokenizer_path (a folder holding
    tokenizer.json or the file itself, resolved against the current directory)."""
    from tokenizers import Tokenizer

    path = Path(tokenizer_info["tokenizer_path"])
    return Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path))


def hrm_inference_prompt(tokenizer_info: dict, condition: str, prompt: str) -> list[int]:
    """simple_inference_engine.tokenize_prompt: boq + one token per tag + prompt + eoq, special
    tokens parsed, no added specials."""
    tok = hrm_inference_tokenizer(tokenizer_info)
    tags = "".join(tokenizer_info["condition_mapping"][c] for c in condition.split(","))
    text = f"{tokenizer_info['boq']}{tags}{prompt}{tokenizer_info['eoq']}"
    return tok.encode(text, add_special_tokens=False).ids
