"""`backend="triton"`: the fused single-pass PrefixLM kernels of `triton_kernels`.

Runs on CUDA, or on the CPU under the Triton interpreter (`TRITON_INTERPRET=1`, for tests only).
The forward saves the natural-log LSE, shape (Hq, T). `deterministic=False` may add dQ with fp32
atomics when the tuned config says that is faster (`BwdConfig.atomic_dq`); `deterministic=True`
always takes the atomic-free path, which is bitwise reproducible.
"""

from __future__ import annotations

import os

import torch

try:
    from . import triton_kernels as _kernels
except ImportError as exc:  # triton missing
    _kernels = None
    _IMPORT_ERROR = str(exc)

NAME = "triton"
USES_OP = True

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HEAD_DIMS = (16, 32, 64, 128)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(inputs):
    if _kernels is None:
        return f"triton is not importable ({_IMPORT_ERROR}): pip install 'prefixlm[triton]'"
    if inputs.dtype not in _DTYPES:
        return f"dtype must be float16, bfloat16 or float32, got {inputs.dtype}"
    if inputs.head_dim not in _HEAD_DIMS:
        return f"head_dim must be one of {_HEAD_DIMS}, got {inputs.head_dim}"
    if inputs.device.type == "cpu":
        if not _interpreting():
            return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on the CPU)"
    elif inputs.device.type != "cuda":
        return f"the Triton kernels need a CUDA device, got {inputs.device.type}"
    return None


def lse_shape(q):
    return (q.shape[1], q.shape[0])


def forward(q, k, v, meta, softmax_scale):
    return _kernels.prefixlm_attention_fwd(q, k, v, meta, softmax_scale)


def backward(dout, q, k, v, out, lse, meta, softmax_scale, deterministic):
    return _kernels.prefixlm_attention_bwd(dout, q, k, v, out, lse, meta, softmax_scale,
                                           deterministic)
