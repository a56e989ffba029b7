"""Classification heads and losses of the three training methods: RotNet, DeepCluster and DeeperCluster.

Every head maps backbone features ``(B, D)`` and integer targets to ``(loss, stats)``: a scalar loss averaged
over the batch, and a dict of detached 0-d tensors (losses and accuracies) that the training loop may log
without forcing a device synchronisation on every step.

* :class:`RotationHead` (RotNet, Gidaris et al. 2018): 4-way classification of the rotation applied to the
  image (0, 90, 180, 270 degrees).
* :class:`ClusterHead` (DeepCluster): cross-entropy over the ``k`` clusters of a flat k-means.
* :class:`HierarchicalHead` (DeeperCluster, Eq. 5 of Caron et al. ICCV 2019): image ``n`` carries a random
  rotation ``r_n`` and the level-1 cluster ``c_n`` of its *non-rotated* features; its super-class is
  ``s_n = 4 c_n + r_n`` (:func:`super_targets`), one of ``S = 4 m``. A linear classifier ``V`` predicts
  ``s_n``; one linear classifier ``W_s`` per super-class predicts the level-2 cluster ``z_n`` among the
  ``k_s`` sub-clusters of ``c_n``. The loss is::

      loss = 1/B sum_n [ CE(V f(x_n), s_n) + CE(W_{s_n} f(x_n), z_n) ]

  so an image only contributes to the sub-class loss of its own super-class. ``z_n`` is a *local* index
  in ``[0, k_{s_n})``; :func:`local_sub_targets` converts global level-2 cluster ids to local ones.

The sub-class classifiers are stored as one flat ``(sum_s k_s, D)`` weight (and bias) with per-super-class
offsets, so there is no padding however unequal the ``k_s`` are. Three ways to compute the sub-class
logits of a mixed batch give the same loss and gradients (:data:`SUB_STRATEGIES`):

* ``"grouped"`` (default): sort the rows by super-class and run one matrix product per super-class present
  in the batch against its slice of the weight: exactly the ``B * k * D`` multiply-adds of the rows' own
  classifiers, no copy of the weight in the forward pass (the backward of the split copies its gradient
  once). In the paper's distributed layout, where a rank only sees one super-class, it is a single GEMM.
* ``"gather"``: gather every row's own classifier ``W_{s_n}`` padded to ``k_max`` rows into a
  ``(B, k_max, D)`` tensor and take batched dot products (a single batched op, no Python loop, but a
  ``B * k_max * D`` copy in both directions).
* ``"dense"``: all ``sum_s k_s`` logits of every row in one matrix product, then gather each row's own
  ``k_max`` logits. ``S`` times the arithmetic; it might only pay off for small heads on a GPU (not
  measured: no GPU was available).

``tools/bench_heads.py`` times them: on CPU (batch 128, D = 256, S = 16..64, k_s = 256..4096) ``"grouped"``
was the fastest everywhere, ``"gather"`` 5-35x and ``"dense"`` 1.15-4x slower (figures in its docstring).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NUM_ROTATIONS = 4
SubStrategy = Literal["grouped", "gather", "dense"]
SUB_STRATEGIES: tuple[str, ...] = ("grouped", "gather", "dense")
# DeepCluster initialises its re-created top layer with N(0, 0.01) weights and zero biases.
_INIT_STD = 0.01

Stats = dict[str, torch.Tensor]


class LocalTargets(NamedTuple):
    """Level-2 targets of rows expressed relative to their level-1 parent cluster."""

    parents: np.ndarray
    """(rows,) int64 level-1 cluster of each row."""
    local: np.ndarray
    """(rows,) int64 index of each row's level-2 cluster among the children of its parent."""
    counts: np.ndarray
    """(num_parents,) int64 number of level-2 clusters under each level-1 cluster."""


def local_sub_targets(level2: np.ndarray, cluster_parents: np.ndarray, num_parents: int | None = None) -> LocalTargets:
    """Map global level-2 cluster ids to (parent, local index within the parent), vectorised.

    The children of a parent are numbered in increasing global id, so the contiguous layout of
    :class:`indexes.kmeans.KMeansResult` (children of group ``g`` are ``group_offsets[g] ..``) maps to
    ``global id - group_offsets[g]``; any other layout works as well.

    Args:
        level2: (rows,) global level-2 cluster id of each row, in ``[0, K2)``.
        cluster_parents: (K2,) level-1 parent of every level-2 cluster (``KMeansResult.parents``).
        num_parents: number of level-1 clusters ``m``; ``None`` = ``cluster_parents.max() + 1``.

    Returns:
        The parents, local indices and per-parent child counts (:class:`LocalTargets`).
    """
    level2 = np.asarray(level2, dtype=np.int64)
    cluster_parents = np.asarray(cluster_parents, dtype=np.int64)
    if cluster_parents.ndim != 1 or cluster_parents.size == 0 or cluster_parents.min() < 0:
        raise ValueError("cluster_parents must be a non-empty 1-D array of non-negative parent ids")
    num_parents = int(cluster_parents.max()) + 1 if num_parents is None else num_parents
    if cluster_parents.max() >= num_parents:
        raise ValueError(f"cluster_parents holds parent {cluster_parents.max()} >= num_parents={num_parents}")
    if level2.size and (level2.min() < 0 or level2.max() >= cluster_parents.size):
        raise ValueError(f"level-2 ids must be in [0, {cluster_parents.size}), got "
                         f"[{level2.min()}, {level2.max()}]")
    counts = np.bincount(cluster_parents, minlength=num_parents)
    order = np.argsort(cluster_parents, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    local_of_cluster = np.empty_like(cluster_parents)
    local_of_cluster[order] = np.arange(cluster_parents.size) - starts[cluster_parents[order]]
    return LocalTargets(cluster_parents[level2], local_of_cluster[level2], counts)


def super_targets(parents: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Super-class ``s = 4 c + r`` of rows with level-1 cluster ``c`` and rotation ``r`` (quarter turns)."""
    return parents.long() * NUM_ROTATIONS + rotations.long()


def rotation_sub_counts(counts_per_parent: Sequence[int] | np.ndarray) -> list[int]:
    """``k_s`` per super-class from the level-2 counts per level-1 cluster: ``k_{4c+r} = counts[c]``."""
    return [int(count) for count in np.repeat(np.asarray(counts_per_parent, dtype=np.int64), NUM_ROTATIONS)]


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == targets).float().mean().detach()


def _check_targets(targets: torch.Tensor, num_classes: int, name: str) -> None:
    if targets.dtype not in (torch.int64, torch.int32) or targets.ndim != 1:
        raise TypeError(f"{name} must be a 1-D int64/int32 tensor, got {targets.dtype} of shape "
                        f"{tuple(targets.shape)}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}), got [{int(targets.min())}, "
                         f"{int(targets.max())}]")


def _check_features(features: torch.Tensor, feature_dim: int, batch: int) -> None:
    if features.ndim != 2 or features.shape[1] != feature_dim:
        raise ValueError(f"features must be (B, {feature_dim}), got {tuple(features.shape)}")
    if features.shape[0] != batch:
        raise ValueError(f"features have {features.shape[0]} rows but the targets {batch}")
    if batch == 0:
        raise ValueError("empty batch: the loss of zero rows is undefined")


def _linear(feature_dim: int, num_classes: int, generator: torch.Generator | None) -> nn.Linear:
    layer = nn.Linear(feature_dim, num_classes)
    with torch.no_grad():
        layer.weight.normal_(0.0, _INIT_STD, generator=generator)
        layer.bias.zero_()
    return layer


class RotationHead(nn.Module):
    """RotNet: a linear 4-way classifier of the rotation (0, 90, 180, 270 degrees)."""

    def __init__(self, feature_dim: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim} must be >= 1")
        self.feature_dim = feature_dim
        self.classifier = _linear(feature_dim, NUM_ROTATIONS, generator)

    def forward(self, features: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """Cross-entropy of the rotations; stats ``loss``, ``rotation_acc``."""
        _check_targets(rotations, NUM_ROTATIONS, "rotations")
        _check_features(features, self.feature_dim, rotations.shape[0])
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, rotations)
        return loss, {"loss": loss.detach(), "rotation_acc": _accuracy(logits, rotations)}


class ClusterHead(nn.Module):
    """DeepCluster: a linear classifier over the ``k`` clusters of a flat k-means, re-created after every
    re-clustering (:meth:`reinitialize`) because cluster ids carry no meaning from one clustering to the next.
    """

    def __init__(self, feature_dim: int, num_clusters: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim} must be >= 1")
        self.feature_dim = feature_dim
        self.reinitialize(num_clusters, generator=generator)

    def reinitialize(self, num_clusters: int, *, generator: torch.Generator | None = None) -> None:
        """Replace the classifier by a fresh one over ``num_clusters`` classes.

        The parameters are new tensors: rebuild the optimizer's parameter group of this head afterwards.
        """
        if num_clusters < 1:
            raise ValueError(f"num_clusters={num_clusters} must be >= 1")
        self.num_clusters = num_clusters
        device = self.classifier.weight.device if hasattr(self, "classifier") else torch.device("cpu")
        self.classifier = _linear(self.feature_dim, num_clusters, generator).to(device)

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """Cross-entropy of the cluster ids; stats ``loss``, ``cluster_acc``."""
        _check_targets(targets, self.num_clusters, "targets")
        _check_features(features, self.feature_dim, targets.shape[0])
        logits = self.classifier(features)
        loss = F.cross_entropy(logits, targets)
        return loss, {"loss": loss.detach(), "cluster_acc": _accuracy(logits, targets)}


class HierarchicalHead(nn.Module):
    """DeeperCluster's two-level head: super-class classifier ``V`` and one sub-class classifier per
    super-class (see the module docstring for the loss and the ``strategy`` choices).

    Args:
        feature_dim: dimension ``D`` of the backbone features.
        sub_counts: ``k_s`` for every super-class ``s`` (length ``S``; :func:`rotation_sub_counts` builds
            it from the level-2 counts per level-1 cluster). Every ``k_s`` must be >= 1.
        strategy: how the sub-class logits are computed, one of :data:`SUB_STRATEGIES`.
        generator: RNG of the weight initialisation (``None``: torch's global RNG).

    The ``state_dict`` holds the parameters only: a checkpoint must also record :attr:`sub_counts` to
    rebuild a head of the right shape before loading it.
    """

    def __init__(self, feature_dim: int, sub_counts: Sequence[int], *, strategy: SubStrategy = "grouped",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim} must be >= 1")
        if strategy not in SUB_STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {', '.join(SUB_STRATEGIES)}")
        self.feature_dim = feature_dim
        self.strategy = strategy
        self.reinitialize(sub_counts, generator=generator)

    @property
    def num_super(self) -> int:
        """Number of super-classes ``S``."""
        return len(self.sub_counts)

    def reinitialize(self, sub_counts: Sequence[int], *, generator: torch.Generator | None = None) -> None:
        """Re-create ``V`` and every ``W_s`` for a new clustering with ``sub_counts[s]`` sub-classes.

        The parameters are new tensors: rebuild the optimizer's parameter group of this head afterwards.
        """
        counts = [int(count) for count in sub_counts]
        if not counts or min(counts) < 1:
            raise ValueError(f"sub_counts must be a non-empty list of counts >= 1, got {counts[:16]}")
        device = self.sub_weight.device if hasattr(self, "sub_weight") else torch.device("cpu")
        self.sub_counts = counts
        self.super_classifier = _linear(self.feature_dim, len(counts), generator).to(device)
        weight = torch.empty(sum(counts), self.feature_dim).normal_(0.0, _INIT_STD, generator=generator)
        self.sub_weight = nn.Parameter(weight.to(device))
        self.sub_bias = nn.Parameter(torch.zeros(sum(counts), device=device))
        offsets = torch.tensor([0, *np.cumsum(counts).tolist()], dtype=torch.int64, device=device)
        self.register_buffer("sub_offsets", offsets, persistent=False)
        self.register_buffer("sub_sizes", torch.tensor(counts, dtype=torch.int64, device=device), persistent=False)

    def forward(self, features: torch.Tensor, super_targets: torch.Tensor,
                sub_targets: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """Eq. 5 on a batch: mean super-class CE plus mean sub-class CE of each row's own super-class.

        Args:
            features: (B, D) backbone features.
            super_targets: (B,) super-class ``s_n = 4 c_n + r_n`` in ``[0, S)``.
            sub_targets: (B,) local level-2 index ``z_n`` in ``[0, k_{s_n})``.

        Returns:
            The loss and stats ``loss``, ``loss_super``, ``loss_sub``, ``super_acc``, ``sub_acc`` (argmax of
            the row's own sub-classifier), ``rotation_acc`` and ``cluster_acc`` (the rotation ``s % 4`` and
            the level-1 cluster ``s // 4`` read from the predicted super-class).
        """
        self._check(features, super_targets, sub_targets)
        super_logits = self.super_classifier(features)
        loss_super = F.cross_entropy(super_logits, super_targets)
        sub_loss_sum, sub_correct = self._sub_terms(features, super_targets, sub_targets)
        loss_sub = sub_loss_sum / features.shape[0]
        loss = loss_super + loss_sub
        predicted = super_logits.argmax(dim=1)
        stats = {
            "loss": loss.detach(), "loss_super": loss_super.detach(), "loss_sub": loss_sub.detach(),
            "super_acc": (predicted == super_targets).float().mean(),
            "sub_acc": sub_correct.float() / features.shape[0],
            "rotation_acc": (predicted % NUM_ROTATIONS == super_targets % NUM_ROTATIONS).float().mean(),
            "cluster_acc": (predicted // NUM_ROTATIONS == super_targets // NUM_ROTATIONS).float().mean(),
        }
        return loss, stats

    def _check(self, features: torch.Tensor, super_targets: torch.Tensor, sub_targets: torch.Tensor) -> None:
        _check_targets(super_targets, self.num_super, "super_targets")
        _check_targets(sub_targets, max(self.sub_counts), "sub_targets")
        if sub_targets.shape != super_targets.shape:
            raise ValueError(f"sub_targets {tuple(sub_targets.shape)} and super_targets "
                             f"{tuple(super_targets.shape)} differ in shape")
        _check_features(features, self.feature_dim, super_targets.shape[0])
        too_big = sub_targets >= self.sub_sizes[super_targets]
        if bool(too_big.any()):
            row = int(too_big.nonzero()[0, 0])
            raise ValueError(f"row {row}: sub-target {int(sub_targets[row])} >= k_s="
                             f"{self.sub_counts[int(super_targets[row])]} of its super-class "
                             f"{int(super_targets[row])}")

    def _sub_terms(self, features: torch.Tensor, super_targets: torch.Tensor,
                   sub_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over rows of the sub-class CE, and the number of rows whose sub-class argmax is right."""
        if self.strategy == "grouped":
            return self._sub_grouped(features, super_targets, sub_targets)
        logits = self._sub_logits_padded(features, super_targets)
        loss_sum = F.cross_entropy(logits, sub_targets, reduction="sum")
        return loss_sum, (logits.argmax(dim=1) == sub_targets).sum().detach()

    def _sub_grouped(self, features: torch.Tensor, super_targets: torch.Tensor,
                     sub_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(super_targets, stable=True)
        group_sizes = torch.bincount(super_targets, minlength=self.num_super).tolist()
        # One split of the flat weight (not one slice per group): its backward builds a single gradient.
        weights = self.sub_weight.split(self.sub_counts)
        biases = self.sub_bias.split(self.sub_counts)
        feature_groups = features[order].split(group_sizes)
        target_groups = sub_targets[order].split(group_sizes)
        loss_sum = features.new_zeros(())
        correct = torch.zeros((), dtype=torch.int64, device=features.device)
        for s, size in enumerate(group_sizes):
            if size == 0:
                continue
            logits = F.linear(feature_groups[s], weights[s], biases[s])
            loss_sum = loss_sum + F.cross_entropy(logits, target_groups[s], reduction="sum")
            correct = correct + (logits.argmax(dim=1) == target_groups[s]).sum().detach()
        return loss_sum, correct

    def _sub_logits_padded(self, features: torch.Tensor, super_targets: torch.Tensor) -> torch.Tensor:
        """(B, k_max) logits of each row's own sub-classifier, ``-inf`` beyond its ``k_s``."""
        k_max = max(self.sub_counts)
        columns = torch.arange(k_max, device=features.device)
        valid = columns < self.sub_sizes[super_targets].unsqueeze(1)
        index = (self.sub_offsets[super_targets].unsqueeze(1) + columns).where(valid, 0)
        if self.strategy == "gather":
            rows = self.sub_weight[index]  # (B, k_max, D)
            logits = torch.einsum("bd,bkd->bk", features, rows) + self.sub_bias[index]
        else:
            logits = (F.linear(features, self.sub_weight, self.sub_bias)).gather(1, index)
        return logits.masked_fill(~valid, float("-inf"))
