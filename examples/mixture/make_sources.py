"""Small example sources for examples/mixture/mix.yaml: three kinds of input side by side.

    python examples/mixture/make_sources.py [OUT]      # OUT defaults to examples/mixture/data

OUT/tokenizer/          a byte-level BPE tokenizer.json (trained here on the rows below) and a
                        tokenizer_info.json in HRM-Text's keys (its markers and conditions)
OUT/instructions.jsonl  instruction/response rows with conditions, and chat rows
OUT/math.parquet        instruction/response/condition columns
OUT/data_io_tokenized/  a data_io tokenized folder, in the layout data_io's Rust `tokenizer`
                        writes (tokenizer_info.json, one sub-folder of <u4 tokens and <u8 index
                        arrays per input file): gsm8k_train.jsonl/ and synth__part0.jsonl/
Needs `tokenizers` and `pyarrow` (pip install 'prefixlm[hf,parquet]').
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SPECIALS = ["<|PAD|>", "<|im_start|>", "<|im_end|>", "<|box_end|>", "<|object_ref_start|>",
            "<|object_ref_end|>", "<|quad_start|>", "<|quad_end|>"]
INFO = {"boq": "<|im_start|>", "eoq": "<|im_end|>", "eoa": "<|box_end|>",
        "condition_mapping": {"direct": "<|object_ref_start|>", "cot": "<|object_ref_end|>",
                              "noisy": "<|quad_start|>", "synth": "<|quad_end|>"}}


def rows():
    """Arithmetic questions in three styles (enough text to train a tiny BPE on)."""
    rng = np.random.default_rng(0)
    out = {"instructions": [], "math": [], "gsm8k": [], "synth": []}
    for i in range(60):
        a, b = (int(x) for x in rng.integers(1, 99, 2))
        out["instructions"].append({"instruction": f"Add {a} and {b}.", "response": str(a + b),
                                    "condition": "direct"})
    # what the report counts: a response longer than the context (truncated) and an empty one
    out["instructions"].append({"instruction": "Count to 800.",
                                "response": " ".join(map(str, range(1, 801))),
                                "condition": "direct"})
    out["instructions"].append({"instruction": "Say nothing.", "response": "",
                                "condition": "direct"})
    for i in range(10):
        a = int(rng.integers(1, 50))
        out["instructions"].append({"messages": [
            {"role": "system", "content": "Answer with a number."},
            {"role": "user", "content": f"What is {a} doubled?"},
            {"role": "assistant", "content": str(2 * a)}]})
    for i in range(80):
        a, b = (int(x) for x in rng.integers(2, 30, 2))
        out["math"].append({"instruction": f"Compute {a} * {b}.",
                            "response": f"{a} * {b} = {a * b}.", "condition": "cot"})
    for i in range(12):
        a, b = (int(x) for x in rng.integers(2, 20, 2))
        out["gsm8k"].append({"instruction": f"Tom has {a} apples and buys {b} more. How many?",
                             "response": f"{a} + {b} = {a + b}. The answer is {a + b}.",
                             "condition": "synth,cot"})
    for i in range(100):
        a = int(rng.integers(1, 1000))
        out["synth"].append({"instruction": f"Is {a} even?",
                             "response": "yes" if a % 2 == 0 else "no", "condition": "synth"})
    return out


def write_jsonl(path: Path, items) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")


def train_tokenizer(folder: Path, texts) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  special_tokens=[AddedToken(s, special=True) for s in SPECIALS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    info = {"tokenizer_path": ".", **INFO, "vocab_size": tok.get_vocab_size(True)}
    (folder / "tokenizer_info.json").write_text(json.dumps(info, indent=1) + "\n")


def data_io_tokenize(raw: dict[str, list], tokenizer: Path, out: Path) -> None:
    """What data_io's `tokenizer --tokenizer-path T -o OUT RAW_DIR` writes for these files:
    special-token strings as plain text, [boq, one token per condition tag, text, eoq] then
    [response, eoa] per row."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    tok.encode_special_tokens = True
    ids = {k: tok.token_to_id(INFO[k]) for k in ("boq", "eoq", "eoa")}
    cond = {k: tok.token_to_id(v) for k, v in INFO["condition_mapping"].items()}
    out.mkdir(parents=True, exist_ok=True)
    info = {"tokenizer_path": str(tokenizer.parent.resolve()), **INFO,
            "vocab_size": tok.get_vocab_size(True)}
    (out / "tokenizer_info.json").write_text(json.dumps(info, separators=(",", ":")))
    for name, items in raw.items():
        tokens, index = [], {k: [] for k in ("inst_start", "inst_len", "resp_start", "resp_len")}
        for row in items:
            start = len(tokens)
            tokens += [ids["boq"]] + [cond[t] for t in row["condition"].split(",")]
            tokens += tok.encode(row["instruction"], add_special_tokens=False).ids + [ids["eoq"]]
            index["inst_start"].append(start)
            index["inst_len"].append(len(tokens) - start)
            index["resp_start"].append(len(tokens))
            tokens += tok.encode(row["response"], add_special_tokens=False).ids + [ids["eoa"]]
            index["resp_len"].append(len(tokens) - index["resp_start"][-1])
        sub = out / name
        sub.mkdir(exist_ok=True)
        np.save(sub / "tokens.npy", np.asarray(tokens, "<u4"))
        for key, values in index.items():
            np.save(sub / f"{key}.npy", np.asarray(values, "<u8"))
        (sub / "metadata.json").write_text('{"source_mtime":0,"source_size":0}')


def main(out: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = rows()
    texts = [r.get("instruction", "") + " " + r.get("response", "") for v in data.values()
             for r in v] * 4
    train_tokenizer(out / "tokenizer", texts)
    write_jsonl(out / "instructions.jsonl", data["instructions"])
    pq.write_table(pa.table({k: [r[k] for r in data["math"]]
                             for k in ("instruction", "response", "condition")}),
                   out / "math.parquet")
    data_io_tokenize({"gsm8k_train.jsonl": data["gsm8k"], "synth__part0.jsonl": data["synth"]},
                     out / "tokenizer" / "tokenizer.json", out / "data_io_tokenized")
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "data")
