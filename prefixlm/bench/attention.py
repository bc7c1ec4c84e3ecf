"""`prefixlm bench attention`: every case of bench_spec.md for every available method, side by side.

Methods: `triton` (this package's fused kernels), `cudnn` (the two-pass cuDNN backend; its records
also carry the graph-building cost of a first call on an empty graph cache), `flex`
(FlexAttention, document + prefix block mask, compiled), `cudnn_flex` (cudnn.flex_attention, one
pass with an interval mask; its plan is built by the warm-up, once per batch as in training),
`fa4` (FlashAttention-4's two passes, `bench.anchors`), `sdpa_padded` (SDPA on the batch padded
to its longest sample with a boolean mask; the gather into the padded layout is outside the timed
region), and, when `flash_attn_interface` imports,
`fa3` (the two-pass forward, both FA3 kernels called directly) and the bounds `fa3_causal` / `fa3_full` (FA3 varlen forward over the
same samples, plain causal or full). Timing: CUDA events around each call, warm-up first, median of
`iters` (>= 20) runs. Useful FLOPs count allowed (q, k) pairs only: forward = 4 * pairs * D * Hq,
forward + backward = 3.5 x forward (bench_spec.md).
"""

from __future__ import annotations

import datetime
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..attention import AttentionInputs, BatchMeta, prefixlm_attention
from ..attention.backends import cudnn as cudnn_backend
from ..attention.backends import cudnn_flex
from ..attention.mask import dense_tiles
from .spec import CASES, AttentionBatch, package_version, time_ms

__all__ = ["METHODS", "FWD_ONLY", "run_attention_bench", "sweep_configs"]

METHODS = ("triton", "cudnn", "cudnn_flex", "flex", "sdpa_padded", "fa3", "fa4", "fa3_causal",
           "fa3_full")
FWD_ONLY = ("fa3", "fa3_causal", "fa3_full")


def _fa3_module():
    try:
        import flash_attn_interface
    except ImportError:
        return None
    return flash_attn_interface


def _api_runner(inp: AttentionBatch, backend: str, backward: bool):
    if not backward:
        def fwd():
            with torch.no_grad():
                prefixlm_attention(inp.q, inp.k, inp.v, inp.info, backend=backend)
        return fwd
    leaves = [t.detach().requires_grad_() for t in (inp.q, inp.k, inp.v)]

    def fwd_bwd():
        out = prefixlm_attention(*leaves, inp.info, backend=backend)
        torch.autograd.grad(out, leaves, inp.dout)
    return fwd_bwd


def _sdpa_padded_runner(inp: AttentionBatch, backward: bool):
    lens = np.asarray(inp.prefix) + np.asarray(inp.causal)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    tiles = dense_tiles(starts, lens, inp.prefix, inp.q.device)
    mask = tiles.allowed[:, None]
    qb, kb, vb, dob = (t[tiles.gather].transpose(1, 2).contiguous()
                       for t in (inp.q, inp.k, inp.v, inp.dout))
    gqa = inp.case.q_heads != inp.case.kv_heads

    if not backward:
        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa)
        return fwd
    leaves = [t.requires_grad_() for t in (qb, kb, vb)]

    def fwd_bwd():
        out = F.scaled_dot_product_attention(*leaves, attn_mask=mask, enable_gqa=gqa)
        torch.autograd.grad(out, leaves, dob)
    return fwd_bwd


def _fa3_bound_runner(inp: AttentionBatch, causal: bool):
    fa3 = _fa3_module()
    info = inp.info
    cu = info.cu_seqlens[: info.num_samples + 1]
    q, k, v = (t[: info.total] for t in (inp.q, inp.k, inp.v))

    def fwd():
        fa3._flash_attn_forward(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                max_seqlen_q=info.max_seqlen, max_seqlen_k=info.max_seqlen,
                                softmax_scale=inp.case.head_dim ** -0.5, causal=causal)
    return fwd


def _runner(method: str, inp: AttentionBatch, backward: bool):
    if method in ("triton", "cudnn", "cudnn_flex", "flex", "fa3"):  # fa3: two passes, via the op
        return _api_runner(inp, method, backward)
    if method == "fa4":  # FlashAttention-4's two passes: an anchor, not a backend
        from .anchors import fa4_two_pass_runner
        return fa4_two_pass_runner(inp, backward)
    if method == "sdpa_padded":
        return _sdpa_padded_runner(inp, backward)
    if method in ("fa3_causal", "fa3_full"):
        return _fa3_bound_runner(inp, method == "fa3_causal")
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def _available(method: str) -> str | None:
    if method.startswith("fa3") and _fa3_module() is None:
        return "flash_attn_interface is not importable"
    if method == "cudnn":
        if cudnn_backend._load() is None:
            return "cudnn frontend not importable"
    if method == "cudnn_flex":
        probe = torch.zeros(1, 1, 128, dtype=torch.bfloat16, device="cuda")
        return cudnn_flex.unavailable_reason(AttentionInputs.of(probe, probe, probe))
    if method == "fa4":
        from .anchors import fa4_unavailable_reason
        return fa4_unavailable_reason()
    return None


def _cudnn_build_cost(fn) -> dict:
    """Graph building cost of the cuDNN backend: the wall time of a first call on an empty graph
    cache (synchronised), how many graphs it built and the time spent building them."""
    cudnn_backend.clear_graph_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - start) * 1e3
    info = cudnn_backend.graph_cache_info()
    return dict(first_call_ms=first_ms, graphs=info["graphs"], build_ms=info["build_s"] * 1e3)


def run_attention_bench(cases=None, backends=None, iters: int = 30,
                        json_path: str | None = None, passes=("fwd", "fwd_bwd")) -> list[dict]:
    """Benchmark `cases` (names from CASES; default all) x `backends` (names from METHODS; default
    all available). Prints a table and the ratios of `triton` to each other method; writes the
    records (and the machine) to `json_path` when given. Returns the records."""
    if not torch.cuda.is_available():
        raise NotImplementedError("prefixlm bench attention needs a CUDA GPU")
    if iters < 20:
        raise ValueError(f"iters must be >= 20 for a stable median, got {iters}")
    cases = list(cases or CASES)
    backends = list(backends or METHODS)
    for name in cases:
        if name not in CASES:
            raise ValueError(f"unknown case {name!r}; choose from {tuple(CASES)}")
    for name in backends:
        if name not in METHODS:
            raise ValueError(f"unknown backend {name!r}; choose from {METHODS}")
    device = torch.device("cuda")
    records = []
    for case_name in cases:
        inp = AttentionBatch(CASES[case_name], device)
        for method in backends:
            reason = _available(method)
            for which in passes:
                if which == "fwd_bwd" and method in FWD_ONLY:
                    continue
                rec = dict(case=case_name, method=method, pass_=which, samples=len(inp.prefix),
                           tokens=inp.info.total)
                if reason:
                    rec.update(ms=None, tflops=None, error=reason)
                else:
                    try:
                        fn = _runner(method, inp, which == "fwd_bwd")
                        if method == "cudnn":
                            rec.update(_cudnn_build_cost(fn))
                        if method == "cudnn_flex":
                            from .anchors import cudnn_flex_plan_cost
                            rec.update(cudnn_flex_plan_cost(fn, inp.info))
                        ms = time_ms(fn, iters)
                        flops = inp.flops * (3.5 if which == "fwd_bwd" else 1.0)
                        rec.update(ms=ms, tflops=flops / ms / 1e9)
                    except Exception as exc:  # report and keep going: one method must not hide the rest
                        rec.update(ms=None, tflops=None, error=f"{type(exc).__name__}: {exc}"[:300])
                records.append(rec)
                _print_record(rec)
        del inp
        torch.cuda.empty_cache()
    _print_table(records, cases, backends)
    if json_path:
        meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                    torch=torch.__version__, triton=package_version("triton"), iters=iters)
        with open(json_path, "w") as fh:
            json.dump(dict(meta=meta, records=records), fh, indent=1)
    return records


def _print_record(rec):
    if rec["ms"] is None:
        print(f"  {rec['case']} {rec['method']:12s} {rec['pass_']:7s} n/a ({rec['error']})",
              flush=True)
    else:
        build = (f"  (first call {rec['first_call_ms']:.0f} ms, {rec['graphs']} graphs built in "
                 f"{rec['build_ms']:.0f} ms)" if "build_ms" in rec else "")
        if "plan_call_ms" in rec:
            build = f"  (call with a new plan {rec['plan_call_ms']:.2f} ms)"
        print(f"  {rec['case']} {rec['method']:12s} {rec['pass_']:7s} {rec['ms']:8.3f} ms "
              f"{rec['tflops']:6.0f} TFLOP/s{build}", flush=True)


def _print_table(records, cases, backends):
    get = {(r["case"], r["method"], r["pass_"]): r for r in records}

    def cell(case, method, which):
        r = get.get((case, method, which))
        if r is None or r["ms"] is None:
            return "n/a"
        return f"{r['ms']:.3f} ms, {r['tflops']:.0f}"

    print("\n| case | method | fwd (ms, TFLOP/s) | fwd+bwd (ms, TFLOP/s) |")
    print("|---|---|---|---|")
    for case in cases:
        for method in backends:
            print(f"| {case} | {method} | {cell(case, method, 'fwd')} | "
                  f"{cell(case, method, 'fwd_bwd')} |")
    print("\nspeed of triton relative to each method (other ms / triton ms; > 1: triton faster)")
    print("| case | vs | fwd | fwd+bwd |")
    print("|---|---|---|---|")
    for case in cases:
        for method in backends:
            if method == "triton":
                continue
            row = []
            for which in ("fwd", "fwd_bwd"):
                t, o = get.get((case, "triton", which)), get.get((case, method, which))
                ok = t and o and t["ms"] and o["ms"]
                row.append(f"{o['ms'] / t['ms']:.2f}x" if ok else "n/a")
            print(f"| {case} | {method} | {row[0]} | {row[1]} |")


def sweep_configs(case_name: str = "A", fwd_configs=(), bwd_configs=(), iters: int = 20):
    """Time the triton kernels directly with each config on one case (for tuning the table in
    `attention/backends/triton_kernels.py`). Each result is checked against the first config's."""
    from ..attention.backends import triton_kernels as kern  # needs triton: imported here

    inp = AttentionBatch(CASES[case_name], torch.device("cuda"))
    meta = BatchMeta.from_info(inp.info)
    scale = inp.case.head_dim ** -0.5
    rows = []
    base = None
    for cfg in fwd_configs:
        try:
            out, lse = kern.prefixlm_attention_fwd(inp.q, inp.k, inp.v, meta, scale, cfg)
            if base is None:
                base = (out, lse)
            err = (out.float() - base[0].float()).abs().max().item()
            ms = time_ms(lambda: kern.prefixlm_attention_fwd(inp.q, inp.k, inp.v, meta, scale, cfg),
                         iters)
            rows.append(("fwd", cfg, ms, inp.flops / ms / 1e9, err))
        except Exception as exc:
            rows.append(("fwd", cfg, None, None, f"{type(exc).__name__}: {str(exc)[:200]}"))
        print(rows[-1], flush=True)
    out, lse = base if base is not None else kern.prefixlm_attention_fwd(inp.q, inp.k, inp.v,
                                                                         meta, scale)
    ref = None
    for cfg in bwd_configs:
        for det in (True, False) if cfg.atomic_dq else (True,):
            try:
                grads = kern.prefixlm_attention_bwd(inp.dout, inp.q, inp.k, inp.v, out, lse, meta,
                                                    scale, det, cfg)
                if ref is None:
                    ref = grads
                err = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref))
                ms = time_ms(lambda: kern.prefixlm_attention_bwd(
                    inp.dout, inp.q, inp.k, inp.v, out, lse, meta, scale, det, cfg), iters)
                rows.append(("bwd" if det else "bwd_atomic", cfg, ms, 2.5 * inp.flops / ms / 1e9,
                             err))
            except Exception as exc:
                rows.append(("bwd", cfg, None, None, f"{type(exc).__name__}: {str(exc)[:200]}"))
            print(rows[-1], flush=True)
    return rows
