"""Scorers against HRM-Text's documented behaviour, edge case by edge case, and DROP's F1 against
lm-eval's own implementation."""

import pytest

from prefixlm.evaluate.drop import answer_metrics, drop_metrics, normalize
from prefixlm.evaluate.scorers import (aggregate, gsm8k_answer, last_boxed_only_string,
                                       score_row)


@pytest.mark.parametrize("text, expected", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{}", ""),
    ("\\boxed 5 and later {x}", "x"),
    ("\\boxed{a{b}c}", "a{b}c"),
    ("\\boxed{unclosed", None),
    ("\\boxed{1} then \\boxed{ 2 }", "2"),
    ("\\fbox{3}", "3"),
    ("\\fbox{1} and \\boxed{2}", "2"),
    ("\\boxed{2} and \\fbox{1}", "2"),
    ("no box at all", None),
    ("\\boxed}{x}", None),
])
def test_last_boxed_only_string_reads_boxes_as_hrm_text(text, expected):
    """Guards the box reader both GSM8k's and MATH's scores hang on: the last \\boxed (\\fbox only
    without one), from the first brace after it to its match, stripped; unbalanced -> None."""
    assert last_boxed_only_string(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{1,200}", 1200), ("3.7", 3), ("  $12$ ", 12), ("\\boxed{\\$5}", None),
    ("\\boxed{18 \\text{ dollars}}", None), ("The answer is 7", None), ("\\boxed{}", None),
    ("1e400", None), ("\\boxed{-4}", -4),
])
def test_gsm8k_extraction_keeps_hrm_texts_quirks(text, expected):
    """Guards GSM8k's reading: a box (when non-empty) or the whole text, commas and $ removed,
    int(float()) truncation (3.7 -> 3), anything else (units, prose, overflow) invalid."""
    assert gsm8k_answer(text) == expected


def test_gsm8k_metrics():
    """Guards acc and invalid as fractions of all rows (a wrong number is wrong, not invalid)."""
    docs = [{"gold": 1200}, {"gold": 3}, {"gold": 5}, {"gold": 5}]
    texts = ["\\boxed{1,200}", "3.7", "6", "five"]
    scores = [score_row("gsm8k", d, t) for d, t in zip(docs, texts)]
    assert aggregate("gsm8k", docs, scores) == {"n": 4, "acc": 0.5, "invalid": 0.25}


@pytest.mark.parametrize("gold, text, acc, acc_wrapped, invalid", [
    ("\\frac{1}{2}", "so \\boxed{\\frac{1}{2}}", 1.0, 1.0, False),
    ("-\\frac{3}{4}", "\\boxed{-\\frac{3}{4}}", 1.0, 1.0, False),
    ("1000", "\\boxed{1,000}", 1.0, 1.0, False),
    ("\\sqrt{2}", "\\boxed{\\sqrt{2}}", 0.0, 1.0, False),    # bare LaTeX never parses
    ("\\pi", "\\boxed{\\pi}", 0.0, 1.0, False),
    ("2", "\\boxed{2\\sqrt{2}}", 1.0, 0.0, False),          # bare 2\sqrt{2} reads as 2
    ("3", "the answer is 3", 1.0, 1.0, True),               # no box: invalid, text still scored
    ("3", "\\boxed{4}", 0.0, 0.0, False),
])
def test_math_keeps_the_bare_string_quirk_and_reports_the_corrected_score(gold, text, acc,
                                                                         acc_wrapped, invalid):
    """Guards MATH comparability: HRM-Text hands math_verify the bare box contents, so its
    parser reads only plain expressions (\\sqrt{2} never matches, 2\\sqrt{2} reads as 2); `acc`
    must reproduce that, `acc_wrapped` (both sides in $...$) is the corrected score, and a row
    without a box is invalid yet scored on its whole text."""
    pytest.importorskip("math_verify")
    score = score_row("math", {"gold": gold}, text)
    assert (score.score, score.extra["acc_wrapped"], score.invalid) == (acc, acc_wrapped, invalid)


@pytest.mark.parametrize("text, score, invalid", [
    (" b", 1.0, False), ("B", 1.0, False), ("A", 0.0, False), ("A.", 0.25, True),
    ("", 0.25, True), ("An", 0.25, True), ("E", 0.25, True),
])
def test_mcq_letter_reading_and_chance_credit(text, score, invalid):
    """Guards HRM-Text's one-token MCQ reading: strip + upper must give one of the row's letters;
    anything else (a trailing period, a word, a letter past the choices) is invalid and earns
    1/len(choices), not 0."""
    out = score_row("mcq", {"choices": ["w", "x", "y", "z"], "gold": 1}, text)
    assert (out.score, out.invalid) == (score, invalid)


def test_mcq_macro_average_over_subjects():
    """Guards HRM-Text's MMLU aggregation: acc is the mean of per-subject accuracies (not of
    rows), n is the number of subjects, per-subject keys in order of appearance."""
    docs = [{"choices": ["a", "b"], "gold": 0, "subject": "s1"}] * 3 + \
        [{"choices": ["a", "b", "c", "d"], "gold": 1, "subject": "s2"}]
    scores = [score_row("mcq", d, t) for d, t in zip(docs, ["A", "A", "B", "x"])]
    metrics = aggregate("mcq", docs, scores, by_subject=True)
    assert list(metrics) == ["n_s1", "acc_s1", "invalid_s1", "n_s2", "acc_s2", "invalid_s2", "n",
                             "acc", "invalid"]
    assert metrics["acc_s1"] == pytest.approx(2 / 3) and metrics["acc_s2"] == 0.25
    assert metrics["acc"] == pytest.approx((2 / 3 + 0.25) / 2) and metrics["n"] == 2
    assert metrics["invalid"] == 0.5
    assert aggregate("mcq", docs, scores)["acc"] == pytest.approx((2 + 0.25) / 4)


DROP_CASES = [
    ([["3"], ["three"]], "3", 1.0, 1.0), ([["3"], ["three"]], "3.0", 1.0, 1.0),
    ([["3"], ["three"]], "three", 1.0, 1.0), ([["3"], ["three"]], "The 3 points", 0.0, 0.67),
    ([["3"], ["three"]], "4", 0.0, 0.0), ([["3"], ["three"]], "", 0.0, 0.0),
    ([["Ann Lee", "Bo Park"]], "Ann Lee", 0.0, 0.5),
    ([["Ann Lee", "Bo Park"]], "Ann Lee and Bo Park", 0.0, 0.29),
    ([["Ann Lee", "Bo Park"]], "Bo Park, Ann Lee", 0.0, 0.33),
    ([["  "], ["the Hawks"]], "hawks!", 1.0, 1.0),
]


@pytest.mark.parametrize("answers, text, em, f1", DROP_CASES)
def test_drop_f1_vectors(answers, text, em, f1):
    """Guards DROP's F1 (lm-eval's rules, which HRM-Text calls): number normalisation, articles,
    punctuation, multi-span gold answers over one predicted span, 2-decimal rounding, and the
    skipped blank gold answer."""
    assert drop_metrics(text, answers) == {"em": em, "f1": f1}


def test_drop_normalisation():
    """Guards the span normal form: numbers as floats, hyphens split, possessive punctuation."""
    assert normalize("1,200") == "1200.0"
    assert normalize("The Lions' 28-yard field goal.") == "lions 28.0 yard field goal"


def test_drop_f1_equals_lm_evals_implementation():
    """Guards drift from the implementation HRM-Text imports (lm_eval.tasks.drop.utils): the same
    em and f1 for every vector, and for multi-span predictions (the pairing)."""
    utils = pytest.importorskip("lm_eval.tasks.drop.utils")
    for answers, text, _, _ in DROP_CASES:
        theirs = utils.process_results({"answers": [tuple(a) for a in answers]}, [text.strip()])
        assert drop_metrics(text, answers) == {k: float(v) for k, v in theirs.items()}
    gold = ["Ann Lee", "Bo Park", "12"]
    for predicted in (["Bo Park", "ann lee"], ["12 yards", "Ann", "Bo Park", "x"], ["13"]):
        theirs = utils.get_metrics(predicted, gold)
        assert answer_metrics(predicted, gold) == (float(theirs[0]), float(theirs[1]))


def test_exact_match_strips():
    """Guards exact match counting surrounding whitespace as a difference."""
    assert score_row("exact", {"gold": " 42"}, "42\n").score == 1.0
    assert score_row("exact", {"gold": "42"}, "4 2").score == 0.0
