"""One epoch's input and one step's loss, for every mode."""

from __future__ import annotations

import math
from typing import Any

import torch

from dataengine.shards import ShardSet
from indexes.distributed import min_over_ranks
from trainer.augment import CropConfig
from trainer.config import TrainConfig
from trainer.data import EpochPlan, ShardStream, expected_piece_samples, expected_samples, make_loader
from trainer.labels import Labels
from trainer.losses import super_targets
from trainer.network import Network
from trainer.parallel import Replicas, sub_class_loss
from trainer.rotation import random_rotations, rotate_batch
from trainer.sampler import ClusterBalance, StreamConfig, torch_generator

TAG_ROTATE = 23


def epoch_loader(config: TrainConfig, shard_set: ShardSet, labels: Labels | None, crop: CropConfig,
                 plan: EpochPlan, pin_memory: bool = False) -> tuple[Any, int]:
    """The DataLoader of one rank's epoch (resumed ``plan.skip_batches`` in, or on the pieces of an elastic resume;
    batches in pinned memory when they go to a GPU) and the number of steps every rank can take in it (counted
    from the epoch's start)."""
    data, balance = config.data, None
    if labels is not None and data.balanced_sampling:
        balance = ClusterBalance(labels.balance, data.samples_per_epoch)
    stream = ShardStream(shard_set.shards, balance, StreamConfig(seed=config.seed, buffer_size=data.buffer_size,
                                                                 copy_spread=data.copy_spread),
                         crop, plan, data.batch_size, data.storage_options, data.shards_in_flight)
    loader = make_loader(stream, data.batch_size, data.workers, pin_memory)
    layout = plan.layout
    if layout is not None and layout.pieces is not None:  # elastic resume: what is planned and left, if it is there
        expected = min_over_ranks(expected_piece_samples(shard_set.shards, balance, plan, config.seed))
        planned = (layout.planned - layout.consumed) // (plan.world_size * data.batch_size)
        # Counts are random only where clusters are balanced: then the same margin as at an epoch's start.
        margin = 4 * math.sqrt(max(expected, 1.0)) if balance is not None else 0.0
        there = int((expected - margin) // data.batch_size)
        return loader, plan.skip_batches + max(0, min(planned, there))
    expected = min_over_ranks(expected_samples(shard_set.shards, balance, plan, config.seed))
    # A few standard deviations below the expected count, so that no rank runs dry before the others.
    steps = int((expected - 4 * math.sqrt(max(expected, 1.0))) // data.batch_size)
    return loader, max(steps, 1)


def step_inputs(config: TrainConfig, labels: Labels | None, images: torch.Tensor, rows: torch.Tensor, epoch: int,
                rank: int, step: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The images a step feeds the network (rotated for rotnet and deepercluster, seeded by ``(seed, epoch, rank,
    step)``, rotated where ``images`` are) and the targets of its head, on the CPU: ``(rotations,)``,
    ``(clusters,)`` or ``(super-classes, sub-classes)`` (``rows``: rows of the shards, for the cluster targets)."""
    mode = config.mode
    if mode not in ("rotnet", "deepercluster"):
        return images, (torch.from_numpy(labels.targets(rows.numpy())[0]),)
    rotations = random_rotations(len(images), torch_generator(config.seed, TAG_ROTATE, epoch, rank, step))
    images = rotate_batch(images, rotations)
    if mode == "rotnet":
        return images, (rotations,)
    parents, local = (torch.from_numpy(t) for t in labels.targets(rows.numpy()))
    return images, (super_targets(parents, rotations), local)


def batch_loss(config: TrainConfig, network: Network, images: torch.Tensor, targets: tuple[torch.Tensor, ...],
               replicas: Replicas | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of a batch (images and targets on the network's device, as :func:`step_inputs` makes them) and its
    statistics; ``replicas``: the data-parallel wrappers the step runs through (several ranks)."""
    backbone = replicas.backbone if replicas is not None else None
    head = replicas.head if replicas is not None else network.head
    features = network.features(images, backbone)
    if config.mode != "deepercluster":
        return head(features, *targets)
    supers, subs = targets
    loss_super, stats = head(features, supers)
    group = replicas.exchange_group if replicas is not None else None
    loss_sub, sub_stats = sub_class_loss(network.sub_heads, network.shards, features, supers, subs,
                                         config.optim.sub_head_grad_mean, group)
    stats |= sub_stats
    stats["loss"] = stats["loss_super"] + stats["loss_sub"]
    return loss_super + loss_sub, stats


def step_loss(config: TrainConfig, network: Network, labels: Labels | None, images: torch.Tensor,
              rows: torch.Tensor, epoch: int, rank: int, step: int, replicas: Replicas | None = None
              ) -> tuple[torch.Tensor, dict[str, Any]]:
    """:func:`step_inputs` then :func:`batch_loss`, on the device of ``images``."""
    inputs, targets = step_inputs(config, labels, images, rows, epoch, rank, step)
    return batch_loss(config, network, inputs, tuple(t.to(images.device) for t in targets), replicas)
