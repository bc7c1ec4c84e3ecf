"""Weights & Biases sink for the run's metric records (rank 0), beside metrics.jsonl and
TensorBoard.

A record {"kind": K, "step": S, key: value, ...} is logged as {"K/key": value} at step S, so a
train and an eval record of one step share a history row. W&B drops a step lower than one it has
seen, so after a resume the records of steps already logged are skipped here. The run id is kept
in <run_dir>/wandb_id: a resumed run continues the same W&B run (online; offline, each process
writes its own run files under <run_dir>/wandb, which `wandb sync` uploads).
"""

from __future__ import annotations

import math
import secrets
from pathlib import Path

from ..extras import require

__all__ = ["WandbLog"]


class WandbLog:
    def __init__(self, cfg, run_dir: str | Path, extra_config: dict | None = None):
        wandb = require("wandb", "wandb", "wandb=true")
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        # Like HRM-Text: no system-metrics sampler process beside the training.
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None,
                              name=cfg.wandb_name or run_dir.resolve().name,
                              mode=cfg.wandb_mode or None, dir=str(run_dir), id=run_id,
                              resume="allow", config={**cfg.to_dict(), **(extra_config or {})},
                              settings=wandb.Settings(x_disable_stats=True))
        self.last_step = -1

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        if step < self.last_step:
            return
        kind = record.get("kind", "train")
        values = {f"{kind}/{key}": value for key, value in record.items()
                  if key not in ("kind", "step") and isinstance(value, (int, float))
                  and not isinstance(value, bool) and math.isfinite(value)}
        self.run.log(values, step=step)
        self.last_step = step

    def close(self) -> None:
        self.run.finish()
