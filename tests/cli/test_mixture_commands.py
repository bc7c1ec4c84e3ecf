"""CLI: `prefixlm prepare --mixture` as the README runs it (prepare, inspect, train), reruns that
tokenize only what changed, and one-line errors."""

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prefixlm.cli as cli

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("pyarrow", reason="the README's mixture has a Parquet source")
pytest.importorskip("tokenizers", reason="the README's mixture has a BPE tokenizer")


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Mixtures"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_mixture_prepares_inspects_and_trains(tmp_path, monkeypatch, capsys):
    """Guards the README's Mixtures commands drifting from the code: run as written (from a copy
    of the repository's examples/mixture), the JSONL + Parquet + data_io mixture prepares, inspects
    and trains; rerun after one source changed, only that source is tokenized again."""
    shutil.copytree(ROOT / "examples" / "mixture", tmp_path / "examples" / "mixture",
                    ignore=shutil.ignore_patterns("data", ".prefixlm-cache"))
    monkeypatch.chdir(tmp_path)
    commands = _readme_commands()
    assert [c.split()[:2] for c in commands] == [
        ["python", "examples/mixture/make_sources.py"], ["prefixlm", "prepare"],
        ["prefixlm", "inspect"], ["prefixlm", "train"]]
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        if argv[0] == "python":
            subprocess.run([sys.executable, *argv[1:]], check=True, capture_output=True)
            continue
        assert cli.main(argv[1:]) == 0, command
        outputs.append(capsys.readouterr().out)
    prepared, inspected, trained = outputs
    assert "Tokenized by this run: instructions.jsonl, math.parquet" in prepared
    coverage = (tmp_path / "runs/mix/data/coverage.md").read_text()
    for source in ("instructions.jsonl", "math.parquet", "gsm8k_train.jsonl",
                   "synth__part0.jsonl"):
        assert f"| {source} |" in coverage
    assert "written by prefixlm prepare --mixture" in inspected and "P* " in inspected
    assert (tmp_path / "runs/mix/train/checkpoints/step_00000020/COMMIT").is_file()
    assert "2 epochs written by prefixlm prepare --mixture" in trained

    import pyarrow.parquet as pq
    math = tmp_path / "examples/mixture/data/math.parquet"
    table = pq.read_table(math)
    pq.write_table(table.slice(0, 70), math)
    prepare = shlex.split(commands[1])[1:] + ["--overwrite"]
    assert cli.main(prepare) == 0
    again = capsys.readouterr().out
    assert "Tokenized by this run: math.parquet; from the cache" in again
    assert again.rstrip().count("instructions.jsonl") == 1


def test_mixture_errors_are_one_line(tmp_path, capsys):
    """Guards tracebacks for a bad mixture file: one line naming file, line and key, exit 2."""
    mix = tmp_path / "mix.yaml"
    mix.write_text("sources:\n  - path: a.jsonl\n    repeats: 2\n")
    code = cli.main(["prepare", "--mixture", str(mix), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{mix}:3: sources[0].repeats: unknown key" in err
