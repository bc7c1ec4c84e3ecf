"""Parallel streaming tokenization into the cache: same tokens whatever the workers and chunks,
errors with file:line from the workers, bounded chunks in flight."""

import json

import numpy as np
import pytest

import prefixlm.data.encode as encode
from datahelpers import random_rows, write_jsonl
from prefixlm.data.cache import SAMPLE_FIELDS, SourceCache
from prefixlm.data.encode import InputError, ReadOptions, encode_sources
from prefixlm.data.sources import Source
from prefixlm.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer(conditions=["c"])


def _job(path, kind="jsonl", key=None, **options):
    source = Source(path.name, path, kind, "test", options={"read": ReadOptions(**options)})
    return source, key or f"key-{path.name}-{sorted(options.items())}", {"version": 1}


def _entry_bytes(entry):
    return {name: (entry.path / f"{name}.bin").read_bytes() for name in ("tokens", *SAMPLE_FIELDS)}


def _rows():
    rows = random_rows(600, seed=3)
    rows[5]["condition"] = "c"
    rows[7] = {"messages": [{"role": "user", "content": "q1"},
                            {"role": "assistant", "content": "a1"},
                            {"role": "user", "content": "q2"},
                            {"role": "assistant", "content": "a2"}]}
    return rows


@pytest.mark.parametrize("turns", ["last", "all"])
def test_workers_and_chunk_sizes_give_the_same_entry(tmp_path, monkeypatch, turns):
    """Guards chunks reassembled out of order, rows lost or doubled at chunk boundaries and line
    numbers shifted between chunks: two worker processes on tiny chunks write byte for byte the
    entry one in-process pass writes."""
    src = write_jsonl(tmp_path / "a.jsonl", _rows(), raw_lines=[b"", b"   "])
    one = encode_sources([_job(src, turns=turns)], TOK, None, SourceCache(tmp_path / "c1"), 1,
                         64.0, progress=False)["a.jsonl"]
    monkeypatch.setattr(encode, "MIN_CHUNK", 1)
    two = encode_sources([_job(src, turns=turns)], TOK, None, SourceCache(tmp_path / "c2"), 2,
                         0.01, progress=False)["a.jsonl"]
    assert _entry_bytes(one) == _entry_bytes(two)
    assert one.meta["counts"] == two.meta["counts"] == {
        "rows": 600, "blank_lines": 2, "malformed": 0, "chat_turns_ignored": 0}
    assert one.meta["samples"] == 600 + (turns == "all")
    chat = np.flatnonzero(np.asarray(one.line) == 8)
    assert np.asarray(one.turn)[chat].tolist() == ([1, 3] if turns == "all" else [3])


def test_bad_row_stops_with_file_and_line_from_a_worker(tmp_path):
    """Guards a worker's error surfacing as a traceback of the pool, or naming the chunk's line
    instead of the row's; the source must not be left half-cached."""
    lines = [json.dumps(r).encode() for r in random_rows(400)]
    lines[250] = b'{"instruction": "a", "response": 3}'
    src = write_jsonl(tmp_path / "a.jsonl", [], raw_lines=lines)
    cache = SourceCache(tmp_path / "cache")
    with pytest.raises(InputError, match=rf"^{src}:251: field 'response' must be a string, got "
                                         rf"int"):
        encode_sources([_job(src)], TOK, None, cache, 2, 0.001, progress=False)
    assert list(cache.root.iterdir()) == []  # no entry, no temporary folder


def test_parquet_errors_name_the_row_and_the_column(tmp_path):
    """Guards Parquet rows reported without a place: a null cell names the file, the row index
    and the (mapped) column."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "answer": ["x", None, "z"]}),
                   tmp_path / "a.parquet")
    names = (("instruction", "prompt"), ("response", "answer"))
    with pytest.raises(InputError, match=r"a.parquet: row 1, column 'answer': field 'answer' "
                                         r"must be a string, got null"):
        encode_sources([_job(tmp_path / "a.parquet", "parquet", names=names)], TOK, None,
                       SourceCache(tmp_path / "c"), 1, 1.0, progress=False)
    entry = encode_sources([_job(tmp_path / "a.parquet", "parquet", names=names,
                                 skip_invalid=True)], TOK, None, SourceCache(tmp_path / "c"), 1,
                           1.0, progress=False)["a.parquet"]
    assert entry.meta["counts"]["malformed"] == 1 and entry.meta["samples"] == 2
    assert np.asarray(entry.line).tolist() == [0, 2]  # row indices of the kept rows
    assert "row 1, column 'answer'" in entry.meta["malformed_examples"][0]


def test_chunks_in_flight_are_bounded(tmp_path, monkeypatch):
    """Guards reading the whole corpus ahead of the workers (memory growing with the corpus, as
    multiprocessing's imap does): at most two chunks per worker are read but not yet written."""
    src = write_jsonl(tmp_path / "a.jsonl", random_rows(3000))
    monkeypatch.setattr(encode, "MIN_CHUNK", 1)
    written = []
    read_ahead = []
    real_chunks = encode.jsonl_chunks

    def counting_chunks(path, size):
        for n, item in enumerate(real_chunks(path, size)):
            read_ahead.append(n - len(written))
            yield item

    real_append = encode.SourceCache.writer

    def counting_writer(self, key):
        w = real_append(self, key)
        append = w.append
        w.append = lambda *a: (written.append(1), append(*a))
        return w

    monkeypatch.setattr(encode, "jsonl_chunks", counting_chunks)
    monkeypatch.setattr(encode.SourceCache, "writer", counting_writer)
    encode_sources([_job(src)], TOK, None, SourceCache(tmp_path / "c"), 2, 0.002,
                   progress=False)
    assert len(read_ahead) > 20 and max(read_ahead) <= 2 * 2


def test_cached_sources_are_not_read(tmp_path, monkeypatch):
    """Guards re-tokenizing a source whose entry is complete."""
    src = write_jsonl(tmp_path / "a.jsonl", random_rows(20))
    cache = SourceCache(tmp_path / "c")
    encode_sources([_job(src)], TOK, None, cache, 1, 1.0, progress=False)
    monkeypatch.setattr(encode, "jsonl_chunks", lambda *a: pytest.fail("read again"))
    again = encode_sources([_job(src)], TOK, None, cache, 1, 1.0, progress=False)
    assert again["a.jsonl"].meta["samples"] == 20


def test_an_empty_source_is_an_error_unless_skipped(tmp_path):
    """Guards an empty file silently contributing nothing to a mixture."""
    src = write_jsonl(tmp_path / "a.jsonl", [], raw_lines=[b""])
    with pytest.raises(InputError, match="the source has no rows"):
        encode_sources([_job(src)], TOK, None, SourceCache(tmp_path / "c"), 1, 1.0,
                       progress=False)


def test_parquet_chat_rows_are_the_jsonl_rows(tmp_path):
    """Guards Parquet chat rows (a list<struct<role, content>> column) read other than their JSONL
    twins: the same samples, in the same order."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"},
                          {"role": "assistant", "content": f"a{i}"},
                          {"role": "user", "content": "more?"},
                          {"role": "assistant", "content": "no"}], "condition": "c"}
            for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    write_jsonl(tmp_path / "chat.jsonl", rows)
    got = {}
    for name, kind in (("chat.parquet", "parquet"), ("chat.jsonl", "jsonl")):
        got[kind] = encode_sources([_job(tmp_path / name, kind, turns="all")], TOK, None,
                                   SourceCache(tmp_path / kind), 1, 1.0, progress=False)[name]
    assert np.asarray(got["parquet"].tokens).tolist() == np.asarray(got["jsonl"].tokens).tolist()
    assert got["parquet"].meta["samples"] == 10
