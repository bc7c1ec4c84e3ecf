"""Backend table and the `auto` rule.

Each backend is a module with:
  NAME, USES_OP   -- USES_OP backends run inside the `prefixlm::attention` custom op
  unavailable_reason(q, k, v) -> str | None  -- why it cannot run these inputs (None: it can)
  op backends:     lse_shape(q), forward(q, k, v, meta, scale) -> (out, lse),
                   backward(dout, q, k, v, out, lse, meta, scale, deterministic) -> (dq, dk, dv)
  direct backends: attention(q, k, v, info, scale, deterministic) -> out
A backend whose optional dependency is missing still imports; it reports the missing module from
`unavailable_reason`.

`auto` takes the first backend in AUTO_ORDER[auto_class(q, k, v)] that can run the inputs. The
orders follow the speeds measured on the H200 (BENCHMARKS.md): for training, cuDNN's two passes
on long (>= 32k rows) head-dim-128 batches on sm90, the fused Triton kernel otherwise; for
forward-only calls FA3's two passes first. On CPU and MPS it is SDPA, which runs everywhere.
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
    "cudnn": "cudnn",
    "cudnn_flex": "cudnn_flex",
}
# Orders by "shape class" (`auto_class`); the first backend that can run the inputs wins.
AUTO_ORDER = {
    # Training on the H200 (fwd+bwd, BENCHMARKS.md): cuDNN's two passes beat the Triton kernel by
    # 1.09-1.23x on the 64k-token, head-dim-128 spec batches (A, C, E, F) ...
    "cuda_sm90_train_hd128_long": ("cudnn", "triton", "fa3", "flex", "sdpa"),
    # ... and lose on the 16k batch (B, 0.60x), head dim 64 (D, 0.94x) and pure causal (G, 0.92x,
    # not visible from shapes: it goes with its class). Other GPUs were not measured: triton.
    "cuda_train": ("triton", "cudnn", "fa3", "flex", "sdpa"),
    # Forward only: FA3's two-pass forward measured fastest (1.10 ms on A against 1.26 cudnn and
    # 1.31 triton); its backward could not be measured (forward-only build), so it leads only here.
    "cuda_forward": ("fa3", "triton", "cudnn", "flex", "sdpa"),
    "default": ("sdpa",),  # CPU, MPS: Flex there is an unfused forward-only fallback
}
LONG_BATCH = 32768  # rows of q at and above which a batch counts as "long"


@torch.compiler.assume_constant_result
def _is_sm90(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def auto_class(q, k, v) -> str:
    """The AUTO_ORDER key for these inputs, from static properties only (device, head dim, rows,
    whether a gradient is needed), so that `torch.compile` never re-traces on it."""
    if q.device.type != "cuda":
        return "default"
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return "cuda_forward"
    if (q.shape[-1] == 128 and q.shape[0] >= LONG_BATCH
            and _is_sm90(q.device.index if q.device.index is not None else 0)):
        return "cuda_sm90_train_hd128_long"
    return "cuda_train"


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
        for candidate in AUTO_ORDER[auto_class(q, k, v)]:
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
