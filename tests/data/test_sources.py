"""Mixture sources: what an entry names, data_io's source names, chunked reading, data_io
folders."""

import numpy as np
import pytest

from prefixlm.data.sources import (expand_entry, jsonl_chunks, parquet_chunks, parquet_columns,
                                   read_data_io_source)


def _touch(path, text="{}\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_names_follow_data_io(tmp_path):
    """Guards prefix_config.yaml matching nothing: a folder or a glob names its files as data_io's
    tokenizer does (path under the root, '/' -> '__', extension kept), so `SYNTH__` rules apply to
    data_clustered/SYNTH/part0.parquet."""
    root = tmp_path / "data_clustered"
    _touch(root / "SYNTH" / "part0.parquet")
    _touch(root / "flan__cot_a.jsonl")
    _touch(root / "notes.txt")
    by_folder = expand_entry("data_clustered", tmp_path, "w")
    assert [(s.name, s.kind) for s in by_folder] == [("SYNTH__part0.parquet", "parquet"),
                                                     ("flan__cot_a.jsonl", "jsonl")]
    by_glob = expand_entry("data_clustered/**/*.parquet", tmp_path, "w")
    assert [s.name for s in by_glob] == ["SYNTH__part0.parquet"]
    assert [s.name for s in expand_entry("data_clustered/SYNTH/*", tmp_path, "w")] == \
        ["part0.parquet"]
    assert [s.name for s in expand_entry("data_clustered", tmp_path, "w", name="mix")] == \
        ["mix__SYNTH__part0.parquet", "mix__flan__cot_a.jsonl"]
    assert [s.name for s in expand_entry(str(root / "flan__cot_a.jsonl"), tmp_path, "w",
                                         name="flan")] == ["flan"]


def test_data_io_tokenized_folder_is_one_source_per_sub_folder(hrm_fixtures):
    """Guards a data_io tokenized folder read as JSONL sources (or not at all): each sub-folder
    is a source named by its folder, kind data_io."""
    sources = expand_entry(str(hrm_fixtures["tokenized"]), hrm_fixtures["root"], "w")
    assert {s.kind for s in sources} == {"data_io"}
    assert [s.name for s in sources] == sorted(p.name for p in hrm_fixtures["tokenized"].iterdir()
                                               if p.is_dir())
    assert all(s.data_io_root == hrm_fixtures["tokenized"] for s in sources)


@pytest.mark.parametrize("path, expected", [
    ("nothing/*.jsonl", "w.path: 'nothing/*.jsonl' matches no"),
    ("missing.jsonl", "w.path: 'missing.jsonl' does not exist"),
    ("empty", "holds no .jsonl or .parquet file"),
    ("x.csv", "is neither .jsonl nor .parquet"),
])
def test_entries_naming_nothing_are_errors(tmp_path, path, expected):
    """Guards a mixture silently missing a source: a glob matching nothing, a missing file, an
    empty folder and an unknown extension are errors naming the entry."""
    (tmp_path / "empty").mkdir()
    _touch(tmp_path / "x.csv")
    with pytest.raises(ValueError, match=expected.replace("*", r"\*").replace(".", r"\.")):
        expand_entry(path, tmp_path, "w")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_jsonl_chunks_are_whole_lines_with_their_numbers(tmp_path, chunk):
    """Guards rows cut in two at a chunk boundary and wrong file:line numbers in errors: chunks
    are whole lines, in order, each with the number of its first line."""
    lines = [f'{{"i": {i}, "pad": "{"x" * (i % 13)}"}}' for i in range(50)] + ["", "last"]
    path = _touch(tmp_path / "a.jsonl", "\n".join(lines))  # no final newline
    seen = []
    for first, block, size in jsonl_chunks(path, chunk):
        assert size == len(block)
        parts = block.split(b"\n")
        if block.endswith(b"\n"):
            parts.pop()
        assert first == len(seen) + 1
        seen += [p.decode() for p in parts]
    assert seen == lines


def test_parquet_chunks_cover_every_row_once(tmp_path):
    """Guards rows lost or repeated between Parquet record batches, and the row index an error
    names."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"instruction": [f"q{i}" * 20 for i in range(100)],
                      "response": [f"a{i}" for i in range(100)], "extra": list(range(100))})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=30)
    names = {f: f for f in ("instruction", "response", "condition", "messages", "tools")}
    columns = parquet_columns(tmp_path / "a.parquet", names)
    assert columns == ["instruction", "response"]
    rows = []
    for first, batch, _ in parquet_chunks(tmp_path / "a.parquet", 500, columns):
        assert first == len(rows) and batch.num_rows < 100
        rows += batch.column("response").to_pylist()
    assert rows == [f"a{i}" for i in range(100)]
    with pytest.raises(ValueError, match="no column 'answer'.*the file has instruction, "
                                         "response, extra"):
        parquet_columns(tmp_path / "a.parquet", {**names, "response": "answer"})


def test_data_io_rows_outside_the_tokens_are_refused(tmp_path):
    """Guards reading past a data_io tokens.npy (a truncated copy, a stale index): the folder and
    the row are named."""
    folder = tmp_path / "src.jsonl"
    folder.mkdir()
    np.save(folder / "tokens.npy", np.arange(10, dtype="<u4"))
    for name, values in (("inst_start", [0, 6]), ("inst_len", [3, 3]), ("resp_start", [3, 9]),
                         ("resp_len", [3, 3])):
        np.save(folder / f"{name}.npy", np.asarray(values, "<u8"))
    with pytest.raises(ValueError, match=r"src.jsonl: row 1: resp_start 9, resp_len 3 outside"):
        read_data_io_source(folder)
