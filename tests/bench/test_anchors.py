"""The FA4 two-pass anchor (`bench.anchors`): its decomposition and gradient combine on the CPU,
against a stand-in of FA4's varlen interface that computes what FA4 documents (queries
[cu_q[b], cu_q[b] + seqused_q[b]), keys [cu_k[b], cu_k[b] + seqused_k[b]), causal aligned
bottom-right) and leaves every row it does not own as NaN; on the GPU, FA4 itself.
"""

from __future__ import annotations

import os
import random
import types

import pytest
import torch

from prefixlm.attention.reference import reference_attention
from prefixlm.attention.verify import BATCH_KINDS, error_stat, make_case
from prefixlm.bench import anchors as bench_anchors

SESSION_SEED = int(os.environ.get("PREFIXLM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def _spans(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
    for b in range(len(seqused_q)):
        yield (int(cu_seqlens_q[b]), int(seqused_q[b]), int(cu_seqlens_k[b]), int(seqused_k[b]))


def _probs(q, k, scale, causal):
    group = q.shape[1] // k.shape[1]
    scores = torch.einsum("ihd,jhd->hij", q.double(), k.double().repeat_interleave(group, 1))
    scores = scores * scale
    if causal:  # bottom-right: query i of Lq sees keys j <= Lk - Lq + i
        lq, lk = q.shape[0], k.shape[0]
        keep = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + lk - lq
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1), torch.logsumexp(scores, -1)


def _fwd(q, k, v, *, out, softmax_scale, causal, return_lse, cu_seqlens_q, cu_seqlens_k,
         seqused_q, seqused_k, max_seqlen_q, max_seqlen_k):
    assert max_seqlen_q > 0, "FA4 must not be called with max_seqlen_q = 0"
    lse = torch.full((q.shape[1], q.shape[0]), float("nan"))
    group = q.shape[1] // k.shape[1]
    for qa, lq, ka, lk in _spans(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
        if lq == 0:
            continue
        probs, rows_lse = _probs(q[qa:qa + lq], k[ka:ka + lk], softmax_scale, causal)
        vf = v[ka:ka + lk].double().repeat_interleave(group, 1)
        out[qa:qa + lq] = torch.einsum("hij,jhd->ihd", probs, vf).to(out.dtype)
        lse[:, qa:qa + lq] = rows_lse.float()
    return out, (lse if return_lse else None), None, None, None


def _bwd(q, k, v, out, dout, lse, *, softmax_scale, causal, dq, dk, dv, cu_seqlens_q,
         cu_seqlens_k, seqused_q, seqused_k, max_seqlen_q, max_seqlen_k):
    assert max_seqlen_q > 0
    assert not torch.isnan(lse[:, [a + i for a, n, _, _ in _spans(
        cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k) for i in range(n)]]).any(), \
        "the backward read an LSE entry its forward pass did not write"
    for grad in (dq, dk, dv):
        grad.fill_(float("nan"))
    hkv = k.shape[1]
    group = q.shape[1] // hkv
    for qa, lq, ka, lk in _spans(cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k):
        if lk == 0:
            continue
        qs, ks, vs, dos = (t.double() for t in (q[qa:qa + lq], k[ka:ka + lk], v[ka:ka + lk],
                                                 dout[qa:qa + lq]))
        probs, _ = _probs(qs, ks, softmax_scale, causal)
        kf, vf = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
        dprobs = torch.einsum("ihd,jhd->hij", dos, vf)
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        dq[qa:qa + lq] = (torch.einsum("hij,jhd->ihd", dscores, kf) * softmax_scale).to(dq.dtype)
        fold = lambda t: t.unflatten(1, (hkv, group)).sum(2)  # noqa: E731
        dk_tile = torch.einsum("hij,ihd->jhd", dscores, qs) * softmax_scale
        dk[ka:ka + lk] = fold(dk_tile).to(dk.dtype)
        dv[ka:ka + lk] = fold(torch.einsum("hij,ihd->jhd", probs, dos)).to(dv.dtype)
    return dq, dk, dv


@pytest.fixture
def stand_in_fa4(monkeypatch):
    monkeypatch.setattr(bench_anchors, "_fa4", types.SimpleNamespace(_flash_attn_fwd=_fwd,
                                                                     _flash_attn_bwd=_bwd))


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_two_pass_decomposition_and_combine(stand_in_fa4, kind):
    """Guards the anchor's bookkeeping: the two passes cover every query row once, pass 2's causal
    mask is bottom-right over the whole sample, the dK/dV of prefix rows are the sum of both passes
    (copied where a sample has no causal tokens), nothing reads a row FA4 leaves unwritten, and
    padding rows come out 0; fp64 against the reference, every batch kind, GQA 2:1."""
    case = make_case(kind, SESSION_SEED + BATCH_KINDS.index(kind), num_q_heads=4, num_kv_heads=2,
                     head_dim=16, dtype=torch.float64, max_len=130)
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    ref_out = reference_attention(*leaves, case.info, None, torch.float64)
    ref = (ref_out.detach(), *torch.autograd.grad(ref_out, leaves, case.dout))
    got = bench_anchors.fa4_two_pass(case.q, case.k, case.v, case.dout, case.info)
    for name, g, r in zip(("out", "dq", "dk", "dv"), got, ref):
        stat = error_stat(name, g, r, r, case.info.total)
        assert stat.ok, f"kind={kind} (PREFIXLM_TEST_SEED={SESSION_SEED}): {stat}"


def test_reason_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CPU reason is not the one given")
    assert "CUDA GPU" in bench_anchors.fa4_unavailable_reason()


_GPU_REASON = bench_anchors.fa4_unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_GPU_REASON is not None, reason=f"FA4 unavailable: {_GPU_REASON}")
@pytest.mark.parametrize("kind", ("edge_mix", "all_zero_causal", "no_prefix"))
def test_gpu_fa4_two_pass_meets_the_rule(kind):
    """The anchor on FA4 itself, bf16 GQA 3:1 at head dim 128, by the accuracy rule (so its
    timings are of a correct computation)."""
    case = make_case(kind, SESSION_SEED + 31, num_q_heads=12, num_kv_heads=4, head_dim=128,
                     dtype=torch.bfloat16, device="cuda")
    leaves = [t.detach().float().requires_grad_() for t in (case.q, case.k, case.v)]
    ref_out = reference_attention(*leaves, case.info, None, torch.float32)
    ref = (ref_out.detach(), *torch.autograd.grad(ref_out, leaves, case.dout.float()))
    same = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    same_out = reference_attention(*same, case.info, None, torch.bfloat16)
    same_dtype = (same_out.detach(), *torch.autograd.grad(same_out, same, case.dout))
    got = bench_anchors.fa4_two_pass(case.q, case.k, case.v, case.dout, case.info)
    for name, g, r, t in zip(("out", "dq", "dk", "dv"), got, ref, same_dtype):
        stat = error_stat(name, g, r, t, case.info.total)
        assert stat.ok, f"kind={kind} (PREFIXLM_TEST_SEED={SESSION_SEED}): {stat}"
