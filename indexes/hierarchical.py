"""Hierarchical k-means (DeeperCluster, Caron et al. 2019, section 4) with any number of levels.

Level 0 clusters every row into ``levels[0]`` clusters (the paper's m super-clusters). Each cluster of
level ``l`` is then split by its own k-means into ``levels[l + 1]`` sub-clusters (``balanced=True``: into
a number proportional to its size, ``levels[l + 1]`` per parent on average). Cluster ids are global per
level: the children of parent ``p`` are ``group_offsets[p] .. group_offsets[p + 1] - 1`` and
``parents[c]`` is the parent of cluster ``c``, so a row's id at level ``l`` determines its ids above.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from indexes.data import RowSource
from indexes.distributed import Reducer
from indexes.kmeans import KMeansResult, LloydConfig, fit_groups

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HierarchicalKMeansConfig(LloydConfig):
    """A hierarchical k-means: the Lloyd options apply to every k-means of every level."""

    levels: tuple[int, ...]
    """Clusters per level: ``(4, 1000)`` makes 4 clusters, each split into 1000 (4000 leaves)."""
    balanced: bool = False
    """Give each parent a number of children proportional to its size (same total) instead of a fixed k."""
    points_per_centroid: tuple[int | None, ...] | None = None
    """Training sample of each level's k-means, ``max_points_per_centroid`` per level (``None``: every row of
    the group, up to ``max_training_rows``); shorter than ``levels``: its last value for the deeper levels.
    ``None`` here: ``max_points_per_centroid`` at every level."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.levels) == 0 or any(int(k) < 1 for k in self.levels):
            raise ValueError(f"levels={self.levels} must be a non-empty sequence of cluster counts >= 1")
        object.__setattr__(self, "levels", tuple(int(k) for k in self.levels))
        if self.points_per_centroid is not None:
            if not self.points_per_centroid or any(p is not None and p < 1 for p in self.points_per_centroid):
                raise ValueError(f"points_per_centroid={self.points_per_centroid} must hold one or more values "
                                 ">= 1 or None (every row)")
            object.__setattr__(self, "points_per_centroid", tuple(self.points_per_centroid))

    def level_points_per_centroid(self, level: int) -> int | None:
        """The ``max_points_per_centroid`` of ``level``'s k-means."""
        if self.points_per_centroid is None:
            return self.max_points_per_centroid
        return self.points_per_centroid[min(level, len(self.points_per_centroid) - 1)]


@dataclass
class HierarchicalKMeansResult:
    """One :class:`~indexes.kmeans.KMeansResult` per level; level ``l``'s groups are level ``l - 1``'s clusters."""

    levels: list[KMeansResult]
    config: dict = field(default_factory=dict)

    @property
    def leaf_assignments(self) -> np.ndarray:
        """(local rows,) int32 cluster id of every row at the last level."""
        return self.levels[-1].assignments

    def arrays(self) -> dict[str, np.ndarray]:
        """Every level's arrays, named ``level{l}/{name}``."""
        return {f"level{l}/{name}": a for l, lv in enumerate(self.levels) for name, a in lv.arrays().items()}

    def to_dict(self) -> dict:
        """JSON-able statistics of every level and the resolved configuration."""
        return {"levels": [lv.to_dict() for lv in self.levels], "config": self.config}


def fit_hierarchical_kmeans(
    data: RowSource,
    config: HierarchicalKMeansConfig,
    *,
    reducer: Reducer | None = None,
    progress: Callable[[int], None] | None = None,
) -> HierarchicalKMeansResult:
    """Cluster every row of ``data`` level after level (all ranks of ``reducer`` call it together).

    Args:
        data: this process's rows (PCA-whitened and l2-normalised by the caller's transform, if wanted).
        config: the levels and the Lloyd options.
        reducer: the ranks sharing the clustering; ``None`` for a single process.
        progress: called with numbers of rows as each level's final assignment advances (each row once
            per level: ``len(levels) * num_rows`` in total).

    Returns:
        Per level the assignments of the local rows, the centroids, the parent of every cluster and
        the training statistics.
    """
    lloyd = LloydConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LloydConfig)})
    results: list[KMeansResult] = []
    for level, k in enumerate(config.levels):
        if level == 0:
            group_labels, num_children = None, np.array([k], dtype=np.int64)
        else:
            group_labels = results[-1].assignments
            num_children = children_per_parent(results[-1].sizes, k, balanced=config.balanced)
        level_lloyd = dataclasses.replace(lloyd, max_points_per_centroid=config.level_points_per_centroid(level))
        result = fit_groups(data, group_labels, num_children, level_lloyd, level=level, reducer=reducer,
                            progress=progress)
        result.config = {"level": level, "clusters_per_parent": k, "balanced": config.balanced}
        logger.info(
            "level %d: %d clusters trained on %d rows, objective %.6g, %d empty-cluster splits",
            level, result.num_clusters, int(result.num_train_rows.sum()), result.objective,
            int(result.empty_splits.sum()),
        )
        results.append(result)
    return HierarchicalKMeansResult(levels=results, config=dataclasses.asdict(config))


def children_per_parent(sizes: np.ndarray, k: int, *, balanced: bool) -> np.ndarray:
    """Number of sub-clusters of each parent cluster.

    Args:
        sizes: rows of each parent.
        k: sub-clusters per parent (``balanced``: on average).
        balanced: split ``k * len(sizes)`` sub-clusters over the parents in proportion to their sizes
            (largest remainders), at least one per non-empty parent (taken from the parent with most).

    A parent never gets more sub-clusters than rows: such parents are logged as warnings and the number
    they got is in the result's ``group_offsets``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if balanced and sizes.sum() > 0:
        quota = k * sizes.size * sizes / sizes.sum()
        counts = np.floor(quota).astype(np.int64)
        order = np.argsort(-(quota - counts), kind="stable")
        counts[order[: k * sizes.size - counts.sum()]] += 1
        for starved in np.flatnonzero((sizes > 0) & (counts == 0)):  # one child each, from the richest
            counts[np.argmax(counts)] -= 1
            counts[starved] = 1
    else:
        counts = np.full(sizes.size, k, dtype=np.int64)
    small = np.flatnonzero(counts > sizes)
    if small.size:
        logger.warning(
            "%d parent clusters have fewer rows than sub-clusters asked for (e.g. parent %d: %d rows, %d asked); "
            "they get one sub-cluster per row",
            small.size, small[0], sizes[small[0]], counts[small[0]],
        )
    return np.minimum(counts, sizes)
