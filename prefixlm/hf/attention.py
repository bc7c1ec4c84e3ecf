"""Packed PrefixLM attention for transformers: `attn_implementation="prefixlm"`.

transformers' own attention paths cannot run a packed PrefixLM batch: with position_ids resets
and token_type_ids the prefixes of different samples attend each other, and with a cache (the
`use_cache=True` default) packing is not detected at all. This function gets the batch's layout
as a `SeqInfo` (the `prefixlm_info` keyword of the model's forward, which transformers hands to the
attention function unchanged) and calls `prefixlm_attention`, so every sample attends only itself:
its prefix bidirectionally, its response causally.

Contract (transformers 5.23, `AttentionInterface`): query (1, heads, T, D) with RoPE applied,
key/value (1, heads, S, D) after the cache update; returns ((1, T, heads, D), None). S > T is a
cached decode step: the new tokens attend every cached key causally, and no SeqInfo is needed.
"""

from __future__ import annotations

from ..attention import SeqInfo, decode_attention, prefixlm_attention

__all__ = ["NAME", "packed_prefixlm_attention", "register"]

NAME = "prefixlm"


def packed_prefixlm_attention(module, query, key, value, attention_mask, scaling=None,
                              dropout: float = 0.0, prefixlm_info: SeqInfo | None = None,
                              prefixlm_backend: str = "auto", **kwargs):
    """transformers' attention function over one packed row (see the module docstring).

    prefixlm_info: the row's SeqInfo (`prefixlm.hf.packed_batch` builds it); prefixlm_backend: the
    attention backend ("auto" or a name from `prefixlm.attention.backend_names()`)."""
    if dropout:
        raise NotImplementedError(f"attn_implementation={NAME!r} has no attention dropout; set "
                                  f"config.attention_dropout = 0")
    batch, _, rows, _ = query.shape
    if batch != 1:
        raise ValueError(f"attn_implementation={NAME!r} runs one packed row: pack the samples "
                         f"into input_ids of shape (1, T) (got a batch of {batch})")
    # Under autocast transformers applies RoPE in fp32 while v comes from the bf16 projection;
    # the attention runs in v's dtype, as SDPA under autocast would.
    q, k, v = (t[0].transpose(0, 1).to(value.dtype) for t in (query, key, value))
    if k.shape[0] > rows or (prefixlm_info is None and rows == 1):
        return decode_attention(q, k, v, softmax_scale=scaling)[None], None
    if prefixlm_info is None:
        raise ValueError(
            f"attn_implementation={NAME!r} needs the packed batch's layout: call the model with "
            f"prefixlm_info=SeqInfo (prefixlm.hf.packed_batch builds input_ids, position_ids and "
            f"prefixlm_info for a list of samples)")
    out = prefixlm_attention(q, k, v, prefixlm_info, backend=prefixlm_backend,
                             softmax_scale=scaling)
    return out[None], None


def register(transformers) -> None:
    """Register the function with transformers under `NAME`."""
    transformers.AttentionInterface.register(NAME, packed_prefixlm_attention)
