"""`load_pretrained` and `save_pretrained`: a PrefixLM from and to an `hrm_text` directory.

The directory is what transformers' `save_pretrained` writes for `HrmTextForCausalLM` (and what
vLLM loads): config.json, generation_config.json, model.safetensors (or shards and their index),
and with a tokenizer tokenizer.json, tokenizer_config.json and tokenizer_info.json
(`model.hrm_text` has the format). A save is written into a temporary sibling and renamed into
place, so a failed one leaves no partial directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..fsutil import clean_leftovers, fsync_dir, replace_dir, temp_dir_beside, write_json
from ..model import hrm_text
from .tokenizer import save_tokenizer

__all__ = ["load_pretrained", "save_pretrained", "load_tokenizer"]

_CARD = """# {name}

An `hrm_text` model ({arch}: {layers} blocks per stack, H_cycles {H}, L_cycles {L}, hidden {hidden},
{heads} heads of {head_dim}) written by prefixlm. It loads with transformers >= 5.23:

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("{name}")
    tokenizer = AutoTokenizer.from_pretrained("{name}")

`token_type_ids == 1` marks the prompt (the bidirectional prefix); pass it for the prompt, as
HRM-Text's engine and vLLM treat the whole prompt as the prefix. Prompts are rendered as
{render}. Packed training: `import prefixlm.hf` and `attn_implementation="prefixlm"`.
"""


def load_pretrained(path, device="cpu", backend: str = "auto",
                    dtype: torch.dtype = torch.float32):
    """The PrefixLM of an `hrm_text` directory (e.g. a downloaded HRM-Text-1B), in eval mode."""
    return hrm_text.load_model(path, device=device, backend=backend, dtype=dtype)


def load_tokenizer(path):
    """The prefixlm tokenizer of an `hrm_text` directory (None without tokenizer.json)."""
    return hrm_text.read_tokenizer(path)


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def save_pretrained(model, path, tokenizer=None, dtype=torch.float32, *,
                    max_position_embeddings: int = 4096, overwrite: bool = False,
                    max_shard_bytes: int = 50 * 2**30) -> Path:
    """Write `model` (and `tokenizer`) as an `hrm_text` directory at `path`; returns the path.

    dtype: of the weights on disk (torch.float32/bfloat16/float16 or its name).
    max_position_embeddings: what config.json records as the context (prefixlm's RoPE has no
    limit; transformers uses it only for RoPE metadata). overwrite: replace an existing `path`."""
    from . import _transformers

    transformers = _transformers()
    dtype = _dtype(dtype)
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output {path} is a file: export writes a directory; choose another "
                         "--out")
    if path.exists() and not overwrite:
        raise ValueError(f"output {path} already exists; pass --overwrite (overwrite=True) to "
                         f"replace it")
    if path.exists() and any(path.iterdir()) and not hrm_text.is_hrm_text_dir(path):
        # --overwrite replaces an earlier export, never a folder of something else.
        raise ValueError(f"output {path} is not an hrm_text export (no hrm_text config.json): "
                         "--overwrite replaces only an earlier export; choose another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(path)
    tmp = temp_dir_beside(path)
    try:
        ids = {} if tokenizer is None else dict(
            bos_token_id=tokenizer.inst_begin_id, eos_token_id=tokenizer.eoa_id,
            pad_token_id=tokenizer.pad_id)
        cfg = model.cfg
        hrm_text.write_weights(hrm_text.export_state_dict(model, dtype), tmp, max_shard_bytes)
        config = hrm_text.config_to_hf(cfg, dtype=dtype,
                                       max_position_embeddings=max_position_embeddings, **ids)
        config["transformers_version"] = transformers.__version__
        write_json(tmp / hrm_text.CONFIG_FILE, config)
        transformers.GenerationConfig(**ids).save_pretrained(str(tmp))
        render = "(no tokenizer was saved)"
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp, transformers)
            render = _rendering(tokenizer)
        H, L = cfg.cycles
        (tmp / "README.md").write_text(_CARD.format(
            name=path.name, arch=cfg.arch, layers=cfg.layers_per_stack, H=H, L=L,
            hidden=cfg.hidden, heads=cfg.heads, head_dim=cfg.attn_head_dim, render=render))
        for child in tmp.iterdir():
            _fsync_file(child)
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _rendering(tokenizer) -> str:
    """How a prompt is rendered (`encode_prefix`), for the model card."""
    special = tokenizer.special_tokens
    parts = [special["inst_begin"], "<condition token>" if tokenizer.conditions else None,
             "instruction text", special["inst_end"]]
    return (" + ".join(f"`{part}`" for part in parts if part)
            + f", answers end with `{special['eoa']}`")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
