"""`backend="flex"`: its block mask, built block by block from row intervals, against
FlexAttention's own `create_block_mask` evaluated on every (query, key) pair; and one mask per
batch under torch.compile.

Eager Flex on the CPU applies `mask_mod` everywhere, so the CPU forward tests would pass even with
wrong block sparsity; the compiled GPU kernels skip the blocks this mask calls empty and skip
`mask_mod` on the ones it calls full. This test pins both sets to create_block_mask's.
"""


import numpy as np
import pytest
import torch

from attentionhelpers import SESSION_SEED
from prefixlm.attention import SeqInfo, prefixlm_attention
from prefixlm.attention.backends import flex
from prefixlm.attention.verify import BATCH_KINDS, make_case, random_seqinfos

if flex.flex_attention is None:
    pytest.skip("FlexAttention needs torch >= 2.5", allow_module_level=True)
from torch.nn.attention.flex_attention import create_block_mask  # noqa: E402



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
def test_block_mask_short_and_block_alignedrandom_seqinfos(rows):
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


def test_flex_compiles_fullgraph_and_builds_one_block_mask_per_batch(monkeypatch):
    """Guards two bugs seen in development: flex inside torch.compile(fullgraph=True) hit a graph
    break (warnings filter in the traced path), and rebuilt its block mask in every layer. Three
    layers share one SeqInfo: one mask per traced call, no recompile for new batches of one
    capacity, same output as eager."""
    capacity = 96
    x = torch.randn(capacity, 2, 16)

    def model(x, info):
        for _ in range(3):
            x = prefixlm_attention(x, x, x, info, backend="flex") + x
        return x

    # Phase 1: count mask builds while tracing one batch through three layers.
    torch._dynamo.reset()
    built = []
    original = flex._block_mask
    monkeypatch.setattr(flex, "_block_mask", lambda *a: built.append(1) or original(*a))
    torch.compile(model, fullgraph=True, backend="aot_eager")(x, next(random_seqinfos(capacity)))
    assert len(built) == 1, f"block mask built {len(built)} times for 3 layers"
    monkeypatch.undo()

    # Phase 2: new batches of the same capacity reuse the graph and match eager.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for i, info in enumerate(random_seqinfos(capacity)):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x, info)
        torch.testing.assert_close(out, model(x, info), rtol=1e-5, atol=1e-5)
