"""Backend table and the `auto` rule.

Each backend is a module with:
  NAME, USES_OP   -- USES_OP backends run inside the `prefixlm::attention` custom op
  unavailable_reason(q, k, v) -> str | None  -- why it cannot run these inputs (None: it can)
  op backends:     lse_shape(q), forward(q, k, v, meta, scale) -> (out, lse),
                   backward(dout, q, k, v, out, lse, meta, scale, deterministic) -> (dq, dk, dv)
  direct backends: attention(q, k, v, info, scale, deterministic) -> out
A backend whose optional dependency is missing still imports; it reports the missing module from
`unavailable_reason`.

`auto` takes the first backend in AUTO_ORDER[device type] that can run the inputs. On CUDA the order
follows the measured speed on the H200 (BENCHMARKS.md): for training the fused Triton kernel, then
FA3's two passes, FlexAttention, SDPA; for forward-only calls FA3 first. Elsewhere (CPU, MPS) it is
SDPA, which runs everywhere.
"""

from __future__ import annotations

import importlib

import torch

_MODULES = {
    "reference": "reference_backend",
    "sdpa": "sdpa",
    "flex": "flex",
    "fa3": "fa3",
    "triton": "triton_backend",
}
# By device type ("cuda_forward": CUDA inputs that need no gradient); others use "default".
AUTO_ORDER = {
    "cuda": ("triton", "fa3", "flex", "sdpa"),
    # FA3's two-pass forward measured faster than the Triton kernel on the H200; its backward
    # could not be measured there (forward-only build), so it leads only where no grad is needed.
    "cuda_forward": ("fa3", "triton", "flex", "sdpa"),
    "default": ("sdpa",),  # CPU, MPS: Flex there is an unfused forward-only fallback
}

BACKENDS = {name: importlib.import_module(f"{__package__}.{mod}") for name, mod in _MODULES.items()}


def backend_names() -> tuple[str, ...]:
    return ("auto", *BACKENDS)


def op_backend(name: str):
    """The module of a backend that runs inside the custom op."""
    module = BACKENDS.get(name)
    if module is None or not module.USES_OP:
        raise ValueError(f"{name!r} is not a custom-op backend")
    return module


def resolve_backend(name: str, q, k, v):
    """The backend module that will run (q, k, v); raises with the reason if it cannot."""
    if name == "auto":
        reasons = {}
        key = q.device.type
        if key == "cuda" and not (torch.is_grad_enabled()
                                  and any(t.requires_grad for t in (q, k, v))):
            key = "cuda_forward"
        order = AUTO_ORDER.get(key, AUTO_ORDER["default"])
        for candidate in order:
            reason = BACKENDS[candidate].unavailable_reason(q, k, v)
            if reason is None:
                return BACKENDS[candidate]
            reasons[candidate] = reason
        raise NotImplementedError(
            "no attention backend can run these inputs: "
            + "; ".join(f"{n}: {r}" for n, r in reasons.items()))
    module = BACKENDS.get(name)
    if module is None:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {backend_names()}")
    reason = module.unavailable_reason(q, k, v)
    if reason is not None:
        raise NotImplementedError(f"backend {name!r} cannot run these inputs: {reason}")
    return module
