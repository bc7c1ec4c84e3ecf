"""Task presets: rows read from the datasets' own layouts, prompts exactly as HRM-Text builds them,
shots, YAML task files, and errors that name the file, line and field."""

import json
from pathlib import Path

import pytest

from prefixlm.evaluate.tasks import PRESETS, Task, load_task_yaml, parse_task_spec

FIXTURES = Path(__file__).parent / "fixtures"


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_and_math_read_the_datasets_rows():
    """Guards the gold answers: GSM8k's after '####' with commas dropped, MATH's the solution's
    last box, and the prompt the bare question (HRM-Text's zero-shot prompt)."""
    docs = Task("gsm8k", "gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl")).load()
    assert [d["gold"] for d in docs] == [7, 1200, 4]
    assert docs[0]["prompt_text"] == ("Tom has 3 apples and buys 4 more. How many apples does "
                                      "he have now?")
    docs = Task("math", "math", str(FIXTURES / "math_tiny.jsonl")).load()
    assert [d["gold"] for d in docs] == ["\\frac{1}{2}", "42", "\\sqrt{2}"]
    assert Task("math", "math", "x").condition == "synth,cot"


def test_mmlu_prompt_is_hrm_texts_with_same_subject_shots():
    """Guards the MMLU prompt byte for byte: each subject's first 5 dev rows as shots (3 for
    high_school_european_history, HRM-Text's special case), blank lines between, 'Answer:' at the
    end, no subject header."""
    task = Task("mmlu", "mmlu", str(FIXTURES / "mmlu_tiny.jsonl"),
                shots=str(FIXTURES / "mmlu_tiny.shots.jsonl"))
    docs = task.load()
    first = docs[0]["prompt_text"]
    assert first.startswith("What is the Sun?\nA. A planet\nB. A star\nC. A moon\nD. A comet\n"
                            "Answer: B\n\nHow many planets orbit the Sun?\n")
    assert first.endswith("Which planet is called the red planet?\nA. Venus\nB. Mars\n"
                          "C. Jupiter\nD. Saturn\nAnswer: B\n\n"
                          "Which planet is closest to the Sun?\nA. Venus\nB. Mercury\nC. Earth\n"
                          "D. Mars\nAnswer:")
    assert first.count("Answer:") == 6 and "centre" not in first
    history = docs[3]["prompt_text"]
    assert history.count("Answer:") == 4 and "Byzantine" not in history
    assert "What is the Sun" not in history
    assert task.by_subject(docs) and task.condition == "direct"
    assert task.generation.max_new_tokens == 1 and task.generation.max_context == 4096


def test_generic_mcq_takes_subject_shots_only_when_every_row_has_a_subject(tmp_path):
    """Guards shots chosen per row: in an `mcq` task where only some rows have a subject (so the
    task is not by subject, as its scoring says), a row with a subject took only shots of that
    subject, which here is none at all: zero shots, silently. Every row takes the common shots;
    a task whose rows all have a subject takes each subject's own."""
    shots = _write(tmp_path / "shots.jsonl", [
        {"query": f"S{i}?", "choices": ["p", "q"], "gold": 0} for i in range(2)]
        + [{"query": "Geo?", "choices": ["p", "q"], "gold": 1, "subject": "geo"}])
    rows = [{"query": "Q1?", "choices": ["x", "y"], "gold": 1, "subject": "astro"},
            {"query": "Q2?", "choices": ["x", "y"], "gold": 0}]
    task = Task("mix", "mcq", _write(tmp_path / "mixed.jsonl", rows), shots=shots, num_shots=2)
    docs = task.load()
    assert not task.by_subject(docs)
    assert [d["prompt_text"].count("Answer:") for d in docs] == [3, 3]
    assert all(d["prompt_text"].startswith("S0?") for d in docs)
    rows[1]["subject"] = "geo"
    task = Task("all", "mcq", _write(tmp_path / "all.jsonl", rows), shots=shots, num_shots=2)
    docs = task.load()
    assert task.by_subject(docs)
    assert [d["prompt_text"].count("Answer:") for d in docs] == [1, 2]
    assert docs[1]["prompt_text"].startswith("Geo?")


def test_mcq_presets_map_each_datasets_fields_like_hrm_text():
    """Guards each benchmark's row mapping: ARC's labels re-lettered from A by position,
    HellaSwag's and BoolQ's str.capitalize() (which lower-cases the rest), BoolQ True -> A (Yes),
    Winogrande's 1-based answer."""
    cases = {
        "arc": ({"question": "Q?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]},
                 "answerKey": "3"}, "Q?\nA. x\nB. y\nC. z\nAnswer:", 2),
        "hellaswag": ({"ctx_a": "A man sits.", "ctx_b": "then HE Stands", "endings": ["a", "b"],
                       "label": "1"},
                      "A man sits. Then he stands\nQuestion: Which is the most logical "
                      "continuation?\nA. a\nB. b\nAnswer:", 1),
        "winogrande": ({"sentence": "Tom _ left.", "option1": "he", "option2": "she",
                        "answer": "2"}, "Tom _ left.\nA. he\nB. she\nAnswer:", 1),
        "boolq": ({"passage": "Sky.", "question": "is the sky BLUE", "answer": True},
                  "Sky.\nQuestion: Is the sky blue?\nA. Yes\nB. No\nAnswer:", 0),
    }
    for preset, (row, prompt, gold) in cases.items():
        task = Task(preset, preset, "unused", num_shots=0)
        doc = PRESETS[preset].reader(row)
        assert task._prompt(doc, [], None) == prompt, preset
        assert doc["gold"] == gold, preset
    generic = {"query": "Pick", "choices": ["p", "q"], "gold": 1}
    assert PRESETS["arc"].reader(generic)["gold"] == 1


def test_drop_prompt_uses_the_shots_and_gold_answers(tmp_path):
    """Guards DROP's 3-shot prompt ('passage\\nQ: question\\nA: answer' blocks, blank lines, the
    row ending in 'A:') and gold answers read from EleutherAI/drop's answer + validated_answers
    (number first, spans, deduplicated) or from a plain `answers` list."""
    task = Task("drop", "drop", str(FIXTURES / "drop_tiny.jsonl"),
                shots=str(FIXTURES / "drop_tiny.shots.jsonl"))
    docs = task.load()
    assert docs[0]["gold"] == [["3"], ["three"]]
    assert docs[1]["gold"] == [["Ann Lee", "Bo Park"]]
    prompt = docs[1]["prompt_text"]
    assert prompt.startswith("The Owls scored two touchdowns in the first quarter\nQ: How many "
                             "touchdowns did the Owls score in the first quarter?\nA: 2\n\n")
    assert prompt.endswith("Bo Park caught a 5-yard pass.\nQ: Who caught passes?\nA:")
    assert prompt.count("\nA:") == 4
    assert docs[0]["id"] == "q1" and task.condition == "direct"


def test_shots_are_required_where_hrm_text_uses_them():
    """Guards a silently zero-shot MMLU/DROP (numbers not comparable): without a shots file the
    error says where HRM-Text's shots come from and how to opt out."""
    with pytest.raises(ValueError, match=r"5 shots taken from MMLU's dev split.*--shots mmlu="):
        Task("mmlu", "mmlu", str(FIXTURES / "mmlu_tiny.jsonl")).load()
    docs = Task("mmlu", "mmlu", str(FIXTURES / "mmlu_tiny.jsonl"), num_shots=0).load()
    assert docs[0]["prompt_text"].count("Answer:") == 1


def test_bad_rows_name_file_line_and_field(tmp_path):
    """Guards a traceback (or a silently skipped row) for a malformed task file: the message
    names the file, the line, the field and the preset."""
    path = _write(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q"}])
    with pytest.raises(ValueError, match=r"g.jsonl:2: field 'answer' is missing .*gsm8k"):
        Task("gsm8k", "gsm8k", path).load()
    path = _write(tmp_path / "m.jsonl", [{"question": "q", "subject": "s", "choices": ["a"],
                                          "answer": 3}])
    with pytest.raises(ValueError, match=r"m.jsonl:1: field 'answer' = 3 is not a choice"):
        Task("mmlu", "mmlu", path, num_shots=0).load()
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "1"}\n\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: not valid JSON"):
        Task("gsm8k", "gsm8k", str(tmp_path / "bad.jsonl")).load()
    path = _write(tmp_path / "s.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"s.jsonl:1: field 'solution' has no \\boxed"):
        Task("math", "math", path).load()
    with pytest.raises(ValueError, match="unknown preset 'gsm9k'"):
        parse_task_spec("gsm9k=x.jsonl")


def test_specs_templates_limit_and_yaml(tmp_path):
    """Guards the ways a task is named: PRESET=FILE, NAME:PRESET=FILE, a YAML file (paths
    relative to it, unknown keys rejected, generation merged over the preset's), and the
    prompt_template wrapper applied before the strip."""
    assert parse_task_spec("gsm8k=a.jsonl").name == "gsm8k"
    named = parse_task_spec("dev:gsm8k=a.jsonl")
    assert (named.name, named.preset, named.data) == ("dev", "gsm8k", "a.jsonl")
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": " p1 ", "answer": "x"},
                                            {"prompt": "p2", "answer": "y"}])
    (tmp_path / "t.yaml").write_text(
        'preset: exact\ndata: rows.jsonl\nprompt_template: "Q: {prompt}\\n"\nlimit: 1\n'
        'condition: null\ngeneration: {max_new_tokens: 8, stop: ["\\n"]}\n')
    task = load_task_yaml(tmp_path / "t.yaml")
    assert (task.name, task.data, task.condition) == ("t", rows, "")  # "": no condition
    assert task.generation.stop == ("\n",) and task.generation.max_new_tokens == 8
    assert [d["prompt_text"] for d in task.load()] == ["Q:  p1"]
    (tmp_path / "u.yaml").write_text("preset: exact\ndata: rows.jsonl\nshotz: 3\n")
    with pytest.raises(ValueError, match="unknown task keys shotz"):
        load_task_yaml(tmp_path / "u.yaml")


def test_parquet_rows_equal_jsonl_rows(tmp_path):
    """Guards the hub's own files: a Parquet export (as the datasets hub stores GSM8k) gives the
    same documents as the JSONL."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "gsm8k_tiny.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test.parquet")
    from_parquet = Task("gsm8k", "gsm8k", str(tmp_path / "test.parquet")).load()
    from_jsonl = Task("gsm8k", "gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl")).load()
    assert [(d["prompt_text"], d["gold"]) for d in from_parquet] == \
        [(d["prompt_text"], d["gold"]) for d in from_jsonl]
