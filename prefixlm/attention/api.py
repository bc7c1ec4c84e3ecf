"""The attention entry points: `prefixlm_attention` (input checks, backend choice, then the
backend), `prepare_attention` (per-batch work before the layers) and `decode_attention` (new causal
tokens against a KV cache)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .op import attention_op
from .registry import AttentionInputs, resolve_backend
from .seqinfo import SeqInfo


def _check_inputs(q, k, v, info):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must be (T, heads, head_dim), got shape {tuple(t.shape)}")
    if not isinstance(info, SeqInfo):
        raise ValueError(f"info must be a SeqInfo, got {type(info).__name__}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be floating point, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device == info.device):
        raise ValueError(f"q, k, v and info must be on one device, got {q.device}, {k.device}, "
                         f"{v.device} and info on {info.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if not (q.shape[0] == k.shape[0]):
        raise ValueError(f"q and k must have the same number of rows, got {q.shape[0]} and "
                         f"{k.shape[0]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must have the same head_dim, got {q.shape[2]} and {k.shape[2]}")
    if q.shape[1] == 0 or q.shape[2] == 0:
        raise ValueError(f"q must have at least one head and head_dim >= 1, got shape "
                         f"{tuple(q.shape)}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads "
                         f"({k.shape[1]})")
    if q.shape[0] < info.capacity:
        raise ValueError(f"q has {q.shape[0]} rows but the batch needs info.capacity = "
                         f"{info.capacity}")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def prefixlm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, info: SeqInfo, *,
                       backend: str = "auto", softmax_scale: float | None = None,
                       deterministic: bool = False) -> torch.Tensor:
    """PrefixLM attention over a packed batch.

    q: (T, Hq, D); k, v: (T, Hkv, D) with Hq a multiple of Hkv; T >= info.capacity.
    In each sample, prefix tokens attend the whole prefix; causal token j attends the prefix and
    causal tokens 0..j; nothing crosses samples. Rows past `info.total` get output 0 and gradient 0.
    backend: "auto" or a name from `prefixlm.attention.backend_names()`.
    deterministic: ask for a bitwise reproducible backward where the backend offers a choice.
    Returns (T, Hq, D) in q's dtype.
    """
    _check_inputs(q, k, v, info)
    module = resolve_backend(backend, AttentionInputs.of(q, k, v))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if not module.USES_OP:
        return module.attention(q, k, v, info, scale, deterministic)
    out, _ = attention_op(q, k, v, info.cu_seqlens, info.prefix_lens, info.causal_lens,
                          info.host_lens, scale, module.NAME, deterministic)
    return out


def prepare_attention(info: SeqInfo, inputs: AttentionInputs, backend: str = "auto") -> str:
    """Per-batch work that the backend chosen for `inputs` can do once before the layers run,
    outside compiled code (Flex: its block mask; a no-op for the others). `inputs` describes the
    q, k, v the layers will pass (`AttentionInputs`). Returns the chosen backend's name."""
    module = resolve_backend(backend, inputs)
    prepare = getattr(module, "prepare", None)
    if prepare is not None:
        prepare(info, inputs)
    return module.NAME


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     softmax_scale: float | None = None) -> torch.Tensor:
    """Attention of the newest tokens of one sequence against its KV cache.

    q: (N, Hq, D), the queries of the last N tokens; k, v: (M, Hkv, D), the keys and values of all
    M >= N tokens so far (cache + these N). The new tokens are causal: new token i sees keys
    0 .. M - N + i, so the cached prefix and causal tokens stay as the prefill attended them (a
    causal token's state never depends on later tokens). Returns (N, Hq, D). This is the decode
    path of generation; prefill goes through `prefixlm_attention`.
    """
    new, total = q.shape[0], k.shape[0]
    if new > total:
        raise ValueError(f"decode_attention: {new} queries but only {total} keys")
    allowed = (torch.arange(total, device=q.device)[None, :]
               <= torch.arange(total - new, total, device=q.device)[:, None])
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=allowed, scale=softmax_scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(0, 1)
