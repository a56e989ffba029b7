"""The network a run trains: a backbone (shared with embed) and the heads of the mode, re-created at every
re-clustering; and its optimizers."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from dataengine.models import build_backbone
from indexes.data import stream_seed
from trainer.augment import normalize
from trainer.config import OptimConfig, TrainConfig
from trainer.labels import Labels
from trainer.losses import ClusterHead, RotationHead, SubClassHeads, SuperClassHead, rotation_sub_counts
from trainer.parallel import HeadShards
from trainer.sampler import torch_generator

TAG_INIT, TAG_HEAD, TAG_SUB_HEADS = 21, 22, 24


class Network(nn.Module):
    """Backbone + the replicated head of the mode (``head``) + DeeperCluster's sub-class heads this rank holds
    (``sub_heads``, a shard of them over several ranks; :class:`trainer.parallel.HeadShards` in ``shards``).
    The heads are re-created at every re-clustering (:meth:`set_heads`)."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        torch.manual_seed(torch_generator(config.seed, TAG_INIT).initial_seed())
        self.backbone, self.feature_dim = build_backbone(config.model.arch, config.model.sobel)
        self.dropout = nn.Dropout(config.model.dropout)
        self.head: nn.Module = RotationHead(self.feature_dim) if config.mode == "rotnet" else nn.Identity()
        self.sub_heads: SubClassHeads | None = None
        self.shards: HeadShards | None = None
        self.channels_last = False
        """Feed the backbone channels-last batches (set with the network's memory format, on CUDA)."""

    def features(self, images: torch.Tensor, backbone: Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """Features of uint8 images, through ``backbone`` (e.g. the backbone's data-parallel wrapper; default:
        the backbone itself)."""
        inputs = normalize(images)
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.dropout((backbone or self.backbone)(inputs))

    def set_heads(self, config: TrainConfig, labels: Labels, epoch: int, rank: int = 0, world_size: int = 1) -> None:
        """Fresh heads for ``labels`` (seeded by the run's seed and the epoch of the clustering), on the backbone's
        device; DeeperCluster's sub-class heads sharded over ``world_size`` ranks (this rank's share)."""
        device = next(self.backbone.parameters()).device
        self.head = new_head(config, self.feature_dim, labels, epoch).to(device)
        if config.mode != "deepercluster":
            return
        counts = rotation_sub_counts(labels.counts)
        self.shards = HeadShards.plan(counts, world_size)
        first, stop = self.shards.owned(rank)
        self.sub_heads = SubClassHeads(self.feature_dim, counts, first=first, stop=stop,
                                       seed=stream_seed(config.seed, TAG_SUB_HEADS, epoch)).to(device)


def new_head(config: TrainConfig, feature_dim: int, labels: Labels, epoch: int) -> nn.Module:
    """A freshly initialised replicated head for ``labels``: DeeperCluster's super-class classifier ``V``, or
    DeepCluster's (and ClusterFit's) classifier over the clusters."""
    generator = torch_generator(config.seed, TAG_HEAD, epoch)
    if config.mode == "deepercluster":
        return SuperClassHead(feature_dim, len(labels.counts) * 4, generator=generator)
    return ClusterHead(feature_dim, int(labels.num_clusters), generator=generator)


def _sgd(parameters: Iterable[nn.Parameter], config: OptimConfig) -> torch.optim.SGD | None:
    trained = [parameter for parameter in parameters if parameter.requires_grad]
    if not trained:
        return None
    return torch.optim.SGD(trained, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class Optimizers:
    """SGD (momentum, weight decay) of the backbone, kept for the whole run so that its momentum survives every
    re-assignment (as in the reference code), and of the heads, re-created with them (:meth:`reset_heads`).
    Fixed parameters (the Sobel layer) have none."""

    def __init__(self, config: OptimConfig, network: Network) -> None:
        self.config = config
        self.network = network
        self.backbone = _sgd(network.backbone.parameters(), config)
        self.head: torch.optim.SGD | None = None
        self.sub_heads: torch.optim.SGD | None = None
        self.reset_heads()

    def reset_heads(self) -> None:
        """New optimizers (no momentum) for the network's current heads."""
        self.head = _sgd(self.network.head.parameters(), self.config)
        sub_heads = self.network.sub_heads
        self.sub_heads = _sgd(sub_heads.parameters(), self.config) if sub_heads is not None else None

    def zero_grad(self) -> None:
        for optimizer in (self.backbone, self.head, self.sub_heads):
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One SGD step of every part. A shard of sub-class heads that no row of the step reached still takes its
        step with a zero gradient (weight decay, momentum), as the whole head does in one process."""
        if self.sub_heads is not None:
            for parameter in self.network.sub_heads.parameters():
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        for optimizer in (self.backbone, self.head, self.sub_heads):
            if optimizer is not None:
                optimizer.step()
