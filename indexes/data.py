"""The small data interface the clustering algorithms read rows through.

An algorithm sees a :class:`RowSource`: the rows this process owns, read block by block or by index, as
float32. :class:`ArrayDataset` implements it over a numpy array or any array that supports ``.shape``,
``.dtype`` and ``arr[a:b]`` slicing returning numpy (a Zarr array, an ``h5py`` dataset, a memmap); with
``start``/``stop`` it is one rank's contiguous part of a larger array (:meth:`ArrayDataset.shard`).

Rows are identified by their global index (``row_offset`` + local index). :func:`row_keys` hashes global
indices to distinct pseudo-random 64-bit keys; the algorithms sample and initialise by "smallest keys
first", which gives the same rows whatever the block size, the storage or the number of ranks.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1


@runtime_checkable
class RowSource(Protocol):
    """The rows of one process, readable as float32 blocks."""

    @property
    def num_rows(self) -> int:
        """Number of rows this process owns."""
        ...

    @property
    def dim(self) -> int:
        """Number of columns of the rows as returned (after any transform)."""
        ...

    @property
    def row_offset(self) -> int:
        """Global index of this process's first row."""
        ...

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(local_start, rows)`` for consecutive blocks covering all rows; rows are float32 C-contiguous."""
        ...

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at the given increasing local indices, float32 of shape ``(len(indices), dim)``."""
        ...


def shard_bounds(num_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, stop)`` of rank ``rank`` when ``num_rows`` rows are split over ``world_size`` ranks.

    The first ``num_rows % world_size`` ranks get one row more than the others.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    base, extra = divmod(num_rows, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ArrayDataset:
    """A :class:`RowSource` over a 2-D array, read ``block_rows`` rows at a time.

    Args:
        array: numpy array or any sliceable array of shape ``(N, d)`` (float16/float32/float64).
        block_rows: rows per block read; align it with the storage chunks to read each chunk once.
        transform: optional function applied to every float32 block read (e.g. PCA-whitening); it may
            change the number of columns, and must map rows independently of each other.
        transform_dim: number of columns the transform returns; required when ``transform`` is given.
        start: first global row of this view.
        stop: end (exclusive) of this view; ``None`` means the end of the array.
    """

    def __init__(
        self,
        array: Any,
        *,
        block_rows: int = 65536,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        transform_dim: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        if len(array.shape) != 2:
            raise ValueError(f"array of shape {tuple(array.shape)} must be 2-D (rows, features)")
        total = int(array.shape[0])
        stop = total if stop is None else stop
        if not 0 <= start <= stop <= total:
            raise ValueError(f"rows [{start}, {stop}) are not inside the array's {total} rows")
        if block_rows < 1:
            raise ValueError(f"block_rows={block_rows} must be >= 1")
        if (transform is None) != (transform_dim is None):
            raise ValueError("transform and transform_dim must be given together")
        self.array = array
        self.block_rows = block_rows
        self.transform = transform
        self.start = start
        self.stop = stop
        self._dim = int(array.shape[1]) if transform_dim is None else transform_dim

    @property
    def num_rows(self) -> int:
        """Rows in this view."""
        return self.stop - self.start

    @property
    def dim(self) -> int:
        """Columns of the rows returned."""
        return self._dim

    @property
    def row_offset(self) -> int:
        """Global index of this view's first row."""
        return self.start

    def shard(self, rank: int, world_size: int) -> ArrayDataset:
        """The contiguous part of this view owned by ``rank`` (see :func:`shard_bounds`)."""
        first, last = shard_bounds(self.num_rows, rank, world_size)
        return ArrayDataset(
            self.array,
            block_rows=self.block_rows,
            transform=self.transform,
            transform_dim=None if self.transform is None else self._dim,
            start=self.start + first,
            stop=self.start + last,
        )

    def iter_blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(local_start, float32 rows)`` block by block."""
        for first in range(self.start, self.stop, self.block_rows):
            last = min(first + self.block_rows, self.stop)
            yield first - self.start, self._prepare(self.array[first:last])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Rows at increasing local ``indices``; a chunked array is read one block at a time."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices[0] < 0 or indices[-1] >= self.num_rows or np.any(np.diff(indices) <= 0)):
            raise ValueError("indices must be strictly increasing local row indices")
        if isinstance(self.array, np.ndarray):
            if indices.size == self.num_rows:  # every row: a view, no gather
                return self._prepare(self.array[self.start : self.stop])
            return self._prepare(self.array[self.start + indices])
        out = np.empty((indices.size, self.dim), dtype=np.float32)
        bounds = np.searchsorted(indices, np.arange(0, self.num_rows + self.block_rows, self.block_rows))
        for block, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            if hi > lo:
                first = self.start + block * self.block_rows
                rows = self.array[first : min(first + self.block_rows, self.stop)]
                out[lo:hi] = self._prepare(np.asarray(rows)[indices[lo:hi] - block * self.block_rows])
        return out

    def _prepare(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if self.transform is not None:
            rows = np.ascontiguousarray(self.transform(rows), dtype=np.float32)
        return rows


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that scatters consecutive integers pseudo-randomly."""
    z = np.asarray(values, dtype=np.uint64).copy()
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


def stream_seed(seed: int, *tags: int) -> int:
    """A 64-bit seed derived from ``seed`` and integer ``tags`` (e.g. level, parent)."""
    state = np.array([seed & _MASK64], dtype=np.uint64)
    for tag in tags:
        state = mix64(state ^ np.uint64(tag & _MASK64)) + np.uint64(0x9E3779B97F4A7C15)
    return int(mix64(state)[0])


def row_keys(global_indices: np.ndarray, seed: int) -> np.ndarray:
    """Distinct pseudo-random uint64 keys of rows, a function of their global index and ``seed`` only.

    Distinct rows get distinct keys (a bijection applied to ``index + seed``), so "the n rows with the
    smallest keys" is a well-defined random sample that any rank can evaluate for its own rows.
    """
    return mix64(np.asarray(global_indices, dtype=np.uint64) + np.uint64(seed & _MASK64))


def block_bincount(values: np.ndarray, minlength: int, block_rows: int = 1 << 18) -> np.ndarray:
    """``np.bincount(values, minlength=minlength)`` as int64, a block at a time: ``np.bincount`` copies an int32
    array to int64 whole first (8 bytes a row, 770 MB at 96M rows)."""
    counts = np.zeros(minlength, dtype=np.int64)
    for start in range(0, len(values), block_rows):
        part = np.bincount(values[start:start + block_rows], minlength=minlength)
        if part.size > counts.size:
            counts = np.concatenate([counts, np.zeros(part.size - counts.size, dtype=np.int64)])
        counts[:part.size] += part
    return counts


def prefetched(items: Iterable, depth: int = 1) -> Iterator:
    """Iterate ``items`` with up to ``depth`` items produced ahead on a background thread.

    Reading and decoding the next block (Zarr decompression releases the GIL) overlaps with the work on
    the current one; memory grows by ``depth`` blocks. An exception in the producer is re-raised here.
    """
    slots: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                slots.put((item, None))
            slots.put((done, None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            slots.put((done, error))

    thread = threading.Thread(target=produce, name="indexes-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slots.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it finish
            try:
                slots.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
