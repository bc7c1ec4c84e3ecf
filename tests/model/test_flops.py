"""Model FLOPs: the one formula behind the trainer's MFU and the training benchmark."""

import pytest

from prefixlm.bench.spec import token_batch
from prefixlm.model import PrefixLM, preset_config
from prefixlm.model.flops import block_matrix_params, step_flops, useful_pairs


def test_step_flops_formula():
    """Guards the documented FLOP count (one formula, `model.flops`, for the bench and the
    trainer's MFU): a transformer's is 6N + 3 x attention with N counted from the model's own
    weights (less the qkvg projection's never-read padding columns), and HRM counts its no-grad
    cycles forward only."""
    cfg = preset_config("tiny", vocab_size=300, kv_heads=2)
    model = PrefixLM(cfg)
    padding = model.blocks[0].attn.split[-1] * cfg.hidden
    assert padding > 0  # 128 + 2 * 64 + 4 columns: the padding is exercised
    assert block_matrix_params(cfg) == sum(p.numel() for p in model.blocks[0].parameters()
                                           if p.dim() > 1) - padding
    info = token_batch([40, 20], [10, 0], 128, 300, seed=0).info
    pairs, tokens = useful_pairs(info), info.total
    assert pairs == 40 * 40 + 10 * 40 + 10 * 11 // 2 + 20 * 20
    # Independently: 6 x (matmul weights actually in the model) per token + 3 x attention.
    weights = model.lm_head.weight.numel() - padding * cfg.layers + sum(
        p.numel() for b in model.blocks for p in b.parameters() if p.dim() > 1)
    expected = 6 * weights * tokens + 3 * 4 * cfg.heads * cfg.head_dim * pairs * cfg.layers
    assert step_flops(cfg, tokens, pairs) == pytest.approx(expected, rel=1e-12)
    assert model.flops_per_token(pairs / tokens) * tokens == pytest.approx(expected, rel=1e-12)

    hrm = preset_config("tiny", vocab_size=300, arch="hrm", H_cycles=2, L_cycles=3)
    per_call = 2 * tokens * block_matrix_params(hrm) + 4 * hrm.heads * hrm.head_dim * pairs
    calls = 1 + 3 * 1   # hrm_layers = (1, 1): one H block, three L steps per cycle
    head = 2 * tokens * 300 * hrm.hidden
    assert step_flops(hrm, tokens, pairs) == pytest.approx(3 * head + (3 + 1) * calls * per_call)
