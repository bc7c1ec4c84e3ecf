"""Checkpoints with torch.distributed.checkpoint (DCP), committed atomically and checksummed.

Layout: <run_dir>/checkpoints/step_00000100/ holds DCP's shards of model, optimizer, EMA and step,
one `rank00000.pt` per rank with its loader and RNG states, config.yaml and tokenizer/, and `COMMIT`
(written last) listing every file with its size and CRC-32. A save goes to `.tmp-step_...`, gets its
COMMIT, then is renamed: a crash at any point leaves either no new directory or an uncommitted temp
one, and the previous checkpoint stays the newest complete one. Old checkpoints are pruned by a
rename to `.deleting-step_...` first, so an interrupted prune never leaves a `step_*` that is only
part of one. Temporary and half-deleted folders are removed by the next save (and the next run).
On resume, a checkpoint whose files do not match its COMMIT (truncated, missing, a flipped bit) or
that DCP cannot read is skipped with a warning naming the file, in favour of the previous one;
`load_model_weights` (generate, eval, export) refuses it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import sys
import warnings
import zlib
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
from .distributed import all_gather_object, all_reduce

__all__ = ["save_checkpoint", "load_checkpoint", "complete_checkpoints", "latest_checkpoint",
           "CheckpointError", "load_model_weights", "resolve_checkpoint", "load_trained",
           "checkpoint_config", "checkpoint_tokenizer", "keep_best", "read_best", "verify", "step_of",
           "file_crc32", "fill_optimizer_state", "remove_leftovers", "remove_checkpoints"]

COMMIT = "COMMIT"
_NAME = re.compile(r"^step_(\d+)$")
BEST, BEST_RECORD = "best", "best.json"
# What a save or a prune leaves behind when it is killed; nothing else in the folder starts so.
_LEFTOVER_PREFIXES = (".tmp-step_", ".deleting-")
# DCP's shard files are named __<rank>_<n>.distcp; ours rank<rank>.pt.
_RANK_OF_FILE = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank(\d+)\.pt)$")
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


def fill_optimizer_state(optimizer) -> None:
    """Give every parameter of an Adam/AdamW optimizer the state its first step would create
    (step 0, zero moments), exactly as `torch.optim.Adam` creates it lazily for a parameter's first
    gradient. A parameter that has had no gradient yet (one used only in HRM's no-grad cycles, or
    during a warm-up without gradient) otherwise has no state, and DCP can save only the state
    that exists but loads the state of every parameter. Numerically nothing changes: AdamW skips
    a parameter without gradient, and its first step from this state is the step it takes from
    its own fresh state. Other optimizers are left as they are."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return
    for group in optimizer.param_groups:
        fused, capturable = group.get("fused"), group.get("capturable")
        scalar = torch.float32 if fused or torch.get_default_dtype() != torch.float64 \
            else torch.float64
        for param in group["params"]:
            state = optimizer.state[param]
            if state:
                continue
            state["step"] = (torch.zeros((), dtype=scalar, device=param.device)
                             if fused or capturable else torch.tensor(0.0, dtype=scalar))
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(param,
                                                            memory_format=torch.preserve_format)


def _train_state(model, optimizer, ema: dict | None, step: int) -> dict:
    fill_optimizer_state(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(step)}
    if ema:
        state["ema"] = ema
    return state


def file_crc32(path: str | Path) -> str:
    """CRC-32 of a file's bytes as 8 hex digits (zlib's, streamed in 4 MiB blocks; zlib releases
    the GIL, and a file just written is read back from the page cache)."""
    crc, block = 0, bytearray(4 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _hashed_by(name: str, world: int) -> int:
    """The rank that checksums file `name`: the one that wrote it, else rank 0."""
    match = _RANK_OF_FILE.match(name)
    rank = int(match.group(1) or match.group(2)) if match else 0
    return rank if rank < world else 0


def _world() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def _as_os_error(exc: BaseException, where: Path) -> BaseException:
    """The OSError inside DCP's CheckpointException (disk full, permissions) with the path it was
    writing, so the CLI reports it in one line; other errors unchanged."""
    failures = getattr(exc, "failures", None) or {}
    for failure in failures.values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, OSError):
            exc = inner
            break
    if isinstance(exc, OSError) and exc.filename is None:
        return OSError(exc.errno, exc.strerror or str(exc), str(where))
    return exc


def _discard(path: Path):
    """Delete a checkpoint directory so that a crash midway never leaves a `step_*` holding part
    of one: one atomic rename out of the `step_*` names first, then the deletion."""
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    path.rename(doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(root: str | Path) -> list[Path]:
    """Remove what killed saves and prunes left in `root` (`.tmp-step_*`, `.deleting-*`); returns
    them. Only for a root no other process is writing (run_training holds the run's lock)."""
    root = Path(root)
    found = [p for p in root.iterdir() if p.name.startswith(_LEFTOVER_PREFIXES)] \
        if root.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found


def remove_checkpoints(root: str | Path):
    """Delete every checkpoint under `root`, the best one included (prefixlm train --overwrite),
    each crash-safely."""
    root = Path(root)
    doomed = [p for p in root.glob("step_*") if p.is_dir()]
    doomed += [p for p in (root / BEST, root / f".old-{BEST}", root / f".tmp-{BEST}") if p.is_dir()]
    for path in doomed:
        _discard(path)
    remove_leftovers(root)


def _checksum_share(tmp: Path, rank: int, world: int) -> dict:
    """{file: CRC-32} of the files under `tmp` that this rank checksums."""
    names = (str(p.relative_to(tmp)) for p in sorted(tmp.rglob("*")) if p.is_file())
    return {name: file_crc32(tmp / name) for name in names
            if name != COMMIT and _hashed_by(name, world) == rank}


def save_checkpoint(ckpt_root: str | Path, step: int, model, optimizer, ema: dict | None,
                    loader_state: dict, rank: int, keep: int = 3, write_extra=None) -> Path:
    """Save and commit step `step`; `write_extra(tmp_dir)` (rank 0) adds files such as the config
    and tokenizer before the commit, so they are covered by it. Every rank checksums the files it
    wrote. A failure on any rank (disk full, ...) is raised on every rank, with no collective
    left waiting, and the temporary folder is removed."""
    root = Path(ckpt_root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    world = _world()
    # A failure on one rank must not leave the others waiting in a collective: each phase
    # records its error, the ranks exchange them, and all raise together.
    setup_error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_leftovers(root)
            tmp.mkdir()
        except OSError as exc:
            setup_error = exc
    _raise_if_failed(setup_error, all_gather_object({"error": setup_error and str(setup_error)}),
                     tmp, rank)
    try:
        with warnings.catch_warnings():  # "assuming ... a single process" is what we mean
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save(_train_state(model, optimizer, ema, step), checkpoint_id=str(tmp))
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 -- DCP raises on every rank
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _as_os_error(exc, tmp) from None
    local_error = None
    try:
        local = {"loader": loader_state, "rng": rng_state(), "step": step}
        buffer = io.BytesIO()
        torch.save(local, buffer)
        write_bytes(tmp / f"rank{rank:05d}.pt", buffer.getvalue())
    except Exception as exc:  # noqa: BLE001 -- raised below, once every rank knows
        local_error = exc
    if rank == 0 and local_error is None and write_extra is not None:
        try:
            write_extra(tmp)
        except Exception as exc:  # noqa: BLE001
            local_error = exc
    crc = {}
    if local_error is None:
        try:
            crc = _checksum_share(tmp, rank, world)
        except OSError as exc:
            local_error = exc
    shares = all_gather_object({"crc32": crc, "error": None if local_error is None else str(local_error)})
    _raise_if_failed(local_error, shares, tmp, rank)
    commit_error = None
    if rank == 0:
        try:
            _commit(tmp, final, step, world, {k: v for share in shares
                                              for k, v in share["crc32"].items()})
            for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
                _discard(old)
        except OSError as exc:
            commit_error = exc
    _raise_if_failed(commit_error, all_gather_object({"error": commit_error and str(commit_error)}),
                     tmp, rank)
    return final


def _raise_if_failed(error, shares: list[dict], tmp: Path, rank: int):
    """Raise on every rank if any rank failed: its own error where it has one, else an OSError
    naming the first failed rank. Rank 0 removes the temporary folder (it holds the space)."""
    failed = [(r, share["error"]) for r, share in enumerate(shares) if share["error"]]
    if not failed:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if error is not None:
        raise _as_os_error(error, tmp)
    first_rank, message = failed[0]
    raise OSError(errno.EIO, f"rank {first_rank} could not save its part of the checkpoint "
                             f"({message})", str(tmp))


def _commit(tmp: Path, final: Path, step: int, world: int, crc: dict):
    """Write COMMIT (every file's size and CRC-32) and rename `tmp` to `final`."""
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*"))
             if p.is_file()}
    write_bytes(tmp / COMMIT, json.dumps({"step": step, "world_size": world, "files": files,
                                             "crc32": crc}).encode())
    fsync_dir(tmp)
    # A re-save of the same step (a resumed run ending there): the old one moves out of the way
    # in one rename, the new one moves in with the next.
    displaced = final.with_name(f".deleting-{final.name}") if final.exists() else None
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)
        final.rename(displaced)
    tmp.rename(final)
    fsync_dir(final.parent)
    if displaced is not None:
        shutil.rmtree(displaced, ignore_errors=True)


def verify(path: Path, rank: int = 0, world: int = 1) -> str | None:
    """None if `path` is a committed checkpoint whose files match its COMMIT, else the reason,
    naming the file. Sizes are checked for every file; checksums for the files that this rank
    checksummed at save time (all of them in a single process)."""
    marker = path / COMMIT
    if not marker.is_file():
        return "no COMMIT marker (the save did not finish)"
    try:
        commit = json.loads(marker.read_text())
        files, crc = commit["files"], commit.get("crc32")
        if not isinstance(files, dict) or not isinstance(crc, (dict, type(None))):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return "COMMIT marker is unreadable"
    if crc is None:
        return ("its COMMIT has no checksums: it was written by an older prefixlm, from before "
                "the HRM-Text model and checksummed checkpoints (README, Training); train it "
                "again")
    for name, size in files.items():
        f = path / name
        if name not in crc:
            return f"COMMIT has no checksum for file {name}"
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, COMMIT says {size}"
    for name, expected in crc.items():
        if _hashed_by(name, world) != rank:
            continue
        try:
            got = file_crc32(path / name)
        except OSError as exc:
            return f"file {name} cannot be read ({exc.strerror or exc})"
        if got != expected:
            return f"file {name} fails its checksum (CRC-32 {got}, COMMIT says {expected})"
    return None


def step_of(path: str | Path) -> int | None:
    """The step of a checkpoint folder `step_N`; None for another name."""
    match = _NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Committed checkpoints under `root`, oldest first (by step)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(step_of(path), path) for path in root.iterdir()
             if step_of(path) is not None and path.is_dir() and (path / COMMIT).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _warn(msg: str):
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
    world = _world()
    for candidate in candidates:
        reason = verify(candidate, rank, world)
        if reason is None:
            try:
                step, local = _load_one(candidate, model, optimizer, ema, rank)
            # DCP wraps read errors in CheckpointException, a BaseException.
            except (Exception, CheckpointException) as exc:  # noqa: BLE001
                reason, step, local = f"cannot be read ({type(exc).__name__}: {exc})", -1, None
        # Which ranks found it unusable: the first of them reports why (it alone knows).
        failed = torch.zeros(world)
        failed[rank] = 0 if reason is None else 1
        failed = all_reduce(failed)
        if failed.sum().item() == 0:
            return step, local, candidate
        reporter = int(failed.nonzero()[0])
        reason = reason or f"unusable on rank {reporter}"
        errors.append(f"{candidate}: {reason}")
        if not explicit and rank == reporter:
            _warn(f"skipping checkpoint {candidate}: {reason}")
    raise CheckpointError("no usable checkpoint: " + "; ".join(errors))


def load_model_weights(path: str | Path, model, use_ema: bool = True) -> bool:
    """Load the model (and, with use_ema, the EMA weights over it) from one checkpoint directory,
    in a single process whatever the world size it was saved with. Returns whether EMA was used."""
    path = Path(path)
    _check(path)
    return _load_weights(path, model, use_ema)


def _check(path: Path):
    reason = verify(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is not usable: {reason}")


def _load_weights(path: Path, model, use_ema: bool) -> bool:
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
    used_ema = "ema" in state
    if used_ema:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(state["ema"][name])
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise CheckpointError(f"checkpoint {path} holds non-finite values in "
                                  f"{'ema.' if used_ema else ''}{name}: the run diverged "
                                  "before this save; use an earlier checkpoint")
    return used_ema


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
    """The run config a committed checkpoint recorded (config.yaml); a CheckpointError naming
    the file when it is not valid YAML or not a run config."""
    config_file = ckpt / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{ckpt} has no config.yaml")
    try:
        values = yaml.safe_load(config_file.read_text())
        model = values.get("model") if isinstance(values, dict) else None
        if not isinstance(model, dict):
            raise ValueError("expected a mapping with a `model` mapping")
        if any(key in model for key in _OLD_CONFIG_KEYS):
            raise CheckpointError(f"checkpoint {ckpt}: {OLD_ARCHITECTURE}")
        cfg = config_from_dict(values)
        cfg.model.validate()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CheckpointError(f"{config_file} is not valid YAML: {exc.problem}{where}") from None
    except CheckpointError:
        raise
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{config_file} is not a valid run config: {exc}") from None
    return cfg


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
    _check(ckpt)  # before reading anything of it: config.yaml is covered by the checksums too
    cfg = checkpoint_config(ckpt)
    cfg.attention_backend = backend
    model = PrefixLM(cfg.model, backend=backend)
    _load_weights(ckpt, model, use_ema=cfg.use_ema if use_ema is None else use_ema)
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
