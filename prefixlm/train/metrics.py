"""Per-batch statistics on the device, and the run's logs (JSONL, TensorBoard when installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import IGNORE_INDEX
from ..devices import to_device
from ..fsutil import write_atomic

__all__ = ["batch_stats", "MetricsLog", "peak_flops"]


def batch_stats(logits: torch.Tensor, labels: torch.Tensor, info,
                rows: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Summed cross-entropy, token counts and exactly-right samples of one packed batch.

    Sums, not means: the trainer divides by the global supervised-token count. A sample is exact
    when every one of its supervised tokens is predicted (argmax) right; samples with no supervised
    token are not counted. `logits` has a row per batch row, or with `rows` (int64 row indices)
    one per listed row, which must then include every supervised row (the trainer checks the
    count). Stays on the device (no sync).
    """
    capacity = labels.shape[0]
    # Row -> sample map, padding rows -> `slots`. Built with numpy: torch's CPU ops on these small
    # host tensors wake the intra-op thread pool, which holds the host for milliseconds while the
    # GPU waits.
    lens = info.host_lens.numpy()
    sample_of = np.full(capacity, info.slots, dtype=np.int64)
    sample_of[:info.total] = np.repeat(np.arange(info.slots), lens[0] + lens[1])
    sample_of = to_device(torch.from_numpy(sample_of), labels.device)
    if rows is None:
        logits = logits[:capacity]
    else:
        labels, sample_of = labels[rows], sample_of[rows]
    logits = logits.float()
    supervised = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    wrong = supervised & (logits.argmax(-1) != labels)
    per_sample = torch.zeros(info.slots + 1, 2, device=labels.device, dtype=torch.long)
    per_sample.index_add_(0, sample_of, torch.stack([supervised, wrong], 1).long())
    per_sample = per_sample[: info.slots]
    has = per_sample[:, 0] > 0
    return {
        "ce_sum": ce,
        "tokens": supervised.sum(),
        "correct": (supervised & ~wrong).sum(),
        "samples": has.sum(),
        "exact": (has & (per_sample[:, 1] == 0)).sum(),
    }


_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0,
                     "4090": 165.0}


def peak_flops(device: torch.device, configured_tflops: float) -> float | None:
    if configured_tflops > 0:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl`; mirrors scalars to TensorBoard and
    to `sinks` (objects with write(record) and close(), e.g. `wandb_log.WandbLog`).

    `start(step)` opens the log of a run that continues from `step` (0 for a fresh one): records
    of later steps, left by a run that went further before it was killed, are dropped, so every
    step appears once however often a run resumes. The JSONL file is rewritten atomically; the
    TensorBoard writer gets `purge_step=step + 1`, which makes TensorBoard hide the older events of
    those steps."""

    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool, sinks=()):
        self.enabled = enabled
        self.sinks = list(sinks) if enabled else []
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(run_dir) / "tensorboard"
        self.tensorboard = enabled and tensorboard
        self.writer = None

    def start(self, step: int):
        if not self.enabled:
            return
        if self.path.is_file():
            lines = self.path.read_text().splitlines()
            kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
            if kept != lines:
                write_atomic(self.path, "".join(line + "\n" for line in kept).encode())
        if self.writer is None:
            self.writer = self._open_writer(purge_step=step + 1)

    def _open_writer(self, purge_step: int | None = None):
        if not self.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            self.tensorboard = False
            return None
        return SummaryWriter(str(self.tensorboard_dir), purge_step=purge_step)

    def write(self, record: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None:
            self.writer = self._open_writer()
        if self.writer is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.writer.add_scalar(f"{record.get('kind', 'train')}/{key}", value, step)
        for sink in self.sinks:
            sink.write(record)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _step_of(line: str) -> int | None:
    """The step of one JSONL record; None for a line torn by a kill or not ours."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, KeyError, TypeError):
        return None
