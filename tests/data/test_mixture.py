"""prepare_mixture end to end: JSONL + Parquet + a data_io tokenized folder into one V1 dataset,
data_io's sampling rules, per-epoch draws, the cache, the coverage report, chat templates."""

import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from datahelpers import chat_tokenizer
from hrmformats import SAMPLING_RULES, data_io_tokenize, hrm_text_read, write_rows
from prefixlm.data import V1Dataset
from prefixlm.data.encode import InputError
from prefixlm.data.mixture import epoch_draw, prepare_mixture
from prefixlm.data.tokenizer import HFTokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
Q = dict(progress=False, workers=1)
JSONL_ROWS = [{"instruction": f"Translate {i} to French.", "response": f"Number {i}.",
               "condition": "direct"} for i in range(8)]
PARQUET_ROWS = [{"instruction": f"What is {i} plus {i}?", "response": f"{2 * i}",
                 "condition": "synth,cot"} for i in range(12)]


def _rules_yaml(rules) -> str:
    out = ["# data_io's prefix_config.yaml schema"]
    for r in rules:
        out.append(f'- prefix: "{r["prefix"]}"')
        out += [f"  {k}: {r[k]}" for k in ("max_per_file", "repeat", "long_context") if k in r]
    return "\n".join(out) + "\n"


def _write_parquet(path, rows):
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), path)
    return path


@pytest.fixture
def mixture(tmp_path, hrm_fixtures):
    """mix.yaml over a JSONL file, a Parquet file and the fixture's data_io tokenized folder,
    with data_io's sampling rules of the fixture (tokenizer: the data_io folder's)."""
    src = tmp_path / "src"
    src.mkdir()
    write_rows(src / "notes.jsonl", JSONL_ROWS)
    _write_parquet(src / "sums.parquet", PARQUET_ROWS)
    (tmp_path / "prefix_config.yaml").write_text(_rules_yaml(SAMPLING_RULES))
    mix = tmp_path / "mix.yaml"
    mix.write_text(textwrap.dedent(f"""\
        rules: prefix_config.yaml
        sources:
          - path: src/notes.jsonl
            weight: 2
          - path: src/sums.parquet
            max_per_epoch: 5
          - path: {hrm_fixtures['tokenized']}
        """))
    return mix


def _samples(path, epoch):
    ds = V1Dataset(path)
    return [tuple(map(tuple, ds.sample(epoch, i))) for i in range(len(ds.epoch(epoch)))]


def _candidates(tmp_path, hrm_fixtures):
    """(prefix, response) tokens -> source name, for every row as data_io's tokenizer renders it
    (the JSONL and Parquet rows rendered by the fixture's re-statement of data_io's tokenizer)."""
    raw = tmp_path / "as_data_io"
    write_rows(raw / "notes.jsonl", JSONL_ROWS)
    write_rows(raw / "sums.parquet.jsonl", PARQUET_ROWS)
    data_io_tokenize(raw, tmp_path / "expected", "x", hrm_fixtures["tokenizer"])
    out = {}
    for root in (tmp_path / "expected", hrm_fixtures["tokenized"]):
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            tokens = np.load(sub / "tokens.npy")
            ix = {k: np.load(sub / f"{k}.npy") for k in ("inst_start", "inst_len", "resp_start",
                                                          "resp_len")}
            for s, n, r, m in zip(ix["inst_start"], ix["inst_len"], ix["resp_start"],
                                  ix["resp_len"]):
                key = (tuple(tokens[s:s + n].tolist()), tuple(tokens[r:r + m].tolist()))
                out[key] = sub.name.replace(".parquet.jsonl", ".parquet")
    return out


def test_jsonl_parquet_and_data_io_folder_into_one_dataset(tmp_path, hrm_fixtures, mixture):
    """Guards the mixture itself: every sample is a row exactly as data_io's tokenizer renders it
    (a data_io folder's rows are its own tokens), each epoch draws data_io's counts from each
    source (cap 6 of SYNTH, 2 of flan__, repeat 3 of gsm8k, the exempt flan__cot_, weight 2,
    max_per_epoch 5), capped sources draw other rows in the next epoch, a repeated source has
    every row `repeat` times per epoch, the row data_io would feed with an empty response after
    the shift is dropped and counted, and HRM-Text's reader reads the result."""
    report = prepare_mixture(mixture, tmp_path / "out", epochs=2, **Q)
    out = tmp_path / "out"
    ds = V1Dataset(out)
    ds.validate()
    assert ds.num_epochs == 2 and ds.tokenizer().vocab_size == 400
    candidates = _candidates(tmp_path, hrm_fixtures)
    per_epoch = []
    for k in range(2):
        samples = _samples(out, k)
        assert all(s in candidates for s in samples)
        per_epoch.append(Counter(candidates[s] for s in samples))
        counts = Counter(samples)
        gsm8k = [n for s, n in counts.items() if candidates[s] == "gsm8k_train.jsonl"]
        assert sorted(gsm8k) == [3, 3, 3]
        assert all(len(s[1]) >= 2 for s in samples)  # no response empty after the shift
    expected = {"notes.jsonl": 16, "sums.parquet": 5, "SYNTH__part0.jsonl": 6,
                "flan__b.jsonl": 2, "flan__cot_a.jsonl": 1, "gsm8k_train.jsonl": 9}
    assert per_epoch == [Counter(expected)] * 2
    synth = [{s for s in _samples(out, k) if candidates[s] == "SYNTH__part0.jsonl"}
             for k in range(2)]
    assert len(synth[0]) == 6 and not synth[0] & synth[1]  # different subsets, no repeat yet
    by_name = {s["name"]: s for s in report["sources"]}
    assert by_name["long__x.jsonl"]["outcomes"] == {
        "kept": 0, "truncated_prefix": 0, "truncated_response": 0, "dropped_empty": 1,
        "dropped_too_long": 1, "dropped_short_prefix": 0, "dropped_truncation_guard": 1}
    assert by_name["sums.parquet"]["epochs"][1]["not_drawn"] == 7
    assert by_name["notes.jsonl"]["epochs"][0]["repeated"] == 8
    assert "flan__cot_a.jsonl matches several rules" in " ".join(report["notes"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["total_length"] == round(sum(report["tokens_per_epoch"]) / 2)
    assert json.loads((out / "coverage.json").read_text())["samples_per_epoch"] == [39, 39]
    assert "| SYNTH__part0.jsonl |" in (out / "coverage.md").read_text()
    hrm = hrm_text_read(out, 2)
    assert [len(e) for e in hrm["epochs"]] == [39, 39] and hrm["vocab_size"] == 512


def test_an_epoch_depends_on_its_number_only(tmp_path, mixture):
    """Guards draws tied to the run (one RNG stream for everything, as data_io's): preparing three
    epochs gives the same first two as preparing two, and adding a source changes no other
    source's draws."""
    prepare_mixture(mixture, tmp_path / "two", epochs=2, **Q)
    prepare_mixture(mixture, tmp_path / "three", epochs=3, **Q)
    for k in range(2):
        assert _samples(tmp_path / "two", k) == _samples(tmp_path / "three", k)
    assert _samples(tmp_path / "three", 2) != _samples(tmp_path / "three", 1)
    words = [0, 1, 2, 3, 4]
    assert epoch_draw(10, 4, 1, words).tolist() == epoch_draw(10, 4, 1, words).tolist()
    chain = np.concatenate([epoch_draw(10, 4, k, words) for k in range(5)])
    assert sorted(chain[:10].tolist()) == list(range(10))   # a walk through every row first
    assert sorted(chain[10:20].tolist()) == list(range(10))


def _counting_encoder(monkeypatch):
    seen = []
    real = HFTokenizer._encode_many

    def counting(self, texts):
        seen.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(HFTokenizer, "_encode_many", counting)
    return seen


def test_only_a_changed_source_is_tokenized_again(tmp_path, mixture, monkeypatch):
    """Guards the cache: a rerun reads every unchanged source from the cache (its tokenizer is
    never called on those texts, its entry untouched) and tokenizes the one edited file again."""
    seen = _counting_encoder(monkeypatch)
    first = prepare_mixture(mixture, tmp_path / "a", epochs=2, **Q)
    assert first["tokenized"] == ["notes.jsonl", "sums.parquet"] and first["cached"] == []
    assert "What is 3 plus 3?" in seen and "Translate 3 to French." in seen
    cache = Path(first["cache_dir"])
    entries = {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir()}
    seen.clear()
    again = prepare_mixture(mixture, tmp_path / "b", epochs=2, **Q)
    assert seen == [] and again["tokenized"] == [] and len(again["cached"]) == 2
    write_rows(tmp_path / "src" / "notes.jsonl", JSONL_ROWS + [
        {"instruction": "A new row.", "response": "Indeed.", "condition": "direct"}])
    changed = prepare_mixture(mixture, tmp_path / "c", epochs=2, **Q)
    assert changed["tokenized"] == ["notes.jsonl"] and changed["cached"] == ["sums.parquet"]
    assert "A new row." in seen and not any("plus" in text for text in seen)
    now = {p.name: (p / "meta.json").stat().st_mtime_ns for p in cache.iterdir()}
    assert {k: v for k, v in now.items() if k in entries} == entries  # old entries untouched
    assert len(now) == len(entries) + 1
    by_name = {s["name"]: s for s in changed["sources"]}
    assert by_name["notes.jsonl"]["rows"] == 9


def test_a_killed_run_resumes_after_the_sources_it_cached(tmp_path, mixture):
    """Guards a kill (SIGKILL while the second source is being tokenized) costing the sources
    already finished, or leaving a half-written entry that a rerun would use: the rerun
    tokenizes the unfinished source only."""
    script = textwrap.dedent(f"""
        import os, signal
        import prefixlm.data.cache as cache
        from prefixlm.data.mixture import prepare_mixture
        real = cache.EntryWriter.append
        def append(self, *args):
            real(self, *args)
            if list(self.final.parent.glob("*/meta.json")):  # one entry is complete
                os.kill(os.getpid(), signal.SIGKILL)
        cache.EntryWriter.append = append
        prepare_mixture({str(mixture)!r}, {str(tmp_path / 'out')!r}, progress=False, workers=1)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert run.returncode == -9, run.stderr
    cache = mixture.parent / ".prefixlm-cache"
    assert len(list(cache.glob("*/meta.json"))) == 1 and len(list(cache.glob(".tmp-*"))) == 1
    report = prepare_mixture(mixture, tmp_path / "out", **Q)
    assert report["cached"] == ["notes.jsonl"] and report["tokenized"] == ["sums.parquet"]
    assert list(cache.glob(".tmp-*")) == [] and list(tmp_path.glob(".out.*")) == []
    V1Dataset(tmp_path / "out").validate()


def test_a_bad_row_stops_the_run_and_keeps_the_sources_before_it(tmp_path, mixture):
    """Guards a bad Parquet row reported without its place, and the finished sources lost."""
    _write_parquet(tmp_path / "src" / "sums.parquet",
                   PARQUET_ROWS[:3] + [{**PARQUET_ROWS[3], "condition": "nope"}])
    with pytest.raises(InputError, match=r"sums.parquet: row 3, column 'condition': unknown "
                                         r"condition 'nope'"):
        prepare_mixture(mixture, tmp_path / "out", **Q)
    assert not (tmp_path / "out").exists()
    _write_parquet(tmp_path / "src" / "sums.parquet", PARQUET_ROWS)
    assert prepare_mixture(mixture, tmp_path / "out", **Q)["cached"] == ["notes.jsonl"]


def test_mixture_settings_that_cannot_apply_are_refused(tmp_path, hrm_fixtures, mixture):
    """Guards silently wrong data: a data_io folder made with another vocabulary, truncate-prefix
    on a folder of tokens (no text to cut), two entries giving one name."""
    with pytest.raises(ValueError, match="vocab_size 400, but the mixture's tokenizer has 260"):
        prepare_mixture(mixture, tmp_path / "o", tokenizer="byte", **Q)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"sources:\n  - path: {hrm_fixtures['tokenized']}\n"
                   f"    long_context: truncate-prefix\n")
    with pytest.raises(ValueError, match="bad.yaml:2: sources\\[0\\]: long_context "
                                         "truncate-prefix cuts instruction text"):
        prepare_mixture(bad, tmp_path / "o", **Q)
    bad.write_text("sources:\n  - path: src/notes.jsonl\n  - path: src/notes.jsonl\n")
    with pytest.raises(ValueError, match="source name 'notes.jsonl' is taken"):
        prepare_mixture(bad, tmp_path / "o", tokenizer="byte", **Q)


def test_missing_pyarrow_names_the_extra(tmp_path, mixture, monkeypatch):
    """Guards a bare ImportError (or a traceback) when pyarrow is not installed."""
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match=r"reading Parquet sources needs the `pyarrow` "
                                          r"package: pip install 'prefixlm\[parquet\]'"):
        prepare_mixture(mixture, tmp_path / "o", **Q)


def test_chat_template_sources_give_the_templates_tokens_per_turn(tmp_path):
    """Guards --chat-template tokenizer --turns all in a mixture: one sample per assistant turn,
    each sample's prefix + response equal to apply_chat_template's tokens of the conversation up
    to that turn, no markers of ours around them, end of answer = the template's eos, and the
    template copied into the dataset (so the dataset folder renders prompts the same way)."""
    transformers = pytest.importorskip("transformers")
    folder = chat_tokenizer(tmp_path / "tok")
    conversations = [[{"role": "user", "content": f"Hello {i}?"},
                      {"role": "assistant", "content": f"Hi {i}!"},
                      {"role": "user", "content": "How are you?"},
                      {"role": "assistant", "content": "Sunny."}] for i in range(3)]
    write_rows(tmp_path / "chats.jsonl", [{"messages": c} for c in conversations])
    mix = tmp_path / "mix.yaml"
    mix.write_text("tokenizer: tok\nsources:\n  - path: chats.jsonl\n    turns: all\n")
    report = prepare_mixture(mix, tmp_path / "out", chat_template="tokenizer", **Q)
    assert report["sources"][0]["samples"] == 6
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    expected = set()
    for c in conversations:
        for k in (1, 3):
            full = hf.apply_chat_template(c[:k + 1], tokenize=True, return_dict=False,
                                          sanitize_control_tokens=True)
            prompt = hf.apply_chat_template(c[:k], tokenize=True, return_dict=False,
                                            add_generation_prompt=True,
                                            sanitize_control_tokens=True)
            expected.add((tuple(prompt), tuple(full[len(prompt):])))
            assert list(full[:len(prompt)]) == list(prompt)
    assert set(_samples(tmp_path / "out", 0)) == expected
    tok = V1Dataset(tmp_path / "out").tokenizer()
    assert tok.inst_begin_id is None and tok.eoa_id == hf.convert_tokens_to_ids("<|im_end|>")
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert again.apply_chat_template(conversations[0][:1], tokenize=False,
                                     add_generation_prompt=True) == hf.apply_chat_template(
        conversations[0][:1], tokenize=False, add_generation_prompt=True)


def test_weights_sub_sample_a_different_part_each_epoch(tmp_path):
    """Guards weight < 1 taking the same rows every epoch: two epochs of weight 0.5 are the two
    halves of the source."""
    write_rows(tmp_path / "a.jsonl", [{"instruction": f"q{i}", "response": f"a{i}"}
                                      for i in range(10)])
    mix = tmp_path / "mix.yaml"
    mix.write_text("tokenizer: byte\nsources:\n  - path: a.jsonl\n    weight: 0.5\n")
    prepare_mixture(mix, tmp_path / "out", epochs=2, **Q)
    halves = [set(_samples(tmp_path / "out", k)) for k in range(2)]
    assert len(halves[0]) == len(halves[1]) == 5 and not halves[0] & halves[1]


def test_a_file_changed_while_tokenized_is_not_cached(tmp_path, monkeypatch):
    """Guards a cache entry keyed by the hash of one version of a file but holding another (the
    file edited while it was read): the run stops and caches nothing for it."""
    import prefixlm.data.encode as encode

    src = write_rows(tmp_path / "a.jsonl", JSONL_ROWS)
    mix = tmp_path / "mix.yaml"
    mix.write_text("tokenizer: byte\nsources: [a.jsonl]\n")
    real = encode.jsonl_chunks

    def editing(path, size):
        yield from real(path, size)
        with open(src, "a") as f:
            f.write(json.dumps(JSONL_ROWS[0]) + "\n")

    monkeypatch.setattr(encode, "jsonl_chunks", editing)
    with pytest.raises(InputError, match="a.jsonl changed while it was being tokenized"):
        prepare_mixture(mix, tmp_path / "out", conditions=["direct"], **Q)
    assert list((tmp_path / ".prefixlm-cache").glob("*/meta.json")) == []
