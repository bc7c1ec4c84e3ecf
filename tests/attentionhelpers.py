"""Shared by the attention backends' tests: the session's seed (random each run, fixed by
PREFIXLM_TEST_SEED to replay a failure), why a backend's GPU tests cannot run here, and the
assertion that every statistic of `verify.check_backend` meets the rule."""

from __future__ import annotations

import os
import random

import pytest
import torch

from prefixlm.attention import AttentionInputs
from prefixlm.attention.registry import BACKENDS

SESSION_SEED = int(os.environ.get("PREFIXLM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def gpu_reason(name: str, head_dim: int = 128) -> str | None:
    """Why the GPU tests of backend `name` cannot run here (None: they can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    q = torch.zeros(1, 1, head_dim, dtype=torch.bfloat16, device="cuda")
    reason = BACKENDS[name].unavailable_reason(AttentionInputs.of(q, q, q))
    if reason is None and name == "fa3" and not hasattr(torch.ops.flash_attn_3, "bwd"):
        reason = "this FlashAttention-3 build has no backward"
    return reason


def gpu_only(name: str, head_dim: int = 128):
    """skipif mark for the GPU tests of backend `name`, saying why they do not run."""
    reason = gpu_reason(name, head_dim)
    return pytest.mark.skipif(reason is not None, reason=f"{name} unavailable: {reason}")


def assert_stats_ok(stats, case, backend: str | None = None):
    """Every statistic meets the rule, else a message naming the case and the seed to replay."""
    bad = [str(s) for s in stats if not s.ok]
    where = f"backend={backend} " if backend else ""
    assert not bad, (f"{where}kind={case.kind} seed={case.seed} (rerun with PREFIXLM_TEST_SEED="
                     f"{SESSION_SEED}):\n" + "\n".join(bad))
