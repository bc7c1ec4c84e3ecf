"""Test fixtures for the trainer: a tiny in-memory packed loader with exact resume.

It follows the data layer's Batch contract (docs/interfaces.md) so trainer tests do not depend on
prepared datasets: sample = prefix ids + response ids[:-1]; the last prefix row predicts the first
response token; labels -100 elsewhere.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch

from prefixlm.attention import SeqInfo
from prefixlm.data import PackedLoader, V1Dataset
from prefixlm.data.synthetic import make_samples
from prefixlm.train.config import load_config
from prefixlm.train.distributed import Dist
from prefixlm.train.trainer import Trainer

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
SMALL = ["model.hidden=32", "model.heads=2", "model.layers=1", "model.ffn_hidden=64",
         "model.vocab_size=260", "capacity=256", "context_size=64", "lr=1e-2", "warmup_steps=2",
         "ema_decay=0.9", "progress=false", "tensorboard=false", "log_every=1",
         "attention_backend=sdpa"]


def small_config(run_dir, *extra):
    """A one-layer model's run config (CPU, sdpa, no progress bars) in `run_dir`."""
    return load_config(None, SMALL + [f"run_dir={run_dir}", *extra])


def trainer_on(cfg, prepared_dir):
    """A single-process CPU Trainer of `cfg` over the prepared dataset `prepared_dir`."""
    return Trainer(cfg, CPU, PackedLoader(V1Dataset(prepared_dir), cfg.capacity, seed=cfg.seed))


class Batch(NamedTuple):
    inputs: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    info: SeqInfo


def pack(samples: list[tuple[list[int], list[int]]], capacity: int, device="cpu") -> Batch:
    inputs = torch.zeros(capacity, dtype=torch.long)
    labels = torch.full((capacity,), -100, dtype=torch.long)
    positions = torch.zeros(capacity, dtype=torch.long)
    prefix_lens, causal_lens, at = [], [], 0
    for prefix, response in samples:
        seq = prefix + response[:-1]
        n = len(seq)
        inputs[at:at + n] = torch.tensor(seq)
        labels[at + len(prefix) - 1:at + n] = torch.tensor(response)
        positions[at:at + n] = torch.arange(n)
        prefix_lens.append(len(prefix))
        causal_lens.append(len(response) - 1)
        at += n
    info = SeqInfo.from_lengths(prefix_lens, causal_lens, capacity=capacity, device=device)
    return Batch(inputs.to(device), labels.to(device), positions.to(device), info)


def encode(samples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """Byte-level encoding with 256 = end of prefix, 257 = end of answer."""
    return [(list(s["instruction"].encode()) + [256], list(s["response"].encode()) + [257])
            for s in samples]


VOCAB = 258


class ListLoader:
    """Packs `samples` greedily into batches of `capacity` tokens, reshuffled each epoch,
    sharded round-robin by batch over ranks; endless; state_dict resumes exactly."""

    def __init__(self, samples, capacity, rank=0, world_size=1, seed=0, device="cpu"):
        self.samples, self.capacity = samples, capacity
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.position = 0  # global batch index consumed by this rank's stream

    def _epoch_batches(self, epoch):
        order = list(range(len(self.samples)))
        random.Random(self.seed * 1000 + epoch).shuffle(order)
        batches, current, used = [], [], 0
        for i in order:
            n = len(self.samples[i][0]) + len(self.samples[i][1]) - 1
            if used + n > self.capacity:
                batches.append(current)
                current, used = [], 0
            current.append(self.samples[i])
            used += n
        batches.append(current)
        return batches[: len(batches) // self.world_size * self.world_size]

    def __iter__(self):
        epoch_cache = {}
        while True:
            per_rank = len(self._epoch_batches(0)) // self.world_size
            epoch, index = divmod(self.position, per_rank)
            if epoch not in epoch_cache:
                epoch_cache = {epoch: self._epoch_batches(epoch)}
            self.position += 1
            yield pack(epoch_cache[epoch][index * self.world_size + self.rank], self.capacity,
                       self.device)

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def synthetic_loader(count=2000, capacity=512, seed=0, **kwargs):
    return ListLoader(encode(make_samples(count, seed)), capacity, seed=seed, **kwargs)
