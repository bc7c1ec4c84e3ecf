"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically.

Layout: <run_dir>/checkpoints/step_00000100/ holds DCP's shards of model, optimizer, EMA and step,
one `rank00000.pt` per rank with its loader and RNG states, config.yaml and tokenizer/, and `COMMIT`
(written last) listing every file with its size. A save goes to `.tmp-step_...`, gets its COMMIT,
then is renamed: a crash at any point leaves either no new directory or an uncommitted temp one, and
the previous checkpoint stays the newest complete one. On resume, a checkpoint whose files do not match its COMMIT (truncated,
missing) or that DCP cannot read is skipped with a warning in favour of the previous one.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
import yaml
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ..data.tokenizer import load_tokenizer
from ..fsutil import fsync_dir, write_bytes
from ..model import PrefixLM, hrm_text
from .config import TrainConfig, config_from_dict
from .distributed import all_reduce, barrier

__all__ = ["save_checkpoint", "load_checkpoint", "complete_checkpoints", "latest_checkpoint",
           "CheckpointError", "load_model_weights", "resolve_checkpoint", "load_trained",
           "checkpoint_config", "checkpoint_tokenizer", "keep_best", "read_best"]

COMMIT = "COMMIT"
_NAME = re.compile(r"^step_(\d+)$")
BEST, BEST_RECORD = "best", "best.json"
# Model config keys and weight names only prefixlm's architecture before the HRM-Text model had.
_OLD_CONFIG_KEYS = ("tie_embeddings", "init_std", "grad_cycles", "H_layers", "L_layers")
_OLD_WEIGHT = "model.embed.weight"
OLD_ARCHITECTURE = ("it was written by prefixlm's architecture from before the HRM-Text model, "
                    "whose weights do not load into this one (README, Training); train it again")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names it and says why."""



def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _train_state(model, optimizer, ema: dict | None, step: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)}
    if ema:
        state["ema"] = ema
    return state


def save_checkpoint(ckpt_root: str | Path, step: int, model, optimizer, ema: dict | None,
                    loader_state: dict, rank: int, keep: int = 3, write_extra=None) -> Path:
    """Save and commit step `step`; `write_extra(tmp_dir)` (rank 0) adds files such as the config
    and tokenizer before the commit, so they are covered by it."""
    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    with warnings.catch_warnings():  # "assuming ... a single process" is what we mean
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.save(_train_state(model, optimizer, ema, step), checkpoint_id=str(tmp))
    local = {"loader": loader_state, "rng": rng_state(), "step": step}
    buffer = io.BytesIO()
    torch.save(local, buffer)
    write_bytes(tmp / f"rank{rank:05d}.pt", buffer.getvalue())
    barrier()
    if rank == 0:
        if write_extra is not None:
            write_extra(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
                 if p.is_file()}
        world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        write_bytes(tmp / COMMIT, json.dumps({"step": step, "world_size": world,
                                                 "files": files}).encode())
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. a resumed run ending there)
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def verify(path: Path) -> str | None:
    """None if `path` is a committed checkpoint whose files match its COMMIT, else the reason."""
    marker = path / COMMIT
    if not marker.is_file():
        return "no COMMIT marker (the save did not finish)"
    try:
        commit = json.loads(marker.read_text())
        files = commit["files"]
    except (ValueError, KeyError, TypeError):
        return "COMMIT marker is unreadable"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, COMMIT says {size}"
    return None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints under `root`, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / COMMIT).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _warn(msg: str, rank: int):
    if rank == 0:
        print(f"prefixlm: warning: {msg}", file=sys.stderr)


def _check_layout(path: Path, model) -> None:
    """CheckpointError naming the first weight of `model` that the checkpoint lacks or holds in
    another shape (DCP's own errors name neither), or saying it is of the old architecture."""
    try:
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception:  # noqa: BLE001 -- an unreadable checkpoint is reported by the load itself
        return
    if _OLD_WEIGHT in saved:
        raise CheckpointError(f"checkpoint {path}: {OLD_ARCHITECTURE}")
    for name, tensor in model.state_dict().items():
        entry = saved.get(f"model.{name}")
        if entry is None:
            raise CheckpointError(f"checkpoint {path} has no weight {name} "
                                  f"{tuple(tensor.shape)}: it holds another model")
        size = getattr(entry, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise CheckpointError(f"checkpoint {path}: weight {name} has shape {tuple(size)}, "
                                  f"the model has {tuple(tensor.shape)}")


def _load_one(path: Path, model, optimizer, ema: dict | None, rank: int) -> tuple[int, dict]:
    _check_layout(path, model)
    state = _train_state(model, optimizer, ema, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    local_file = path / f"rank{rank:05d}.pt"
    if not local_file.is_file():
        raise CheckpointError(f"{path} has no {local_file.name}: it was saved with fewer ranks "
                              "than this run; resume with the same number of processes")
    local = torch.load(local_file, weights_only=False)
    return int(state["step"]), local


def load_checkpoint(path_or_root: str | Path, model, optimizer, ema: dict | None, rank: int
                    ) -> tuple[int, dict, Path]:
    """Restore the newest usable checkpoint (or exactly `path_or_root` if it is one).

    Returns (step, per-rank state {"loader", "rng"}, path). Falls back to older checkpoints when the
    newest is incomplete or unreadable; raises CheckpointError when none can be used.
    """
    path = Path(path_or_root)
    explicit = _NAME.match(path.name) is not None
    candidates = [path] if explicit else list(reversed(complete_checkpoints(path)))
    if not candidates:
        raise CheckpointError(f"no complete checkpoint under {path}")
    errors = []
    for candidate in candidates:
        reason = verify(candidate)
        if reason is None:
            try:
                step, local = _load_one(candidate, model, optimizer, ema, rank)
            # DCP wraps read errors in CheckpointException, a BaseException.
            except (Exception, CheckpointException) as exc:  # noqa: BLE001
                reason, step, local = f"cannot be read ({type(exc).__name__}: {exc})", -1, None
        failed = torch.tensor(0 if reason is None else 1)
        if all_reduce(failed).item() == 0:
            return step, local, candidate
        reason = reason or "unreadable on another rank"
        errors.append(f"{candidate}: {reason}")
        if not explicit:
            _warn(f"skipping checkpoint {candidate}: {reason}", rank)
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))


def load_model_weights(path: str | Path, model, use_ema: bool = True) -> bool:
    """Load the model (and, with use_ema, the EMA weights over it) from one checkpoint directory,
    in a single process whatever the world size it was saved with. Returns whether EMA was used."""
    path = Path(path)
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}")
    _check_layout(path, model)
    state = {"model": model.state_dict()}
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    has_ema = any(key.startswith("ema.") for key in metadata.state_dict_metadata)
    if use_ema and has_ema:
        state["ema"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except (Exception, CheckpointException) as exc:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc}") from exc
    model.load_state_dict(state["model"])
    if "ema" in state:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state["ema"][name])
        return True
    return False


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


def checkpoint_config(ckpt: Path) -> TrainConfig:
    """The run config a committed checkpoint recorded (config.yaml)."""
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml")
    values = yaml.safe_load(config_file.read_text())
    model = values.get("model") if isinstance(values, dict) else None
    if isinstance(model, dict) and any(key in model for key in _OLD_CONFIG_KEYS):
        raise CheckpointError(f"checkpoint {ckpt}: {OLD_ARCHITECTURE}")
    return config_from_dict(values)


def checkpoint_tokenizer(ckpt: Path, cfg: TrainConfig):
    """The tokenizer a checkpoint carries (tokenizer/, with its markers in tokenizer_info.json),
    else the run's `tokenizer` setting."""
    tok_dir = ckpt / "tokenizer"
    if (tok_dir / hrm_text.TOKENIZER_INFO_FILE).is_file():
        return hrm_text.read_tokenizer(tok_dir)
    return load_tokenizer(str(tok_dir) if tok_dir.is_dir() else cfg.tokenizer or "byte")


def load_trained(path: str | Path, use_ema: bool | None = None, device="cpu",
                 backend: str = "auto"):
    """(model in eval mode with attention `backend`, its run config, its tokenizer, the
    checkpoint directory) from a run directory, a checkpoint, or an `hrm_text` directory (whose
    run config is the defaults around its model, and whose tokenizer may be None)."""
    if hrm_text.is_hrm_text_dir(path):
        model = hrm_text.load_model(path, device=device, backend=backend)
        cfg = TrainConfig(model=model.cfg, attention_backend=backend)
        return model, cfg, hrm_text.read_tokenizer(path), Path(path)
    ckpt = resolve_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    cfg.attention_backend = backend
    model = PrefixLM(cfg.model, backend=backend)
    load_model_weights(ckpt, model, use_ema=cfg.use_ema if use_ema is None else use_ema)
    return model.to(device).eval(), cfg, checkpoint_tokenizer(ckpt, cfg), ckpt


# -- the best checkpoint ----------------------------------------------------------------------
# <ckpt_root>/best is a copy of the committed step with the best evaluation so far (hard links
# where the file system allows: DCP files are never rewritten), plus best.json {step, metric,
# mode, value}. Its name is no step_*, so rotation and resume never see it; `prefixlm eval` /
# `generate` / `export` load it like any checkpoint.

def read_best(ckpt_root: str | Path) -> dict | None:
    """best.json of the best checkpoint under `ckpt_root`, or None. Finishes a replacement
    that a crash interrupted (the previous best is put back)."""
    root = Path(ckpt_root)
    best, old = root / BEST, root / f".old-{BEST}"
    if old.is_dir() and not best.exists():
        old.rename(best)
    if not (best / BEST_RECORD).is_file() or verify(best) is not None:
        return None
    try:
        return json.loads((best / BEST_RECORD).read_text())
    except ValueError:
        return None


def _link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except OSError:  # another file system, or no hard links: a copy
            shutil.copy2(path, dest)


def keep_best(ckpt_root: str | Path, step_dir: str | Path, record: dict) -> Path:
    """Make the committed checkpoint `step_dir` the best one, with `record` as best.json.
    Single process (rank 0). A crash leaves the previous best or the new one, never neither."""
    root, step_dir = Path(ckpt_root), Path(step_dir)
    reason = verify(step_dir)
    if reason is not None:
        raise CheckpointError(f"cannot keep {step_dir} as the best checkpoint: {reason}")
    best, tmp, old = root / BEST, root / f".tmp-{BEST}", root / f".old-{BEST}"
    shutil.rmtree(tmp, ignore_errors=True)
    _link_tree(step_dir, tmp)
    write_bytes(tmp / BEST_RECORD, json.dumps(record).encode())
    fsync_dir(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if best.exists():
        best.rename(old)
    tmp.rename(best)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return best
