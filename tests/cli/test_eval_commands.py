"""`prefixlm eval --tasks` and `generate --condition` on a model that memorised the fixtures."""

import json

from evalhelpers import GSM8K, MMLU, MMLU_SHOTS
from prefixlm.cli import main


def test_eval_tasks_scores_a_memorised_model(memorised_run, tmp_path, capsys):
    """Guards the whole path a user runs (checkpoint -> rendered prompts with the condition ->
    batched generation -> HRM-Text's scorers -> JSON, table, samples): a model that memorised
    every fixture answer must score 1.0 on both tasks with no invalid answer, MMLU per subject."""
    out, samples = tmp_path / "results.json", tmp_path / "samples.jsonl"
    assert main(["eval", "--checkpoint", str(memorised_run), "--tasks", f"gsm8k={GSM8K}",
                 f"mmlu={MMLU}", "--shots", f"mmlu={MMLU_SHOTS}", "--condition", "direct",
                 "--max-new-tokens", "8", "--batch-size", "2", "--json-out", str(out),
                 "--samples-out", str(samples)]) == 0
    printed = capsys.readouterr().out
    assert "gsm8k" in printed and "acc (macro, 2 subjects)" in printed
    results = json.loads(out.read_text())
    gsm, mmlu = results["tasks"]["gsm8k"], results["tasks"]["mmlu"]
    assert gsm["metrics"] == {"n": 3, "acc": 1.0, "invalid": 0.0}
    assert mmlu["metrics"]["acc"] == 1.0 and mmlu["metrics"]["n"] == 2
    assert mmlu["metrics"]["n_astronomy"] == 3 and mmlu["metrics"]["invalid"] == 0.0
    assert results["summary"] == {"gsm8k": 1.0, "mmlu": 1.0}
    assert results["weights"] == "raw" and results["checkpoint"].endswith("step_00000120")
    assert gsm["condition"] == "direct" and gsm["generation"]["max_new_tokens"] == 8
    assert mmlu["generation"]["max_new_tokens"] == 1  # --max-new-tokens caps, MCQ stays 1
    assert len(gsm["data_sha256"]) == 64 and gsm["finish_reasons"] == {"stop": 3}
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["generation"] for r in rows[:3]] == ["7", "1200", "4"]
    assert {r["task"] for r in rows} == {"gsm8k", "mmlu"} and len(rows) == 7


def test_generate_renders_the_condition(memorised_run, capsys):
    """Guards `generate --condition`: the memorised answer comes back only with the condition
    token it was trained with."""
    question = json.loads(GSM8K.read_text().splitlines()[0])["question"]
    assert main(["generate", "--checkpoint", str(memorised_run), "--prompt", question,
                 "--condition", "direct", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "7\n"


def test_eval_task_errors_are_one_line(memorised_run, capsys):
    """Guards tracebacks for a user's mistakes: an undeclared condition, an unknown preset,
    --shots for a task that is not there, --tasks with --data."""
    base = ["eval", "--checkpoint", str(memorised_run)]
    cases = [
        (["--tasks", f"gsm8k={GSM8K}", "--condition", "fancy"], "unknown condition 'fancy'"),
        (["--tasks", f"gsm9k={GSM8K}"], "unknown preset 'gsm9k'"),
        (["--tasks", f"gsm8k={GSM8K}", "--shots", f"mmlu={MMLU_SHOTS}"], "no task named mmlu"),
        (["--tasks", f"gsm8k={GSM8K}", "--data", str(GSM8K)], "--tasks and --data"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, extra
