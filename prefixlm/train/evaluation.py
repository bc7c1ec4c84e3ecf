"""Evaluation during training: the run's evaluation tasks (`eval_tasks`), their metrics on the
model being trained, and the best checkpoint so far (`best_metric`, `best_mode`).

Every rank evaluates (the forward passes of an FSDP2 model are collective); generation takes
rank 0's tokens on every rank, so the ranks never take different paths. Only rank 0 logs and
writes the best checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.distributed as torch_dist

from ..evaluate import parse_task_spec, run_tasks
from . import checkpoint as ckpt
from .distributed import all_gather_object, all_reduce, barrier, collective_device, reshard_all

__all__ = ["tasks_from_config", "task_metrics", "BestCheckpoint"]


def tasks_from_config(cfg) -> list:
    """The `eval_tasks` specs (comma-separated) with the run's eval_task_* overrides."""
    tasks = [parse_task_spec(spec.strip()) for spec in cfg.eval_tasks.split(",") if spec.strip()]
    for task in tasks:
        if cfg.eval_task_limit:
            task.limit = cfg.eval_task_limit
        if cfg.eval_task_max_new_tokens:
            task.generation.cap_new_tokens(cfg.eval_task_max_new_tokens)
        if cfg.eval_task_condition != "preset":
            task.condition = ("" if cfg.eval_task_condition in ("", "none")
                              else cfg.eval_task_condition)
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"eval_tasks: task names must differ, got {', '.join(names)} (name them "
                         "NAME:PRESET=FILE)")
    return tasks


def _rank0_tokens(tokens: torch.Tensor) -> torch.Tensor:
    on = tokens.to(collective_device(tokens))
    torch_dist.broadcast(on, src=0)
    return on.cpu()


def task_metrics(model, tokenizer, tasks, cfg, distributed: bool, autocast) -> dict:
    """{"TASK/METRIC": value} of `tasks` on `model` (HRM-Text's metric keys)."""
    # Generation's shapes change every step: compiled blocks would recompile at each.
    eager = torch.compiler.set_stance("force_eager") if cfg.compile else contextlib.nullcontext()
    with eager, autocast:
        results, _ = run_tasks(model, tokenizer, tasks, batch_size=cfg.eval_task_batch_size,
                               seed=cfg.seed, agree_tokens=_rank0_tokens if distributed else None)
    reshard_all(model)
    return {f"{name}/{key}": value for name, entry in results["tasks"].items()
            for key, value in entry["metrics"].items()}


class BestCheckpoint:
    """Which evaluation was best so far, and keeping its checkpoint in checkpoints/best."""

    def __init__(self, cfg):
        self.metric = cfg.best_metric                 # "eval/KEY"
        self.key = self.metric.removeprefix("eval/")
        mode = cfg.best_mode
        if mode == "auto":
            mode = "min" if "loss" in self.key.rsplit("/", 1)[-1] else "max"
        self.mode = mode
        self.record: dict | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.metric)

    def load(self, ckpt_root, rank: int) -> None:
        """The best so far of a resumed run (none when it was kept by another metric). Rank 0
        reads it (read_best may finish an interrupted replacement: one process renames) and
        the others take its record."""
        record = None
        if self.enabled:
            record = all_gather_object(ckpt.read_best(ckpt_root) if rank == 0 else None)[0]
        if record is not None and (record.get("metric"), record.get("mode")) != (self.metric,
                                                                                  self.mode):
            if rank == 0:
                print(f"prefixlm: warning: checkpoints/best was kept by {record.get('metric')} "
                      f"({record.get('mode')}); this run keeps the best by {self.metric} "
                      f"({self.mode}) from now on", file=sys.stderr)
            record = None
        self.record = record

    def value(self, result: dict) -> float:
        if self.key not in result:
            raise ValueError(f"best_metric={self.metric}: the evaluation has no {self.key!r}; it "
                             f"has {', '.join('eval/' + k for k in sorted(result))}")
        return float(result[self.key])

    def improves(self, result: dict) -> bool:
        """Whether `result` beats the best so far (on any rank: every rank then saves)."""
        value = self.value(result)
        better = math.isfinite(value) and (
            self.record is None or (value > self.record["value"] if self.mode == "max"
                                    else value < self.record["value"]))
        return bool(all_reduce(torch.tensor([float(better)]), "max").item())

    def keep(self, ckpt_root, step_dir, step: int, result: dict, rank: int) -> None:
        self.record = {"step": step, "metric": self.metric, "mode": self.mode,
                       "value": self.value(result), "checkpoint": step_dir.name}
        if rank == 0:
            ckpt.keep_best(ckpt_root, step_dir, self.record)
        barrier()
