"""Batched generation: the packed prefill + padded-cache decode engine against one prompt at a
time, the budget rule, sampling streams, stop tokens and stop strings."""

import pytest
import torch
from torch import nn

from prefixlm.data.tokenizer import ByteTokenizer
from prefixlm.model import GenConfig, PrefixLM, answers, generate, generate_batch, preset_config

VOCAB = 61


def _model(arch, backend="sdpa", seed=1):
    torch.manual_seed(seed)
    cfg = preset_config("tiny", vocab_size=VOCAB, hidden=64, heads=4, kv_heads=2, ffn_hidden=96,
                        arch=arch)
    model = PrefixLM(cfg, backend=backend).double()
    with torch.no_grad():  # token embeddings that outweigh HRM's initial states: varied outputs
        model.model.embed_tokens.weight.normal_(std=1.0)
    return model


def _prompts(count=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 24, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("arch", ["transformer", "hrm"])
def test_batched_greedy_equals_one_prompt_at_a_time(arch, backend):
    """Guards the batch engine mixing sequences up (a slot reading another's keys, a refilled
    slot seeing its predecessor's cache, a wrong position or length after a refill, HRM's calls
    cached out of order): greedy decoding of prompts of mixed lengths, finishing at different
    steps (budgets from max_context, a frequent stop token), with fewer slots than prompts and
    several prefills, must give each prompt the tokens and logits of full recomputation and of
    one prompt at a time."""
    model = _model(arch, backend)
    prompts = _prompts()
    free_runs = [r.ids for r in generate_batch(model, prompts, GenConfig(max_new_tokens=12),
                                               use_cache=False)]
    # A token in about half of the free runs: those prompts stop early, the others run on.
    stop = min(range(VOCAB), key=lambda t: abs(sum(t in ids for ids in free_runs) - 4.5))
    config = GenConfig(max_new_tokens=12, max_context=30, stop_ids=(stop,))
    reference = generate_batch(model, prompts, config, use_cache=False, return_logits=True)
    lengths = {len(r.ids) for r in reference}
    assert len(lengths) > 2 and {r.finish_reason for r in reference} == {"stop", "length"}
    for slots, prefill_tokens in ((3, 20), (32, 8192), (1, 8192)):
        got = generate_batch(model, prompts, config, slots=slots, prefill_tokens=prefill_tokens,
                             return_logits=True)
        # The reference backend computes in fp32 (decode in the model's fp64).
        tol = 1e-9 if backend == "sdpa" else 1e-6
        for ref, out in zip(reference, got):
            assert out.ids == ref.ids and out.finish_reason == ref.finish_reason, slots
            for a, b in zip(out.logits, ref.logits):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_seeded_sampling_does_not_depend_on_the_batch():
    """Guards one random stream shared by the batch (a prompt's sample would change with its
    neighbours or the number of slots): each prompt draws from its own seeded generator."""
    model = _model("transformer")
    prompts = _prompts(6, seed=2)
    config = GenConfig(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = generate_batch(model, prompts, config, use_cache=False)
    for slots in (1, 4):
        assert [r.ids for r in generate_batch(model, prompts, config, slots=slots)] == \
            [r.ids for r in alone]
    other_seed = generate_batch(model, prompts, GenConfig(**{**config.__dict__, "seed": 8}))
    assert [r.ids for r in other_seed] != [r.ids for r in alone]


def test_budget_is_hrm_texts_rule():
    """Guards HRM-Text's budget: min(max_new_tokens, max_context - prompt_len) tokens, and a
    prompt of max_context tokens or more is not run (no tokens, finish "too_long", text "")
    while the others still are."""
    model = _model("transformer")
    tok = ByteTokenizer()
    prompts = [[1] * 5, [2] * 17, [3] * 20, [4] * 25]
    results = generate_batch(model, prompts, GenConfig(max_new_tokens=6, max_context=20),
                             tokenizer=tok)
    assert [len(r.ids) for r in results] == [6, 3, 0, 0]
    assert [r.finish_reason for r in results] == ["length", "length", "too_long", "too_long"]
    assert results[2].text == "" and results[3].prompt_tokens == 25
    assert generate_batch(model, [[1]], GenConfig(max_new_tokens=0))[0].ids == []


class Scripted(nn.Module):
    """A stand-in model that answers every prompt of `prompt_len` tokens with `script` (token
    ids), whatever the cache: its step-t logits pick script[t], read from the position ids."""

    def __init__(self, script, prompt_len, vocab):
        super().__init__()
        self.script, self.prompt_len, self.vocab = script, prompt_len, vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, position_ids, info, cache=None, rows=None):
        positions = position_ids if rows is None else position_ids[rows]
        steps = (positions - self.prompt_len + 1).clamp(0, len(self.script) - 1)
        return nn.functional.one_hot(torch.tensor(self.script)[steps], self.vocab).double()


def test_stop_strings_end_the_response_and_are_cut_from_the_text():
    """Guards stop strings (lm-eval's `until`): generation must stop once one appears, even one
    spanning several tokens or multi-byte characters, and the text is cut before the earliest
    one while `ids` keep what was generated; the end-of-answer token is dropped from the text."""
    tok = ByteTokenizer()
    script = list("ab\n\ncdé!".encode()) + [tok.eoa_id]
    model = Scripted(script, prompt_len=4, vocab=tok.vocab_size)
    prompts = [[65] * 4, [66] * 4]

    def run(**kwargs):
        config = GenConfig(max_new_tokens=20, stop_ids=(tok.eoa_id,), **kwargs)
        return generate_batch(model, prompts, config, tokenizer=tok)[0]

    out = run(stop_strings=("\n\n",))
    assert out.text == "ab" and out.finish_reason == "stop_string" and len(out.ids) == 4
    out = run(stop_strings=("d", "b\n"))
    assert out.text == "a" and len(out.ids) == 3
    out = run(stop_strings=("é",))
    assert out.text == "ab\n\ncd" and tok.decode(out.ids) == "ab\n\ncdé"
    out = run()
    assert out.text == "ab\n\ncdé!" and out.finish_reason == "stop" and out.ids[-1] == tok.eoa_id
    with pytest.raises(ValueError, match="need the tokenizer"):
        generate_batch(model, prompts, GenConfig(stop_strings=("x",)))


def test_answers_render_conditions_and_stop_at_end_of_answer():
    """Guards the text interface: prompts rendered with the comma-separated conditions' tokens
    (the same ids as tokenizer.encode_prefix), and the end-of-answer token always stopping."""
    tok = ByteTokenizer(conditions=["synth", "cot"])
    script = list(b"42") + [tok.eoa_id, 70, 71]
    prompt_len = len(tok.encode_prefix("q?", "synth,cot"))
    model = Scripted(script, prompt_len, tok.vocab_size)
    out = answers(model, tok, ["q?"], "synth,cot", GenConfig(max_new_tokens=9))[0]
    assert out.text == "42" and out.finish_reason == "stop" and out.prompt_tokens == prompt_len
    assert prompt_len == 1 + 2 + 2 + 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=float("nan")), "temperature must be finite and >= 0"),
    (dict(temperature=-0.5), "temperature must be finite and >= 0"),
    (dict(temperature=float("inf")), "temperature must be finite and >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.01), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0"),
])
def test_out_of_range_sampling_arguments_are_value_errors(kwargs, match):
    """Guards torch's RuntimeErrors from deep inside sampling (NaN temperature: "probability
    tensor contains either inf, nan"; top_p=0: an empty nucleus) and a float or negative
    max_new_tokens: each is refused up front, naming the argument and its range."""
    torch.manual_seed(0)
    model = PrefixLM(preset_config("tiny", vocab_size=64, hidden=32, heads=2, layers=1,
                                   ffn_hidden=64), backend="sdpa").eval()
    with pytest.raises(ValueError, match=match):
        generate(model, [1, 2, 3], **kwargs)
    assert len(generate(model, [1, 2, 3], max_new_tokens=2, temperature=0.5, top_p=1.0)) == 2
