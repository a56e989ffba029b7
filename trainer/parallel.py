"""Gradient averaging over ranks; the process group and every other collective live in
:mod:`indexes.distributed`."""

from __future__ import annotations

import torch
from torch import nn

from indexes import distributed


def all_reduce_grads(network: nn.Module) -> None:
    """Average gradients over ranks (heads included; unused sub-heads contribute zeros)."""
    if distributed.world_size() == 1:
        return
    for parameter in network.parameters():
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    distributed.average_over_ranks_([parameter.grad for parameter in network.parameters()])
