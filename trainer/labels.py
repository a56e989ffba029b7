"""The training targets of a clustering, read from the feature store that holds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dataengine.clustering import open_clustering
from trainer.losses import local_sub_targets


@dataclass
class Labels:
    """Per-row targets of a clustering (row order of the store and of the shards)."""

    name: str
    balance: np.ndarray  # (N,) leaf cluster, -1 = never emitted
    parents: np.ndarray  # (N,) level-0 cluster (deepercluster) or the cluster (flat)
    local: np.ndarray  # (N,) level-1 index within the parent (deepercluster)
    counts: np.ndarray  # children per level-0 cluster (deepercluster)
    num_clusters: int

    @classmethod
    def from_store(cls, store: Any, name: str, mode: str) -> "Labels":
        clustering = open_clustering(store, name)
        level0 = clustering.assignments(0).astype(np.int64)
        if mode != "deepercluster":
            k = len(clustering.sizes(0))
            return cls(name, level0, level0, np.zeros_like(level0), np.zeros(0, np.int64), k)
        level1 = clustering.assignments(1).astype(np.int64)
        parents = clustering.parents(1)
        m = len(clustering.sizes(0))
        targets = local_sub_targets(np.maximum(level1, 0), parents, num_parents=m)
        return cls(name, level1, np.maximum(level0, 0), targets.local, targets.counts, int(len(parents)))
