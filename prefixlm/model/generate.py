"""Generation: prefill prompts bidirectionally, then decode their responses with a KV cache, many
prompts at once.

`generate_batch` keeps up to `slots` sequences in flight (continuous batching). Prompts waiting for
a slot are prefilled together as one packed varlen batch, each prompt one bidirectional prefix:
the training path, so every attention backend serves it and no row is padding. Then each step
decodes one token for every active slot against a padded cache, one (slots, capacity, Hkv, D)
tensor pair per attention call, through `decode_attention` with per-slot lengths. A finished
slot is refilled from the queue. `generate` (one prompt) and `answers` (text in, text out) are
this engine with one prompt, or many.

The cache keeps the keys and values of every attention *call* in call order, not per layer, so
HRM's recurrence (each block called several times per forward) caches each call separately: entry
(h * (L_cycles + 1) + l) * layers_per_stack + layer for layer `layer` of the l-th stack call of
H cycle h (l = L_cycles: the H call), which is transformers' `hrm_text` cache slot and HRM-Text's
per-stack-call cache. As in HRM-Text's engine and vLLM the whole prompt is the bidirectional
prefix. The causal state of a token never depends on later tokens, so cached keys stay valid as
tokens are added. Greedy decoding gives the tokens of full recomputation
(`generate(..., use_cache=False)`) whatever the batch: the tests check it token for token.

Budget (HRM-Text's rule): a prompt gets min(max_new_tokens, max_context - prompt_len) tokens; a
prompt of max_context tokens or more is not run and yields nothing (finish reason "too_long").
Sampling draws from one generator per prompt, seeded from (seed, prompt index), so a prompt's
sample does not depend on the others in the batch or on the number of slots.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..attention import SeqInfo, decode_attention, prefixlm_attention
from ..devices import to_device

__all__ = ["GenConfig", "GenResult", "BatchKVCache", "generate_batch", "generate", "answers",
           "answer", "sample_next", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "stop_string", "length", "too_long")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class GenConfig:
    """How to generate. `max_context` None: no cap but max_new_tokens. `stop_ids`: tokens that end
    a response (kept in `GenResult.ids`); `stop_strings` end it too and are cut from the text
    (they need the tokenizer). temperature 0 is greedy; else nucleus sampling over top_p."""

    max_new_tokens: int = 64
    max_context: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def validate(self) -> "GenConfig":
        """ValueError naming the first out-of-range field (NaN is out of every range: sampling
        with it fails deep inside torch)."""
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if self.max_context is not None and (not _is_int(self.max_context)
                                             or self.max_context < 1):
            raise ValueError(f"max_context must be an int >= 1, got {self.max_context!r}")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and >= 0 (0: greedy), got "
                             f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop_strings!r}")
        return self

    def budget(self, prompt_len: int) -> int:
        """Tokens a prompt of `prompt_len` tokens may generate; -1: too long to run."""
        if self.max_context is None:
            return self.max_new_tokens
        if prompt_len >= self.max_context:
            return -1
        return min(self.max_new_tokens, self.max_context - prompt_len)


@dataclass
class GenResult:
    """One prompt's response: `ids` as generated (a stop token included), why it ended
    (FINISH_REASONS), and with a tokenizer its `text`: decoded without a final end-of-answer
    token and cut before the earliest stop string."""

    ids: list[int]
    finish_reason: str
    prompt_tokens: int
    text: str | None = None
    logits: list[torch.Tensor] | None = field(default=None, repr=False)


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


def _generator(seed: int, index: int) -> torch.Generator:
    """Prompt `index`'s own stream: independent of the other prompts and of the batching."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class BatchKVCache:
    """Keys and values of `slots` sequences: per attention call one zero-initialised
    (slots, capacity, Hkv, D) pair, filled up to each slot's length (host `lengths`).

    Implements the model's cache protocol: `attend(q, k, v, info, backend)` is called by every
    attention layer in call order, after `begin_prefill` (packed prompts: their rows are written
    to their slots and attended as bidirectional prefixes) or `begin_decode` (one new token per
    listed slot, at position `lengths[slot]`).
    """

    def __init__(self, slots: int, device):
        self.slots, self.device = slots, torch.device(device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = np.zeros(slots, dtype=np.int64)
        self.capacity = 0
        self.call = 0
        self._mode = None

    def reserve(self, capacity: int) -> None:
        """Room for `capacity` tokens per slot (grows by doubling, keeping what is cached)."""
        if capacity <= self.capacity:
            return
        grown = max(capacity, 2 * self.capacity)
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((self.slots, grown, *old.shape[2:]))
                new[:, :self.capacity] = old
                store[i] = new
        self.capacity = grown

    def begin_prefill(self, slot_ids: list[int], prompt_lens: list[int]) -> None:
        if max(prompt_lens) > self.capacity:
            raise ValueError(f"a prompt of {max(prompt_lens)} tokens does not fit the cache's "
                             f"{self.capacity}: reserve() first")
        rows = np.repeat(np.asarray(slot_ids), prompt_lens)
        positions = np.concatenate([np.arange(n) for n in prompt_lens])
        self._rows = to_device(torch.from_numpy(rows), self.device)
        self._positions = to_device(torch.from_numpy(positions), self.device)
        self._mode, self.call = "prefill", 0
        self.lengths[slot_ids] = prompt_lens

    def begin_decode(self, slot_ids: list[int]) -> None:
        positions = self.lengths[slot_ids]
        if positions.max() >= self.capacity:
            raise ValueError(f"slot {slot_ids[int(positions.argmax())]} is full ({self.capacity} "
                             "tokens): reserve() first")
        self._all = len(slot_ids) == self.slots and slot_ids == sorted(slot_ids)
        self._rows = to_device(torch.as_tensor(slot_ids), self.device)
        self._positions = to_device(torch.from_numpy(positions), self.device)
        self._attended = int(positions.max()) + 1  # keys any listed slot reads
        self._mode, self.call = "decode", 0
        self.lengths[slot_ids] += 1

    def attend(self, q, k, v, info: SeqInfo, backend: str):
        index = self.call
        self.call += 1
        if index == len(self.keys):
            if self._mode != "prefill":
                raise RuntimeError(f"attention call {index} of a decode step has no cache: the "
                                   "model made more attention calls than at prefill")
            shape = (self.slots, self.capacity, *k.shape[1:])
            self.keys.append(k.new_zeros(shape))
            self.values.append(v.new_zeros(shape))
        keys, values = self.keys[index], self.values[index]
        if self._mode == "prefill":
            total = info.total
            keys[self._rows, self._positions] = k[:total]
            values[self._rows, self._positions] = v[:total]
            return prefixlm_attention(q, k, v, info, backend=backend)
        keys[self._rows, self._positions] = k
        values[self._rows, self._positions] = v
        keys, values = keys[:, :self._attended], values[:, :self._attended]
        if not self._all:
            keys, values = keys.index_select(0, self._rows), values.index_select(0, self._rows)
        out = decode_attention(q[:, None], keys, values, lengths=self._positions + 1)
        return out[:, 0]


class _StopStrings:
    """Whether a response's newest token completed a stop string, decoding only its tail."""

    def __init__(self, tokenizer, strings):
        self.tokenizer, self.strings = tokenizer, tuple(strings)
        # A match ending in the newest token lies in its last 4 * len + 1 tokens: a token holds at
        # least one byte and a character at most four.
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 1

    def hit(self, ids: list[int]) -> bool:
        if not self.strings:
            return False
        tail = self.tokenizer.decode(ids[-self.window:])
        return any(s in tail for s in self.strings)

    def cut(self, text: str) -> str:
        ends = [i for i in (text.find(s) for s in self.strings) if i >= 0]
        return text[:min(ends)] if ends else text


class _Request:
    """One prompt's generation state: its tokens so far, budget and sampler."""

    def __init__(self, index: int, prompt: list[int], budget: int, config: GenConfig,
                 stops: _StopStrings, keep_logits: bool):
        self.index, self.prompt, self.budget = index, prompt, budget
        self.config, self.stops = config, stops
        self.ids: list[int] = []
        self.logits = [] if keep_logits else None
        self.generator = _generator(config.seed, index) if config.temperature > 0 else None

    def choose(self, logits: torch.Tensor) -> int:
        """The next token, from its logits."""
        if self.logits is not None:
            self.logits.append(logits.float())
        config = self.config
        return (int(logits.argmax()) if config.temperature <= 0 else
                sample_next(logits, config.temperature, config.top_p, self.generator))

    def accept(self, token: int) -> str | None:
        """Append `token`; the finish reason once the response is done."""
        config = self.config
        self.ids.append(token)
        if token in config.stop_ids:
            return "stop"
        if self.stops.hit(self.ids):
            return "stop_string"
        return "length" if len(self.ids) >= self.budget else None

    def result(self, reason: str, tokenizer) -> GenResult:
        text = None
        if tokenizer is not None:
            ids = self.ids[:-1] if self.ids and self.ids[-1] == tokenizer.eoa_id else self.ids
            text = self.stops.cut(tokenizer.decode(ids))
        return GenResult(self.ids, reason, len(self.prompt), text, self.logits)


def _step(requests: list[_Request], logits, agree) -> list[str | None]:
    """Each request's next token from its row of `logits` (agreed on, see generate_batch), and
    each one's finish reason."""
    if requests and requests[0].config.temperature <= 0 and requests[0].logits is None:
        tokens = logits.argmax(-1).tolist()  # greedy: one argmax for the batch
    else:
        tokens = [request.choose(row) for request, row in zip(requests, logits)]
    if agree is not None:
        tokens = [int(t) for t in agree(torch.tensor(tokens, dtype=torch.long))]
    return [request.accept(token) for request, token in zip(requests, tokens)]


def _recompute(model, request: _Request, device, agree) -> str:
    """The reference: every step runs the whole sequence (prompt as prefix, response causal)."""
    prompt = torch.tensor(request.prompt, dtype=torch.long, device=device)
    prefix = len(request.prompt)
    while True:
        ids = torch.cat([prompt, prompt.new_tensor(request.ids)])
        info = SeqInfo.from_lengths([prefix], [len(request.ids)], device=device)
        logits = model(ids, torch.arange(len(ids), device=device), info)[-1:]
        reason = _step([request], logits, agree)[0]
        if reason is not None:
            return reason


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], config: GenConfig | None = None, *,
                   tokenizer=None, slots: int = 32, prefill_tokens: int = 8192,
                   use_cache: bool = True, progress: bool = False,
                   return_logits: bool = False, agree_tokens=None) -> list[GenResult]:
    """Responses to `prompts` (token ids of rendered prefixes), in order.

    slots: sequences decoded together; prefill_tokens: prompt tokens per packed prefill (a longer
    prompt is prefilled alone). With a `tokenizer` the results carry text, and `stop_strings`
    work. use_cache=False: the reference, one prompt at a time, recomputing the whole sequence
    for every token. return_logits: keep each generated token's next-token logits (fp32).
    agree_tokens: called with each step's chosen tokens (int64 CPU tensor), returns the tokens
    to use. Processes that generate together (FSDP2 ranks must all make the same forward
    calls) pass one that hands every rank rank 0's tokens, so a last-bit difference in logits
    cannot make them take different paths.
    """
    config = dataclasses.replace(config or GenConfig()).validate()
    if slots < 1 or prefill_tokens < 1:
        raise ValueError(f"slots and prefill_tokens must be >= 1, got {slots}, {prefill_tokens}")
    if config.stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: pass tokenizer=")
    config.stop_ids = frozenset(int(t) for t in config.stop_ids)
    stops = _StopStrings(tokenizer, config.stop_strings)
    device = next(model.parameters()).device
    results: list[GenResult | None] = [None] * len(prompts)
    queue: collections.deque[_Request] = collections.deque()
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prefix token")
        request = _Request(i, prompt, config.budget(len(prompt)), config, stops, return_logits)
        if request.budget <= 0:
            results[i] = request.result("too_long" if request.budget < 0 else "length",
                                        tokenizer)
        else:
            queue.append(request)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc="generate", unit="prompt", dynamic_ncols=True,
                   initial=len(prompts) - len(queue))

    def finish(request: _Request, reason: str) -> None:
        results[request.index] = request.result(reason, tokenizer)
        if bar is not None:
            bar.update(1)

    try:
        if not use_cache:
            for request in queue:
                finish(request, _recompute(model, request, device, agree_tokens))
        elif queue:
            _decode_all(model, queue, min(slots, len(queue)), prefill_tokens, device, finish,
                        agree_tokens)
    finally:
        if bar is not None:
            bar.close()
    return results


def _decode_all(model, queue, slots: int, prefill_tokens: int, device, finish, agree) -> None:
    """Continuous batching over `slots` cache slots until the queue is empty."""
    cache = BatchKVCache(slots, device)
    owner: list[_Request | None] = [None] * slots
    while queue or any(owner):
        free = [s for s, r in enumerate(owner) if r is None]
        # Refill in groups (each prefill is a forward of its own): once a quarter of the slots
        # (or as many as prompts wait) are free.
        if queue and free and len(free) >= min(len(queue), max(1, slots // 4)):
            taken, tokens = [], 0
            while queue and len(taken) < len(free) and (
                    not taken or tokens + len(queue[0].prompt) <= prefill_tokens):
                tokens += len(queue[0].prompt)
                taken.append(queue.popleft())
            slot_ids, lens = free[:len(taken)], [len(r.prompt) for r in taken]
            in_flight = [r for r in owner if r is not None] + taken
            cache.reserve(max(len(r.prompt) + r.budget for r in in_flight))
            ids = np.concatenate([np.asarray(r.prompt, np.int64) for r in taken])
            positions = np.concatenate([np.arange(n) for n in lens])
            info = SeqInfo.from_lengths(lens, [0] * len(lens), device=device)
            cache.begin_prefill(slot_ids, lens)
            logits = model(to_device(torch.from_numpy(ids), device),
                           to_device(torch.from_numpy(positions), device), info, cache,
                           rows=to_device(torch.from_numpy(np.cumsum(lens) - 1), device))
            for slot, request, reason in zip(slot_ids, taken, _step(taken, logits, agree)):
                if reason is None:
                    owner[slot] = request
                else:
                    finish(request, reason)
            continue
        running = [s for s, r in enumerate(owner) if r is not None]
        last = torch.tensor([owner[s].ids[-1] for s in running])
        positions = torch.from_numpy(cache.lengths[running])
        cache.begin_decode(running)
        logits = model(to_device(last, device), to_device(positions, device), None, cache)
        for slot, reason in zip(running, _step([owner[s] for s in running], logits, agree)):
            if reason is not None:
                finish(owner[slot], reason)
                owner[slot] = None


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int = 64, stop_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, use_cache: bool = True,
             return_logits: bool = False):
    """Response token ids for one prompt (prefix), stopping after `stop_id` (included): the batch
    engine with one prompt.

    use_cache=False recomputes the whole sequence every step (the reference the cache must match).
    return_logits: also return the list of next-token logits, one per generated token.
    """
    config = GenConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       stop_ids=() if stop_id is None else (stop_id,), seed=seed)
    result = generate_batch(model, [prompt_ids], config, use_cache=use_cache,
                            return_logits=return_logits)[0]
    return (result.ids, result.logits or []) if return_logits else result.ids


def answers(model, tokenizer, instructions: list[str], condition: str | None = None,
            config: GenConfig | None = None, **kwargs) -> list[GenResult]:
    """Responses to instruction texts, rendered as prefixes with `condition` (comma-separated
    names); the end-of-answer token always stops. `kwargs` go to `generate_batch`."""
    config = dataclasses.replace(config or GenConfig())
    config.stop_ids = tuple(config.stop_ids) + (tokenizer.eoa_id,)
    prompts = [tokenizer.encode_prefix(text, condition) for text in instructions]
    return generate_batch(model, prompts, config, tokenizer=tokenizer, **kwargs)


def answer(model, tokenizer, instruction: str, condition: str | None = None, *,
           use_cache: bool = True, **kwargs) -> str:
    """Decoded response (without the end-of-answer token) for one instruction; `kwargs` are
    GenConfig fields."""
    return answers(model, tokenizer, [instruction], condition, GenConfig(**kwargs),
                   use_cache=use_cache)[0].text
