"""The network over ranks: a data-parallel backbone and head, synchronised BatchNorm, model-parallel sub-class heads.

Data parallelism. The backbone and the replicated head (RotNet's, DeepCluster's, or DeeperCluster's super-class
classifier ``V``) are wrapped in torch's DistributedDataParallel (:func:`indexes.distributed.data_parallel`):
gradients are averaged in buckets while the backward pass runs. The head has a DDP of its own, on a process group
of its own, because it is re-created at every re-assignment while the backbone's wrapper lives for the whole run.
With ``sync_bn`` the BatchNorm layers use the statistics of every rank's rows (the paper computes them on the
full 3,072-image batch): torch's :class:`torch.nn.SyncBatchNorm` on CUDA; on the CPU, where torch 2.14's
``SyncBatchNorm`` refuses to run (it accepts GPU inputs only), :class:`SyncBatchNorm` below.

Model parallelism (the sub-class heads). DeeperCluster has one classifier ``W_s`` per super-class: 320,000 x 4,096
weights in all at the paper's scale, ~5 GB, which a replicated head would all-reduce at every step. Instead
each rank holds the ``W_s`` of a contiguous range of super-classes (:class:`HeadShards`, balanced by
``sum k_s``). At every step each rank sends every row's features and targets to the rank that holds its
super-class (one all-to-all, :func:`indexes.distributed.exchange_rows`); that rank computes the rows'
sub-class cross-entropy with its ``W_s`` and sends the per-row loss back (for the statistics). The backward
pass returns each row's feature gradient to the row's rank through the same all-to-all reversed, so the
backbone's gradient is what one process would compute; ``W_s``'s gradient stays with its owner and is never
communicated. Per step a rank sends about ``B x D`` numbers each way (its rows' features, then their
gradients), whatever the number of clusters. The exchange runs on a process group of its own so that its
backward collective never interleaves with DDP's all-reduces.

Why not the paper's scheme (groups of ranks each training one super-class on rows of that super-class only,
``W_s`` all-reduced within its group): it needs ``world_size`` to be a multiple of ``S = 4m`` and every rank's
input restricted to one cluster and one rotation (a sharded reading of the data by cluster), and a group still
all-reduces ``k_s x D`` weights per step, which grows with the number of clusters. Routing rows to the owner of
their head keeps the trainer's mixed, cluster-balanced batches, works for any number of ranks, and
communicates rows instead of weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from indexes import distributed
from trainer.losses import Stats, SubClassHeads, sub_normalisation


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of every rank's rows, for any device and backend (gloo).

    Two differentiable all-reduces per layer: the per-channel sums (and the row count), then the sums of squared
    deviations from the global mean (a two-pass variance, as accurate as one process's). Their backward
    all-reduces the gradients of the statistics, so every rank's input gradient is that of the whole batch. In
    evaluation mode, or with one rank, it is a plain BatchNorm. Running statistics are updated with the global
    mean and unbiased variance (identical on every rank).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or distributed.world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = input.new_tensor([input.numel() // input.shape[1]], dtype=input.dtype)
        totals = distributed.sum_over_ranks(torch.cat([input.sum(dims), count]))
        rows = totals[-1]
        mean = totals[:-1] / rows
        centered = input - mean.view(shape)
        var = distributed.sum_over_ranks((centered * centered).sum(dims)) / rows
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), float(rows.detach()))
        output = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, rows: float) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * (rows / max(rows - 1.0, 1.0)), alpha=factor)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the ranks (same parameters and buffers, same
    ``state_dict`` keys): torch's :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`SyncBatchNorm` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        converted = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, sync_batchnorm(child, device))
    return converted


@dataclass(frozen=True)
class HeadShards:
    """Which rank holds which super-classes' sub-class heads: rank ``r`` holds ``[bounds[r], bounds[r + 1])``."""

    bounds: tuple[int, ...]

    @classmethod
    def plan(cls, sub_counts: list[int], world_size: int) -> "HeadShards":
        """Contiguous ranges of super-classes, cut where the running ``sum k_s`` is nearest to each rank's equal
        share (so ranks hold about ``sum k_s / world_size`` rows each; with fewer super-classes than ranks some
        ranks hold none)."""
        cumulative = np.concatenate([[0], np.cumsum(sub_counts)])
        bounds = [0]
        for r in range(1, world_size):
            target = cumulative[-1] * r / world_size
            cut = int(np.searchsorted(cumulative, target))
            if cut > 0 and target - cumulative[cut - 1] < cumulative[min(cut, len(sub_counts))] - target:
                cut -= 1
            bounds.append(min(max(cut, bounds[-1]), len(sub_counts)))
        return cls((*bounds, len(sub_counts)))

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    def owned(self, rank: int) -> tuple[int, int]:
        """``(first, stop)``: the super-classes rank ``rank`` holds."""
        return self.bounds[rank], self.bounds[rank + 1]

    def owners(self) -> np.ndarray:
        """(S,) the rank holding each super-class."""
        return np.repeat(np.arange(self.world_size), np.diff(self.bounds))


def sub_class_loss(heads: SubClassHeads, shards: HeadShards, features: torch.Tensor, super_targets: torch.Tensor,
                   sub_targets: torch.Tensor, grad_mean: str, group: Any = None) -> tuple[torch.Tensor, Stats]:
    """The sub-class term of Eq. 5 for this rank's batch, with the heads sharded over the ranks of ``group``.

    Every rank calls it with its own batch (all of the same size). Returns the scalar to back-propagate (this
    rank's share: the terms of the rows it owns, from every rank) and the stats ``loss_sub`` and ``sub_acc`` of
    this rank's rows, exactly as one process holding every head would compute them.
    """
    heads.check_targets(super_targets, sub_targets)
    batch, world = features.shape[0], shards.world_size
    order = send = receive = None
    if world == 1:
        received, supers, subs = features, super_targets, sub_targets
    else:
        owners = torch.from_numpy(shards.owners()).to(features.device)[super_targets]
        order = torch.argsort(owners, stable=True)
        counts = distributed.all_gather_counts(torch.bincount(owners, minlength=world), group)
        if bool((counts.sum(dim=1) != batch).any()):
            raise ValueError(f"every rank's batch must hold the same number of rows, got {counts.sum(1).tolist()}")
        rank = distributed.group_rank(group)
        send, receive = counts[rank].tolist(), counts[:, rank].tolist()
        received = distributed.exchange_rows(features[order], send, receive, group)
        targets = distributed.exchange_rows(torch.stack([super_targets, sub_targets], 1)[order], send, receive, group)
        supers, subs = targets[:, 0], targets[:, 1]
    divisor, scale = sub_normalisation(grad_mean, heads.group_sizes(supers), batch, batch * world)
    terms = heads(received, supers, subs, divisor=divisor, feature_scale=scale)
    loss, ce, correct = terms.loss, terms.ce, terms.correct.float()
    if world > 1:
        if received.shape[0] == 0:  # no row to hold: the backward exchange must still run on this rank
            loss = loss + received.sum()
        back = distributed.exchange_rows(torch.stack([ce, correct], 1), receive, send, group)
        ce, correct = torch.empty_like(back[:, 0]), torch.empty_like(back[:, 1])
        ce[order], correct[order] = back[:, 0], back[:, 1]
    return loss, {"loss_sub": ce.sum() / batch, "sub_acc": correct.sum() / batch}


class Replicas:
    """The replicated parts of a network as the training step runs them: the backbone (compiled on request) and
    the head in DDP over every rank, and the process group of the sub-class heads' exchange. In one process the
    plain modules (the backbone compiled on request).

    Args:
        network: the :class:`trainer.network.Network` (its modules stay the ones checkpoints read and write).
        device: ``cpu`` or ``cuda:N``, where the network lives.
        compile: run the backbone through :func:`torch.compile` (after wrapping it in DDP, as torch advises).
    """

    def __init__(self, network: nn.Module, device: str, compile: bool = False) -> None:
        self.network = network
        self.device = device
        self.head_group = distributed.new_group()
        self.exchange_group = distributed.new_group()
        backbone = distributed.data_parallel(network.backbone, device)
        self.backbone = torch.compile(backbone) if compile else backbone
        self.head: nn.Module = network.head
        self.wrap_head()

    def wrap_head(self) -> None:
        """Wrap the network's current head (call after every re-assignment)."""
        head = self.network.head
        trained = any(parameter.requires_grad for parameter in head.parameters())
        self.head = distributed.data_parallel(head, self.device, self.head_group) if trained else head
