"""Process group setup under torchrun and FSDP2 sharding.

Under `torchrun` (WORLD_SIZE > 1) every rank joins one process group: NCCL when the run uses CUDA,
gloo on CPU. Every few consecutive blocks form an FSDP2 unit (`fully_shard`, `blocks_per_unit`)
and the root module gathers the rest, so parameters are sharded across ranks and gathered one unit
at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

__all__ = ["Dist", "setup", "shard_model", "barrier", "all_reduce", "all_gather_object",
           "collective_device", "reshard_all", "teardown"]


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        torch_dist.init_process_group(backend=backend,
                                      device_id=dev if dev.type == "cuda" else None)
    return Dist(rank, world, local_rank, dev)


def teardown():
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def collective_device(tensor: torch.Tensor) -> torch.device:
    """Where `tensor` must be for a collective: NCCL reduces only CUDA tensors, gloo any."""
    if torch_dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


_REDUCE_OPS = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce over ranks ("sum" or "max"), in place; a no-op in a single process. A CPU tensor
    under NCCL makes the round trip through the GPU."""
    if torch_dist.is_initialized():
        device = collective_device(tensor)
        if device == tensor.device:
            torch_dist.all_reduce(tensor, op=_REDUCE_OPS[op])
        else:
            on_device = tensor.to(device)
            torch_dist.all_reduce(on_device, op=_REDUCE_OPS[op])
            tensor.copy_(on_device)
    return tensor


def all_gather_object(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not torch_dist.is_initialized():
        return [obj]
    out = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def reshard_all(model) -> None:
    """Free the gathered parameters of every FSDP2 unit (after forwards without a backward)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def shard_model(model, dist: Dist, bf16_blocks: bool = False, blocks_per_unit: int = 1):
    """FSDP2: one unit per `blocks_per_unit` consecutive blocks, then the root (embedding, final
    norm, LM head).

    Blocks stay gathered from forward to backward (reshard_after_forward=False): the backward
    needs no second all-gather, and HRM, which calls each block several times per step, gathers
    it once. With `bf16_blocks` (bf16 autocast on CUDA) block parameters are gathered in bf16,
    the dtype autocast would cast them to anyway, and gradients reduced in fp32; inputs are not
    cast, so the residual stream stays fp32 as on one GPU. The root keeps fp32 (the embedding's
    output is the residual stream).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                   cast_forward_inputs=False)
              if bf16_blocks else MixedPrecisionPolicy())
    blocks = model.all_blocks()
    for first in range(0, len(blocks), blocks_per_unit):
        unit = blocks[first:first + blocks_per_unit]
        fully_shard(unit if len(unit) > 1 else unit[0], reshard_after_forward=False,
                    mp_policy=policy)
    fully_shard(model)
    return model
