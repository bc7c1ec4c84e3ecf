"""`backend="cudnn_flex"`: PrefixLM attention in one pass on cuDNN's interval-mask attention,
`cudnn.flex_attention` (nvidia-cudnn-frontend >= 1.32, experimental; CuTe DSL kernels for sm90 and
sm100, FlashAttention-3-derived on sm90: `pip install "nvidia-cudnn-frontend>=1.32"
"nvidia-cutlass-dsl[cu13]>=4.8" apache-tvm-ffi torch-c-dlpack-ext`).

Per sample (length L, prefix p), query head h reading key/value head h // G, scale s, sample-local
query i: the visible keys are one interval

    [0, F_i),  F_i = max(p, i + 1)        (mask.py's rule: key j < p or j <= i)

  O_i = sum_{j < F_i} P_ij V_j,  P_ij = exp(s Q_i.K_j - LSE_i),  LSE_i = log sum_{j < F_i} exp(...)
  backward: D_i = rowsum(dO_i * O_i), dP = dO V^T, dS = P (dP - D),
            dQ = s dS K, dK = s dS^T Q, dV = P^T dO (dK, dV summed over the G heads).

The library takes the mask as int32 endpoints `mask_func[Hmask, nfunc, total_q]` (visible keys
[0, F0) U [F1, F2) U ..., sample-local); PrefixLM needs Hmask = 1 (every head) and nfunc = 1
(F0 = F_i above). `create_mask_plan` turns them into block-sparse metadata (full tiles run
unmasked, the diagonal / prefix-end tiles get bit masks) for forward and backward; it reads a small
header back to the host (one blocking copy per plan in frontend 1.32), so a plan is built once per
batch and shared by every layer's forward and backward. The plan binds the geometry: its
cu_seqlens must end at the rows it is given, so the kernels see the sample rows q[:total] only and
the padding tail is zeroed here. The op's LSE is one flat (Hq * T) buffer whose first
Hq * total entries are the library's (Hq, total) LSE (the rest 0).

The backward takes D_i from the 16-bit O (the library's preprocess kernel), so rows of samples of at
most 32 tokens get exact fp32 gradients afterwards (`short_samples`), as in the other two-pass
backends. `deterministic=True` selects the library's deterministic backward (ordered dQ).

Plans live in the batch's cache (`seqinfo.batch_cache`: built once per batch and head geometry,
freed with the batch). `prepare(info, inputs)` builds the batch's plan before the layers run, so the
host sync happens before any layer is queued; a forward inside the op cannot see whether a backward
will follow (the op runs below autograd), so its plans carry backward data for every geometry this
process has already run backward on.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ...devices import to_device
from ..seqinfo import BatchMeta, batch_cache
from .short_samples import exact_grads_of_short_samples

NAME = "cudnn_flex"
USES_OP = True

_DTYPES = (torch.float16, torch.bfloat16)
_HEAD_DIMS = (64, 128)  # the sizes verified here (the library takes 8..128 in steps of 8 and more)
_ARCHES = ((9, 0), (10, 0), (10, 3))

# The frontend is imported on first use: `import prefixlm` stays light and CPU machines without it
# still import this module.
flex = None
_IMPORT_ERROR = None
_loaded = False
_lock = threading.Lock()
# Head geometries this process has run a backward on: forward plans for them carry backward data.
_backward_geometries: set = set()
_plans_built = 0


def _load():
    """The `cudnn.flex_attention` module, or None (the reason is kept in `_IMPORT_ERROR`)."""
    global flex, _IMPORT_ERROR, _loaded
    if not _loaded:
        _loaded = True
        try:
            import cudnn
        except Exception as exc:  # noqa: BLE001 -- ImportError, or OSError loading libcudnn
            _IMPORT_ERROR = (f"the cuDNN frontend is not importable (pip install "
                             f"'nvidia-cudnn-frontend>=1.32'): {type(exc).__name__}: {exc}")
            return None
        try:
            import cudnn.flex_attention as module
            flex = module
        except ModuleNotFoundError as exc:
            version = getattr(cudnn, "__version__", "?")
            if exc.name and exc.name.split(".")[0] in ("cutlass", "tvm_ffi", "cuda",
                                                       "torch_c_dlpack_ext"):
                _IMPORT_ERROR = (f"cudnn.flex_attention needs the CuTe DSL stack, missing "
                                 f"{exc.name!r} (pip install 'nvidia-cutlass-dsl[cu13]>=4.8' "
                                 f"apache-tvm-ffi torch-c-dlpack-ext; with pip --target, put "
                                 f"<target>/nvidia_cutlass_dsl/dsl_packages on PYTHONPATH)")
            else:
                _IMPORT_ERROR = (f"cudnn.flex_attention is missing from nvidia-cudnn-frontend "
                                 f"{version} (needs >= 1.32): {exc}")
        except Exception as exc:  # noqa: BLE001 -- a DSL or driver mismatch at import
            _IMPORT_ERROR = f"cudnn.flex_attention failed to import: {type(exc).__name__}: {exc}"
    return flex


def unavailable_reason(inputs):
    if inputs.device.type != "cuda":
        return f"cudnn.flex_attention needs a CUDA device, got {inputs.device.type}"
    capability = torch.cuda.get_device_capability(inputs.device)
    if capability not in _ARCHES:
        return (f"cudnn.flex_attention runs on sm90, sm100 and sm103 only, this GPU is "
                f"sm{capability[0]}{capability[1]}")
    if inputs.dtype not in _DTYPES:
        return f"cudnn.flex_attention supports float16/bfloat16, got {inputs.dtype}"
    if inputs.head_dim not in _HEAD_DIMS:
        return (f"head_dim must be one of {_HEAD_DIMS} for the cudnn_flex backend, got "
                f"{inputs.head_dim}")
    if _load() is None:
        return _IMPORT_ERROR
    return None


def lse_shape(q):
    # Flat, so that its first Hq * total entries are the library's contiguous (Hq, total) LSE.
    return (q.shape[1] * q.shape[0],)


# --------------------------------------------------------------------------------------------------
# Host side: the interval mask and the plan's geometry (numpy and torch only, testable on a CPU)
# --------------------------------------------------------------------------------------------------

def visible_key_ends(prefix, causal) -> np.ndarray:
    """(total,) int32: F of every packed row, the end of its sample-local visible key interval
    [0, F) = [0, max(p, i + 1)) for row i of a sample with prefix p."""
    prefix, causal = (np.asarray(a, np.int64) for a in (prefix, causal))
    lens = prefix + causal
    total = int(lens.sum())
    starts = np.cumsum(lens) - lens
    local = np.arange(total, dtype=np.int64) - np.repeat(starts, lens)
    return np.maximum(np.repeat(prefix, lens), local + 1).astype(np.int32)


def mask_func(meta, device) -> torch.Tensor:
    """The library's `mask_func` for the batch: (1, 1, total) int32 on `device` (Hmask = 1: shared
    by every head; nfunc = 1: one interval per row), copied from pinned memory without a sync."""
    ends = torch.from_numpy(visible_key_ends(meta.prefix_host, meta.causal_host))
    return to_device(ends, device).view(1, 1, -1)


def plan_geometry(meta):
    """(cu_seqlens, total, max_seqlen) the plan is built on: the used sample slots only, so that
    cu_seqlens ends at `total` (the library requires it to end at the rows it gets) and empty
    padding slots cost nothing."""
    return meta.cu_seqlens[:meta.used_slots + 1], meta.total, meta.max_seqlen


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t if the kernels can read it in place (unit last stride, other strides multiples of 16
    bytes, 16-byte aligned base); a contiguous copy otherwise (e.g. views of an unpadded fused
    q/k/v/gate projection)."""
    step = 16 // t.element_size()
    if (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(s % step == 0 for s in t.stride()[:-1])):
        return t
    return t.contiguous()


# --------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------

def _signature(*tensors):
    return tuple((tuple(t.shape), tuple(t.stride()), t.dtype) for t in tensors)


class _Plan:
    """A batch's MaskPlan and the compiled forward/backward runners of the tensor layouts it met."""

    def __init__(self, mask_plan, has_backward: bool):
        self.mask_plan = mask_plan
        self.has_backward = has_backward
        self.runners: dict = {}

    def forward_runner(self, q, k, v, o, lse):
        key = ("fwd", _signature(q, k, v, o, lse))
        runner = self.runners.get(key)
        if runner is None:
            runner = flex.FlexAttentionFwd(q, k, v, o, self.mask_plan, lse)
            runner.check_support()
            runner.compile()  # kernels come from the library's JIT cache after the first batch
            self.runners[key] = runner
        return runner

    def backward_runner(self, q, k, v, o, do, lse, dq, dk, dv, deterministic: bool):
        key = ("bwd", deterministic, _signature(q, k, v, o, do, lse, dq, dk, dv))
        runner = self.runners.get(key)
        if runner is None:
            runner = flex.FlexAttentionBwd(q, k, v, o, do, lse, dq, dk, dv, self.mask_plan,
                                           deterministic=deterministic)
            runner.check_support()
            runner.compile()
            self.runners[key] = runner
        return runner


def _build_plan(meta, q, k, v, build_backward: bool) -> _Plan:
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("cudnn_flex builds a batch's plan with a host sync, which cannot run "
                           "while a CUDA graph is captured: run the batch once (or "
                           "prepare_attention) before capturing")
    cu, total, max_seqlen = plan_geometry(meta)
    plan = flex.create_mask_plan(mask_func(meta, q.device), q, k, v, cu_seqlens_q=cu,
                                 cu_seqlens_k=cu, max_seqlen_q=int(max_seqlen),
                                 max_seqlen_k=int(max_seqlen), build_backward=build_backward)
    return _Plan(plan, build_backward)


def _plan(meta, q, k, v, *, backward: bool) -> _Plan:
    """The batch's plan for the rows q[:total] (q, k, v here are those rows), from the batch's cache
    or built now; rebuilt with backward data when a forward-only one meets a backward."""
    global _plans_built
    geometry = (str(q.device), q.dtype, q.shape[1], k.shape[1], q.shape[2])
    cache = batch_cache(meta.host_lens)
    with _lock:
        if backward:
            _backward_geometries.add(geometry)
        entry = cache.get(("cudnn_flex_plan", geometry))
        if entry is None or (backward and not entry.has_backward):
            entry = _build_plan(meta, q, k, v, backward or geometry in _backward_geometries)
            cache[("cudnn_flex_plan", geometry)] = entry
            _plans_built += 1
        return entry


def prepare(info, inputs) -> None:
    """Build the batch's plan now, for the q, k, v that `inputs` describes, before the layers."""
    if _load() is None or info.total == 0:
        return
    meta = BatchMeta.from_info(info)
    # Stand-ins with the geometry of the layers' q[:total], k, v: the planner reads shapes, dtype
    # and device only (zero strides keep them from allocating the rows).
    q = torch.empty(inputs.head_dim, dtype=inputs.dtype, device=info.device).expand(
        info.total, inputs.q_heads, inputs.head_dim)
    k = torch.empty(inputs.head_dim, dtype=inputs.dtype, device=info.device).expand(
        info.total, inputs.kv_heads, inputs.head_dim)
    _plan(meta, q, k, k, backward=inputs.requires_grad)


def plans_built() -> int:
    """Plans built so far in this process (for the benchmark's plan-cost record)."""
    return _plans_built


def forget_plans(info) -> None:
    """Drop the plans of batch `info`, so that its next call builds them again (the benchmark
    times that call)."""
    cache = batch_cache(info.host_lens)
    with _lock:
        for key in [key for key in cache if key[0] == "cudnn_flex_plan"]:
            del cache[key]


# --------------------------------------------------------------------------------------------------
# Forward and backward (inside the custom op)
# --------------------------------------------------------------------------------------------------

def _sample_rows(meta, *tensors):
    return [_aligned(t[:meta.total]) for t in tensors]


def _lse_view(lse, hq, total):
    return lse[:hq * total].view(hq, total)


def forward(q, k, v, meta, softmax_scale):
    rows, hq, d = q.shape
    out = torch.empty((rows, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape(q), dtype=torch.float32, device=q.device)
    total = meta.total
    if total:
        q_, k_, v_ = _sample_rows(meta, q, k, v)
        # Eager calls still see requires_grad here; a compiled graph's call does not, which the
        # process-wide memory of backward geometries in `_plan` covers.
        needs_grad = any(t.requires_grad for t in (q, k, v))
        plan = _plan(meta, q_, k_, v_, backward=needs_grad)
        o_, lse_ = out[:total], _lse_view(lse, hq, total)
        runner = plan.forward_runner(q_, k_, v_, o_, lse_)
        workspace = (torch.empty(runner.workspace_size, dtype=torch.uint8, device=q.device)
                     if runner.workspace_size else None)
        runner.execute(q_, k_, v_, o_, plan.mask_plan, lse_, workspace=workspace,
                       softmax_scale=softmax_scale)
    # Rows past the last sample: output 0; LSE 0 keeps the op's outputs fully defined.
    out[total:].zero_()
    lse[hq * total:].zero_()
    return out, lse


def backward(dout, q, k, v, out, lse, meta, softmax_scale, deterministic):
    rows, hq, d = q.shape
    dq = torch.empty((rows, hq, d), dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    total = meta.total
    if total:
        q_, k_, v_, o_, do_ = _sample_rows(meta, q, k, v, out, dout)
        plan = _plan(meta, q_, k_, v_, backward=True)
        lse_ = _lse_view(lse, hq, total)
        dq_, dk_, dv_ = dq[:total], dk[:total], dv[:total]
        runner = plan.backward_runner(q_, k_, v_, o_, do_, lse_, dq_, dk_, dv_,
                                      bool(deterministic))
        workspace = torch.empty(max(runner.workspace_size, 1), dtype=torch.uint8, device=q.device)
        runner.execute(q_, k_, v_, o_, do_, lse_, dq_, dk_, dv_, plan.mask_plan,
                       workspace=workspace, softmax_scale=softmax_scale)
    for grad in (dq, dk, dv):
        grad[total:].zero_()
    # The library takes rowsum(dO * O) from the 16-bit O, which dominates dS in 1-2 token samples.
    exact_grads_of_short_samples(dq, dk, dv, q, k, v, dout, meta, softmax_scale)
    return dq, dk, dv
