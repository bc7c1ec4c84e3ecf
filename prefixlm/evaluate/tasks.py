"""Evaluation tasks: local row files -> documents -> prompts rendered as HRM-Text renders them.

A task is a preset (how rows are read and prompts built, the scorer, the condition tokens and
the generation settings, all as HRM-Text's `evaluation/` has them for its benchmarks) applied to
a local file, with optional overrides. The files are the public datasets' own rows, exported to
JSONL or Parquet (`datasets.load_dataset(...).to_json(...)`, or the hub's Parquet files), or the
simpler generic rows:

| preset | rows (fields) | prompt |
|---|---|---|
| gsm8k | question, answer ("... #### 72" or "72") | question |
| math | problem, and answer (bare box contents) or solution (its last \\boxed{}) | problem |
| drop | passage, question, answers [[span, ...], ...] (or drop's own answer fields) | 3 shots |
| mmlu | question, choices, answer (0-based), subject | MCQ, shots of the same subject |
| arc | question, choices {text, label}, answerKey | MCQ |
| hellaswag | ctx_a, ctx_b, endings, label | MCQ |
| winogrande | sentence, option1, option2, answer ("1"/"2") | MCQ |
| boolq | passage, question, answer (bool) | MCQ, Yes/No |
| exact / boxed / f1 | prompt, answer (f1: answers) | prompt |
| mcq | query, choices, gold (0-based), subject? | MCQ |

DROP reads EleutherAI/drop's `answer` and `validated_answers` as lm-eval does; its shot rows
need `answer` as text. Every MCQ preset also reads the generic `mcq` rows. The MCQ prompt is
HRM-Text's: each shot `query\\nA. choice\\nB. choice\\n...Answer: X` followed by a blank line,
then the row the same way ending in `Answer:`. The rendered prompt is
`prompt_template.format(prompt=...)`, stripped, as the instruction (bidirectional prefix) after
the condition tokens; the answer is generated causally.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..extras import require
from ..fsutil import file_sha256
from ..model.generate import GenConfig
from .scorers import gsm8k_gold, headline_metric, last_boxed_only_string
from .drop import parse_native_answers

__all__ = ["Preset", "PRESETS", "Task", "GenerationSettings", "parse_task_spec", "load_task_yaml",
           "read_rows"]


@dataclass
class GenerationSettings:
    """max_context: HRM-Text's cap (a prompt of that many tokens or more is skipped, and at most
    max_context - prompt_len tokens are generated); max_new_tokens None: that cap alone."""

    max_context: int | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()

    def config(self, eoa_id: int, seed: int = 0) -> GenConfig:
        if self.max_new_tokens is None and self.max_context is None:
            raise ValueError("give max_new_tokens or max_context: nothing bounds the answers")
        max_new = self.max_context if self.max_new_tokens is None else self.max_new_tokens
        return GenConfig(max_new_tokens=max_new, max_context=self.max_context,
                         temperature=self.temperature, top_p=self.top_p, stop_ids=(eoa_id,),
                         stop_strings=tuple(self.stop), seed=seed).validate()

    def cap_new_tokens(self, limit: int) -> None:
        """At most `limit` new tokens (a preset's one-token answers stay one token)."""
        self.max_new_tokens = limit if self.max_new_tokens is None else min(self.max_new_tokens,
                                                                            limit)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "stop": list(self.stop)}


# -- reading rows -------------------------------------------------------------------------------

def _get(row: dict, name: str, *kinds):
    if name not in row:
        raise ValueError(f"field {name!r} is missing")
    value = row[name]
    if kinds and (not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool))):
        names = " or ".join(k.__name__ for k in kinds)
        raise ValueError(f"field {name!r} must be {names}, got {type(value).__name__}")
    return value


def _strings(row: dict, name: str) -> list[str]:
    value = _get(row, name, list)
    if not value or not all(isinstance(v, str) for v in value):
        raise ValueError(f"field {name!r} must be a non-empty list of strings")
    return value


def _index(row: dict, name: str, choices: list) -> int:
    value = _get(row, name, int, str)
    try:
        index = int(value)
    except ValueError:
        raise ValueError(f"field {name!r} must be an integer, got {value!r}") from None
    if not 0 <= index < len(choices):
        raise ValueError(f"field {name!r} = {index} is not a choice index (0..{len(choices) - 1})")
    return index


def _mcq_doc(query: str, choices: list[str], gold: int, subject: str | None = None) -> dict:
    return {"query": query, "choices": choices, "gold": gold, "subject": subject}


def _generic_mcq(row: dict) -> dict:
    choices = _strings(row, "choices")
    subject = row.get("subject")
    if subject is not None and not isinstance(subject, str):
        raise ValueError(f"field 'subject' must be str, got {type(subject).__name__}")
    return _mcq_doc(_get(row, "query", str), choices, _index(row, "gold", choices), subject)


def _mcq_reader(native):
    """A reader of the dataset's own rows that also takes generic `mcq` rows (a `query`)."""
    def read(row):
        return _generic_mcq(row) if "query" in row else native(row)
    read.__doc__ = native.__doc__
    return read


def _read_gsm8k(row):
    answer = _get(row, "answer", str, int)
    try:
        gold = gsm8k_gold(str(answer))
    except ValueError:
        raise ValueError(f"field 'answer' ends in no integer ('#### N' or N): {answer!r}") from None
    return {"prompt": _get(row, "question", str), "gold": gold}


def _boxed_gold(row):
    if "answer" in row:
        return _get(row, "answer", str)
    solution = _get(row, "solution", str)
    gold = last_boxed_only_string(solution)
    if gold is None:
        raise ValueError("field 'solution' has no \\boxed{...} answer (or give 'answer')")
    return gold


def _read_math(row):
    return {"prompt": _get(row, "problem", str), "gold": _boxed_gold(row)}


def _read_boxed(row):
    return {"prompt": _get(row, "prompt", str), "gold": _boxed_gold(row)}


def _read_exact(row):
    return {"prompt": _get(row, "prompt", str), "gold": str(_get(row, "answer", str, int, float))}


def _gold_answers(row) -> list[list[str]]:
    if "answers" in row:
        answers = _get(row, "answers", list)
        out = [[a] if isinstance(a, str) else a for a in answers]
        if not out or not all(isinstance(a, list) and a and all(isinstance(s, str) for s in a)
                              for a in out):
            raise ValueError("field 'answers' must be a non-empty list of answers, each a "
                             "string or a list of span strings")
        return out
    if isinstance(row.get("answer"), dict):
        try:
            return parse_native_answers(row)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"field 'answer'/'validated_answers' is not EleutherAI/drop's "
                             f"layout: {exc!r}") from None
    if isinstance(row.get("answer"), str):
        return [[row["answer"]]]
    raise ValueError("field 'answers' is missing (or EleutherAI/drop's 'answer')")


def _read_drop(row):
    answers = _gold_answers(row)
    shot = row["answer"] if isinstance(row.get("answer"), str) else ", ".join(answers[0])
    return {"passage": _get(row, "passage", str), "question": _get(row, "question", str),
            "gold": answers, "shot_answer": shot}


def _read_f1(row):
    answers = _gold_answers(row)
    return {"prompt": _get(row, "prompt", str), "gold": answers}


def _read_mmlu(row):
    """cais/mmlu: question, choices, answer (0-based), subject."""
    choices = _strings(row, "choices")
    return _mcq_doc(_get(row, "question", str), choices, _index(row, "answer", choices),
                    _get(row, "subject", str))


def _read_arc(row):
    """allenai/ai2_arc: question, choices {text, label}, answerKey (letters re-assigned A..)."""
    choices = _get(row, "choices", dict)
    text, labels = choices.get("text"), choices.get("label")
    if not isinstance(text, list) or not isinstance(labels, list) or len(text) != len(labels):
        raise ValueError("field 'choices' must hold lists 'text' and 'label' of one length")
    key = _get(row, "answerKey", str)
    if key not in labels:
        raise ValueError(f"field 'answerKey' {key!r} is not one of the labels {labels}")
    return _mcq_doc(_get(row, "question", str), text, labels.index(key))


def _read_hellaswag(row):
    """Rowan/hellaswag: ctx_a, ctx_b, endings, label."""
    endings = _strings(row, "endings")
    query = (f"{_get(row, 'ctx_a', str)} {_get(row, 'ctx_b', str).capitalize()}\n"
             "Question: Which is the most logical continuation?")
    return _mcq_doc(query, endings, _index(row, "label", endings))


def _read_winogrande(row):
    """allenai/winogrande: sentence, option1, option2, answer ("1" or "2")."""
    choices = [_get(row, "option1", str), _get(row, "option2", str)]
    answer = _get(row, "answer", str, int)
    if str(answer) not in ("1", "2"):
        raise ValueError(f"field 'answer' must be '1' or '2', got {answer!r}")
    return _mcq_doc(_get(row, "sentence", str), choices, int(answer) - 1)


def _read_boolq(row):
    """google/boolq: passage, question, answer (bool; True is choice A, Yes)."""
    query = f"{_get(row, 'passage', str)}\nQuestion: {_get(row, 'question', str).capitalize()}?"
    return _mcq_doc(query, ["Yes", "No"], 1 - int(bool(_get(row, "answer", bool))))


# -- presets ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """How a benchmark is read, prompted, generated and scored (HRM-Text's settings)."""

    name: str
    reader: object
    template: str                 # question | mcq | drop
    scorer: str
    condition: str | None
    generation: GenerationSettings
    num_shots: int = 0
    special_shots: dict = field(default_factory=dict)
    by_subject: bool | None = False  # None: when every row has a subject
    shots_from: str = ""          # where HRM-Text takes the shots (for the error message)


def _hrm_generation(max_context, max_new_tokens=None):
    return GenerationSettings(max_context=max_context, max_new_tokens=max_new_tokens)


PRESETS = {p.name: p for p in [
    Preset("gsm8k", _read_gsm8k, "question", "gsm8k", "synth,cot", _hrm_generation(3072)),
    Preset("math", _read_math, "question", "math", "synth,cot", _hrm_generation(3072)),
    Preset("drop", _read_drop, "drop", "drop_f1", "direct", _hrm_generation(3072), num_shots=3,
           shots_from="the three DROP train examples fixed in HRM-Text's evaluation "
                      "(DROP.EXAMPLES), as rows with passage, question, answer"),
    Preset("mmlu", _mcq_reader(_read_mmlu), "mcq", "mcq", "direct", _hrm_generation(4096, 1),
           num_shots=5, special_shots={"high_school_european_history": 3}, by_subject=True,
           shots_from="MMLU's dev split (cais/mmlu, all); each subject's first rows"),
    Preset("arc", _mcq_reader(_read_arc), "mcq", "mcq", "direct", _hrm_generation(4096, 1),
           num_shots=25, shots_from="ARC-Challenge's validation split (its first rows)"),
    Preset("hellaswag", _mcq_reader(_read_hellaswag), "mcq", "mcq", "direct",
           _hrm_generation(4096, 1), num_shots=10,
           shots_from="HellaSwag's train split (its first rows)"),
    Preset("winogrande", _mcq_reader(_read_winogrande), "mcq", "mcq", "direct",
           _hrm_generation(4096, 1), num_shots=5,
           shots_from="winogrande_debiased's train split (its first rows)"),
    Preset("boolq", _mcq_reader(_read_boolq), "mcq", "mcq", "direct", _hrm_generation(4096, 1),
           num_shots=5, shots_from="BoolQ's train split (its first rows)"),
    # Generic presets for users' own data: no condition token unless asked for.
    Preset("exact", _read_exact, "question", "exact", None, GenerationSettings(None, 256)),
    Preset("boxed", _read_boxed, "question", "math", None, GenerationSettings(None, 1024)),
    Preset("f1", _read_f1, "question", "drop_f1", None, GenerationSettings(None, 256)),
    Preset("mcq", _generic_mcq, "mcq", "mcq", None, GenerationSettings(None, 1), by_subject=None),
]}


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a JSONL file (one object per line; blank lines skipped) or a Parquet file
    (needs pyarrow), each with its line number under "_line"."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    if path.suffix == ".parquet":
        pq = require("pyarrow.parquet", "eval", "reading Parquet task files")
        return [{**row, "_line": i + 1} for i, row in enumerate(pq.read_table(path).to_pylist())]
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON: {exc.msg}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object, got "
                                 f"{type(row).__name__}")
            rows.append({**row, "_line": lineno})
    return rows


# -- tasks --------------------------------------------------------------------------------------

def _mcq_block(doc: dict, with_answer: bool) -> str:
    text = doc["query"].strip() + "\n"
    for i, choice in enumerate(doc["choices"]):
        text += f"{chr(ord('A') + i)}. {choice.strip()}\n"
    return text + (f"Answer: {chr(ord('A') + doc['gold'])}" if with_answer else "Answer:")


def _drop_block(doc: dict, answer: str | None) -> str:
    return f"{doc['passage']}\nQ: {doc['question']}\nA:" + ("" if answer is None else f" {answer}")


@dataclass
class Task:
    """One evaluation: a preset over a file. None fields take the preset's value."""

    name: str
    preset: str
    data: str
    shots: str | None = None
    num_shots: int | None = None
    special_shots: dict | None = None
    condition: str | None = "preset"   # "preset": the preset's; "", None or "none": no condition
    prompt_template: str = "{prompt}"
    limit: int = 0
    generation: GenerationSettings | None = None

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"task {self.name}: unknown preset {self.preset!r}; choose one of "
                             f"{', '.join(PRESETS)}")
        base = PRESETS[self.preset]
        if self.generation is None:
            self.generation = dataclasses.replace(base.generation)
        if self.num_shots is None:
            self.num_shots = base.num_shots
        if self.special_shots is None:
            self.special_shots = dict(base.special_shots)
        if self.condition == "preset":
            self.condition = base.condition
        if self.condition in ("none", None):
            self.condition = ""  # explicitly none (None would mean the tokenizer's default)
        if self.num_shots < 0 or self.limit < 0:
            raise ValueError(f"task {self.name}: num_shots and limit must be >= 0")
        if "{prompt}" not in self.prompt_template:
            raise ValueError(f"task {self.name}: prompt_template must contain {{prompt}}, got "
                             f"{self.prompt_template!r}")

    @property
    def spec(self) -> Preset:
        return PRESETS[self.preset]

    @property
    def scorer(self) -> str:
        return self.spec.scorer

    @property
    def headline(self) -> str:
        return headline_metric(self.scorer)

    def _docs(self, path: str | Path, what: str) -> list[dict]:
        docs = []
        for row in read_rows(path):
            line = row.pop("_line")
            try:
                doc = self.spec.reader(row)
            except ValueError as exc:
                raise ValueError(f"{path}:{line}: {exc} ({what} of task {self.name}, preset "
                                 f"{self.preset})") from None
            doc["id"] = row.get("id", row.get("query_id", line))
            docs.append(doc)
        if not docs:
            raise ValueError(f"{path}: no rows ({what} of task {self.name})")
        return docs

    def load(self) -> list[dict]:
        """The documents to evaluate (the first `limit` when limit > 0), each with its
        rendered `prompt_text`."""
        docs = self._docs(self.data, "data")
        if self.limit:
            docs = docs[:self.limit]
        shots = self._shots()
        # Decided over the task's rows, as scoring decides it (`by_subject(docs)`), not per row:
        # a row with a subject in a task that is not by subject takes the common shots.
        shots_of_subject = None
        if self.by_subject(docs):
            shots_of_subject = {}
            for shot in shots:
                shots_of_subject.setdefault(shot.get("subject"), []).append(shot)
        for doc in docs:
            doc["prompt_text"] = self.prompt_template.format(
                prompt=self._prompt(doc, shots, shots_of_subject)).strip()
        return docs

    def _shots(self) -> list[dict]:
        if self.spec.template == "question" or self.num_shots == 0:
            if self.shots and self.num_shots == 0:
                raise ValueError(f"task {self.name}: a shots file but num_shots 0 (set "
                                 f"--num-shots {self.name}=K)")
            return []
        if not self.shots:
            raise ValueError(
                f"task {self.name}: the {self.preset} preset prompts with {self.num_shots} shots "
                f"taken from {self.spec.shots_from or 'a shots file'}: pass --shots "
                f"{self.name}=FILE (same row format), or --num-shots {self.name}=0")
        return self._docs(self.shots, "shots")

    def by_subject(self, docs: list[dict]) -> bool:
        if self.spec.by_subject is None:
            return all(doc.get("subject") for doc in docs)
        return self.spec.by_subject

    def _prompt(self, doc: dict, shots: list[dict], shots_of_subject: dict | None) -> str:
        """`shots_of_subject` (subject -> its shots in order): the task takes shots of each row's
        subject; None: the first `num_shots` of all."""
        template = self.spec.template
        if template == "question":
            return doc["prompt"]
        if template == "drop":
            return "".join(_drop_block(s, s["shot_answer"]) + "\n\n"
                           for s in shots[:self.num_shots]) + _drop_block(doc, None)
        subject = doc.get("subject")
        if shots_of_subject is not None and subject:
            count = self.special_shots.get(subject, self.num_shots)
            chosen = shots_of_subject.get(subject, [])[:count]
        else:
            chosen = shots[:self.num_shots]
        return "".join(_mcq_block(s, True) + "\n\n" for s in chosen) + _mcq_block(doc, False)

    def describe(self) -> dict:
        """The task's settings as recorded in the results."""
        return {"preset": self.preset, "data": str(self.data),
                "data_sha256": file_sha256(self.data), "scorer": self.scorer,
                "condition": self.condition, "prompt_template": self.prompt_template,
                "shots": None if self.shots is None else str(self.shots),
                "num_shots": self.num_shots, "limit": self.limit,
                "generation": self.generation.to_dict()}


_TASK_KEYS = {f.name for f in dataclasses.fields(Task)}
_GENERATION_KEYS = {f.name for f in dataclasses.fields(GenerationSettings)}


def parse_task_spec(spec: str) -> Task:
    """`PRESET=FILE` (task named after the preset), `NAME:PRESET=FILE`, or a task `FILE.yaml`."""
    if spec.endswith((".yaml", ".yml")) and "=" not in spec:
        return load_task_yaml(spec)
    name_preset, sep, path = spec.partition("=")
    if not sep or not path:
        raise ValueError(f"task {spec!r}: expected PRESET=FILE, NAME:PRESET=FILE or FILE.yaml "
                         f"(presets: {', '.join(PRESETS)})")
    name, _, preset = name_preset.rpartition(":")
    return Task(name=name or preset, preset=preset, data=path)


def load_task_yaml(path: str | Path) -> Task:
    """A task from YAML: `preset` and `data` (paths relative to the file), and any of name, shots,
    num_shots, special_shots, condition, prompt_template, limit, generation {max_context,
    max_new_tokens, temperature, top_p, stop}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a task file holds a mapping")
    unknown = sorted(set(values) - _TASK_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown task keys {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(_TASK_KEYS))}")
    for key in ("preset", "data"):
        if key not in values:
            raise ValueError(f"{path}: the task needs {key!r}")
    for key in ("data", "shots"):
        if values.get(key) is not None:
            values[key] = str(path.parent / values[key])
    generation = values.pop("generation", None)
    if generation is not None:
        if not isinstance(generation, dict) or set(generation) - _GENERATION_KEYS:
            raise ValueError(f"{path}: generation must be a mapping of "
                             f"{', '.join(sorted(_GENERATION_KEYS))}")
        base = PRESETS.get(values["preset"])
        merged = {**dataclasses.asdict(base.generation), **generation} if base else generation
        merged["stop"] = tuple(merged.get("stop") or ())
        values["generation"] = GenerationSettings(**merged)
    values.setdefault("name", path.stem)
    if "condition" in values and values["condition"] is None:
        values["condition"] = "none"
    return Task(**values)
