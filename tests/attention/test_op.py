"""The custom op: torch.library.opcheck and torch.compile without graph breaks or recompiles."""

import pytest
import torch

from prefixlm import SeqInfo, prefixlm_attention
from prefixlm.attention.op import attention_op
from prefixlm.attention.testing import make_case


def test_opcheck_sdpa():
    """Guards the op's schema, fake (meta) implementation and autograd registration agreeing with
    the real kernel: opcheck runs it under fake tensors, AOT dispatch and autograd checks."""
    case = make_case("edge_mix", 0, num_q_heads=4, num_kv_heads=2, head_dim=64, max_len=65)
    info = case.info
    args = (case.q.requires_grad_(), case.k.requires_grad_(), case.v.requires_grad_(),
            info.cu_seqlens, info.prefix_lens, info.causal_lens, info.host_lens, 0.125, "sdpa",
            False)
    torch.library.opcheck(attention_op, args)


def _batches(capacity, seeds=(1, 2, 3)):
    import numpy as np
    for seed in seeds:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, 20, size=int(rng.integers(1, 6)))
        prefix = [int(rng.integers(0, n + 1)) for n in lengths]
        causal = [int(n - p) for n, p in zip(lengths, prefix)]
        yield SeqInfo.from_lengths(prefix, causal, capacity=capacity)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_no_recompile(compile_backend):
    """Guards graph breaks (fullgraph=True raises on one) and recompiles across batches of equal
    capacity but different composition (error_on_recompile raises on one), forward and backward,
    and checks the compiled result against eager."""
    torch._dynamo.reset()
    capacity = 96
    proj = torch.nn.Linear(32, 3 * 32)

    def layer(x, info):
        q, k, v = proj(x).view(capacity, 3, 2, 16).unbind(1)
        return prefixlm_attention(q, k, v, info, backend="sdpa").sum()

    compiled = torch.compile(layer, fullgraph=True, backend=compile_backend)
    x = torch.randn(capacity, 32)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for info in _batches(capacity):
            loss = compiled(x, info)
            (grad,) = torch.autograd.grad(loss, proj.weight)
            expected = layer(x, info)
            (expected_grad,) = torch.autograd.grad(expected, proj.weight)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


def test_flex_compiles_fullgraph_and_builds_one_block_mask_per_batch(monkeypatch):
    """Guards two bugs seen in development: flex inside torch.compile(fullgraph=True) hit a graph
    break (warnings filter in the traced path), and rebuilt its block mask in every layer. Three
    layers share one SeqInfo: one mask per traced call, no recompile for new batches of one
    capacity, same output as eager."""
    import prefixlm.attention.flex as flex

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
    torch.compile(model, fullgraph=True, backend="aot_eager")(x, next(_batches(capacity)))
    assert len(built) == 1, f"block mask built {len(built)} times for 3 layers"
    monkeypatch.undo()

    # Phase 2: new batches of the same capacity reuse the graph and match eager.
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for i, info in enumerate(_batches(capacity)):
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = compiled(x, info)
        torch.testing.assert_close(out, model(x, info), rtol=1e-5, atol=1e-5)
