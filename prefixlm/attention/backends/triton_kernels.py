"""Fused PrefixLM flash attention over a packed varlen batch (Triton): forward and backward.

One sample, one query head h (key/value head h // G with G = Hq / Hkv), sample-local positions
i (query) and j (key) in [0, L), prefix length p, scale s:

  allowed(i, j) = j < p  or  j <= i
  forward:   S_ij = s * q_i . k_j  (allowed pairs only)
             lse_i = log sum_j exp(S_ij)          (saved, natural log, fp32, shape (Hq, T))
             P_ij = exp(S_ij - lse_i),   o_i = sum_j P_ij v_j
  backward:  D_i = do_i . o_i
             dP_ij = do_i . v_j,   dS_ij = P_ij (dP_ij - D_i)
             dv_j = sum_{i, heads of the group} P_ij do_i
             dk_j = s * sum_{i, heads of the group} dS_ij q_i
             dq_i = s * sum_j dS_ij k_j

The softmax runs online over key tiles in base 2 (exp(x) = exp2(x * log2 e)), as FlashAttention.

Work per tile. A query tile [a, b) of a sample visits keys [0, max(p, b)) only; keys below
max(p, a + 1) are allowed to every row of the tile, so only the one or two key tiles that straddle the
prefix end / the diagonal apply a mask. The backward's key-major loop mirrors it: key tile [c, e) is
seen by queries [0, L) when c < p and by queries [c, L) otherwise, and only query tiles below e (and
the partial last one) are masked. A sample with no causal tokens is therefore just a shorter loop.

Scheduling. Tiles are listed on the host from the batch's host lengths (no GPU sync), sorted
longest-first, and copied to the device from pinned memory; program id = tile * heads + head, so
the most expensive tiles of every head start first and short ones fill the tail.

Backward. A pre-kernel computes D_i = do_i . o_i (rows of samples of <= 32 tokens then get the
exact sum_j P_ij dP_ij instead, computed densely: there the 16-bit rounding of o_i would dominate).
Work is key-major: a program holds one key tile of one key/value head (K, V and the fp32 dK, dV
accumulators) and walks the query tiles that see it, for each of the G query heads of its group in
turn, so GQA needs no dK/dV reduction buffer. Per query tile it forms S^T = K Q^T and P^T (keys as
MMA rows, so P^T and dS^T feed dV += P^T dO and dK += dS^T Q from registers), dP^T = V dO^T and
dS^T.
  deterministic=False (`BwdConfig.atomic_dq`, the fused path): the same program also forms the
    tile's dQ contribution dS K (5 matrix products in all instead of 7) and adds it into an fp32
    scratch of (total, Hq, D) by a TMA bulk reduce-add of the whole tile through a tensor
    descriptor (`dq_tma`, sm90+: FlashAttention-3's scheme) or by per-element atomics
    (`dq_tma=False`, and always under the Triton interpreter, which has no descriptor reduce). The
    scratch is zeroed by the D pre-kernel and converted (times s) to dQ's dtype by a post-kernel:
    one extra write and one read+write of 4 * total * Hq * D bytes (case A: 392 MB, ~0.25 ms). The
    order of the additions varies from run to run: not bitwise reproducible.
  deterministic=True: dQ comes from a second, query-major kernel without atomics (S, P and dP are
    recomputed there), optionally on a side stream beside the key-major kernel.
Rows past the last sample are written as zeros (tail slices only).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from ...devices import to_device
from .short_samples import exact_delta, short_sample_tiles

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _load_kv(k_base, v_base, cols, offs_d, stride_kt, stride_vt, seqlen, MASK: tl.constexpr):
    """K and V rows `cols` of a sample; masked tiles read rows past the sample as 0."""
    if MASK:
        kv_ok = cols < seqlen
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_ok[:, None],
                    other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_ok[:, None],
                    other=0.0)
    else:
        k = tl.load(k_base + cols[:, None] * stride_kt + offs_d[None, :])
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
    return k, v


@triton.jit
def _allowed(queries, cols, prefix, seqlen):
    """(queries, keys) pairs the PrefixLM mask allows within one sample: the key is in the prefix
    or at/before the query, and inside the sample."""
    return ((cols[None, :] < prefix) | (cols[None, :] <= queries[:, None])) & \
        (cols[None, :] < seqlen)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, row0, col0, stride_kt, stride_vt,
               lo, hi, offs_m, offs_n, offs_d, seqlen, prefix, qk_scale, MASK: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr,
               USE_TMA: tl.constexpr, WS: tl.constexpr):
    for n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES, warp_specialize=WS):
        cols = n + offs_n
        if USE_TMA:
            # Rows past the sample (the next sample's, or padding, which may hold anything) are
            # masked below; rows past the tensor come back as zeros.
            k = desc_k.load([row0 + n, col0])
            v = desc_v.load([row0 + n, col0])
            if MASK:
                # Their p is 0, but 0 * NaN is NaN: zero those V rows too.
                v = tl.where((cols < seqlen)[:, None], v, 0.0)
        else:
            k, v = _load_kv(k_base, v_base, cols, offs_d, stride_kt, stride_vt, seqlen, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        if MASK:
            qk = tl.where(_allowed(offs_m, cols, prefix, seqlen), qk, float("-inf"))
        # qk_scale > 0, so the max commutes with the scaling: one FMA per score below
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _program_tile(tiles, cu_seqlens, prefix_lens, heads):
    """This program's (head, first row of its tile, sample start as int32 and int64, sample
    length, prefix length): program id = tile * heads + head, tiles = (sample, first row) pairs."""
    pid = tl.program_id(0)
    tile = pid // heads
    sample = tl.load(tiles + 2 * tile)
    lo = tl.load(tiles + 2 * tile + 1)
    start = tl.load(cu_seqlens + sample)
    seqlen = tl.load(cu_seqlens + sample + 1) - start
    prefix = tl.load(prefix_lens + sample)
    return pid % heads, lo, start, start.to(tl.int64), seqlen, prefix


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, cu_seqlens, prefix_lens, tiles,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                stride_ot, stride_oh, stride_lh, qk_scale, num_heads, group, rows, num_kv_heads,
                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr, STAGES: tl.constexpr, MASK_STAGES: tl.constexpr,
                USE_TMA: tl.constexpr, WS: tl.constexpr):
    head, q_lo, start, start64, seqlen, prefix = _program_tile(tiles, cu_seqlens, prefix_lens,
                                                               num_heads)
    kv_head = head // group

    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + start64 * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = K + start64 * stride_kt + kv_head * stride_kh
    v_base = V + start64 * stride_vt + kv_head * stride_vh
    if USE_TMA:
        desc_k = tl.make_tensor_descriptor(K, shape=[rows, num_kv_heads * HEAD_DIM],
                                           strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
        desc_v = tl.make_tensor_descriptor(V, shape=[rows, num_kv_heads * HEAD_DIM],
                                           strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        desc_k = K
        desc_v = V
    col0 = kv_head * HEAD_DIM

    q_hi = tl.minimum(q_lo + BLOCK_M, seqlen)
    kv_end = tl.maximum(prefix, q_hi)
    # keys below max(p, q_lo + 1) are allowed to every row of the tile: no mask there
    full_end = tl.minimum(tl.maximum(prefix, q_lo + 1), seqlen) // BLOCK_N * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, start, col0,
                               stride_kt, stride_vt, 0, full_end, offs_m, offs_n, offs_d, seqlen,
                               prefix, qk_scale, False, BLOCK_N, PREC, STAGES, USE_TMA, WS)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, desc_k, desc_v, start, col0,
                               stride_kt, stride_vt, full_end, kv_end, offs_m, offs_n, offs_d,
                               seqlen, prefix, qk_scale, True, BLOCK_N, PREC, MASK_STAGES, USE_TMA,
                               False)
    out = acc / l_i[:, None]
    tl.store(O + start64 * stride_ot + head * stride_oh + offs_m[:, None] * stride_ot
             + offs_d[None, :], out.to(O.dtype.element_ty), mask=row_ok[:, None])
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
    tl.store(LSE + head * stride_lh + start64 + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, DQACC, total, stride_ot, stride_oh, stride_dot, stride_doh,
                      stride_dh, stride_dqt, stride_dqh, HEAD_DIM: tl.constexpr,
                      BLOCK: tl.constexpr, ZERO_DQ: tl.constexpr):
    """D = rowsum(do * o) of rows [0, total) of one head; with ZERO_DQ also zeroes those rows of the
    fused path's fp32 dQ scratch (one pass over the rows instead of a separate memset launch)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    head = tl.program_id(1)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = rows < total
    rows64 = rows.to(tl.int64)
    o = tl.load(O + rows64[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    do = tl.load(DO + rows64[:, None] * stride_dot + head * stride_doh + offs_d[None, :],
                 mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_dh + rows64, delta, mask=ok)
    if ZERO_DQ:
        tl.store(DQACC + rows64[:, None] * stride_dqt + head * stride_dqh + offs_d[None, :],
                 tl.zeros([BLOCK, HEAD_DIM], tl.float32), mask=ok[:, None])


@triton.jit
def _load_rows(base, desc, row0, col0, rows, offs_d, stride_t, seqlen, MASK: tl.constexpr,
               USE_TMA: tl.constexpr):
    """A (BLOCK_M, D) tile of Q or dO: sample-local rows `rows`, which start at `row0` of the packed
    tensor (TMA) / at `base` (pointers). Rows past the sample come back as exact zeros in masked
    tiles: they may belong to the next sample or to NaN padding, and 0 * NaN would leak."""
    if USE_TMA:
        tile = desc.load([row0, col0])
        if MASK:
            tile = tl.where((rows < seqlen)[:, None], tile, 0.0)
    elif MASK:
        tile = tl.load(base + rows[:, None] * stride_t + offs_d[None, :],
                       mask=(rows < seqlen)[:, None], other=0.0)
    else:
        tile = tl.load(base + rows[:, None] * stride_t + offs_d[None, :])
    return tile


@triton.jit
def _bwd_kv_tile_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, desc_q,
                       desc_do, desc_dq, row0, col0, stride_qt, stride_dot, stride_dqt, lo, hi,
                       offs_n, offs_d, seqlen, prefix, qk_scale, MASK: tl.constexpr,
                       FUSED_DQ: tl.constexpr, DQ_TMA: tl.constexpr, USE_TMA: tl.constexpr,
                       BLOCK_M: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    """Query tiles [lo, hi) of one head against this program's key tile: accumulates dK (unscaled)
    and dV, and with FUSED_DQ adds each tile's unscaled dS K into the fp32 dQ scratch."""
    offs_mb = tl.arange(0, BLOCK_M)
    for m in tl.range(lo, hi, BLOCK_M, num_stages=STAGES):
        rows = m + offs_mb
        q = _load_rows(q_base, desc_q, row0 + m, col0, rows, offs_d, stride_qt, seqlen, MASK,
                       USE_TMA)
        do = _load_rows(do_base, desc_do, row0 + m, col0, rows, offs_d, stride_dot, seqlen, MASK,
                        USE_TMA)
        if MASK:
            row_ok = rows < seqlen
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        qkT = tl.dot(k, tl.trans(q), input_precision=PREC)          # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT * qk_scale - (lse * 1.4426950408889634)[None, :])
        if MASK:
            allowed = ((offs_n[:, None] < prefix) | (offs_n[:, None] <= rows[None, :])) & \
                (rows[None, :] < seqlen)
            pT = tl.where(allowed, pT, 0.0)
        # Accumulating inside the dot keeps no second (BLOCK_N, D) fp32 tile alive.
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        # Rows past the sample: pT = 0 and dO = 0 there, so dS^T is exactly 0 (their dQ adds 0).
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=PREC)
        if FUSED_DQ:
            dq = tl.dot(tl.trans(dsT), k, input_precision=PREC)   # (BLOCK_M, D), unscaled
            if DQ_TMA:
                # Bulk reduce-add of the whole tile; rows past `total` fall outside the
                # descriptor and are dropped, rows of the next sample get + 0.
                desc_dq.atomic_add([row0 + m, col0], dq)
            else:
                dq_ptrs = dq_base + rows[:, None] * stride_dqt + offs_d[None, :]
                if MASK:
                    tl.atomic_add(dq_ptrs, dq, mask=(rows < seqlen)[:, None], sem="relaxed")
                else:
                    tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQACC, cu_seqlens, prefix_lens, tiles,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale, num_kv_heads, group,
                     rows_total, dq_rows, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, FUSED_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
                     USE_TMA: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    kv_head, k_lo, start, start64, seqlen, prefix = _program_tile(tiles, cu_seqlens,
                                                                  prefix_lens, num_kv_heads)

    offs_n = k_lo + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen
    k = tl.load(K + start64 * stride_kt + kv_head * stride_kh + offs_n[:, None] * stride_kt
                + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + start64 * stride_vt + kv_head * stride_vh + offs_n[:, None] * stride_vt
                + offs_d[None, :], mask=col_ok[:, None], other=0.0)

    num_heads = num_kv_heads * group
    # Descriptors span every head (a row is Hq * D elements); the head picks the column. One set
    # per program, shared by the G heads of the loop below.
    if USE_TMA:
        desc_q = tl.make_tensor_descriptor(Q, shape=[rows_total, num_heads * HEAD_DIM],
                                           strides=[stride_qt, 1],
                                           block_shape=[BLOCK_M, HEAD_DIM])
        desc_do = tl.make_tensor_descriptor(DO, shape=[rows_total, num_heads * HEAD_DIM],
                                            strides=[stride_dot, 1],
                                            block_shape=[BLOCK_M, HEAD_DIM])
    else:
        desc_q = Q
        desc_do = DO
    if FUSED_DQ and DQ_TMA:
        desc_dq = tl.make_tensor_descriptor(DQACC, shape=[dq_rows, num_heads * HEAD_DIM],
                                            strides=[stride_dqt, 1],
                                            block_shape=[BLOCK_M, HEAD_DIM])
    else:
        desc_dq = DQACC

    # Queries that see any key of this tile start at 0 (a prefix key is in the tile) or at k_lo.
    q_start = tl.where(k_lo < prefix, 0, k_lo)
    # Rows below the tile's end may miss some of its causal keys: masked loop up to there.
    mask_end = tl.minimum(tl.where(k_lo + BLOCK_N > prefix, k_lo + BLOCK_N, q_start), seqlen)
    full_start = q_start + tl.cdiv(mask_end - q_start, BLOCK_M) * BLOCK_M
    full_end = full_start + tl.maximum(seqlen - full_start, 0) // BLOCK_M * BLOCK_M

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for g in range(0, group):
        head = kv_head * group + g
        q_base = Q + start64 * stride_qt + head * stride_qh
        do_base = DO + start64 * stride_dot + head * stride_doh
        lse_base = LSE + head * stride_lh + start64
        delta_base = DELTA + head * stride_lh + start64
        dq_base = DQACC + start64 * stride_dqt + head * stride_dqh
        col0 = head * HEAD_DIM
        dk, dv = _bwd_kv_tile_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                    desc_q, desc_do, desc_dq, start, col0, stride_qt, stride_dot,
                                    stride_dqt, q_start, mask_end, offs_n, offs_d, seqlen, prefix,
                                    qk_scale, True, FUSED_DQ, DQ_TMA, USE_TMA, BLOCK_M, PREC,
                                    STAGES)
        dk, dv = _bwd_kv_tile_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                    desc_q, desc_do, desc_dq, start, col0, stride_qt, stride_dot,
                                    stride_dqt, full_start, full_end, offs_n, offs_d, seqlen,
                                    prefix, qk_scale, False, FUSED_DQ, DQ_TMA, USE_TMA, BLOCK_M,
                                    PREC, STAGES)
        dk, dv = _bwd_kv_tile_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base,
                                    desc_q, desc_do, desc_dq, start, col0, stride_qt, stride_dot,
                                    stride_dqt, full_end, seqlen, offs_n, offs_d, seqlen, prefix,
                                    qk_scale, True, FUSED_DQ, DQ_TMA, USE_TMA, BLOCK_M, PREC,
                                    STAGES)
    dk = dk * sm_scale
    tl.store(DK + start64 * stride_dkt + kv_head * stride_dkh + offs_n[:, None] * stride_dkt
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + start64 * stride_dvt + kv_head * stride_dvh + offs_n[:, None] * stride_dvt
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, lo, hi, offs_m,
                  offs_n, offs_d, seqlen, prefix, qk_scale, MASK: tl.constexpr,
                  BLOCK_N: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    for n in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        cols = n + offs_n
        k, v = _load_kv(k_base, v_base, cols, offs_d, stride_kt, stride_vt, seqlen, MASK)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(_allowed(offs_m, cols, prefix, seqlen), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, cu_seqlens, prefix_lens, tiles,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh, qk_scale, sm_scale,
                   num_heads, group, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    head, q_lo, start, start64, seqlen, prefix = _program_tile(tiles, cu_seqlens, prefix_lens,
                                                               num_heads)
    kv_head = head // group

    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(Q + start64 * stride_qt + head * stride_qh + offs_m[:, None] * stride_qt
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + start64 * stride_dot + head * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + head * stride_lh + start64 + offs_m, mask=row_ok, other=0.0) * \
        1.4426950408889634
    delta = tl.load(DELTA + head * stride_lh + start64 + offs_m, mask=row_ok, other=0.0)
    k_base = K + start64 * stride_kt + kv_head * stride_kh
    v_base = V + start64 * stride_vt + kv_head * stride_vh

    q_hi = tl.minimum(q_lo + BLOCK_M, seqlen)
    kv_end = tl.maximum(prefix, q_hi)
    full_end = tl.minimum(tl.maximum(prefix, q_lo + 1), seqlen) // BLOCK_N * BLOCK_N
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, 0, full_end,
                       offs_m, offs_n, offs_d, seqlen, prefix, qk_scale, False, BLOCK_N, PREC,
                       STAGES)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, full_end,
                       kv_end, offs_m, offs_n, offs_d, seqlen, prefix, qk_scale, True, BLOCK_N,
                       PREC, STAGES)
    dq = dq * sm_scale
    tl.store(DQ + start64 * stride_dqt + head * stride_dqh + offs_m[:, None] * stride_dqt
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _cast_rows_kernel(SRC, DST, total, n_cols, scale, BLOCK: tl.constexpr):
    """DST[:total] = scale * SRC[:total] (fp32 -> DST dtype), flat row-major."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total * n_cols
    tl.store(DST + offs, (tl.load(SRC + offs, mask=ok) * scale).to(DST.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------
# Host side: configs, tile schedules, launchers
# --------------------------------------------------------------------------------------------------


class FwdConfig(NamedTuple):
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    mask_stages: int = 3      # pipelining of the short masked loop (diagonal / prefix end)
    use_tma: bool = False     # K/V through on-device tensor descriptors (sm90+)
    warp_specialize: bool = False


class BwdConfig(NamedTuple):
    # key-major dK/dV kernel: BLOCK_N keys per program, BLOCK_M query rows per step
    kv_block_n: int = 128
    kv_block_m: int = 64
    kv_warps: int = 8
    kv_stages: int = 2
    # query-major dQ kernel (deterministic path)
    q_block_m: int = 128
    q_block_n: int = 64
    q_warps: int = 8
    q_stages: int = 2
    # deterministic=False: dQ from the key-major kernel itself (one fused kernel, fp32 reduce-add
    # into a scratch) instead of the query-major kernel; deterministic=True never does this.
    atomic_dq: bool = False
    overlap_dq: bool = True   # run the dQ kernel on a side stream beside dK/dV (fills both tails)
    # key-major kernel: Q and dO tiles through on-device tensor descriptors (TMA, sm90+) when their
    # layout allows (`tma_compatible`), plain pointer loads otherwise
    use_tma: bool = False
    # fused path: dQ tiles added by a tensor-descriptor bulk reduce (TMA, sm90+; CUDA only, the
    # Triton interpreter has none) instead of per-element atomics
    dq_tma: bool = True


# Tuned on the H200 (sm90) with triton 3.6: BENCHMARKS.md, "Triton kernel configs".
# Keys: (head_dim, dtype, (major, minor)); anything else falls back to the defaults above.
_FWD_CONFIGS: dict = {
    (head_dim, dtype, (9, 0)): cfg
    for dtype in (torch.bfloat16, torch.float16)
    for head_dim, cfg in ((128, FwdConfig(128, 128, 8, 3, 3, True, False)),
                          (64, FwdConfig(128, 64, 8, 3, 3, False, False)))
}
_BWD_CONFIGS: dict = {
    (head_dim, dtype, (9, 0)): cfg
    for dtype in (torch.bfloat16, torch.float16)
    # The two kernels for either mode: the fused key-major kernel (atomic_dq) measured slower
    # (BENCHMARKS.md, "Triton kernel configs").
    for head_dim, cfg in ((128, BwdConfig(128, 64, 8, 3, 128, 64, 8, 3, False, True, False, True)),
                          (64, BwdConfig(128, 32, 4, 3, 64, 64, 4, 3, False, True, False, True)))
}


def _arch(device: torch.device):
    if device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


def fwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> FwdConfig:
    cfg = _FWD_CONFIGS.get((head_dim, dtype, _arch(device)))
    if cfg is not None:
        return cfg
    if device.type != "cuda":
        return FwdConfig(32, 32, 4, 1, 1)
    return FwdConfig()


def bwd_config(head_dim: int, dtype: torch.dtype, device: torch.device) -> BwdConfig:
    cfg = _BWD_CONFIGS.get((head_dim, dtype, _arch(device)))
    if cfg is not None:
        return cfg
    if device.type != "cuda":
        # The interpreter: small tiles and the sm90 table's paths (the fused path's dQ by pointer
        # atomics when asked for: the interpreter has no descriptor reduce).
        return BwdConfig(32, 16, 4, 1, 32, 16, 4, 1, False, False, False, False)
    return BwdConfig()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (the tests compare against an fp32 reference);
    # 16-bit inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _tile_schedule(seqlens: np.ndarray, prefix: np.ndarray, block: int, other_block: int,
                   key_major: bool) -> np.ndarray:
    """(tiles, 2) int32 [sample, local start], most expensive tile first.

    Query-major (forward, dQ): tile [a, a+block) costs cdiv(max(p, min(a+block, L)), other_block)
    key tiles. Key-major (dK/dV): tile [c, c+block) costs cdiv(L - (0 if c < p else c), other_block)
    query tiles.
    """
    ids = np.flatnonzero(seqlens > 0)
    lens, pre = seqlens[ids], prefix[ids]
    counts = -(-lens // block)
    sample = np.repeat(ids, counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    lo = (np.arange(int(counts.sum())) - first) * block
    L, p = np.repeat(lens, counts), np.repeat(pre, counts)
    if key_major:
        cost = -(-(L - np.where(lo < p, 0, lo)) // other_block)
    else:
        cost = -(-np.maximum(p, np.minimum(lo + block, L)) // other_block)
    order = np.argsort(-cost, kind="stable")
    return np.stack([sample[order], lo[order]], 1).astype(np.int32)


def _schedule(meta, block: int, other_block: int, key_major: bool, device) -> torch.Tensor:
    """Device copy of the batch's tile schedule, built once per batch (no host sync)."""
    def build():
        prefix = np.asarray(meta.prefix_host, np.int64)
        seqlens = prefix + np.asarray(meta.causal_host, np.int64)
        host = _tile_schedule(seqlens, prefix, block, other_block, key_major)
        return to_device(torch.from_numpy(host), device)

    return meta.cached(("triton_tiles", block, other_block, key_major, device), build)


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether (T, H, D) `t` can be read through a tensor descriptor of rows of H * D elements:
    heads packed in a row, and base address and row stride multiples of 16 bytes. A view into a
    fused q/k/v/gate projection often fails the last (rows of 3*H*D + H elements); the kernel then
    loads with plain pointers instead, which any layout allows."""
    row_bytes = t.stride(0) * t.element_size()
    return (t.stride(2) == 1 and t.stride(1) == t.shape[2] and row_bytes % 16 == 0
            and t.data_ptr() % 16 == 0)


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8,
                       device=torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


def _ensure_allocator():
    """On-device tensor descriptors need scratch memory from an allocator Triton can call. Triton
    keeps the allocator in a context variable, which a new thread does not inherit: the autograd
    engine runs the backward on a thread of its own, so it is set before every launch that needs
    it (a cheap assignment), not once per process."""
    triton.set_allocator(_scratch)


def prefixlm_attention_fwd(q, k, v, meta, softmax_scale: float, config: FwdConfig | None = None):
    """out (T, Hq, D) in q's dtype, lse (Hq, T) fp32. Rows >= meta.total: out 0, lse 0 (the op's
    outputs are fully defined, so eager and compiled runs agree bit for bit)."""
    rows, num_heads, head_dim = q.shape
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be > 0, got {softmax_scale}")
    cfg = config or fwd_config(head_dim, q.dtype, q.device)
    out = torch.empty_like(q)
    lse = torch.empty((num_heads, rows), device=q.device, dtype=torch.float32)
    if meta.total < rows:
        out[meta.total:].zero_()
        lse[:, meta.total:].zero_()
    if meta.total == 0:
        return out, lse
    tiles = _schedule(meta, cfg.block_m, cfg.block_n, False, q.device)
    grid = (tiles.shape[0] * num_heads,)
    use_tma = cfg.use_tma and tma_compatible(k) and tma_compatible(v)
    if use_tma:
        _ensure_allocator()
    _fwd_kernel[grid](
        q, k, v, out, lse, meta.cu_seqlens, meta.prefix_lens, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), softmax_scale * LOG2E, num_heads,
        num_heads // k.shape[1], rows, k.shape[1], HEAD_DIM=head_dim, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, PREC=_dot_precision(q.dtype), STAGES=cfg.num_stages,
        MASK_STAGES=cfg.mask_stages, USE_TMA=use_tma, WS=cfg.warp_specialize and use_tma,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


_SIDE_STREAMS: dict = {}


def _side_stream(device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def prefixlm_attention_bwd(dout, q, k, v, out, lse, meta, softmax_scale: float,
                           deterministic: bool = False, config: BwdConfig | None = None):
    """(dq, dk, dv) like q, k, v; rows >= meta.total are 0."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    cfg = config or bwd_config(head_dim, q.dtype, q.device)
    fused = cfg.atomic_dq and not deterministic
    total = meta.total
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total < rows:
        for grad in (dq, dk, dv):
            grad[total:].zero_()
    if total == 0:
        return dq, dk, dv

    # fp32 dQ scratch of the fused path: the sample rows only, zeroed by the delta kernel.
    dq_acc = (torch.empty((total, num_heads, head_dim), device=q.device, dtype=torch.float32)
              if fused else dq)
    delta = torch.empty((num_heads, rows), device=q.device, dtype=torch.float32)
    delta_block = 64
    _bwd_delta_kernel[(triton.cdiv(total, delta_block), num_heads)](
        out, dout, delta, dq_acc, total, out.stride(0), out.stride(1), dout.stride(0),
        dout.stride(1), delta.stride(0), dq_acc.stride(0), dq_acc.stride(1), HEAD_DIM=head_dim,
        BLOCK=delta_block, ZERO_DQ=fused, num_warps=4)

    _exact_delta_of_short_samples(delta, q, k, v, dout, meta, softmax_scale)

    prec = _dot_precision(q.dtype)
    # The interpreter (CPU tensors) has no descriptor reduce: pointer atomics there.
    dq_tma = fused and cfg.dq_tma and q.is_cuda
    use_tma = cfg.use_tma and tma_compatible(q) and tma_compatible(dout)
    if dq_tma or use_tma:
        _ensure_allocator()
    kv_tiles = _schedule(meta, cfg.kv_block_n, cfg.kv_block_m, True, q.device)
    q_tiles = None if fused else _schedule(meta, cfg.q_block_m, cfg.q_block_n, False, q.device)

    def launch_dkdv():
        _bwd_dkdv_kernel[(kv_tiles.shape[0] * num_kv_heads,)](
            q, k, v, dout, lse, delta, dk, dv, dq_acc, meta.cu_seqlens, meta.prefix_lens,
            kv_tiles, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
            dv.stride(1), dq_acc.stride(0), dq_acc.stride(1), lse.stride(0),
            softmax_scale * LOG2E, softmax_scale, num_kv_heads, group, rows, dq_acc.shape[0],
            HEAD_DIM=head_dim, BLOCK_M=cfg.kv_block_m, BLOCK_N=cfg.kv_block_n, FUSED_DQ=fused,
            DQ_TMA=dq_tma, USE_TMA=use_tma, PREC=prec, STAGES=cfg.kv_stages,
            num_warps=cfg.kv_warps, num_stages=cfg.kv_stages)

    def launch_dq():
        _bwd_dq_kernel[(q_tiles.shape[0] * num_heads,)](
            q, k, v, dout, lse, delta, dq, meta.cu_seqlens, meta.prefix_lens, q_tiles,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            softmax_scale * LOG2E, softmax_scale, num_heads, group, HEAD_DIM=head_dim,
            BLOCK_M=cfg.q_block_m, BLOCK_N=cfg.q_block_n, PREC=prec, STAGES=cfg.q_stages,
            num_warps=cfg.q_warps, num_stages=cfg.q_stages)

    if fused:
        launch_dkdv()
        n_cols = num_heads * head_dim
        cast_block = 4096
        if dq.stride(0) != n_cols or dq.stride(1) != head_dim:  # empty_like keeps odd layouts
            dq = torch.empty((rows, num_heads, head_dim), device=q.device, dtype=q.dtype)
            dq[total:].zero_()
        _cast_rows_kernel[(triton.cdiv(total * n_cols, cast_block),)](
            dq_acc, dq, total, n_cols, softmax_scale, BLOCK=cast_block, num_warps=4)
    elif cfg.overlap_dq and q.is_cuda and not torch.cuda.is_current_stream_capturing():
        # The two kernels read the same inputs and write disjoint outputs; running dQ on a side
        # stream lets each fill the other's tail. The main stream waits for the side stream before
        # anything else is queued, so the caching allocator cannot hand out these buffers early.
        main = torch.cuda.current_stream(q.device)
        side = _side_stream(q.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            launch_dq()
        launch_dkdv()
        main.wait_stream(side)
    else:
        launch_dkdv()
        launch_dq()
    return dq, dk, dv


def _exact_delta_of_short_samples(delta, q, k, v, dout, meta, softmax_scale):
    """Replace D_i = do_i . o_i by the exact sum_j P_ij dP_ij for rows of short samples.

    o_i was rounded to 16 bits on output, and in a row with only a few keys that rounding is a
    large part of dP_ij - D_i (with one key, dS must be exactly 0). Rows of long samples average
    it out; short ones are cheap to redo densely in fp32 (batched, O(sum L^2) for L <= 32; the
    tiles and the math are shared with the cuDNN and FA3 backwards, see attention/short_samples).
    """
    tiles = short_sample_tiles(meta, q)
    if tiles is None:
        return
    exact = exact_delta(tiles, q, k, v, dout, softmax_scale)  # (R, Hq)
    delta.index_copy_(1, tiles.rows, exact.t())
