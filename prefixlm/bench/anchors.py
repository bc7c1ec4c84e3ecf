"""Benchmark anchors that are not backends: FlashAttention-4's two-pass PrefixLM (`flash-attn-4`,
CuTe DSL; `pip install flash-attn-4==4.0.0b36` with its CuTe DSL stack).

The decomposition is `attention/backends/fa3.py`'s, on FA4's varlen kernels (per sample: start a, prefix p, causal
count c, length L = p + c; scale s):
  pass 1 (bidirectional): queries and keys [a, a + p): cu_seqlens as is, seqused_q = seqused_k = p;
  pass 2 (causal): queries [a + p, a + L), keys [a, a + L): cu_seqlens_q shifted by the prefixes,
    seqused_q = c, seqused_k = L, causal (FA4 aligns it bottom-right: causal query j sees the prefix
    and causal keys 0..j).
  O = softmax(s Q K^T + mask) V per pass, written into disjoint rows of one buffer; each pass keeps
  its own LSE (natural log, (Hq, T), defined on its query rows only).
Backward, per pass: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO * O)), dQ = s dS K,
dK = s dS^T Q; combined as `fa3.backward` does: pass 2 writes dQ of causal rows and dK/dV of every
row of samples with causal tokens, pass 1 adds dK/dV of those samples' prefix rows and copies
dQ, dK, dV of prefix rows otherwise.

FA4 has `mask_mod` with varlen in its forward, but no block-sparse varlen backward, so a one-pass
PrefixLM backward is not available through it: two passes is its anchor.
"""

from __future__ import annotations

import torch

from ..attention.backends import cudnn_flex
from ..attention.backends.fa3 import _passes, add_prefix_pass
from ..attention.seqinfo import BatchMeta

_fa4 = None
_FA4_ERROR = None


def _fa4_interface():
    """flash_attn.cute.interface, or None (the reason is kept in `_FA4_ERROR`)."""
    global _fa4, _FA4_ERROR
    if _fa4 is None and _FA4_ERROR is None:
        try:
            from flash_attn.cute import interface
            _fa4 = interface
        except Exception as exc:  # noqa: BLE001 -- ImportError, or the CuTe DSL failing to load
            _FA4_ERROR = (f"flash_attn.cute (flash-attn-4) is not importable: "
                          f"{type(exc).__name__}: {exc}"[:300])
    return _fa4


def fa4_unavailable_reason() -> str | None:
    if not torch.cuda.is_available():
        return "FlashAttention-4 needs a CUDA GPU"
    if _fa4_interface() is None:
        return _FA4_ERROR
    major = torch.cuda.get_device_capability()[0]
    if major not in (9, 10, 11):
        return f"FlashAttention-4's backward runs on sm90/sm100/sm110, this GPU is sm{major}x"
    return None


def _forward(fa4, q, k, v, meta, scale, passes, with_lse: bool):
    """Both passes into one output; returns (out, [LSE of pass 1, LSE of pass 2]), None for a
    pass that did not run or when `with_lse` is off."""
    out = torch.empty_like(q)
    lses = [None, None]
    for i, (name, causal) in enumerate((("prefix", False), ("causal", True))):
        if passes[name]["max_seqlen_q"] == 0:  # no queries in this pass: FA4 is never called
            continue
        _, lse, *_ = fa4._flash_attn_fwd(q, k, v, out=out, softmax_scale=scale, causal=causal,
                                         return_lse=with_lse, **passes[name])
        lses[i] = lse
    out[meta.total:].zero_()
    return out, lses


def _backward(fa4, dout, q, k, v, out, lses, meta, scale, passes):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def run(name, causal, lse, dq_, dk_, dv_):
        fa4._flash_attn_bwd(q, k, v, out, dout, lse, softmax_scale=scale, causal=causal,
                            dq=dq_, dk=dk_, dv=dv_, **passes[name])

    if meta.max_causal > 0:
        run("causal", True, lses[1], dq, dk, dv)
    if meta.max_prefix > 0:
        dq1, dk1, dv1 = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        run("prefix", False, lses[0], dq1, dk1, dv1)
        add_prefix_pass(meta, (dq, dk, dv), (dq1, dk1, dv1))
    for grad in (dq, dk, dv):
        grad[meta.total:].zero_()
    return dq, dk, dv


def fa4_two_pass_runner(inp, backward: bool):
    """A no-argument callable timing FA4's two passes on the bench inputs `inp` (`spec.AttentionBatch`):
    the forward, or forward + backward with the gradient `inp.dout`. FA4's interface functions
    are called directly (as `fa3.py` calls FA3's op) so both passes share one output buffer."""
    fa4 = _fa4_interface()
    meta = BatchMeta.from_info(inp.info)
    passes = _passes(meta)
    scale = inp.case.head_dim ** -0.5
    q, k, v = inp.q, inp.k, inp.v

    if not backward:
        def fwd():
            _forward(fa4, q, k, v, meta, scale, passes, with_lse=False)
        return fwd

    def fwd_bwd():
        out, lses = _forward(fa4, q, k, v, meta, scale, passes, with_lse=True)
        _backward(fa4, inp.dout, q, k, v, out, lses, meta, scale, passes)
    return fwd_bwd


def fa4_two_pass(q, k, v, dout, info, softmax_scale=None):
    """(out, dq, dk, dv) of FA4's two passes on one batch, for checking the anchor against the
    reference (bench/gpu_attention_session.sh does); dout None gives the forward only."""
    fa4 = _fa4_interface()
    meta = BatchMeta.from_info(info)
    passes = _passes(meta)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    out, lses = _forward(fa4, q, k, v, meta, scale, passes, with_lse=dout is not None)
    if dout is None:
        return out, None, None, None
    return (out, *_backward(fa4, dout.contiguous(), q, k, v, out, lses, meta, scale, passes))


def cudnn_flex_plan_cost(fn, info) -> dict:
    """The per-batch cost of the cudnn_flex plan (its host sync included): the wall time of a call
    `fn` on batch `info` with its plans dropped, once the kernels are compiled (a first call
    compiles them); the difference to the steady-state time of `fn` is the plan's."""
    import time

    fn()  # JIT compiles, builds the plan
    cudnn_flex.forget_plans(info)
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return dict(plan_call_ms=(time.perf_counter() - start) * 1e3)


__all__ = ["cudnn_flex_plan_cost", "fa4_two_pass", "fa4_two_pass_runner",
           "fa4_unavailable_reason"]

