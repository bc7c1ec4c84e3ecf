"""Shared by the tests of the two-pass backends (fa3, cudnn): a stand-in LSE written by fake kernels
into dirty memory, so that an LSE entry no pass writes stands out, and the GPU checks both run."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from attentionhelpers import SESSION_SEED

from prefixlm.attention.seqinfo import SeqInfo
from prefixlm.attention.verify import Case, check_backend, make_case, random_lengths

LSE_KINDS = ("edge_mix", "all_zero_causal", "no_prefix", "many_tiny")
CAUSAL_OFFSET = 1000.0  # stand-in LSE: the row index, plus this on causal rows


def lse_batch(kind):
    rng = np.random.default_rng(SESSION_SEED + LSE_KINDS.index(kind))
    prefix, causal = random_lengths(kind, rng, 70)
    total = sum(prefix) + sum(causal)
    info = SeqInfo.from_lengths(prefix, causal, capacity=total + int(rng.integers(1, 9)))
    q = torch.randn(info.capacity, 3, 64, dtype=torch.bfloat16)
    return info, q


def expected_lse_rows(info):
    """(T,) stand-in LSE of the pass each row is a query of: prefix rows their row index, causal
    rows row + CAUSAL_OFFSET, padding rows 0; and (T,) 1 / 2 / 0 saying which pass."""
    values, passes, row = np.zeros(info.capacity), np.zeros(info.capacity, np.int64), 0
    for p, c in info.host_lens[:, :info.num_samples].t().tolist():
        values[row:row + p], passes[row:row + p] = np.arange(row, row + p), 1
        row += p
        values[row:row + c], passes[row:row + c] = np.arange(row, row + c) + CAUSAL_OFFSET, 2
        row += c
    return torch.from_numpy(values).float(), torch.from_numpy(passes)


@pytest.fixture
def dirty_memory(monkeypatch):
    """New floating-point buffers come filled with NaN, as GPU memory that was used before may:
    an entry that nothing writes stands out."""
    real_empty, real_new_empty = torch.empty, torch.Tensor.new_empty

    def dirty(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: dirty(real_empty(*a, **kw)))
    monkeypatch.setattr(torch.Tensor, "new_empty",
                        lambda self, *a, **kw: dirty(real_new_empty(self, *a, **kw)))


def stand_in_lse(rows, first, counts, causal):
    """Write the stand-in LSE of queries [first, first + count) into `rows` (T, ...) views."""
    for start, n in zip(first, counts):
        rows[start:start + n] = (torch.arange(start, start + n, dtype=torch.float32)
                                 + CAUSAL_OFFSET * causal)[:, None]


def opcheck_edge_mix(backend):
    """The op's contract with `backend`: schema, fake shapes of out and lse, autograd, and repeated
    runs giving equal outputs (an undefined LSE entry fails that)."""
    from prefixlm.attention.op import attention_op

    case = make_case("edge_mix", SESSION_SEED + 13, num_q_heads=4, num_kv_heads=2, head_dim=64,
                     dtype=torch.bfloat16, device="cuda", max_len=70)
    info = case.info
    args = (case.q.requires_grad_(), case.k.requires_grad_(), case.v.requires_grad_(),
            info.cu_seqlens, info.prefix_lens, info.causal_lens, info.host_lens, 0.125, backend,
            True)
    torch.library.opcheck(attention_op, args)


def lone_tiny_samples_meet_the_rule(backend, dtype):
    """One sample of 1-2 tokens under MQA 8:1, head dim 128, with a padding tail, for every prefix
    split: rowsum(dO * O) from the 16-bit O dominates there, so these rows need exact gradients."""
    for p, c in ((1, 0), (0, 1), (2, 0), (1, 1), (0, 2)):
        for seed in range(SESSION_SEED, SESSION_SEED + 3):
            gen = torch.Generator().manual_seed(seed)
            info = SeqInfo.from_lengths([p], [c], capacity=p + c + 3, device="cuda")
            q, k, v, dout = (torch.randn(p + c + 3, h, 128, generator=gen).to("cuda", dtype)
                             for h in (8, 1, 1, 8))
            stats = check_backend(backend, Case(q, k, v, dout, info, seed, "single"))
            bad = [str(s) for s in stats if not s.ok]
            assert not bad, (f"prefix={p} causal={c} seed={seed} (rerun with PREFIXLM_TEST_SEED="
                             f"{SESSION_SEED}):\n" + "\n".join(bad))
