"""lm-evaluation-harness model `prefixlm`: `--model prefixlm --model_args checkpoint=RUN_DIR[,...]`.

How a PrefixLM answers lm-eval's requests:
- loglikelihood(context, continuation): the context is the instruction, rendered as a prefix
  (inst_begin, the condition tokens, the text, inst_end) and attended bidirectionally; the
  continuation is the response, scored causally by teacher forcing in packed forwards. One
  leading space of the continuation is dropped (lm-eval's target delimiter; a response starts
  right after the prefix), unless strip_continuation_space=false. The end-of-answer token is
  not scored.
- loglikelihood_rolling(text): the text as the response to an empty instruction, in windows of
  max_length tokens, each after one token of the previous window (lm-eval's context_len=1).
- generate_until(context, kwargs): the batched generation engine; `until` strings stop it and
  are cut from the answer, the end-of-answer token always stops; greedy unless do_sample.
Contexts are stripped, as HRM-Text's engine strips prompts. An instruction longer than the room
left is cut from the left (its markers kept).

model_args: checkpoint (or pretrained: lm-eval names its output folder after it), condition
(auto: `direct` when the tokenizer declares it, HRM-Text's default; none; or NAMES), use_ema,
dtype (auto: bfloat16 on CUDA), attention_backend, max_length (default: the run's context_size),
max_gen_toks, max_batch_tokens (tokens per loglikelihood forward), seed,
strip_continuation_space. lm-eval's batch_size is the number of prompts decoded together.
"""

from __future__ import annotations

import json
import logging

import lm_eval.models  # noqa: F401  lm-eval imports its built-ins only into an empty registry
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from ..evaluate.likelihood import continuation_logprobs
from ..model.generate import GenConfig, generate_batch
from ..train.checkpoint import load_trained

__all__ = ["PrefixLMEval"]

log = logging.getLogger(__name__)

_GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "seed"}


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@register_model("prefixlm")
class PrefixLMEval(LM):
    def __init__(self, checkpoint=None, pretrained=None, condition="auto", use_ema=True,
                 dtype="auto", attention_backend="auto", max_length=None, max_gen_toks=256,
                 max_batch_tokens=8192, seed=0, strip_continuation_space=True, device=None,
                 batch_size=1, max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"prefixlm model_args: unknown {', '.join(sorted(unknown))}; known: "
                             "checkpoint (or pretrained), condition, use_ema, dtype, "
                             "attention_backend, max_length, max_gen_toks, max_batch_tokens, "
                             "seed, strip_continuation_space")
        path = checkpoint if checkpoint is not None else pretrained
        if path is None:
            raise ValueError("prefixlm model_args need checkpoint=RUN_DIR (or pretrained=)")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                log.warning("prefixlm: no CUDA device; running on the CPU (device=%s asked)",
                            device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        model, cfg, tokenizer, ckpt = load_trained(str(path), use_ema=_flag(use_ema),
                                                   device=self._device,
                                                   backend=attention_backend)
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"prefixlm model_args: dtype must be auto, float32 or bfloat16, got "
                             f"{dtype!r}")
        self.model = model.to(getattr(torch, dtype)).eval()
        self.tokenizer, self.checkpoint = tokenizer, ckpt
        if condition == "auto":
            condition = "direct" if "direct" in tokenizer.condition_ids else None
        # "" renders no condition at all (None would be the tokenizer's default condition).
        self.condition = "" if condition in (None, "", "none") else str(condition)
        self.head = tokenizer.prefix_head(self.condition)  # checks the names
        self.tail = tokenizer.prefix_tail()
        self.max_length = int(max_length) if max_length is not None else int(cfg.context_size)
        if self.max_length <= len(self.head) + len(self.tail) + 1:
            raise ValueError(f"prefixlm model_args: max_length {self.max_length} leaves no room "
                             "for text")
        self.max_gen_toks, self.max_batch_tokens = int(max_gen_toks), int(max_batch_tokens)
        self.seed, self.strip_space = int(seed), _flag(strip_continuation_space)
        self.slots = int(batch_size) if str(batch_size).isdigit() else 32
        if max_batch_size is not None and str(batch_size).startswith("auto"):
            self.slots = int(max_batch_size)

    # -- rendering -----------------------------------------------------------------------------
    def _prefix(self, context: str, room: int) -> list[int]:
        """The rendered instruction, its text cut from the left to fit `room` tokens."""
        body = self.tokenizer.encode(context.strip())
        keep = max(0, room - len(self.head) - len(self.tail))
        return self.head + body[len(body) - min(len(body), keep):] + self.tail

    def _continuation(self, text: str) -> list[int]:
        if self.strip_space and text.startswith(" "):
            text = text[1:]
        return self.tokenizer.encode(text)

    # -- lm-eval's requests --------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        items = []
        for request in requests:
            context, continuation = request.args
            tokens = self._continuation(continuation)
            items.append((self._prefix(context, self.max_length + 1 - len(tokens)), tokens,
                          len(tokens)))
        out = continuation_logprobs(self.model, items, capacity=self.max_batch_tokens,
                                    progress=not disable_tqdm)
        for request, answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", request.args, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        markers = self.head + self.tail
        window = self.max_length - len(markers)
        items, owners = [], []
        for n, request in enumerate(requests):
            (text,) = request.args
            tokens = self.tokenizer.encode(text)
            for start in range(0, len(tokens), window):
                context = tokens[max(0, start - 1):start]
                predicted = tokens[start:start + window]
                items.append((markers, context + predicted, len(predicted)))
                owners.append(n)
        scores = continuation_logprobs(self.model, items, capacity=self.max_batch_tokens,
                                       progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores):
            totals[n] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _gen_config(self, kwargs: dict) -> GenConfig:
        from lm_eval.models.utils import normalize_gen_kwargs

        kwargs = normalize_gen_kwargs(kwargs, default_max_gen_toks=self.max_gen_toks)
        unknown = sorted(set(kwargs) - _GEN_KEYS)
        if unknown:
            raise ValueError(f"prefixlm: generation settings {', '.join(unknown)} are not "
                             f"supported (supported: {', '.join(sorted(_GEN_KEYS))})")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sampling = bool(kwargs.get("do_sample"))
        return GenConfig(max_new_tokens=int(kwargs["max_gen_toks"]),
                         temperature=float(kwargs.get("temperature", 1.0)) if sampling else 0.0,
                         top_p=float(kwargs.get("top_p", 1.0)),
                         stop_ids=(self.tokenizer.eoa_id,),
                         stop_strings=tuple(s for s in until if s),
                         seed=int(kwargs.get("seed", self.seed)))

    def generate_until(self, requests, disable_tqdm: bool = False):
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str),
                              []).append(i)
        out = [""] * len(requests)
        for members in groups.values():
            config = self._gen_config(dict(requests[members[0]].args[1]))
            room = max(self.max_length - config.max_new_tokens, len(self.head + self.tail) + 1)
            prompts = [self._prefix(requests[i].args[0], room) for i in members]
            results = generate_batch(self.model, prompts, config, tokenizer=self.tokenizer,
                                     slots=self.slots, progress=not disable_tqdm)
            for i, result in zip(members, results):
                out[i] = result.text
                self.cache_hook.add_partial("generate_until", requests[i].args, result.text)
        return out

    def get_model_info(self) -> dict:
        return {"prefixlm_checkpoint": str(self.checkpoint), "prefixlm_condition": self.condition,
                "prefixlm_max_length": self.max_length}
