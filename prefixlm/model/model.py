"""The PrefixLM decoder: HRM-Text's transformer baseline or its HRM (`hrm_nocarry_bp_warmup`).

    z_H = embedding_scale * E[ids],  z_L = z_L_init
    for each of H_cycles:  L_cycles times z_L = L(z_L + z_H);  then z_H = H(z_H + z_L)
    logits = lm_head(z_H)

L and H are stacks (`layers.Stack`, each ending in a weightless norm). The transformer is the
case H_cycles = 1, L_cycles = 0 (no L stack) with z_L_init = 0: logits = lm_head(H(x)).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..attention import AttentionInputs, SeqInfo, prepare_attention
from .config import ModelConfig, stack_calls
from .flops import step_flops
from .layers import Block, Stack, rope_tables

# trunc_normal_init_ of HRM-Text (models/common.py): a normal sample wrapped into (-3, 3) by fmod,
# rescaled so that the standard deviation is still `std`.
_TRUNC_STD_CORRECTION = 1.014762601732121


def _trunc_normal_(t: torch.Tensor, std: float) -> torch.Tensor:
    return t.normal_().fmod_(3.0).mul_(_TRUNC_STD_CORRECTION * std)


class HrmTextModel(nn.Module):
    """The body: token embedding, the H stack (and L stack for hrm), the z_L_init buffer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.H_module = Stack(cfg, cfg.layers_per_stack)
        if cfg.arch == "hrm":
            self.L_module = Stack(cfg, cfg.layers_per_stack)
        # The L state's start: a buffer, never trained (HRM-Text draws it once, std 1; zero for
        # the transformer, where it is added to the embedding).
        self.register_buffer("z_L_init", torch.zeros(cfg.hidden), persistent=True)


class PrefixLM(nn.Module):
    """Decoder over packed rows: `forward(input_ids, position_ids, info) -> logits (T, vocab)`.

    input_ids, position_ids: int64 (T,), T >= info.capacity; position_ids restart at 0 in every
    sample. Rows past `info.total` are padding; their logits are meaningless and never supervised.
    `state_dict()` keys are `hrm_text`'s on-disk names (`model.embed_tokens.weight`,
    `model.H_module.layers.0.attn.gqkv_proj.weight`, ..., `model.z_L_init`, `lm_head.weight`).

    `bp_steps` (hrm): how many stack calls a training forward differentiates (`stack_calls`); the
    trainer sets it every step from HRM-Text's warm-up schedule (`config.bp_steps_at`). None:
    `bp_max_steps`. Like the attention backend it is a run-time setting, not part of the weights.
    """

    def __init__(self, cfg: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg.validate()
        self.model = HrmTextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        self.bp_steps: int | None = None
        self.reset_parameters()
        self.attention_backend = backend

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

    def stacks(self) -> dict[str, Stack]:
        stacks = {"H": self.model.H_module}
        if self.cfg.arch == "hrm":
            stacks["L"] = self.model.L_module
        return stacks

    def all_blocks(self) -> list[Block]:
        """Every block, H stack first (FSDP2 wraps consecutive ones into units)."""
        return [block for stack in self.stacks().values() for block in stack.layers]

    @torch.no_grad()
    def reset_parameters(self):
        """HRM-Text's LeCun-normal init (truncated): std 1/sqrt(hidden) for every matrix reading
        the residual stream, the embedding, the LM head and o_proj; 1/sqrt(ffn) for down_proj;
        z_L_init std 1 for hrm. The embedding times sqrt(hidden) then has unit std."""
        cfg = self.cfg
        in_std = 1.0 / math.sqrt(cfg.hidden)
        for name, param in self.named_parameters():
            std = 1.0 / math.sqrt(cfg.ffn_dim) if name.endswith("mlp.down_proj.weight") else in_std
            _trunc_normal_(param, std)
        if cfg.arch == "hrm":
            _trunc_normal_(self.model.z_L_init, 1.0)
        else:
            self.model.z_L_init.zero_()

    def _prepare_attention(self, info: SeqInfo, rows: int, calls) -> None:
        """The batch's per-batch attention work, before any (compiled) layer runs: for every
        gradient mode the layers will call attention in (HRM runs some calls without gradient)."""
        cfg, device = self.cfg, self.lm_head.weight.device
        dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                 else self.lm_head.weight.dtype)
        grad = torch.is_grad_enabled() and self.lm_head.weight.requires_grad
        for requires_grad in {grad and with_grad for _, with_grad in calls}:
            inputs = AttentionInputs(device, dtype, rows, cfg.heads, cfg.num_kv_heads,
                                     cfg.attn_head_dim, requires_grad)
            prepare_attention(info, inputs, self.attention_backend)

    def hidden_states(self, input_ids, position_ids, info: SeqInfo, cache=None) -> torch.Tensor:
        cfg = self.cfg
        calls = stack_calls(cfg, self.bp_steps)
        if cache is None:
            self._prepare_attention(info, input_ids.shape[0], calls)
        stacks = self.stacks()
        z_H = self.model.embed_tokens(input_ids) * cfg.scale
        z_L = self.model.z_L_init.to(z_H.dtype)
        rope = rope_tables(position_ids, cfg.attn_head_dim, cfg.rope_theta)
        grad = torch.is_grad_enabled()
        for name, with_grad in calls:
            # A call without gradient returns a tensor without history: the gradient stops there.
            with torch.set_grad_enabled(grad and with_grad):
                if name == "L":
                    z_L = stacks["L"](z_L + z_H, rope, info, cache)
                else:
                    z_H = stacks["H"](z_H + z_L, rope, info, cache)
        return z_H

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
            total -= self.model.embed_tokens.weight.numel()
        return total

    def flops_per_token(self, mean_attended: float) -> float:
        """Training FLOPs per token (forward + backward) when a token attends `mean_attended`
        keys on average, at the current `bp_steps`: calls without gradient count forward only
        (`model.flops`)."""
        return step_flops(self.cfg, 1, mean_attended, bp_steps=self.bp_steps)
