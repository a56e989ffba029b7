"""Which source rows a curation keeps, and why: near-duplicates within clusters, then a seeded subset.

Rows without features (``valid`` False at embedding) have no cluster and are never kept. With a threshold,
near-duplicates are found within each cluster of the curation level by SemDeDup's rule
(:func:`indexes.dedup.earlier_neighbors`, rows in store order) and dropped; the strategy then chooses among
the remaining rows (:mod:`indexes.selection`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dataengine.clustering import open_clustering
from dataengine.curate.config import STATUSES, CurateConfig
from dataengine.store import FeatureStore

logger = logging.getLogger(__name__)

SELECTED, NOT_SELECTED, NEAR_DUPLICATE, INVALID = range(len(STATUSES))  # status codes: positions in STATUSES


@dataclass
class Selection:
    """The decision for every row of the store (row ``r`` = row ``r`` of the source ``metadata.parquet``).

    Attributes:
        status: ``(N,)`` int8 index into :data:`~dataengine.curate.config.STATUSES`.
        cluster: ``(N,)`` int64 cluster at ``level``, -1 for invalid rows.
        duplicate_of: ``(N,)`` int64 row of the earlier near-duplicate that a dropped row is closest to, else -1.
        similarity: ``(N,)`` float32 cosine similarity to the most similar earlier row of the cluster (NaN when
            not deduplicated, or for the first row of a cluster).
        level: the curation level.
        num_clusters: clusters at that level.
    """

    status: np.ndarray
    cluster: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    level: int
    num_clusters: int

    @property
    def selected_rows(self) -> np.ndarray:
        """Rows kept, in increasing order."""
        return np.flatnonzero(self.status == SELECTED)

    def counts(self) -> dict[str, int]:
        """Rows per status."""
        found = np.bincount(self.status, minlength=len(STATUSES))
        return {status: int(found[i]) for i, status in enumerate(STATUSES)}


class ClusteringArrays:
    """What curation reads of a stored clustering (through :class:`dataengine.clustering.Clustering`), with
    messages that say which strategy or space needs it."""

    def __init__(self, store: FeatureStore, name: str) -> None:
        self.clustering = open_clustering(store, name)
        self.name = name
        self.attrs = self.clustering.attrs
        self.num_levels = self.clustering.num_levels

    def level(self, level: int | None) -> int:
        """``level``, or the finest when ``None``; checked to exist."""
        if level is None:
            return self.num_levels - 1
        if not 0 <= level < self.num_levels:
            raise ValueError(f"clustering {self.name!r} has levels 0..{self.num_levels - 1}; level {level} is not "
                             "among them")
        return level

    def assignments(self, level: int) -> np.ndarray:
        """``(N,)`` cluster id of every row at ``level`` (-1: no cluster)."""
        return self.clustering.assignments(level).astype(np.int64)

    def num_clusters(self, level: int, ids: np.ndarray) -> int:
        """Clusters at ``level`` (as recorded; else one past the largest id)."""
        recorded = self.clustering.num_clusters(level)
        return recorded if recorded is not None else int(ids.max(initial=-1)) + 1

    def parents(self, level: int) -> np.ndarray:
        """Parent (at ``level - 1``) of every cluster of ``level``."""
        try:
            return self.clustering.parents(level).astype(np.int64)
        except KeyError:
            raise ValueError(f"clustering {self.name!r} stores no parents for level {level} (an assigned "
                             "clustering keeps ids only); use --strategy balanced") from None

    def whitening(self) -> Callable[[np.ndarray], np.ndarray]:
        """The clustering's PCA-whitening as a function of feature rows."""
        if not self.clustering.has_pca:
            raise ValueError(f"clustering {self.name!r} stores no PCA-whitening (an assigned clustering keeps ids "
                             "only); use --dedup-space features")
        return self.clustering.pca().apply


def check_inputs(store: FeatureStore, config: CurateConfig) -> None:
    """Everything the selection needs from the clustering is there (before any output is recorded).

    Raises:
        KeyError: no complete clustering of that name.
        ValueError: no such level, or the arrays a hierarchical selection or whitened deduplication read are
            missing (an assigned clustering keeps ids only).
    """
    arrays = ClusteringArrays(store, config.clustering)
    level = arrays.level(config.level)
    if config.strategy == "hierarchical":
        for upper in range(1, level + 1):
            arrays.parents(upper)
    if config.dedup_threshold is not None and config.dedup_space == "whitened":
        arrays.whitening()


def near_duplicate_similarities(store: FeatureStore, clusters: np.ndarray, *,
                                transform: Callable[[np.ndarray], np.ndarray] | None = None,
                                memory_bytes: int = 1 << 30,
                                progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most similar earlier row within its cluster, and their cosine similarity.

    Args:
        store: the feature store.
        clusters: ``(N,)`` cluster of every row; rows with -1 take no part.
        transform: applied to feature rows before comparing (e.g. the clustering's whitening); ``None`` = as
            stored.
        memory_bytes: vectors held at once; clusters go in batches that fit, one pass over the store each.
        progress: called with the number of rows compared in each cluster.

    Returns:
        ``(neighbors, similarities)``, ``(N,)`` each: the earlier row (-1 if none) and the similarity (NaN if none).
    """
    from indexes.dedup import earlier_neighbors

    neighbors = np.full(len(clusters), -1, dtype=np.int64)
    similarities = np.full(len(clusters), np.nan, dtype=np.float32)
    member_rows = np.flatnonzero(clusters >= 0)
    order = member_rows[np.argsort(clusters[member_rows], kind="stable")]  # by cluster, rows increasing within
    bounds = np.flatnonzero(np.diff(clusters[order])) + 1
    groups = np.split(order, bounds) if order.size else []
    row_bytes = 4 * max(store.dim, 1) * 2  # the vectors and their normalised copy
    for batch in _batches(groups, max(1, memory_bytes // row_bytes)):
        rows = np.sort(np.concatenate(batch))
        vectors = _gather(store, rows, transform)
        for group in batch:
            found, similar = earlier_neighbors(vectors[np.searchsorted(rows, group)])
            neighbors[group] = np.where(found >= 0, group[np.maximum(found, 0)], -1)
            similarities[group] = similar
            if progress:
                progress(len(group))
    return neighbors, similarities


def _batches(groups: list[np.ndarray], max_rows: int) -> list[list[np.ndarray]]:
    """Consecutive groups whose rows add up to at most ``max_rows`` (a larger group goes alone)."""
    batches: list[list[np.ndarray]] = []
    rows = 0
    for group in groups:
        if batches and rows + len(group) <= max_rows:
            batches[-1].append(group)
            rows += len(group)
        else:
            if len(group) > max_rows:
                logger.warning("a cluster of %d rows exceeds the deduplication memory budget (%d rows)",
                               len(group), max_rows)
            batches.append([group])
            rows = len(group)
    return batches


def _gather(store: FeatureStore, rows: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
    """Feature rows ``rows`` (increasing), read chunk by chunk, transformed, as float32."""
    features = store.features
    chunk = features.chunks[0]
    parts = []
    chunk_of = rows // chunk
    for index in np.unique(chunk_of):
        block = np.asarray(features[index * chunk:(index + 1) * chunk], dtype=np.float32)
        parts.append(block[rows[chunk_of == index] - index * chunk])
    vectors = np.concatenate(parts) if parts else np.zeros((0, store.dim), np.float32)
    return np.asarray(transform(vectors) if transform is not None else vectors, dtype=np.float32)


def clustering_similarities(store: FeatureStore, clustering: str, *, level: int | None = None,
                            space: str = "whitened", memory_bytes: int = 1 << 30,
                            progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`near_duplicate_similarities` within the clusters of a stored clustering.

    Args:
        store: the feature store.
        clustering: name of the clustering.
        level: its level whose clusters are searched (default: the finest).
        space: ``whitened`` (the clustering's PCA-whitening) or ``features``.
        memory_bytes: see :func:`near_duplicate_similarities`.
        progress: called with rows compared.

    Returns:
        ``(clusters, neighbors, similarities)``, ``(N,)`` each; invalid rows have cluster -1 and no neighbour.
    """
    arrays = ClusteringArrays(store, clustering)
    clusters = np.where(store.valid, arrays.assignments(arrays.level(level)), -1)
    transform = arrays.whitening() if space == "whitened" else None
    neighbors, similarities = near_duplicate_similarities(store, clusters, transform=transform,
                                                          memory_bytes=memory_bytes, progress=progress)
    return clusters, neighbors, similarities


def compute_selection(store: FeatureStore, config: CurateConfig,
                      progress: Callable[[int], None] | None = None) -> Selection:
    """Decide every row's status for ``config`` (deduplication first, then the strategy)."""
    from indexes.selection import balanced_quotas, capped_quotas, hierarchical_quotas, select_by_quota, select_random

    arrays = ClusteringArrays(store, config.clustering)
    level = arrays.level(config.level)
    clusters = np.where(store.valid, arrays.assignments(level), -1)
    num_clusters = arrays.num_clusters(level, clusters)
    status = np.where(clusters >= 0, NOT_SELECTED, INVALID).astype(np.int8)
    duplicate_of = np.full(len(clusters), -1, dtype=np.int64)
    similarity = np.full(len(clusters), np.nan, dtype=np.float32)
    if config.dedup_threshold is not None:
        _, neighbors, similarity = clustering_similarities(
            store, config.clustering, level=level, space=config.dedup_space, memory_bytes=config.dedup_memory_bytes,
            progress=progress)
        dropped = similarity > config.dedup_threshold  # NaN compares False
        status[dropped] = NEAR_DUPLICATE
        duplicate_of[dropped] = neighbors[dropped]
    candidates = np.where(status == NOT_SELECTED, clusters, -1)
    if config.total is None and config.per_cluster is None:
        kept = candidates >= 0  # deduplication only
    elif config.strategy == "random":
        kept = select_random(candidates >= 0, config.total, config.seed)
    else:
        sizes = np.bincount(candidates[candidates >= 0], minlength=num_clusters)
        if config.strategy == "balanced":
            quotas = (balanced_quotas(sizes, config.total, config.seed) if config.total is not None
                      else capped_quotas(sizes, config.per_cluster))
        else:
            parents = [arrays.parents(l) for l in range(1, level + 1)]
            quotas = hierarchical_quotas(sizes, parents, config.seed, total=config.total,
                                         per_cluster=config.per_cluster)[-1]
        kept = select_by_quota(candidates, quotas, config.seed)
    status[kept] = SELECTED
    return Selection(status=status, cluster=clusters, duplicate_of=duplicate_of, similarity=similarity,
                     level=level, num_clusters=num_clusters)


def reasons(strategy: str) -> dict[int, str]:
    """The ledger's reason for each status but near-duplicates (whose reason names the earlier row)."""
    return {SELECTED: None, INVALID: "no features: the image failed to decode at embedding",
            NOT_SELECTED: "not drawn" if strategy == "random" else "its cluster's quota was filled by other rows"}
