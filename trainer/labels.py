"""The training targets of a clustering, read from the feature store that holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.clustering import open_clustering
from trainer.losses import local_sub_targets, smallest_int_type


@dataclass
class Labels:
    """Per-row targets of a clustering (row order of the store and of the shards).

    Each per-row array has the smallest integer type that holds its ids (int32 leaves, int16 parents and
    local targets up to 32,767 clusters: 8 bytes a row, 770 MB at 96M rows; int64 took 24); take a batch's
    targets with :meth:`targets`, which widens them to the int64 that losses expect.
    """

    name: str
    balance: np.ndarray  # (N,) leaf cluster, -1 = never emitted
    parents: np.ndarray  # (N,) level-0 cluster (deepercluster) or the cluster (flat)
    local: np.ndarray  # (N,) level-1 index within the parent (deepercluster)
    counts: np.ndarray  # children per level-0 cluster (deepercluster)
    num_clusters: int

    @classmethod
    def from_store(cls, store: Any, name: str, mode: str) -> Labels:
        clustering = open_clustering(store, name)
        if mode != "deepercluster":
            return cls.flat(name, clustering.assignments(0), len(clustering.sizes(0)))
        return cls.hierarchical(name, clustering.assignments(1), clustering.parents(1), len(clustering.sizes(0)))

    @classmethod
    def flat(cls, name: str, ids: np.ndarray, num_clusters: int) -> Labels:
        """One level: ``ids`` (-1 = none) are both the balance and the targets; no local targets (a view of a
        single zero, no memory)."""
        ids = _narrowed(ids, num_clusters)
        return cls(name, ids, ids, np.broadcast_to(np.zeros(1, np.int8), ids.shape), np.zeros(0, np.int64),
                   num_clusters)

    @classmethod
    def hierarchical(cls, name: str, level1: np.ndarray, parents: np.ndarray, num_parents: int) -> Labels:
        """Two levels: balance over the leaves ``level1`` (-1 = none), targets (the leaf's parent, its index
        under it; a row's parent is its level-0 cluster, so that level is not read)."""
        level1 = _narrowed(level1, len(parents))
        targets = local_sub_targets(np.maximum(level1, 0), parents, num_parents=num_parents)
        return cls(name, level1, targets.parents, targets.local, targets.counts, int(len(parents)))

    def targets(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(parents, local) int64 targets of ``rows``."""
        return self.parents[rows].astype(np.int64), self.local[rows].astype(np.int64)


def _narrowed(ids: np.ndarray, num_clusters: int) -> np.ndarray:
    """``ids`` in the smallest type holding ``-1 .. num_clusters - 1`` (not copied when it already is)."""
    return np.asarray(ids).astype(smallest_int_type(max(num_clusters - 1, 0)), copy=False)
