"""SeqInfo construction and validation, BatchMeta and the per-batch cache."""

import gc

import numpy as np
import pytest
import torch

from prefixlm import SeqInfo
from prefixlm.attention.seqinfo import _BATCH_CACHES, BatchMeta, batch_cache


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


@pytest.mark.parametrize("kwargs, message", [
    (dict(prefix_lens=[2**62, 2**62], causal_lens=[2**62, 2**62]),
     r"prefix_lens\[0\] = 4611686018427387904 does not fit the int32 offsets"),
    (dict(prefix_lens=[2**30, 2**30], causal_lens=[0, 0]), "total tokens 2147483648 do not fit"),
    (dict(prefix_lens=[1], causal_lens=[2**31]), r"causal_lens\[0\] = 2147483648 does not fit"),
    (dict(prefix_lens=[1], causal_lens=[1], capacity=2**31), r"must be in \[0, 2\*\*31\)"),
    (dict(prefix_lens=[1], causal_lens=[1], capacity=8, max_samples=2**31), "must be < 2\\*\\*31"),
])
def test_lengths_beyond_int32_fail_before_allocating(kwargs, message):
    """Guards lengths whose int64 sum wraps (2**62 * 4 summed to a negative total that passed)
    and a capacity of 2**31 that allocated 48 GiB of slot arrays before its int32 check: each is
    a ValueError before any allocation of the batch's size."""
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=message):
            SeqInfo.from_lengths(**kwargs)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak


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


def test_batch_meta_trims_padding_slots_and_is_cached_per_batch():
    """Guards the host summary the op builds on every call: it must cover the samples up to the
    last non-empty one (not the capacity's padding slots), match the batch exactly, be reused for
    the same batch, and not be reused for another batch or after host_lens changes."""
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


def test_batch_cache_is_per_batch_and_freed_with_it():
    """Guards per-batch derived data (block masks, tile schedules, dense tiles: device memory)
    being shared between batches or outliving them: one dict per batch, reached from the SeqInfo
    and from its host_lens alike, gone when the batch is."""
    a = SeqInfo.from_lengths([3, 1], [2, 0], capacity=16)
    b = SeqInfo.from_lengths([3, 1], [2, 0], capacity=16)
    assert a.cached("x", lambda: object()) is batch_cache(a.host_lens)["x"]
    assert "x" not in batch_cache(b.host_lens)
    assert BatchMeta.from_info(a).cached("y", lambda: 1) == 1 and "y" in a._cache
    ident = id(a.host_lens)
    del a
    gc.collect()
    assert ident not in _BATCH_CACHES
