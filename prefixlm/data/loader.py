"""Packed batches for one rank: fixed-length token tensors and the batch's `SeqInfo`.

Label convention (HRM-Text). A sample is prefix `inst` (I tokens) and response `resp` (R tokens, ending
with end-of-answer). With S = inst + resp:
    inputs       = S[:-1]                      (I + R - 1 tokens: inst + resp[:-1])
    labels       = S[1:], and -100 at the first I - 1 positions
    position_ids = 0, 1, ..., I + R - 2        (restart at 0 for every sample)
    prefix_len   = I, causal_len = R - 1
So the last prefix position is labelled with the first response token (not in the input: no leak),
and every causal position with the next response token. The other prefix positions are never
supervised: a prefix token attends bidirectionally to the whole prefix, including the token it would
predict. Padding up to `capacity`: input `pad_id`, label -100, position 0. Sample boundaries come from
the lengths alone (`SeqInfo`), never from positions.
"""

from __future__ import annotations

import queue
import threading
from typing import NamedTuple

import numpy as np
import torch

from ..attention import SeqInfo
from ..devices import to_device
from .dataset import EpochIndex, V1Dataset
from .sampler import PLANNER_VERSION, MultipackSampler, PackPlan

__all__ = ["Batch", "PackedLoader", "assemble_batch", "batch_on_device", "supervised_rows",
           "IGNORE_INDEX"]

IGNORE_INDEX = -100


class Batch(NamedTuple):
    inputs: torch.Tensor        # (capacity,) int64
    labels: torch.Tensor        # (capacity,) int64, -100 where unsupervised
    position_ids: torch.Tensor  # (capacity,) int64
    info: SeqInfo
    # (n,) int64, ascending: the rows whose label is not -100, found on the host when the labels
    # are built (selecting them on the device would sync); None: not given, use every row.
    supervised_rows: torch.Tensor | None = None


def supervised_rows(labels: np.ndarray) -> torch.Tensor:
    """The rows of a host label array that are supervised (label != -100), as an int64 tensor."""
    return torch.from_numpy(np.flatnonzero(np.asarray(labels) != IGNORE_INDEX).astype(np.int64))


def _exclusive_cumsum(x: np.ndarray) -> np.ndarray:
    out = np.zeros(len(x), np.int64)
    np.cumsum(x[:-1], out=out[1:])
    return out


def assemble_batch(tokens: np.ndarray, index: EpochIndex, sample_ids: np.ndarray, capacity: int,
                   pad_id: int = 0):
    """Host arrays of one batch: (rows (3, capacity) int64 = inputs/labels/positions, prefix, causal)."""
    ids = np.asarray(sample_ids, np.int64)
    inst_len = index.inst_len[ids]
    resp_len = index.resp_len[ids]
    full_len = inst_len + resp_len          # length of S = inst + resp
    seq_len = full_len - 1                  # tokens in the batch
    total = int(seq_len.sum())
    if total > capacity:
        raise ValueError(f"batch of {total} tokens exceeds capacity {capacity}")
    # Gather every sample's S from its two segments in one fancy-index read.
    seg_start = np.stack([index.inst_start[ids], index.resp_start[ids]], 1).ravel()
    seg_len = np.stack([inst_len, resp_len], 1).ravel()
    src = np.repeat(seg_start - _exclusive_cumsum(seg_len), seg_len) + np.arange(seg_len.sum())
    full = np.asarray(tokens[src], dtype=np.int64)

    sample_of = np.repeat(np.arange(len(ids)), seq_len)
    t = np.arange(total) - np.repeat(_exclusive_cumsum(seq_len), seq_len)
    pos_in_full = np.repeat(_exclusive_cumsum(full_len), seq_len) + t
    rows = np.empty((3, capacity), np.int64)
    rows[0, :total] = full[pos_in_full]
    rows[0, total:] = pad_id
    labels = full[pos_in_full + 1]
    labels[t < inst_len[sample_of] - 1] = IGNORE_INDEX
    rows[1, :total] = labels
    rows[1, total:] = IGNORE_INDEX
    rows[2, :total] = t
    rows[2, total:] = 0
    return rows, inst_len, index.causal_lens[ids]


def batch_on_device(rows: torch.Tensor, supervised: torch.Tensor, prefix, causal, capacity: int,
                    device=None) -> Batch:
    """The Batch of `assemble_batch`'s rows (as a tensor) and their `supervised_rows`, on `device`
    (None: stay on the CPU)."""
    if device is not None:
        rows, supervised = to_device(rows, device), to_device(supervised, device)
    info = SeqInfo.from_lengths(prefix, causal, capacity=capacity, device=device)
    return Batch(rows[0], rows[1], rows[2], info, supervised)


class PackedLoader:
    """Endless iterator of this rank's packed batches over the dataset's epochs.

    Loader epoch e reads the dataset's `epoch_{e % num_epochs}` and packs it with the multipack
    sampler seeded by (seed, e); every rank computes the same plan and takes its own batch of each
    step. `state_dict()` records the batches handed out so far; `load_state_dict()` makes the next
    `iter()` continue exactly after them.

    device: where batches go (None: stay on the CPU). On CUDA the host tensors are pinned in the
      background thread and copied asynchronously (`devices.to_device`). prefetch: batches assembled ahead in a
      background thread (0: assemble in the caller's thread).
    """

    def __init__(self, dataset, capacity: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, device=None, prefetch: int = 2, pad_id: int | None = None):
        if not isinstance(dataset, V1Dataset):
            dataset = V1Dataset(dataset)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if not isinstance(world_size, (int, np.integer)) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.dataset = dataset
        self.capacity = int(capacity)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)
        self.device = None if device is None else torch.device(device)
        self.prefetch = int(prefetch)
        self.pad_id = dataset.pad_id() if pad_id is None else int(pad_id)
        self._pin = self.device is not None and self.device.type == "cuda"
        self._samplers: dict[int, MultipackSampler] = {}
        self._plans: dict[int, PackPlan] = {}
        self._lock = threading.RLock()
        self._epoch = 0
        self._step = 0
        self._generation = 0
        self._sampler_for(0)  # validates epoch 0 and the capacity now rather than mid-training

    # -- plan -------------------------------------------------------------------------------
    def _sampler_for(self, epoch: int) -> MultipackSampler:
        k = epoch % self.dataset.num_epochs
        if k not in self._samplers:
            index = self.dataset.epoch(k)
            try:
                self._samplers[k] = MultipackSampler(index.prefix_lens, index.causal_lens,
                                                     self.capacity, world_size=self.world_size,
                                                     seed=self.seed)
            except ValueError as exc:
                raise ValueError(f"{self.dataset.path} epoch_{k}: {exc}") from None
        return self._samplers[k]

    def plan(self, epoch: int) -> PackPlan:
        # Both the prefetch thread and the caller ask for plans; keep the last two epochs.
        with self._lock:
            plan = self._plans.get(epoch)
            if plan is None:
                plan = self._sampler_for(epoch).plan(epoch)
                self._plans[epoch] = plan
                for old in sorted(self._plans)[:-2]:
                    del self._plans[old]
        if plan.num_steps == 0:
            raise ValueError(f"epoch {epoch} yields no batch: {len(plan.dropped)} samples cannot "
                             f"give each of the {self.world_size} ranks a batch")
        return plan

    def steps_in_epoch(self, epoch: int) -> int:
        return self.plan(epoch).num_steps

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._epoch

    @property
    def step(self) -> int:
        """Batches of the current epoch already handed out."""
        return self._step

    @property
    def batches_per_epoch(self) -> int:
        """Batches (per rank) in the current epoch; packing can change it slightly between epochs."""
        return self.steps_in_epoch(self._epoch)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "step": self._step, "seed": self.seed,
                "world_size": self.world_size, "rank": self.rank, "capacity": self.capacity,
                "num_samples": len(self.dataset.epoch(0)), "planner": PLANNER_VERSION}

    def load_state_dict(self, state: dict) -> None:
        state = {"planner": 1, **state}  # states without the key came from the first planner
        for key in ("seed", "world_size", "capacity", "num_samples", "planner"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"loader state has {key} = {state[key]!r} but this loader has "
                                 f"{mine!r}; resuming would not continue the same batches")
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or step < 0:
            raise ValueError(f"loader state has a negative position: epoch {epoch}, step {step}")
        steps = self.steps_in_epoch(epoch)
        if step > steps:
            raise ValueError(f"loader state step {step} is past the {steps} batches of epoch {epoch}")
        if step == steps:
            epoch, step = epoch + 1, 0
        self._epoch, self._step = epoch, step
        self._generation += 1  # an iterator started before this stops; iterate again

    # -- batches ------------------------------------------------------------------------------
    def host_batch(self, epoch: int, step: int):
        """(rows (3, capacity) int64, prefix_lens, causal_lens) of this rank's batch."""
        plan = self.plan(epoch)
        ids = plan.batch(step, self.rank)
        index = self.dataset.epoch(epoch % self.dataset.num_epochs)
        return assemble_batch(self.dataset.tokens, index, ids, self.capacity, self.pad_id)

    def _produce(self, epoch: int, step: int):
        rows, prefix, causal = self.host_batch(epoch, step)
        supervised = supervised_rows(rows[1])
        rows = torch.from_numpy(rows)
        if self._pin:
            rows, supervised = rows.pin_memory(), supervised.pin_memory()
        return rows, supervised, prefix, causal

    def _finish(self, item) -> Batch:
        return batch_on_device(*item, self.capacity, self.device)

    def _positions(self, epoch: int, step: int):
        while True:
            steps = self.steps_in_epoch(epoch)
            while step < steps:
                yield epoch, step
                step += 1
            epoch, step = epoch + 1, 0

    def __iter__(self):
        generation = self._generation
        start = (self._epoch, self._step)
        if self.prefetch == 0:
            for epoch, step in self._positions(*start):
                item = self._produce(epoch, step)
                if generation != self._generation:
                    raise RuntimeError("load_state_dict() was called during iteration; call iter() "
                                       "again to continue from the loaded state")
                self._advance(epoch, step)
                yield self._finish(item)
            return
        yield from self._iter_prefetch(start, generation)

    def _advance(self, epoch: int, step: int) -> None:
        if step + 1 >= self.steps_in_epoch(epoch):
            self._epoch, self._step = epoch + 1, 0
        else:
            self._epoch, self._step = epoch, step + 1

    def _iter_prefetch(self, start, generation):
        out: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                for epoch, step in self._positions(*start):
                    if not put((epoch, step, self._produce(epoch, step), None)):
                        return
            except BaseException as exc:  # handed to the consumer, which re-raises it
                put((None, None, None, exc))

        thread = threading.Thread(target=work, name="prefixlm-loader", daemon=True)
        thread.start()
        try:
            while True:
                epoch, step, item, error = out.get()
                if error is not None:
                    raise error
                if generation != self._generation:
                    raise RuntimeError("load_state_dict() was called during iteration; call iter() "
                                       "again to continue from the loaded state")
                self._advance(epoch, step)
                yield self._finish(item)
        finally:
            stop.set()
            thread.join(timeout=10)
