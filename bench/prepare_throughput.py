"""Throughput of `prepare-sft` with a byte-level BPE tokenizer on >= 100 MB of JSONL.

Trains a small BPE `tokenizer.json` with `tokenizers`, writes synthetic instruction/response JSONL
(chunks of the Python standard library's sources: code and English) into a temporary directory, runs `prepare_sft` and prints
tokens/s (tokens read = instruction + response text tokens). Needs `pip install 'prefixlm[hf]'`.

    python bench/prepare_throughput.py [--mb 100] [--vocab 16000]
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus_texts():
    """Natural text with code: the Python standard library's sources (always installed)."""
    root = sysconfig.get_paths()["stdlib"]
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        try:
            yield Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def write_jsonl(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Rows cut from the corpus: instruction = a chunk of lines, response = the following chunk."""
    rng = np.random.default_rng(seed)
    written = rows = 0
    with open(path, "w") as f:
        while written < target_bytes:
            for text in corpus_texts():
                lines = text.splitlines(keepends=True)
                at = 0
                while at < len(lines) and written < target_bytes:
                    ni, nr = rng.integers(2, 60), rng.integers(1, 80)
                    inst = "".join(lines[at: at + ni])
                    resp = "".join(lines[at + ni: at + ni + nr])
                    at += ni + nr
                    line = json.dumps({"instruction": inst, "response": resp}) + "\n"
                    f.write(line)
                    written += len(line)
                    rows += 1
                if written >= target_bytes:
                    break
    return rows


def train_tokenizer(path: Path, corpus: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  special_tokens=["<|inst|>", "<|/inst|>", "<|eoa|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(corpus) as f:
        sample = [json.loads(line)["response"] for line in itertools.islice(f, 20000)]
    tok.train_from_iterator(sample, trainer)
    tok.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="JSONL size in MB (1e6 bytes)")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--context-size", type=int, default=4097)
    args = parser.parse_args()

    from prefixlm.data import prepare_sft

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        rows = write_jsonl(tmp / "data.jsonl", int(args.mb * 1e6))
        size = (tmp / "data.jsonl").stat().st_size
        print(f"wrote {size / 1e6:.1f} MB, {rows} rows in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        train_tokenizer(tmp / "tokenizer.json", tmp / "data.jsonl", args.vocab)
        print(f"trained BPE, vocab {args.vocab}, in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        report = prepare_sft([tmp / "data.jsonl"], tmp / "out", tokenizer=str(tmp / "tokenizer.json"),
                             context_size=args.context_size, progress=False)
        elapsed = time.perf_counter() - t
        tokens = report["tokens"]["read"]
        print(f"cores: {os.cpu_count()}, prepare: {elapsed:.1f} s, {tokens} tokens read, "
              f"{report['tokens']['written']} written, {report['samples']} samples")
        print(f"throughput: {tokens / elapsed / 1e6:.2f} M tokens/s, {size / elapsed / 1e6:.1f} MB/s")


if __name__ == "__main__":
    main()
