"""Random transformers `hrm_text` models and per-sample reference logits for the interop tests.

Weights are scaled up and z_L_init drawn at random so that a mapping mistake (a swapped head, a
missing norm, a zero state) moves the logits by far more than the tolerance."""

from __future__ import annotations

import torch
from transformers import HrmTextConfig, HrmTextForCausalLM

from prefixlm.attention import SeqInfo


def random_hf_model(H=2, L=2, per_stack=1, head_dim=16, vocab=101, heads=4, hidden=64, ffn=96,
                    seed=0):
    torch.manual_seed(seed)
    cfg = HrmTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                        num_hidden_layers=per_stack, num_attention_heads=heads, head_dim=head_dim,
                        H_cycles=H, L_cycles=L, initializer_range=0.05)
    model = HrmTextForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.z_L_init.normal_()
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    return model


# Samples (prefix, causal) of one packed row: a prefix-only one, a causal-only one, a single
# token, odd lengths; the row is padded past them.
PREFIX, CAUSAL, PADDING = [3, 5, 0, 1, 6], [4, 0, 5, 0, 3], 3


def packed_inputs(vocab: int, seed: int = 0, prefix=PREFIX, causal=CAUSAL, padding=PADDING):
    """(ids (T,), positions (T,), info, [(start, length, prefix)] per sample)."""
    g = torch.Generator().manual_seed(seed)
    lens = [p + c for p, c in zip(prefix, causal)]
    total = sum(lens)
    info = SeqInfo.from_lengths(prefix, causal, capacity=total + padding)
    ids = torch.randint(0, vocab, (total + padding,), generator=g)
    positions = torch.cat([torch.arange(n) for n in lens]
                          + [torch.zeros(padding, dtype=torch.long)])
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return ids, positions, info, list(zip(starts, lens, prefix))


def hf_per_sample_logits(hf_model, ids, samples, **kwargs):
    """transformers' logits of each sample alone, its prefix marked by token_type_ids = 1."""
    out = []
    for start, length, prefix in samples:
        token_types = torch.zeros(1, length, dtype=torch.long)
        token_types[0, :prefix] = 1
        out.append(hf_model(input_ids=ids[start:start + length][None],
                            token_type_ids=token_types, use_cache=False, **kwargs).logits[0])
    return out


def max_diff_per_sample(packed, references, samples) -> float:
    return max((packed[start:start + length] - ref).abs().max().item()
               for (start, length, _), ref in zip(samples, references))
