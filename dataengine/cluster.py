"""Cluster stage: PCA-whitening + hierarchical k-means of a feature store, stored with the features.

``run_cluster`` reads the store's ``features`` block by block (chunk-aligned), fits the whitening, runs the
hierarchical k-means of :mod:`indexes` and writes everything under ``clusterings/NAME/`` in the store:

```
clusterings/NAME/level0            (N,) int32 super-cluster of every row (-1: row invalid at embedding)
clusterings/NAME/level1            (N,) int32 global sub-cluster id (and so on for deeper levels)
clusterings/NAME/levelL_parents    (K_L,) int32 parent cluster (at level L-1) of each level-L cluster
clusterings/NAME/levelL_centroids  (K_L, D) float32 centroids in the whitened space
clusterings/NAME/levelL_sizes, levelL_group_offsets, levelL_objective_history, levelL_empty_splits
clusterings/NAME/pca_mean, pca_components, pca_eigenvalues
clusterings/NAME/centroid_index    uint8 bytes of a FAISS index over the leaf centroids (ids = leaf ids)
clusterings/NAME/neighbor_index    uint8 bytes of a FAISS index over all whitened rows (ids = rows)
attrs: format version, resolved config, statistics per level, "complete": true (written last)
```

Distributed: every rank of the process group owns a contiguous, chunk-aligned range of rows, so no two
ranks write the same chunk; only k x d sums and k counts cross ranks (see :mod:`indexes.kmeans`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dataengine.errors import OutputExistsError
from dataengine.store import FeatureStore, open_store

logger = logging.getLogger(__name__)

FORMAT = "dataengine.clustering"
VERSION = 1


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """Configuration of one clustering of a feature store."""

    store: str
    """Feature store written by ``dataengine embed`` (local path or URL)."""
    name: str
    """Name of the clustering inside the store (``clusterings/NAME``)."""
    levels: tuple[int, ...] = (4, 256)
    """Clusters per level: ``(m, k)`` = m super-clusters, each split into k."""
    pca_dim: int | None = 256
    """Whitened dimension; ``None`` keeps the feature dimension."""
    num_iterations: int = 10
    """Lloyd iterations per k-means (the paper uses 10)."""
    seed: int = 0
    """Seed of the samples, initial centroids and empty-cluster splits."""
    sample_per_centroid: int | None = 256
    """Each k-means trains on at most k x this many rows of its group (then every row is assigned);
    ``None`` trains on every row. Chosen on purpose, and recorded: never a silent subsample."""
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
        if self.sample_per_centroid is not None and self.sample_per_centroid < 1:
            raise ValueError(f"sample_per_centroid={self.sample_per_centroid} must be >= 1 (or None)")

    def resolved(self) -> dict[str, Any]:
        """JSON-able config without credentials."""
        values = asdict(self)
        values.pop("storage_options")
        values["levels"] = list(self.levels)
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _rank_bounds(num_rows: int, chunk_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous, chunk-aligned rows of ``rank`` (so ranks never write the same chunk)."""
    num_chunks = -(-num_rows // chunk_rows)
    per_rank = -(-num_chunks // world_size)
    start = min(num_rows, rank * per_rank * chunk_rows)
    return start, min(num_rows, start + per_rank * chunk_rows)


def _prepare(store: FeatureStore, config: ClusterConfig, rank: int) -> None:
    path = f"clusterings/{config.name}"
    if store.has(path) and store.read_attrs(path).get("complete") and not config.overwrite:
        raise OutputExistsError(f"clustering {config.name!r} already exists in {store.url}; use --overwrite")
    if config.pca_dim is not None and config.pca_dim > store.dim:
        raise ValueError(f"pca_dim={config.pca_dim} is larger than the feature dimension {store.dim}; "
                         f"use --pca {store.dim} or less")
    if rank == 0 and store.has(path):
        del store.group[path]


def run_cluster(config: ClusterConfig, progress: Callable[[int], None] | None = None,
                reducer: Any = None) -> ClusterResult:
    """Cluster every row of the store and write the result under ``clusterings/NAME``.

    Args:
        config: what to cluster and how.
        progress: called with the number of rows of each block read.
        reducer: an :class:`indexes.distributed.Reducer` shared by every rank (all ranks call this together);
            ``None`` for a single process.
    """
    from indexes.distributed import LocalReducer
    from indexes.threads import set_num_threads

    start = time.perf_counter()
    set_num_threads(config.num_threads)
    reducer = reducer or LocalReducer()
    store = open_store(config.store, config.storage_options, mode="r+")
    _prepare(store, config, reducer.rank)
    reducer.barrier()
    features = store.features
    lo, hi = _rank_bounds(store.num_rows, features.chunks[0], reducer.rank, reducer.world_size)
    pca, result = _fit(features, lo, hi, config, reducer, progress)
    valid = store.valid[lo:hi]
    _write_assignments(store, config, result, lo, hi, valid, reducer)
    index_kind = None
    if reducer.rank == 0:
        _write_model(store, config, pca, result)
        if config.neighbor_index and reducer.world_size == 1:
            index_kind = _write_neighbor_index(store, config, features, pca, lo, hi)
    reducer.barrier()
    stats = [level.to_dict() for level in result.levels]
    summary = ClusterResult(
        store=store.url, name=config.name, levels=list(config.levels),
        num_clusters=[level.num_clusters for level in result.levels],
        objective=[float(level.objective) for level in result.levels],
        empty_splits=[int(level.empty_splits.sum()) for level in result.levels],
        num_rows=store.num_rows, seconds=time.perf_counter() - start, neighbor_index=index_kind,
    )
    if reducer.rank == 0:  # last: the clustering is complete only once these attributes exist
        store.write_attrs(f"clusterings/{config.name}", {
            "format": FORMAT, "version": VERSION, "config": config.resolved(), "levels": stats,
            "summary": summary.to_dict(), "complete": True,
        })
    return summary


def _fit(features: Any, lo: int, hi: int, config: ClusterConfig, reducer: Any,
         progress: Callable[[int], None] | None) -> tuple[Any, Any]:
    from indexes.data import ArrayDataset
    from indexes.hierarchical import HierarchicalKMeansConfig, fit_hierarchical_kmeans
    from indexes.pca import PCAConfig, fit_pca_whitening

    block = features.chunks[0]
    raw = ArrayDataset(features, block_rows=block, start=lo, stop=hi)
    pca = fit_pca_whitening(raw, PCAConfig(num_components=config.pca_dim), reducer=reducer, progress=progress)
    whitened = ArrayDataset(features, block_rows=block, start=lo, stop=hi, transform=pca.apply,
                            transform_dim=pca.output_dim)
    kmeans = HierarchicalKMeansConfig(levels=tuple(config.levels), num_iterations=config.num_iterations,
                                      seed=config.seed, max_points_per_centroid=config.sample_per_centroid,
                                      balanced=config.balanced, num_threads=config.num_threads)
    return pca, fit_hierarchical_kmeans(whitened, kmeans, reducer=reducer, progress=progress)


def _write_assignments(store: FeatureStore, config: ClusterConfig, result: Any, lo: int, hi: int,
                       valid: np.ndarray, reducer: Any) -> None:
    chunk = store.features.chunks[0]
    for level, level_result in enumerate(result.levels):
        path = f"clusterings/{config.name}/level{level}"
        if reducer.rank == 0:
            store.group.create_array(path, shape=(store.num_rows,), dtype="int32", chunks=(chunk * 4,),
                                     overwrite=True, fill_value=-1)
        reducer.barrier()
        ids = np.where(valid, level_result.assignments, -1).astype(np.int32)
        if hi > lo:
            store.group[path][lo:hi] = ids
    reducer.barrier()


def _write_model(store: FeatureStore, config: ClusterConfig, pca: Any, result: Any) -> None:
    from indexes.faiss_index import build_centroid_index, index_to_bytes

    base = f"clusterings/{config.name}"
    for level, level_result in enumerate(result.levels):
        for name, array in level_result.arrays().items():
            if name != "assignments":
                store.write_array(f"{base}/level{level}_{name}", np.asarray(array))
    for name, array in pca.to_arrays().items():
        store.write_array(f"{base}/pca_{name}", np.asarray(array))
    leaf = result.levels[-1]
    index = build_centroid_index(leaf.centroids)
    store.write_array(f"{base}/centroid_index", np.frombuffer(index_to_bytes(index), dtype=np.uint8))


def _write_neighbor_index(store: FeatureStore, config: ClusterConfig, features: Any, pca: Any,
                          lo: int, hi: int) -> str:
    from indexes.data import ArrayDataset
    from indexes.faiss_index import NeighborIndexConfig, build_neighbor_index, index_to_bytes

    whitened = ArrayDataset(features, block_rows=features.chunks[0], start=lo, stop=hi, transform=pca.apply,
                            transform_dim=pca.output_dim)
    index, plan = build_neighbor_index(whitened, NeighborIndexConfig(memory_budget_bytes=config.index_memory_bytes,
                                                                     seed=config.seed))
    store.write_array(f"clusterings/{config.name}/neighbor_index",
                      np.frombuffer(index_to_bytes(index), dtype=np.uint8), attrs=plan.to_dict())
    return plan.kind


# ----------------------------------------------------------------------------------------------- using it


def load_clustering(store: FeatureStore, name: str) -> dict[str, Any]:
    """Attributes of a complete clustering (raises ``KeyError`` naming the ones present otherwise)."""
    path = f"clusterings/{name}"
    if not store.has(path) or not store.read_attrs(path).get("complete"):
        present = sorted(store.group["clusterings"].group_keys()) if store.has("clusterings") else []
        raise KeyError(f"no complete clustering {name!r} in {store.url}; present: {present}")
    return store.read_attrs(path)


def _pca(store: FeatureStore, name: str) -> Any:
    from indexes.pca import PCAWhitening

    base = f"clusterings/{name}/pca_"
    names = ("mean", "components", "eigenvalues", "params")
    return PCAWhitening.from_arrays({n: store.read_array(base + n) for n in names})


def assign_rows(store: FeatureStore, name: str, features: np.ndarray, candidates: int = 64) -> list[np.ndarray]:
    """Cluster ids of new feature rows at every level, as the clustering itself assigns them.

    Level 0 is the nearest super-cluster centroid; each deeper level is the nearest centroid *among the
    children of the row's parent* (the hierarchy constrains it, so it can differ from the globally nearest
    leaf). The saved leaf index (flat, HNSW or IVF) proposes the ``candidates`` nearest leaves; the first one
    under the right parent wins, and rows with none are searched exactly within their parent's children.
    """
    from indexes.assign import Assigner
    from indexes.faiss_index import index_from_bytes

    attrs = load_clustering(store, name)
    base = f"clusterings/{name}"
    rows = _pca(store, name).apply(np.asarray(features, dtype=np.float32))
    ids = [Assigner(store.read_array(f"{base}/level0_centroids"), backend="blas").assign(rows)[0].astype(np.int32)]
    num_levels = len(attrs["config"]["levels"])
    for level in range(1, num_levels):
        centroids = store.read_array(f"{base}/level{level}_centroids")
        offsets = store.read_array(f"{base}/level{level}_group_offsets")
        parents = store.read_array(f"{base}/level{level}_parents")
        found = np.full(len(rows), -1, dtype=np.int64)
        if level == num_levels - 1 and len(rows):
            index = index_from_bytes(store.read_array(f"{base}/centroid_index").tobytes())
            _, near = index.search(np.ascontiguousarray(rows), min(candidates, len(centroids)))
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
    """The ``k`` nearest rows of ``row`` (itself included) and their squared distances in whitened space."""
    from indexes.faiss_index import index_from_bytes

    load_clustering(store, name)
    path = f"clusterings/{name}/neighbor_index"
    if not store.has(path):
        raise KeyError(f"clustering {name!r} has no neighbour index (it was built with --no-neighbor-index)")
    index = index_from_bytes(store.read_array(path).tobytes())
    query = _pca(store, name).apply(np.asarray(store.features[row:row + 1], dtype=np.float32))
    distances, rows = index.search(np.ascontiguousarray(query, dtype=np.float32), k)
    return rows[0], distances[0]


def latest_clustering(store: FeatureStore) -> str:
    """Name of the last complete clustering in the store, by name order (epoch names sort in time order)."""
    if not store.has("clusterings"):
        raise KeyError(f"{store.url} has no clustering yet; run `dataengine cluster` first")
    done = sorted(n for n in store.group["clusterings"].group_keys()
                  if store.read_attrs(f"clusterings/{n}").get("complete"))
    if not done:
        raise KeyError(f"{store.url} has no complete clustering; run `dataengine cluster` first")
    return done[-1]


def neighbors_of_key(store_url: str, key: str, k: int, name: str | None,
                     storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``k`` nearest images of the image with ``key``: keys, rows, distances and leaf clusters."""
    store = open_store(store_url, storage_options)
    name = name or latest_clustering(store)
    keys = [str(k) for k in store.keys[:]]
    matches = np.flatnonzero(np.asarray(keys, dtype=object) == key)
    if not matches.size:
        raise KeyError(f"no image with key {key!r} in {store_url}")
    rows, distances = nearest_neighbors(store, name, int(matches[0]), k)
    leaf = store.group[f"clusterings/{name}/level{len(load_clustering(store, name)['config']['levels']) - 1}"]
    return {"name": name, "key": key, "neighbors": [
        {"key": str(keys[r]), "row": int(r), "distance": float(d), "cluster": int(leaf[int(r)])}
        for r, d in zip(rows, distances) if r >= 0]}


def assign_store(store_url: str, name: str, features_url: str,
                 storage_options: dict[str, Any] | None = None) -> list[np.ndarray]:
    """Assign every row of another feature store to clustering ``name``; written to that store.

    Returns the cluster sizes per level of the assigned rows.
    """
    store = open_store(store_url, storage_options)
    target = open_store(features_url, storage_options, mode="r+")
    if target.dim != store.dim:
        raise ValueError(f"{features_url} has {target.dim}-d features, the clustering expects {store.dim}")
    attrs = load_clustering(store, name)
    chunk = target.features.chunks[0]
    parts = [assign_rows(store, name, target.features[i:i + chunk]) for i in range(0, target.num_rows, chunk)]
    valid = target.valid
    sizes = []
    for level in range(len(attrs["config"]["levels"])):
        ids = np.where(valid, np.concatenate([p[level] for p in parts]), -1).astype(np.int32)
        target.write_array(f"clusterings/{name}/level{level}", ids, chunks=(chunk * 4,))
        num = len(store.read_array(f"clusterings/{name}/level{level}_sizes"))
        sizes.append(np.bincount(ids[ids >= 0], minlength=num))
    target.write_attrs(f"clusterings/{name}", {"format": FORMAT, "version": VERSION, "complete": True,
                                               "assigned_from": {"store": store_url, "name": name},
                                               "config": attrs["config"]})
    return sizes
