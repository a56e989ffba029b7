"""Per-cluster profiles (size, purity per metadata kind, landmark / single-user / device flags) and the
distribution of cluster sizes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from dataengine.metrics.contingency import PurityTable
from dataengine.metrics.labels import KIND_DEVICE, KIND_GPS, KIND_USER


@dataclass(frozen=True, kw_only=True)
class ClusterFlagConfig:
    """Thresholds of the cluster flags of :class:`ClusterProfiles` (purities are shares in [0, 1])."""

    min_size: int = 20
    """Clusters with fewer rows are never flagged: the purity of a handful of rows says little."""
    min_labelled: int = 10
    """A kind's purity counts only in clusters where at least this many rows have that metadata."""
    landmark_gps_purity: float = 0.5
    """Landmark: at least this share of the geotagged rows lies in one GPS cell..."""
    landmark_max_user_purity: float = 0.5
    """...while no user holds this share or more of the rows with a user..."""
    landmark_min_users: int = 5
    """...and at least this many distinct users contribute (many users at one place)."""
    single_user_purity: float = 0.9
    """Single-user: one user holds at least this share of the rows with a user."""
    device_purity: float = 0.8
    """Device cluster (e.g. scanners): one device holds this share of the rows with a device, and the
    cluster is not single-user (one user's camera says nothing about the content)."""

    def __post_init__(self) -> None:
        for name in ("min_size", "min_labelled", "landmark_min_users"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        shares = ("landmark_gps_purity", "landmark_max_user_purity", "single_user_purity", "device_purity")
        for name in shares:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a share of rows and must be in [0, 1], got {value}")


@dataclass(frozen=True, kw_only=True)
class ClusterProfiles:
    """Per-cluster size, purity per metadata kind and flags; arrays aligned on ``cluster_ids``."""

    cluster_ids: np.ndarray
    """Non-empty clusters, ascending."""
    sizes: np.ndarray
    """Rows per cluster, with or without metadata."""
    purity: dict[str, PurityTable] = field(default_factory=dict)
    """Per metadata kind: composition aligned on ``cluster_ids``."""
    landmark: np.ndarray
    """GPS-pure but not user-pure: many users at one place (DeeperCluster's tourist landmarks)."""
    single_user: np.ndarray
    """Dominated by one user."""
    device: np.ndarray
    """Dominated by one capture device without being single-user."""


def _flags(sizes: np.ndarray, purity: Mapping[str, PurityTable],
           config: ClusterFlagConfig) -> dict[str, np.ndarray]:
    """Landmark, single-user and device flags; a flag needing an absent kind is all False."""
    never = np.zeros(sizes.size, dtype=bool)
    big = sizes >= config.min_size

    def known(kind: str) -> np.ndarray:
        table = purity.get(kind)
        return never if table is None else table.labelled >= max(config.min_labelled, 1)

    def pure(kind: str, threshold: float) -> np.ndarray:
        table = purity.get(kind)
        return never if table is None else known(kind) & (table.purity >= threshold)

    single_user = big & pure(KIND_USER, config.single_user_purity)
    landmark = never
    if KIND_USER in purity:
        users = purity[KIND_USER]
        many_users = (users.purity < config.landmark_max_user_purity) & (
            users.num_values >= config.landmark_min_users)
        landmark = big & pure(KIND_GPS, config.landmark_gps_purity) & known(KIND_USER) & many_users
    device = big & pure(KIND_DEVICE, config.device_purity) & ~single_user
    return {"landmark": landmark, "single_user": single_user, "device": device}


@dataclass(frozen=True, kw_only=True)
class SizeStats:
    """Distribution of cluster sizes."""

    num_clusters: int
    """Clusters counted, empty ones included when the caller gave ``num_clusters``."""
    num_empty: int
    """Clusters without rows."""
    min: int
    """Smallest size."""
    median: float
    """Median size."""
    max: int
    """Largest size."""
    entropy: float
    """Entropy (nats) of the distribution of rows over clusters."""
    normalized_entropy: float
    """``entropy / log(num_clusters)``: 1 for equal sizes (NaN for a single cluster)."""
    gini: float
    """Gini coefficient of the sizes: 0 for equal sizes, towards 1 when few clusters hold all rows."""


def size_stats(sizes: object, num_clusters: int | None = None) -> SizeStats:
    """Min, median, max, entropy and Gini coefficient of cluster sizes.

    Args:
        sizes: Rows per (non-empty) cluster.
        num_clusters: Total number of clusters, when known (k of k-means): the missing ones count as
            empty clusters of size 0.
    """
    values = np.asarray(sizes, dtype=np.int64)
    if values.ndim != 1 or (values < 0).any():
        raise ValueError("sizes must be a 1-D array of non-negative counts")
    if num_clusters is not None:
        if num_clusters < values.size:
            raise ValueError(f"num_clusters={num_clusters} is below the {values.size} sizes given")
        values = np.concatenate([values, np.zeros(num_clusters - values.size, np.int64)])
    if not values.size:
        raise ValueError("size_stats needs at least one cluster")
    total = int(values.sum())
    nonzero = values[values > 0].astype(np.float64)
    entropy = float(-np.sum(nonzero / total * np.log(nonzero / total))) if total else 0.0
    ordered = np.sort(values).astype(np.float64)
    ranks = np.arange(1, values.size + 1)
    gini = 0.0
    if total:
        gini = float(2 * np.sum(ranks * ordered) / (values.size * total) - (values.size + 1) / values.size)
    return SizeStats(
        num_clusters=int(values.size), num_empty=int(np.sum(values == 0)), min=int(ordered[0]),
        median=float(np.median(values)), max=int(ordered[-1]), entropy=entropy,
        normalized_entropy=entropy / math.log(values.size) if values.size > 1 else math.nan, gini=gini,
    )
