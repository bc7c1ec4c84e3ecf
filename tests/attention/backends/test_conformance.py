"""Every CPU backend against the fp32/fp64 reference, forward and backward.

Batches are random on every run (a fresh seed each session, printed on failure) and cover the
edge lengths, prefix choices, zero-causal samples, padding tails, GQA/MQA and both head dims.
"""


import pytest
import torch

from attentionhelpers import SESSION_SEED, assert_stats_ok
from prefixlm.attention.verify import BATCH_KINDS, check_backend, make_case

CPU_BACKENDS = ("sdpa", "flex")
# FlexAttention has no backward on CPU: its forward is checked here, its backward on the GPU.
GRAD_ON_CPU = {"sdpa": True, "flex": False}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_batch_kinds_fp64(backend, kind):
    """Guards the PrefixLM mask at every boundary: lengths 0/1/2/3/63..1025, prefix 0/1/len-1/len,
    samples and whole batches without causal tokens, hundreds of tiny samples, a long sample among
    short ones, pure causal batches, padding tails. A wrong mask, a sample leaking into its
    neighbour, or a padding row that is not exactly zero fails here.

    In fp64 the oracle is exact to ~1e-15, so the bound is the fp32 rounding slack alone and any
    masking mistake (errors of order 0.1) stands out; precision is tested in fp16/bf16 below, where
    the 2x rule measures something (in fp32 the ratio between two valid summation orders already
    wanders around 2)."""
    case = make_case(kind, SESSION_SEED + BATCH_KINDS.index(kind), num_q_heads=2, num_kv_heads=2,
                     head_dim=64, dtype=torch.float64)
    assert_stats_ok(check_backend(backend, case, grad=GRAD_ON_CPU[backend]), case, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", ("edge_mix", "many_tiny", "long_among_short"))
def test_batch_kinds_fp32(backend, kind):
    """Guards the fp32 path (the dtype CPU users train in) at the hardest boundaries, against an
    fp64 oracle with the same rule (its absolute floor admits fp32 rounding of exact zeros)."""
    case = make_case(kind, SESSION_SEED + 100 + BATCH_KINDS.index(kind), num_q_heads=4,
                     num_kv_heads=2, head_dim=64, dtype=torch.float32)
    assert_stats_ok(check_backend(backend, case, grad=GRAD_ON_CPU[backend]), case, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("heads", ((6, 2), (3, 1), (4, 4)), ids=("gqa3", "mqa", "mha"))
@pytest.mark.parametrize("head_dim", (64, 128))
def test_low_precision_gqa_head_dims(backend, dtype, heads, head_dim):
    """Guards the half-precision path and the key/value head sharing (GQA 3:1, MQA): a wrong head
    mapping or an fp16/bf16 accumulation error beyond what PyTorch itself makes fails here."""
    case = make_case("random", SESSION_SEED + head_dim + 7 * heads[0], num_q_heads=heads[0],
                     num_kv_heads=heads[1], head_dim=head_dim, dtype=dtype, max_len=300)
    assert_stats_ok(check_backend(backend, case, grad=GRAD_ON_CPU[backend]), case, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_softmax_scale_and_no_padding(backend):
    """Guards a custom softmax_scale being ignored, and capacity == total (no padding tail)."""
    case = make_case("edge_mix", SESSION_SEED + 11, num_q_heads=2, num_kv_heads=1, head_dim=64,
                     padding=False, max_len=129, dtype=torch.bfloat16)
    assert_stats_ok(check_backend(backend, case, softmax_scale=0.3, grad=GRAD_ON_CPU[backend]), case, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs(backend):
    """Guards backends that assume contiguous q/k/v: inputs here are slices of a fused qkv
    projection, as a model produces them."""
    case = make_case("random", SESSION_SEED + 5, num_q_heads=2, num_kv_heads=2, head_dim=64,
                     max_len=200)
    fused = torch.cat([case.q, case.k, case.v], dim=1)     # (T, 6, D)
    case.q, case.k, case.v = fused[:, :2], fused[:, 2:4], fused[:, 4:]
    assert not case.q.is_contiguous()
    assert_stats_ok(check_backend(backend, case, grad=GRAD_ON_CPU[backend]), case, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_sample_zero_causal_gives_exact_zero_causal_work(backend):
    """The seed's crash: a packed batch in which no sample has causal tokens. It must run, match
    the reference (pure bidirectional attention per sample), and give finite gradients."""
    case = make_case("all_zero_causal", SESSION_SEED + 3, num_q_heads=2, num_kv_heads=2,
                     head_dim=64, dtype=torch.float16)
    assert case.info.max_causal == 0
    assert_stats_ok(check_backend(backend, case, grad=GRAD_ON_CPU[backend]), case, backend)


def test_empty_batch():
    """Guards a batch with no tokens at all (capacity only padding): output and gradients zero."""
    from prefixlm import SeqInfo, prefixlm_attention
    info = SeqInfo.from_lengths([0, 0], [0, 0], capacity=5)
    for backend in CPU_BACKENDS:
        q = torch.randn(5, 2, 64, requires_grad=GRAD_ON_CPU[backend])
        out = prefixlm_attention(q, q, q, info, backend=backend)
        assert torch.equal(out, torch.zeros_like(out))
        if GRAD_ON_CPU[backend]:
            (dq,) = torch.autograd.grad(out.sum(), q)
            assert torch.equal(dq, torch.zeros_like(dq))


def test_deterministic_backward_sdpa():
    """Guards nondeterminism in the backward: 50 reruns must be bitwise identical."""
    case = make_case("random", SESSION_SEED + 21, num_q_heads=2, num_kv_heads=1, head_dim=64,
                     max_len=100)
    from prefixlm import prefixlm_attention

    def grads():
        leaves = [t.detach().requires_grad_() for t in (case.q, case.k, case.v)]
        out = prefixlm_attention(*leaves, case.info, backend="sdpa", deterministic=True)
        return torch.autograd.grad(out, leaves, case.dout)

    first = grads()
    for _ in range(49):
        assert all(torch.equal(a, b) for a, b in zip(first, grads()))
