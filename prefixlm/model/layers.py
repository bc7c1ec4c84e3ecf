"""HRM-Text's building blocks: weightless RMSNorm, RoPE, gated attention, SwiGLU, a block, a stack.

    rms(x)    = x / sqrt(mean(x^2) + eps)                          (no weight anywhere)
    block(x)  = x + attn(rms(x)), then + mlp(rms(x))               (pre-norm)
    stack(x)  = rms(block_{n-1}(... block_0(x)))                   (a norm ends every stack call)
    attn(h)   = o_proj( sigmoid(gate) * attention(rope(q), rope(k), v) ),
                gate | q | k | v = heads of gqkv_proj(h) in that order (elementwise gate)
    mlp(h)    = down_proj( silu(gate) * up ),  gate | up = gate_up_proj(h)

Parameter names are `hrm_text`'s on-disk names (`attn.gqkv_proj`, `mlp.gate_up_proj`, ...), so a
state_dict is the layout transformers and vLLM load. Everything works on packed rows: activations
are (T, hidden), one row per token, and the batch's layout lives in a `SeqInfo`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import SeqInfo, prefixlm_attention
from .config import ModelConfig


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or in its own dtype when that is wider (fp64 in tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMSNorm; statistics in fp32 (bf16's 8 mantissa bits are not enough for the mean
    of squares), as transformers' `hrm_text` computes it."""
    xf = _wide(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (T, 1, head_dim // 2) in fp32 for per-sample positions.

    The angles are position * inv_freq in fp32, as HRM-Text and transformers compute them: a
    checkpoint was trained with exactly these tables, so a more exact angle would be a different
    function."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim)
    angles = position_ids.float()[:, None] * inv_freq[None, :]
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE over all head dims (pairs x[..., i], x[..., i + D/2]) in fp32, cast back:
    positions past 2^11 lose bits in bf16."""
    half = x.shape[-1] // 2
    xf = _wide(x)
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Gated self-attention with one fused projection to gate, q, k and v heads.

    Every output of `gqkv_proj` is head_dim wide, so each view (gate, q, k, v) starts on a
    head_dim boundary and has rows of (2*heads + 2*kv_heads) * head_dim elements: 16-byte aligned,
    as the attention kernels' vector loads want, whenever head_dim * element size is a multiple of
    16 bytes (head_dim % 8 == 0 in bf16, every preset's 128 included).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.attn_head_dim
        self.backend = "auto"  # a run-time choice, set by `PrefixLM.attention_backend`
        self.split = (self.heads, self.heads, self.kv_heads, self.kv_heads)
        self.gqkv_proj = nn.Linear(cfg.hidden, sum(self.split) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, cfg.hidden, bias=False)

    def forward(self, x, rope, info: SeqInfo, cache=None):
        rows = x.shape[0]
        gqkv = self.gqkv_proj(x).view(rows, sum(self.split), self.head_dim)
        gate, q, k, v = gqkv.split(self.split, dim=1)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is None:
            attn = prefixlm_attention(q, k, v, info, backend=self.backend)
        else:
            attn = cache.attend(q, k, v, info, self.backend)
        attn = attn * torch.sigmoid(_wide(gate)).to(attn.dtype)
        return self.o_proj(attn.reshape(rows, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn = cfg.ffn_dim
        self.gate_up_proj = nn.Linear(cfg.hidden, 2 * self.ffn, bias=False)
        self.down_proj = nn.Linear(self.ffn, cfg.hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).split(self.ffn, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(rms(x)), then + mlp(rms(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, info, cache=None):
        x = x + self.attn(rms_norm(x, self.eps), rope, info, cache)
        return x + self.mlp(rms_norm(x, self.eps))


class Stack(nn.Module):
    """`layers` blocks and a weightless final norm (HRM-Text's `Transformer`, `hrm_text`'s
    `HrmTextStack`)."""

    def __init__(self, cfg: ModelConfig, layers: int):
        super().__init__()
        self.eps = cfg.norm_eps
        self.layers = nn.ModuleList(Block(cfg) for _ in range(layers))

    def forward(self, x, rope, info, cache=None):
        for block in self.layers:
            x = block(x, rope, info, cache)
        return rms_norm(x, self.eps)
