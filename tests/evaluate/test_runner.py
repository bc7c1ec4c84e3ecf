"""The task runner end to end on the fixtures with a model whose answers are known, and the
continuation log-likelihood against a direct computation."""

from pathlib import Path

import pytest
import torch
from torch import nn

from prefixlm.attention import SeqInfo
from prefixlm.data.tokenizer import ByteTokenizer
from prefixlm.evaluate import Task, continuation_logprobs, format_table, run_tasks
from prefixlm.model import PrefixLM, preset_config

FIXTURES = Path(__file__).parent / "fixtures"


class Answering(nn.Module):
    """A stand-in model that answers every prompt with `answer`: each next token is a function of
    the last input token (the prompt's end marker starts the answer), so it needs no cache."""

    def __init__(self, tokenizer, answer: str, start_id: int):
        super().__init__()
        script = [start_id] + list(answer.encode()) + [tokenizer.eoa_id]
        assert len(set(script[:-1])) == len(script) - 1, "each token may appear once"
        self.next_of = dict(zip(script[:-1], script[1:]))
        self.vocab = tokenizer.vocab_size
        self.prompts = []
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, position_ids, info, cache=None, rows=None):
        if info is not None:
            self.prompts.append(input_ids.tolist())
        last = input_ids if rows is None else input_ids[rows]
        nxt = torch.tensor([self.next_of.get(int(t), 0) for t in last])
        return nn.functional.one_hot(nxt, self.vocab).float()


def test_tasks_are_rendered_generated_and_scored(tmp_path):
    """Guards the runner: prompts rendered with the task's condition tokens (two for
    "synth,cot"), answers scored by the task's scorer, HRM-Text's metric keys (MMLU per subject),
    the summary's headline metric, too-long prompts counted, and per-row samples."""
    tok = ByteTokenizer(conditions=["synth", "cot", "direct"])
    model = Answering(tok, "\\boxed{7}", tok.inst_end_id)
    tasks = [Task("gsm8k", "gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl")),
             Task("short", "gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"),
                  generation=None, limit=2)]
    tasks[1].generation.max_context = 70  # the 2nd question renders to 59 tokens, the 1st to 73
    results, samples = run_tasks(model, tok, tasks)
    gsm = results["tasks"]["gsm8k"]
    assert gsm["metrics"] == {"n": 3, "acc": pytest.approx(1 / 3), "invalid": 0.0}
    assert gsm["condition"] == "synth,cot" and gsm["rows"] == 3 and gsm["skipped_too_long"] == 0
    first = model.prompts[0]
    head = [tok.inst_begin_id, tok.condition_ids["synth"], tok.condition_ids["cot"]]
    assert first[:3] == head and tok.decode(first[3:]).startswith("Tom has 3 apples")
    short = results["tasks"]["short"]
    assert short["skipped_too_long"] == 1 and short["metrics"]["invalid"] == 0.5
    assert results["summary"] == {"gsm8k": pytest.approx(1 / 3), "short": 0.0}
    assert len(samples) == 5 and samples[0]["extracted"] == 7 and samples[0]["score"] == 1.0
    assert samples[3]["finish_reason"] == "too_long" and samples[3]["generation"] == ""
    assert "gsm8k" in format_table(results)

    model = Answering(tok, "B", tok.inst_end_id)
    results, _ = run_tasks(model, tok, [Task("mmlu", "mmlu", str(FIXTURES / "mmlu_tiny.jsonl"),
                                             shots=str(FIXTURES / "mmlu_tiny.shots.jsonl"))])
    metrics = results["tasks"]["mmlu"]["metrics"]
    assert metrics["acc_astronomy"] == pytest.approx(1 / 3)
    assert metrics["acc_high_school_european_history"] == 0.0
    assert metrics["acc"] == pytest.approx(1 / 6) and metrics["n"] == 2
    assert tok.decode(model.prompts[0][:2]) == "<|inst|><|cond:direct|>"


def test_math_and_drop_tasks_score_through_the_runner():
    """Guards the MATH and DROP presets end to end: the box read from the answer and checked by
    math_verify (bare: acc; wrapped: acc_wrapped), DROP's F1/em against each row's gold answers
    with the shots in the prompt."""
    pytest.importorskip("math_verify")
    tok = ByteTokenizer(conditions=["synth", "cot", "direct"])
    results, samples = run_tasks(Answering(tok, "\\boxed{42}", tok.inst_end_id), tok,
                                 [Task("math", "math", str(FIXTURES / "math_tiny.jsonl"))])
    assert results["tasks"]["math"]["metrics"] == {"n": 3, "acc": pytest.approx(1 / 3),
                                                   "invalid": 0.0,
                                                   "acc_wrapped": pytest.approx(1 / 3)}
    assert [s["extracted"] for s in samples] == ["42"] * 3
    results, _ = run_tasks(Answering(tok, "3", tok.inst_end_id), tok,
                           [Task("drop", "drop", str(FIXTURES / "drop_tiny.jsonl"),
                                 shots=str(FIXTURES / "drop_tiny.shots.jsonl"))])
    assert results["tasks"]["drop"]["metrics"] == {"n": 2, "em": 0.5, "f1": 0.5}
    assert results["summary"] == {"drop": 0.5}


def test_a_condition_the_tokenizer_lacks_says_what_to_do():
    """Guards a bare KeyError when a preset's condition (HRM-Text's "synth,cot") is not among the
    checkpoint's conditions: the error names the task and suggests --condition."""
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"task gsm8k: condition 'synth,cot' has the unknown tag 'synth'.*--condition"):
        run_tasks(Answering(tok, "1", tok.inst_end_id), tok,
                  [Task("gsm8k", "gsm8k", str(FIXTURES / "gsm8k_tiny.jsonl"))])
    with pytest.raises(ValueError, match="given twice"):
        run_tasks(None, tok, [Task("a", "exact", "x"), Task("a", "exact", "y")])


def test_continuation_logprobs_equal_a_direct_computation():
    """Guards lm-eval's loglikelihood: packing several (context, continuation) pairs into one
    forward must give each the log-probabilities of running it alone, with the prefix
    bidirectional and the continuation causal, summed over the scored (last) tokens, and
    is_greedy true exactly when every scored token is the argmax."""
    torch.manual_seed(0)
    model = PrefixLM(preset_config("tiny", vocab_size=50, hidden=32, heads=2), backend="sdpa")
    model = model.double().eval()
    items = [([1, 2, 3], [4, 5, 6], 3), ([7], [8], 1), ([9, 10, 11, 12], [13, 14, 15, 16], 2),
             ([5, 5], [], 0)]
    got = continuation_logprobs(model, items, capacity=9)
    for (prefix, cont, scored), (logprob, greedy) in zip(items, got):
        if not cont:
            assert (logprob, greedy) == (0.0, True)
            continue
        ids = torch.tensor(prefix + cont[:-1])
        info = SeqInfo.from_lengths([len(prefix)], [len(cont) - 1])
        with torch.no_grad():
            logits = model(ids, torch.arange(len(ids)), info).log_softmax(-1)
        rows = range(len(prefix) - 1 + len(cont) - scored, len(prefix) - 1 + len(cont))
        targets = cont[len(cont) - scored:]
        expected = sum(float(logits[r, t]) for r, t in zip(rows, targets))
        assert logprob == pytest.approx(expected, rel=1e-9, abs=1e-9)
        assert greedy == all(int(logits[r].argmax()) == t for r, t in zip(rows, targets))
    # A model's own greedy continuation is greedy.
    with torch.no_grad():
        first = int(model(torch.tensor([1, 2, 3]), torch.arange(3),
                          SeqInfo.from_lengths([3], [0]))[-1].argmax())
    assert continuation_logprobs(model, [([1, 2, 3], [first], 1)])[0][1] is True
