"""`backend="reference"`: the fp32 oracle, selectable like any backend (slow; for checks)."""

import torch

from .reference import reference_attention

NAME = "reference"
USES_OP = False


def unavailable_reason(q, k, v):
    return None


def attention(q, k, v, info, softmax_scale, deterministic):
    return reference_attention(q, k, v, info, softmax_scale, torch.float32).to(q.dtype)
