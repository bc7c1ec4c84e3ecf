"""Exact gradients of short samples (`prefixlm.attention.short_samples`) against the fp64 reference.

cuDNN's and FA3's backwards take rowsum(dO * O) from the 16-bit O; in samples of 1-2 tokens that
rounding dominates dS, so they overwrite the rows of samples of 1..SHORT_SAMPLE tokens with
gradients recomputed densely in fp32. The Triton backward takes only D from the same tiles. All on
the CPU; batches are random on every run (rerun with PREFIXLM_TEST_SEED=...).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from attentionhelpers import SESSION_SEED
from prefixlm.attention.mask import sample_mask
from prefixlm.attention.reference import reference_attention
from prefixlm.attention.seqinfo import BatchMeta, SeqInfo
from prefixlm.attention.backends.short_samples import (SHORT_SAMPLE, exact_grads_of_short_samples,
                                              short_sample_tiles)
from prefixlm.attention.verify import pick_prefix

HEAD_DIM = 64
SCALE = 0.2  # not head_dim ** -0.5, so a scale that is ignored shows
HEADS = {"mha": (2, 2), "gqa3": (6, 2), "mqa": (4, 1)}


def _mixed_lengths(rng, long: bool = True):
    """(prefix, causal) of a shuffled batch: empty samples, samples of 1, 2 and SHORT_SAMPLE tokens,
    random short ones and, if `long`, samples of SHORT_SAMPLE + 1 and more tokens; prefixes from
    {0, 1, len - 1, len, random}."""
    lengths = [0, 1, 1, 2, 2, 2, SHORT_SAMPLE, 0, *rng.integers(3, SHORT_SAMPLE, size=4)]
    if long:
        lengths += [SHORT_SAMPLE + 1, *rng.integers(SHORT_SAMPLE + 2, 80, size=2)]
    lengths = [int(n) for n in rng.permutation(lengths)]
    prefix = [pick_prefix(rng, n) for n in lengths]
    return prefix, [n - p for n, p in zip(lengths, prefix)]


def _case(seed: int, heads, dtype, long: bool = True):
    rng = np.random.default_rng(seed)
    prefix, causal = _mixed_lengths(rng, long)
    capacity = sum(prefix) + sum(causal) + int(rng.integers(1, 8))
    info = SeqInfo.from_lengths(prefix, causal, capacity=capacity)
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(capacity, h, HEAD_DIM, generator=gen).to(dtype)
                     for h in (heads[0], heads[1], heads[1], heads[0]))
    return q, k, v, dout, info


def _short_rows(info: SeqInfo) -> torch.Tensor:
    """Packed rows of the samples of 1..SHORT_SAMPLE tokens, from the lengths alone."""
    lens = info.host_lens.sum(0)[:info.num_samples].numpy()
    starts = np.cumsum(lens) - lens
    rows = [np.arange(s, s + n) for s, n in zip(starts, lens) if 1 <= n <= SHORT_SAMPLE]
    return torch.from_numpy(np.concatenate(rows or [np.zeros(0, np.int64)]))


def _other_rows(info: SeqInfo, short: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(info.capacity, dtype=torch.bool)
    keep[short] = False
    return keep.nonzero().squeeze(1)


def _reference_grads(q, k, v, dout, info):
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    out = reference_attention(*leaves, info, SCALE, torch.float64)
    return torch.autograd.grad(out, leaves, dout.double())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_short_sample_rows_exact_others_untouched(heads, dtype):
    """Guards the fix for cuDNN and FA3 on samples of 1-2 tokens (rowsum(dO * O) from the 16-bit O
    dominated dS: dQ missed the mean bound by 1.2x on an H200, MQA, bf16). Every row of a sample
    of 1..SHORT_SAMPLE tokens, all heads (GQA/MQA: dK and dV summed over the group), gets the
    exact gradient: to fp32 rounding for fp32 inputs, within the final cast's rounding for bf16
    ones. Rows of longer samples and padding rows keep what the backend wrote (NaN here)."""
    seed = SESSION_SEED + 7 * heads[0] + heads[1] + 100 * (dtype == torch.bfloat16)
    q, k, v, dout, info = _case(seed, heads, dtype)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    exact_grads_of_short_samples(*grads, q, k, v, dout, BatchMeta.from_info(info), SCALE)

    expected = _reference_grads(q, k, v, dout, info)
    short = _short_rows(info)
    other = _other_rows(info, short)
    # fp32 math: errors stay below 1e-6 of the largest gradient (seen: 9e-7 over 120 batches);
    # bf16 keeps 8 significant bits, so the final cast moves a value by at most 2^-8 of itself.
    rtol = 0.0 if dtype == torch.float32 else 2.0 ** -8
    where = f"seed={seed} (rerun with PREFIXLM_TEST_SEED={SESSION_SEED})"
    for name, got, want in zip(("dq", "dk", "dv"), grads, expected):
        assert got.dtype == dtype
        assert torch.isnan(got[other]).all(), f"{name}: rows outside short samples written; {where}"
        want = want[short]
        torch.testing.assert_close(got[short].double(), want, rtol=rtol,
                                   atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f"{name}, {where}: {m}")


def test_no_short_samples_no_work():
    """Guards the hot path: without samples of 1..SHORT_SAMPLE tokens (only empty slots and
    samples of SHORT_SAMPLE + 1 or more) the call returns before touching a tensor (None here, as
    bench/host_overhead.py passes them) and changes no gradient; an empty batch likewise."""
    info = SeqInfo.from_lengths([0, SHORT_SAMPLE + 1, 0, 20], [0, 0, 0, 30], capacity=90)
    meta = BatchMeta.from_info(info)
    assert short_sample_tiles(meta, None) is None
    exact_grads_of_short_samples(None, None, None, None, None, None, None, meta, SCALE)
    q, k, v, dout = (torch.randn(90, 2, HEAD_DIM) for _ in range(4))
    grads = [torch.full_like(t, 1e4) for t in (q, k, v)]
    exact_grads_of_short_samples(*grads, q, k, v, dout, meta, SCALE)
    assert all(torch.equal(g, torch.full_like(g, 1e4)) for g in grads)
    empty = BatchMeta.from_info(SeqInfo.from_lengths([0, 0], [0, 0], capacity=4))
    assert short_sample_tiles(empty, None) is None


def test_tiles_hold_each_short_sample_with_its_mask():
    """Guards the builder shared by the Triton D and the cuDNN/FA3 gradients: exactly the samples
    of 1..SHORT_SAMPLE tokens, every token once, tile positions inside their own sample (past its
    end: its last row again), and per sample the PrefixLM mask of `sample_mask` with keys past the
    end masked."""
    rng = np.random.default_rng(SESSION_SEED + 1)
    prefix, causal = _mixed_lengths(rng)
    info = SeqInfo.from_lengths(prefix, causal, capacity=sum(prefix) + sum(causal) + 3)
    tiles = short_sample_tiles(BatchMeta.from_info(info), torch.zeros(1))
    lens = np.add(prefix, causal)
    starts = np.cumsum(lens) - lens
    short = np.flatnonzero((lens >= 1) & (lens <= SHORT_SAMPLE))
    width = int(lens[short].max())
    assert tiles.gather.shape == (len(short), width)
    assert torch.equal(tiles.rows.sort().values, _short_rows(info))
    assert torch.equal(tiles.gather.reshape(-1)[tiles.flat], tiles.rows)
    for b, i in enumerate(short):
        n, start = int(lens[i]), int(starts[i])
        expect_rows = np.minimum(np.arange(width), n - 1) + start
        np.testing.assert_array_equal(tiles.gather[b].numpy(), expect_rows)
        assert tiles.valid[b].tolist() == [j < n for j in range(width)]
        assert torch.equal(tiles.allowed[b, :n, :n], sample_mask(n, prefix[i]))
        assert not tiles.allowed[b, :, n:].any()


def test_tiles_built_once_per_batch():
    """Guards the per-step host cost: every layer's call on one batch gets the same tiles (built
    once), and another batch gets its own."""
    rng = np.random.default_rng(SESSION_SEED + 2)
    prefix, causal = _mixed_lengths(rng)
    capacity = sum(prefix) + sum(causal) + 3
    like = torch.zeros(1)
    info = SeqInfo.from_lengths(prefix, causal, capacity=capacity)
    first = short_sample_tiles(BatchMeta.from_info(info), like)
    again = short_sample_tiles(BatchMeta.from_info(info), like)
    assert again is first
    moved = short_sample_tiles(BatchMeta.from_info(SeqInfo.from_lengths(
        [1] + list(prefix), [0] + list(causal), capacity=capacity + 1)), like)
    assert moved is not first
    assert torch.equal(moved.rows[1:], first.rows + 1) and moved.rows[0] == 0


@pytest.mark.parametrize("dtype,heads", ((torch.float32, (2, 2)), (torch.float16, (6, 2)),
                                         (torch.bfloat16, (4, 1))), ids=("fp32", "fp16", "bf16"))
def test_triton_exact_delta_matches_fp64(dtype, heads):
    """Guards the Triton backward's D after it moved onto the shared tiles: on rows of samples of
    1..SHORT_SAMPLE tokens D_i = sum_j P_ij dP_ij equals rowsum(dO_i * O_i) of the fp64 reference
    output (fp32 math: to fp32 rounding); other rows keep the pre-kernel's D (NaN here)."""
    from prefixlm.attention.backends import triton_kernels as kernels
    seed = SESSION_SEED + 50 + heads[0]
    q, k, v, dout, info = _case(seed, heads, dtype)
    delta = torch.full((heads[0], info.capacity), float("nan"))
    kernels._exact_delta_of_short_samples(delta, q, k, v, dout, BatchMeta.from_info(info), SCALE)

    out = reference_attention(q.double(), k.double(), v.double(), info, SCALE, torch.float64)
    expected = (dout.double() * out).sum(-1).t()  # (Hq, T)
    short = _short_rows(info)
    where = f"seed={seed} (rerun with PREFIXLM_TEST_SEED={SESSION_SEED})"
    assert torch.isnan(delta[:, _other_rows(info, short)]).all(), where
    expected = expected[:, short]
    # fp32 math: errors stay below 1e-6 of the largest |D| (seen: 9e-7 over 540 batches).
    torch.testing.assert_close(delta[:, short].double(), expected, rtol=0.0,
                               atol=1e-5 * expected.abs().max().item(),
                               msg=lambda m: f"{where}: {m}")
