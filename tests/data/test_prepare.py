"""prepare-sft: round trip, truncation at the seed's boundary, bad input, atomic writes, determinism."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from datahelpers import random_rows, train_bpe, write_jsonl
from prefixlm.data import V1Dataset, load_tokenizer, prepare_sft
from prefixlm.data.prepare import InputError

Q = dict(progress=False)


def _decoded(path):
    ds = V1Dataset(path)
    tok = ds.tokenizer()
    e = ds.epoch(0)
    order = np.argsort(e.inst_start)  # file order
    return [(tok.decode(ds.sample(0, i)[0]), tok.decode(ds.sample(0, i)[1])) for i in order]


def test_roundtrip_byte_unicode_and_chat(tmp_path):
    """Guards that every row comes back exactly: text, unicode, markers, chat rendering, eoa."""
    rows = [{"instruction": "Hello", "response": "World"},
            {"instruction": "数据 🙂 ünï", "response": "ok ✓", "condition": "math"},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                          {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                          {"role": "assistant", "content": "A2"}, {"role": "user", "content": "late"}]}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = prepare_sft([src], tmp_path / "out", context_size=256, conditions=["math"], **Q)
    assert _decoded(tmp_path / "out") == [
        ("<|inst|>Hello<|/inst|>", "World<|eoa|>"),
        ("<|inst|><|cond:math|>数据 🙂 ünï<|/inst|>", "ok ✓<|eoa|>"),
        ("<|inst|>system: S\n\nuser: U\n\nassistant: A1\n\nuser: U2<|/inst|>", "A2<|eoa|>")]
    assert report["counts"]["kept"] == 3 and report["counts"]["chat_turns_ignored"] == 1
    on_disk = json.loads((tmp_path / "out" / "report.json").read_text())
    assert on_disk["counts"] == report["counts"]
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["max_seq_len"] == 256 and meta["tokenizer_info"]["vocab_size"] == 261
    assert "vocab_size" not in meta  # HRM-Text's reader asserts it is absent at the top level
    assert V1Dataset(tmp_path / "out").tokens.dtype == np.int32


def test_roundtrip_hf_bpe(tmp_path):
    """Guards the HF path: batched encoding, tokenizer.json copied, dataset reloads its tokenizer."""
    rows = random_rows(50)
    tokjson = train_bpe(tmp_path / "tokenizer.json", [r["instruction"] + r["response"] for r in rows])
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    prepare_sft([src], tmp_path / "out", tokenizer=str(tokjson), context_size=4097, **Q)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == tokjson.read_bytes()
    got = _decoded(tmp_path / "out")
    assert got == [(f"<|inst|>{r['instruction']}<|/inst|>", f"{r['response']}<|eoa|>") for r in rows]
    assert load_tokenizer(str(tmp_path / "out")).eoa_id == load_tokenizer(str(tokjson)).eoa_id


def _boundary(tmp_path, policy, prefix_tokens, response, k=1, name="out"):
    """One row whose rendered prefix has `prefix_tokens` byte tokens (2 markers + text)."""
    text = "ab" + "x" * (prefix_tokens - 4)  # starts with "ab" so left truncation is visible
    src = write_jsonl(tmp_path / f"{name}.jsonl", [{"instruction": text, "response": response}])
    try:
        report = prepare_sft([src], tmp_path / name, context_size=4097, truncation=policy,
                             min_response_tokens=k, **Q)
    except InputError as exc:
        assert "no samples kept" in str(exc)
        return None, str(exc)
    return V1Dataset(tmp_path / name), report


@pytest.mark.parametrize("policy", ["drop", "truncate-prefix", "truncate-response"])
def test_exact_fit_is_kept(tmp_path, policy):
    """Guards an off-by-one at the boundary: inst_len + resp_len == context fits (4095 + 'a'+eoa)."""
    ds, report = _boundary(tmp_path, policy, 4095, "a")
    e = ds.epoch(0)
    assert (int(e.inst_len[0]), int(e.resp_len[0])) == (4095, 2)
    assert report["counts"]["kept"] == 1 and report["longest_sample"]["seq_len"] == 4096


def test_seed_boundary_drop(tmp_path):
    """Guards the seed's bug: a 4096-token prefix at context 4097 must not become causal_len 0."""
    ds, msg = _boundary(tmp_path, "drop", 4096, "a")
    assert ds is None and "dropped_too_long=1" in msg


def test_seed_boundary_truncate_prefix(tmp_path):
    """Guards truncate-prefix: cut text from the left, keep markers and the whole response."""
    ds, report = _boundary(tmp_path, "truncate-prefix", 4096, "a")
    inst, resp = ds.sample(0, 0)
    tok = ds.tokenizer()
    assert len(inst) == 4095 and len(resp) == 2 and resp[-1] == tok.eoa_id
    assert inst[0] == tok.inst_begin_id and inst[-1] == tok.inst_end_id
    assert tok.decode(inst[1:3]) == "bx"  # exactly one token cut, from the left
    assert report["counts"]["truncated_prefix"] == 1


def test_seed_boundary_truncate_response(tmp_path):
    """Guards truncate-response: keeps >= K causal tokens, drops the eoa of a cut response, and
    drops a sample that cannot keep K."""
    ds, msg = _boundary(tmp_path, "truncate-response", 4096, "abc")
    assert ds is None and "dropped_too_long=1" in msg
    ds, report = _boundary(tmp_path, "truncate-response", 4094, "abcdef", name="o2")
    inst, resp = ds.sample(0, 0)
    assert len(inst) + len(resp) == 4097 and ds.tokenizer().decode(resp) == "abc"
    assert report["counts"]["truncated_response"] == 1
    ds, msg = _boundary(tmp_path, "truncate-response", 4094, "abcdef", k=3, name="o3")
    assert ds is None and "dropped_too_long=1" in msg


@pytest.mark.parametrize("policy", ["drop", "truncate-prefix", "truncate-response"])
def test_empty_and_short_responses_dropped(tmp_path, policy):
    """Guards that an empty response (causal_len 0) or one below K is never emitted, any policy."""
    rows = [{"instruction": "q", "response": ""}, {"instruction": "q", "response": "ab"},
            {"instruction": "q", "response": "abcd"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = prepare_sft([src], tmp_path / "out", context_size=64, truncation=policy,
                         min_response_tokens=3, **Q)
    e = V1Dataset(tmp_path / "out").epoch(0)
    assert (e.resp_len - 1 >= 3).all() and len(e) == 1
    assert report["counts"]["dropped_empty"] == 2


BAD_LINES = [
    (b'{"instruction": "a", "response": ', "invalid JSON"),
    (b'{"instruction": "a"}', "missing field 'response'"),
    (b'{"instruction": "a", "response": 3}', "field 'response' must be a string, got int"),
    (b'{"instruction": "a", "response": "b", "condition": "zzz"}', "unknown condition 'zzz'"),
    (b'{"instruction": "a\xff", "response": "b"}', "not valid UTF-8"),
    (b'{"instruction": "\\ud800", "response": "b"}', "lone surrogate"),
    (b'[1, 2]', "expected a JSON object"),
    (b'{"messages": [{"role": "user", "content": "a"}]}', "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": 1}]}', "messages[0].content must be a string"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_malformed_row_names_file_and_line(tmp_path, line, message):
    """Guards that each kind of bad row gives file:line and the reason, or is counted when skipped."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "response": "b"}] * 2,
                      raw_lines=[line])
    with pytest.raises(InputError) as info:
        prepare_sft([src], tmp_path / "out", context_size=64, **Q)
    assert f"{src}:3: " in str(info.value) and message in str(info.value)
    assert not (tmp_path / "out").exists()
    report = prepare_sft([src], tmp_path / "out", context_size=64, skip_invalid=True, **Q)
    assert report["counts"]["dropped_malformed"] == 1 and report["samples"] == 2
    assert report["counts"]["rows"] == 3


def test_empty_file(tmp_path):
    """Guards that an empty input file is an error naming it (or counted with --skip-invalid)."""
    good = write_jsonl(tmp_path / "good.jsonl", [{"instruction": "a", "response": "b"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(InputError, match="empty.jsonl: the file has no rows"):
        prepare_sft([good, empty], tmp_path / "out", context_size=64, **Q)
    report = prepare_sft([good, empty], tmp_path / "out", context_size=64, skip_invalid=True, **Q)
    assert report["counts"]["empty_files"] == 1


def test_interrupted_write_keeps_old_dataset(tmp_path, monkeypatch):
    """Guards atomicity: an exception mid-write leaves the older dataset intact and no temp files."""
    import prefixlm.data.writer as writer

    src = write_jsonl(tmp_path / "in.jsonl", random_rows(20))
    prepare_sft([src], tmp_path / "out", context_size=4097, **Q)
    before = (tmp_path / "out" / "tokens.npy").read_bytes()

    def boom(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "_write_npy_from_raw", boom)
    src2 = write_jsonl(tmp_path / "in2.jsonl", random_rows(30, seed=1))
    with pytest.raises(KeyboardInterrupt):
        prepare_sft([src2], tmp_path / "out", context_size=4097, overwrite=True, **Q)
    assert (tmp_path / "out" / "tokens.npy").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "in2.jsonl", "out"]
    V1Dataset(tmp_path / "out").validate()


@pytest.mark.parametrize("where", ["tokenize", "commit"])
def test_killed_write_keeps_old_dataset(tmp_path, where):
    """Guards against a SIGKILL (no cleanup runs) leaving a half dataset in place of the old one."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(20))
    prepare_sft([src], tmp_path / "out", context_size=4097, **Q)
    before = (tmp_path / "out" / "tokens.npy").read_bytes()
    src2 = write_jsonl(tmp_path / "in2.jsonl", random_rows(30, seed=1))
    target = "_write_npy_from_raw" if where == "tokenize" else "commit"
    script = textwrap.dedent(f"""
        import os, signal
        import prefixlm.data.prepare as prep
        import prefixlm.data.writer as writer
        writer.{target} = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        prep.prepare_sft([{str(src2)!r}], {str(tmp_path / "out")!r}, context_size=4097,
                         overwrite=True, progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -9
    assert (tmp_path / "out" / "tokens.npy").read_bytes() == before
    V1Dataset(tmp_path / "out").validate()


def test_overwrite_replaces_and_refuses_without_flag(tmp_path):
    """Guards that an existing dataset is never replaced silently, and is replaced with overwrite."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(5))
    prepare_sft([src], tmp_path / "out", context_size=4097, **Q)
    with pytest.raises(ValueError, match="already exists"):
        prepare_sft([src], tmp_path / "out", context_size=4097, **Q)
    src2 = write_jsonl(tmp_path / "in2.jsonl", random_rows(7))
    prepare_sft([src2], tmp_path / "out", context_size=4097, overwrite=True, **Q)
    assert V1Dataset(tmp_path / "out").metadata["num_samples"] == 7
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "in2.jsonl", "out"]


def test_deterministic_and_epochs_shuffled(tmp_path):
    """Guards determinism (same inputs + seed -> identical files) and per-epoch orders."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(200))
    for name in ("a", "b"):
        prepare_sft([src], tmp_path / name, context_size=4097, epochs=3, seed=7, **Q)
    files = ["tokens.npy", "tokenizer.json", "rows.jsonl"] + [
        f"epoch_{k}/{f}.npy" for k in range(3) for f in ("inst_start", "inst_len", "resp_start",
                                                         "resp_len")]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    for f in ("metadata.json", "tokenizer_info.json"):  # the same but for the folder they name
        a, b = (json.loads((tmp_path / d / f).read_text()) for d in "ab")
        info_a, info_b = (x.get("tokenizer_info", x) for x in (a, b))
        assert (info_a.pop("tokenizer_path"), info_b.pop("tokenizer_path")) == (
            str((tmp_path / "a").resolve()), str((tmp_path / "b").resolve()))
        assert a == b, f
    ds = V1Dataset(tmp_path / "a")
    e0, e1 = ds.epoch(0), ds.epoch(1)
    assert not np.array_equal(e0.inst_start, e1.inst_start)
    assert sorted(e0.inst_start) == sorted(e1.inst_start)


def test_report_histograms_and_packing(tmp_path):
    """Guards the report contents: counts add up, histograms count every sample, packing stats."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(100) + [{"instruction": "q",
                                                                  "response": ""}])
    r = prepare_sft([src], tmp_path / "out", context_size=512, **Q)
    c = r["counts"]
    assert c["kept"] + c["dropped_empty"] + c["dropped_too_long"] == c["rows"] == 101
    for h in r["histograms"].values():
        assert sum(h.values()) == r["samples"]
    assert 0.5 < r["packing"]["efficiency"] <= 1.0 and r["packing"]["capacity"] == 511
