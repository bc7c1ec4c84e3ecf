"""`backend="triton"`: the fused PrefixLM kernels against the fp32/fp64 reference.

CPU (CI): the kernels run under the Triton interpreter. TRITON_INTERPRET must be set before triton
is imported, and `prefixlm.attention` imports triton for the registry, so the interpreted checks run
in one child process (this file, run as a script) and each pytest test reads its own result; the
parent pytest process, and every other test in it, never sees TRITON_INTERPRET.
GPU: the same checks at realistic sizes, in process; skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixlm.attention import AttentionInputs

triton = pytest.importorskip("triton")

from prefixlm.attention import prefixlm_attention  # noqa: E402
from prefixlm.attention.reference import reference_attention  # noqa: E402
from prefixlm.attention.verify import check_backend, make_case  # noqa: E402

# The accuracy rule is checked in fp16: in fp32 the "2x PyTorch's own error" ratio between two
# valid summation orders wanders around 2 by itself (rounding noise against rounding noise), so an
# fp32 bound would fail at random without a bug; fp32 correctness is checked by the
# non-contiguous case against an fp64 oracle with an absolute bound.
# Random batches on every run; the seed is printed on failure (rerun with PREFIXLM_TEST_SEED=...).
SESSION_SEED = int(os.environ.get("PREFIXLM_TEST_SEED", random.SystemRandom().randrange(2**31)))

# name -> (batch kind, seed offset, q heads, kv heads, head dim, dtype, max sample length, deterministic)
INTERP_CASES = {
    "edge_mix_fp16_gqa": ("edge_mix", 1, 4, 2, 32, "float16", 130, True),
    "edge_mix_fp16_mha_hd64": ("edge_mix", 2, 2, 2, 64, "float16", 130, False),
    "zero_causal_fp16_gqa3": ("all_zero_causal", 3, 3, 1, 32, "float16", 200, True),
    "no_prefix_fp16_mqa": ("no_prefix", 4, 2, 1, 32, "float16", 200, True),
    "long_among_short_fp16": ("long_among_short", 5, 2, 1, 32, "float16", 300, False),
    "many_tiny_fp16": ("many_tiny", 6, 2, 1, 16, "float16", 4, True),
    "single_fp16": ("single", 7, 2, 2, 32, "float16", 130, True),
    "random_fp16": ("random", 8, 2, 2, 32, "float16", 150, False),
}
EXTRA_CHECKS = ("deterministic_rerun", "atomic_dq_path", "tma_forward_path", "noncontiguous",
                "fused_layout_nan_padding", "softmax_scale", "empty_batch", "opcheck",
                "fused_bwd_tma_loads_nan_padding", "two_kernel_bwd_tma_loads",
                "fused_bwd_many_tiny", "fused_bwd_fp32")


# --------------------------------------------------------------------------------------------------
# Child process: runs under TRITON_INTERPRET=1, prints one JSON line per check.
# --------------------------------------------------------------------------------------------------

def _report(name, ok, detail):
    print(json.dumps({"name": name, "ok": bool(ok), "detail": detail}), flush=True)


def _run_interpreted_checks():
    from prefixlm.attention.seqinfo import BatchMeta, SeqInfo
    from prefixlm.attention.backends import triton_kernels as kernels

    for name, (kind, seed, hq, hkv, hd, dtype, max_len, det) in INTERP_CASES.items():
        case = make_case(kind, SESSION_SEED + seed, num_q_heads=hq, num_kv_heads=hkv, head_dim=hd,
                         dtype=getattr(torch, dtype), max_len=max_len)
        stats = check_backend("triton", case, deterministic=det)
        _report(name, all(s.ok for s in stats), [str(s) for s in stats])

    case = make_case("edge_mix", SESSION_SEED + 9, num_q_heads=2, num_kv_heads=1, head_dim=32,
                     dtype=torch.float16, max_len=130)
    meta = BatchMeta.from_info(case.info)
    scale = 32 ** -0.5
    out, lse = kernels.prefixlm_attention_fwd(case.q, case.k, case.v, meta, scale)
    runs = [kernels.prefixlm_attention_bwd(case.dout, case.q, case.k, case.v, out, lse, meta,
                                           scale, True) for _ in range(3)]
    same = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    _report("deterministic_rerun", same, "3 deterministic backward runs bitwise equal")

    # The atomic-dQ path (used when a tuned config asks for it) against the deterministic one.
    cfg = kernels.bwd_config(32, torch.float16, case.q.device)._replace(atomic_dq=True)
    atomic = kernels.prefixlm_attention_bwd(case.dout, case.q, case.k, case.v, out, lse, meta,
                                            scale, False, cfg)
    err = max((a.float() - b.float()).abs().max().item() for a, b in zip(atomic, runs[0]))
    pad_zero = all((g[meta.total:] == 0).all().item() for g in atomic)
    _report("atomic_dq_path", err < 1e-2 and pad_zero, f"max diff to deterministic {err:.3g}")

    # The TMA (tensor descriptor) forward used on Hopper, with small blocks, on a batch whose
    # padding rows hold NaN: a descriptor reads whole tiles, past the last sample into them.
    nan_case = make_case("edge_mix", SESSION_SEED + 14, num_q_heads=2, num_kv_heads=1,
                         head_dim=32, dtype=torch.float16, max_len=130, nan_padding=True)
    nan_meta = BatchMeta.from_info(nan_case.info)
    ref = reference_attention(nan_case.q, nan_case.k, nan_case.v, nan_case.info, scale,
                              torch.float32)
    tma_cfg = kernels.FwdConfig(32, 16, 4, 2, 1, True, False)
    tma_out, _ = kernels.prefixlm_attention_fwd(nan_case.q, nan_case.k, nan_case.v, nan_meta,
                                                scale, tma_cfg)
    err = (tma_out.float() - ref).abs().max().item()
    _report("tma_forward_path", err < 5e-3 and (tma_out[nan_meta.total:] == 0).all().item(),
            f"max error {err:.3g}")

    # Views of an unpadded fused projection (rows of no 16-byte multiple) with NaN
    # padding, forward and backward, by the accuracy rule.
    fused = make_case("edge_mix", SESSION_SEED + 15, num_q_heads=2, num_kv_heads=1, head_dim=32,
                      dtype=torch.float16, max_len=130, layout="unaligned", nan_padding=True)
    stats = check_backend("triton", fused, deterministic=True)
    _report("fused_layout_nan_padding", all(s.ok for s in stats), [str(s) for s in stats])

    # Non-contiguous q/k/v: heads sliced out of one packed qkv tensor.
    info = case.info
    qkv = torch.randn(info.capacity, 3, 2, 32, dtype=torch.float32)
    q, k, v = qkv[:, 0], qkv[:, 1, :1], qkv[:, 2, :1]
    got = prefixlm_attention(q, k, v, info, backend="triton")
    want = reference_attention(q.double(), k.double(), v.double(), info, None, torch.float64)
    err = (got.double() - want).abs().max().item()
    _report("noncontiguous", err < 1e-4, f"max error {err:.3g}")

    # A custom softmax scale reaches the kernels (forward and backward).
    sc_case = make_case("random", SESSION_SEED + 10, num_q_heads=2, num_kv_heads=2, head_dim=32,
                        dtype=torch.float16, max_len=100)
    stats = check_backend("triton", sc_case, softmax_scale=0.37)
    _report("softmax_scale", all(s.ok for s in stats), [str(s) for s in stats])

    # A batch with no tokens at all: zeros out, zero gradients, no launch.
    empty = SeqInfo.from_lengths([0, 0], [0, 0], capacity=5)
    q0 = torch.randn(5, 2, 32, requires_grad=True)
    out0 = prefixlm_attention(q0, q0[:, :1].detach(), q0[:, :1].detach(), empty, backend="triton")
    out0.sum().backward()
    _report("empty_batch", (out0 == 0).all().item() and (q0.grad == 0).all().item(), "")

    # The fused backward (dK, dV and dQ from the key-major kernel; dQ by pointer atomics here,
    # the interpreter has no descriptor reduce) with Q/dO tiles read through tensor descriptors:
    # GQA 3:1 with NaN in the padding rows, which a descriptor reads past the last sample; then
    # the deterministic two kernels with the same loads. Both by the accuracy rule.
    key = (32, torch.float16, _arch_of_cpu())
    base = kernels.bwd_config(32, torch.float16, torch.device("cpu"))
    kernels._BWD_CONFIGS[key] = base._replace(use_tma=True)
    try:
        tma_case = make_case("edge_mix", SESSION_SEED + 17, num_q_heads=3, num_kv_heads=1,
                             head_dim=32, dtype=torch.float16, max_len=130, nan_padding=True)
        for name, det in (("fused_bwd_tma_loads_nan_padding", False),
                          ("two_kernel_bwd_tma_loads", True)):
            stats = check_backend("triton", tma_case, deterministic=det)
            _report(name, all(s.ok for s in stats), [str(s) for s in stats])
    finally:
        del kernels._BWD_CONFIGS[key]

    # The fused path on hundreds of 0..4-token samples: exact D on short rows, many dQ adds per
    # row from tiles of one key each.
    tiny = make_case("many_tiny", SESSION_SEED + 18, num_q_heads=4, num_kv_heads=2, head_dim=16,
                     dtype=torch.float16, max_len=4)
    stats = check_backend("triton", tiny, deterministic=False)
    _report("fused_bwd_many_tiny", all(s.ok for s in stats), [str(s) for s in stats])

    # fp32 through the fused path against the fp64 oracle (absolute bound, as "noncontiguous").
    f32 = make_case("long_among_short", SESSION_SEED + 19, num_q_heads=2, num_kv_heads=1,
                    head_dim=32, dtype=torch.float32, max_len=150)
    meta32 = BatchMeta.from_info(f32.info)
    out32, lse32 = kernels.prefixlm_attention_fwd(f32.q, f32.k, f32.v, meta32, scale)
    grads = kernels.prefixlm_attention_bwd(f32.dout, f32.q, f32.k, f32.v, out32, lse32, meta32,
                                           scale, False)
    leaves = [t.double().requires_grad_() for t in (f32.q, f32.k, f32.v)]
    ref = reference_attention(*leaves, f32.info, scale, torch.float64)
    want = torch.autograd.grad(ref, leaves, f32.dout.double())
    err = max((g.double() - w).abs().max().item() for g, w in zip(grads, want))
    _report("fused_bwd_fp32", err < 1e-4, f"max error {err:.3g}")

    # The custom op with this backend: schema, fake (shapes and strides of out and lse), autograd.
    from prefixlm.attention.op import attention_op

    small = make_case("random", SESSION_SEED + 13, num_q_heads=2, num_kv_heads=1, head_dim=16,
                      dtype=torch.float16, max_len=20)
    info = small.info
    args = (small.q.requires_grad_(), small.k.requires_grad_(), small.v.requires_grad_(),
            info.cu_seqlens, info.prefix_lens, info.causal_lens, info.host_lens, 0.25, "triton",
            True)
    try:
        torch.library.opcheck(attention_op, args)
        _report("opcheck", True, "")
    except Exception as exc:  # reported to the parent, which fails the test with the message
        _report("opcheck", False, f"{type(exc).__name__}: {exc}")


def _arch_of_cpu():
    """The device key the kernel's config tables use for CPU tensors."""
    from prefixlm.attention.backends import triton_kernels as kernels

    return kernels._arch(torch.device("cpu"))


# --------------------------------------------------------------------------------------------------
# Parent (pytest): one child process for all interpreted checks.
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interpreted():
    # The child runs the kernels on CPU tensors through the interpreter: no GPU is shown to it
    # (on GPU machines its Triton would otherwise also bring up the CUDA driver).
    env = dict(os.environ, TRITON_INTERPRET="1", PREFIXLM_TEST_SEED=str(SESSION_SEED),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpreted"],
                          capture_output=True, text=True, env=env, timeout=900)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["name"]] = rec
    if proc.returncode != 0 and not results:
        pytest.fail(f"interpreter child failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    results["_stderr"] = proc.stderr[-4000:]
    return results


@pytest.mark.parametrize("name", [*INTERP_CASES, *EXTRA_CHECKS])
def test_interpreted(interpreted, name):
    """Guards the tile bounds, masks, GQA head mapping, padding rows and the deterministic
    backward on the CPU, where CI runs (kernels under TRITON_INTERPRET=1)."""
    rec = interpreted.get(name)
    assert rec is not None, f"check {name} did not report; child stderr:\n{interpreted['_stderr']}"
    assert rec["ok"], f"PREFIXLM_TEST_SEED={SESSION_SEED}: {rec['detail']}"


def test_tensor_descriptors_only_on_aligned_layouts():
    """The Hopper forward reads K/V through tensor descriptors only where rows and base are 16-byte
    aligned; views of an unpadded q/k/v/gate projection (rows of 3*H*D + H elements) take plain
    loads."""
    from prefixlm.attention.backends.triton_kernels import tma_compatible

    dense = torch.zeros(64, 4, 32, dtype=torch.bfloat16)
    assert tma_compatible(dense)
    case = make_case("random", 0, num_q_heads=4, num_kv_heads=2, head_dim=32,
                     dtype=torch.bfloat16, max_len=40, layout="unaligned")
    assert not tma_compatible(case.v) and not tma_compatible(case.k)
    assert not tma_compatible(dense[:, ::2])            # heads not packed in a row
    assert not tma_compatible(torch.zeros(64 * 128 + 1, dtype=torch.bfloat16)[1:].view(64, 4, 32))


def test_rejects_unsupported_inputs():
    """Unsupported head dims and dtypes must be refused with the reason, not mis-computed."""
    from prefixlm.attention.backends import triton as triton_backend

    q = torch.empty(4, 2, 96, dtype=torch.float16)
    assert "head_dim" in triton_backend.unavailable_reason(AttentionInputs.of(q, q, q))
    q = torch.empty(4, 2, 64, dtype=torch.float64)
    assert "dtype" in triton_backend.unavailable_reason(AttentionInputs.of(q, q, q))
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        q = torch.empty(4, 2, 64, dtype=torch.float16)
        assert "CUDA" in triton_backend.unavailable_reason(AttentionInputs.of(q, q, q))


# --------------------------------------------------------------------------------------------------
# GPU: realistic sizes
# --------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["edge_mix", "long_among_short", "all_zero_causal", "no_prefix",
                                  "many_tiny", "random"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,head_dim", [((6, 6), 128), ((6, 2), 64), ((6, 1), 128)])
@pytest.mark.parametrize("deterministic", [True, False])
def test_gpu_matches_reference(kind, dtype, heads, head_dim, deterministic):
    """The FlashAttention tolerance rule on the GPU at realistic lengths (up to 1025)."""
    case = make_case(kind, SESSION_SEED + 11, num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                     dtype=dtype, device="cuda")
    stats = check_backend("triton", case, deterministic=deterministic)
    assert all(s.ok for s in stats), f"PREFIXLM_TEST_SEED={SESSION_SEED}\n" + "\n".join(
        map(str, stats))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["edge_mix", "random"])
@pytest.mark.parametrize("heads", [(10, 10), (12, 4)])
@pytest.mark.parametrize("layout", ["gqkv", "unaligned"])
def test_gpu_projection_views_nan_padding(kind, heads, layout):
    """q, k, v as views of a fused projection (the model's gate|q|k|v layout, and rows of no
    16-byte multiple) with NaN in the padding rows: the rule holds and padding stays out (an
    L-size training run once got NaN from a tensor descriptor over an unaligned view)."""
    case = make_case(kind, SESSION_SEED + 16, num_q_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=128, dtype=torch.bfloat16, device="cuda", layout=layout,
                     nan_padding=True)
    stats = check_backend("triton", case)
    assert all(s.ok for s in stats), f"PREFIXLM_TEST_SEED={SESSION_SEED}\n" + "\n".join(
        map(str, stats))


@gpu
@pytest.mark.gpu
def test_gpu_deterministic_50_reruns():
    """deterministic=True: 50 backward reruns are bitwise equal."""
    case = make_case("random", SESSION_SEED + 12, num_q_heads=8, num_kv_heads=2, head_dim=128,
                     dtype=torch.bfloat16, device="cuda")
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]

    def grads():
        out = prefixlm_attention(*leaves, case.info, backend="triton", deterministic=True)
        return torch.autograd.grad(out, leaves, case.dout)

    first = grads()
    for _ in range(50):
        assert all(torch.equal(a, b) for a, b in zip(grads(), first))


# The tensor-descriptor bulk reduce of the fused backward's dQ has no interpreter implementation
# (triton 3.6: no descriptor reduce in the interpreter), so its checks run on the GPU only.
TMA_REDUCE = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the TMA dQ reduce-add (tensor descriptor atomic_add) of the fused "
           "backward has no Triton-interpreter implementation; the CPU checks cover the same "
           "kernel with pointer atomics")


@TMA_REDUCE
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["edge_mix", "many_tiny", "all_zero_causal", "long_among_short"])
@pytest.mark.parametrize("heads", [(6, 6), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("loads", ["pointers", "tma"])
@pytest.mark.parametrize("dq_add", ["tma_reduce", "atomics"])
def test_gpu_fused_backward_variants(kind, heads, loads, dq_add, monkeypatch):
    """Every variant of the fused key-major backward (Q/dO loads by pointers or descriptors, dQ by
    TMA reduce-add or pointer atomics) meets the rule with NaN padding, at head dim 128 in bf16,
    whatever the tuned table picks."""
    from prefixlm.attention.backends import triton_kernels as kernels

    key = (128, torch.bfloat16, torch.cuda.get_device_capability())
    cfg = kernels.bwd_config(128, torch.bfloat16, torch.device("cuda"))._replace(
        atomic_dq=True, use_tma=loads == "tma", dq_tma=dq_add == "tma_reduce")
    monkeypatch.setitem(kernels._BWD_CONFIGS, key, cfg)
    case = make_case(kind, SESSION_SEED + 23, num_q_heads=heads[0], num_kv_heads=heads[1],
                     head_dim=128, dtype=torch.bfloat16, device="cuda", nan_padding=True)
    stats = check_backend("triton", case, deterministic=False)
    assert all(s.ok for s in stats), f"PREFIXLM_TEST_SEED={SESSION_SEED} {cfg}\n" + "\n".join(
        map(str, stats))


if __name__ == "__main__" and "--interpreted" in sys.argv:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("run with TRITON_INTERPRET=1")
    torch.manual_seed(0)
    _run_interpreted_checks()


def test_sweep_script_parses_configs():
    """bench/triton_sweep.py reads configs as the kernel's NamedTuples, booleans included, and
    names the fields when a config has the wrong count."""
    import importlib.util

    from prefixlm.attention.backends.triton_kernels import BwdConfig, FwdConfig

    path = Path(__file__).resolve().parents[3] / "bench" / "triton_sweep.py"
    spec = importlib.util.spec_from_file_location("triton_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    from prefixlm.attention.backends import triton_kernels as kernels

    # The first config of each default list is the H200 table's entry (the others are compared
    # with it), the rest parse to the kernel's NamedTuples.
    key = (128, torch.bfloat16, (9, 0))
    fwd = sweep.parse_configs(sweep.DEFAULT_FWD, FwdConfig)
    assert fwd[0] == kernels._FWD_CONFIGS[key] == FwdConfig(128, 128, 8, 3, 3, True, False)
    assert sweep.parse_configs(sweep.DEFAULT_BWD, BwdConfig)[0] == kernels._BWD_CONFIGS[key]
    bwd = sweep.parse_configs("64,64,8,2,128,64,8,3,0,1,1,0; ", BwdConfig)
    assert bwd == [BwdConfig(64, 64, 8, 2, 128, 64, 8, 3, False, True, True, False)]
    assert bwd[0].atomic_dq is False and bwd[0].overlap_dq is True
    assert bwd[0].use_tma is True and bwd[0].dq_tma is False
    with pytest.raises(ValueError, match="kv_block_n"):
        sweep.parse_configs("1,2,3", BwdConfig)
