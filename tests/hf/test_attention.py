"""`attn_implementation="prefixlm"`: packed PrefixLM batches for transformers' `hrm_text`, and the
batch and label helpers, against transformers' own dense-mask SDPA one sample at a time."""

import pytest
import torch
import torch.nn.functional as F

import prefixlm.hf as phf
from hfhelpers import hf_per_sample_logits, max_diff_per_sample, packed_inputs, random_hf_model
from prefixlm.attention import SeqInfo


def _weighted_sum(logits_list):
    """A loss that reaches every logit with its own weight (a plain sum has zero gradient
    through the softmax-free head for some directions)."""
    total = 0
    for logits in logits_list:
        weights = torch.linspace(-1, 1, logits.numel()).view_as(logits)
        total = total + (logits * weights).sum()
    return total


@pytest.mark.parametrize("H,L", [(2, 2), (1, 0)])
def test_registered_attention_equals_dense_mask_sdpa_logits_and_gradients(H, L):
    """Guards packed training in transformers: with attn_implementation="prefixlm" one packed row
    gives each sample's logits and the parameters' gradients that transformers' sdpa (a dense
    4-D PrefixLM mask from token_type_ids) gives for the samples one at a time."""
    model = random_hf_model(H, L, per_stack=2, vocab=97, seed=5).train()
    ids, positions, info, samples = packed_inputs(97, seed=6)
    model.set_attn_implementation("prefixlm")
    packed = model(input_ids=ids[None], position_ids=positions[None], prefixlm_info=info,
                   prefixlm_backend="sdpa", use_cache=False).logits[0]
    real = [packed[start:start + length] for start, length, _ in samples]
    _weighted_sum(real).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    references = hf_per_sample_logits(model, ids, samples)
    _weighted_sum(references).backward()
    assert max_diff_per_sample(packed.detach(), [r.detach() for r in references], samples) <= 1e-5
    assert packed_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if param.grad is not None:
            scale = param.grad.abs().max().item()
            error = (packed_grads[name] - param.grad).abs().max().item()
            assert error <= 1e-5 * max(scale, 1), name


def test_transformers_own_packed_path_mixes_samples():
    """Guards the reason the registered attention exists (and this test's power to see it):
    transformers' sdpa on the same packed row with position_ids resets and token_type_ids lets
    prefixes of different samples attend each other, so its logits are far off."""
    model = random_hf_model(2, 2, per_stack=1, vocab=97, seed=5)
    ids, positions, info, samples = packed_inputs(97, seed=6)
    token_types = torch.zeros(1, ids.numel(), dtype=torch.long)
    for start, _, prefix in samples:
        token_types[0, start:start + prefix] = 1
    with torch.no_grad():
        mixed = model(input_ids=ids[None], position_ids=positions[None],
                      token_type_ids=token_types, use_cache=False).logits[0]
        references = hf_per_sample_logits(model, ids, samples)
    assert max_diff_per_sample(mixed, references, samples) > 0.1


def test_packed_batch_labels_give_prefixlm_loss():
    """Guards the label helper: transformers' loss on packed_batch's labels is the mean
    cross-entropy over response tokens of prefixlm's convention (the last prefix row predicts the
    first response token, nothing crosses samples), where its default shift would pair a sample's
    last row with the next sample's first token."""
    model = random_hf_model(2, 1, per_stack=1, vocab=97, seed=7)
    model.set_attn_implementation("prefixlm")
    samples = [([5, 6, 7], [8, 9, 10, 11]), ([12], [13]), ([14, 15], [16, 17, 18])]
    batch = phf.packed_batch(samples, capacity=20, pad_id=0)
    assert batch["input_ids"].shape == (1, 20) and batch["prefixlm_info"].capacity == 20
    assert batch["labels"][0, :12].tolist() == [-100, -100, 8, 9, 10, 11, 13, -100, 16, 17, 18,
                                                -100][:12]
    assert batch["input_ids"][0, :11].tolist() == [5, 6, 7, 8, 9, 10, 12, 14, 15, 16, 17]
    out = model(**batch, use_cache=False)
    labels = batch["labels"][0]
    expected = F.cross_entropy(out.logits[0][labels != -100], labels[labels != -100])
    torch.testing.assert_close(out.loss, expected)
    default_shift = model(**{k: v for k, v in batch.items() if k != "shift_labels"},
                          use_cache=False).loss
    assert abs(default_shift.item() - expected.item()) > 1e-3


def test_shift_labels_stay_inside_each_sample():
    """Guards `shift_labels` for rows packed by hand: every label is the next token of the same
    sample from the last prefix row on; prefix rows before it, each sample's last row and
    padding get -100."""
    info = SeqInfo.from_lengths([2, 0, 1], [3, 2, 0], capacity=10)
    ids = torch.arange(100, 110)[None]
    assert phf.shift_labels(ids, info)[0].tolist() == [
        -100, 102, 103, 104, -100, 106, -100, -100, -100, -100]


def test_missing_prefixlm_info_is_a_clear_error():
    """Guards silently wrong packed training: a multi-token call with the registered attention
    but no prefixlm_info stops with a message saying what to pass (instead of attending across
    samples)."""
    model = random_hf_model(1, 1, per_stack=1, vocab=97)
    model.set_attn_implementation("prefixlm")
    with pytest.raises(ValueError, match="prefixlm_info=SeqInfo"):
        model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False)


def test_cached_decode_steps_need_no_seqinfo():
    """Guards the registered attention's decode path (one new token against the cache, without
    a SeqInfo): a prefill with the prompt's SeqInfo, then one-token steps, gives the greedy tokens
    of transformers' generate on its sdpa path with token_type_ids = 1 on the prompt."""
    model = random_hf_model(2, 2, per_stack=1, vocab=89, seed=8)
    prompt = torch.tensor([[4, 9, 22, 3, 50]])
    expected = model.generate(prompt, token_type_ids=torch.ones_like(prompt), max_new_tokens=8,
                              min_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, 5:].tolist()
    model.set_attn_implementation("prefixlm")
    with torch.no_grad():
        out = model(input_ids=prompt, prefixlm_info=SeqInfo.from_lengths([5], [0]),
                    use_cache=True)
        tokens = []
        for _ in range(8):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(input_ids=torch.tensor([[tokens[-1]]]),
                        past_key_values=out.past_key_values, use_cache=True)
    assert tokens == expected
