"""Scorers: a generated text and a task row -> a row score; row scores -> the task's metrics.

Each one reproduces HRM-Text's `evaluation/benchmarks.py` (the metric keys too), so numbers are
comparable with the ones it reports:

- `gsm8k`: the last `\\boxed{...}` if there is a non-empty one, else the whole text; commas, `$`
  and surrounding space removed; `int(float(...))` (so 3.7 reads as 3); no parse is invalid.
  {n, acc, invalid}.
- `math`: the last `\\boxed{...}` (the whole text when there is none: invalid) checked against
  the gold box with math_verify's `verify(parse(gold), parse(answer))`, both given the bare box
  contents as HRM-Text does. Bare LaTeX is read by math_verify's plain-expression parser only, so
  `\\sqrt{2}`, `\\pi` or intervals never match and `2\\sqrt{2}` reads as 2: that is the headline
  `acc`, as HRM-Text computes it. `acc_wrapped` is the corrected score: both sides wrapped as
  `$...$` (LaTeX parsed properly; an invalid row's whole text is parsed as text).
  {n, acc, invalid, acc_wrapped}.
- `mcq`: the generation stripped and upper-cased must be one of the row's letters (A, B, ...);
  anything else is invalid and earns chance credit 1/len(choices). With subjects, the metrics
  are per subject and `acc`/`invalid` their unweighted mean (a macro average; `n` is then the
  number of subjects), as HRM-Text's MMLU. {n, acc, invalid} (+ n_S, acc_S, invalid_S).
- `drop_f1`: DROP's exact match and F1 (`drop.py`) of the stripped text. {n, em, f1}.
- `exact`: the stripped text equals the stripped answer. {n, acc}.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..extras import require
from .drop import drop_metrics

__all__ = ["last_boxed_only_string", "gsm8k_answer", "RowScore", "SCORERS", "score_row",
           "aggregate", "headline_metric"]


def last_boxed_only_string(text: str) -> str | None:
    """Contents of the last `\\boxed` (else of the last `\\fbox`), stripped: from the first `{`
    after it to its matching `}`. None when there is no such box or its braces never balance.
    (HRM-Text's reading: `\\boxed{}` gives '', `\\boxed 5 then {x}` gives 'x'.)"""
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth, opened = 0, None
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
            opened = i if opened is None else opened
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[opened + 1:i].strip() if opened is not None else None
    return None


def gsm8k_answer(text: str) -> int | None:
    """The integer a GSM8k generation answers, or None (HRM-Text's extraction)."""
    boxed = last_boxed_only_string(text)
    if boxed:
        text = boxed
    text = text.replace(",", "").replace("$", "").strip()
    try:
        return int(float(text))
    except (ValueError, OverflowError):
        return None


def gsm8k_gold(answer: str) -> int:
    """The gold integer of a GSM8k answer ("... #### 1,200" or just "1200")."""
    return int(answer.split("####")[-1].strip().replace(",", ""))


@dataclass
class RowScore:
    """What one row earned: `score` in [0, 1] (chance credit for an invalid MCQ answer), whether
    the answer could not be read, what was read, and any further per-row metrics."""

    score: float
    invalid: bool = False
    extracted: object = None
    extra: dict = field(default_factory=dict)


def _math_verify():
    return require("math_verify", "eval", "the math scorer (math_verify)")


def _math_equal(gold: str, answer: str) -> bool:
    mv = _math_verify()
    # math_verify's timeouts use signal.alarm, which only the main thread may set.
    if threading.current_thread() is threading.main_thread():
        return bool(mv.verify(mv.parse(gold), mv.parse(answer)))
    return bool(mv.verify(mv.parse(gold, parsing_timeout=None),
                          mv.parse(answer, parsing_timeout=None), timeout_seconds=None))


def _score_gsm8k(doc, text):
    answer = gsm8k_answer(text)
    return RowScore(float(answer is not None and answer == doc["gold"]), answer is None, answer)


def _score_math(doc, text):
    boxed = last_boxed_only_string(text)
    answer = text if boxed is None else boxed
    wrapped = text if boxed is None else f"${boxed}$"
    return RowScore(float(_math_equal(doc["gold"], answer)), boxed is None, boxed,
                    {"acc_wrapped": float(_math_equal(f"${doc['gold']}$", wrapped))})


def _score_mcq(doc, text):
    letters = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    answer = text.strip().upper()
    if answer not in letters:
        return RowScore(1.0 / len(letters), True, answer)
    return RowScore(float(answer == letters[doc["gold"]]), False, answer)


def _score_drop(doc, text):
    metrics = drop_metrics(text, doc["gold"])
    return RowScore(metrics["f1"], False, text.strip(), {"em": metrics["em"]})


def _score_exact(doc, text):
    return RowScore(float(text.strip() == doc["gold"].strip()), False, text.strip())


SCORERS = {"gsm8k": _score_gsm8k, "math": _score_math, "mcq": _score_mcq,
           "drop_f1": _score_drop, "exact": _score_exact}


def score_row(scorer: str, doc: dict, text: str) -> RowScore:
    return SCORERS[scorer](doc, text)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _plain(scorer: str, scores: list[RowScore]) -> dict:
    n = len(scores)
    if scorer == "drop_f1":
        return {"n": n, "em": _mean(s.extra["em"] for s in scores),
                "f1": _mean(s.score for s in scores)}
    metrics = {"n": n, "acc": _mean(s.score for s in scores)}
    if scorer != "exact":
        metrics["invalid"] = _mean(float(s.invalid) for s in scores)
    if scorer == "math":
        metrics["acc_wrapped"] = _mean(s.extra["acc_wrapped"] for s in scores)
    return metrics


def aggregate(scorer: str, docs: list[dict], scores: list[RowScore],
              by_subject: bool = False) -> dict:
    """The task's metrics (HRM-Text's keys). by_subject: per-subject metrics and their macro
    average over subjects, in order of first appearance (HRM-Text's MMLU)."""
    if not by_subject:
        return _plain(scorer, scores)
    groups: dict[str, list[RowScore]] = {}
    for doc, score in zip(docs, scores):
        groups.setdefault(doc.get("subject") or "", []).append(score)
    metrics, accs, invalids = {}, [], []
    for subject, group in groups.items():
        plain = _plain(scorer, group)
        metrics[f"n_{subject}"] = plain["n"]
        metrics[f"acc_{subject}"] = plain["acc"]
        metrics[f"invalid_{subject}"] = plain["invalid"]
        accs.append(plain["acc"])
        invalids.append(plain["invalid"])
    metrics.update(n=len(groups), acc=_mean(accs), invalid=_mean(invalids))
    return metrics


def headline_metric(scorer: str) -> str:
    """The metric a task's summary reports: F1 for DROP-style tasks, else accuracy."""
    return "f1" if scorer == "drop_f1" else "acc"
