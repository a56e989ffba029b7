"""The few collectives the training loop needs; each is a no-op without a process group (one process)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reducer() -> Any:
    """The k-means reducer over ranks (``None`` in one process)."""
    from indexes.distributed import TorchReducer

    return TorchReducer() if rank_and_world()[1] > 1 else None


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def min_over_ranks(value: float) -> float:
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return float(tensor.item())


def all_have_batch(has_batch: bool) -> bool:
    """True when every rank has a batch for this step (one tiny all-reduce per step under DDP)."""
    import torch.distributed as dist

    if rank_and_world()[1] == 1:
        return has_batch
    flag = torch.tensor([1 if has_batch else 0], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def all_reduce_grads(network: nn.Module) -> None:
    """Average gradients over ranks (heads included; unused sub-heads contribute zeros)."""
    import torch.distributed as dist

    world = rank_and_world()[1]
    if world == 1:
        return
    for parameter in network.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
        dist.all_reduce(parameter.grad)
        parameter.grad /= world
