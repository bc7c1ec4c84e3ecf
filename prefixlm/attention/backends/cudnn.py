"""`backend="cudnn"`: the two-pass PrefixLM decomposition on cuDNN's fused attention (SDPA nodes of
the cudnn-frontend Graph API, `pip install prefixlm[cudnn]`).

Every operand is declared (B, H, S, D) with token-major strides and a ragged offset per sample
(THD layout), so one call addresses any subset of rows of the packed buffers. Forward passes:
  pass 1 (bidirectional): queries = keys = each sample's prefix rows [start, start + p);
  pass 2 (causal): queries = the causal rows [start + p, start + p + c), keys = the whole sample;
    the causal band is aligned bottom-right, so causal query j sees the prefix and keys p..p + j.
A call lists only the samples with queries and keys in it; empty slots exist only as the padding
of the sample-count bucket. Math per call (scale s): O = softmax(s Q K^T + mask) V, Stats = LSE
(natural log); backward dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = s dS K,
dK = s dS^T Q.

Forward: the passes write disjoint rows of one output and one LSE buffer (T, Hq) (the Stats are
ragged too). Backward: split by keys instead, which is exact because the saved LSE and O are those
of the whole row: "full" = every query of a sample x its prefix keys (no mask; all queries see the
whole prefix), "causal" = causal queries x causal keys (square, causal). dK/dV rows are then
disjoint and written in place; only dQ of the causal rows of samples that also have a prefix gets
two contributions, so the second goes to a scratch (dQ-sized, never memset) and is added onto
those rows (gather, add, scatter): no K/V-sized memset, no full-tensor add, and the combine
touches the causal rows of dQ only (a third of the rows on the spec batches; splitting by queries
would combine dK and dV on the prefix rows, four times the bytes). A batch without causal tokens
runs one call each way. Last, the rows of samples of <= 32 tokens are overwritten with exact fp32
gradients (`short_samples`): there the rounding of the 16-bit O in rowsum(dO * O) dominates dS.

Graphs are cached per shape class: sample count, max query and max key length rounded up to
{1, 1.5} x 2^k buckets, plus dtype, heads, head dim, input strides, scale, mask, determinism and
(backward) the packed row count rounded to 64, which sizes cuDNN's dQ accumulator: its
max_total_seq_len must cover the largest ragged offset plus its length, else the kernel faults.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from ...devices import to_device
from .short_samples import exact_grads_of_short_samples

NAME = "cudnn"
USES_OP = True

_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128)
_MIN_BACKEND = 90600  # int64 ragged offsets

# Operand uids of every graph; a pass binds only those its graph declares.
_Q, _K, _V, _O, _STATS, _DO, _DQ, _DK, _DV = range(1, 10)
_LEN_Q, _LEN_KV, _OFF_Q, _OFF_K, _OFF_V, _OFF_O, _OFF_STATS, _OFF_DQ, _OFF_DK, _OFF_DV = \
    range(20, 30)
_OFF_DO = 30  # dO has O's layout: bound to the same device column as _OFF_O

# Backward Stats: "ragged" reads the forward's (T, Hq) LSE in place; "padded" gathers it into
# (B, Hq, S, 1) first, for a cuDNN build that rejects ragged Stats in a backward graph. Which one a
# shape class got is remembered per class (`_bwd_stats_modes`), so one rejected build never changes
# the others.
_bwd_stats_modes: dict = {}
_lock = threading.Lock()
_graphs: dict = {}
_build_seconds: list = []
_handles: dict = {}

# The frontend is imported on first use: `import prefixlm` stays light, and CPU machines without it
# still import this module.
cudnn = None
_IMPORT_ERROR = None
_loaded = False


def _load():
    """The `cudnn` frontend module, or None (the reason is kept in `_IMPORT_ERROR`)."""
    global cudnn, _IMPORT_ERROR, _loaded
    if not _loaded:
        _loaded = True
        try:
            import cudnn as frontend
            cudnn = frontend
        except Exception as exc:  # noqa: BLE001 -- ImportError, or OSError loading libcudnn
            _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
    return cudnn


def bucket(n: int, floor: int) -> int:
    """Smallest of floor * {1, 1.5, 2, 3, 4, 6, ...} that is >= n: a shape class wastes at most a
    third of its rows and a training run meets only a handful of classes."""
    size = floor
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def round64(n: int) -> int:
    return (n + 63) // 64 * 64


def _backend_version() -> int:
    try:
        return int(cudnn.backend_version())
    except Exception:  # noqa: BLE001 -- a library without the call is too old anyway
        return 0


def unavailable_reason(inputs):
    if _load() is None:
        return f"cudnn frontend not importable (pip install 'prefixlm[cudnn]'): {_IMPORT_ERROR}"
    if inputs.device.type != "cuda":
        return f"cuDNN attention needs a CUDA device, got {inputs.device.type}"
    if torch.cuda.get_device_capability(inputs.device)[0] < 9:
        return "cuDNN ragged (THD) attention needs a Hopper GPU (sm90) or newer"
    if inputs.dtype not in _DTYPES:
        return f"cuDNN attention supports float16/bfloat16, got {inputs.dtype}"
    if inputs.head_dim not in _HEAD_DIMS:
        return (f"head_dim must be one of {_HEAD_DIMS} for the cuDNN backend, got "
                f"{inputs.head_dim}")
    version = _backend_version()
    if version < _MIN_BACKEND:
        return f"cuDNN library {version} is older than {_MIN_BACKEND} (int64 ragged offsets)"
    return None


def lse_shape(q):
    return (q.shape[0], q.shape[1])  # (T, Hq): both passes write their rows of one buffer


def graph_cache_info() -> dict:
    """Graphs built so far and the seconds spent building them (for the benchmark)."""
    return {"graphs": len(_graphs), "build_s": float(sum(_build_seconds))}


def clear_graph_cache() -> None:
    with _lock:
        _graphs.clear()
        _build_seconds.clear()


# --------------------------------------------------------------------------------------------------
# Host side: which samples and rows each pass covers (numpy only, testable without a GPU)
# --------------------------------------------------------------------------------------------------

class PassRows:
    """Rows of one pass: per listed sample, the first query row, query count, first key row, key
    count, and the first row its dQ goes to (in dQ, or in the scratch of pass "causal_scratch")."""

    def __init__(self, q_rows, q_lens, kv_rows, kv_lens, dq_rows=None):
        self.q_rows, self.q_lens, self.kv_rows, self.kv_lens = (
            np.asarray(a, np.int64) for a in (q_rows, q_lens, kv_rows, kv_lens))
        self.dq_rows = self.q_rows if dq_rows is None else np.asarray(dq_rows, np.int64)

    @property
    def count(self) -> int:
        return len(self.q_lens)

    @property
    def max_q(self) -> int:
        return int(self.q_lens.max()) if self.count else 0

    @property
    def max_kv(self) -> int:
        return int(self.kv_lens.max()) if self.count else 0


def pass_rows(prefix, causal, starts, backward: bool) -> dict:
    """The cuDNN calls of a batch; samples with no queries or no keys in a call are left out of it,
    and a call without samples is left out entirely.

    Forward (split by queries: output rows are disjoint):
      "prefix": prefix queries x prefix keys, no mask;
      "causal": causal queries x the whole sample, causal bottom-right.
    Backward (split by keys, so dK/dV rows are disjoint; exact because the forward's LSE and O are
    those of the whole row, which is all the backward needs to recompute P and rowsum(dO * O)):
      "full": every query of a sample x its prefix keys (every query sees the whole prefix), no
        mask; writes dQ of all those rows and dK/dV of the prefix rows;
      "causal_scratch" / "causal_only": causal queries x causal keys (square, causal), for samples
        with / without a prefix; writes dK/dV of the causal rows and dQ of the causal rows, into
        a compact scratch when pass "full" already wrote those dQ rows (added onto them after),
        straight into dQ otherwise. The scratch is dQ-sized and written at the same rows: cuDNN
        indexes its fp32 dQ accumulator by the query offsets, so dQ offsets must equal them
        (a compact scratch gives wrong dQ).
    """
    prefix, causal, starts = (np.asarray(a, np.int64) for a in (prefix, causal, starts))
    passes = {}
    has_p, has_c = prefix > 0, causal > 0
    if not backward:
        if has_p.any():
            p = prefix[has_p]
            passes["prefix"] = PassRows(starts[has_p], p, starts[has_p], p)
        if has_c.any():
            passes["causal"] = PassRows(starts[has_c] + prefix[has_c], causal[has_c],
                                        starts[has_c], prefix[has_c] + causal[has_c])
        return passes
    if has_p.any():
        passes["full"] = PassRows(starts[has_p], prefix[has_p] + causal[has_p], starts[has_p],
                                  prefix[has_p])
    for name, sel in (("causal_only", has_c & ~has_p), ("causal_scratch", has_c & has_p)):
        if sel.any():
            c, first = causal[sel], starts[sel] + prefix[sel]
            passes[name] = PassRows(first, c, first, c)
    return passes


def query_rows(rows: PassRows) -> np.ndarray:
    """Packed row of every query of a pass (the rows "causal_scratch" adds onto dQ)."""
    first = np.concatenate([[0], np.cumsum(rows.q_lens)[:-1]]).astype(np.int64)
    return (np.repeat(rows.q_rows - first, rows.q_lens)
            + np.arange(int(rows.q_lens.sum()), dtype=np.int64))


def offset_columns(rows: PassRows, slots: int, strides: dict) -> dict:
    """Host columns of one pass, padded to `slots` samples: int32 lengths (slots,) and int64
    element offsets (slots + 1,) = row * the operand's token stride. Padding slots have length 0
    and sit at the end of the last listed sample, so offsets stay non-decreasing and the largest
    offset plus its length never exceeds the packed rows."""
    pad = slots - rows.count
    if pad < 0:
        raise ValueError(f"{rows.count} samples do not fit {slots} slots")

    def lens(a):
        return np.concatenate([a, np.zeros(pad, np.int64)]).astype(np.int32)

    def offs(first, count):
        end = int((first + count).max()) if rows.count else 0
        return np.concatenate([first, np.full(pad + 1, end, np.int64)])

    q = offs(rows.q_rows, rows.q_lens)
    kv = offs(rows.kv_rows, rows.kv_lens)
    dq = offs(rows.dq_rows, rows.q_lens)
    cols = {_LEN_Q: lens(rows.q_lens), _LEN_KV: lens(rows.kv_lens)}
    for uid, base in ((_OFF_Q, q), (_OFF_K, kv), (_OFF_V, kv), (_OFF_O, q), (_OFF_STATS, q),
                      (_OFF_DQ, dq), (_OFF_DK, kv), (_OFF_DV, kv)):
        if uid in strides:
            cols[uid] = base * strides[uid]
    return cols


def _to_device(columns: list, device) -> list:
    """One pinned host buffer, one host-to-device copy; every column starts 16-byte aligned."""
    device = torch.device(device)
    layout, pos = [], 0
    for col in columns:
        words = (col.nbytes + 15) // 16 * 2  # int64 words, rounded to 16 bytes
        layout.append((pos, col))
        pos += max(words, 2)
    host = torch.empty(max(pos, 2), dtype=torch.int64, pin_memory=device.type == "cuda")
    buf = host.numpy()
    for start, col in layout:
        buf[start:].view(col.dtype)[: len(col)] = col
    dev = to_device(host, device)
    out = []
    for start, col in layout:
        part = dev[start:].view(torch.int32 if col.dtype == np.int32 else torch.int64)
        out.append(part[: len(col)])
    return out


# --------------------------------------------------------------------------------------------------
# Graphs
# --------------------------------------------------------------------------------------------------

def _handle(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    handle = _handles.get(index)
    if handle is None:
        with torch.cuda.device(index):
            handle = _handles[index] = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return handle


def _thd(g, name, uid, slots, heads, seq, dim, token_stride, head_stride, dtype, ragged_uid):
    """A packed (T, H, D) operand declared as (B, H, S, D); the ragged offset places each sample."""
    off = g.tensor(name=f"{name}_off", dim=[slots + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                   data_type=cudnn.data_type.INT64, uid=ragged_uid)
    t = g.tensor(name=name, dim=[slots, heads, seq, dim],
                 stride=[seq * token_stride, head_stride, token_stride, 1], data_type=dtype,
                 uid=uid)
    t.set_ragged_offset(off)
    return t, off


def _mask_kwargs(causal: bool):
    if not causal:
        return {}
    return dict(diagonal_alignment=cudnn.diagonal_alignment.BOTTOM_RIGHT,
                diagonal_band_right_bound=0)


def _finish(g):
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, int(g.get_workspace_size())


def _build(key, handle):
    (kind, causal, dtype, hq, hkv, d, slots, sq, skv, strides, scale, det, total,
     stats_mode) = key
    io = cudnn.data_type.HALF if dtype == torch.float16 else cudnn.data_type.BFLOAT16
    g = cudnn.pygraph(handle=handle, io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT)
    (qs, qh), (ks, kh), (vs, vh) = strides
    q, _ = _thd(g, "q", _Q, slots, hq, sq, d, qs, qh, io, _OFF_Q)
    k, _ = _thd(g, "k", _K, slots, hkv, skv, d, ks, kh, io, _OFF_K)
    v, _ = _thd(g, "v", _V, slots, hkv, skv, d, vs, vh, io, _OFF_V)
    len_q = g.tensor(name="len_q", dim=[slots, 1, 1, 1], stride=[1, 1, 1, 1],
                     data_type=cudnn.data_type.INT32, uid=_LEN_Q)
    len_kv = g.tensor(name="len_kv", dim=[slots, 1, 1, 1], stride=[1, 1, 1, 1],
                      data_type=cudnn.data_type.INT32, uid=_LEN_KV)
    stats_dim = [slots, hq, sq, 1]
    ragged_stride = [sq * hq, 1, hq, 1]  # (T, Hq) token-major, ragged like the rows
    packed = dict(seq_len_q=len_q, seq_len_kv=len_kv, use_padding_mask=True, attn_scale=scale,
                  **_mask_kwargs(causal))
    if kind == "fwd":
        o, stats = g.sdpa(name="prefixlm_fwd", q=q, k=k, v=v, generate_stats=True, **packed)
        o_off = g.tensor(name="o_off", dim=[slots + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                         data_type=cudnn.data_type.INT64, uid=_OFF_O)
        o.set_uid(_O).set_output(True).set_dim([slots, hq, sq, d]).set_stride(
            [sq * hq * d, d, hq * d, 1]).set_data_type(io)
        o.set_ragged_offset(o_off)
        s_off = g.tensor(name="stats_off", dim=[slots + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                         data_type=cudnn.data_type.INT64, uid=_OFF_STATS)
        stats.set_uid(_STATS).set_output(True).set_dim(stats_dim).set_stride(
            ragged_stride).set_data_type(cudnn.data_type.FLOAT)
        stats.set_ragged_offset(s_off)
        return _finish(g)

    o, _ = _thd(g, "o", _O, slots, hq, sq, d, hq * d, d, io, _OFF_O)
    do, _ = _thd(g, "dO", _DO, slots, hq, sq, d, hq * d, d, io, _OFF_DO)
    if stats_mode == "ragged":
        stats, _ = _thd(g, "stats", _STATS, slots, hq, sq, 1, hq, 1, cudnn.data_type.FLOAT,
                        _OFF_STATS)
    else:
        stats = g.tensor(name="stats", dim=stats_dim, stride=[hq * sq, sq, 1, 1],
                         data_type=cudnn.data_type.FLOAT, uid=_STATS)
    dq, dk, dv = g.sdpa_backward(name="prefixlm_bwd", q=q, k=k, v=v, o=o, dO=do, stats=stats,
                                 max_total_seq_len_q=total, max_total_seq_len_kv=total,
                                 use_deterministic_algorithm=det, **packed)
    for t, uid, off_uid, heads in ((dq, _DQ, _OFF_DQ, hq), (dk, _DK, _OFF_DK, hkv),
                                   (dv, _DV, _OFF_DV, hkv)):
        seq = sq if t is dq else skv
        t.set_uid(uid).set_output(True).set_dim([slots, heads, seq, d]).set_stride(
            [seq * heads * d, d, heads * d, 1]).set_data_type(io)
        off = g.tensor(name=f"d{uid}_off", dim=[slots + 1, 1, 1, 1], stride=[1, 1, 1, 1],
                       data_type=cudnn.data_type.INT64, uid=off_uid)
        t.set_ragged_offset(off)
    return _finish(g)


def _graph(key, device):
    entry = _graphs.get(key)
    if entry is None:
        with _lock:
            entry = _graphs.get(key)
            if entry is None:
                start = time.perf_counter()
                entry = _graphs[key] = _build(key, _handle(device))
                _build_seconds.append(time.perf_counter() - start)
    return entry


# --------------------------------------------------------------------------------------------------
# Forward and backward
# --------------------------------------------------------------------------------------------------

def _packed(t):
    """(T, H, D) with unit last stride, a 16-byte aligned base and heads packed; fused-projection
    slices (token stride > H * D) keep their layout, anything else is copied."""
    heads, dim = t.shape[1], t.shape[2]
    if (t.stride(-1) != 1 or t.stride(1) != dim or t.stride(0) < heads * dim or t.stride(0) % 8
            or t.data_ptr() % 16):
        t = t.contiguous()
    return t


def _key(kind, causal, q, k, v, rows, scale, det=False, total=0, stats_mode=""):
    """Shape class of one pass: what `_build` needs, nothing batch-specific beyond the buckets."""
    strides = tuple((t.stride(0), t.stride(1)) for t in (q, k, v))
    return (kind, causal, q.dtype, q.shape[1], k.shape[1], q.shape[2], bucket(rows.count, 4),
            bucket(rows.max_q, 64), bucket(rows.max_kv, 64), strides, float(scale), det, total,
            stats_mode)


def _host_meta(meta):
    n = meta.used_slots
    return meta.prefix_host[:n], meta.causal_host[:n], meta.starts_host[:n]


def _workspace(size, device):
    return torch.empty(max(size, 1), dtype=torch.uint8, device=device)


def forward(q, k, v, meta, softmax_scale):
    q, k, v = _packed(q), _packed(k), _packed(v)
    rows_t, hq, d = q.shape
    out = torch.empty(rows_t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q), dtype=torch.float32, device=q.device)
    passes = pass_rows(*_host_meta(meta), backward=False)
    if passes:
        strides = {_OFF_Q: q.stride(0), _OFF_K: k.stride(0), _OFF_V: v.stride(0),
                   _OFF_O: hq * d, _OFF_STATS: hq}
        plan = []
        for name, rows in passes.items():
            key = _key("fwd", name == "causal", q, k, v, rows, softmax_scale)
            plan.append((key, offset_columns(rows, key[6], strides)))
        device_cols = iter(_to_device([c for _, cols in plan for c in cols.values()], q.device))
        handle = _handle(q.device)
        for key, cols in plan:
            g, ws = _graph(key, q.device)
            pack = {_Q: q, _K: k, _V: v, _O: out, _STATS: lse}
            pack.update((uid, next(device_cols)) for uid in cols)
            g.execute(pack, _workspace(ws, q.device), handle=handle)
    # No pass writes the padding tail's LSE; 0 there keeps the op's outputs defined (repeated
    # runs agree, as torch.library.opcheck checks). The backward never reads those rows.
    out[meta.total:].zero_()
    lse[meta.total:].zero_()
    return out, lse


def _padded_stats(lse, q_offsets, slots, sq, hq):
    """(slots, Hq, S, 1) copy of the ragged (T, Hq) LSE, for the "padded" backward Stats mode."""
    rows = q_offsets[:slots] // hq
    idx = (rows[:, None] + torch.arange(sq, device=lse.device)).clamp_(max=lse.shape[0] - 1)
    return lse[idx].permute(0, 2, 1).contiguous().unsqueeze(-1)


def _bwd_graph(key, device):
    """The backward graph of `key`, with ragged Stats unless this cuDNN rejects them for it."""
    base = key[:-1]
    mode = _bwd_stats_modes.get(base, "ragged")
    if mode == "ragged":
        try:
            return _graph(base + ("ragged",), device), "ragged"
        except Exception:  # noqa: BLE001 -- this class gathers its Stats from now on
            _bwd_stats_modes[base] = "padded"
    return _graph(base + ("padded",), device), "padded"


def backward(dout, q, k, v, out, lse, meta, softmax_scale, deterministic):
    q, k, v = _packed(q), _packed(k), _packed(v)
    if q.stride(0) != q.shape[1] * q.shape[2]:
        q = q.contiguous()  # dQ's offsets must equal Q's (see pass_rows): same token stride
    dout = dout.contiguous()
    rows_t, hq, d = q.shape
    hkv = k.shape[1]
    dq = torch.empty(rows_t, hq, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(rows_t, hkv, d, dtype=q.dtype, device=q.device)
    dv = torch.empty(rows_t, hkv, d, dtype=q.dtype, device=q.device)
    passes = pass_rows(*_host_meta(meta), backward=True)
    if passes:
        strides = {_OFF_Q: q.stride(0), _OFF_K: k.stride(0), _OFF_V: v.stride(0),
                   _OFF_O: hq * d, _OFF_STATS: hq, _OFF_DQ: hq * d, _OFF_DK: hkv * d,
                   _OFF_DV: hkv * d}
        # "full" before "causal_scratch": the combine adds the scratch onto what "full" wrote.
        names = [n for n in ("full", "causal_only", "causal_scratch") if n in passes]
        plan, columns = [], []
        for name in names:
            # The dQ accumulator is sized by the packed row count, not by the pass's own rows.
            key = _key("bwd", name != "full", q, k, v, passes[name], softmax_scale,
                       bool(deterministic), round64(rows_t))
            cols = offset_columns(passes[name], key[6], strides)
            plan.append((name, key, list(cols)))
            columns.extend(cols.values())
        scratch = passes.get("causal_scratch")
        if scratch is not None:
            columns.append(query_rows(scratch))
        device_cols = _to_device(columns, q.device)
        handle = _handle(q.device)
        pos = 0
        for name, key, uids in plan:
            cols = dict(zip(uids, device_cols[pos:pos + len(uids)]))
            pos += len(uids)
            (g, ws), stats_mode = _bwd_graph(key, q.device)
            grad_q = dq
            if name == "causal_scratch":  # not memset: only the rows combined below are read
                grad_q = torch.empty_like(dq)
            pack = {_Q: q, _K: k, _V: v, _O: out, _DO: dout, _DQ: grad_q, _DK: dk, _DV: dv,
                    _OFF_DO: cols[_OFF_O], **cols}
            if stats_mode == "ragged":
                pack[_STATS] = lse
            else:
                pack[_STATS] = _padded_stats(lse, pack.pop(_OFF_STATS), key[6], key[7], hq)
            g.execute(pack, _workspace(ws, q.device), handle=handle)
            if name == "causal_scratch":
                # These causal rows got dQ from both their keys' halves: prefix keys ("full")
                # and causal keys (the scratch). Gather, add, scatter: no atomics, no K/V-sized
                # memset, no full-tensor add.
                rows = device_cols[-1]
                summed = dq.index_select(0, rows).add_(grad_q.index_select(0, rows))
                dq.index_copy_(0, rows, summed)
    for grad in (dq, dk, dv):
        grad[meta.total:].zero_()
    # cuDNN takes rowsum(dO * O) from the 16-bit O, which dominates dS in 1-2 token samples.
    exact_grads_of_short_samples(dq, dk, dv, q, k, v, dout, meta, softmax_scale)
    return dq, dk, dv
