"""The one host-to-device copy every layer uses for metadata built on the host."""

from __future__ import annotations

import torch

__all__ = ["to_device"]


def to_device(host: torch.Tensor, device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, without making the host wait for the GPU.

    On CUDA the copy goes from pinned memory with `non_blocking=True`: a copy from pageable memory
    waits for every kernel queued before it, which stalls the host in the middle of a forward. A
    tensor that is already pinned is not copied twice. Elsewhere it is a plain `.to(device)`.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
