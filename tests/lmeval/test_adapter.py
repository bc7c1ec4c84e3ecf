"""The lm-eval adapter through lm-eval's own API and CLI, offline, on local tasks: generate_until,
multiple_choice (loglikelihood) with few-shot contexts, loglikelihood_rolling."""

import importlib.metadata
import json
import textwrap
from pathlib import Path

import pytest

from evalhelpers import GSM8K, MMLU, MMLU_SHOTS

lm_eval = pytest.importorskip("lm_eval", reason="the [lmeval] extra is not installed")

from lm_eval.tasks import TaskManager  # noqa: E402

from prefixlm.cli import main  # noqa: E402
from prefixlm.evaluate import continuation_logprobs  # noqa: E402
from prefixlm.lmeval.adapter import PrefixLMEval  # noqa: E402

TASKS = {
    "pfx_gsm": """
        task: pfx_gsm
        dataset_path: json
        dataset_kwargs: {data_files: {test: "GSM8K"}, cache_dir: "CACHE"}
        test_split: test
        output_type: generate_until
        doc_to_text: "{{question}}"
        doc_to_target: "{{answer.split('####')[-1].strip().replace(',', '')}}"
        generation_kwargs: {until: ["\\n\\n"], max_gen_toks: 8, do_sample: false}
        metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]
        metadata: {version: 1.0}
        """,
    "pfx_mmlu": """
        task: pfx_mmlu
        dataset_path: json
        dataset_kwargs: {data_files: {test: "MMLU", dev: "SHOTS"}, cache_dir: "CACHE"}
        test_split: test
        fewshot_split: dev
        num_fewshot: 2
        fewshot_config: {sampler: first_n}
        output_type: multiple_choice
        doc_to_text: "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\n\\
          D. {{choices[3]}}\\nAnswer:"
        doc_to_choice: ["A", "B", "C", "D"]
        doc_to_target: answer
        target_delimiter: " "
        fewshot_delimiter: "\\n\\n"
        metric_list: [{metric: acc}]
        metadata: {version: 1.0}
        """,
    "pfx_ppl": """
        task: pfx_ppl
        dataset_path: json
        dataset_kwargs: {data_files: {test: "GSM8K"}, cache_dir: "CACHE"}
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{question}}"
        metric_list: [{metric: word_perplexity}]
        metadata: {version: 1.0}
        """,
}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    for name, text in TASKS.items():
        text = textwrap.dedent(text)
        for key, path in (("GSM8K", GSM8K), ("MMLU", MMLU), ("SHOTS", MMLU_SHOTS),
                          ("CACHE", root / "hf_cache")):
            text = text.replace(f'"{key}"', json.dumps(str(path)))
        (root / f"{name}.yaml").write_text(text)
    return root


@pytest.fixture(scope="module")
def evaluated(memorised_run, task_dir):
    lm = PrefixLMEval(checkpoint=str(memorised_run), condition="direct", batch_size=2)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=list(TASKS), task_manager=TaskManager(include_path=str(task_dir),
                                                              include_defaults=False),
        log_samples=True, bootstrap_iters=0)
    return lm, results


def test_generate_until_through_lm_eval(evaluated):
    """Guards generate_until: the context rendered as the instruction with the condition, the
    answer generated until the stop string or end-of-answer; the memorised model gets all."""
    _, results = evaluated
    assert results["results"]["pfx_gsm"]["exact_match,none"] == 1.0
    responses = [s["resps"][0][0] for s in results["samples"]["pfx_gsm"]]
    assert responses == ["7", "1200", "4"]


def test_loglikelihood_equals_a_direct_computation(evaluated):
    """Guards loglikelihood: for lm-eval's own few-shot contexts and ' A'..' D' continuations,
    each value must equal the model's log-probability of the continuation (leading space
    dropped) as a response to the context rendered as a prefix, and acc must be what those
    values give."""
    lm, results = evaluated
    samples = results["samples"]["pfx_mmlu"]
    assert samples[0]["arguments"][0][0].count("Answer: ") == 2  # 2 shots
    correct = 0
    tok = lm.tokenizer
    for sample in samples:
        pairs = [tuple(a) for a in sample["arguments"]]
        assert [c for _, c in pairs] == [" A", " B", " C", " D"]
        items = [(tok.encode_prefix(ctx.strip(), "direct"), tok.encode(cont[1:]), 1)
                 for ctx, cont in pairs]
        direct = [lp for lp, _ in continuation_logprobs(lm.model, items)]
        logged = [float(r[0][0]) for r in sample["resps"]]
        assert logged == pytest.approx(direct, rel=1e-5, abs=1e-5)
        correct += max(range(4), key=direct.__getitem__) == sample["doc"]["answer"]
    assert results["results"]["pfx_mmlu"]["acc,none"] == pytest.approx(correct / len(samples))


def test_loglikelihood_rolling_scores_every_token_once(evaluated, memorised_run):
    """Guards loglikelihood_rolling: the text as the response to an empty instruction; split
    into windows (a short max_length) every token is still scored exactly once, each window
    after one token of context, so the sum equals an explicit per-window computation, and with
    room for the whole text it equals one direct computation."""
    lm, results = evaluated
    tok = lm.tokenizer
    markers = tok.encode_prefix("", "direct")
    texts = [s["doc"]["question"] for s in results["samples"]["pfx_ppl"]]
    whole = continuation_logprobs(lm.model, [(markers, tok.encode(t), len(tok.encode(t)))
                                             for t in texts])
    logged = [float(s["resps"][0][0]) for s in results["samples"]["pfx_ppl"]]
    assert logged == pytest.approx([lp for lp, _ in whole], rel=1e-5, abs=1e-5)

    class Request:
        def __init__(self, text):
            self.args = (text,)

    short = PrefixLMEval(checkpoint=str(memorised_run), condition="direct", max_length=20)
    window = 20 - len(markers)
    for text in texts:
        tokens = tok.encode(text)
        items = [(markers, tokens[max(0, s - 1):s + window], len(tokens[s:s + window]))
                 for s in range(0, len(tokens), window)]
        assert sum(n for _, _, n in items) == len(tokens) and len(items) > 2
        expected = sum(lp for lp, _ in continuation_logprobs(short.model, items))
        got = short.loglikelihood_rolling([Request(text)], disable_tqdm=True)[0]
        assert got == pytest.approx(expected, rel=1e-6)


def test_the_prefixlm_lm_eval_command_writes_lm_evals_results(memorised_run, task_dir, tmp_path,
                                                              capsys):
    """Guards `prefixlm lm-eval ...`: lm-eval's own CLI with --model prefixlm registered (0.4.13
    has no plugin discovery), its arguments passed through untouched, lm-eval's results JSON
    written; lm-eval's default device cuda:0 falls back to the CPU."""
    out = tmp_path / "out"
    code = main(["lm-eval", "--model", "prefixlm", "--model_args",
                 f"pretrained={memorised_run},condition=direct", "--tasks", "pfx_gsm",
                 "--include_path", str(task_dir), "--output_path", str(out),
                 "--batch_size", "2"])
    assert code == 0
    written = list(out.rglob("results_*.json"))
    assert len(written) == 1 and memorised_run.name in str(written[0].parent)
    data = json.loads(written[0].read_text())
    assert data["results"]["pfx_gsm"]["exact_match,none"] == 1.0
    assert data["config"]["prefixlm_condition"] == "direct"


def test_the_readmes_example_tasks(memorised_run, monkeypatch):
    """Guards the README's lm-eval example (examples/lm_eval, run from the repository root):
    the GSM8k-style task scores the memorised answers, and the MMLU-style task's 5-shot
    context is HRM-Text's prompt for the astronomy rows (their shots are that subject's first
    rows), so the memorised model answers them."""
    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    results = lm_eval.simple_evaluate(
        model="prefixlm", model_args=f"checkpoint={memorised_run},condition=direct",
        tasks=["pfx_gsm8k_tiny", "pfx_mmlu_tiny"], log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(root / "examples" / "lm_eval"),
                                 include_defaults=False))
    assert results["results"]["pfx_gsm8k_tiny"]["exact_match,number"] == 1.0
    astronomy = [s["acc"] for s in results["samples"]["pfx_mmlu_tiny"]
                 if s["doc"]["subject"] == "astronomy"]
    assert astronomy == [1.0, 1.0, 1.0]


def test_the_plugin_entry_point_names_the_adapter():
    """Guards the packaging for lm-eval versions with model plugins (entry-point group
    lm_eval.models): `--model prefixlm` must load this class."""
    points = importlib.metadata.entry_points(group="lm_eval.models")
    assert [p.load() for p in points if p.name == "prefixlm"] == [PrefixLMEval]


def test_bad_model_args_and_generation_settings_are_named(memorised_run):
    """Guards silently ignored settings: an unknown model_arg and an unsupported generation
    setting (top_k) are errors naming them; a registered built-in model still resolves (the
    adapter must not empty lm-eval's registry of its own models)."""
    with pytest.raises(ValueError, match="unknown temprature"):
        PrefixLMEval(checkpoint=str(memorised_run), temprature=0.5)
    lm = PrefixLMEval(checkpoint=str(memorised_run))
    assert lm.condition == "direct"  # auto: the tokenizer declares `direct`
    with pytest.raises(ValueError, match="top_k are not supported"):
        lm._gen_config({"until": ["\n"], "top_k": 5, "do_sample": False})
    from lm_eval.api.registry import get_model

    assert get_model("prefixlm") is PrefixLMEval and get_model("dummy") is not None


def test_offline(monkeypatch):
    """Guards the test setup itself: the suite runs with the hub offline."""
    import os

    assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
    assert Path(__file__).parent.name == "lmeval"
