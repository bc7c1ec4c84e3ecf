"""The FA3 backend (two passes on FlashAttention-3): a fully defined LSE and exact short-sample
gradients.

CPU: the forward runs with a stand-in kernel that writes what the real one writes (its pass's query
rows) into dirty memory, and the LSE must come out defined: the pass's values on its own rows, 0
everywhere else. GPU (skipped without CUDA, a Hopper GPU or the library): opcheck on the op, and
lone samples of 1-2 tokens, whose rows get exact gradients.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from attentionhelpers import SESSION_SEED, gpu_only
from twopass import (LSE_KINDS, expected_lse_rows, lone_tiny_samples_meet_the_rule, lse_batch, opcheck_edge_mix, stand_in_lse)

from prefixlm.attention.backends import fa3
from prefixlm.attention.seqinfo import BatchMeta

gpu = gpu_only("fa3")


@pytest.mark.parametrize("kind", LSE_KINDS)
def test_lse_defined_outside_each_pass(kind, monkeypatch, dirty_memory):
    """Guards uninitialised LSE entries (opcheck runs the op twice and compares): FA3 returns a
    fresh LSE per pass with only that pass's query rows written. lse[0] must hold them on prefix
    rows and lse[1] on causal rows, with 0 on the other pass's rows, the padding tail and all of a
    pass that did not run (no causal or no prefix tokens in the batch)."""
    def fwd(q, k, v, out, softmax_scale, is_causal, cu_seqlens_q, seqused_q, **_):
        lse = torch.empty(q.shape[1], q.shape[0])
        stand_in_lse(lse.t(), cu_seqlens_q[:-1].tolist(), seqused_q.tolist(), is_causal)
        return out, lse, None, None

    monkeypatch.setattr(torch.ops, "flash_attn_3", SimpleNamespace(fwd=fwd), raising=False)
    info, q = lse_batch(kind)
    _, lse = fa3.forward(q, q, q, BatchMeta.from_info(info), 0.125)
    values, passes = expected_lse_rows(info)
    assert lse.shape == fa3.lse_shape(q)
    for i in range(2):
        expected = torch.where(passes == i + 1, values, 0.0).expand(q.shape[1], -1)
        assert torch.equal(lse[i], expected), f"lse[{i}], kind={kind} seed={SESSION_SEED}"


@gpu
def test_gpu_opcheck():
    opcheck_edge_mix("fa3")


@gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_gpu_lone_tiny_sample_meets_the_rule(dtype):
    lone_tiny_samples_meet_the_rule("fa3", dtype)
