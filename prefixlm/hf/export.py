"""`prefixlm export`: safetensors weights + config.json + tokenizer, loadable without the trainer.

Prefix convention (Hugging Face's `token_type_ids`, as PaliGemma uses it): 0 marks a prefix token
(attended bidirectionally within the prefix), 1 a response token (causal). For one sequence,
prefix_len = number of leading zeros; build `SeqInfo.from_lengths([prefix_len], [n - prefix_len])`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..model import ModelConfig, PrefixLM

__all__ = ["export_model", "load_exported", "seqinfo_from_token_type_ids"]

WEIGHTS = "model.safetensors"

_USAGE = """# {name}

PrefixLM decoder exported by `prefixlm export` (weights: {weights}).

```python
import torch
from prefixlm.hf.export import load_exported, seqinfo_from_token_type_ids
from prefixlm.data.tokenizer import load_tokenizer
from prefixlm.model import generate

model = load_exported("{name}")              # PrefixLM in eval mode
tok = load_tokenizer("{name}")               # tokenizer.json in this folder
prompt = tok.encode_prefix("reverse hello")
print(tok.decode(generate(model, prompt, stop_id=tok.eoa_id)))

# Scoring a full sequence: token_type_ids = 0 on the prefix, 1 on the response (HF convention).
ids = prompt + tok.encode_response("olleh")[:-1]
token_type_ids = [0] * len(prompt) + [1] * (len(ids) - len(prompt))
info = seqinfo_from_token_type_ids(token_type_ids)
logits = model(torch.tensor(ids), torch.arange(len(ids)), info)
```

`config.json` holds Hugging Face-style fields (hidden_size, num_hidden_layers, ...) and the exact
model configuration under `prefixlm`. Attention: prefix tokens attend the whole prefix; response
tokens attend the prefix and earlier response tokens; each attention output is multiplied per head
by sigmoid(gate) from the fused `qkvg` projection (whose last few columns, padding to a
multiple of 8, are unused); RoPE (theta {theta}) on per-sample positions.
"""


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError:
        raise ImportError(
            "export needs the safetensors package: pip install 'prefixlm[hf]'") from None
    return save_file, load_file


def seqinfo_from_token_type_ids(token_type_ids):
    from ..attention import SeqInfo

    types = torch.as_tensor(token_type_ids).flatten().tolist()
    prefix = 0
    while prefix < len(types) and types[prefix] == 0:
        prefix += 1
    if any(t != 1 for t in types[prefix:]):
        raise ValueError("token_type_ids must be 0s (prefix) followed by 1s (response)")
    return SeqInfo.from_lengths([prefix], [len(types) - prefix])


def export_model(model: PrefixLM, tokenizer, out_dir: str | Path, *, overwrite: bool = False,
                 source: str = "") -> Path:
    save_file, _ = _safetensors()
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} is a file: export writes a directory; choose another "
                         "--out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output {out} already exists and is not empty; pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    # Tied weights are stored once (safetensors refuses shared storage).
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt", "source": source})
    config = {
        "architectures": ["PrefixLM"], "model_type": "prefixlm",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers, "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.num_kv_heads, "intermediate_size": cfg.ffn_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32",
        "pad_token_id": tokenizer.pad_id, "eos_token_id": tokenizer.eoa_id,
        "token_type_ids": {"prefix": 0, "response": 1},
        "prefixlm": cfg.to_dict(),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    tokenizer.save(out)
    (out / "README.md").write_text(_USAGE.format(name=out.name, weights=WEIGHTS,
                                                 theta=cfg.rope_theta))
    return out


def load_exported(directory: str | Path) -> PrefixLM:
    _, load_file = _safetensors()
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    model = PrefixLM(ModelConfig.from_dict(config["prefixlm"]))
    state = load_file(str(directory / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS} does not match config.json: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval()

