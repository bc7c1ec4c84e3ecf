"""Building blocks of the decoder: RMSNorm, fp32 RoPE, gated attention, SwiGLU, a pre-norm block.

Everything works on packed rows: activations are (T, hidden), one row per token of the batch, and
the batch's layout lives in a `SeqInfo`.
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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32: bf16's 8 mantissa bits are not enough for the mean of squares.
        xf = _wide(x)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(xf.dtype)).to(x.dtype)


def rope_tables(position_ids: torch.Tensor, head_dim: int, theta: float):
    """cos, sin of shape (T, 1, head_dim // 2) in fp32 for per-sample positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device,
                                            dtype=torch.float32) / head_dim)
    angles = position_ids.double()[:, None] * inv_freq.double()[None, :]
    # Angles in fp64 then cos/sin to fp32: position * frequency needs more than 24 bits at long
    # context (fp32 angle error ~ position * 2^-24 rad).
    return angles.cos().float()[:, None, :], angles.sin().float()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) in fp32; positions past 2^11 lose bits in bf16."""
    half = x.shape[-1] // 2
    xf = _wide(x)
    cos, sin = cos.to(xf.dtype), sin.to(xf.dtype)
    x1, x2 = xf[..., :half], xf[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Self-attention with one fused projection to q, k, v and a per-head output gate.

    out = W_o · concat_h( sigmoid(g_h) * attn_h ), with g_h a scalar per token and head (gated
    attention: lets a head switch itself off instead of parking mass on a sink token).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.num_kv_heads, cfg.head_dim
        self.backend = "auto"  # a run-time choice, set by `PrefixLM.attention_backend`
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # The projection's width is rounded up to 8 columns so that the q/k/v views keep rows of
        # a multiple of 16 bytes (bf16): the attention kernels' vector loads and tensor
        # descriptors need that. The few extra columns are never read (their weights get no
        # gradient); one fused projection launches fewer kernels than a separate gate.
        used = q_dim + 2 * kv_dim + self.heads
        self.split = (q_dim, kv_dim, kv_dim, self.heads, -used % 8)
        self.qkvg = nn.Linear(cfg.hidden, used + self.split[-1], bias=False)
        self.out = nn.Linear(q_dim, cfg.hidden, bias=False)

    def forward(self, x, rope, info: SeqInfo, cache=None):
        rows = x.shape[0]
        q, k, v, gate, _unused = self.qkvg(x).split(self.split, dim=-1)
        q = apply_rope(q.view(rows, self.heads, self.head_dim), *rope)
        k = apply_rope(k.view(rows, self.kv_heads, self.head_dim), *rope)
        v = v.view(rows, self.kv_heads, self.head_dim)
        if cache is None:
            attn = prefixlm_attention(q, k, v, info, backend=self.backend)
        else:
            attn = cache.attend(q, k, v, info, self.backend)
        attn = attn * torch.sigmoid(_wide(gate)).to(attn.dtype)[..., None]
        return self.out(attn.reshape(rows, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ffn = cfg.ffn_dim
        self.gate_up = nn.Linear(cfg.hidden, 2 * self.ffn, bias=False)
        self.down = nn.Linear(self.ffn, cfg.hidden, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).split(self.ffn, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, info, cache=None):
        x = x + self.attn(self.attn_norm(x), rope, info, cache)
        return x + self.mlp(self.mlp_norm(x))
