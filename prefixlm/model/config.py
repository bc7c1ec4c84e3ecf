"""Model configuration: HRM-Text's architecture as a dataclass, its size presets, the bp warm-up.

`arch="transformer"` is HRM-Text's transformer baseline (`baselines/transformer_wrapper.py`);
`arch="hrm"` is its `baselines/hrm_nocarry_bp_warmup.py`. Both are the `hrm_text` model of
transformers and vLLM: the transformer is `hrm_text` with H_cycles=1, L_cycles=0 and z_L_init = 0.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["ModelConfig", "PRESETS", "preset_config", "bp_steps_at", "stack_calls",
           "intermediate_size"]

ARCHS = ("transformer", "hrm")


def intermediate_size(hidden: int, expansion: float) -> int:
    """HRM-Text's SwiGLU width: expansion * hidden * 2/3 (the parameters of a plain MLP of that
    expansion), rounded (Python's round, half to even) and then up to a multiple of 256."""
    return -(-round(expansion * hidden * 2 / 3) // 256) * 256


@dataclass
class ModelConfig:
    """Shape of the decoder (HRM-Text's `config/arch`; names in parentheses are theirs).

    layers (n_layers): the transformer's blocks; for hrm with half_layers (HRM-Text's preset) the
      total, split evenly over the H and L stacks, else the blocks of each stack.
    head_dim: 0 gives hidden // heads (HRM-Text's rule; `hrm_text` allows any). kv_heads < heads is
      grouped-query attention (HRM-Text's layers take it; its blocks and `hrm_text` use MHA).
    ffn_hidden: 0 gives `intermediate_size(hidden, expansion)`, HRM-Text's formula.
    embedding_scale: the token embedding's multiplier; 0 gives sqrt(hidden), which is HRM-Text's
      1 / init_std under its LeCun-normal init (`hrm_text`'s own default is 1/initializer_range).
    hrm: `H_cycles` cycles of `L_cycles` L-stack calls then one H-stack call. Gradient reaches only
      some calls: `bp_steps` of them, from `bp_min_steps` to `bp_max_steps` over the first
      `bp_warmup_ratio` of training (`bp_steps_at`, `stack_calls`).
    """

    preset: str = "tiny"
    arch: str = "transformer"   # "transformer" or "hrm"
    vocab_size: int = 0         # 0: taken from the tokenizer
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 0           # 0: same as heads
    head_dim: int = 0           # 0: hidden // heads
    expansion: float = 4.0
    ffn_hidden: int = 0         # 0: intermediate_size(hidden, expansion)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    embedding_scale: float = 0.0  # 0: sqrt(hidden)
    half_layers: bool = True
    H_cycles: int = 2
    L_cycles: int = 3
    bp_min_steps: int = 2
    bp_max_steps: int = 5
    bp_warmup_ratio: float = 0.2

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn_dim(self) -> int:
        return self.ffn_hidden or intermediate_size(self.hidden, self.expansion)

    @property
    def scale(self) -> float:
        return self.embedding_scale or math.sqrt(self.hidden)

    @property
    def cycles(self) -> tuple[int, int]:
        """(H_cycles, L_cycles) as the forward runs them: (1, 0) for the transformer."""
        return (1, 0) if self.arch == "transformer" else (self.H_cycles, self.L_cycles)

    @property
    def layers_per_stack(self) -> int:
        if self.arch == "hrm" and self.half_layers:
            return self.layers // 2
        return self.layers

    def validate(self) -> "ModelConfig":
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch must be 'transformer' or 'hrm', got {self.arch!r}")
        for name in ("layers", "hidden", "heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        for name in ("kv_heads", "head_dim", "ffn_hidden", "embedding_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0 (0: the default), got "
                                 f"{getattr(self, name)}")
        if not self.head_dim and self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads "
                             f"({self.heads}), or set model.head_dim")
        if self.attn_head_dim % 2:
            raise ValueError(f"the head dim ({self.attn_head_dim}) must be even for RoPE")
        if self.heads % self.num_kv_heads:
            raise ValueError(f"model.heads ({self.heads}) must be a multiple of model.kv_heads "
                             f"({self.num_kv_heads})")
        if self.expansion <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.expansion, model.norm_eps and model.rope_theta must be > 0")
        if self.arch == "hrm":
            if self.half_layers and self.layers % 2:
                raise ValueError(f"model.layers ({self.layers}) must be even for arch=hrm with "
                                 f"half_layers (the H and L stacks get half each)")
            if self.H_cycles < 1 or self.L_cycles < 0:
                raise ValueError(f"model.H_cycles must be >= 1 and model.L_cycles >= 0, got "
                                 f"{self.H_cycles} and {self.L_cycles}")
            if not 1 <= self.bp_min_steps <= self.bp_max_steps:
                raise ValueError(f"need 1 <= model.bp_min_steps <= model.bp_max_steps, got "
                                 f"{self.bp_min_steps} and {self.bp_max_steps}")
            if not 0 <= self.bp_warmup_ratio <= 1:
                raise ValueError(f"model.bp_warmup_ratio must be in [0, 1], got "
                                 f"{self.bp_warmup_ratio}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**values)


def bp_steps_at(cfg: ModelConfig, step: int, total_steps: int) -> int:
    """HRM-Text's bp warm-up (`compute_train_extra_args`): the number of stack calls that get a
    gradient at optimizer step `step` (1 for the first step) of `total_steps`. The expression is
    theirs, float division and truncation included, so the boundaries fall on the same steps."""
    warmup_steps = total_steps * cfg.bp_warmup_ratio
    progress = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return cfg.bp_min_steps + int(progress * (cfg.bp_max_steps - cfg.bp_min_steps))


def stack_calls(cfg: ModelConfig, bp_steps: int | None = None) -> list[tuple[str, bool]]:
    """The forward's stack calls in order, ("L" or "H", whether it runs with gradient).

    HRM-Text gives the budget to the H calls first (H_bp = min(H_cycles, bp_steps - 1)) and the
    rest, at least one, to L; the differentiated calls are the last H_bp H calls and the last L_bp
    L calls, counted separately. bp_steps None: `bp_max_steps` (the end of the warm-up). The
    transformer's one call always has gradient."""
    H, L = cfg.cycles
    if cfg.arch == "transformer":
        return [("H", True)]
    bp = cfg.bp_max_steps if bp_steps is None else bp_steps
    H_bp = min(H, bp - 1)
    L_bp = bp - H_bp
    calls = []
    for i in range(H):
        calls += [("L", k >= H * L - L_bp) for k in range(i * L, (i + 1) * L)]
        calls.append(("H", i >= H - H_bp))
    return calls


# HRM-Text's config/arch/size: n_layers x hidden_size x num_heads (head dim 128, expansion 4);
# tiny is the same architecture small enough for the CPU quick start.
PRESETS: dict[str, dict] = {
    "tiny": dict(layers=2, hidden=128, heads=4),
    "B": dict(layers=12, hidden=1024, heads=8),
    "L": dict(layers=24, hidden=1280, heads=10),
    "XL": dict(layers=32, hidden=1536, heads=12),
    "XXL": dict(layers=72, hidden=1792, heads=14),
    "XXL_wide": dict(layers=32, hidden=2560, heads=20),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], "preset": name, **overrides})
