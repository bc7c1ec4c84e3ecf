"""The tokenized-source cache: keys, complete entries only, leftovers of killed runs."""

import os
import subprocess
import sys

import numpy as np
import pytest

from prefixlm.data.cache import CachedSource, SourceCache, cache_key
from prefixlm.fsutil import file_sha256
from prefixlm.data.render import encode_rows
from prefixlm.data.tokenizer import ByteTokenizer
from prefixlm.fsutil import host_name


def _fill(cache, key, rows=(("ab", "c", None), ("d", "efg", None))):
    encoded = encode_rows(ByteTokenizer(), list(rows))
    writer = cache.writer(key)
    writer.append(encoded, np.arange(1, len(rows) + 1), np.full(len(rows), -1))
    return writer.commit({"version": 1, "counts": {}})


def test_an_entry_round_trips_and_is_found_by_key(tmp_path):
    """Guards a cache entry that reads back other samples than were written."""
    cache = SourceCache(tmp_path)
    entry = _fill(cache, "k")
    again = cache.get("k")
    assert again is not None and again.meta["samples"] == 2
    assert np.asarray(again.tokens).tolist() == np.asarray(entry.tokens).tolist()
    assert np.asarray(again.inst_len).tolist() == [4, 3]   # inst_begin + text + inst_end
    assert np.asarray(again.starts).tolist() == [0, 6]
    assert cache.get("other") is None


def test_key_depends_on_content_and_settings(tmp_path):
    """Guards a stale entry served after an edit or a change of tokenizer/options."""
    a = tmp_path / "a"
    a.write_text("one")
    digest = file_sha256(a)
    assert cache_key(digest, {"t": 1}) == cache_key(digest, {"t": 1})
    assert cache_key(digest, {"t": 1}) != cache_key(digest, {"t": 2})
    a.write_text("two")
    assert cache_key(file_sha256(a), {"t": 1}) != cache_key(digest, {"t": 1})


def test_unfinished_entries_are_invisible_and_leftovers_of_dead_runs_go(tmp_path):
    """Guards a killed run's half-written entry being used, and its temporary folder piling up;
    a live run's folder must survive."""
    cache = SourceCache(tmp_path)
    writer = cache.writer("k")
    writer.append(encode_rows(ByteTokenizer(), [("a", "b", None)]), np.ones(1), np.ones(1))
    assert cache.get("k") is None  # nothing committed
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    os.rename(writer.path, tmp_path / f".tmp-{dead}@{host_name()}-0123abcd")
    live = tmp_path / f".tmp-{os.getpid()}@{host_name()}-89abcdef"
    live.mkdir()
    cache = SourceCache(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [live.name]


def test_a_damaged_entry_is_an_error_naming_it(tmp_path):
    """Guards reading garbage from a truncated cache file."""
    entry = _fill(SourceCache(tmp_path), "k")
    with open(entry.path / "tokens.bin", "r+b") as f:
        f.truncate(3)
    with pytest.raises(ValueError, match="damaged cache entry; remove the folder"):
        CachedSource(entry.path)
