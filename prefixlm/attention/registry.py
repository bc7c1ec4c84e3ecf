"""The attention backends, the one protocol they follow, and the `auto` rule.

A backend is a module with:
  NAME                                     its name in `backend=...`
  USES_OP                                  True: it runs inside the `prefixlm::attention` custom op
  unavailable_reason(inputs) -> str|None   why it cannot run these inputs (None: it can); `inputs`
                                           is an `AttentionInputs` (static properties, no data)
  prepare(info, inputs) -> None            optional: per-batch work done once before the layers
  op backends (USES_OP):
    lse_shape(q), forward(q, k, v, meta, scale) -> (out, lse),
    backward(dout, q, k, v, out, lse, meta, scale, deterministic) -> (dq, dk, dv)
  direct backends:
    attention(q, k, v, info, scale, deterministic) -> out   (differentiable by itself)
A backend whose optional dependency is missing still imports; `unavailable_reason` names it.

`auto` takes the first backend in AUTO_ORDER[auto_class(inputs)] that can run the inputs. The orders
follow the speeds measured on the H200 (BENCHMARKS.md, "Attention"): on sm90, batches of 32k rows
and more go to cuDNN's one-pass interval-mask attention (cudnn_flex) first, forward and backward;
shorter training batches to the fused Triton kernel, shorter forward-only calls to FA3's two
passes. Where a backend's library is missing the next one runs. On CPU and MPS it is SDPA, which
runs everywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference
from .backends import cudnn, cudnn_flex, fa3, flex, sdpa, triton

__all__ = ["AttentionInputs", "BACKENDS", "AUTO_ORDER", "auto_class", "backend_names",
           "op_backend", "resolve_backend"]


class AttentionInputs(NamedTuple):
    """What choosing a backend may depend on: static properties of q, k, v, never their values,
    so that `torch.compile` never re-traces on the choice."""

    device: torch.device
    dtype: torch.dtype
    rows: int
    q_heads: int
    kv_heads: int
    head_dim: int
    requires_grad: bool

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> "AttentionInputs":
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return cls(q.device, q.dtype, q.shape[0], q.shape[1], k.shape[1], q.shape[2], grad)


_REQUIRED = {True: ("NAME", "unavailable_reason", "lse_shape", "forward", "backward"),
             False: ("NAME", "unavailable_reason", "attention")}


def _register(*modules) -> dict:
    table = {}
    for module in modules:
        missing = [name for name in _REQUIRED[module.USES_OP] if not hasattr(module, name)]
        if missing:
            raise TypeError(f"attention backend {module.__name__} lacks {', '.join(missing)}")
        table[module.NAME] = module
    return table


BACKENDS = _register(reference, sdpa, flex, fa3, triton, cudnn, cudnn_flex)

# Orders by "shape class" (`auto_class`); the first backend that can run the inputs wins.
AUTO_ORDER = {
    "cuda_sm90_train_long_hd128": ("cudnn_flex", "cudnn", "triton", "fa3", "flex", "sdpa"),
    "cuda_sm90_train_long": ("cudnn_flex", "triton", "cudnn", "fa3", "flex", "sdpa"),
    "cuda_train": ("triton", "cudnn_flex", "cudnn", "fa3", "flex", "sdpa"),
    "cuda_sm90_forward_long": ("cudnn_flex", "fa3", "triton", "cudnn", "flex", "sdpa"),
    "cuda_forward": ("fa3", "triton", "cudnn_flex", "cudnn", "flex", "sdpa"),
    "default": ("sdpa",),  # CPU, MPS: Flex there is an unfused forward-only fallback
}
LONG_BATCH = 32768  # rows of q at and above which a batch counts as "long"


@torch.compiler.assume_constant_result
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def auto_class(inputs: AttentionInputs) -> str:
    """The AUTO_ORDER key for these inputs."""
    if inputs.device.type != "cuda":
        return "default"
    index = inputs.device.index if inputs.device.index is not None else 0
    long_sm90 = inputs.rows >= LONG_BATCH and _is_sm90(index)
    if not inputs.requires_grad:
        return "cuda_sm90_forward_long" if long_sm90 else "cuda_forward"
    if long_sm90:
        return "cuda_sm90_train_long_hd128" if inputs.head_dim == 128 else "cuda_sm90_train_long"
    return "cuda_train"


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def op_backend(name: str):
    """The module of a backend that runs inside the custom op."""
    module = BACKENDS.get(name)
    if module is None or not module.USES_OP:
        raise ValueError(f"{name!r} is not a custom-op backend")
    return module


def resolve_backend(name: str, inputs: AttentionInputs):
    """The backend module that will run `inputs`; raises with the reason if none can."""
    if name == "auto":
        reasons = {}
        for candidate in AUTO_ORDER[auto_class(inputs)]:
            reason = BACKENDS[candidate].unavailable_reason(inputs)
            if reason is None:
                return BACKENDS[candidate]
            reasons[candidate] = reason
        raise NotImplementedError(
            "no attention backend can run these inputs: "
            + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    module = BACKENDS.get(name)
    if module is None:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    reason = module.unavailable_reason(inputs)
    if reason is not None:
        raise NotImplementedError(f"backend {name!r} cannot run these inputs: {reason}")
    return module
