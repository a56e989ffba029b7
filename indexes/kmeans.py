"""Lloyd's k-means over a :class:`~indexes.data.RowSource`, on one process or many ranks.

One pass of the algorithm (:func:`fit_groups`) clusters several disjoint groups of rows at once, each into
its own number of clusters; a flat k-means (:func:`fit_kmeans`) is the case of one group, and a level of
the hierarchical k-means (:mod:`indexes.hierarchical`) is the case of one group per parent cluster.

For each group:

1. Training sample: the group's ``k * max_points_per_centroid`` rows of smallest key (all rows when that
   option is ``None``), read into memory once (:mod:`indexes.sampling`).
2. Initial centroids: the group's ``k`` rows of smallest key, seeded.
3. ``num_iterations`` Lloyd iterations on the sample: assign every sample row to its nearest centroid,
   accumulate float64 per-cluster sums and counts, all-reduce them (the only per-iteration communication),
   move each centroid to the mean of its rows. An empty cluster is re-seeded by splitting a non-empty
   cluster chosen with probability proportional to its size (minus one) into two centroids
   ``c * (1 +- eps)`` with alternating signs per dimension, and by halving its count, as FAISS does.
4. Final assignment of every row to the final centroids, streamed block by block; when the sample was the
   whole group, the assignment of the sample rows is reused instead of reading the data again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from indexes.assign import Assigner, Backend, ClusterSums, resolve_backend
from indexes.data import RowSource, block_bincount, prefetched, stream_seed
from indexes.distributed import LocalReducer, Reducer
from indexes.sampling import gather_rows, group_members, group_sizes, smallest_key_rows, smallest_key_sample
from indexes.threads import single_threaded_kernels

logger = logging.getLogger(__name__)

_SEED_SAMPLE = 1
_SEED_SPLIT = 2


@dataclass(frozen=True, kw_only=True)
class LloydConfig:
    """Options shared by every k-means of a clustering."""

    num_iterations: int = 10
    """Lloyd iterations (the paper uses 10)."""
    seed: int = 0
    """Seed of the training sample, the initial centroids and the empty-cluster splits."""
    max_points_per_centroid: int | None = None
    """Train each k-means on at most ``k`` times this many rows of its group, drawn at random; the final
    assignment still covers every row. ``None`` trains on every row (memory: the whole group), up to
    ``max_training_rows``."""
    max_training_rows: int | None = None
    """With ``max_points_per_centroid=None``: train on at most this many rows of a group, drawn at random
    (``None``: every row, whatever the group's size)."""
    split_eps: float = 1.0 / 1024
    """Relative perturbation of the two centroids made by splitting a cluster to re-seed an empty one."""
    backend: Backend = "auto"
    """Assignment backend: ``"blas"`` (CPU GEMM), ``"torch"`` (CUDA), ``"faiss"``, or ``"auto"``."""
    num_threads: int | None = None
    """Threads for the CPU assignment; ``None`` uses every core this process may run on."""

    def __post_init__(self) -> None:
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations={self.num_iterations} must be >= 1")
        if self.max_points_per_centroid is not None and self.max_points_per_centroid < 1:
            raise ValueError(
                f"max_points_per_centroid={self.max_points_per_centroid} must be >= 1 (or None for every row)"
            )
        if self.max_training_rows is not None and self.max_training_rows < 1:
            raise ValueError(f"max_training_rows={self.max_training_rows} must be >= 1 (or None for every row)")
        if not 0.0 < self.split_eps < 1.0:
            raise ValueError(f"split_eps={self.split_eps} must be in (0, 1)")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads={self.num_threads} must be >= 1 (or None for all cores)")
        resolve_backend(self.backend)


@dataclass(frozen=True, kw_only=True)
class KMeansConfig(LloydConfig):
    """A flat k-means."""

    num_clusters: int
    """Number of centroids k."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_clusters < 1:
            raise ValueError(f"num_clusters={self.num_clusters} must be >= 1")


@dataclass
class KMeansResult:
    """Clusters of one or more groups of rows; cluster ids are global over the groups.

    The clusters of group ``g`` are ``group_offsets[g] .. group_offsets[g + 1] - 1``. Arrays indexed by
    row hold this process's rows only; every other array is global (identical on all ranks).
    """

    centroids: np.ndarray
    """(K, d) float32 centroids."""
    assignments: np.ndarray
    """(local rows,) int32 cluster id of every row."""
    sizes: np.ndarray
    """(K,) int64 number of rows assigned to each cluster by the final assignment."""
    group_offsets: np.ndarray
    """(G + 1,) int64 first cluster id of each group, then K."""
    objective: float
    """Sum over all rows of the squared distance to their centroid (final assignment)."""
    objective_history: np.ndarray
    """(G, iterations) float64 training objective of each group at each iteration's assignment."""
    empty_splits: np.ndarray
    """(G, iterations) int64 empty clusters re-seeded by a split after each iteration."""
    imbalance_history: np.ndarray
    """(G, iterations) float64 imbalance factor ``k * sum(n_i^2) / n^2`` at each iteration (1 = balanced)."""
    size_range_history: np.ndarray
    """(G, iterations, 2) int64 smallest and largest cluster of each iteration's assignment."""
    num_train_rows: np.ndarray
    """(G,) int64 rows each group's k-means was trained on."""
    config: dict = field(default_factory=dict)
    """The resolved configuration, JSON-able."""

    @property
    def num_clusters(self) -> int:
        """Total number of clusters K."""
        return int(self.centroids.shape[0])

    @property
    def parents(self) -> np.ndarray:
        """(K,) int32 group of each cluster."""
        return np.repeat(np.arange(len(self.group_offsets) - 1, dtype=np.int32), np.diff(self.group_offsets))

    def arrays(self) -> dict[str, np.ndarray]:
        """The numeric outputs by name, for the caller to store (no per-row distances)."""
        return {
            "assignments": self.assignments,
            "centroids": self.centroids,
            "sizes": self.sizes,
            "group_offsets": self.group_offsets,
            "parents": self.parents,
            "objective_history": self.objective_history,
            "empty_splits": self.empty_splits,
            "imbalance_history": self.imbalance_history,
            "size_range_history": self.size_range_history,
            "num_train_rows": self.num_train_rows,
        }

    def to_dict(self) -> dict:
        """JSON-able statistics (no per-row or per-centroid arrays)."""
        return {
            "num_clusters": self.num_clusters,
            "num_groups": len(self.group_offsets) - 1,
            "objective": self.objective,
            "sizes": _size_stats(self.sizes),
            "objective_history": self.objective_history.tolist(),
            "empty_splits": self.empty_splits.tolist(),
            "total_empty_splits": int(self.empty_splits.sum()),
            "imbalance_history": self.imbalance_history.tolist(),
            "size_range_history": self.size_range_history.tolist(),
            "num_train_rows": self.num_train_rows.tolist(),
            "config": self.config,
        }


def fit_kmeans(
    data: RowSource,
    config: KMeansConfig,
    *,
    reducer: Reducer | None = None,
    progress: Callable[[int], None] | None = None,
) -> KMeansResult:
    """Flat k-means of every row of ``data`` (all ranks of ``reducer`` call it together).

    Args:
        data: this process's rows.
        config: number of clusters and Lloyd options.
        reducer: the ranks sharing the clustering; ``None`` for a single process.
        progress: called with numbers of rows as the final assignment advances (each row once).

    Returns:
        The clustering; ``assignments`` covers this process's rows.
    """
    lloyd = LloydConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(LloydConfig)})
    result = fit_groups(data, None, np.array([config.num_clusters]), lloyd, reducer=reducer, progress=progress)
    result.config = dataclasses.asdict(config)
    return result


def fit_groups(
    data: RowSource,
    group_labels: np.ndarray | None,
    num_children: np.ndarray,
    config: LloydConfig,
    *,
    level: int = 0,
    reducer: Reducer | None = None,
    progress: Callable[[int], None] | None = None,
) -> KMeansResult:
    """k-means of each group of rows into its own number of clusters, with global cluster ids.

    Args:
        data: this process's rows.
        group_labels: group of every local row (``None``: one group of all rows).
        num_children: clusters per group; a group needs at least that many rows (0 for an empty group).
        config: Lloyd options.
        level: mixed into the seeds, so that each level of a hierarchy draws its own samples.
        reducer: the ranks sharing the clustering; ``None`` for a single process.
        progress: called with numbers of rows as the final assignment advances (each row once).
    """
    reducer = reducer or LocalReducer()
    num_children = np.asarray(num_children, dtype=np.int64)
    sizes = reducer.all_reduce_sum(group_sizes(group_labels, data.num_rows, len(num_children)))
    _check_children(num_children, sizes)
    seed = stream_seed(config.seed, _SEED_SAMPLE, level)
    wanted = _sample_sizes(num_children, sizes, config.max_points_per_centroid, config.max_training_rows)
    # Streamed: the sample's rows, not an index and a key per row (16 bytes a row, 1.5 GB at 96M rows).
    samples = smallest_key_sample(group_labels, data.num_rows, wanted, row_offset=data.row_offset, seed=seed,
                                  reducer=reducer)
    complete = bool(np.all(wanted >= sizes))
    with single_threaded_kernels():
        trained = _train(data, samples, num_children, config, seed, level, reducer, complete)
        offsets = np.concatenate([[0], np.cumsum(num_children)]).astype(np.int64)
        centroids = [t.centroids for t in trained]
        if complete:  # every row was a training row: reuse its final assignment
            assignments, objective = _collect_training_labels(data.num_rows, samples, trained, offsets)
            if progress is not None:
                progress(data.num_rows)
        else:
            assignments, objective = assign_groups(data, group_labels, centroids, config, progress=progress)
    return _result(centroids, assignments, objective, offsets, trained, wanted, sizes, reducer)


def update_centroids(
    sums: np.ndarray,
    counts: np.ndarray,
    previous: np.ndarray,
    *,
    rng: np.random.Generator,
    split_eps: float,
) -> tuple[np.ndarray, int]:
    """New centroids from global float64 sums and counts, re-seeding empty clusters by splits.

    Each empty cluster takes a copy of a cluster chosen with probability proportional to its count minus
    one; the two centroids become ``c * (1 + s)`` and ``c * (1 - s)`` with ``s = +-split_eps`` alternating
    over dimensions, and the chosen cluster's count is halved between them (so later choices see it).
    An empty cluster that cannot be split (every cluster has at most one row) keeps its previous centroid.

    Returns:
        ``(centroids, num_splits)``: float32 (k, d) centroids and the number of splits made.
    """
    counts = counts.astype(np.float64)
    centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], previous)
    signs = np.where(np.arange(sums.shape[1]) % 2 == 0, split_eps, -split_eps)
    num_splits = 0
    for empty in np.flatnonzero(counts == 0):
        weights = np.maximum(counts - 1.0, 0.0)
        if weights.sum() <= 0:
            break
        chosen = rng.choice(counts.size, p=weights / weights.sum())
        base = centroids[chosen].copy()
        centroids[empty] = base * (1.0 + signs)
        centroids[chosen] = base * (1.0 - signs)
        counts[empty] = counts[chosen] / 2.0
        counts[chosen] -= counts[empty]
        num_splits += 1
    return centroids.astype(np.float32), num_splits


@dataclass
class LloydOutcome:
    """The result of :func:`lloyd` on one group's training rows."""

    centroids: np.ndarray
    objective_history: list[float] = field(default_factory=list)
    empty_splits: list[int] = field(default_factory=list)
    imbalance_history: list[float] = field(default_factory=list)
    size_range_history: list[tuple[int, int]] = field(default_factory=list)
    labels: np.ndarray | None = None
    """Final assignment of the local training rows (when asked for)."""
    sqdist: np.ndarray | None = None


def lloyd(
    rows: np.ndarray,
    centroids: np.ndarray,
    config: LloydConfig,
    *,
    split_seed: int,
    reducer: Reducer,
    final_assignment: bool = False,
) -> LloydOutcome:
    """``config.num_iterations`` Lloyd iterations on in-memory ``rows`` (this rank's part of the sample).

    Per iteration one all-reduce of ``k * d + k + 1`` float64 values (sums, counts, objective).
    """
    num_clusters, dim = centroids.shape
    outcome = LloydOutcome(centroids=centroids)
    for iteration in range(config.num_iterations):
        sums = ClusterSums.zeros(num_clusters, dim)
        Assigner(outcome.centroids, backend=config.backend, num_threads=config.num_threads).assign(rows, sums)
        packed = reducer.all_reduce_sum(np.concatenate([sums.sums.ravel(), sums.counts, [sums.objective]]))
        counts = packed[num_clusters * dim : -1]
        rng = np.random.default_rng(stream_seed(split_seed, iteration))
        outcome.centroids, splits = update_centroids(
            packed[: num_clusters * dim].reshape(num_clusters, dim), counts, outcome.centroids,
            rng=rng, split_eps=config.split_eps,
        )
        outcome.objective_history.append(float(packed[-1]))
        outcome.empty_splits.append(splits)
        outcome.imbalance_history.append(float(num_clusters * np.square(counts).sum() / max(counts.sum(), 1) ** 2))
        outcome.size_range_history.append((int(counts.min()), int(counts.max())))
        log = logger.info if splits else logger.debug
        log("iteration %d: objective %.6g, %d empty clusters split", iteration, packed[-1], splits)
    if final_assignment:
        assigner = Assigner(outcome.centroids, backend=config.backend, num_threads=config.num_threads)
        outcome.labels, outcome.sqdist = assigner.assign(rows)
    return outcome


def assign_groups(
    data: RowSource,
    group_labels: np.ndarray | None,
    centroids: list[np.ndarray],
    config: LloydConfig,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, float]:
    """Assign every row to the nearest centroid of its group, streaming ``data`` block by block.

    Args:
        data: this process's rows.
        group_labels: group of every local row (``None``: one group).
        centroids: per group, its (k_g, d) centroids; cluster ids are numbered across groups in order.

    Returns:
        ``(assignments, objective)``: int32 global cluster ids of the local rows and the sum of their
        squared distances (local; all-reduce it for the global value).
    """
    offsets = np.concatenate([[0], np.cumsum([c.shape[0] for c in centroids])])
    assigners = [
        Assigner(c, backend=config.backend, num_threads=config.num_threads) if c.shape[0] else None
        for c in centroids
    ]
    assignments = np.empty(data.num_rows, dtype=np.int32)
    objective = 0.0
    for start, rows in prefetched(data.iter_blocks()):
        stop = start + rows.shape[0]
        block_groups = None if group_labels is None else group_labels[start:stop]
        for group, members in enumerate(group_members(block_groups, rows.shape[0], len(centroids))):
            if members.size:
                part = rows if members.size == rows.shape[0] else rows[members]
                labels, sqdist = assigners[group].assign(part)
                assignments[start + members] = labels + offsets[group]
                objective += float(sqdist.sum(dtype=np.float64))
        if progress is not None:
            progress(rows.shape[0])
    return assignments, objective


def _train(data, samples, num_children, config, seed, level, reducer, complete) -> list[LloydOutcome]:
    """Read the training rows once, then run Lloyd's algorithm group after group."""
    union = np.sort(np.concatenate(samples)) if len(samples) > 1 else samples[0]
    rows = data.take(union)
    logger.info("level %d: training on %d local rows (%d groups)", level, union.size, len(samples))
    inits = smallest_key_rows(samples, num_children, row_offset=data.row_offset, seed=seed, reducer=reducer)
    outcomes = []
    for group, (sample, init) in enumerate(zip(samples, inits)):
        if num_children[group] == 0:
            outcomes.append(LloydOutcome(centroids=np.zeros((0, data.dim), dtype=np.float32)))
            continue
        group_rows = rows if sample.size == union.size else rows[np.searchsorted(union, sample)]
        start = gather_rows(rows[np.searchsorted(union, init)], reducer)
        split_seed = stream_seed(config.seed, _SEED_SPLIT, level, group)
        outcomes.append(
            lloyd(group_rows, start, config, split_seed=split_seed, reducer=reducer, final_assignment=complete)
        )
    return outcomes


def _collect_training_labels(num_rows, samples, trained, offsets) -> tuple[np.ndarray, float]:
    assignments = np.empty(num_rows, dtype=np.int32)
    objective = 0.0
    for group, (sample, outcome) in enumerate(zip(samples, trained)):
        if outcome.labels is not None:
            assignments[sample] = outcome.labels + offsets[group]
            objective += float(outcome.sqdist.sum(dtype=np.float64))
    return assignments, objective


def _result(centroids, assignments, objective, offsets, trained, wanted, group_sizes, reducer) -> KMeansResult:
    total = int(offsets[-1])
    sizes = reducer.all_reduce_sum(block_bincount(assignments, total))
    objective = float(reducer.all_reduce_sum(np.array([objective]))[0])
    dim = trained[0].centroids.shape[1] if trained else 0
    return KMeansResult(
        centroids=np.concatenate(centroids) if centroids else np.zeros((0, dim), dtype=np.float32),
        assignments=assignments,
        sizes=sizes,
        group_offsets=offsets,
        objective=objective,
        objective_history=_stack([t.objective_history for t in trained], float),
        empty_splits=_stack([t.empty_splits for t in trained], np.int64),
        imbalance_history=_stack([t.imbalance_history for t in trained], float),
        size_range_history=_stack([t.size_range_history for t in trained], np.int64),
        num_train_rows=np.minimum(wanted, group_sizes),
    )


def _stack(rows: list[list], dtype) -> np.ndarray:
    """Per-group histories as one array (groups first); a group without a k-means gets zeros."""
    width = max((len(r) for r in rows), default=0)
    tail = next((np.shape(r)[1:] for r in rows if len(r)), ())
    out = np.zeros((len(rows), width, *tail), dtype=dtype)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = r
    return out


def _sample_sizes(num_children: np.ndarray, group_sizes: np.ndarray, per_centroid: int | None,
                  max_rows: int | None) -> np.ndarray:
    if per_centroid is not None:
        return num_children * per_centroid
    if max_rows is None:
        return group_sizes.copy()
    return np.minimum(group_sizes, np.maximum(max_rows, num_children))


def _check_children(num_children: np.ndarray, group_sizes: np.ndarray) -> None:
    if np.any(num_children < 0):
        raise ValueError("the number of clusters per group must be >= 0")
    too_many = np.flatnonzero(num_children > group_sizes)
    if too_many.size:
        g = int(too_many[0])
        raise ValueError(
            f"group {g} has {group_sizes[g]} rows, fewer than its {num_children[g]} clusters; ask for fewer clusters"
        )


def _size_stats(sizes: np.ndarray) -> dict:
    if sizes.size == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "num_empty": 0}
    return {
        "min": int(sizes.min()),
        "max": int(sizes.max()),
        "mean": float(sizes.mean()),
        "num_empty": int((sizes == 0).sum()),
    }
