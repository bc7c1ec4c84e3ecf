"""DROP's exact match and F1 (the rules of lm-eval's `drop` task, which HRM-Text calls).

An answer is a list of spans. A span is normalised token by token (split on spaces and hyphens):
lower-cased; punctuation removed unless the token is a number; numbers written as Python floats
("1,200" -> "1200.0"); articles removed; empty tokens dropped. Exact match: the sets of
normalised spans are equal and the span counts too. F1: each span is a bag (set) of tokens;
predicted and gold spans are paired one to one to maximise the summed bag F1, where a pair
scores 0 unless the gold bag has no number or shares one with the prediction; the sum is
divided by the larger span count and rounded to 2 decimals (numpy rounding, as lm-eval). A row
scores the maximum over its gold answers, skipping answers whose first span is blank.
"""

from __future__ import annotations

import itertools
import re
import string

import numpy as np

__all__ = ["normalize", "answer_metrics", "drop_metrics", "parse_native_answers"]

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
_MAX_PAIRED_SPANS = 8  # the pairing is exhaustive over the smaller side's spans


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _normalize_token(token: str) -> str:
    token = token.lower()
    if not _is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if _is_number(token):
        token = str(float(token))
    return " ".join(_ARTICLES.sub(" ", token).split())


def normalize(span: str) -> str:
    """One span in DROP's normal form (see the module docstring)."""
    tokens = (_normalize_token(t) for t in re.split(" |-", span))
    return " ".join(t for t in tokens if t.strip()).strip()


def _bag_f1(predicted: set, gold: set) -> float:
    common = len(gold & predicted)
    precision = common / len(predicted) if predicted else 1.0
    recall = common / len(gold) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def _numbers_agree(gold: set, predicted: set) -> bool:
    gold_numbers = {w for w in gold if _is_number(w)}
    return not gold_numbers or bool(gold_numbers & {w for w in predicted if _is_number(w)})


def _best_pairing(scores: np.ndarray) -> float:
    """Largest sum of scores[g, p] over one-to-one pairings of rows and columns."""
    rows, cols = scores.shape
    if min(rows, cols) == 0:
        return 0.0
    if min(rows, cols) > _MAX_PAIRED_SPANS:
        raise ValueError(f"DROP F1 pairs at most {_MAX_PAIRED_SPANS} spans on the smaller side, "
                         f"got {rows} gold and {cols} predicted spans")
    if rows <= cols:
        return max(sum(scores[g, p] for g, p in enumerate(perm))
                   for perm in itertools.permutations(range(cols), rows))
    return max(sum(scores[g, p] for p, g in enumerate(perm))
               for perm in itertools.permutations(range(rows), cols))


def answer_metrics(predicted: list[str], gold: list[str]) -> tuple[float, float]:
    """(exact match, F1) of predicted spans against one gold answer's spans."""
    pred_norm, gold_norm = [normalize(s) for s in predicted], [normalize(s) for s in gold]
    exact = float(set(pred_norm) == set(gold_norm) and len(pred_norm) == len(gold_norm))
    pred_bags, gold_bags = [set(s.split()) for s in pred_norm], [set(s.split()) for s in gold_norm]
    scores = np.zeros((len(gold_bags), len(pred_bags)))
    for g, gold_bag in enumerate(gold_bags):
        for p, pred_bag in enumerate(pred_bags):
            if _numbers_agree(gold_bag, pred_bag):
                scores[g, p] = _bag_f1(pred_bag, gold_bag)
    slots = max(len(gold_bags), len(pred_bags))
    f1 = _best_pairing(scores) / slots if slots else 0.0
    return exact, float(np.round(f1, 2))


def drop_metrics(prediction: str, answers: list[list[str]]) -> dict[str, float]:
    """{"em", "f1"} of one generated text (a single span, as HRM-Text passes it: stripped)
    against a row's gold answers: the best over answers whose first span is not blank."""
    em = f1 = 0.0
    for gold in answers:
        if gold and gold[0].strip():
            exact, score = answer_metrics([prediction.strip()], gold)
            em, f1 = max(em, exact), max(f1, score)
    return {"em": em, "f1": f1}


def _native_answer(answer: dict) -> tuple[str, ...]:
    if answer["number"] != "":
        return (str(answer["number"]),)
    if answer["spans"]:
        return tuple(answer["spans"])
    date = answer["date"]
    return (" ".join([date["day"], date["month"], date["year"]]).strip(),)


def parse_native_answers(row: dict) -> list[list[str]]:
    """The gold answers of a row of the EleutherAI/drop dataset (`answer` and
    `validated_answers`), deduplicated in order, as lm-eval's `process_docs` reads them."""
    validated = row.get("validated_answers") or {"number": [], "date": [], "spans": []}
    candidates = [row["answer"]] + [
        {"number": number, "date": date, "spans": spans}
        for number, date, spans in zip(validated["number"], validated["date"],
                                       validated["spans"])]
    seen, out = set(), []
    for candidate in candidates:
        answer = _native_answer(candidate)
        if answer not in seen:
            seen.add(answer)
            out.append(list(answer))
    return out
