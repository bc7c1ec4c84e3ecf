"""Model FLOPs: the one formula behind the trainer's MFU and the training benchmark."""

import pytest

from prefixlm.bench.spec import token_batch
from prefixlm.model import PrefixLM, preset_config
from prefixlm.model.flops import block_matrix_params, step_flops, useful_pairs


def test_step_flops_formula():
    """Guards the documented FLOP count (one formula, `model.flops`, for the bench and the
    trainer's MFU): a transformer's is 6N + 3 x attention with N counted from the model's own
    weights (gqkv_proj of GQA included)."""
    cfg = preset_config("tiny", vocab_size=300, kv_heads=2)
    model = PrefixLM(cfg)
    blocks = model.all_blocks()
    assert block_matrix_params(cfg) == sum(p.numel() for p in blocks[0].parameters())
    info = token_batch([40, 20], [10, 0], 128, 300, seed=0).info
    pairs, tokens = useful_pairs(info), info.total
    assert pairs == 40 * 40 + 10 * 40 + 10 * 11 // 2 + 20 * 20
    # Independently: 6 x (matmul weights actually in the model) per token + 3 x attention.
    weights = model.lm_head.weight.numel() + sum(p.numel() for b in blocks for p in b.parameters())
    expected = 6 * weights * tokens + 3 * 4 * cfg.heads * cfg.attn_head_dim * pairs * cfg.layers
    assert step_flops(cfg, tokens, pairs) == pytest.approx(expected, rel=1e-12)
    assert model.flops_per_token(pairs / tokens) * tokens == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bp_steps,with_grad", [(2, 2), (3, 3), (5, 5), (8, 8), (None, 5)])
def test_hrm_flops_count_calls_without_gradient_forward_only(bp_steps, with_grad):
    """Guards MFU under the bp warm-up: of HRM's 2 x (3 + 1) = 8 stack calls (one block each),
    the `bp_steps` differentiated ones count forward + backward (3x) and the others forward only
    (1x); None is the warm-up's end (bp_max_steps = 5)."""
    hrm = preset_config("tiny", vocab_size=300, arch="hrm", H_cycles=2, L_cycles=3)
    info = token_batch([40, 20], [10, 0], 128, 300, seed=0).info
    pairs, tokens = useful_pairs(info), info.total
    per_call = 2 * tokens * block_matrix_params(hrm) + 4 * hrm.heads * hrm.attn_head_dim * pairs
    head = 2 * tokens * 300 * hrm.hidden
    expected = 3 * head + (3 * with_grad + (8 - with_grad)) * per_call
    assert step_flops(hrm, tokens, pairs, bp_steps=bp_steps) == pytest.approx(expected)
