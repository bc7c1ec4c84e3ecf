"""SeqInfo construction and the input checks of prefixlm_attention."""

import numpy as np
import pytest
import torch

from prefixlm import SeqInfo, prefixlm_attention
from prefixlm.attention import resolve_backend


def test_from_lengths_accepts_lists_arrays_tensors():
    """Guards the three documented input types giving the same metadata."""
    a = SeqInfo.from_lengths([3, 0, 2], [1, 4, 0], capacity=16)
    b = SeqInfo.from_lengths(np.array([3, 0, 2], np.int32), np.array([1, 4, 0]), capacity=16)
    c = SeqInfo.from_lengths(torch.tensor([3, 0, 2]), torch.tensor([1, 4, 0]), capacity=16)
    for info in (a, b, c):
        assert info.cu_seqlens.dtype == torch.int32
        assert info.cu_seqlens[:4].tolist() == [0, 4, 8, 10]
        assert (info.total, info.num_samples, info.max_prefix, info.max_causal,
                info.max_seqlen) == (10, 3, 3, 4, 4)


def test_fixed_capacity_gives_fixed_shapes():
    """Guards torch.compile reuse: with a capacity, tensor shapes must not depend on the batch."""
    a = SeqInfo.from_lengths([1], [1], capacity=64)
    b = SeqInfo.from_lengths([5, 6, 7, 8], [1, 2, 3, 4], capacity=64)
    for name in ("cu_seqlens", "prefix_lens", "causal_lens", "host_lens"):
        assert getattr(a, name).shape == getattr(b, name).shape
    # padded slots are empty samples starting at the total
    assert b.cu_seqlens[5:].eq(36).all() and b.prefix_lens[4:].eq(0).all()


def test_from_cu_seqlens_round_trip():
    """Guards the cu_seqlens constructor computing causal = length - prefix."""
    info = SeqInfo.from_cu_seqlens([0, 4, 4, 9], [2, 0, 5])
    assert info.causal_host().tolist() == [2, 0, 0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefix_lens=[1, -2], causal_lens=[0, 3]), "prefix_lens\\[1\\] = -2 is negative"),
    (dict(prefix_lens=[1.0, 2.0], causal_lens=[0, 3]), "must hold integers"),
    (dict(prefix_lens=torch.tensor([1.0]), causal_lens=[0]), "must hold integers"),
    (dict(prefix_lens=[True], causal_lens=[0]), "must hold integers"),
    (dict(prefix_lens=[1, 2], causal_lens=[0]), "same length"),
    (dict(prefix_lens=[[1, 2]], causal_lens=[[0, 1]]), "must be 1-D"),
    (dict(prefix_lens=[5], causal_lens=[6], capacity=10), "total tokens 11 exceed capacity 10"),
    (dict(prefix_lens=[1, 1, 1], causal_lens=[0, 0, 0], capacity=8, max_samples=2),
     "3 samples do not fit"),
])
def test_invalid_lengths_raise_value_error(kwargs, message):
    """Guards bad metadata reaching a kernel: each case must raise ValueError naming the field."""
    with pytest.raises(ValueError, match=message):
        SeqInfo.from_lengths(**kwargs)


@pytest.mark.parametrize("cu, prefix, message", [
    ([0, 5, 3], [1, 0], "non-decreasing"),
    ([1, 5], [1], "start with 0"),
    ([0, 5], [6], "exceeds the sample length"),
    ([0, 5, 7], [1], "1 entries for 2 samples"),
])
def test_invalid_cu_seqlens(cu, prefix, message):
    """Guards non-monotonic or inconsistent cu_seqlens being accepted."""
    with pytest.raises(ValueError, match=message):
        SeqInfo.from_cu_seqlens(cu, prefix)


def _qkv(rows=8, hq=2, hkv=2, d=16, dtype=torch.float32, device="cpu"):
    return (torch.randn(rows, hq, d, dtype=dtype, device=device),
            torch.randn(rows, hkv, d, dtype=dtype, device=device),
            torch.randn(rows, hkv, d, dtype=dtype, device=device))


@pytest.mark.parametrize("mutate, message", [
    (lambda q, k, v: (q[0], k, v), "must be \\(T, heads, head_dim\\)"),
    (lambda q, k, v: (q, k.half(), v), "share a dtype"),
    (lambda q, k, v: (q.long(), k.long(), v.long()), "floating point"),
    (lambda q, k, v: (q, k[:, :1], v), "same shape"),
    (lambda q, k, v: (q[:6], k[:6], v[:6]), "needs info.capacity = 8"),
    (lambda q, k, v: (q[:, :, :8], k, v), "same head_dim"),
    (lambda q, k, v: (torch.cat([q, q[:, :1]], 1), k, v), "multiple of key/value heads"),
    (lambda q, k, v: (q.to("meta"), k.to("meta"), v.to("meta")), "one device"),
])
def test_bad_inputs_raise(mutate, message):
    """Guards shapes, dtypes and devices that no backend can run reaching a kernel."""
    info = SeqInfo.from_lengths([3, 2], [1, 2], capacity=8)
    with pytest.raises(ValueError, match=message):
        prefixlm_attention(*mutate(*_qkv()), info, backend="sdpa")


def test_unknown_and_unavailable_backends_explain_why():
    """Guards a typo or a missing optional kernel turning into a crash instead of a reason."""
    info = SeqInfo.from_lengths([3], [1])
    q, k, v = _qkv(rows=4)
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        prefixlm_attention(q, k, v, info, backend="fast")
    with pytest.raises(NotImplementedError, match="fa3"):
        prefixlm_attention(q, k, v, info, backend="fa3")  # no FlashAttention-3 / no GPU here


def test_auto_picks_sdpa_on_cpu():
    """Guards the documented auto rule on CPU (the portable path)."""
    q, k, v = _qkv()
    assert resolve_backend("auto", q, k, v).NAME == "sdpa"


def test_auto_rule_by_shape_class(monkeypatch):
    """Guards the documented auto rule (README, registry): on an sm90 GPU, training on long
    head-dim-128 batches goes to cudnn first, other training to triton, forward-only calls to fa3.
    Fake CUDA tensors stand in for a GPU: the rule reads only static properties."""
    from types import SimpleNamespace

    from prefixlm.attention import registry

    monkeypatch.setattr(registry, "_is_sm90", lambda index: True)

    def fake(rows, head_dim, grad):
        return SimpleNamespace(device=torch.device("cuda", 0), shape=(rows, 8, head_dim),
                               requires_grad=grad)

    def cls(rows, head_dim, grad):
        t = fake(rows, head_dim, grad)
        return registry.auto_class(t, t, t)

    assert cls(65536, 128, True) == "cuda_sm90_train_hd128_long"
    assert registry.AUTO_ORDER[cls(65536, 128, True)][0] == "cudnn"
    assert registry.AUTO_ORDER[cls(16384, 128, True)][0] == "triton"
    assert registry.AUTO_ORDER[cls(65536, 64, True)][0] == "triton"
    assert registry.AUTO_ORDER[cls(65536, 128, False)][0] == "fa3"
    with torch.no_grad():
        assert cls(65536, 128, True) == "cuda_forward"
    monkeypatch.setattr(registry, "_is_sm90", lambda index: False)
    assert cls(65536, 128, True) == "cuda_train"


def test_batch_meta_trims_padding_slots_and_is_cached_per_batch():
    """Guards the host summary the op builds on every call: it must cover the samples up to the
    last non-empty one (not the capacity's padding slots), match the batch exactly, be reused for
    the same batch, and not be reused for another batch or after host_lens changes."""
    from prefixlm.attention import BatchMeta

    a = SeqInfo.from_lengths([3, 0, 2, 0], [1, 0, 0, 0], capacity=64)
    b = SeqInfo.from_lengths([5], [7], capacity=64)
    meta_a, meta_b = BatchMeta.from_info(a), BatchMeta.from_info(b)
    assert meta_a.used_slots == 3 and meta_a.starts_host.tolist() == [0, 4, 4]
    assert (meta_a.total, meta_a.max_prefix, meta_a.max_causal, meta_a.max_seqlen) == (6, 3, 1, 4)
    assert meta_b.prefix_host.tolist() == [5] and meta_b.total == 12
    assert BatchMeta.from_info(a).prefix_host is meta_a.prefix_host      # cached
    a.host_lens[1, 0] = 2                                                # in place: recomputed
    assert BatchMeta.from_info(a).total == 7
    with pytest.raises(ValueError):
        meta_b.prefix_host[0] = 1                                        # shared: read-only
    empty = BatchMeta.from_info(SeqInfo.from_lengths([0], [0], capacity=4))
    assert empty.used_slots == 0 and empty.total == 0
