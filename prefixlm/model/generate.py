"""Generation: prefill the instruction bidirectionally, then decode the response with a KV cache.

The cache keeps the keys and values of every attention *call* in call order, not per layer, so
HRM's recurrence (each block called several times per forward) caches each call separately: entry
(h * (L_cycles + 1) + l) * layers_per_stack + layer for layer `layer` of the l-th stack call of
H cycle h (l = L_cycles: the H call), which is transformers' `hrm_text` cache slot and HRM-Text's
per-stack-call cache. As in HRM-Text's engine and vLLM the whole prompt is the bidirectional
prefix. The causal state of a token never depends on later tokens, so cached keys stay valid as
tokens are added.
"""

from __future__ import annotations

import math

import torch

from ..attention import SeqInfo, decode_attention, prefixlm_attention

__all__ = ["KVCache", "generate", "sample_next", "check_sampling", "answer"]


class KVCache:
    """Keys/values of one sequence, one entry per attention call of the forward pass."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.call = 0
        self.length = 0

    def begin(self):
        self.call = 0

    def attend(self, q, k, v, info: SeqInfo, backend: str):
        index = self.call
        self.call += 1
        if index == len(self.keys):  # prefill: the prompt is one bidirectional prefix
            self.keys.append(k)
            self.values.append(v)
            return prefixlm_attention(q, k, v, info, backend=backend)
        keys = self.keys[index] = torch.cat([self.keys[index], k])
        values = self.values[index] = torch.cat([self.values[index], v])
        return decode_attention(q, keys, values)


def check_sampling(max_new_tokens: int, temperature: float, top_p: float):
    """ValueError naming the first out-of-range argument (NaN is out of every range)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> int:
    """Greedy when temperature == 0, else nucleus sampling over the smallest set with mass top_p."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p   # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _info(prefix: int, causal: int, device) -> SeqInfo:
    return SeqInfo.from_lengths([prefix], [causal], device=device)


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int = 64, stop_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             return_logits: bool = False):
    """Response token ids for one prompt (prefix), stopping after `stop_id` (included).

    use_cache=False recomputes the whole sequence every step (the reference the cache must match).
    return_logits: also return the list of next-token logits, one per generated token.
    """
    if not prompt_ids:
        raise ValueError("the prompt is empty: generation needs at least one prefix token")
    check_sampling(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.tensor(prompt_ids, dtype=torch.long, device=device)
    prefix = len(prompt_ids)
    out: list[int] = []
    all_logits = []
    cache = KVCache() if use_cache else None
    if use_cache:
        cache.begin()
        logits = model(prompt, torch.arange(prefix, device=device), _info(prefix, 0, device),
                       cache)[-1]
    for step in range(max_new_tokens):
        if not use_cache:
            ids = torch.cat([prompt, prompt.new_tensor(out)])
            logits = model(ids, torch.arange(len(ids), device=device),
                           _info(prefix, len(out), device))[-1]
        all_logits.append(logits.float())
        token = sample_next(logits, temperature, top_p, generator)
        out.append(token)
        if token == stop_id or step == max_new_tokens - 1:
            break
        if use_cache:
            cache.begin()
            position = torch.tensor([prefix + len(out) - 1], device=device)
            logits = model(prompt.new_tensor([token]), position, None, cache)[-1]
    return (out, all_logits) if return_logits else out


@torch.no_grad()
def answer(model, tokenizer, instruction: str, **kwargs) -> str:
    """Decoded response (without the end-of-answer token) for one instruction; `kwargs` go to
    `generate`. `tokenizer` renders the prompt (`encode_prefix`) and decodes the answer."""
    ids = generate(model, tokenizer.encode_prefix(instruction), stop_id=tokenizer.eoa_id, **kwargs)
    if ids and ids[-1] == tokenizer.eoa_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)
