"""Nearest-centroid assignment (squared L2) and float64 per-cluster sums, block by block.

The assignment is the cost of k-means: ``2 * N * d * k`` flops per pass. On CPU (``backend="blas"``) the rows
are split into tasks of ``rows_per_task`` rows, run by a pool of ``num_threads`` threads with a
single-threaded BLAS each (numpy and torch release the GIL); one runtime owns the cores, so no BLAS thread
spins against the argmin. A task runs in blocks of ``block_rows`` rows, one GEMM per block and centroid
tile, with the centroid norms folded into the GEMM (see :class:`_BlasNearest`), then an argmin. With a CUDA
device (``backend="torch"``) a task runs as ``torch.addmm`` + ``min`` on the GPU; ``backend="faiss"`` uses
a faiss flat index (GPU when faiss sees one).

After each block's GEMM and argmin, one compiled pass (:mod:`indexes.kernels`, numba) computes the squared
distances and adds the rows to the per-cluster sums while the block is in the cache: at k = 256, d = 128
this took the assignment from 0.64 to 0.71-0.76 of the SGEMM rate (numpy and torch needed 0.6 ms of separate
passes per 2048 rows next to a 1.5 ms GEMM; the compiled pass takes 0.06 ms).

The per-cluster sums are accumulated in float64: each task adds its rows, in row order, into a float64
partial (dense (k, d), or only the touched clusters for large k), and the partials are added in task
order. Task boundaries depend on k only, so the result is independent of the number of threads. Float32
partials would save a little time, but their rounding (1e-7 relative) would
depend on where the task boundaries fall, which differs between one rank and several; float64 keeps
those differences at 1e-16, far below the float32 rounding of the centroids, so that one rank and
several find the same clusters. The objective is the float64 sum of the returned squared distances.
"""

from __future__ import annotations

import logging
import threading
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
_SCORES_ELEMENTS = 1 << 19  # block_rows * min(k, tile): about 2 MiB of float32 scores, where the GEMM is fastest
_TASK_ROWS = 4096  # rows per task at least: the per-task costs stay small next to the GEMMs


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
    """Rows per task, the unit of the per-cluster partial sums: a whole number of GEMM blocks.

    A function of k only, so results never depend on the number of threads. At least ``_TASK_ROWS`` rows,
    so the per-task costs (a dense (k, d) partial and its addition, the Python calls) stay small.
    """
    return max(block_rows(num_clusters), _TASK_ROWS)


def block_rows(num_clusters: int) -> int:
    """Rows per GEMM, a power of two in [512, 4096], for about ``_SCORES_ELEMENTS`` (rows, min(k, tile)) scores.

    Measured at d = 128 on Zen 3 (512 KiB L2 per core): a single-threaded GEMM of at least 256 rows runs at
    0.95-0.98 of the large-SGEMM rate with 1-4 MiB of output, and slower with more (0.90 at 16 MiB).
    """
    rows = _SCORES_ELEMENTS // min(num_clusters, _CENTROID_TILE)
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
        self._nearest: Nearest = _build_nearest(centroids, self.backend)

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
        labels = np.empty(rows.shape[0], dtype=np.int64)
        sqdist = np.empty(rows.shape[0], dtype=np.float32)
        starts = range(0, rows.shape[0], self.rows_per_task)

        fused = sums is not None and self.num_clusters <= self.rows_per_task and isinstance(self._nearest, _BlasNearest)

        def task(start: int) -> _PartialSums | None:
            part = slice(start, start + self.rows_per_task)
            if fused:  # a dense (k, d) partial filled block by block while each block is in the cache
                partial = _PartialSums(None, np.zeros((self.num_clusters, self.dim)),
                                       np.zeros(self.num_clusters, dtype=np.int64))
                self._nearest(rows[part], labels[part], sqdist[part], partial)
                return partial
            self._nearest(rows[part], labels[part], sqdist[part])
            return None if sums is None else _partial_sums(rows[part], labels[part], self.num_clusters)

        with single_threaded_kernels():
            for partial in self._map(task, starts):  # in task order
                if partial is not None:
                    partial.add_to(sums)
        if sums is not None:
            sums.objective += float(sqdist.sum(dtype=np.float64))
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


Nearest = Callable[[np.ndarray, np.ndarray, np.ndarray], None]
"""``nearest(rows, labels, sqdist)`` writes the nearest centroid of each row and its squared distance."""


def _build_nearest(centroids: np.ndarray, backend: str) -> Nearest:
    if backend == "blas":
        return _BlasNearest(centroids)
    if backend == "torch":
        return _TorchNearest(centroids)
    return _FaissNearest(centroids)


class _BlasNearest:
    """argmin_c ||x - c||^2 = argmin_c (||c||^2 - 2 x.c): GEMMs of ``block_rows`` rows by a centroid tile.

    The centroid norms ride in the GEMM: each block of rows is copied next to a column of ones into a
    (rows, d + 1) scratch, and each tile is the (d + 1, t) matrix ``[-2 C^T; ||c||^2]``. Copying the
    (rows, d) block costs less than a pass adding the norms to the (rows, t) scores (half the elements at
    d = 128, k = 256), and it is the block's first read from memory anyway. The scratch buffers are per
    thread and reused from block to block (:func:`_scratch`).
    """

    def __init__(self, centroids: np.ndarray) -> None:
        num_clusters, dim = centroids.shape
        self._tiles = []
        for first in range(0, num_clusters, _CENTROID_TILE):
            part = centroids[first : first + _CENTROID_TILE]
            tile = np.empty((dim + 1, part.shape[0]), dtype=np.float32)
            tile[:dim] = -2.0 * part.T
            tile[dim] = np.einsum("ij,ij->i", part, part)
            self._tiles.append((first, tile))
        self._block_rows = block_rows(num_clusters)
        self._columns = -(-(dim + 1) // 8) * 8  # scratch rows padded to 32 bytes

    def __call__(self, rows: np.ndarray, labels: np.ndarray, sqdist: np.ndarray,
                 partial: _PartialSums | None = None) -> None:
        """As :data:`Nearest`; with a dense ``partial``, also add each row to its cluster (in row order)."""
        for start in range(0, rows.shape[0], self._block_rows):
            block = slice(start, start + self._block_rows)
            self._block(rows[block], labels[block], sqdist[block], partial)

    def _block(self, rows: np.ndarray, labels: np.ndarray, sqdist: np.ndarray, partial: _PartialSums | None) -> None:
        from indexes.kernels import finish_block

        n, dim = rows.shape
        augmented = _scratch("augmented", (n, self._columns), np.float32)[:, : dim + 1]
        augmented[:, :dim] = rows
        augmented[:, dim] = 1.0
        scores = _scratch("scores", (n * self._tiles[0][1].shape[1],), np.float32)  # the first tile is the widest
        best = _scratch("best", (n,), np.float32)
        flat = _scratch("flat", (n,), np.int64)
        single = len(self._tiles) == 1
        for first, tile in self._tiles:
            out = scores[: n * tile.shape[1]].reshape(n, tile.shape[1])  # contiguous, also for a narrower tile
            np.matmul(augmented, tile, out=out)
            tile_labels = labels if first == 0 else _scratch("tile_labels", (n,), np.int64)
            np.argmin(out, axis=1, out=tile_labels)
            if single:  # the kernel below reads the best scores
                break
            np.multiply(np.arange(n), tile.shape[1], out=flat)
            flat += tile_labels
            tile_best = best if first == 0 else _scratch("tile_best", (n,), np.float32)
            np.take(out.reshape(-1), flat, out=tile_best)
            if first:  # strictly smaller only: ties keep the lower id, as a single argmin would
                better = tile_best < best
                np.copyto(best, tile_best, where=better)
                np.add(tile_labels, first, out=labels, where=better)
        sums, counts = (partial.sums, partial.counts) if partial is not None else (_NO_SUMS, _NO_COUNTS)
        finish_block(rows, out if single else _NO_SCORES, labels, best, sqdist, sums, counts)


_NO_SCORES = np.empty((0, 1), dtype=np.float32)
_NO_SUMS = np.empty((0, 1), dtype=np.float64)
_NO_COUNTS = np.empty(0, dtype=np.int64)


class _TorchNearest:
    """The same computation with torch on the default CUDA device (CPU without one)."""

    def __init__(self, centroids: np.ndarray) -> None:
        import torch

        self._torch = torch
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        c = torch.from_numpy(centroids).to(self._device)
        self._c2t = (-2.0 * c).T.contiguous()
        self._norms = (c * c).sum(dim=1)

    def __call__(self, rows: np.ndarray, labels: np.ndarray, sqdist: np.ndarray) -> None:
        x = self._torch.from_numpy(rows).to(self._device)
        best, nearest = self._torch.addmm(self._norms, x, self._c2t).min(dim=1)
        best = (best + (x * x).sum(dim=1)).clamp_(min=0.0)
        labels[:] = nearest.cpu().numpy()
        sqdist[:] = best.cpu().numpy()


class _FaissNearest:
    """A faiss exact L2 index over the centroids (on all GPUs faiss sees, if any)."""

    def __init__(self, centroids: np.ndarray) -> None:
        import faiss

        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(centroids)
        if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            index = faiss.index_cpu_to_all_gpus(index)
        self._index = index

    def __call__(self, rows: np.ndarray, labels: np.ndarray, sqdist: np.ndarray) -> None:
        found_sqdist, found = self._index.search(rows, 1)
        labels[:] = found[:, 0]
        np.maximum(found_sqdist[:, 0], 0.0, out=sqdist)


@dataclass
class _PartialSums:
    """One task's float64 sums, added to the total in task order."""

    present: np.ndarray | None
    """Cluster ids of the rows of ``sums`` (distinct), or ``None`` when ``sums`` has a row per cluster."""
    sums: np.ndarray
    counts: np.ndarray

    def add_to(self, total: ClusterSums) -> None:
        if self.present is None:
            total.sums += self.sums
            total.counts += self.counts
        else:  # ids in ``present`` are distinct, so fancy-index += adds each partial once
            total.sums[self.present] += self.sums
            total.counts[self.present] += self.counts


def _partial_sums(rows: np.ndarray, labels: np.ndarray, num_clusters: int) -> _PartialSums:
    """Float64 sums of ``rows`` per label and their counts, accumulated in row order.

    For small k a dense (k, d) partial is cheaper than finding the labels present; for large k only the
    touched clusters are summed, so a task costs O(rows * d) whatever k is. The loop is compiled
    (:func:`indexes.kernels.accumulate_rows`): each float32 value is converted as it is added.
    """
    from indexes.kernels import accumulate_rows

    if num_clusters <= rows.shape[0]:
        present, index, size = None, labels, num_clusters
    else:
        present, index = np.unique(labels, return_inverse=True)
        size = present.size
    sums = np.zeros((size, rows.shape[1]), dtype=np.float64)
    counts = np.zeros(size, dtype=np.int64)
    accumulate_rows(rows, index.reshape(-1), sums, counts)
    return _PartialSums(present, sums, counts)


_SCRATCH = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """A per-thread scratch array of ``shape``, reused by the next block or task on this thread.

    The buffer grows to the largest leading dimension asked for; smaller requests get a view of it. At
    d = 128 a thread keeps about 5 MiB (up to 10 MiB when k > 1024) for the life of the process.
    """
    buffer = getattr(_SCRATCH, name, None)
    if buffer is None or buffer.shape[1:] != shape[1:] or buffer.shape[0] < shape[0] or buffer.dtype != dtype:
        buffer = np.empty(shape, dtype=dtype)
        setattr(_SCRATCH, name, buffer)
    return buffer[: shape[0]]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(num_threads: int) -> ThreadPoolExecutor:
    """A process-wide pool per size: k-means calls assign thousands of times, threads are reused."""
    if num_threads not in _POOLS:
        _POOLS[num_threads] = ThreadPoolExecutor(num_threads, thread_name_prefix="indexes-assign")
    return _POOLS[num_threads]
