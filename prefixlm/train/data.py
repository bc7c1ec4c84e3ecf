"""From the run's `data` setting to loaders: JSONL -> prepare_sft -> V1Dataset -> PackedLoader.

`data=""` writes the built-in synthetic task (train and held-out JSONL) into <run_dir>/data first.
Preparation runs on rank 0 once per run directory (a resumed run reuses it), the others wait.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .config import TrainConfig
from .distributed import Dist, barrier
from .synthetic import make_split, write_jsonl

__all__ = ["RunData", "build_data", "eval_batches_from"]


class RunData:
    def __init__(self, train_loader, eval_dataset, tokenizer, train_path, eval_path):
        self.train_loader = train_loader
        self.eval_dataset = eval_dataset
        self.tokenizer = tokenizer
        self.train_path = train_path
        self.eval_path = eval_path


def _prepared(path: str | Path, out_dir: Path, cfg: TrainConfig, dist: Dist, name: str) -> Path:
    """A prepared dataset directory for `path` (JSONL file or already prepared directory)."""
    from ..data.prepare import prepare_sft

    path = Path(path)
    if path.is_dir():
        return path
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    # The prepared copy is named after everything it depends on, so editing the JSONL or changing
    # the tokenizer / context size prepares afresh instead of reusing a stale copy.
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(cfg.tokenizer),
                      cfg.context_size, cfg.seed])
    target = out_dir / f"{name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if dist.is_main and not (target / "metadata.json").exists():
        prepare_sft([str(path)], str(target), tokenizer=cfg.tokenizer,
                    context_size=cfg.context_size, seed=cfg.seed, progress=cfg.progress,
                    log=lambda message: None)
    barrier()
    return target


def build_data(cfg: TrainConfig, dist: Dist) -> RunData:
    from ..data.dataset import V1Dataset
    from ..data.loader import PackedLoader

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
    train_dir = _prepared(train_src, data_dir, cfg, dist, "train")
    dataset = V1Dataset(str(train_dir))
    tokenizer = dataset.tokenizer()
    loader = PackedLoader(dataset, cfg.capacity, rank=dist.rank, world_size=dist.world_size,
                          seed=cfg.seed, device=dist.device)
    eval_dataset = None
    if eval_src:
        eval_dataset = V1Dataset(str(_prepared(eval_src, data_dir, cfg, dist, "heldout")))
    return RunData(loader, eval_dataset, tokenizer, train_dir, eval_src)


def eval_batches_from(dataset, cfg: TrainConfig, device, max_samples: int = 0):
    """A callable giving one pass over the held-out set. Every rank evaluates the whole set (same
    forward passes everywhere, as FSDP2's collectives require); results are not summed."""
    from ..data.loader import PackedLoader

    def batches():
        loader = PackedLoader(dataset, cfg.capacity, rank=0, world_size=1, seed=cfg.seed,
                              device=device, prefetch=0)
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
    from ..attention import SeqInfo

    info = batch.info
    prefix, causal = info.prefix_host()[:keep], info.causal_host()[:keep]
    end = int((prefix + causal).sum())
    labels = batch.labels.clone()
    labels[end:] = -100
    new_info = SeqInfo.from_lengths(prefix, causal, capacity=info.capacity, device=info.device,
                                    max_samples=info.slots)
    return type(batch)(batch.inputs, labels, batch.position_ids, new_info)
