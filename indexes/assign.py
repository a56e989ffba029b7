"""Nearest-centroid assignment (squared L2) and float64 per-cluster sums, block by block.

The assignment is the cost of k-means: ``2 * N * d * k`` flops per pass. On CPU it is a blocked GEMM
``x @ (-2 C)^T`` plus the centroid norms, followed by an argmin; each task of ``rows_per_task`` rows runs on
one thread with a single-threaded BLAS, and a pool of ``num_threads`` threads runs the tasks (numpy
releases the GIL in both). One runtime owns the cores, so no BLAS thread spins against the argmin.
With a CUDA device (``backend="torch"``) the same task runs as ``torch.addmm`` + ``min`` on the GPU;
``backend="faiss"`` uses a faiss flat index (GPU when faiss sees one).

The per-cluster sums are accumulated in float64: each task sums its rows per touched cluster and the
partial sums are added in task order, so the result is independent of the number of threads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from indexes.data import RowSource
from indexes.threads import blas_limits_available, default_num_threads, single_threaded_kernels

logger = logging.getLogger(__name__)

Backend = Literal["auto", "blas", "torch", "faiss"]
_CENTROID_TILE = 4096  # centroids per GEMM; bounds the (rows x centroids) scratch for large k
_SCRATCH_ELEMENTS = 1 << 19  # rows_per_task * min(k, tile): the GEMM output stays in the L2/L3 caches


@dataclass
class ClusterSums:
    """Float64 accumulators of one assignment pass (local to this rank until all-reduced)."""

    sums: np.ndarray
    """(k, d) float64 sum of the rows assigned to each cluster."""
    counts: np.ndarray
    """(k,) int64 number of rows assigned to each cluster."""
    objective: float = 0.0
    """Sum of squared distances of the rows to their centroid."""

    @classmethod
    def zeros(cls, num_clusters: int, dim: int) -> ClusterSums:
        """Empty accumulators for ``num_clusters`` clusters of dimension ``dim``."""
        return cls(sums=np.zeros((num_clusters, dim)), counts=np.zeros(num_clusters, dtype=np.int64))


def rows_per_task(num_clusters: int) -> int:
    """Rows assigned per task: a function of k only, so results never depend on thread or block counts."""
    rows = _SCRATCH_ELEMENTS // min(num_clusters, _CENTROID_TILE)
    return int(2 ** np.clip(np.floor(np.log2(rows)), 9, 12))


def resolve_backend(backend: Backend) -> str:
    """``"auto"`` becomes ``"torch"`` with a CUDA device, else ``"blas"``; other values are checked."""
    if backend not in ("auto", "blas", "torch", "faiss"):
        raise ValueError(f"backend={backend!r} must be one of 'auto', 'blas', 'torch', 'faiss'")
    if backend != "auto":
        return backend
    import torch

    return "torch" if torch.cuda.is_available() else "blas"


class Assigner:
    """Assigns rows to the nearest of fixed centroids and optionally accumulates per-cluster sums.

    Args:
        centroids: (k, d) float32 centroids.
        backend: ``"blas"`` (CPU GEMM), ``"torch"`` (CUDA when present, else CPU), ``"faiss"`` or ``"auto"``.
        num_threads: worker threads for the CPU backends; ``None`` means all cores of this process.
    """

    def __init__(self, centroids: np.ndarray, *, backend: Backend = "auto", num_threads: int | None = None) -> None:
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[0] < 1:
            raise ValueError(f"centroids of shape {centroids.shape} must be (k >= 1, d)")
        self.num_clusters, self.dim = centroids.shape
        self.backend = resolve_backend(backend)
        self.rows_per_task = rows_per_task(self.num_clusters)
        threads = num_threads or default_num_threads()
        # Without threadpoolctl BLAS keeps its own threads: one task at a time avoids oversubscription.
        self.num_threads = threads if self.backend == "blas" and blas_limits_available() else 1
        self._nearest = _build_nearest(centroids, self.backend)

    def assign(self, rows: np.ndarray, sums: ClusterSums | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of every row.

        Args:
            rows: (n, d) float32 rows.
            sums: when given, the rows are added to it (sums, counts and objective), in task order.

        Returns:
            ``(labels, sqdist)``: int64 cluster ids and float32 squared distances, shape (n,).
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise ValueError(f"rows of shape {rows.shape} must have {self.dim} columns")
        starts = range(0, rows.shape[0], self.rows_per_task)

        def task(start: int):
            part = rows[start : start + self.rows_per_task]
            labels, sqdist = self._nearest(part)
            return labels, sqdist, (_partial_sums(part, labels, self.num_clusters) if sums is not None else None)

        labels = np.empty(rows.shape[0], dtype=np.int64)
        sqdist = np.empty(rows.shape[0], dtype=np.float32)
        with single_threaded_kernels():
            for start, (lab, dist, partial) in zip(starts, self._map(task, starts)):
                labels[start : start + lab.size] = lab
                sqdist[start : start + lab.size] = dist
                if partial is not None:
                    _add_partial(sums, partial, dist)
        return labels, sqdist

    def _map(self, task: Callable, starts: range) -> Iterator:
        if self.num_threads == 1 or len(starts) == 1:
            return map(task, starts)
        return _pool(self.num_threads).map(task, starts)


def assign_source(
    data: RowSource,
    centroids: np.ndarray,
    *,
    backend: Backend = "auto",
    num_threads: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of every row of ``data``, streaming block by block (memory: a block + centroids).

    Returns:
        ``(labels, sqdist)``: int32 cluster ids and float32 squared distances of the local rows.
    """
    assigner = Assigner(centroids, backend=backend, num_threads=num_threads)
    labels = np.empty(data.num_rows, dtype=np.int32)
    sqdist = np.empty(data.num_rows, dtype=np.float32)
    with single_threaded_kernels():
        for start, rows in data.iter_blocks():
            lab, dist = assigner.assign(rows)
            labels[start : start + rows.shape[0]] = lab
            sqdist[start : start + rows.shape[0]] = dist
            if progress is not None:
                progress(rows.shape[0])
    return labels, sqdist


def _build_nearest(centroids: np.ndarray, backend: str) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    if backend == "blas":
        return _BlasNearest(centroids)
    if backend == "torch":
        return _TorchNearest(centroids)
    return _FaissNearest(centroids)


class _BlasNearest:
    """argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c): one GEMM per centroid tile, then an argmin."""

    def __init__(self, centroids: np.ndarray) -> None:
        tiles = range(0, centroids.shape[0], _CENTROID_TILE)
        self._tiles = [np.ascontiguousarray(-2.0 * centroids[t : t + _CENTROID_TILE].T) for t in tiles]
        self._norms = [np.einsum("ij,ij->i", c, c) for c in (centroids[t : t + _CENTROID_TILE] for t in tiles)]

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(rows.shape[0])
        best = labels = None
        for first, (tile, norms) in zip(range(0, 1 << 62, _CENTROID_TILE), zip(self._tiles, self._norms)):
            scores = rows @ tile
            scores += norms
            tile_labels = scores.argmin(axis=1)
            tile_best = scores[index, tile_labels]
            if best is None:
                best, labels = tile_best, tile_labels
            else:  # strictly smaller only: ties keep the lower id, as a single argmin would
                better = tile_best < best
                best = np.where(better, tile_best, best)
                labels = np.where(better, tile_labels + first, labels)
        best += np.einsum("ij,ij->i", rows, rows)
        return labels, np.maximum(best, 0.0, out=best)


class _TorchNearest:
    """The same computation with torch on the default CUDA device (CPU without one)."""

    def __init__(self, centroids: np.ndarray) -> None:
        import torch

        self._torch = torch
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        c = torch.from_numpy(centroids).to(self._device)
        self._c2t = (-2.0 * c).T.contiguous()
        self._norms = (c * c).sum(dim=1)

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._torch.from_numpy(rows).to(self._device)
        best, labels = self._torch.addmm(self._norms, x, self._c2t).min(dim=1)
        best = (best + (x * x).sum(dim=1)).clamp_(min=0.0)
        return labels.cpu().numpy(), best.cpu().numpy()


class _FaissNearest:
    """A faiss exact L2 index over the centroids (on all GPUs faiss sees, if any)."""

    def __init__(self, centroids: np.ndarray) -> None:
        import faiss

        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        self._index = index

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sqdist, labels = self._index.search(rows, 1)
        return labels[:, 0].astype(np.int64), np.maximum(sqdist[:, 0], 0.0)


def _partial_sums(rows: np.ndarray, labels: np.ndarray, num_clusters: int) -> tuple:
    """Float64 sums of ``rows`` per label: ``(labels_present or None for all, sums, counts)``.

    For small k a dense (k, d) partial is cheaper than finding the labels present; for large k only the
    touched clusters are summed, so a task costs O(rows * d) whatever k is.
    """
    import torch

    source = torch.from_numpy(rows.astype(np.float64))
    if num_clusters <= rows.shape[0] // 4:
        present, inverse, counts = None, labels, np.bincount(labels, minlength=num_clusters)
    else:
        present, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    sums = torch.zeros((counts.size, rows.shape[1]), dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(inverse.reshape(-1)), source)
    return present, sums.numpy(), counts


def _add_partial(sums: ClusterSums, partial: tuple, sqdist: np.ndarray) -> None:
    present, part, counts = partial
    if present is None:
        sums.sums += part
        sums.counts += counts
    else:  # labels in ``present`` are distinct, so fancy-index += adds each partial once
        sums.sums[present] += part
        sums.counts[present] += counts
    sums.objective += float(sqdist.sum(dtype=np.float64))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(num_threads: int) -> ThreadPoolExecutor:
    """A process-wide pool per size: k-means calls assign thousands of times, threads are reused."""
    if num_threads not in _POOLS:
        _POOLS[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="indexes-assign")
    return _POOLS[num_threads]
