"""`prefixlm_attention`: input checks, backend choice, then the backend."""

from __future__ import annotations

import torch

from .op import attention_op
from .registry import BACKENDS, resolve_backend
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
    module = resolve_backend(backend, q, k, v)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if not module.USES_OP:
        return module.attention(q, k, v, info, scale, deterministic)
    out, _ = attention_op(q, k, v, info.cu_seqlens, info.prefix_lens, info.causal_lens,
                          info.host_lens, scale, module.NAME, deterministic)
    return out


def prepare_attention(info: SeqInfo, rows: int, backend: str = "auto") -> None:
    """Per-batch work that `backend` can do once before the layers run, outside compiled code
    (Flex: its block mask); a no-op for the others. `rows`: the rows of q the layers will pass."""
    prepare = getattr(BACKENDS.get(backend), "prepare", None)
    if prepare is not None:
        prepare(info, rows)
