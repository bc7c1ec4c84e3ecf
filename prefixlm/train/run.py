"""A training run end to end: its data, its trainer, the loop, the final checkpoint and evaluation.

Data: the run's `data` setting -> JSONL -> prepare_sft -> V1Dataset -> PackedLoader. `data=""`
writes the built-in synthetic task (train and held-out JSONL) into <run_dir>/data first.
Preparation runs on rank 0 once per run directory (a resumed run reuses it), the others wait.
A prepared directory (ours, HRM-Text's SFT output, data_io's sampled output) is read as it is, with
the tokenizer, markers and conditions its tokenizer_info names (`tokenizer=` replaces the file).
With `init_from`, the data is tokenized with the source's tokenizer (`train.init_from`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from ..attention import SeqInfo
from ..data.dataset import V1Dataset
from ..data.loader import IGNORE_INDEX, PackedLoader
from ..data.prepare import FORMAT, prepare_sft
from ..data.tokenizer import load_tokenizer
from ..data.synthetic import make_split, write_jsonl
from ..fsutil import file_sha256
from .checkpoint import complete_checkpoints, remove_checkpoints, remove_leftovers, step_of
from .config import TrainConfig
from .distributed import Dist, all_reduce, barrier, setup, teardown
from .init_from import check_model, init_source
from .lock import lock_run_dir
from .signals import GracefulStop
from .trainer import SCHEDULE_KEYS, NonFiniteLossError, NonFiniteWeightError, Trainer, lr_at

__all__ = ["RunData", "RunError", "build_data", "eval_batches_from", "run_eval_source",
           "prepared_dataset", "run_training"]


class RunError(ValueError):
    """A run that cannot start or go on, for a reason the user can fix (the message says how)."""


class RunData:
    def __init__(self, train_loader, eval_dataset, tokenizer, train_path, eval_path, notes=()):
        self.train_loader = train_loader
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        self.train_path = train_path
        self.eval_path = eval_path
        self.notes = list(notes)  # lines about the data for the run's log


def prepared_dataset(path: str | Path, out_dir: Path, cfg: TrainConfig, dist: Dist,
                     name: str, tokenizer=None) -> Path:
    """A prepared dataset directory for `path` (JSONL file or already prepared directory); a
    JSONL is tokenized with `tokenizer` (an object from `load_tokenizer`; None: `cfg.tokenizer`)."""
    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    # The prepared copy is named after the contents of everything it depends on (the JSONL, the
    # tokenizer's files and markers) and the settings, so editing the JSONL or replacing the
    # tokenizer.json at the same path prepares afresh instead of reusing a stale copy.
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer or "byte")
    key = json.dumps([file_sha256(path), tokenizer.fingerprint(), cfg.context_size, cfg.seed,
                      FORMAT])
    target = out_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if dist.is_main and not (target / "metadata.json").exists():
        prepare_sft([str(path)], str(target), tokenizer=tokenizer,
                    context_size=cfg.context_size, seed=cfg.seed, progress=cfg.progress,
                    log=lambda message: None)
    barrier()
    return target


def build_data(cfg: TrainConfig, dist: Dist, tokenizer=None) -> RunData:
    """The run's loader and held-out set, tokenized with `tokenizer` (None: `cfg.tokenizer`)."""
    data_dir = Path(cfg.run_dir) / "data"
    train_src, eval_src = cfg.data, cfg.eval_data
    if not train_src:
        tag = f"{cfg.synthetic_train}-{cfg.synthetic_eval}-{cfg.seed}"
        train_src = data_dir / f"synthetic-train-{tag}.jsonl"
        default_eval = data_dir / f"synthetic-heldout-{tag}.jsonl"
        if dist.is_main and not train_src.exists():
            train_samples, held_out = make_split(cfg.synthetic_train, cfg.synthetic_eval, cfg.seed)
            write_jsonl(held_out, default_eval)
            write_jsonl(train_samples, train_src)
        barrier()
        eval_src = eval_src or default_eval
    train_dir = prepared_dataset(train_src, data_dir, cfg, dist, "train", tokenizer)
    dataset = V1Dataset(str(train_dir))
    given_dir = Path(train_src).is_dir()
    tokenizer = dataset.tokenizer((cfg.tokenizer or None) if given_dir else None)
    if dataset.vocab_size is None:  # the loader checks every batch's ids against it
        dataset.vocab_size = tokenizer.vocab_size
    loader = PackedLoader(dataset, cfg.capacity, rank=dist.rank, world_size=dist.world_size,
                          seed=cfg.seed, device=dist.device, min_causal=cfg.min_causal)
    eval_dataset = None
    if eval_src:
        # Held-out JSONL is tokenized as the training data was (a given dataset's markers too).
        eval_dataset = V1Dataset(str(prepared_dataset(eval_src, data_dir, cfg, dist, "heldout",
                                                      tokenizer)))
    return RunData(loader, eval_dataset, tokenizer, train_dir, eval_src,
                   data_notes(dataset, tokenizer, cfg.min_causal) if given_dir else [])


def data_notes(dataset: V1Dataset, tokenizer, min_causal: int) -> list[str]:
    """What the run's log says about a prepared dataset it was given."""
    skipped = dataset.count_short(min_causal)
    per_epoch = ", ".join(f"epoch {k}: {n}" for k, n in enumerate(skipped))
    return [f"data: {dataset.num_epochs} epochs written by {dataset.origin}; tokenizer "
            f"{getattr(tokenizer, 'path', tokenizer.kind)} ({tokenizer.vocab_size} tokens), "
            f"conditions {', '.join(tokenizer.condition_ids) or 'none'}",
            f"data: skipping samples with fewer than min_causal={min_causal} causal tokens: "
            + (f"{sum(skipped)} ({per_epoch})" if any(skipped) else "none")]


def eval_batches_from(dataset, cfg: TrainConfig, device, max_samples: int = 0):
    """A callable giving one pass over the held-out set, or its first `max_samples` samples (0:
    all). Every rank evaluates the whole set (same forward passes everywhere, as FSDP2's
    collectives require); results are not summed."""
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
        raise ValueError(f"max_samples must be an int >= 0 (0: every sample), got {max_samples!r}")

    def batches():
        loader = PackedLoader(dataset, cfg.capacity, rank=0, world_size=1, seed=cfg.seed,
                              device=device, prefetch=0, min_causal=cfg.min_causal)
        count = loader.batches_per_epoch
        out, seen = [], 0
        for batch in loader:
            if max_samples and seen + batch.info.num_samples > max_samples:
                batch = _first_samples(batch, max_samples - seen)
            out.append(batch)
            seen += batch.info.num_samples
            if len(out) == count or (max_samples and seen >= max_samples):
                break
        return out

    return batches


def run_eval_source(cfg: TrainConfig, run_dir: str | Path | None = None) -> str | None:
    """The held-out data a run was configured with (its synthetic split by default)."""
    if cfg.eval_data:
        return cfg.eval_data
    if not cfg.data:
        tag = f"{cfg.synthetic_train}-{cfg.synthetic_eval}-{cfg.seed}"
        path = Path(run_dir or cfg.run_dir) / "data" / f"synthetic-heldout-{tag}.jsonl"
        return str(path) if path.is_file() else None
    return None


def _first_samples(batch, keep: int):
    """The batch with only its first `keep` samples (the rest become padding)."""
    info = batch.info
    prefix, causal = info.prefix_host()[:keep], info.causal_host()[:keep]
    end = int((prefix + causal).sum())
    labels = batch.labels.clone()
    labels[end:] = IGNORE_INDEX
    new_info = SeqInfo.from_lengths(prefix, causal, capacity=info.capacity, device=info.device,
                                    max_samples=info.slots)
    return type(batch)(batch.inputs, labels, batch.position_ids, new_info)


def check_capacity_fits(cfg: TrainConfig, device: torch.device):
    """Refuse a `capacity` whose micro-batch cannot fit the device whatever the model: a lower
    bound (the loader's int64 token and slot buffers, and two fp32 activations of `hidden` per
    token, the embedding's output and the last hidden state) against the device's total memory."""
    host = cfg.capacity * 6 * 8
    activations = cfg.capacity * cfg.model.hidden * 4 * 2
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        need = activations
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        need = activations + host
    if need > total:
        raise RunError(f"capacity={cfg.capacity} needs at least {need / 2**30:.1f} GiB on {device} "
                       f"for one micro-batch (token buffers and activations of model.hidden="
                       f"{cfg.model.hidden}), more than its {total / 2**30:.1f} GiB; lower "
                       f"capacity (raise grad_accum to keep the batch size)")


def _setting(values, key: str):
    """`key` ("lr", "model.bp_max_steps") of a config or of its saved dict; None if absent."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else getattr(values, part, None)
    return values


def check_schedule(cfg: TrainConfig, checkpoint: Path, new_schedule: bool) -> list[str]:
    """The schedule settings (SCHEDULE_KEYS) that differ from those `checkpoint` was trained with;
    a RunError naming them unless `new_schedule`. Resuming with another `steps` would silently
    move the cosine (and HRM's bp warm-up) under the steps left."""
    saved = yaml.safe_load((checkpoint / "config.yaml").read_text())
    changed = [f"{key}={_setting(saved, key)} -> {_setting(cfg, key)}" for key in SCHEDULE_KEYS
               if _setting(saved, key) is not None and _setting(saved, key) != _setting(cfg, key)]
    if changed and not new_schedule:
        step = step_of(checkpoint)
        old = dataclasses.replace(cfg, **{k: saved[k] for k in SCHEDULE_KEYS if k in saved})
        then, now = lr_at(step, old), lr_at(step, cfg)
        example = f" (lr of step {step + 1}: {now:.3g} instead of {then:.3g})" if then != now \
            else ""
        raise RunError(
            f"{checkpoint} was trained on another schedule ({', '.join(changed)}): the steps "
            f"left would follow the new one{example}. Resume with the run's settings, or pass "
            f"--new-schedule to continue on the new schedule deliberately")
    return changed


def run_training(cfg: TrainConfig, *, resume: bool = False, resume_from: str | None = None,
                 overwrite: bool = False, new_schedule: bool = False) -> dict:
    """Train `cfg` to its last step (resuming or starting over as asked), save the final
    checkpoint and evaluate on the held-out data. Prints progress on rank 0; returns
    {"checkpoint", "eval" (or None), "elapsed_s", "stopped" (the signal's name, or None)}.

    The run holds `run_dir`'s lock throughout (a second trainer is refused, nothing deleted). A
    first SIGTERM/SIGINT during training ends it after the current step with a checkpoint and no
    evaluation; a second one stops at once. `new_schedule` allows resuming with other
    SCHEDULE_KEYS (the learning rate then follows the new settings from the resumed step on)."""
    dist = setup(cfg.device)
    if cfg.max_threads:
        torch.set_num_threads(cfg.max_threads)
    elif dist.device.type == "cpu" and cfg.model.hidden <= 256:
        torch.set_num_threads(1)
    lock = None
    try:
        if overwrite and (resume or resume_from):
            raise RunError("--overwrite starts over and --resume continues: pass one of them")
        check_capacity_fits(cfg, dist.device)
        say = print if dist.is_main else (lambda *a, **k: None)
        lock = lock_run_dir(cfg.run_dir, dist.rank)
        if lock is not None and lock.stale:
            print(f"prefixlm: warning: taking over {lock.path}: its holder, pid "
                  f"{lock.stale.get('pid', '?')} on host {lock.stale.get('host', '?')}, ended "
                  "without releasing it", file=sys.stderr)
        run_dir = Path(cfg.run_dir)
        ckpt_root = run_dir / "checkpoints"
        if dist.is_main:
            remove_leftovers(ckpt_root)
        existing = complete_checkpoints(ckpt_root)
        if overwrite:
            if dist.is_main:
                remove_checkpoints(ckpt_root)
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
            barrier()
            existing = []
        if existing and not (resume or resume_from):
            raise RunError(f"{cfg.run_dir} already holds checkpoints (newest {existing[-1].name}); "
                           f"pass --resume to continue it, --overwrite to start over, or "
                           f"run_dir=OTHER")
        started = time.perf_counter()
        resuming = bool(resume_from or (resume and complete_checkpoints(ckpt_root)))
        tokenizer, source = None, None
        if cfg.init_from:
            source = init_source(cfg.init_from)
            if not cfg.tokenizer and source.tokenizer is not None:
                tokenizer = source.tokenizer
            if cfg.model.vocab_size == 0:
                cfg.model.vocab_size = source.model.vocab_size
            check_model(source, cfg.model)  # before the data is prepared
        data = build_data(cfg, dist, tokenizer)
        vocab = data.tokenizer.vocab_size
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                           f"tokenizer's {vocab}")
        eval_batches = None
        if data.eval_dataset is not None:
            eval_batches = eval_batches_from(data.eval_dataset, cfg, dist.device,
                                             cfg.eval_max_samples)
        trainer = Trainer(cfg, dist, data.train_loader, eval_batches=eval_batches,
                          tokenizer=data.tokenizer, initialize=not resuming)
        say(f"prefixlm train: {cfg.model.preset} model ({cfg.model.arch}, "
            f"{trainer.model.num_params() / 1e6:.2f}M params) on {dist.device} x{dist.world_size}, "
            f"{cfg.steps} steps of {cfg.capacity * cfg.grad_accum * dist.world_size} tokens; "
            f"data {data.train_path}; logs {run_dir / 'metrics.jsonl'}", flush=True)
        if source is not None and not resuming:
            say(f"initialized from {source.path} (weights only)", flush=True)
        for line in data.notes:
            say(line, flush=True)
        if resume or resume_from:
            if resuming:
                path = trainer.resume(resume_from)
                changed = check_schedule(cfg, path, new_schedule)
                say(f"resumed from {path} (step {trainer.step})"
                    + (f" on a new schedule ({', '.join(changed)})" if changed else ""), flush=True)
            else:
                say(f"no checkpoint in {ckpt_root} yet: starting from step 0", flush=True)
        # From the first step until the last checkpoint is written, a stop signal costs at most
        # the step in progress; after it, signals act as usual (the evaluation is not worth a
        # wait).
        with GracefulStop() as stop:
            trainer.stop = stop
            try:
                trainer.fit()  # ends with the last step's checkpoint written
            except (NonFiniteLossError, NonFiniteWeightError) as exc:
                raise RunError(str(exc)) from None
            # A signal after the last step's vote reached only some ranks: agree once more.
            stopped = all_reduce(torch.tensor([float(stop.requested)])).item() > 0
        if stopped:
            trainer.close()
            why = stop.signal_name or "a stop signal on another rank"
            say(f"prefixlm train: stopped by {why} after step {trainer.step}; checkpoint: "
                f"{trainer.last_checkpoint} (continue with --resume)", flush=True)
            return {"checkpoint": trainer.last_checkpoint, "eval": None,
                    "elapsed_s": time.perf_counter() - started, "stopped": why}
        result = trainer.evaluate()
        trainer.close()
        elapsed = time.perf_counter() - started
        weights = "EMA weights" if trainer.ema is not None and cfg.use_ema else "weights"
        if result is not None and "exact_match" in result:
            say(f"held-out exact match: {100 * result['exact_match']:.1f}% of "
                f"{result['samples']} samples (token accuracy {100 * result['token_acc']:.1f}%, "
                f"loss {result['loss']:.3f}, {weights})")
        for task in trainer.eval_tasks:
            key = f"{task.name}/{task.headline}"
            say(f"task {task.name}: {task.headline} {result[key]:.4f} ({weights})")
        if trainer.best.record is not None:
            best = trainer.best.record
            say(f"best checkpoint: {trainer.ckpt_root / 'best'} (step {best['step']}, "
                f"{best['metric']} {best['value']:.4f})")
        say(f"checkpoint: {trainer.last_checkpoint}")
        say(f"done in {elapsed:.0f}s. Try: prefixlm generate --checkpoint {cfg.run_dir} "
            f"--prompt \"reverse hello\"")
        return {"checkpoint": trainer.last_checkpoint, "eval": result, "elapsed_s": elapsed,
                "stopped": None}
    finally:
        if lock is not None:
            lock.release()
        teardown()
