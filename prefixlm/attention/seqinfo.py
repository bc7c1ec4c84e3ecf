"""Metadata of a packed PrefixLM batch.

A batch is a concatenation of samples; sample i is `prefix_lens[i]` prefix tokens followed by
`causal_lens[i]` causal (response) tokens. Tokens past the last sample up to the batch capacity are
padding.

`SeqInfo` keeps two views of the same numbers: device tensors that kernels read, and host integers
that launch code needs (grid sizes, max lengths), so nothing on the hot path waits on the GPU with
`.item()`. With a fixed `capacity` the device tensors are padded to a fixed number of sample slots
(`max_samples`, empty samples at the end), so every batch of that capacity has the same tensor
shapes and `torch.compile` reuses one graph.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
import torch

from ..devices import to_device

__all__ = ["SeqInfo", "BatchMeta", "batch_cache"]

_INT32_END = 2**31  # offsets, lengths and capacities must stay below it


def _as_lengths(name: str, values) -> np.ndarray:
    """Validate a 1-D sequence of non-negative integers and return it as int64 numpy."""
    if isinstance(values, torch.Tensor):
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise ValueError(f"{name} must hold integers, got a tensor of dtype {values.dtype}")
        arr = values.detach().cpu().numpy()
    else:
        arr = np.asarray(values)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        bad = int(np.flatnonzero(arr < 0)[0])
        raise ValueError(f"{name}[{bad}] = {int(arr[bad])} is negative; lengths must be >= 0")
    return arr


class SeqInfo:
    """Lengths of the samples in one packed batch, on the host and on the device.

    Build it with :meth:`from_lengths` or :meth:`from_cu_seqlens`.

    Device tensors (int32, `slots` samples; slots past `num_samples` are empty samples that start
    at `total`):
      cu_seqlens  (slots + 1,)  start offset of every sample, then the end of the last one
      prefix_lens (slots,)      prefix tokens per sample
      causal_lens (slots,)      causal tokens per sample
    Host values: `total`, `num_samples`, `max_prefix`, `max_causal`, `max_seqlen`, `capacity`,
    `slots`, and `host_lens`, a CPU int64 tensor (2, slots) of prefix and causal lengths that the
    attention op reads without touching the GPU.
    """

    __slots__ = (
        "cu_seqlens", "prefix_lens", "causal_lens", "host_lens", "total", "num_samples",
        "max_prefix", "max_causal", "max_seqlen", "capacity", "slots", "_cache",
    )

    def __init__(self, prefix: np.ndarray, causal: np.ndarray, capacity: int | None,
                 device, max_samples: int | None):
        n = len(prefix)
        if len(causal) != n:
            raise ValueError(
                f"prefix_lens and causal_lens must have the same length, got {n} and {len(causal)}")
        # Everything is checked before anything of the batch's size is allocated. Each length
        # and the total must fit the int32 offsets the kernels read; with every length below
        # 2**31 the int64 sum cannot wrap.
        for name, lens in (("prefix_lens", prefix), ("causal_lens", causal)):
            if n and int(lens.max()) >= _INT32_END:
                bad = int(np.argmax(lens >= _INT32_END))
                raise ValueError(f"{name}[{bad}] = {int(lens[bad])} does not fit the int32 "
                                 f"offsets the kernels use (< 2**31)")
        seqlens = prefix + causal
        total = int(seqlens.sum())
        if total >= _INT32_END:
            raise ValueError(f"total tokens {total} do not fit the int32 offsets the kernels use "
                             f"(< 2**31)")
        if capacity is None:
            capacity = total
            slots = n if max_samples is None else int(max_samples)
        else:
            if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)):
                raise ValueError(f"capacity must be an int, got {type(capacity).__name__}")
            capacity = int(capacity)
            if not 0 <= capacity < _INT32_END:
                raise ValueError(f"capacity {capacity} must be in [0, 2**31): the kernels use "
                                 f"int32 offsets")
            if total > capacity:
                raise ValueError(f"total tokens {total} exceed capacity {capacity}")
            # Fixed slot count => fixed tensor shapes for every batch of this capacity.
            slots = capacity if max_samples is None else int(max_samples)
        if n > slots:
            raise ValueError(f"{n} samples do not fit in max_samples={slots}")
        if slots >= _INT32_END:
            raise ValueError(f"max_samples={slots} must be < 2**31")

        pad = slots - n
        prefix_slots = np.concatenate([prefix, np.zeros(pad, np.int64)])
        causal_slots = np.concatenate([causal, np.zeros(pad, np.int64)])
        cu = np.zeros(slots + 1, np.int64)
        np.cumsum(prefix_slots + causal_slots, out=cu[1:])

        # One host-to-device copy for all three tensors; the fields are views into it.
        packed = torch.from_numpy(np.concatenate([cu, prefix_slots, causal_slots]).astype(np.int32))
        if device is not None:
            packed = to_device(packed, device)
        self.cu_seqlens = packed[: slots + 1]
        self.prefix_lens = packed[slots + 1: 2 * slots + 1]
        self.causal_lens = packed[2 * slots + 1:]
        self.host_lens = torch.from_numpy(np.stack([prefix_slots, causal_slots]))
        self.total = total
        self.num_samples = n
        self.max_prefix = int(prefix.max()) if n else 0
        self.max_causal = int(causal.max()) if n else 0
        self.max_seqlen = int(seqlens.max()) if n else 0
        self.capacity = capacity
        self.slots = slots
        self._cache = batch_cache(self.host_lens)

    @classmethod
    def from_lengths(cls, prefix_lens, causal_lens, capacity: int | None = None, device=None,
                     max_samples: int | None = None) -> "SeqInfo":
        """Metadata from per-sample prefix and causal lengths (lists, numpy arrays or tensors).

        capacity: token budget of the batch (rows of q/k/v); defaults to the total. When given,
          the device tensors have `max_samples` slots (default: `capacity`, the most samples a
          batch of that capacity can hold), so shapes do not change between batches.
        """
        prefix = _as_lengths("prefix_lens", prefix_lens)
        causal = _as_lengths("causal_lens", causal_lens)
        return cls(prefix, causal, capacity, device, max_samples)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, prefix_lens, capacity: int | None = None, device=None,
                        max_samples: int | None = None) -> "SeqInfo":
        """Metadata from cumulative sample offsets (starting at 0) and prefix lengths."""
        cu = _as_lengths("cu_seqlens", cu_seqlens)
        if len(cu) == 0 or cu[0] != 0:
            raise ValueError("cu_seqlens must start with 0")
        seqlens = np.diff(cu)
        if (seqlens < 0).any():
            bad = int(np.flatnonzero(seqlens < 0)[0])
            raise ValueError(
                f"cu_seqlens must be non-decreasing: cu_seqlens[{bad + 1}] = {int(cu[bad + 1])} "
                f"< cu_seqlens[{bad}] = {int(cu[bad])}")
        prefix = _as_lengths("prefix_lens", prefix_lens)
        if len(prefix) != len(seqlens):
            raise ValueError(
                f"prefix_lens has {len(prefix)} entries for {len(seqlens)} samples in cu_seqlens")
        if (prefix > seqlens).any():
            bad = int(np.flatnonzero(prefix > seqlens)[0])
            raise ValueError(f"prefix_lens[{bad}] = {int(prefix[bad])} exceeds the sample length "
                             f"{int(seqlens[bad])}")
        return cls(prefix, seqlens - prefix, capacity, device, max_samples)

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def prefix_host(self) -> np.ndarray:
        """Prefix lengths of the real samples (host)."""
        return self.host_lens[0, : self.num_samples].numpy()

    def causal_host(self) -> np.ndarray:
        """Causal lengths of the real samples (host)."""
        return self.host_lens[1, : self.num_samples].numpy()

    def cached(self, key, build):
        """`build()`, computed once per batch and `key` (see `batch_cache`). A plain dict lookup
        on this object, so that `torch.compile` traces it without guarding on the batch."""
        return _memo(self._cache, key, build)

    def __repr__(self) -> str:
        return (f"SeqInfo(num_samples={self.num_samples}, total={self.total}, "
                f"capacity={self.capacity}, max_prefix={self.max_prefix}, "
                f"max_causal={self.max_causal}, device={self.device})")


class BatchMeta(NamedTuple):
    """What a backend receives inside the attention op: device tensors and host integers.

    Rebuilt from the op's tensor arguments (the host part comes from the CPU tensor `host_lens`,
    so building it never synchronises with the GPU). The host arrays stop at the last non-empty
    sample (`used_slots` of them): the padding slots of a fixed-capacity batch hold no work, and
    host code that loops, hashes or copies per sample should not pay for them. The device tensors
    keep every slot.
    """

    cu_seqlens: torch.Tensor
    prefix_lens: torch.Tensor
    causal_lens: torch.Tensor
    prefix_host: np.ndarray  # (used_slots,) int64
    causal_host: np.ndarray  # (used_slots,) int64
    starts_host: np.ndarray  # (used_slots,) int64, first row of each sample
    total: int
    max_prefix: int
    max_causal: int
    max_seqlen: int
    host_lens: torch.Tensor  # the batch's identity for `batch_cache`

    @property
    def used_slots(self) -> int:
        """Slots up to the last non-empty sample."""
        return len(self.prefix_host)

    @classmethod
    def from_op_args(cls, cu_seqlens, prefix_lens, causal_lens, host_lens) -> "BatchMeta":
        part = _memo(batch_cache(host_lens), "host_part", lambda: _host_part(host_lens))
        return cls(cu_seqlens, prefix_lens, causal_lens, *part, host_lens)

    @classmethod
    def from_info(cls, info: SeqInfo) -> "BatchMeta":
        return cls.from_op_args(info.cu_seqlens, info.prefix_lens, info.causal_lens,
                                info.host_lens)

    def cached(self, key, build):
        """`build()`, computed once per batch and `key` (see `batch_cache`)."""
        return _memo(batch_cache(self.host_lens), key, build)


# Per-batch derived data (the host summary, Flex's block mask, Triton's tile schedules, the short
# samples' dense tiles) is computed once and shared by every layer's forward and backward. A batch
# is identified by its `host_lens` tensor: every call of a step passes that same object (inside
# the custom op too), and a new batch is a new tensor. Entries go when the tensor is freed.
_BATCH_CACHES: dict[int, tuple] = {}


def batch_cache(host_lens: torch.Tensor) -> dict:
    """The dict of derived data of the batch whose lengths are `host_lens` (the same dict for
    every call with that tensor, a fresh one after the tensor changes in place)."""
    ident = id(host_lens)
    entry = _BATCH_CACHES.get(ident)
    if entry is None or entry[0]() is not host_lens or entry[1] != host_lens._version:
        entry = (weakref.ref(host_lens, lambda _, ident=ident: _BATCH_CACHES.pop(ident, None)),
                 host_lens._version, {})
        _BATCH_CACHES[ident] = entry
    return entry[2]


def _memo(cache: dict, key, build):
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _host_part(host_lens: torch.Tensor) -> tuple:
    """The host fields of BatchMeta, trimmed to the used slots (an O(slots) scan)."""
    lens = host_lens.numpy()
    seqlens = lens[0] + lens[1]
    nonempty = np.flatnonzero(seqlens)
    used = int(nonempty[-1]) + 1 if len(nonempty) else 0
    prefix, causal, seqlens = lens[0, :used], lens[1, :used], seqlens[:used]
    ends = np.cumsum(seqlens)
    starts = ends - seqlens
    for shared in (prefix, causal, starts):  # shared by every call of the step: read-only
        shared.setflags(write=False)
    return (prefix, causal, starts, int(ends[-1]) if used else 0,
            int(prefix.max()) if used else 0, int(causal.max()) if used else 0,
            int(seqlens.max()) if used else 0)
