"""Dataset writer: what --overwrite may replace, leftovers of killed writers, failures lose
nothing."""

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from datahelpers import random_rows, write_jsonl
from prefixlm.data import V1Dataset, prepare_sft
from prefixlm.fsutil import host_name

Q = dict(progress=False, context_size=4097)


def test_overwrite_never_deletes_what_is_not_our_dataset(tmp_path, monkeypatch):
    """Guards the data loss `prepare-sft --input project/data/train.jsonl --output project/data
    --overwrite` (deleted train.jsonl and notes.txt): --overwrite replaces only a dataset
    prefixlm wrote; a folder holding the input, the current directory or a parent of the input,
    a file, a link, a foreign dataset or our dataset with extra files are refused with the reason,
    and nothing is touched."""
    pytest.importorskip("tokenizers", reason="the foreign dataset uses a HuggingFace tokenizer")
    from hrmformats import build_hf_tokenizer, hrm_prepare_sft

    project = tmp_path / "project"
    data = project / "data"
    data.mkdir(parents=True)
    src = write_jsonl(data / "train.jsonl", random_rows(5))
    (data / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("x")
    build_hf_tokenizer(tmp_path / "tok")
    foreign = tmp_path / "foreign"  # HRM-Text's SFT output
    hrm_prepare_sft(src, tmp_path / "tok" / "tokenizer.json", foreign, epochs=1)
    ours = tmp_path / "ours"
    prepare_sft([src], ours, **Q)
    (tmp_path / "link").symlink_to(ours)
    (ours / "notes.txt").write_text("mine")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x").write_text("x")
    cases = [(data, "holds the input file"), (project, "is the current directory"),
             (".", "is the current directory"), (tmp_path, "is the current directory or one"),
             (tmp_path / "a_file", "is a file"), (tmp_path / "link", "is a symbolic link"),
             (foreign, "not a dataset prefixlm wrote"),
             (ours, "holds files prefixlm did not write: notes.txt"),
             (plain, "it has no metadata.json")]
    monkeypatch.chdir(project)
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for output, reason in cases:
        with pytest.raises(ValueError, match=reason):
            prepare_sft([src], output, overwrite=True, **Q)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == snapshot

    (ours / "notes.txt").unlink()
    prepare_sft([write_jsonl(tmp_path / "new.jsonl", random_rows(7))], ours, overwrite=True, **Q)
    assert V1Dataset(ours).metadata["num_samples"] == 7
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_sft([src], empty, **Q)  # an empty folder needs no --overwrite
    assert V1Dataset(empty).metadata["num_samples"] == 5


def test_parent_that_is_a_file_is_named(tmp_path):
    """Guards `File exists: afile` for --output afile/x: the message says which part is a file."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(2))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match="afile is a file, not a directory"):
        prepare_sft([src], tmp_path / "afile" / "sub" / "x", **Q)


def test_disk_full_loses_nothing(tmp_path, monkeypatch):
    """Guards a full disk mid-prepare: the error names the dataset (a failed write names no
    file), the old dataset is intact and no temporary folder is left."""
    import prefixlm.data.writer as writer

    src = write_jsonl(tmp_path / "in.jsonl", random_rows(20))
    prepare_sft([src], tmp_path / "out", **Q)
    before = (tmp_path / "out" / "tokens.npy").read_bytes()

    def full(self, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer.DatasetWriter, "append_tokens", full)
    with pytest.raises(OSError) as info:
        prepare_sft([src], tmp_path / "out", overwrite=True, **Q)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "out")
    assert (tmp_path / "out" / "tokens.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out"]


def test_leftovers_of_killed_prepares_are_cleaned_but_not_live_ones(tmp_path):
    """Guards `.NAME.tmp-*` folders of killed prepares piling up (149 MB after 10 kills): the next
    prepare of the same output removes those whose process is dead, never one a live prepare
    (here: a running process's pid) is still writing, nor those of other outputs or hosts."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(20))
    script = textwrap.dedent(f"""
        import os, signal
        import prefixlm.data.prepare as prep
        import prefixlm.data.writer as writer
        writer._write_npy_from_raw = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        prep.prepare_sft([{str(src)!r}], {str(tmp_path / "out")!r}, context_size=4097,
                         progress=False)
    """)
    left = []
    for _ in range(2):  # the second run removes the folder of the first
        assert subprocess.run([sys.executable, "-c", script]).returncode == -9
        left.append([p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")])
        assert len(left[-1]) == 1 and not (tmp_path / "out").exists()
    assert left[0] != left[1]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [tmp_path / f".out.tmp-{live.pid}@{host_name()}-0123abcd",
                tmp_path / f".other.tmp-999999@{host_name()}-0123abcd",
                tmp_path / ".out.tmp-999999@another-host-0123abcd"]
        for p in keep:
            p.mkdir()
        prepare_sft([src], tmp_path / "out", **Q)
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
        assert left == sorted(p.name for p in keep)
    finally:
        live.kill()
        live.wait()
    V1Dataset(tmp_path / "out").validate()


def test_a_commit_killed_between_renames_is_undone(tmp_path):
    """Guards the two-rename commit (where the OS cannot swap folders): a kill between the renames
    leaves the previous dataset under `.NAME.old-*` and no output; the next prepare puts it back
    before writing, so it is never lost."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(5))
    prepare_sft([src], tmp_path / "out", **Q)
    old = tmp_path / f".out.old-999999@{host_name()}-0123abcd"
    os.replace(tmp_path / "out", old)
    with pytest.raises(ValueError, match="already exists"):  # restored first, then refused
        prepare_sft([src], tmp_path / "out", **Q)
    assert not old.exists() and V1Dataset(tmp_path / "out").metadata["num_samples"] == 5
    shutil.rmtree(tmp_path / "out")
