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

from indexes.data import stream_seed
from trainer.config import SUB_HEAD_GRAD_MEANS

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
    """(rows,) level-1 cluster of each row, in the smallest signed integer type that holds the parent ids."""
    local: np.ndarray
    """(rows,) index of each row's level-2 cluster among the children of its parent, in the smallest signed
    integer type that holds it (int16 up to 32,767 children: 2 bytes a row, 190 MB at 96M rows)."""
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
    level2 = np.asarray(level2)  # indexed as it is: a copy in int64 would be 8 bytes a row
    if level2.dtype.kind not in "iu":
        raise ValueError(f"level-2 ids must be integers, got {level2.dtype}")
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
    parent_of = cluster_parents.astype(smallest_int_type(num_parents - 1))
    local_of = local_of_cluster.astype(smallest_int_type(int(counts.max(initial=1)) - 1))
    return LocalTargets(parent_of[level2], local_of[level2], counts)


def smallest_int_type(largest: int) -> type:
    """The smallest signed numpy integer type holding ``-1 .. largest`` (per-row targets: int16 for up to
    32,767 clusters)."""
    return next(t for t in (np.int8, np.int16, np.int32, np.int64) if largest <= np.iinfo(t).max)


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


GRAD_MEANS: tuple[str, ...] = SUB_HEAD_GRAD_MEANS
"""How the gradient of a sub-class classifier ``W_s`` is averaged: over the batch's rows (``batch``: the loss of
Eq. 5 as written, so ``W_s`` learns about S times slower than ``V``) or over the rows of its own super-class
(``superclass``: what the reference code's communication groups compute, every ``W_s`` at ``V``'s pace).
The backbone's gradient is the batch mean either way."""


class SubTerms(NamedTuple):
    """The sub-class terms of a batch's rows (those of the owned super-classes)."""

    loss: torch.Tensor
    """Scalar to back-propagate: the CE sum of each super-class's rows divided by its ``divisor``."""
    ce: torch.Tensor
    """(rows,) detached cross-entropy of every row with its own sub-class classifier, in row order."""
    correct: torch.Tensor
    """(rows,) bool: the row's sub-class argmax is its target."""


def _seed_of(seed: int, super_class: int) -> int:
    return stream_seed(seed, super_class) & (2**63 - 1)


def super_class_terms(logits: torch.Tensor, super_targets: torch.Tensor) -> tuple[torch.Tensor, Stats]:
    """Mean super-class CE of ``(B, S)`` logits and its stats ``loss_super``, ``super_acc``, ``rotation_acc`` and
    ``cluster_acc`` (the rotation ``s % 4`` and the level-1 cluster ``s // 4`` read from the predicted
    super-class)."""
    loss = F.cross_entropy(logits, super_targets)
    predicted = logits.argmax(dim=1)
    return loss, {
        "loss_super": loss.detach(), "super_acc": (predicted == super_targets).float().mean(),
        "rotation_acc": (predicted % NUM_ROTATIONS == super_targets % NUM_ROTATIONS).float().mean(),
        "cluster_acc": (predicted // NUM_ROTATIONS == super_targets // NUM_ROTATIONS).float().mean(),
    }


class SuperClassHead(nn.Module):
    """DeeperCluster's super-class classifier ``V`` on its own: the part of the two-level head that every rank
    holds (the sub-class classifiers may be sharded, :class:`SubClassHeads`)."""

    def __init__(self, feature_dim: int, num_super: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if feature_dim < 1 or num_super < 1:
            raise ValueError(f"feature_dim={feature_dim} and num_super={num_super} must be >= 1")
        self.feature_dim = feature_dim
        self.classifier = _linear(feature_dim, num_super, generator)

    def forward(self, features: torch.Tensor, super_targets: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """Mean super-class CE and its stats (:func:`super_class_terms`)."""
        _check_targets(super_targets, self.classifier.out_features, "super_targets")
        _check_features(features, self.feature_dim, super_targets.shape[0])
        return super_class_terms(self.classifier(features), super_targets)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by ``factor`` (a number or a column)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(tensor: torch.Tensor, factor: float | torch.Tensor | None) -> torch.Tensor:
    """``tensor``, whose gradient is multiplied by ``factor`` on the way back (``None`` or 1: unchanged)."""
    if factor is None or (isinstance(factor, (int, float)) and factor == 1):
        return tensor
    return _ScaleGrad.apply(tensor, factor)


class SubClassHeads(nn.Module):
    """The sub-class classifiers ``W_s`` of the super-classes ``[first, stop)`` (all of them by default): one
    flat ``(sum k_s, D)`` weight and bias, no padding however unequal the ``k_s`` are.

    ``W_s`` is drawn from its own generator, seeded by ``(seed, s)``, so a shard holding some super-classes
    has exactly the rows the whole head would have, whoever holds the others.

    Args:
        feature_dim: dimension ``D`` of the backbone features.
        sub_counts: ``k_s`` of every super-class ``s`` (all ``S`` of them, >= 1 each).
        first, stop: the super-classes held here (``stop=None``: up to ``S``); may be empty.
        strategy: how the sub-class logits are computed, one of :data:`SUB_STRATEGIES`.
        seed: seed of the weights.
    """

    def __init__(self, feature_dim: int, sub_counts: Sequence[int], *, first: int = 0, stop: int | None = None,
                 strategy: SubStrategy = "grouped", seed: int = 0) -> None:
        super().__init__()
        if feature_dim < 1:
            raise ValueError(f"feature_dim={feature_dim} must be >= 1")
        if strategy not in SUB_STRATEGIES:
            raise ValueError(f"strategy={strategy!r} is not one of {', '.join(SUB_STRATEGIES)}")
        self.feature_dim = feature_dim
        self.strategy = strategy
        self._build(sub_counts, first, stop, seed)

    @property
    def num_super(self) -> int:
        """Number of super-classes ``S`` (all of them, held here or not)."""
        return len(self.sub_counts)

    @property
    def owned_counts(self) -> list[int]:
        """``k_s`` of the super-classes held here."""
        return self.sub_counts[self.first:self.stop]

    def _build(self, sub_counts: Sequence[int], first: int, stop: int | None, seed: int) -> None:
        counts = [int(count) for count in sub_counts]
        if not counts or min(counts) < 1:
            raise ValueError(f"sub_counts must be a non-empty list of counts >= 1, got {counts[:16]}")
        stop = len(counts) if stop is None else stop
        if not 0 <= first <= stop <= len(counts):
            raise ValueError(f"super-classes [{first}, {stop}) are not within [0, {len(counts)})")
        device = self.sub_weight.device if hasattr(self, "sub_weight") else torch.device("cpu")
        self.sub_counts, self.first, self.stop = counts, first, stop
        owned = counts[first:stop]
        weight = torch.empty(sum(owned), self.feature_dim)
        for rows, s in zip(weight.split(owned), range(first, stop)):
            rows.normal_(0.0, _INIT_STD, generator=torch.Generator().manual_seed(_seed_of(seed, s)))
        self.sub_weight = nn.Parameter(weight.to(device))
        self.sub_bias = nn.Parameter(torch.zeros(sum(owned), device=device))
        offsets = torch.tensor([0, *np.cumsum(owned).tolist()], dtype=torch.int64, device=device)
        self.register_buffer("sub_offsets", offsets, persistent=False)
        self.register_buffer("sub_sizes", torch.tensor(counts, dtype=torch.int64, device=device), persistent=False)

    def check_targets(self, super_targets: torch.Tensor, sub_targets: torch.Tensor) -> None:
        """Raise ``ValueError``/``TypeError`` unless every row has a super-class in ``[0, S)`` and a sub-class
        in ``[0, k_s)`` of its super-class."""
        _check_targets(super_targets, self.num_super, "super_targets")
        _check_targets(sub_targets, max(self.sub_counts), "sub_targets")
        if sub_targets.shape != super_targets.shape:
            raise ValueError(f"sub_targets {tuple(sub_targets.shape)} and super_targets "
                             f"{tuple(super_targets.shape)} differ in shape")
        too_big = sub_targets >= self.sub_sizes[super_targets]
        if bool(too_big.any()):
            row = int(too_big.nonzero()[0, 0])
            raise ValueError(f"row {row}: sub-target {int(sub_targets[row])} >= k_s="
                             f"{self.sub_counts[int(super_targets[row])]} of its super-class "
                             f"{int(super_targets[row])}")

    def group_sizes(self, super_targets: torch.Tensor) -> torch.Tensor:
        """(stop - first,) int64: rows of each held super-class among ``super_targets``."""
        return torch.bincount(super_targets - self.first, minlength=self.stop - self.first)

    def forward(self, features: torch.Tensor, super_targets: torch.Tensor, sub_targets: torch.Tensor, *,
                divisor: float | torch.Tensor, feature_scale: float | torch.Tensor | None = None) -> SubTerms:
        """The sub-class terms of rows whose super-classes are all held here.

        Args:
            features: (R, D) features of the rows.
            super_targets: (R,) super-class of each row, in ``[first, stop)``.
            sub_targets: (R,) local sub-class index of each row, in ``[0, k_s)``.
            divisor: the CE sum of super-class ``s``'s rows is divided by ``divisor`` (a number) or by
                ``divisor[s - first]`` (a tensor): the gradient of ``W_s`` is that weighted sum.
            feature_scale: number or per-super-class tensor multiplying the gradient that flows back into the
                features of ``s``'s rows (so the backbone may see another weighting than ``W_s``).
        """
        if features.ndim != 2 or features.shape != (super_targets.shape[0], self.feature_dim):
            raise ValueError(f"features must be ({super_targets.shape[0]}, {self.feature_dim}), got "
                             f"{tuple(features.shape)}")
        if super_targets.numel() and (super_targets.min() < self.first or super_targets.max() >= self.stop):
            raise ValueError(f"super_targets must be held here, in [{self.first}, {self.stop})")
        if self.strategy == "grouped":
            return self._grouped(features, super_targets, sub_targets, divisor, feature_scale)
        local = super_targets - self.first
        if isinstance(feature_scale, torch.Tensor):
            feature_scale = feature_scale[local].unsqueeze(1).to(features.dtype)
        logits = self._logits_padded(scale_grad(features, feature_scale), local)
        ce = F.cross_entropy(logits, sub_targets, reduction="none")
        loss = ce.sum() / divisor if not isinstance(divisor, torch.Tensor) else (ce / divisor[local]).sum()
        return SubTerms(loss, ce.detach(), logits.argmax(dim=1) == sub_targets)

    def _grouped(self, features: torch.Tensor, super_targets: torch.Tensor, sub_targets: torch.Tensor,
                 divisor: float | torch.Tensor, feature_scale: float | torch.Tensor | None) -> SubTerms:
        local = super_targets - self.first
        order = torch.argsort(local, stable=True)
        group_sizes = torch.bincount(local, minlength=self.stop - self.first).tolist()
        per_group = isinstance(divisor, torch.Tensor)
        divisors = divisor.tolist() if per_group else None
        scales = feature_scale.tolist() if isinstance(feature_scale, torch.Tensor) else None
        # One split of the flat weight (not one slice per group): its backward builds a single gradient.
        weights, biases = self.sub_weight.split(self.owned_counts), self.sub_bias.split(self.owned_counts)
        feature_groups = features[order].split(group_sizes)
        target_groups = sub_targets[order].split(group_sizes)
        loss = features.new_zeros((), dtype=torch.float32)
        ce_parts, correct_parts = [], []
        for s, size in enumerate(group_sizes):
            if size == 0:
                continue
            rows = scale_grad(feature_groups[s], scales[s] if scales is not None else feature_scale)
            logits = F.linear(rows, weights[s], biases[s])
            ce = F.cross_entropy(logits, target_groups[s], reduction="none")
            loss = loss + (ce.sum() / divisors[s] if per_group else ce.sum())
            ce_parts.append(ce.detach())
            correct_parts.append(logits.argmax(dim=1) == target_groups[s])
        if not per_group:
            loss = loss / divisor
        ce_sorted = torch.cat(ce_parts) if ce_parts else features.new_zeros(0, dtype=torch.float32)
        correct_sorted = torch.cat(correct_parts) if correct_parts else torch.zeros(0, dtype=torch.bool,
                                                                                   device=features.device)
        ce, correct = torch.empty_like(ce_sorted), torch.empty_like(correct_sorted)
        ce[order], correct[order] = ce_sorted, correct_sorted
        return SubTerms(loss, ce, correct)

    def _logits_padded(self, features: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(R, k_max) logits of each row's own sub-classifier, ``-inf`` beyond its ``k_s``."""
        k_max = max(self.owned_counts)
        columns = torch.arange(k_max, device=features.device)
        sizes = self.sub_sizes[self.first:self.stop]
        valid = columns < sizes[local].unsqueeze(1)
        index = (self.sub_offsets[local].unsqueeze(1) + columns).where(valid, 0)
        if self.strategy == "gather":
            rows = self.sub_weight[index]  # (R, k_max, D)
            logits = torch.einsum("bd,bkd->bk", features, rows) + self.sub_bias[index]
        else:
            logits = (F.linear(features, self.sub_weight, self.sub_bias)).gather(1, index)
        return logits.masked_fill(~valid, float("-inf"))


class HierarchicalHead(SubClassHeads):
    """DeeperCluster's two-level head in one process: super-class classifier ``V`` and every sub-class
    classifier (see the module docstring for the loss and the ``strategy`` choices). The trainer holds the two
    parts apart (:class:`SuperClassHead` on every rank, :class:`SubClassHeads` sharded); this is the same
    computation on one device.

    Args:
        feature_dim: dimension ``D`` of the backbone features.
        sub_counts: ``k_s`` for every super-class ``s`` (length ``S``; :func:`rotation_sub_counts` builds
            it from the level-2 counts per level-1 cluster). Every ``k_s`` must be >= 1.
        strategy: how the sub-class logits are computed, one of :data:`SUB_STRATEGIES`.
        grad_mean: how each ``W_s``'s gradient is averaged, one of :data:`GRAD_MEANS`.
        generator: RNG of the weight initialisation (``None``: torch's global RNG): ``V``, then the seed of
            the ``W_s``.

    The ``state_dict`` holds the parameters only: a checkpoint must also record :attr:`sub_counts` to
    rebuild a head of the right shape before loading it.
    """

    def __init__(self, feature_dim: int, sub_counts: Sequence[int], *, strategy: SubStrategy = "grouped",
                 grad_mean: str = "batch", generator: torch.Generator | None = None) -> None:
        if grad_mean not in GRAD_MEANS:
            raise ValueError(f"grad_mean={grad_mean!r} is not one of {', '.join(GRAD_MEANS)}")
        super().__init__(feature_dim, [1], strategy=strategy)
        self.grad_mean = grad_mean
        self.reinitialize(sub_counts, generator=generator)

    def reinitialize(self, sub_counts: Sequence[int], *, generator: torch.Generator | None = None) -> None:
        """Re-create ``V`` and every ``W_s`` for a new clustering with ``sub_counts[s]`` sub-classes.

        The parameters are new tensors: rebuild the optimizer's parameter group of this head afterwards.
        """
        counts = [int(count) for count in sub_counts]
        if not counts or min(counts) < 1:
            raise ValueError(f"sub_counts must be a non-empty list of counts >= 1, got {counts[:16]}")
        device = self.sub_weight.device
        self.super_classifier = _linear(self.feature_dim, len(counts), generator).to(device)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        self._build(counts, 0, len(counts), seed)

    def forward(self, features: torch.Tensor, super_targets: torch.Tensor,  # type: ignore[override]
                sub_targets: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """Eq. 5 on a batch: mean super-class CE plus the sub-class CE of each row's own super-class.

        Args:
            features: (B, D) backbone features.
            super_targets: (B,) super-class ``s_n = 4 c_n + r_n`` in ``[0, S)``.
            sub_targets: (B,) local level-2 index ``z_n`` in ``[0, k_{s_n})``.

        Returns:
            The loss to back-propagate (with ``grad_mean="batch"``, Eq. 5's mean over the batch) and stats
            ``loss`` (Eq. 5's value), ``loss_super``, ``loss_sub`` (mean over the batch), ``super_acc``,
            ``sub_acc`` (argmax of the row's own sub-classifier), ``rotation_acc`` and ``cluster_acc``.
        """
        self.check_targets(super_targets, sub_targets)
        _check_features(features, self.feature_dim, super_targets.shape[0])
        loss_super, stats = super_class_terms(self.super_classifier(features), super_targets)
        batch = features.shape[0]
        divisor, scale = sub_normalisation(self.grad_mean, self.group_sizes(super_targets), batch, batch)
        terms = super().forward(features, super_targets, sub_targets, divisor=divisor, feature_scale=scale)
        loss_sub = terms.ce.sum() / batch
        stats |= {"loss": loss_super.detach() + loss_sub, "loss_sub": loss_sub,
                  "sub_acc": terms.correct.float().sum() / batch}
        return loss_super + terms.loss, stats


def sub_normalisation(grad_mean: str, group_sizes: torch.Tensor, batch: int, total: int,
                      ) -> tuple[float | torch.Tensor, float | torch.Tensor | None]:
    """``(divisor, feature_scale)`` for :meth:`SubClassHeads.forward` on the rows of one step.

    Args:
        grad_mean: one of :data:`GRAD_MEANS`.
        group_sizes: rows of each held super-class over the whole step (every rank's rows).
        batch: rows of one rank's batch (the backbone's gradient is the mean over them, before the data-parallel
            average over ranks).
        total: rows of the step over all ranks.

    With ``batch`` the CE sums are divided by ``total`` (``W_s``'s gradient is the mean over every rank's rows,
    as the data-parallel average of per-rank means is) and the features' gradient scaled back to the per-rank
    mean; with ``superclass`` each super-class's CE sum is divided by its own row count.
    """
    if grad_mean == "batch":
        return float(total), (total / batch if total != batch else None)
    sizes = group_sizes.to(torch.float32)
    return sizes.clamp(min=1.0), sizes / batch
