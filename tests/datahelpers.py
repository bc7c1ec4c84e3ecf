"""Shared helpers for the data tests: JSONL writers, a tiny BPE tokenizer and hand-built datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_jsonl(path: Path, rows, raw_lines=()) -> Path:
    """Rows as JSON lines, then `raw_lines` (bytes) verbatim."""
    with open(path, "wb") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        for line in raw_lines:
            f.write(line + b"\n")
    return path


def random_rows(n: int, seed: int = 0, max_words: int = 40):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "ünïcødé", "数据", "🙂", "x", "long" * 5]
    rows = []
    for i in range(n):
        ni, nr = rng.integers(1, max_words, size=2)
        rows.append({"instruction": " ".join(rng.choice(words, ni)) + f" #{i}",
                     "response": " ".join(rng.choice(words, nr))})
    return rows


def write_v1(path: Path, samples, epochs=1, gap=0, metadata=None, seed=0) -> Path:
    """A V1 dataset by hand, HRM-Text data_io style: int64 indices, optional `gap` tokens between
    instruction and response (so resp_start != inst_start + inst_len)."""
    path.mkdir(parents=True)
    tokens, index = [], {k: [] for k in ("inst_start", "inst_len", "resp_start", "resp_len")}
    for inst, resp in samples:
        index["inst_start"].append(len(tokens))
        index["inst_len"].append(len(inst))
        tokens += list(inst) + [999] * gap
        index["resp_start"].append(len(tokens))
        index["resp_len"].append(len(resp))
        tokens += list(resp)
    np.save(path / "tokens.npy", np.asarray(tokens, np.int32))
    rng = np.random.default_rng(seed)
    for k in range(epochs):
        order = rng.permutation(len(samples)) if k else np.arange(len(samples))
        (path / f"epoch_{k}").mkdir()
        for name, values in index.items():
            np.save(path / f"epoch_{k}" / f"{name}.npy", np.asarray(values, np.int64)[order])
    meta = {"tokenizer_info": {"vocab_size": 1000}, "max_seq_len": 4097,
            "total_length": len(tokens)}
    meta.update(metadata or {})
    (path / "metadata.json").write_text(json.dumps(meta))
    return path


def random_samples(n: int, seed: int = 0, max_inst: int = 40, max_resp: int = 40):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i, r = int(rng.integers(1, max_inst)), int(rng.integers(2, max_resp))
        out.append((rng.integers(0, 900, i).tolist(), rng.integers(0, 900, r).tolist()))
    return out


def train_bpe(path: Path, texts, vocab_size: int = 300, specials=("<|inst|>", "<|/inst|>",
                                                                     "<|eoa|>", "<|pad|>")) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(path))
    return path


# A ChatML template in the style of Qwen2.5's (a default system prompt, tool schemas in the
# system turn, tool calls rendered from `tool_calls`, tool results folded into a user turn).
CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' + (messages[0].content if messages[0].role == "
    "'system' else 'You are helpful.') + '\\n<tools>' }}{%- for t in tools %}{{- '\\n' + "
    "(t | tojson) }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are helpful."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' and (loop.first and tools) %}"
    "{%- elif m.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + m.content + "
    "'\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + (m.content or '') }}"
    "{%- for c in (m.tool_calls or []) %}{{- '<tool_call>\\n' + (c.function | tojson) + "
    "'\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def chat_tokenizer(folder: Path, template: str = CHATML_TEMPLATE, texts=None) -> Path:
    """A tokenizer folder with a chat template, built locally (tokenizers + transformers'
    PreTrainedTokenizerFast, saved with save_pretrained): tokenizer.json, tokenizer_config.json,
    chat_template.jinja."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>", "<tool_response>",
                "</tool_response>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, show_progress=False,
                                  special_tokens=[AddedToken(s, special=True) for s in specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or ["You are helpful. What is the weather in Paris? It is "
                                      "sunny. Hello! How are you? user assistant system"] * 8,
                            trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template,
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.save_pretrained(str(folder))
    return folder
