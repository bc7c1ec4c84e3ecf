"""The PrefixLM mask rule, the pair count and the dense tile builder every dense path uses."""

import numpy as np
import torch

from prefixlm.attention.mask import allowed_pairs, dense_tiles, sample_mask


def test_sample_mask_is_the_prefixlm_rule():
    """Guards the rule itself: prefix rows see exactly the prefix, causal row j sees the prefix
    and causal rows 0..j, for prefixes 0, 1, len-1 and len."""
    for n in (1, 2, 5):
        for p in (0, 1, n - 1, n):
            mask = sample_mask(n, p)
            for i in range(n):
                expected = [j < p or (i >= p and j <= i) for j in range(n)]
                assert mask[i].tolist() == expected, (n, p, i)


def test_allowed_pairs_counts_the_mask():
    """Guards the one formula behind the sampler's cost, the benchmarks' FLOPs and the MFU."""
    rng = np.random.default_rng(0)
    n = rng.integers(0, 40, size=50)
    p = (rng.random(50) * (n + 1)).astype(np.int64)
    dense = [int(sample_mask(int(a), int(b)).sum()) for a, b in zip(n, p)]
    assert allowed_pairs(p, n - p).tolist() == dense


def test_dense_tiles_hold_each_sample_and_read_no_other():
    """Guards the tile builder: position j of tile b is row start + j of its sample while
    j < len, the sample's last row after (never another sample's), `allowed` is the sample's mask
    on real keys only, and rows/flat list the real positions tile by tile."""
    lens, prefix = np.array([3, 1, 5]), np.array([1, 1, 0])
    starts = np.array([10, 20, 30])
    tiles = dense_tiles(starts, lens, prefix, "cpu")
    assert tiles.gather.tolist() == [[10, 11, 12, 12, 12], [20, 20, 20, 20, 20],
                                     [30, 31, 32, 33, 34]]
    assert tiles.valid.sum(1).tolist() == [3, 1, 5]
    for b, (n, p) in enumerate(zip(lens, prefix)):
        assert torch.equal(tiles.allowed[b, :n, :n], sample_mask(int(n), int(p)))
        assert not tiles.allowed[b, :, n:].any()
    assert tiles.rows.tolist() == [10, 11, 12, 20, 30, 31, 32, 33, 34]
    assert torch.equal(tiles.gather.flatten()[tiles.flat], tiles.rows)
