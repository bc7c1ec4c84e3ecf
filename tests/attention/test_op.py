"""The custom op: torch.library.opcheck and torch.compile without graph breaks or recompiles."""

import pytest
import torch

from prefixlm import prefixlm_attention
from prefixlm.attention.op import attention_op
from prefixlm.attention.verify import make_case, random_seqinfos


def test_opcheck_sdpa():
    """Guards the op's schema, fake (meta) implementation and autograd registration agreeing with
    the real kernel: opcheck runs it under fake tensors, AOT dispatch and autograd checks."""
    case = make_case("edge_mix", 0, num_q_heads=4, num_kv_heads=2, head_dim=64, max_len=65)
    info = case.info
    args = (case.q.requires_grad_(), case.k.requires_grad_(), case.v.requires_grad_(),
            info.cu_seqlens, info.prefix_lens, info.causal_lens, info.host_lens, 0.125, "sdpa",
            False)
    torch.library.opcheck(attention_op, args)


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
        for info in random_seqinfos(capacity):
            loss = compiled(x, info)
            (grad,) = torch.autograd.grad(loss, proj.weight)
            expected = layer(x, info)
            (expected_grad,) = torch.autograd.grad(expected, proj.weight)
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)
