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
    target = "_write_npy_from_raw" if where == "tokenize" else "replace_dir"
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


HRM_OPTIONS = dict(special_tokens={"inst_begin": "<|im_start|>", "inst_end": "<|im_end|>",
                                   "eoa": "<|box_end|>", "pad": None},
                   conditions={"direct": "<|object_ref_start|>", "cot": "<|object_ref_end|>",
                               "noisy": "<|quad_start|>", "synth": "<|quad_end|>"})


def _by_start(ds, k=0):
    """Epoch k's index arrays in token-stream order (writers shuffle epochs differently)."""
    e = ds.epoch(k)
    order = np.argsort(e.inst_start)
    return [a[order].tolist() for a in e]


@pytest.mark.parametrize("parse", [True, False])
def test_same_tokens_as_hrm_text_sft_script(hrm_fixtures, tmp_path, parse):
    """Guards drifting from HRM-Text's scripts/prepare_sft_data.py on the same JSONL and
    tokenizer.json: with its markers, its default condition `direct` and special-token strings
    parsed, tokens.npy is byte-identical and the samples are the same; with the default plain
    text only the row holding `<|box_end|>` differs (no end-of-answer id inside the response)."""
    out = tmp_path / "ours"
    report = prepare_sft([hrm_fixtures["sft_input"]], out, tokenizer=str(hrm_fixtures["tokenizer"]),
                         context_size=4097, parse_special_tokens=parse, **HRM_OPTIONS, **Q)
    theirs = V1Dataset(hrm_fixtures["sft"])
    ours = V1Dataset(out)
    assert report["counts"]["default_condition_rows"] == 3 and report["counts"]["kept"] == 3
    assert report["counts"]["special_text_rows"] == 1 and report["counts"]["dropped_empty"] == 1
    if parse:
        assert (out / "tokens.npy").read_bytes() == (hrm_fixtures["sft"] / "tokens.npy").read_bytes()
        assert _by_start(ours) == _by_start(theirs)
        return
    tok = ours.tokenizer()
    mine, ref = _by_start(ours), _by_start(theirs)
    for i in range(3):
        a = ours.sample(0, int(np.flatnonzero(ours.epoch(0).inst_start == mine[0][i])[0]))
        b = theirs.sample(0, int(np.flatnonzero(theirs.epoch(0).inst_start == ref[0][i])[0]))
        if i < 2:
            assert [x.tolist() for x in a] == [x.tolist() for x in b]
        else:
            assert a[0].tolist() == b[0].tolist()
            assert tok.eoa_id in b[1][:-1].tolist() and tok.eoa_id not in a[1][:-1].tolist()
            assert tok.decode(a[1]) == "ok<|box_end|>done<|box_end|>"


def test_same_tokens_as_data_io_tokenizer(hrm_fixtures, tmp_path):
    """Guards drifting from data_io's tokenizer on rows that all carry a condition: multi-tag
    conditions (`synth,cot`: one token per tag, in order), special-token text as plain text; the
    samples equal its per-source folder's, token for token."""
    src = hrm_fixtures["raw"] / "gsm8k_train.jsonl"
    out = tmp_path / "ours"
    prepare_sft([src], out, tokenizer=str(hrm_fixtures["tokenizer"]), context_size=4097,
                **HRM_OPTIONS, **Q)
    theirs = hrm_fixtures["tokenized"] / "gsm8k_train.jsonl"
    ref_tokens = np.load(theirs / "tokens.npy")
    ref = {k: np.load(theirs / f"{k}.npy") for k in ("inst_start", "inst_len", "resp_start",
                                                     "resp_len")}
    ds = V1Dataset(out)
    assert np.load(out / "tokens.npy").tolist() == ref_tokens.tolist()
    assert _by_start(ds) == [ref[k].tolist() for k in ("inst_start", "inst_len", "resp_start",
                                                        "resp_len")]
    tok = ds.tokenizer()
    head = ds.sample(0, int(np.argmin(ds.epoch(0).inst_start)))[0][:3].tolist()
    assert head == [tok.inst_begin_id, tok.condition_ids["synth"], tok.condition_ids["cot"]]


def test_hrm_text_reader_and_inference_read_our_dataset(hrm_fixtures, tmp_path, monkeypatch):
    """Guards our metadata lacking what HRM-Text's tools need: its reader's checks (required
    ints, null top-level vocab_size, tokenizer_info.vocab_size, index files per epoch) pass and
    give our loader's samples; its inference engine finds a loadable tokenizer at tokenizer_path
    and renders the same prefix for a prompt as our dataset holds; its HF converter's bos/eos
    (boq, eoa) are our markers."""
    from hrmformats import hrm_inference_prompt, hrm_inference_tokenizer, hrm_text_read
    from prefixlm.data import PackedLoader

    rows = [{"instruction": "What is two plus two?", "response": "four", "condition": "synth,cot"},
            {"instruction": "Say hi.", "response": "hi"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "ds"
    prepare_sft([src], out, tokenizer=str(hrm_fixtures["tokenizer"]), context_size=4097,
                epochs=2, **HRM_OPTIONS, **Q)
    monkeypatch.chdir(tmp_path / "..")  # the engine resolves tokenizer_path against its CWD
    theirs = hrm_text_read(out, 2)
    info = theirs["tokenizer_info"]
    assert {"tokenizer_path", "boq", "eoq", "eoa", "condition_mapping"} <= set(info)
    assert info["condition_mapping"] == HRM_OPTIONS["conditions"]
    ds = V1Dataset(out)
    tok = ds.tokenizer()
    assert theirs["vocab_size"] == 512 and theirs["max_seq_len"] == 4096
    loader = PackedLoader(ds, 4096, prefetch=0)
    for epoch in range(2):
        batch = next(iter(loader))
        ids = loader.batch_ids(epoch, 0).tolist()
        at = 0
        for i in ids:
            ref = theirs["epochs"][epoch][i]
            n = len(ref["inputs"])
            assert batch.inputs[at:at + n].tolist() == ref["inputs"].tolist()
            assert batch.labels[at:at + n].tolist() == ref["labels"].tolist()
            at += n
    first = ds.sample(0, int(np.argmin(ds.epoch(0).inst_start)))[0].tolist()
    assert hrm_inference_prompt(info, "synth,cot", "What is two plus two?") == first
    second = ds.sample(0, int(np.argmax(ds.epoch(0).inst_start)))[0].tolist()
    assert hrm_inference_prompt(info, "direct", "Say hi.") == second  # the default condition
    engine_tok = hrm_inference_tokenizer(info)
    assert engine_tok.token_to_id(info["boq"]) == tok.inst_begin_id
    assert engine_tok.token_to_id(info["eoa"]) == tok.eoa_id


def test_special_token_text_is_plain_unless_asked(tmp_path):
    """Guards `"ok<|eoa|>done"` giving a real end-of-answer id mid-response (the model learns to
    stop there): plain text by default, ids with parse_special_tokens; the report and rows.jsonl
    say which rows held such strings."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a<|inst|>", "response": "b"},
                                              {"instruction": "q", "response": "ok<|eoa|>done"},
                                              {"instruction": "q", "response": "plain"}])
    report = prepare_sft([src], tmp_path / "plain", context_size=64, **Q)
    ds = V1Dataset(tmp_path / "plain")
    tok = ds.tokenizer()
    responses = [ds.tokenizer().decode(ds.sample(0, i)[1]) for i in range(3)]
    assert "ok<|eoa|>done<|eoa|>" in responses
    assert all(tok.eoa_id not in ds.sample(0, i)[1][:-1].tolist() for i in range(3))
    assert report["counts"]["special_text_rows"] == 2
    flags = [json.loads(line).get("special_text", False)
             for line in (tmp_path / "plain" / "rows.jsonl").read_text().splitlines()]
    assert flags == [True, True, False]
    prepare_sft([src], tmp_path / "parsed", context_size=64, parse_special_tokens=True, **Q)
    ds = V1Dataset(tmp_path / "parsed")
    assert any(ds.tokenizer().eoa_id in ds.sample(0, i)[1][:-1].tolist() for i in range(3))
    assert ds.metadata["tokenizer_info"]["special_text"] == "parsed"


def test_multi_tag_conditions_keep_the_row_order(tmp_path):
    """Guards data_io's multi-tag conditions being refused or reordered: one token per tag, in
    the row's order; an undeclared or empty tag is a row error naming it."""
    rows = [{"instruction": "x", "response": "y", "condition": "synth,cot"},
            {"instruction": "x", "response": "y", "condition": "cot,synth"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    prepare_sft([src], tmp_path / "out", context_size=64, conditions=["cot", "synth"], **Q)
    ds = V1Dataset(tmp_path / "out")
    tok = ds.tokenizer()
    heads = [ds.sample(0, i)[0][1:3].tolist() for i in np.argsort(ds.epoch(0).inst_start)]
    c, s = tok.condition_ids["cot"], tok.condition_ids["synth"]
    assert heads == [[s, c], [c, s]]
    for bad, message in (("cot, synth", "the unknown tag ' synth'"), ("cot,", "an empty tag")):
        src = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "response": "y",
                                                    "condition": bad}])
        with pytest.raises(InputError, match=f"bad.jsonl:1: condition '{bad}' has {message}"):
            prepare_sft([src], tmp_path / "bad", context_size=64, conditions=["cot", "synth"], **Q)


def test_default_condition(tmp_path):
    """Guards rows without a condition getting none while HRM-Text's inference always prepends
    one: `direct` by default when declared, another by choice, none on request; an undeclared
    default is an error."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "x", "response": "y"}])

    def head(name, **kw):
        prepare_sft([src], tmp_path / name, context_size=64, conditions=["direct", "cot"], **kw,
                    **Q)
        ds = V1Dataset(tmp_path / name)
        return ds.tokenizer().decode(ds.sample(0, 0)[0])

    assert head("auto") == "<|inst|><|cond:direct|>x<|/inst|>"
    assert head("cot", default_condition="cot") == "<|inst|><|cond:cot|>x<|/inst|>"
    assert head("none", default_condition=None) == "<|inst|>x<|/inst|>"
    assert V1Dataset(tmp_path / "none").tokenizer().default_condition is None
    with pytest.raises(ValueError, match="default condition 'math' is not declared"):
        head("bad", default_condition="math")
    prepare_sft([src], tmp_path / "undeclared", context_size=64, **Q)  # no `direct`: none
    ds = V1Dataset(tmp_path / "undeclared")
    assert ds.tokenizer().decode(ds.sample(0, 0)[0]) == "<|inst|>x<|/inst|>"


def test_truncate_prefix_keeps_min_prefix_tokens(tmp_path):
    """Guards truncate-prefix cutting an instruction down to its markers (a short prompt with a
    long response): at least min_prefix_tokens text tokens stay, else the row is dropped and
    reported with its lengths."""
    rows = [{"instruction": "abc", "response": "r" * 60},    # room for 1 of its 3 tokens
            {"instruction": "abcdef", "response": "r" * 58}]  # room for 3 of 6
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    report = prepare_sft([src], tmp_path / "k1", context_size=64, truncation="truncate-prefix", **Q)
    assert report["counts"]["truncated_prefix"] == 2
    report = prepare_sft([src], tmp_path / "k2", context_size=64, truncation="truncate-prefix",
                         min_prefix_tokens=2, **Q)
    c = report["counts"]
    assert (c["truncated_prefix"], c["dropped_short_prefix"]) == (1, 1)
    lines = [json.loads(x) for x in (tmp_path / "k2" / "rows.jsonl").read_text().splitlines()]
    assert [x["outcome"] for x in lines] == ["dropped_short_prefix", "truncated_prefix"]
    assert lines[0]["inst_len"] == [5, 0] and lines[0]["resp_len"] == [61, 0]
    assert lines[1]["inst_len"] == [8, 5] and lines[1]["resp_len"] == [59, 59]
    inst, _ = V1Dataset(tmp_path / "k2").sample(0, 0)
    assert V1Dataset(tmp_path / "k2").tokenizer().decode(inst) == "<|inst|>def<|/inst|>"


def test_rows_report_accounts_for_every_row(tmp_path):
    """Guards the per-row report the README promises (report.json held counts only) and bad rows
    going unaccounted with --skip-invalid (30 bad rows showed as 5 on screen, 20 in report.json):
    rows.jsonl has one line per row in input order, and its outcomes add up to the counts."""
    rows = [{"instruction": f"q{i}", "response": "" if i % 7 == 0 else "answer"} for i in range(40)]
    src = write_jsonl(tmp_path / "in.jsonl", rows, raw_lines=[b"{bad"] * 30)
    src2 = write_jsonl(tmp_path / "in2.jsonl", [{"instruction": "x" * 80, "response": "y"}])
    lines = []
    report = prepare_sft([src, src2], tmp_path / "out", context_size=64, skip_invalid=True,
                         log=lines.append, progress=False)
    entries = [json.loads(x) for x in (tmp_path / "out" / "rows.jsonl").read_text().splitlines()]
    assert [(e["file"], e["line"]) for e in entries] == \
        [(str(src), n) for n in range(1, 71)] + [(str(src2), 1)]
    outcomes = {}
    for e in entries:
        outcomes[e["outcome"]] = outcomes.get(e["outcome"], 0) + 1
    c = report["counts"]
    assert outcomes == {"kept": 34, "dropped_empty": 6, "dropped_malformed": 30,
                        "dropped_too_long": 1}
    assert all(c[k] == v for k, v in outcomes.items()) and c["rows"] == 71
    assert json.loads((tmp_path / "out" / "report.json").read_text())["counts"] == c
    assert all("invalid JSON" in e["error"] for e in entries if e["outcome"] == "dropped_malformed")
    screen = "\n".join(lines)
    assert "malformed 30" in screen and "30 malformed rows skipped" in screen
    assert f"all 30 in {tmp_path / 'out' / 'rows.jsonl'}" in screen


def test_output_folder_gets_the_users_umask(tmp_path):
    """Guards mkdtemp's 0700 on the output folder (unreadable for others on a shared node)."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(3))
    for umask, mode in ((0o022, 0o755), (0o027, 0o750)):
        old = os.umask(umask)
        try:
            prepare_sft([src], tmp_path / f"out{umask:o}", context_size=4097, epochs=2, **Q)
        finally:
            os.umask(old)
        out = tmp_path / f"out{umask:o}"
        assert out.stat().st_mode & 0o777 == mode
        assert (out / "epoch_1").stat().st_mode & 0o777 == mode
        assert (out / "tokens.npy").stat().st_mode & 0o777 == mode & 0o666


CHAT = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"},
                     {"role": "assistant", "content": "A1"}, {"role": "user", "content": "U2"},
                     {"role": "assistant", "content": "A2"}]}


def test_turns_all_gives_one_sample_per_assistant_turn(tmp_path):
    """Guards multi-turn chats supervising only their last answer (open-r1 #618) when every turn
    is asked for: --turns all makes one sample per assistant turn, its prefix every turn before
    it; rows.jsonl has a line per sample with its turn; --turns last stays today's sample."""
    src = write_jsonl(tmp_path / "in.jsonl", [CHAT, {"instruction": "I", "response": "R"}])
    report = prepare_sft([src], tmp_path / "all", context_size=256, turns="all", **Q)
    assert _decoded(tmp_path / "all") == [
        ("<|inst|>system: S\n\nuser: U1<|/inst|>", "A1<|eoa|>"),
        ("<|inst|>system: S\n\nuser: U1\n\nassistant: A1\n\nuser: U2<|/inst|>", "A2<|eoa|>"),
        ("<|inst|>I<|/inst|>", "R<|eoa|>")]
    assert report["counts"]["rows"] == 2 and report["samples"] == 3
    lines = [json.loads(x) for x in (tmp_path / "all" / "rows.jsonl").read_text().splitlines()]
    assert [(x["line"], x.get("turn")) for x in lines] == [(1, 2), (1, 4), (2, None)]
    prepare_sft([src], tmp_path / "last", context_size=256, **Q)
    last = _decoded(tmp_path / "last")
    assert last[0][1] == "A2<|eoa|>" and len(last) == 2


def test_chat_template_tokens_are_the_templates(tmp_path):
    """Guards prepare-sft --chat-template tokenizer: every sample's prefix + response equal
    apply_chat_template's tokens of the conversation up to its turn (the template's default
    system prompt included, its end of turn closing the response), no markers of ours; a row the
    template rejects stops with file:line."""
    transformers = pytest.importorskip("transformers")
    from datahelpers import chat_tokenizer

    folder = chat_tokenizer(tmp_path / "tok")
    conversation = CHAT["messages"][1:]
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": conversation}])
    prepare_sft([src], tmp_path / "out", tokenizer=str(folder), context_size=512,
                chat_template="tokenizer", turns="all", **Q)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    ds = V1Dataset(tmp_path / "out")
    order = np.argsort(ds.epoch(0).inst_start)
    got = [tuple(np.concatenate(ds.sample(0, i)).tolist()) for i in order]
    want = [tuple(hf.apply_chat_template(conversation[:k + 1], tokenize=True, return_dict=False,
                                         sanitize_control_tokens=True)) for k in (1, 3)]
    assert got == want
    prefix, response = ds.sample(0, order[0])
    assert hf.decode(prefix).endswith("<|im_start|>assistant\n")
    assert hf.decode(response) == "A1<|im_end|>\n"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": conversation},
                                                {"messages": [{"role": "assistant",
                                                               "content": "x"}]}])
    with pytest.raises(InputError, match=r"bad.jsonl:2: messages\[0\] is an assistant turn"):
        prepare_sft([bad], tmp_path / "bad", tokenizer=str(folder), context_size=512,
                    chat_template="tokenizer", **Q)
