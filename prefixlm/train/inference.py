"""Loading a trained model back from a checkpoint (for generate, eval and export)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..model import PrefixLM
from .checkpoint import COMMIT, CheckpointError, latest_checkpoint, load_model_weights
from .config import TrainConfig, config_from_dict

__all__ = ["resolve_checkpoint", "load_trained"]


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, its checkpoints/ folder, or one step_* directory -> a committed step."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / COMMIT).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"no complete checkpoint in {path} (looked for step_*/{COMMIT})")


def load_trained(path: str | Path, use_ema: bool | None = None, device="cpu"
                 ) -> tuple[PrefixLM, TrainConfig, object, Path]:
    """(model in eval mode, its run config, its tokenizer, the checkpoint directory)."""
    from ..data.tokenizer import load_tokenizer

    ckpt = resolve_checkpoint(path)
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml")
    cfg = config_from_dict(yaml.safe_load(config_file.read_text()))
    model = PrefixLM(cfg.model)
    load_model_weights(ckpt, model, use_ema=cfg.use_ema if use_ema is None else use_ema)
    tok_dir = ckpt / "tokenizer"
    tokenizer = load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.tokenizer)
    return model.to(device).eval(), cfg, tokenizer, ckpt


@torch.no_grad()
def answer(model, tokenizer, instruction: str, **kwargs) -> str:
    """Decoded response (without the end-of-answer token) for one instruction."""
    from ..model import generate

    ids = generate(model, tokenizer.encode_prefix(instruction), stop_id=tokenizer.eoa_id, **kwargs)
    if ids and ids[-1] == tokenizer.eoa_id:
        ids = ids[:-1]
    return tokenizer.decode(ids)
