"""One epoch's input and one step's loss, for every mode."""

from __future__ import annotations

import math
from typing import Any

import torch

from dataengine.shards import ShardSet
from indexes.distributed import min_over_ranks
from trainer.augment import CropConfig
from trainer.config import TrainConfig
from trainer.data import EpochPlan, ShardStream, expected_samples, make_loader
from trainer.labels import Labels
from trainer.losses import super_targets
from trainer.network import Network
from trainer.rotation import random_rotations, rotate_batch
from trainer.sampler import ClusterBalance, StreamConfig, torch_generator

TAG_ROTATE = 23


def epoch_loader(config: TrainConfig, shard_set: ShardSet, labels: Labels | None, crop: CropConfig,
                 plan: EpochPlan) -> tuple[Any, int]:
    """The DataLoader of one rank's epoch (resumed ``plan.skip_batches`` in) and the number of steps every
    rank can take in it."""
    data, balance = config.data, None
    if labels is not None and data.balanced_sampling:
        balance = ClusterBalance(labels.balance, data.samples_per_epoch)
    stream = ShardStream(shard_set.shards, balance, StreamConfig(seed=config.seed, buffer_size=data.buffer_size,
                                                                 copy_spread=data.copy_spread),
                         crop, plan, data.batch_size, data.storage_options, data.shards_in_flight)
    expected = min_over_ranks(expected_samples(shard_set.shards, balance, plan, config.seed))
    # A few standard deviations below the expected count, so that no rank runs dry before the others.
    steps = int((expected - 4 * math.sqrt(max(expected, 1.0))) // data.batch_size)
    return make_loader(stream, data.batch_size, data.workers), max(steps, 1)


def step_loss(config: TrainConfig, network: Network, labels: Labels | None, images: torch.Tensor,
              rows: torch.Tensor, epoch: int, rank: int, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss of one batch (rows of the shards, for the cluster targets) and its statistics."""
    mode = config.mode
    if mode in ("rotnet", "deepercluster"):
        rotations = random_rotations(len(images), torch_generator(config.seed, TAG_ROTATE, epoch, rank, step))
        features = network.features(rotate_batch(images, rotations))
        if mode == "rotnet":
            return network.head(features, rotations)
        index = rows.numpy()
        parents = torch.from_numpy(labels.parents[index])
        local = torch.from_numpy(labels.local[index])
        return network.head(features, super_targets(parents, rotations), local)
    targets = torch.from_numpy(labels.parents[rows.numpy()])
    return network.head(network.features(images), targets)
