"""Model configuration: one dataclass, size presets, every field overridable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ModelConfig", "PRESETS", "preset_config"]


@dataclass
class ModelConfig:
    """Shape of the decoder. `arch="hrm"` adds HRM's H/L recurrence over the same blocks type.

    hidden / heads gives the head dim; kv_heads < heads is grouped-query attention.
    ffn_hidden = 0 picks 8/3 * hidden rounded up to a multiple of 64 (SwiGLU's usual budget).
    HRM: `H_layers` and `L_layers` blocks (0: half of `layers` each), `H_cycles` outer cycles of
    `L_cycles` L-steps and one H-step; only the last `grad_cycles` H cycles are differentiated.
    """

    preset: str = "tiny"
    arch: str = "transformer"   # "transformer" or "hrm"
    vocab_size: int = 0         # 0: taken from the tokenizer
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 0           # 0: same as heads
    ffn_hidden: int = 0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    H_layers: int = 0
    L_layers: int = 0
    H_cycles: int = 2
    L_cycles: int = 2
    grad_cycles: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        return -(-int(self.hidden * 8 / 3) // 64) * 64

    @property
    def hrm_layers(self) -> tuple[int, int]:
        half = max(1, self.layers // 2)
        return (self.H_layers or half, self.L_layers or half)

    def validate(self) -> "ModelConfig":
        if self.arch not in ("transformer", "hrm"):
            raise ValueError(f"model.arch must be 'transformer' or 'hrm', got {self.arch!r}")
        for name in ("layers", "hidden", "heads", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be a multiple of model.heads "
                             f"({self.heads})")
        if self.head_dim % 2:
            raise ValueError(f"head dim hidden/heads = {self.head_dim} must be even for RoPE")
        if self.heads % self.num_kv_heads:
            raise ValueError(f"model.heads ({self.heads}) must be a multiple of model.kv_heads "
                             f"({self.num_kv_heads})")
        if self.arch == "hrm":
            for name in ("H_cycles", "L_cycles", "grad_cycles"):
                if getattr(self, name) < 1:
                    raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
            if self.grad_cycles > self.H_cycles:
                raise ValueError(f"model.grad_cycles ({self.grad_cycles}) exceeds model.H_cycles "
                                 f"({self.H_cycles})")
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


# layers x hidden x heads. B / L / XL follow HRM-Text's sizes; tiny trains on a laptop CPU.
PRESETS: dict[str, dict] = {
    "tiny": dict(layers=2, hidden=128, heads=4, ffn_hidden=384),
    "B": dict(layers=12, hidden=1024, heads=8),
    "L": dict(layers=24, hidden=1280, heads=10),
    "XL": dict(layers=32, hidden=1536, heads=12),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig.from_dict({**PRESETS[name], "preset": name, **overrides})
