"""Model FLOPs of a training step, one formula for the trainer's MFU and `prefixlm bench train`.

Per optimizer step on T real tokens with `pairs` allowed (query, key) pairs (PrefixLM: per sample
p*p + c*p + c*(c+1)/2), counting a matmul of m x k by k x n as 2*m*k*n:

    3 * 2*R*N_head  +  sum over block calls  m * (2*T*N_block + 4*Hq*D*pairs)

R = the rows the LM head runs on: every token (T), or only the supervised rows when training
passes them (`PrefixLM.forward(rows=...)`): logits nobody reads are not computed, nor counted.

m = 3 for a block call under autograd (forward + backward = 3 x forward) and 1 for the HRM cycles
that run without gradient; N_block counts the matmul weights of one block.
"""

from __future__ import annotations

from ..attention.mask import allowed_pairs


def block_matrix_params(cfg) -> int:
    """Weights of one block's matmuls: fused q/k/v/gate, output, SwiGLU gate/up and down."""
    q_dim, kv_dim = cfg.heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return (cfg.hidden * (q_dim + 2 * kv_dim + cfg.heads) + q_dim * cfg.hidden
            + cfg.hidden * 2 * cfg.ffn_dim + cfg.ffn_dim * cfg.hidden)


def block_calls(cfg) -> tuple[int, int]:
    """(block calls under autograd, block calls without) per forward."""
    if cfg.arch != "hrm":
        return cfg.layers, 0
    h_layers, l_layers = cfg.hrm_layers
    per_cycle = h_layers + cfg.L_cycles * l_layers
    return cfg.grad_cycles * per_cycle, (cfg.H_cycles - cfg.grad_cycles) * per_cycle


def useful_pairs(info) -> int:
    """Allowed (query, key) pairs of a batch (`SeqInfo`), summed over its samples."""
    return int(allowed_pairs(*info.host_lens.numpy()).sum())


def step_flops(cfg, tokens: int, pairs: int, head_rows: int | None = None) -> float:
    """Model FLOPs of one optimizer step on `tokens` real tokens, the LM head on `head_rows` of
    them (default: all) -- the module docstring's formula."""
    grad_calls, forward_calls = block_calls(cfg)
    per_call = 2.0 * tokens * block_matrix_params(cfg) + 4.0 * cfg.heads * cfg.head_dim * pairs
    head = 2.0 * (tokens if head_rows is None else head_rows) * cfg.vocab_size * cfg.hidden
    return 3 * head + (3 * grad_calls + forward_calls) * per_call
