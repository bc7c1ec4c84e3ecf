"""Model configuration: HRM-Text's bp warm-up schedule and the stack calls it differentiates."""

import pytest

from prefixlm.model import preset_config
from prefixlm.model.config import bp_steps_at, intermediate_size, stack_calls


def hrm_text_bp_steps(step, total_steps, ratio, low, high):
    """HRM-Text's compute_train_extra_args, written out from its source (float division,
    truncating int()), independently of prefixlm's code."""
    warmup = total_steps * ratio
    progress = min(1.0, step / warmup) if warmup > 0 else 1.0
    return low + int(progress * (high - low))


# Values HRM-Text's own function gives (research notes, hrm_text_model.md section 2.1).
HRM_TEXT_TABLE = [(1000, 0.2, {1: 2, 66: 2, 67: 3, 133: 3, 134: 4, 199: 4, 200: 5, 1000: 5}),
                  (1500, 0.2, {99: 2, 100: 3, 199: 3, 200: 4, 299: 4, 300: 5}),
                  (30000, 0.2, {1999: 2, 2000: 3, 3999: 3, 4000: 4, 5999: 4, 6000: 5}),
                  (10, 0.2, {1: 3, 2: 5, 3: 5}), (7, 0.2, {1: 4, 2: 5}),
                  (1000, 0.0, {1: 5, 500: 5}), (0, 0.2, {1: 5})]


@pytest.mark.parametrize("total,ratio,expected", HRM_TEXT_TABLE)
def test_bp_warmup_schedule_is_hrm_texts(total, ratio, expected):
    """Guards the bp warm-up's boundaries (an integer re-derivation moves them by a step): at
    every step of the schedule prefixlm's bp_steps equals HRM-Text's formula, and at the listed
    steps the values HRM-Text's own code gives."""
    cfg = preset_config("tiny", vocab_size=10, arch="hrm", bp_warmup_ratio=ratio)
    for step, bp in expected.items():
        assert bp_steps_at(cfg, step, total) == bp, (total, step)
    for step in range(1, max(total, 2) + 1, max(1, total // 997)):
        assert bp_steps_at(cfg, step, total) == hrm_text_bp_steps(step, total, ratio, 2, 5)


def test_stack_calls_follow_hrm_texts_budget():
    """Guards the routing rule for other cycle counts: H calls get min(H_cycles, bp - 1) of the
    budget, the last ones; L calls the rest, the last ones over all cycles."""
    cfg = preset_config("tiny", vocab_size=10, arch="hrm", H_cycles=3, L_cycles=2)
    assert stack_calls(cfg, 2) == [("L", False), ("L", False), ("H", False),
                                   ("L", False), ("L", False), ("H", False),
                                   ("L", False), ("L", True), ("H", True)]
    assert [g for _, g in stack_calls(cfg, 7)] == [False, False, True, True, True, True, True,
                                                   True, True]  # H_bp 3, L_bp 4 of 6
    assert stack_calls(preset_config("tiny", vocab_size=10), 1) == [("H", True)]


def test_intermediate_size_is_hrm_texts_rounding():
    """Guards the SwiGLU width formula: round(expansion * hidden * 2/3) with Python's rounding,
    then up to a multiple of 256 (e.g. 1536 -> 4096, 128 -> 512)."""
    assert [intermediate_size(d, 4) for d in (128, 1024, 1280, 1536, 1792, 2560)] == [
        512, 2816, 3584, 4096, 4864, 6912]


def test_bad_hrm_config_is_rejected():
    """Guards unequal H/L stacks and an impossible bp schedule: the message names the field."""
    with pytest.raises(ValueError, match="model.layers .* even"):
        preset_config("tiny", vocab_size=10, arch="hrm", layers=3).validate()
    with pytest.raises(ValueError, match="bp_min_steps"):
        preset_config("tiny", vocab_size=10, arch="hrm", bp_min_steps=6).validate()
