"""The `prefixlm::attention` custom op: one schema, autograd and a fake for every kernel backend.

The op takes only tensors and plain scalars, so `torch.compile` treats it as one opaque node. The
batch's host integers (grid sizes, max lengths) travel in the CPU tensor `host_lens` and are read
inside the op, never as Python ints in the traced graph: batches of equal capacity therefore share
one graph, and the op never synchronises with the GPU to learn them.

Schema (a public contract: new arguments only at the end, with defaults):
  attention(q, k, v, cu_seqlens, prefix_lens, causal_lens, host_lens, softmax_scale, backend,
            deterministic) -> (out, lse)
lse is whatever fp32 tensor the backend saves for its backward, of shape `backend.lse_shape(q)`
(e.g. (Hq, T); (Hq, 0) for backends that keep none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import op_backend
from .seqinfo import BatchMeta


@torch.library.custom_op("prefixlm::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, prefix_lens: Tensor,
                 causal_lens: Tensor, host_lens: Tensor, softmax_scale: float, backend: str,
                 deterministic: bool) -> tuple[Tensor, Tensor]:
    meta = BatchMeta.from_op_args(cu_seqlens, prefix_lens, causal_lens, host_lens)
    return op_backend(backend).forward(q, k, v, meta, softmax_scale)


@attention_op.register_fake
def _attention_fake(q, k, v, cu_seqlens, prefix_lens, causal_lens, host_lens, softmax_scale,
                    backend, deterministic):
    return q.new_empty(q.shape), q.new_empty(op_backend(backend).lse_shape(q), dtype=torch.float32)


@torch.library.custom_op("prefixlm::attention_backward", mutates_args=())
def attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                          cu_seqlens: Tensor, prefix_lens: Tensor, causal_lens: Tensor,
                          host_lens: Tensor, softmax_scale: float, backend: str,
                          deterministic: bool) -> tuple[Tensor, Tensor, Tensor]:
    meta = BatchMeta.from_op_args(cu_seqlens, prefix_lens, causal_lens, host_lens)
    return op_backend(backend).backward(dout, q, k, v, out, lse, meta, softmax_scale,
                                        deterministic)


@attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, cu_seqlens, prefix_lens, causal_lens,
                             host_lens, softmax_scale, backend, deterministic):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, prefix_lens, causal_lens, host_lens, scale, backend, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_lens, causal_lens, host_lens)
    ctx.softmax_scale, ctx.backend, ctx.deterministic = scale, backend, deterministic


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, prefix_lens, causal_lens, host_lens = ctx.saved_tensors
    dq, dk, dv = attention_backward_op(dout.contiguous(), q, k, v, out, lse, cu_seqlens,
                                       prefix_lens, causal_lens, host_lens, ctx.softmax_scale,
                                       ctx.backend, ctx.deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_op.register_autograd(_backward, setup_context=_setup_context)
