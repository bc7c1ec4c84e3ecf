"""CLI: prepare-sft and inspect through `prefixlm.cli.main`, user errors without tracebacks."""

import json


import prefixlm.cli as cli
from datahelpers import random_rows, write_jsonl


def test_prepare_and_inspect(tmp_path, capsys):
    """Guards the end-to-end CLI: prepare prints the outcome counts, inspect shows summary + regions."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(30) + [{"instruction": "a",
                                                                 "response": ""}])
    out = tmp_path / "ds"
    assert cli.main(["prepare-sft", "--input", str(src), "--output", str(out), "--context-size",
                     "2048", "--epochs", "2", "--conditions", "c1"]) == 0
    text = capsys.readouterr().out
    assert "kept 30" in text and "empty response 1" in text and "efficiency" in text
    assert json.loads((out / "report.json").read_text())["counts"]["dropped_empty"] == 1
    assert cli.main(["inspect", str(out), "--batch", "0", "--max-tokens", "5000"]) == 0
    text = capsys.readouterr().out
    assert "samples   30" in text and "causal_len == 0: 0" in text
    assert " P* " in text and " C  " in text and "<|inst|>" in text


def test_user_errors_have_no_traceback(tmp_path, capsys):
    """Guards that bad input prints one line naming file and line, exit code 1, no traceback."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "response": "b"}],
                      raw_lines=[b"{oops"])
    code = cli.main(["prepare-sft", "--input", str(src), "--output", str(tmp_path / "o"),
                     "--context-size", "64", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{src}:2: invalid JSON" in err and "Traceback" not in err
    assert cli.main(["inspect", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_special_token_flags(tmp_path, capsys):
    """Guards --special-token parsing: a disabled marker is absent from the written prefix."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "ab", "response": "c"}])
    out = tmp_path / "ds"
    assert cli.main(["prepare-sft", "--input", str(src), "--output", str(out), "--context-size",
                     "64", "--special-token", "inst_begin=", "--quiet"]) == 0
    from prefixlm.data import V1Dataset
    ds = V1Dataset(out)
    assert ds.tokenizer().decode(ds.sample(0, 0)[0]) == "ab<|/inst|>"
    assert cli.main(["prepare-sft", "--input", str(src), "--output", str(tmp_path / "x"),
                     "--context-size", "64", "--special-token", "bogus"]) == 2
    assert "expected ROLE=TOKEN" in capsys.readouterr().err


def _one_line_error(capsys, argv, *expected):
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def test_prepare_failures_are_one_line_errors(tmp_path, capsys, monkeypatch):
    """Guards tracebacks for a read-only or immutable output directory, a parent that is a file,
    `--output .` and a full disk: each is one line naming the path and what to do, exit 2, and
    nothing of an older dataset is lost."""
    import errno
    import os

    import prefixlm.data.writer as writer

    src = write_jsonl(tmp_path / "in.jsonl", random_rows(5))
    base = ["prepare-sft", "--input", str(src), "--context-size", "4097", "--quiet", "--output"]
    (tmp_path / "afile").write_text("x")
    _one_line_error(capsys, base + [str(tmp_path / "afile" / "ds")], "afile is a file")
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, base + ["."], "is the current directory")
    _one_line_error(capsys, base + [".", "--overwrite"], "is the current directory")
    assert cli.main(base + [str(tmp_path / "ds")]) == 0
    before = (tmp_path / "ds" / "tokens.npy").read_bytes()
    real_mkdir = os.mkdir
    for code, hint in ((errno.EACCES, "owner and mode"), (errno.EROFS, "read-only"),
                       (errno.EPERM, "attributes")):  # root ignores modes: simulate the OS
        def refuse(path, mode=0o777, code=code):
            if ".tmp-" in str(path):
                raise OSError(code, os.strerror(code), str(path))
            return real_mkdir(path, mode)
        monkeypatch.setattr(writer.os, "mkdir", refuse)
        _one_line_error(capsys, base + [str(tmp_path / "ds"), "--overwrite"],
                        "cannot create a folder beside the output", str(tmp_path / "ds"), hint)
    monkeypatch.setattr(writer.os, "mkdir", real_mkdir)

    def full(self, tokens):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer.DatasetWriter, "append_tokens", full)
    _one_line_error(capsys, base + [str(tmp_path / "ds"), "--overwrite"],
                    "No space left on device", str(tmp_path / "ds"), "free some space")
    assert (tmp_path / "ds" / "tokens.npy").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ds.")]


def test_skip_invalid_screen_counts_and_rows_report_agree(tmp_path, capsys):
    """Guards bad rows going unaccounted (30 bad rows: 5 on screen, 20 in report.json): the
    screen gives the count and where all of them are, the counts and rows.jsonl agree."""
    src = write_jsonl(tmp_path / "in.jsonl", random_rows(10), raw_lines=[b"{nope"] * 30)
    out = tmp_path / "ds"
    assert cli.main(["prepare-sft", "--input", str(src), "--output", str(out), "--context-size",
                     "4097", "--skip-invalid"]) == 0
    screen = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    bad = [r for r in rows if r["outcome"] == "dropped_malformed"]
    assert report["counts"]["dropped_malformed"] == len(bad) == 30
    assert "malformed 30" in screen and f"all 30 in {out / 'rows.jsonl'}" in screen


def test_inspect_reports_out_of_vocabulary_ids(tmp_path, capsys):
    """Guards `inspect` passing a dataset whose tokens.npy holds an id >= vocab (training then
    failed with an IndexError): it is a one-line error naming the file and the id."""
    import numpy as np

    src = write_jsonl(tmp_path / "in.jsonl", random_rows(5))
    out = tmp_path / "ds"
    assert cli.main(["prepare-sft", "--input", str(src), "--output", str(out), "--context-size",
                     "4097", "--quiet"]) == 0
    tokens = np.load(out / "tokens.npy")
    tokens[3] = 5000
    np.save(out / "tokens.npy", tokens)
    _one_line_error(capsys, ["inspect", str(out)], "tokens.npy: token id 5000 at position 3")


def test_inspect_foreign_folders(hrm_fixtures, capsys):
    """Guards `inspect` on data_io's sampled output and HRM-Text's SFT output as they are: it
    reports the writer, what total_length means, the samples the loader skips per epoch, the
    tokenizer found with its markers and conditions, and shows a batch with their names."""
    assert cli.main(["inspect", str(hrm_fixtures["sampled"]), "--batch", "0", "--capacity",
                     "4096"]) == 0
    text = capsys.readouterr().out
    assert "written by data_io" in text and "mean sampled tokens per epoch" in text
    assert "uint16" in text and "(epoch 0: 1 of 19, epoch 1: 1 of 19)" in text
    assert "inst_begin <|im_start|> (6)" in text and "synth <|quad_end|> (13)" in text
    assert "'<|im_start|>'" in text and str(hrm_fixtures["tokenizer"]) in text
    assert cli.main(["inspect", str(hrm_fixtures["sft"]), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_per_epoch"] == [0, 0] and summary["samples_per_epoch"] == [3, 3]
    assert summary["tokenizer"]["default_condition"] == "direct"
    assert "HRM-Text" in summary["origin"]


def test_prepare_with_hrm_text_tokens_and_flags(hrm_fixtures, tmp_path, capsys):
    """Guards the CLI flags of the HRM-Text conventions: --hrm-text-tokens picks its markers and
    conditions, --default-condition / --no-default-condition, --parse-special-tokens,
    --min-prefix-tokens reach prepare and the summary says what they did."""
    out = tmp_path / "ds"
    base = ["prepare-sft", "--input", str(hrm_fixtures["sft_input"]), "--tokenizer",
            str(hrm_fixtures["tokenizer"]), "--context-size", "4097", "--hrm-text-tokens"]
    assert cli.main(base + ["--output", str(out), "--parse-special-tokens"]) == 0
    text = capsys.readouterr().out
    assert "3 rows without a condition got the default condition 'direct'" in text
    assert "1 rows held special-token strings, parsed into their ids" in text
    assert (out / "tokens.npy").read_bytes() == (hrm_fixtures["sft"] / "tokens.npy").read_bytes()
    assert cli.main(base + ["--output", str(tmp_path / "n"), "--no-default-condition"]) == 0
    assert "default condition" not in capsys.readouterr().out
    from prefixlm.data import V1Dataset
    tok = V1Dataset(tmp_path / "n").tokenizer()
    assert tok.default_condition is None
    assert cli.main(base + ["--output", str(tmp_path / "c"), "--default-condition", "cot"]) == 0
    assert "default condition 'cot'" in capsys.readouterr().out
    _one_line_error(capsys, base + ["--output", str(tmp_path / "x"), "--default-condition",
                                    "nope"], "default condition 'nope' is not declared")
