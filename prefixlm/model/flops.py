"""Model FLOPs of a training step, one formula for the trainer's MFU and `prefixlm bench train`.

Per optimizer step on T real tokens with `pairs` allowed (query, key) pairs (PrefixLM: per sample
p*p + c*p + c*(c+1)/2), counting a matmul of m x k by k x n as 2*m*k*n:

    3 * 2*R*N_head  +  sum over block calls  m * (2*T*N_block + 4*Hq*D*pairs)

R = the rows the LM head runs on: every token (T), or only the supervised rows when training
passes them (`PrefixLM.forward(rows=...)`): logits nobody reads are not computed, nor counted.

m = 3 for a block call under autograd (forward + backward = 3 x forward) and 1 for a call without
gradient: HRM's stack calls outside the bp warm-up's current `bp_steps` (`config.stack_calls`).
N_block counts the matmul weights of one block (gqkv_proj, o_proj, gate_up_proj, down_proj).
"""

from __future__ import annotations

from ..attention.mask import allowed_pairs
from .config import stack_calls


def block_matrix_params(cfg) -> int:
    """Weights of one block's matmuls: fused gate/q/k/v, output, SwiGLU gate/up and down."""
    head_dim = cfg.attn_head_dim
    gqkv = (2 * cfg.heads + 2 * cfg.num_kv_heads) * head_dim
    return (cfg.hidden * gqkv + cfg.heads * head_dim * cfg.hidden
            + cfg.hidden * 2 * cfg.ffn_dim + cfg.ffn_dim * cfg.hidden)


def block_calls(cfg, bp_steps: int | None = None) -> tuple[int, int]:
    """(block calls under autograd, block calls without) per training forward at `bp_steps`."""
    calls = stack_calls(cfg, bp_steps)
    with_grad = sum(grad for _, grad in calls)
    return with_grad * cfg.layers_per_stack, (len(calls) - with_grad) * cfg.layers_per_stack


def useful_pairs(info) -> int:
    """Allowed (query, key) pairs of a batch (`SeqInfo`), summed over its samples."""
    return int(allowed_pairs(*info.host_lens.numpy()).sum())


def step_flops(cfg, tokens: int, pairs: int, head_rows: int | None = None,
               bp_steps: int | None = None) -> float:
    """Model FLOPs of one optimizer step on `tokens` real tokens, the LM head on `head_rows` of
    them (default: all), HRM differentiating `bp_steps` stack calls (None: bp_max_steps) -- the
    module docstring's formula."""
    grad_calls, forward_calls = block_calls(cfg, bp_steps)
    per_call = (2.0 * tokens * block_matrix_params(cfg)
                + 4.0 * cfg.heads * cfg.attn_head_dim * pairs)
    head = 2.0 * (tokens if head_rows is None else head_rows) * cfg.vocab_size * cfg.hidden
    return 3 * head + (3 * grad_calls + forward_calls) * per_call
