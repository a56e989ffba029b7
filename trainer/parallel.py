"""Gradient averaging over ranks; the process group and every other collective live in
:mod:`indexes.distributed`."""

from __future__ import annotations

import torch
from torch import nn

from indexes import distributed


def all_reduce_grads(network: nn.Module) -> None:
    """Average gradients over ranks (heads included; unused sub-heads contribute zeros). Fixed parameters
    (``requires_grad=False``, e.g. the Sobel layer) get no gradient: SGD would apply weight decay to them."""
    if distributed.world_size() == 1:
        return
    trained = [parameter for parameter in network.parameters() if parameter.requires_grad]
    for parameter in trained:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    distributed.average_over_ranks_([parameter.grad for parameter in trained])
