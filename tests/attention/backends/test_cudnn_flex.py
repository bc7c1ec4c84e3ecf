"""`backend="cudnn_flex"` (cudnn.flex_attention): the interval mask, plan bookkeeping and the op's
plumbing on the CPU; the library's kernels against the reference on the GPU.

CPU tests need neither CUDA nor the frontend. The mask endpoints are expanded to dense masks and
compared with mask.py's rule; the plan cache and the op path (sample-row slicing, flat LSE, padding
zeros, short-sample overwrite) run against a stand-in of the library that computes what its
documentation says the kernels compute (visible keys [0, F0) of each row's own sample). The GPU
tests skip with the reason when CUDA, an sm90/sm100 GPU, the frontend or the CuTe DSL is missing.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from attentionhelpers import SESSION_SEED, assert_stats_ok, gpu_only
from prefixlm import SeqInfo, prefixlm_attention
from prefixlm.attention import AttentionInputs
from prefixlm.attention.backends import cudnn_flex as backend
from prefixlm.attention.mask import sample_mask
from prefixlm.attention.registry import BACKENDS
from prefixlm.attention.seqinfo import BatchMeta
from prefixlm.attention.verify import (BATCH_KINDS, EDGE_LENGTHS, Case, check_backend, make_case,
                                        random_lengths)



def _dense_from_ends(ends, lens):
    """Per sample, the (L, L) mask the endpoints give: row i sees local keys [0, F_i)."""
    masks, row = [], 0
    for n in lens:
        f = torch.from_numpy(ends[row:row + n].astype(np.int64))
        masks.append(torch.arange(n)[None, :] < f[:, None])
        row += n
    return masks


def _edge_batches():
    rng = np.random.default_rng(SESSION_SEED)
    for n in EDGE_LENGTHS:   # every prefix choice of every edge length, 0 and 1 included
        for p in sorted({0, 1, n - 1, n, int(rng.integers(0, n + 1))}):
            if 0 <= p <= n:
                yield f"len{n}_prefix{p}", ([p], [n - p])
    for kind in BATCH_KINDS:
        for i in range(3):
            yield f"{kind}{i}", random_lengths(kind, rng, 300)


# --------------------------------------------------------------------------------------------------
# CPU: the mask endpoints and the plan's geometry
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,lengths", list(_edge_batches()))
def test_visible_key_ends_expand_to_the_prefixlm_mask(name, lengths):
    """Guards the one place this backend states the mask: each row's endpoint F = max(p, i + 1)
    must give exactly mask.py's rule per sample (prefix rows see the whole prefix, causal row i
    sees the prefix and keys <= i), for lengths 0, 1, the edge lengths and random packs."""
    prefix, causal = (np.asarray(a, np.int64) for a in lengths)
    lens = prefix + causal
    ends = backend.visible_key_ends(prefix, causal)
    assert ends.dtype == np.int32 and ends.shape == (int(lens.sum()),)
    # The library's contract: endpoints inside the row's local key range, at least one key.
    starts = np.repeat(np.cumsum(lens) - lens, lens)
    local_len = np.repeat(lens, lens)
    assert ((ends >= 1) & (ends <= local_len)).all()
    assert (np.arange(len(ends)) - starts < local_len).all()
    for n, p, dense in zip(lens, prefix, _dense_from_ends(ends, lens)):
        assert torch.equal(dense, sample_mask(int(n), int(p))), f"{name}: L={n} p={p}"


def test_mask_func_layout():
    """The tensor the planner takes: [Hmask=1, nfunc=1, total] int32, contiguous, on the device
    asked for (nfunc odd: one interval per row)."""
    info = SeqInfo.from_lengths([3, 0, 2], [2, 4, 0], capacity=20)
    func = backend.mask_func(BatchMeta.from_info(info), "cpu")
    assert func.shape == (1, 1, 11) and func.dtype == torch.int32 and func.is_contiguous()
    assert func.flatten().tolist() == [3, 3, 3, 4, 5, 1, 2, 3, 4, 2, 2]


def test_plan_geometry_covers_the_sample_rows_only():
    """The library requires cu_seqlens to end at the rows it gets: the plan sees the used slots
    (trailing empty slots of a fixed-capacity batch dropped) and ends at `total`, not capacity."""
    info = SeqInfo.from_lengths([5, 0, 7], [2, 3, 0], capacity=40)
    cu, total, max_seqlen = backend.plan_geometry(BatchMeta.from_info(info))
    assert info.slots == 40 and cu.tolist() == [0, 7, 10, 17]
    assert total == 17 and max_seqlen == 7
    cu, total, _ = backend.plan_geometry(BatchMeta.from_info(SeqInfo.from_lengths([], [],
                                                                                  capacity=8)))
    assert cu.tolist() == [0] and total == 0


def test_aligned_copies_only_what_the_kernels_cannot_read():
    """Views whose strides are 16-byte multiples are passed in place (no copy of fused q/k/v
    slices of a padded projection); views of an unpadded fused projection are copied."""
    packed = torch.zeros(10, 3 * 4 * 64, dtype=torch.bfloat16)
    q = packed[:, :256].view(10, 4, 64)
    assert backend._aligned(q).data_ptr() == q.data_ptr()
    unpadded = torch.zeros(10, 3 * 4 * 64 + 4, dtype=torch.bfloat16)[:, :256].view(10, 4, 64)
    copy = backend._aligned(unpadded)
    assert copy.is_contiguous() and copy.data_ptr() != unpadded.data_ptr()


def test_registered_and_flat_lse():
    assert BACKENDS["cudnn_flex"] is backend and backend.USES_OP
    assert backend.lse_shape(torch.zeros(7, 3, 64)) == (21,)


# --------------------------------------------------------------------------------------------------
# CPU: why it cannot run
# --------------------------------------------------------------------------------------------------

def test_rejects_cpu_tensors_with_the_reason():
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    assert "CUDA device" in backend.unavailable_reason(AttentionInputs.of(q, q, q))


def _reload_reason(monkeypatch, modules):
    """_load()'s reason with `modules` standing in for (or blocking, None) sys.modules entries."""
    monkeypatch.setattr(backend, "_loaded", False)
    monkeypatch.setattr(backend, "flex", None)
    monkeypatch.setattr(backend, "_IMPORT_ERROR", None)
    for name in ("cudnn", "cudnn.flex_attention", "cutlass"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    assert backend._load() is None
    return backend._IMPORT_ERROR


def test_reasons_for_a_missing_library(monkeypatch, tmp_path):
    """The reason names what is missing: the frontend itself, flex_attention in an older frontend,
    or the CuTe DSL it imports (with the pip --target PYTHONPATH hint)."""
    assert "nvidia-cudnn-frontend>=1.32" in _reload_reason(monkeypatch, {"cudnn": None})

    old = types.ModuleType("cudnn")
    old.__path__ = [str(tmp_path / "old")]
    old.__version__ = "1.20.0"
    (tmp_path / "old").mkdir()
    reason = _reload_reason(monkeypatch, {"cudnn": old})
    assert "missing from nvidia-cudnn-frontend 1.20.0" in reason and ">= 1.32" in reason

    new = types.ModuleType("cudnn")
    new.__path__ = [str(tmp_path / "new")]
    (tmp_path / "new" / "flex_attention").mkdir(parents=True)
    (tmp_path / "new" / "flex_attention" / "__init__.py").write_text("import cutlass\n")
    reason = _reload_reason(monkeypatch, {"cudnn": new, "cutlass": None})
    assert "CuTe DSL" in reason and "'cutlass'" in reason and "dsl_packages" in reason


# --------------------------------------------------------------------------------------------------
# CPU: the op path against a stand-in of the library
# --------------------------------------------------------------------------------------------------

class _StandInPlan:
    def __init__(self, ends, cu, total, has_backward):
        self.ends, self.cu, self.total, self.has_backward = ends, cu, total, has_backward


def _stand_in_probs(q, k, plan, scale):
    """What the library documents: row t of sample b sees keys [start_b, start_b + F_t).
    Returns the fp32 probabilities (Hq, T, T) and LSE (Hq, T)."""
    total = q.shape[0]
    assert total == plan.total == int(plan.cu[-1])
    sample = torch.bucketize(torch.arange(total), plan.cu[1:], right=True)
    start = plan.cu[sample]
    cols = torch.arange(total)
    allowed = ((sample[:, None] == sample[None, :])
               & (cols[None, :] - start[:, None] < plan.ends.flatten()[:, None].long()))
    kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    scores = torch.einsum("thd,shd->hts", q.float(), kf) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1), torch.logsumexp(scores, -1)


def _stand_in_attention(q, k, v, plan, scale):
    probs, lse = _stand_in_probs(q, k, plan, scale)
    vf = v.float().repeat_interleave(q.shape[1] // k.shape[1], 1)
    return torch.einsum("hts,shd->thd", probs, vf), lse


def _stand_in_grads(q, k, v, do, plan, scale):
    """Dense fp32 gradients of the stand-in (the op's backward runs without autograd)."""
    group = q.shape[1] // k.shape[1]
    probs, _ = _stand_in_probs(q, k, plan, scale)
    kf, vf = (t.float().repeat_interleave(group, 1) for t in (k, v))
    dprobs = torch.einsum("thd,shd->hts", do.float(), vf)
    dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
    dq = torch.einsum("hts,shd->thd", dscores, kf) * scale
    dk = torch.einsum("hts,thd->shd", dscores, q.float()) * scale
    dv = torch.einsum("hts,thd->shd", probs, do.float())
    fold = lambda t: t.unflatten(1, (k.shape[1], group)).sum(2)  # noqa: E731
    return dq, fold(dk), fold(dv)


class _StandInFwd:
    built = 0

    def __init__(self, q, k, v, o, plan, lse):
        assert o.shape == q.shape and lse.shape == (q.shape[1], q.shape[0]) and lse.is_contiguous()
        type(self).built += 1
        self.workspace_size = 0

    def check_support(self):
        return True

    def compile(self):
        pass

    def execute(self, q, k, v, o, plan, lse, *, workspace, softmax_scale):
        out, lse_ = _stand_in_attention(q, k, v, plan, softmax_scale)
        o.copy_(out)
        lse.copy_(lse_)


class _StandInBwd:
    def __init__(self, q, k, v, o, do, lse, dq, dk, dv, plan, deterministic):
        assert plan.has_backward
        self.workspace_size = 16

    def check_support(self):
        return True

    def compile(self):
        pass

    def execute(self, q, k, v, o, do, lse, dq, dk, dv, plan, *, workspace, softmax_scale):
        grads = _stand_in_grads(q, k, v, do, plan, softmax_scale)
        for dst, src in zip((dq, dk, dv), grads):
            dst.copy_(src)


@pytest.fixture
def stand_in(monkeypatch):
    """The backend runs on CPU tensors with the stand-in library; returns the planner's call log."""
    calls = []

    def create_mask_plan(mask_func, q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, build_backward):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and mask_func.shape == (1, 1, q.shape[0])
        assert q.shape[0] == k.shape[0] == int(cu_seqlens_q[-1])
        calls.append((q.shape, build_backward))
        return _StandInPlan(mask_func.clone(), cu_seqlens_q.long().clone(), q.shape[0],
                            build_backward)

    fake = types.SimpleNamespace(create_mask_plan=create_mask_plan, FlexAttentionFwd=_StandInFwd,
                                 FlexAttentionBwd=_StandInBwd)
    monkeypatch.setattr(backend, "flex", fake)
    monkeypatch.setattr(backend, "unavailable_reason", lambda inputs: None)
    monkeypatch.setattr(backend, "_load", lambda: fake)
    monkeypatch.setattr(backend, "_backward_geometries", set())
    return calls


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_op_path_meets_the_rule_with_nan_padding(stand_in, kind):
    """Guards the plumbing around the kernels: q[:total] only reaches the library, the output and
    gradients of the padding rows are exactly 0 (NaN padding must not leak), the flat LSE feeds the
    backward, short samples get their exact gradients; every batch kind, GQA 2:1."""
    case = make_case(kind, SESSION_SEED + BATCH_KINDS.index(kind), num_q_heads=4, num_kv_heads=2,
                     head_dim=64, dtype=torch.bfloat16, max_len=200, nan_padding=True)
    stats = check_backend("cudnn_flex", case)
    bad = [str(s) for s in stats if not s.ok]
    assert not bad, f"kind={kind} (PREFIXLM_TEST_SEED={SESSION_SEED}):\n" + "\n".join(bad)


def test_one_plan_per_batch_shared_by_layers_and_backward(stand_in):
    """The plan (one host sync each) is built once per batch: every layer's forward and backward
    reuse it; a forward-only plan found by a backward is rebuilt with backward payloads once, and
    from then on this head geometry gets them at once."""
    info = SeqInfo.from_lengths([5, 3], [4, 0], capacity=16)
    q = torch.randn(16, 2, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            prefixlm_attention(q, q, q, info, backend="cudnn_flex")
    assert stand_in == [((12, 2, 64), False)]
    leaves = [q.clone().requires_grad_() for _ in range(3)]
    out = prefixlm_attention(*leaves, info, backend="cudnn_flex")
    out.float().sum().backward()
    assert stand_in == [((12, 2, 64), False), ((12, 2, 64), True)]
    # A new batch of the same geometry, under torch.compile's forward (no requires_grad seen).
    info2 = SeqInfo.from_lengths([2], [9], capacity=16)
    with torch.no_grad():
        prefixlm_attention(q, q, q, info2, backend="cudnn_flex")
    assert stand_in[-1] == ((11, 2, 64), True)


def test_prepare_builds_the_batch_before_the_layers(stand_in):
    """prepare() builds the plan of a batch for the q, k, v its inputs describe (with backward
    data when a gradient is needed), so the layers find it and build nothing."""
    q = torch.randn(16, 2, 64, dtype=torch.bfloat16)
    first = SeqInfo.from_lengths([5, 3], [4, 0], capacity=16)
    inputs = AttentionInputs(torch.device("cpu"), torch.bfloat16, 16, 2, 2, 64, True)
    backend.prepare(first, inputs)
    assert stand_in == [((12, 2, 64), True)]
    leaves = [q.clone().requires_grad_() for _ in range(3)]
    prefixlm_attention(*leaves, first, backend="cudnn_flex").float().sum().backward()
    assert len(stand_in) == 1
    second = SeqInfo.from_lengths([1, 6], [2, 2], capacity=16)
    backend.prepare(second, inputs._replace(requires_grad=False))
    assert stand_in[-1] == ((11, 2, 64), True)  # a geometry run backward gets backward data
    with torch.no_grad():
        prefixlm_attention(q, q, q, second, backend="cudnn_flex")
    assert len(stand_in) == 2


def test_opcheck_with_the_stand_in(stand_in):
    """The op's contract with this backend's flat LSE: schema, fake shapes, autograd, and
    repeated runs equal (an LSE entry nothing writes would fail that)."""
    from prefixlm.attention.op import attention_op

    case = make_case("edge_mix", SESSION_SEED + 13, num_q_heads=4, num_kv_heads=2, head_dim=64,
                     dtype=torch.bfloat16, max_len=40)
    info = case.info
    args = (case.q.requires_grad_(), case.k.requires_grad_(), case.v.requires_grad_(),
            info.cu_seqlens, info.prefix_lens, info.causal_lens, info.host_lens, 0.125,
            "cudnn_flex", True)
    torch.library.opcheck(attention_op, args)


def test_empty_batch_never_reaches_the_library(stand_in):
    info = SeqInfo.from_lengths([0, 0], [0, 0], capacity=5)
    q = torch.randn(5, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    out = prefixlm_attention(q, q.detach(), q.detach(), info, backend="cudnn_flex")
    (dq,) = torch.autograd.grad(out.float().sum(), q)
    assert stand_in == [] and torch.equal(out, torch.zeros_like(out))
    assert torch.equal(dq, torch.zeros_like(dq))


# --------------------------------------------------------------------------------------------------
# GPU: the library's kernels
# --------------------------------------------------------------------------------------------------

gpu = gpu_only("cudnn_flex", head_dim=128)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", BATCH_KINDS)
@pytest.mark.parametrize("heads", ((8, 8), (12, 4), (8, 1)), ids=("mha", "gqa3", "mqa"))
@pytest.mark.parametrize("head_dim", (64, 128))
def test_gpu_matches_reference(kind, heads, head_dim):
    """The FlashAttention rule against the fp32 reference for every batch kind (zero-causal,
    no-prefix, hundreds of tiny samples, padding tails with NaN), output and all gradients, bf16
    (the head layouts of `prefixlm verify`, so both share the compiled kernels)."""
    case = make_case(kind, SESSION_SEED + 17 * BATCH_KINDS.index(kind) + head_dim,
                     num_q_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                     dtype=torch.bfloat16, device="cuda", max_len=1100, nan_padding=True)
    assert_stats_ok(check_backend("cudnn_flex", case), case)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ("edge_mix", "many_tiny"))
def test_gpu_fp16_and_fused_layout(kind):
    """fp16, and q/k/v as views of an unpadded fused projection (copied to aligned rows)."""
    case = make_case(kind, SESSION_SEED + 3, num_q_heads=8, num_kv_heads=8, head_dim=128,
                     dtype=torch.float16, device="cuda", layout="unaligned", nan_padding=True)
    assert_stats_ok(check_backend("cudnn_flex", case), case)


@gpu
@pytest.mark.gpu
def test_gpu_lone_tiny_samples_meet_the_rule():
    """Samples of 1-2 tokens under MQA 8:1 (the library's D comes from the 16-bit O): their rows
    get exact gradients; every prefix split, with a padding tail."""
    for p, c in ((1, 0), (0, 1), (2, 0), (1, 1), (0, 2)):
        gen = torch.Generator().manual_seed(SESSION_SEED + p + 3 * c)
        info = SeqInfo.from_lengths([p], [c], capacity=p + c + 3, device="cuda")
        q, k, v, dout = (torch.randn(p + c + 3, h, 128, generator=gen).to("cuda", torch.bfloat16)
                         for h in (8, 1, 1, 8))
        assert_stats_ok(check_backend("cudnn_flex", Case(q, k, v, dout, info, SESSION_SEED, "single")),
                   Case(q, k, v, dout, info, SESSION_SEED, f"p{p}c{c}"))


@gpu
@pytest.mark.gpu
def test_gpu_deterministic_50_reruns():
    """deterministic=True: the library's deterministic backward gives bitwise equal gradients."""
    case = make_case("edge_mix", SESSION_SEED + 9, num_q_heads=12, num_kv_heads=4, head_dim=128,
                     dtype=torch.bfloat16, device="cuda")

    def grads():
        leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
        out = prefixlm_attention(*leaves, case.info, backend="cudnn_flex", deterministic=True)
        return torch.autograd.grad(out, leaves, case.dout)

    first = grads()
    for _ in range(49):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))


@gpu
@pytest.mark.gpu
def test_gpu_opcheck_and_plan_reuse():
    """The op's contract with this backend (schema, fake shapes of out and the flat LSE, autograd,
    repeated runs equal), and one plan per batch across repeated calls of one batch."""
    from prefixlm.attention.op import attention_op

    case = make_case("edge_mix", SESSION_SEED + 13, num_q_heads=8, num_kv_heads=8, head_dim=128,
                     dtype=torch.bfloat16, device="cuda", max_len=300)
    info = case.info
    args = (case.q.requires_grad_(), case.k.requires_grad_(), case.v.requires_grad_(),
            info.cu_seqlens, info.prefix_lens, info.causal_lens, info.host_lens, 0.125,
            "cudnn_flex", False)
    torch.library.opcheck(attention_op, args)
    # opcheck runs the op on copies of its arguments (new batches to the plan cache); one batch
    # called again and again, forward and backward, builds one plan.
    built = backend.plans_built()
    leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
    for _ in range(3):
        out = prefixlm_attention(*leaves, info, backend="cudnn_flex")
        torch.autograd.grad(out, leaves, case.dout)
    assert backend.plans_built() - built == 1


@gpu
@pytest.mark.gpu
def test_gpu_rejects_unsupported():
    """fp32 and head_dim 96 are refused with the reason, not run."""
    info = SeqInfo.from_lengths([3], [2], device="cuda")
    for dtype, dim, match in ((torch.float32, 128, "float16/bfloat16"),
                              (torch.bfloat16, 96, "head_dim")):
        q = torch.zeros(5, 2, dim, device="cuda", dtype=dtype)
        with pytest.raises(NotImplementedError, match=match):
            prefixlm_attention(q, q, q, info, backend="cudnn_flex")
