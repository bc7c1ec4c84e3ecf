"""`backend="cudnn"`: host-side bookkeeping on the CPU; the cuDNN graphs against the reference on
the GPU.

The CPU tests need neither CUDA nor the cudnn frontend: they check which rows each pass covers, the
ragged offset columns, the graph-cache buckets and the rejection reasons. The GPU tests skip with a
reason when CUDA, a Hopper GPU or the `nvidia-cudnn-frontend` package is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attentionhelpers import SESSION_SEED, assert_stats_ok, gpu_only
from twopass import (LSE_KINDS, expected_lse_rows,
                     lone_tiny_samples_meet_the_rule, lse_batch, opcheck_edge_mix, stand_in_lse)

from prefixlm.attention import AttentionInputs
from prefixlm.attention.backends import cudnn as backend
from prefixlm.attention.registry import BACKENDS
from prefixlm.attention.seqinfo import BatchMeta
from prefixlm.attention.verify import BATCH_KINDS, check_backend, make_case, random_lengths


def _starts(prefix, causal):
    lens = np.asarray(prefix) + np.asarray(causal)
    return np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)


def _rows(first, count):
    return np.concatenate([np.arange(f, f + n) for f, n in zip(first, count)] or [np.zeros(0)])


def _batches():
    rng = np.random.default_rng(SESSION_SEED)
    for kind in BATCH_KINDS:
        for _ in range(3):
            yield kind, random_lengths(kind, rng, 300)


# --------------------------------------------------------------------------------------------------
# CPU: host side
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,lengths", list(_batches()))
def test_passes_cover_every_row_once(kind, lengths):
    """Guards rows that no call writes (left as garbage: the gradient buffers are never memset) or
    that two calls write over each other. Forward: the queries of the passes tile [0, total).
    Backward (split by keys): the keys of the calls tile [0, total) (dK/dV), the dQ rows written in
    place tile it too, and the scratch rows map exactly onto causal rows that "full" wrote."""
    prefix, causal = (np.asarray(x, np.int64) for x in lengths)
    starts, total = _starts(prefix, causal), int(prefix.sum() + causal.sum())
    everything = np.arange(total)
    fwd = backend.pass_rows(prefix, causal, starts, backward=False)
    q_rows = np.sort(np.concatenate([_rows(r.q_rows, r.q_lens) for r in fwd.values()] or [[]]))
    np.testing.assert_array_equal(q_rows, everything)

    bwd = backend.pass_rows(prefix, causal, starts, backward=True)
    assert set(bwd) <= {"full", "causal_only", "causal_scratch"}
    for name, rows in {**fwd, **bwd}.items():
        assert (rows.q_lens > 0).all() and (rows.kv_lens > 0).all(), f"{name} lists empty samples"
    kv_rows = np.sort(np.concatenate([_rows(r.kv_rows, r.kv_lens) for r in bwd.values()] or [[]]))
    np.testing.assert_array_equal(kv_rows, everything)
    in_place = [bwd[n] for n in ("full", "causal_only") if n in bwd]
    dq_rows = np.sort(np.concatenate([_rows(r.dq_rows, r.q_lens) for r in in_place] or [[]]))
    np.testing.assert_array_equal(dq_rows, everything)
    if "causal_scratch" in bwd:
        r = bwd["causal_scratch"]
        np.testing.assert_array_equal(backend.query_rows(r), _rows(r.q_rows, r.q_lens))
        np.testing.assert_array_equal(r.dq_rows, r.q_rows)  # cuDNN: dQ offsets == Q offsets
        assert set(backend.query_rows(r)) <= set(_rows(bwd["full"].q_rows, bwd["full"].q_lens))


def test_pass_geometry():
    """Guards the forward's bottom-right causal pass (queries start after the prefix, keys are the
    whole sample, so query j sees keys 0..p + j) and the backward's key split."""
    prefix, causal = np.array([5, 0, 7, 3]), np.array([2, 4, 0, 1])
    rows = backend.pass_rows(prefix, causal, _starts(prefix, causal), backward=False)
    c = rows["causal"]
    np.testing.assert_array_equal(c.q_rows, [5, 7, 21])
    np.testing.assert_array_equal(c.q_lens, [2, 4, 1])
    np.testing.assert_array_equal(c.kv_rows, [0, 7, 18])
    np.testing.assert_array_equal(c.kv_lens, [7, 4, 4])
    p = rows["prefix"]
    np.testing.assert_array_equal(p.q_rows, [0, 11, 18])
    np.testing.assert_array_equal(p.q_lens, [5, 7, 3])
    rows = backend.pass_rows(prefix, causal, _starts(prefix, causal), backward=True)
    f = rows["full"]
    np.testing.assert_array_equal(f.q_rows, [0, 11, 18])
    np.testing.assert_array_equal(f.q_lens, [7, 7, 4])
    np.testing.assert_array_equal(f.kv_lens, [5, 7, 3])
    c = rows["causal_scratch"]
    np.testing.assert_array_equal(c.q_rows, [5, 21])
    np.testing.assert_array_equal(c.kv_rows, [5, 21])
    np.testing.assert_array_equal(c.dq_rows, [5, 21])
    o = rows["causal_only"]
    np.testing.assert_array_equal(o.q_rows, [7])
    np.testing.assert_array_equal(o.dq_rows, [7])


def test_zero_causal_and_zero_prefix_batches_skip_a_pass():
    """The seed's crash: a batch without causal tokens must not run pass 2 (and one without
    prefixes not pass 1); an empty batch runs nothing."""
    prefix, causal = np.array([4, 9]), np.array([0, 0])
    assert set(backend.pass_rows(prefix, causal, _starts(prefix, causal), False)) == {"prefix"}
    assert set(backend.pass_rows(prefix, causal, _starts(prefix, causal), True)) == {"full"}
    prefix, causal = np.array([0, 0]), np.array([3, 1])
    assert set(backend.pass_rows(prefix, causal, _starts(prefix, causal), True)) == {"causal_only"}
    assert backend.pass_rows([0, 0], [0, 0], [0, 0], True) == {}
    assert backend.pass_rows([], [], [], False) == {}


def test_offset_columns_padding_and_strides():
    """Guards the ragged metadata: lengths int32 padded with zeros, offsets int64 = row x token
    stride, non-decreasing, padding slots parked at the end of the last sample (so the largest
    offset plus its length never exceeds the packed rows, which the backward's dQ accumulator is
    sized by)."""
    rows = backend.PassRows([3, 10], [2, 5], [0, 8], [5, 7], [0, 2])
    strides = {backend._OFF_Q: 96, backend._OFF_K: 32, backend._OFF_STATS: 3, backend._OFF_DQ: 96}
    cols = backend.offset_columns(rows, 4, strides)
    assert cols[backend._LEN_Q].dtype == np.int32
    np.testing.assert_array_equal(cols[backend._LEN_Q], [2, 5, 0, 0])
    np.testing.assert_array_equal(cols[backend._LEN_KV], [5, 7, 0, 0])
    np.testing.assert_array_equal(cols[backend._OFF_Q], np.array([3, 10, 15, 15, 15]) * 96)
    np.testing.assert_array_equal(cols[backend._OFF_K], np.array([0, 8, 15, 15, 15]) * 32)
    np.testing.assert_array_equal(cols[backend._OFF_STATS], np.array([3, 10, 15, 15, 15]) * 3)
    np.testing.assert_array_equal(cols[backend._OFF_DQ], np.array([0, 2, 7, 7, 7]) * 96)
    assert backend._OFF_V not in cols
    with pytest.raises(ValueError, match="do not fit"):
        backend.offset_columns(rows, 1, strides)


def test_to_device_roundtrip_and_alignment():
    """Guards the single host-to-device copy: every column comes back intact, in its dtype, and
    starts on a 16-byte boundary (cuDNN faults on misaligned operands)."""
    cols = [np.arange(5, dtype=np.int32), np.arange(3, dtype=np.int64) * 7,
            np.arange(1, dtype=np.int32), np.arange(9, dtype=np.int64)]
    out = backend._to_device(cols, "cpu")
    for host, dev in zip(cols, out):
        assert dev.dtype == (torch.int32 if host.dtype == np.int32 else torch.int64)
        np.testing.assert_array_equal(dev.numpy(), host)
        assert dev.data_ptr() % 16 == 0


def test_buckets_give_few_graph_classes():
    """Guards one graph per batch: lengths and sample counts of a training run (case-A-like
    batches: 30-60 samples, max prefix 1900-2048, max causal 900-1024) fall into a handful of
    shape classes, each at most 1.5x the real size."""
    for n in range(1, 5000):
        b = backend.bucket(n, 64)
        assert n <= b <= max(64, int(1.5 * n) + 1)
    classes = {(backend.bucket(s, 4), backend.bucket(p, 64), backend.bucket(c, 64))
               for s in range(30, 61) for p in range(1900, 2049) for c in range(900, 1025)}
    assert len(classes) <= 6
    assert backend.round64(63768) == 63808 and backend.round64(64) == 64


def test_rejections_without_cudnn_or_gpu(monkeypatch):
    """Guards clear reasons instead of crashes: no frontend, a CPU tensor, fp32, head_dim 96."""
    q = torch.zeros(4, 2, 64)
    monkeypatch.setattr(backend, "_loaded", True)
    monkeypatch.setattr(backend, "cudnn", None)
    monkeypatch.setattr(backend, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'cudnn'")
    assert "cudnn frontend not importable" in backend.unavailable_reason(AttentionInputs.of(q, q, q))
    monkeypatch.setattr(backend, "cudnn", object())
    assert "CUDA device" in backend.unavailable_reason(AttentionInputs.of(q, q, q))


@pytest.mark.parametrize("kind", LSE_KINDS)
def test_lse_defined_on_padding_tail(kind, monkeypatch, dirty_memory):
    """Guards uninitialised LSE entries: cuDNN's passes write the (T, Hq) LSE on their query rows,
    which tile [0, total); the padding tail must be 0, not whatever memory the buffer got."""
    class StandInGraph:
        def __init__(self, key):
            self.causal = key[1]

        def execute(self, pack, workspace, handle):
            lse, hq = pack[backend._STATS], pack[backend._STATS].shape[1]
            first = (pack[backend._OFF_STATS][:-1] // hq).tolist()
            stand_in_lse(lse, first, pack[backend._LEN_Q].tolist(), causal=self.causal)

    monkeypatch.setattr(backend, "_handle", lambda device: None)
    monkeypatch.setattr(backend, "_graph", lambda key, device: (StandInGraph(key), 0))
    info, q = lse_batch(kind)
    _, lse = backend.forward(q, q, q, BatchMeta.from_info(info), 0.125)
    values, _ = expected_lse_rows(info)
    assert lse.shape == backend.lse_shape(q)
    assert torch.equal(lse, values[:, None].expand_as(lse)), f"kind={kind} seed={SESSION_SEED}"


def test_a_rejected_ragged_backward_changes_only_its_shape_class(monkeypatch):
    """Guards one failed graph build switching every later backward to the slower gathered Stats:
    the fallback is remembered per shape class."""
    built = []

    def fake_graph(key, device):
        built.append(key[-1])
        if key[-1] == "ragged" and key[0] == "bad":
            raise RuntimeError("ragged Stats rejected")
        return object(), 0

    monkeypatch.setattr(backend, "_graph", fake_graph)
    monkeypatch.setattr(backend, "_bwd_stats_modes", {})
    assert backend._bwd_graph(("bad", 1, ""), None)[1] == "padded"
    assert backend._bwd_graph(("bad", 1, ""), None)[1] == "padded"
    assert backend._bwd_graph(("good", 1, ""), None)[1] == "ragged"
    assert built == ["ragged", "padded", "padded", "ragged"]


def test_registered():
    """The backend is selectable by name and its LSE is one (T, Hq) buffer for both passes."""
    assert BACKENDS["cudnn"] is backend
    assert backend.lse_shape(torch.zeros(7, 3, 64)) == (7, 3)


# --------------------------------------------------------------------------------------------------
# GPU: the cuDNN graphs
# --------------------------------------------------------------------------------------------------

gpu = gpu_only("cudnn", head_dim=64)


# Every kind, "single" included: its lone 1-2 token samples once missed the dQ bound (cuDNN's
# rowsum(dO * O) reads the 16-bit O); short samples now get exact gradients (short_samples.py).
GPU_KINDS = BATCH_KINDS


@gpu
@pytest.mark.parametrize("kind", GPU_KINDS)
@pytest.mark.parametrize("heads", ((8, 8), (12, 4), (8, 1)), ids=("mha", "gqa3", "mqa"))
@pytest.mark.parametrize("head_dim", (64, 128))
def test_gpu_matches_reference(kind, heads, head_dim):
    """The FlashAttention rule against the fp32 reference, every batch kind (zero-causal, no-prefix,
    hundreds of tiny samples, padding tails), output and all gradients; fp16 and bf16 alternate
    over the matrix."""
    dtype = (torch.bfloat16, torch.float16)[(GPU_KINDS.index(kind) + head_dim // 64) % 2]
    case = make_case(kind, SESSION_SEED + 17 * GPU_KINDS.index(kind) + head_dim,
                     num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim, dtype=dtype,
                     device="cuda", max_len=1100)
    assert_stats_ok(check_backend("cudnn", case), case)


@gpu
def test_gpu_non_contiguous_and_scale():
    """Fused-projection slices keep their token stride (no copy) and a custom scale is honoured."""
    case = make_case("random", SESSION_SEED + 5, num_q_heads=4, num_kv_heads=2, head_dim=128,
                     dtype=torch.bfloat16, device="cuda", max_len=700)
    fused = torch.cat([case.q, case.k, case.v], dim=1)
    case.q, case.k, case.v = fused[:, :4], fused[:, 4:6], fused[:, 6:]
    assert not case.q.is_contiguous()
    assert_stats_ok(check_backend("cudnn", case, softmax_scale=0.05), case)


@gpu
def test_gpu_deterministic_50_reruns():
    """The deterministic backward (cuDNN's deterministic algorithm; the combine adds each causal
    dQ row once, without atomics) gives bitwise equal gradients on 50 reruns."""
    case = make_case("edge_mix", SESSION_SEED + 9, num_q_heads=6, num_kv_heads=2, head_dim=128,
                     dtype=torch.bfloat16, device="cuda")
    from prefixlm import prefixlm_attention

    def grads():
        leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
        out = prefixlm_attention(*leaves, case.info, backend="cudnn", deterministic=True)
        return torch.autograd.grad(out, leaves, case.dout)

    first = grads()
    for _ in range(49):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


@gpu
def test_gpu_graph_cache_reused_across_batches():
    """Batches of one shape class reuse the cached graphs: the second batch builds nothing."""
    from prefixlm import SeqInfo, prefixlm_attention

    backend.clear_graph_cache()
    q = torch.randn(3000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for prefix, causal in (([700, 500, 30], [300, 200, 9]), ([690, 20, 511], [290, 300, 10])):
        info = SeqInfo.from_lengths(prefix, causal, capacity=3000, device="cuda")
        out = prefixlm_attention(q, q, q, info, backend="cudnn")
        out.sum().backward()
        built = backend.graph_cache_info()["graphs"]
    assert built == 4  # forward: prefix and causal; backward: full and causal_scratch


@gpu
def test_gpu_opcheck():
    opcheck_edge_mix("cudnn")


@gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_gpu_lone_tiny_sample_meets_the_rule(dtype):
    lone_tiny_samples_meet_the_rule("cudnn", dtype)


@gpu
def test_gpu_rejects_unsupported():
    """fp32 and head_dim 96 are refused with the reason, not run."""
    from prefixlm import SeqInfo, prefixlm_attention

    info = SeqInfo.from_lengths([3], [2], device="cuda")
    for dtype, dim, match in ((torch.float32, 64, "float16/bfloat16"),
                              (torch.bfloat16, 96, "head_dim")):
        q = torch.zeros(5, 2, dim, device="cuda", dtype=dtype)
        with pytest.raises(NotImplementedError, match=match):
            prefixlm_attention(q, q, q, info, backend="cudnn")
