"""The Flex backend's block mask, built block by block from row intervals, against FlexAttention's
own `create_block_mask` evaluated on every (query, key) pair.

Eager Flex on the CPU applies `mask_mod` everywhere, so the CPU forward tests would pass even with
wrong block sparsity; the compiled GPU kernels skip the blocks this mask calls empty and skip
`mask_mod` on the ones it calls full. This test pins both sets to create_block_mask's.
"""

import os
import random

import numpy as np
import pytest
import torch

from prefixlm.attention import SeqInfo
from prefixlm.attention.testing import BATCH_KINDS, make_case

flex = pytest.importorskip("prefixlm.attention.flex")
if flex.flex_attention is None:
    pytest.skip("FlexAttention needs torch >= 2.5", allow_module_level=True)
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402

SESSION_SEED = int(os.environ.get("PREFIXLM_TEST_SEED", random.SystemRandom().randrange(2**31)))


def _used(num, indices):
    """Per q block, the set of kv blocks a (counts, indices) pair lists."""
    num, indices = num.flatten().tolist(), indices.reshape(len(num.flatten()), -1).tolist()
    return [sorted(row[:n]) for n, row in zip(num, indices)]


def _assert_same_blocks(info, rows):
    mine = flex._block_mask(info, rows, torch.device("cpu"))
    expected = create_block_mask(mine.mask_mod, None, None, rows, rows, device="cpu",
                                 BLOCK_SIZE=mine.BLOCK_SIZE)
    where = f"lengths {info.host_lens.tolist()}, rows {rows}, seed {SESSION_SEED}"
    assert mine.BLOCK_SIZE == expected.BLOCK_SIZE, where
    assert _used(mine.kv_num_blocks, mine.kv_indices) == \
        _used(expected.kv_num_blocks, expected.kv_indices), f"partial blocks differ: {where}"
    assert _used(mine.full_kv_num_blocks, mine.full_kv_indices) == \
        _used(expected.full_kv_num_blocks, expected.full_kv_indices), f"full blocks differ: {where}"


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_block_mask_matches_create_block_mask(kind):
    """Guards the interval rule at sample, prefix and padding boundaries that fall inside a block,
    on exact multiples of the block and beside them (random lengths, padding tails)."""
    case = make_case(kind, SESSION_SEED + BATCH_KINDS.index(kind), max_len=700)
    _assert_same_blocks(case.info, case.info.capacity)


@pytest.mark.parametrize("rows", [1, 5, 127, 128, 129, 256, 300])
def test_block_mask_short_and_block_aligned_batches(rows):
    """Fewer rows than a block (Flex shrinks the query block), exactly one or two blocks, one row
    past a block; random samples filling part or all of the rows."""
    rng = np.random.default_rng(SESSION_SEED + rows)
    prefix, causal, left = [], [], int(rng.integers(0, rows + 1))
    while left > 0:
        length = int(rng.integers(1, left + 1))
        p = int(rng.integers(0, length + 1))
        prefix.append(p)
        causal.append(length - p)
        left -= length
    info = SeqInfo.from_lengths(prefix, causal, capacity=rows)
    _assert_same_blocks(info, rows)
