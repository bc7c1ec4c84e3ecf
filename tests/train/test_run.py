"""train/run: the prepared-data cache and the data a run is given."""

import os
import shutil

import pytest

from datahelpers import random_rows, train_bpe, write_jsonl
from prefixlm.train.config import load_config
from prefixlm.train.run import prepared_dataset
from trainhelpers import CPU


def test_cache_key_follows_contents_not_paths(tmp_path):
    """Guards stale prepared data: the cache key was the tokenizer's path and the JSONL's
    size + mtime, so replacing tokenizer.json at the same path, or an edit that keeps size and
    mtime, silently reused the old copy. Content hashes decide; unchanged inputs reuse it."""
    pytest.importorskip("tokenizers")
    rows = random_rows(20)
    src = write_jsonl(tmp_path / "train.jsonl", rows)
    tok = tmp_path / "tok" / "tokenizer.json"
    tok.parent.mkdir()
    train_bpe(tok, [r["instruction"] + r["response"] for r in rows])
    cfg = load_config(None, [f"tokenizer={tok}", "context_size=4097", "capacity=4096"])
    work = tmp_path / "work"
    first = prepared_dataset(src, work, cfg, CPU, "train")
    assert prepared_dataset(src, work, cfg, CPU, "train") == first

    stat = src.stat()
    text = src.read_text()
    src.write_text(text.replace("alpha", "gamma", 1) if "alpha" in text else text.upper())
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert src.stat().st_size == stat.st_size
    edited = prepared_dataset(src, work, cfg, CPU, "train")
    assert edited != first

    shutil.copy(tok, tmp_path / "old.json")
    train_bpe(tok, [r["response"] for r in rows], vocab_size=280)  # same path, new tokenizer
    retokenized = prepared_dataset(src, work, cfg, CPU, "train")
    assert retokenized not in (first, edited)
    shutil.copy(tmp_path / "old.json", tok)
    assert prepared_dataset(src, work, cfg, CPU, "train") == edited
