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
