"""The PrefixLM decoder: embedding, a stack of blocks (or HRM's H/L recurrence), norm, LM head."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..attention import AttentionInputs, SeqInfo, prepare_attention
from .config import ModelConfig
from .flops import step_flops
from .layers import Block, RMSNorm, rope_tables


class PrefixLM(nn.Module):
    """Decoder over packed rows: `forward(input_ids, position_ids, info) -> logits (T, vocab)`.

    input_ids, position_ids: int64 (T,), T >= info.capacity; position_ids restart at 0 in every
    sample. Rows past `info.total` are padding; their logits are meaningless and never supervised.

    arch="hrm" (HRM-Text): two stacks over the same input, z_L and z_H, starting from learned
    vectors. Each of `H_cycles` cycles runs the L stack `L_cycles` times on z_L + z_H + x, then the
    H stack once on z_H + z_L, so attention runs H_cycles * (L_cycles + 1) times per layer. The first
    H_cycles - grad_cycles cycles run without autograd (HRM's truncated gradient); logits read z_H.
    """

    ACTIVATION_CHECKPOINTING = ("none", "blocks", "cycles")

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg.validate()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        if cfg.arch == "transformer":
            self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        else:
            h_layers, l_layers = cfg.hrm_layers
            self.H_blocks = nn.ModuleList(Block(cfg) for _ in range(h_layers))
            self.L_blocks = nn.ModuleList(Block(cfg) for _ in range(l_layers))
            self.H_init = nn.Parameter(torch.empty(cfg.hidden))
            self.L_init = nn.Parameter(torch.empty(cfg.hidden))
        self.norm = RMSNorm(cfg.hidden, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()
        self.attention_backend = backend
        self.activation_checkpointing = "none"

    @property
    def attention_backend(self) -> str:
        """The attention backend every layer calls ("auto" or a name from
        `prefixlm.attention.backend_names()`): a run-time choice, never part of the weights."""
        return self._attention_backend

    @attention_backend.setter
    def attention_backend(self, name: str) -> None:
        from ..attention import backend_names

        if name not in backend_names():
            raise ValueError(f"unknown attention backend {name!r}; choose one of "
                             f"{backend_names()}")
        self._attention_backend = name
        for block in self.all_blocks():
            block.attn.backend = name

    @property
    def activation_checkpointing(self) -> str:
        """What the backward recomputes instead of keeping activations (a run-time choice):
        "none"; "blocks", each block call's; "cycles" (HRM), each differentiated H cycle's (its
        L steps and H step). Forwards without autograd (HRM's truncated cycles, evaluation,
        generation) are never checkpointed."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, mode: str) -> None:
        if mode not in self.ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing must be one of "
                             f"{', '.join(self.ACTIVATION_CHECKPOINTING)}, got {mode!r}")
        if mode == "cycles" and self.cfg.arch != "hrm":
            raise ValueError("activation_checkpointing=cycles checkpoints HRM's cycles: it needs "
                             "model.arch=hrm (use blocks)")
        self._activation_checkpointing = mode

    def all_blocks(self) -> list[Block]:
        if self.cfg.arch == "transformer":
            return list(self.blocks)
        return [*self.H_blocks, *self.L_blocks]

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.init_std
        depth = len(self.all_blocks())
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name in ("H_init", "L_init"):
                nn.init.trunc_normal_(param, std=1.0, a=-2.0, b=2.0)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                # Residual branches scaled so the stream's variance does not grow with depth.
                nn.init.normal_(param, std=std / math.sqrt(2 * depth))
            else:
                nn.init.normal_(param, std=std)

    def _stack(self, blocks, x, rope, info, cache):
        recompute = (self._activation_checkpointing == "blocks" and cache is None
                     and torch.is_grad_enabled())
        for block in blocks:
            if recompute:
                # Non-reentrant: parameter gradients arrive even when x needs none (HRM after
                # its truncated cycles), and any arguments (SeqInfo, the rope tuple) pass.
                x = checkpoint(block, x, rope, info, cache, use_reentrant=False)
            else:
                x = block(x, rope, info, cache)
        return x

    def _cycle(self, z_H, z_L, x, rope, info, cache=None):
        """One HRM cycle: L_cycles L steps on z_L + z_H + x, then one H step on z_H + z_L."""
        for _ in range(self.cfg.L_cycles):
            z_L = self._stack(self.L_blocks, z_L + z_H + x, rope, info, cache)
        z_H = self._stack(self.H_blocks, z_H + z_L, rope, info, cache)
        return z_H, z_L

    def _prepare_attention(self, info: SeqInfo, rows: int) -> None:
        """The batch's per-batch attention work, before any (compiled) layer runs: for every
        gradient mode the layers will call attention in (HRM runs cycles without gradient)."""
        cfg, device = self.cfg, self.embed.weight.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.embed.weight.dtype)
        grad = torch.is_grad_enabled() and self.embed.weight.requires_grad
        modes = {grad, False} if cfg.arch == "hrm" and cfg.grad_cycles < cfg.H_cycles else {grad}
        for requires_grad in modes:
            inputs = AttentionInputs(device, dtype, rows, cfg.heads, cfg.num_kv_heads,
                                     cfg.head_dim, requires_grad)
            prepare_attention(info, inputs, self.attention_backend)

    def hidden_states(self, input_ids, position_ids, info: SeqInfo, cache=None) -> torch.Tensor:
        cfg = self.cfg
        if cache is None:
            self._prepare_attention(info, input_ids.shape[0])
        x = self.embed(input_ids)
        rope = rope_tables(position_ids, cfg.head_dim, cfg.rope_theta)
        if cfg.arch == "transformer":
            return self.norm(self._stack(self.blocks, x, rope, info, cache))
        z_H = self.H_init.to(x.dtype).expand_as(x)
        z_L = self.L_init.to(x.dtype).expand_as(x)
        for cycle in range(cfg.H_cycles):
            grad = torch.is_grad_enabled() and cycle >= cfg.H_cycles - cfg.grad_cycles
            with torch.set_grad_enabled(grad):
                if grad and cache is None and self._activation_checkpointing == "cycles":
                    z_H, z_L = checkpoint(self._cycle, z_H, z_L, x, rope, info,
                                          use_reentrant=False)
                else:
                    z_H, z_L = self._cycle(z_H, z_L, x, rope, info, cache)
        return self.norm(z_H)

    def forward(self, input_ids, position_ids, info: SeqInfo, cache=None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (T, vocab), or (len(rows), vocab) for the int64 row indices `rows` only: in
        training only supervised rows need logits, about a third of a PrefixLM batch's, and the
        LM head and the loss are the step's largest matrix and tensors."""
        hidden = self.hidden_states(input_ids, position_ids, info, cache)
        if rows is not None:
            hidden = hidden.index_select(0, rows)
        return self.lm_head(hidden)

    def num_params(self, non_embedding: bool = True) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, mean_attended: float) -> float:
        """Training FLOPs per token (forward + backward) when a token attends `mean_attended`
        keys on average; HRM's cycles without gradient count forward only (`model.flops`)."""
        return step_flops(self.cfg, 1, mean_attended)
