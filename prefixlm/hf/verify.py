"""`verify_export`: an exported `hrm_text` directory in transformers against prefixlm.

transformers runs each sample alone, with token_type_ids = 1 on its prefix (its own sdpa path,
which is exact for one sample); prefixlm runs them packed in one row. Both read the directory in
fp32, so the difference measures the format and the two implementations, not the weights' dtype;
the exported model itself (`source`) is compared too, which adds the rounding to the saved dtype.
"""

from __future__ import annotations

import torch

from .batch import packed_batch
from .pretrained import load_pretrained

__all__ = ["verify_export"]


@torch.no_grad()
def verify_export(directory, samples, source=None) -> dict:
    """{"samples", "max_abs_diff" (transformers vs prefixlm), "logit_scale" (max |logit|),
    "source_max_abs_diff" (the reloaded weights vs `source`, a model on the CPU, when given)}
    over `samples`, a list of (prefix ids, response ids)."""
    from . import _transformers

    transformers = _transformers()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = load_pretrained(directory)
    batch = packed_batch(samples)
    info = batch["prefixlm_info"]
    ids, positions = batch["input_ids"][0], batch["position_ids"][0]
    packed = ours(ids, positions, info)
    diff, scale, start = 0.0, 0.0, 0
    for prefix, response in samples:
        n = len(prefix) + len(response) - 1
        token_types = torch.zeros(1, n, dtype=torch.long)
        token_types[0, :len(prefix)] = 1
        logits = hf_model(input_ids=ids[start:start + n][None], token_type_ids=token_types,
                          use_cache=False).logits[0]
        diff = max(diff, (logits - packed[start:start + n]).abs().max().item())
        scale = max(scale, logits.abs().max().item())
        start += n
    result = {"samples": len(samples), "max_abs_diff": diff, "logit_scale": scale}
    if source is not None:  # a CPU model, as `train.checkpoint.load_trained` gives by default
        expected = source(ids, positions, info).float()
        result["source_max_abs_diff"] = (expected - packed).abs().max().item()
    return result
