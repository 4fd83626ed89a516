"""Process-group helpers for data-parallel training under torchrun.

In a single process without an initialised process group, the collectives return their input
unchanged and barrier() and destroy() return at once, so the training loop calls them
unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Position of this process in the process group; a single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_from_env(device_type: str = "cpu") -> DistributedContext:
    """Initialise the default process group from torchrun's environment variables.

    With WORLD_SIZE > 1 this calls ``init_process_group`` with the "nccl" backend when
    ``device_type`` is "cuda" and CUDA is available, otherwise "gloo", and makes the GPU numbered
    LOCAL_RANK the current CUDA device. Without WORLD_SIZE, or with WORLD_SIZE=1, it initialises
    nothing and returns a single-process context. An already initialised group is reused.
    """
    if is_initialized():
        return current_context()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        # device_id binds the group to this GPU, so barrier() need not guess the device.
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
    return current_context()


def current_context() -> DistributedContext:
    """Return the context of the initialised process group, or a single-process context."""
    if not is_initialized():
        return DistributedContext()
    rank = dist.get_rank()
    return DistributedContext(
        rank=rank,
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", str(rank))),
    )


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled), or ``obj`` itself in a single process."""
    if not is_initialized():
        return obj
    objects = [obj]
    dist.broadcast_object_list(objects, src=src)
    return objects[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Return every rank's ``obj`` in rank order (pickled), or ``[obj]`` in a single process."""
    if not is_initialized():
        return [obj]
    objects: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(objects, obj)
    return objects


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place and return it.

    A single process returns it unchanged. With the "nccl" backend the tensor must be on this
    rank's GPU.
    """
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank reaches this call; returns at once in a single process."""
    if is_initialized():
        dist.barrier()


def destroy() -> None:
    """Destroy the default process group if one is initialised."""
    if is_initialized():
        dist.destroy_process_group()


def check_divisible(batch_size: int, world_size: int) -> None:
    """Raise ValueError unless a global batch of ``batch_size`` rows splits evenly over the ranks."""
    if batch_size % world_size != 0:
        raise ValueError(
            f"batch_size={batch_size} is not divisible by the world size {world_size}; "
            f"set train.batch_size to a multiple of the number of processes (torchrun --nproc_per_node)"
        )


def local_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Return rank ``rank``'s rows [r * B / W, (r + 1) * B / W) of a global batch (B, ...)."""
    check_divisible(batch.shape[0], world_size)
    rows = batch.shape[0] // world_size
    return batch[rank * rows : (rank + 1) * rows]
