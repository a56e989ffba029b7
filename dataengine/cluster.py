"""Cluster stage: PCA-whitening + hierarchical k-means of a feature store, stored with the features.

``run_cluster`` reads the store's ``features`` block by block (chunk-aligned), fits the whitening, runs the
hierarchical k-means of :mod:`indexes` and writes the clustering into the store through
:class:`dataengine.clustering.ClusteringWriter` (layout in :mod:`dataengine.clustering`): one id per row and
level, per-cluster arrays, the whitening, a FAISS index over the leaf centroids and one over all rows. The
attributes, ``complete: true`` among them, are written last and only once every valid row has a cluster at
every level. Re-running a finished clustering with the same configuration does nothing; another configuration
needs ``overwrite``.

Distributed: every rank of the process group owns a contiguous, chunk-aligned range of rows, and the id arrays
are chunked so that every rank's range starts a chunk: no two ranks write the same chunk. Only k x d sums and
k counts cross ranks (see :mod:`indexes.kmeans`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dataengine.clustering import (
    ClusteringWriter, clustering_attrs, latest_clustering, open_clustering,
)
from dataengine.errors import OutputExistsError
from dataengine.locks import locked_output
from dataengine.store import FeatureStore, open_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Configuration of one clustering of a feature store."""

    store: str
    """Feature store written by ``dataengine embed`` (local path or URL)."""
    name: str
    """Name of the clustering inside the store."""
    levels: tuple[int, ...] = (4, 256)
    """Clusters per level: ``(m, k)`` = m super-clusters, each split into k."""
    pca_dim: int | None = 256
    """Whitened dimension; ``None`` keeps the feature dimension."""
    whiten: bool = True
    """PCA-whiten and l2-normalise the features (DeepCluster's and DeeperCluster's preprocessing); ``False``:
    k-means on the features as they are (projected on their top ``pca_dim`` principal components, unscaled
    and not normalised; ``pca_dim=None``: a rotation, distances unchanged), as ClusterFit clusters them."""
    num_iterations: int = 10
    """Lloyd iterations per k-means (the paper uses 10)."""
    seed: int = 0
    """Seed of the samples, initial centroids and empty-cluster splits."""
    sample_per_centroid: tuple[int, ...] = (0, 256)
    """Training sample of the k-means of each level: a k-means of k clusters trains on at most k x this many
    rows of its group (then every row is assigned); 0 = every row of the group, up to ``max_sample_rows``.
    One value per level, the last one for the deeper levels. Default: every row at level 0 (the paper
    clusters the whole dataset; its few super-clusters cost little per row), 256 per centroid below (FAISS's
    default). Chosen on purpose, and recorded: never a silent subsample."""
    max_sample_rows: int | None = 1 << 20
    """Rows at most of a k-means whose ``sample_per_centroid`` is 0 (a seeded sample beyond: its training rows
    are held in memory, 1 GiB for 2^20 rows of 256 float32); ``None``: no limit."""
    balanced: bool = False
    """Give each parent a number of children proportional to its size (same total)."""
    neighbor_index: bool = True
    """Also build a nearest-neighbour index over all rows (``dataengine neighbors``)."""
    index_memory_bytes: int = 2 << 30
    """Memory budget of the neighbour index (flat, IVF-Flat or IVF-PQ is chosen to fit)."""
    num_threads: int | None = None
    """CPU threads for torch, faiss and BLAS; ``None``: every core."""
    overwrite: bool = False
    """Replace an existing clustering of the same name."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store."""

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty name without '/'")
        if not self.levels or any(int(k) < 1 for k in self.levels):
            raise ValueError(f"levels={self.levels} must be cluster counts >= 1, e.g. (4, 256)")
        if self.pca_dim is not None and self.pca_dim < 1:
            raise ValueError(f"pca_dim={self.pca_dim} must be >= 1 (or None to keep every dimension)")
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= 1")
        if isinstance(self.sample_per_centroid, int):  # one value for every level
            object.__setattr__(self, "sample_per_centroid", (self.sample_per_centroid,))
        object.__setattr__(self, "sample_per_centroid", tuple(int(v) for v in self.sample_per_centroid))
        if not self.sample_per_centroid or min(self.sample_per_centroid) < 0:
            raise ValueError(f"sample_per_centroid={self.sample_per_centroid} must be one or more values >= 0 "
                             "(0 = every row), one per level")
        if self.max_sample_rows is not None and self.max_sample_rows < 1:
            raise ValueError(f"max_sample_rows={self.max_sample_rows} must be >= 1 (or None for no limit)")

    def level_sample_per_centroid(self, level: int) -> int:
        """``sample_per_centroid`` of ``level`` (0 = every row)."""
        return self.sample_per_centroid[min(level, len(self.sample_per_centroid) - 1)]

    def resolved(self) -> dict[str, Any]:
        """JSON-able config without credentials."""
        values = asdict(self)
        values.pop("storage_options")
        values["levels"] = list(self.levels)
        values["sample_per_centroid"] = list(self.sample_per_centroid)
        return values


@dataclass
class ClusterResult:
    """Summary of a clustering."""

    store: str
    name: str
    levels: list[int]
    num_clusters: list[int]
    objective: list[float]
    empty_splits: list[int]
    num_rows: int
    seconds: float
    neighbor_index: str | None = None
    already_complete: bool = False
    """True when the same clustering was found complete and nothing was computed."""
    ranks: int = 1
    """Processes that computed it (torchrun's ranks)."""
    warnings: list[str] = field(default_factory=list)
    """Levels asking for clusters too small to mean much (:func:`size_warnings`)."""

    @property
    def num_leaf_clusters(self) -> int:
        """Clusters of the finest level (the trainer's pseudo-labels)."""
        return self.num_clusters[-1] if self.num_clusters else 0

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), num_leaf_clusters=self.num_leaf_clusters)


MIN_ROWS_PER_CLUSTER = 10
"""A level whose clusters would hold fewer rows than this on average is warned about (:func:`size_warnings`)."""


def size_warnings(levels: tuple[int, ...] | list[int], num_rows: int) -> list[str]:
    """One line per level asking for more clusters than ``num_rows`` / :data:`MIN_ROWS_PER_CLUSTER`: the
    clusters of level ``l`` number ``levels[0] x ... x levels[l]``, and below 10 rows a cluster's centroid is
    mostly the noise of its few rows (k-means' own rule of thumb; FAISS warns below 39 training rows per
    centroid)."""
    warnings, clusters = [], 1
    for level, k in enumerate(levels):
        clusters *= int(k)
        if clusters * MIN_ROWS_PER_CLUSTER > num_rows:
            warnings.append(f"level {level} asks for {clusters:,} clusters of {num_rows:,} rows: "
                            f"{num_rows / clusters:.1f} rows per cluster on average, fewer than "
                            f"{MIN_ROWS_PER_CLUSTER}; use fewer clusters (--levels) for clusters that mean something")
    return warnings


# Assignment chunks hold up to this many feature chunks (fewer when a rank's range needs it).
_ASSIGNMENT_CHUNK_FACTOR = 4
# Fields of the resolved config that do not change the clustering: a re-run differing only there is the same.
_NOT_OUTPUT_DEFINING = ("store", "overwrite", "num_threads")


def _rank_bounds(num_rows: int, chunk_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, chunk-aligned rows of ``rank`` (so ranks never write the same chunk)."""
    num_chunks = -(-num_rows // chunk_rows)
    per_rank = -(-num_chunks // world_size)
    start = min(num_rows, rank * per_rank * chunk_rows)
    return start, min(num_rows, start + per_rank * chunk_rows)


def _assignment_chunk_rows(num_rows: int, chunk_rows: int, world_size: int) -> int:
    """Rows per chunk of the id arrays: up to 4 feature chunks, and a divisor of every rank's range (see
    :func:`_rank_bounds`), so that each rank's first row starts a chunk."""
    per_rank = -(-(-(-num_rows // chunk_rows)) // world_size)
    factor = max(f for f in range(1, _ASSIGNMENT_CHUNK_FACTOR + 1) if per_rank % f == 0)
    return chunk_rows * factor


def _output_config(config: ClusterConfig | dict[str, Any]) -> dict[str, Any]:
    values = config.resolved() if isinstance(config, ClusterConfig) else dict(config)
    return {key: value for key, value in values.items() if key not in _NOT_OUTPUT_DEFINING}


def _finished(store: FeatureStore, config: ClusterConfig) -> ClusterResult | None:
    """The recorded result when the same clustering is already complete; ``None`` when it must be computed.

    Raises:
        OutputExistsError: a complete clustering of that name made with another configuration (no overwrite).
    """
    attrs = clustering_attrs(store, config.name)
    if not attrs or not attrs.get("complete") or config.overwrite:
        return None
    recorded, wanted = _output_config(attrs.get("config", {})), _output_config(config)
    if recorded != wanted or attrs.get("assigned_from"):
        differing = sorted(k for k in recorded.keys() | wanted.keys() if recorded.get(k) != wanted.get(k))
        what = ", ".join(differing) if differing else "origin: its rows were assigned with another store's clustering"
        raise OutputExistsError(f"clustering {config.name!r} already exists in {store.url} with another "
                                f"configuration (differs in {what}); use --overwrite or another --clustering name")
    logger.info("clustering %r in %s is already complete with this configuration; nothing to do",
                config.name, store.url)
    recorded_summary = {k: v for k, v in attrs["summary"].items() if k != "num_leaf_clusters"}  # a property
    return ClusterResult(**dict(recorded_summary, seconds=0.0, already_complete=True))


def run_cluster(config: ClusterConfig, progress: Callable[[int], None] | None = None,
                reducer: Any = None) -> ClusterResult:
    """Cluster every row of the store and write the result under the clustering's name.

    Args:
        config: what to cluster and how.
        progress: called with the number of rows of each block read.
        reducer: an :class:`indexes.distributed.Reducer` shared by every rank (all ranks call this together);
            ``None`` for a single process.

    Raises:
        FileNotFoundError / IncompleteOutputError: no complete feature store at ``config.store`` (nothing is
            created there).
        OutputExistsError: a complete clustering of that name with another configuration (and no overwrite).
        IncompleteOutputError: a valid row ended without a cluster (the clustering is then not marked complete).
        OutputLockedError: another run is writing the store (rank 0 holds its lock for every rank).
    """
    from indexes.distributed import LocalReducer

    reducer = reducer or LocalReducer()
    with locked_output(config.store, config.storage_options, rank=reducer.rank,
                       all_true=_all_true(reducer) if reducer.world_size > 1 else None):
        return _run_cluster(config, progress, reducer)


def _all_true(reducer: Any) -> Callable[[bool], bool]:
    """All-true over the reducer's ranks."""
    return lambda ok: int(reducer.all_reduce_sum(np.array([0 if ok else 1], dtype=np.int64))[0]) == 0


def _run_cluster(config: ClusterConfig, progress: Callable[[int], None] | None, reducer: Any) -> ClusterResult:
    from indexes.threads import set_num_threads

    start = time.perf_counter()
    store = open_store(config.store, config.storage_options)
    done = _finished(store, config)
    if done is not None:
        return done
    if config.pca_dim is not None and config.pca_dim > store.dim:
        raise ValueError(f"pca_dim={config.pca_dim} is larger than the feature dimension {store.dim}; "
                         f"use --pca {store.dim} or less")
    warnings = size_warnings(config.levels, int(np.count_nonzero(store.valid)))
    if reducer.rank == 0:
        for line in warnings:
            logger.warning("%s", line)
        if config.neighbor_index and reducer.world_size > 1:
            logger.warning("no neighbour index: %d ranks cluster the rows, and the index over every row is built "
                           "by a single process (`dataengine cluster` without torchrun); `dataengine neighbors` "
                           "will not work on clustering %r", reducer.world_size, config.name)
    set_num_threads(config.num_threads)
    store = open_store(config.store, config.storage_options, mode="r+")
    writer = ClusteringWriter(store, config.name)
    reducer.barrier()  # every rank has read the old attributes before they go
    if reducer.rank == 0:
        writer.remove()
    reducer.barrier()
    features = store.features
    lo, hi = _rank_bounds(store.num_rows, features.chunks[0], reducer.rank, reducer.world_size)
    pca, result = _fit(features, lo, hi, config, reducer, progress)
    valid = store.valid
    _write_assignments(writer, store, result, lo, hi, valid[lo:hi], reducer)
    summary = ClusterResult(
        store=store.url, name=config.name, levels=list(config.levels),
        num_clusters=[level.num_clusters for level in result.levels],
        objective=[float(level.objective) for level in result.levels],
        empty_splits=[int(level.empty_splits.sum()) for level in result.levels],
        num_rows=store.num_rows, seconds=0.0, ranks=reducer.world_size, warnings=warnings,
    )
    error = None
    if reducer.rank == 0:
        try:
            _write_model(writer, pca, result)
            if config.neighbor_index and reducer.world_size == 1:
                summary.neighbor_index = _write_neighbor_index(writer, config, features, pca, lo, hi)
            writer.check_assigned(len(config.levels), valid, summary.num_clusters)
            summary.seconds = time.perf_counter() - start
            # Last: the clustering is complete only once these attributes exist.
            writer.finish({"config": config.resolved(), "levels": [level.to_dict() for level in result.levels],
                           "summary": summary.to_dict()})
        except Exception as exc:  # re-raised below, once every rank knows not to wait for rank 0
            error = exc
    # Every rank returns only once the clustering is complete (or every rank raises).
    if _any_rank(reducer, error is not None):
        raise error or RuntimeError(f"rank 0 could not finish clustering {config.name!r}; see its log")
    summary.seconds = time.perf_counter() - start
    return summary


def progress_total(config: ClusterConfig, num_rows: int, rank: int = 0, world_size: int = 1) -> int:
    """The rows :func:`run_cluster` reports to ``progress`` on ``rank`` in all, for a store of ``num_rows`` rows
    (nothing read): the PCA pass, then each level's final assignment, over the rank's rows."""
    chunk_rows = open_store(config.store, config.storage_options).features.chunks[0]
    lo, hi = _rank_bounds(num_rows, chunk_rows, rank, world_size)
    return (1 + len(config.levels)) * (hi - lo)


def _fit(features: Any, lo: int, hi: int, config: ClusterConfig, reducer: Any,
         progress: Callable[[int], None] | None) -> tuple[Any, Any]:
    from indexes.data import ArrayDataset
    from indexes.hierarchical import HierarchicalKMeansConfig, fit_hierarchical_kmeans
    from indexes.pca import PCAConfig, fit_pca_whitening

    block = features.chunks[0]
    raw = ArrayDataset(features, block_rows=block, start=lo, stop=hi)
    pca = fit_pca_whitening(raw, PCAConfig(num_components=config.pca_dim, whiten=config.whiten,
                                           normalize=config.whiten), reducer=reducer, progress=progress)
    whitened = ArrayDataset(features, block_rows=block, start=lo, stop=hi, transform=pca.apply,
                            transform_dim=pca.output_dim)
    kmeans = HierarchicalKMeansConfig(levels=tuple(config.levels), num_iterations=config.num_iterations,
                                      seed=config.seed, max_training_rows=config.max_sample_rows,
                                      points_per_centroid=tuple(p or None for p in config.sample_per_centroid),
                                      balanced=config.balanced, num_threads=config.num_threads)
    return pca, fit_hierarchical_kmeans(whitened, kmeans, reducer=reducer, progress=progress)


def _write_assignments(writer: ClusteringWriter, store: FeatureStore, result: Any, lo: int, hi: int,
                       valid: np.ndarray, reducer: Any) -> None:
    """Each rank writes its rows' ids; rank 0 creates the arrays, chunked on the ranks' boundaries."""
    chunk = store.features.chunks[0]
    chunk_rows = _assignment_chunk_rows(store.num_rows, chunk, reducer.world_size)
    starts = [_rank_bounds(store.num_rows, chunk, rank, reducer.world_size)[0] for rank in range(reducer.world_size)]
    for level, level_result in enumerate(result.levels):
        if reducer.rank == 0:
            writer.create_assignments(level, chunk_rows, boundaries=starts)
        reducer.barrier()
        writer.write_assignments(level, lo, np.where(valid, level_result.assignments, -1))
    reducer.barrier()


def _write_model(writer: ClusteringWriter, pca: Any, result: Any) -> None:
    from indexes.faiss_index import build_centroid_index, index_to_bytes

    for level, level_result in enumerate(result.levels):
        writer.write_level(level, {name: array for name, array in level_result.arrays().items()
                                   if name != "assignments"})
    writer.write_pca(pca.to_arrays())
    writer.write_centroid_index(index_to_bytes(build_centroid_index(result.levels[-1].centroids)))


def _write_neighbor_index(writer: ClusteringWriter, config: ClusterConfig, features: Any, pca: Any,
                          lo: int, hi: int) -> str:
    from indexes.data import ArrayDataset
    from indexes.faiss_index import NeighborIndexConfig, build_neighbor_index

    whitened = ArrayDataset(features, block_rows=features.chunks[0], start=lo, stop=hi, transform=pca.apply,
                            transform_dim=pca.output_dim)
    index, plan = build_neighbor_index(whitened, NeighborIndexConfig(memory_budget_bytes=config.index_memory_bytes,
                                                                     seed=config.seed))
    writer.write_neighbor_index(index, plan.to_dict())
    return plan.kind


def _any_rank(reducer: Any, flag: bool) -> bool:
    """True when ``flag`` is true on any rank (also a barrier)."""
    if reducer.world_size == 1:
        return flag
    return bool(reducer.all_reduce_sum(np.array([float(flag)]))[0] > 0)


# ----------------------------------------------------------------------------------------------- using it


def assign_rows(store: FeatureStore, name: str, features: np.ndarray, candidates: int = 64) -> list[np.ndarray]:
    """Cluster ids of new feature rows at every level, as the clustering itself assigns them.

    Level 0 is the nearest super-cluster centroid; each deeper level is the nearest centroid *among the
    children of the row's parent* (the hierarchy constrains it, so it can differ from the globally nearest
    leaf). The saved leaf index (flat, HNSW or IVF) proposes the ``candidates`` nearest leaves; the first one
    under the right parent wins, and rows with none are searched exactly within their parent's children.

    Raises:
        KeyError: no complete clustering ``name`` in ``store``.
        ValueError: a stored index that does not match the clustering (or returns ids outside it).
    """
    from indexes.assign import Assigner
    from indexes.faiss_index import checked_ids

    clustering = open_clustering(store, name)
    rows = clustering.pca().apply(np.asarray(features, dtype=np.float32))
    ids = [Assigner(clustering.centroids(0), backend="blas").assign(rows)[0].astype(np.int32)]
    for level in clustering.levels[1:]:
        centroids = clustering.centroids(level)
        offsets = clustering.group_offsets(level)
        parents = clustering.parents(level)
        found = np.full(len(rows), -1, dtype=np.int64)
        if level == clustering.leaf_level and len(rows):
            index = clustering.centroid_index()
            _, near = index.search(np.ascontiguousarray(rows), min(candidates, len(centroids)))
            near = checked_ids(near, len(centroids), f"centroid index of clustering {name!r}")
            match = (near >= 0) & (parents[np.maximum(near, 0)] == ids[-1][:, None])
            hit = match.any(axis=1)
            found[hit] = near[hit, match[hit].argmax(axis=1)]
        for group in np.unique(ids[-1][found < 0]):  # exact search within the parent's children
            members = np.flatnonzero((ids[-1] == group) & (found < 0))
            children = centroids[offsets[group]:offsets[group + 1]]
            found[members] = offsets[group] + Assigner(children, backend="blas").assign(rows[members])[0]
        ids.append(found.astype(np.int32))
    return ids


def nearest_neighbors(store: FeatureStore, name: str, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``row`` (itself included) and their squared distances in whitened space.

    Fewer than ``k`` come back when the index finds fewer (faiss's -1 ids are dropped).

    Raises:
        KeyError: no such clustering, or one without a neighbour index.
        ValueError: a stored index that is not an index of this store's rows (or returns ids outside them).
    """
    from indexes.faiss_index import checked_ids

    clustering = open_clustering(store, name)
    pca = clustering.pca()
    index = clustering.neighbor_index(dim=pca.output_dim)
    query = pca.apply(np.asarray(store.features[row:row + 1], dtype=np.float32))
    distances, rows = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
    rows = checked_ids(rows[0], store.num_rows, f"neighbour index of clustering {name!r}")
    return rows[rows >= 0], distances[0][rows >= 0]


def metadata_nmi(store_url: str, name: str, storage_options: dict[str, Any] | None = None,
                 seed: int = 0) -> dict[str, dict[str, Any]]:
    """NMI of the leaf clusters against every metadata kind the store holds (user, hashtag, GPS cell, device,
    label), each with its chance level (the NMI of the same cluster sizes shuffled, seeded): the headline of a
    clustering, as ``dataengine report`` scores it. Empty when the store holds no metadata."""
    from dataengine.metrics.store import StoreLabels, evaluate_store, row_blocks

    store = open_store(store_url, storage_options)
    labels = StoreLabels(store)
    if not labels.kinds:
        return {}
    clustering = open_clustering(store, name)
    ids = clustering.assignment_array(clustering.leaf_level)
    blocks = row_blocks(store.num_rows, max(store.features.chunks[0], 1 << 16))
    scores = evaluate_store(labels, {"leaf": ids}, blocks).nmi(chance_seed=seed)["leaf"]
    return {kind: result.as_dict() for kind, result in scores.items()}


def neighbors_of_key(store_url: str, key: str, k: int, name: str | None,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``k`` nearest images of the image with ``key`` (:func:`dataengine.neighbors.find_neighbors`, which
    also takes a source path or an image file)."""
    from dataengine.neighbors import find_neighbors

    return find_neighbors(store_url, key, k, name, storage_options)


def assign_store(store_url: str, name: str, features_url: str,
                 storage_options: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Assign every row of another feature store to clustering ``name``; written to that store (replacing a
    clustering of that name there).

    Returns the cluster sizes per level of the assigned rows.

    Raises:
        OutputLockedError: another run is writing ``features_url``.
    """
    store = open_store(store_url, storage_options)
    clustering = open_clustering(store, name)
    target = open_store(features_url, storage_options)
    if target.dim != store.dim:
        raise ValueError(f"{features_url} has {target.dim}-d features, the clustering expects {store.dim}")
    with locked_output(features_url, storage_options):
        return _assign(store, store_url, name, clustering, features_url, storage_options)


def _assign(store: FeatureStore, store_url: str, name: str, clustering: Any, features_url: str,
            storage_options: dict[str, Any] | None) -> list[np.ndarray]:
    target = open_store(features_url, storage_options, mode="r+")
    chunk = target.features.chunks[0]
    parts = [assign_rows(store, name, target.features[i:i + chunk]) for i in range(0, target.num_rows, chunk)]
    valid = target.valid
    writer = ClusteringWriter(target, name)
    writer.remove()
    sizes = []
    for level in clustering.levels:
        ids = np.where(valid, np.concatenate([p[level] for p in parts]), -1).astype(np.int32)
        writer.create_assignments(level, chunk * _ASSIGNMENT_CHUNK_FACTOR)
        writer.write_assignments(level, 0, ids)
        sizes.append(np.bincount(ids[ids >= 0], minlength=clustering.num_clusters(level) or 0))
    num_clusters = [len(s) for s in sizes]
    writer.check_assigned(clustering.num_levels, valid, num_clusters)
    writer.finish({"config": clustering.config, "assigned_from": {"store": store_url, "name": name},
                   "summary": {"num_clusters": num_clusters}})
    return sizes
