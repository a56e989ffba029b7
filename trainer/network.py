"""The network a run trains: a backbone (shared with embed) and the head of the mode, rebuilt at every
re-clustering."""

from __future__ import annotations

import torch
from torch import nn

from dataengine.models import build_backbone
from trainer.augment import normalize
from trainer.config import TrainConfig
from trainer.labels import Labels
from trainer.losses import ClusterHead, HierarchicalHead, RotationHead, rotation_sub_counts
from trainer.sampler import torch_generator

TAG_INIT, TAG_HEAD = 21, 22


class Network(nn.Module):
    """Backbone + the head of the mode; the head is rebuilt at every re-clustering."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        torch.manual_seed(torch_generator(config.seed, TAG_INIT).initial_seed())
        self.backbone, self.feature_dim = build_backbone(config.model.arch, config.model.sobel)
        self.dropout = nn.Dropout(config.model.dropout)
        self.head: nn.Module = RotationHead(self.feature_dim) if config.mode == "rotnet" else nn.Identity()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.backbone(normalize(images)))


def new_head(config: TrainConfig, feature_dim: int, labels: Labels, epoch: int) -> nn.Module:
    """A freshly initialised head for ``labels`` (seeded by the run's seed and the epoch of the clustering)."""
    generator = torch_generator(config.seed, TAG_HEAD, epoch)
    if config.mode == "deepercluster":
        return HierarchicalHead(feature_dim, rotation_sub_counts(labels.counts), generator=generator)
    return ClusterHead(feature_dim, int(labels.num_clusters), generator=generator)
