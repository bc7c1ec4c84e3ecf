"""`init_from=PATH`: a run's first weights from an `hrm_text` directory or a prefixlm checkpoint.

Weights only (the EMA weights of a checkpoint that has them, with use_ema): the optimizer, EMA,
step and data start fresh. The configured model must be the source's: a difference in any shape
is an error that lists the `model.*` settings to pass; one that changes only what the weights
compute (cycles, embedding scale, RoPE theta, norm eps) is a warning. The run prepares its data
with the source's tokenizer unless `tokenizer=` names another one, and `model.vocab_size=0` takes
the source's vocabulary.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from ..model import ModelConfig, hrm_text
from .checkpoint import (checkpoint_config, checkpoint_tokenizer, load_model_weights,
                         resolve_checkpoint)

__all__ = ["InitSource", "init_source", "check_model", "load_initial_weights"]


class InitSource(NamedTuple):
    path: Path          # the hrm_text directory or the committed checkpoint
    kind: str           # "hrm_text" or "checkpoint"
    model: ModelConfig  # the source's model
    tokenizer: object   # its tokenizer, or None


def init_source(path: str | Path) -> InitSource:
    if hrm_text.is_hrm_text_dir(path):
        directory = Path(path)
        model = hrm_text.config_from_hf(hrm_text.read_config(directory),
                                        str(directory / hrm_text.CONFIG_FILE))
        return InitSource(directory, "hrm_text", model, hrm_text.read_tokenizer(directory))
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    return InitSource(ckpt, "checkpoint", cfg.model, checkpoint_tokenizer(ckpt, cfg))


# (what is compared, the model.* settings that give it the source's value)
_SHAPES = (("arch", ("arch",)), ("layers_per_stack", ("layers", "half_layers")),
           ("hidden", ("hidden",)), ("heads", ("heads",)), ("num_kv_heads", ("kv_heads",)),
           ("attn_head_dim", ("head_dim",)), ("ffn_dim", ("ffn_hidden",)),
           ("vocab_size", ("vocab_size",)))
_FUNCTION = (("cycles", ("H_cycles", "L_cycles")), ("scale", ("embedding_scale",)),
             ("rope_theta", ("rope_theta",)), ("norm_eps", ("norm_eps",)))
_RESOLVED = {"kv_heads": "num_kv_heads", "head_dim": "attn_head_dim", "ffn_hidden": "ffn_dim",
             "embedding_scale": "scale"}


def _differences(source: ModelConfig, cfg: ModelConfig, checks) -> tuple[list[str], list[str]]:
    """(what differs, as 'name (configured vs source)'; the settings that would match)."""
    what, settings = [], []
    for attr, fields in checks:
        ours, theirs = getattr(cfg, attr), getattr(source, attr)
        if ours != theirs:
            what.append(f"{attr} ({ours} vs {theirs})")
            settings += [f"model.{f}={getattr(source, _RESOLVED.get(f, f))}" for f in fields]
    return what, settings


def check_model(source: InitSource, cfg: ModelConfig, warn: bool = True) -> None:
    """ValueError if `cfg` cannot take the source's weights; with `warn`, a warning if it computes
    something else with them."""
    what, settings = _differences(source.model, cfg, _SHAPES)
    if what:
        raise ValueError(f"init_from={source.path}: the configured model differs from its model "
                         f"in {', '.join(what)}; to start from it, set {' '.join(settings)}")
    what, settings = _differences(source.model, cfg, _FUNCTION)
    if what and warn:
        print(f"prefixlm: warning: init_from={source.path}: the configured model computes "
              f"something else with its weights: {', '.join(what)} (configured vs source); "
              f"{' '.join(settings)} would keep the source's", file=sys.stderr)


def load_initial_weights(model, path: str | Path, use_ema: bool = True) -> InitSource:
    """Copy the weights of `path` into `model` (unsharded, before training) after `check_model`
    (whose warning `run.run_training` has given)."""
    source = init_source(path)
    check_model(source, model.cfg, warn=False)
    if source.kind == "hrm_text":
        hrm_text.load_weights(model, hrm_text.read_weights(source.path), str(source.path))
    else:
        load_model_weights(source.path, model, use_ema=use_ema)
    return source
