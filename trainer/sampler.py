"""Cluster-balanced sampling of a *streamed* dataset, resumable from a checkpoint.

DeepCluster draws every training image by first picking a cluster uniformly, then an image of that
cluster, so that large clusters do not dominate the features (Caron's thesis, Sec. 3; DeeperCluster
Sec. 3.2). That needs random access. Here the data arrive as a stream of ``(row, sample)`` pairs in shard
order (``row`` = global row: shard's first row + position in the shard, the row order of
``metadata.parquet`` and of the feature store), and cluster labels are a flat integer array indexed by row
(``labels[row]``; a negative label means "no label", e.g. a sample that failed to embed: never emitted).

The scheme, in two stages:

1. **Emission counts (balancing).** With ``N`` labelled rows in ``K`` non-empty clusters and a target of
   ``T`` samples per epoch (default ``T = N``), a row of cluster ``c`` (``n_c`` rows) is emitted
   ``e_c = T / (K n_c)`` times in expectation: ``floor(e_c)`` copies, plus one more when
   ``u < e_c - floor(e_c)``. Every cluster is then emitted ``n_c e_c = T / K`` times in expectation, the
   total is ``T`` in expectation, and the members of a cluster are used equally (floor or ceil of ``e_c``
   copies, which has less variance than DeepCluster's draws with replacement). ``u`` is a hash of
   ``(seed, epoch, row)`` (:func:`indexes.data.row_keys`), not a stateful RNG draw: a row's count depends
   on nothing else, so the multiset of an epoch is the same however the shards are split across ranks
   and DataLoader workers, and each worker emits about ``sum of its rows' e_c`` samples.
2. **Block shuffle (mixing).** The input is cut into blocks of ``buffer_size`` consecutive input samples.
   The copies of a row are spread over ``copy_spread`` (``S``) consecutive output blocks rather than bunched
   in one: copy ``j`` of ``c`` copies of a row read in block ``b`` is emitted with output block
   ``b + floor(j S / c)`` (copy 0 with its own block; with ``c <= S`` no two copies share a block, and
   consecutive copies are about ``S / c`` blocks apart instead of ``1 / c`` of a block). Output block ``k``
   emits the copies assigned to it in a random permutation drawn from a generator seeded by ``(seed, epoch,
   rank, worker, k)``. The next input block is read while the current output block is emitted (a
   proportional share of it per emitted item), so reading never stalls for a whole block. Held: two blocks
   of samples plus the rows with copies still to come (at most ``S`` blocks of them; copies are references,
   not copies of the data). A stream without repeats (no balancing, or every count <= 1) is the plain block
   shuffle whatever ``S``.

Checkpointing: the position after any emitted item is ``(block, emitted)``; :meth:`BalancedStream.state_dict`
returns it with ``input_position = max(0, block - S + 1) * buffer_size``, the number of input samples to skip
when restarting the input stream. :meth:`~BalancedStream.load_state_dict` then re-reads the input blocks
whose copies may fall into that block, draws the same permutation and skips what was already emitted, which
reproduces the uninterrupted sequence exactly.
In a DataLoader worker, attach ``stream.state_dict()`` to each item it yields: the main process keeps
the state of the last item it consumed from every worker, since workers run ahead of the consumer.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from indexes.data import row_keys, stream_seed

logger = logging.getLogger(__name__)

T = TypeVar("T")
STATE_FORMAT = "trainer.balanced_stream"
STATE_VERSION = 1
# Tags keep the streams of independent random decisions apart even when they share a seed.
_TAG_EMIT = 1
_TAG_SHUFFLE = 2


def stream_rng(seed: int, *tags: int) -> np.random.Generator:
    """A numpy generator seeded by ``(seed, *tags)``, e.g. ``stream_rng(seed, epoch, rank, worker)``.

    Distinct tag tuples give independent streams (:class:`numpy.random.SeedSequence` mixes them).
    """
    if seed < 0 or any(tag < 0 for tag in tags):
        raise ValueError(f"seed and tags must be >= 0, got {(seed, *tags)}")
    return np.random.default_rng(np.random.SeedSequence([seed, *tags]))


def torch_generator(seed: int, *tags: int) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded by ``(seed, *tags)`` (for rotations, weight init)."""
    if seed < 0 or any(tag < 0 for tag in tags):
        raise ValueError(f"seed and tags must be >= 0, got {(seed, *tags)}")
    return torch.Generator().manual_seed(stream_seed(seed, *tags) & (2**63 - 1))


@dataclass(frozen=True, kw_only=True)
class StreamConfig:
    """Options of a :class:`BalancedStream`."""

    seed: int = 0
    """Seed of the emission counts and of the shuffles."""
    buffer_size: int = 4096
    """Input samples per shuffle block. Memory: up to two blocks of distinct samples, plus the rows whose
    copies are still to come (``copy_spread``)."""
    copy_spread: int = 4
    """Output blocks over which the copies of a repeated row are spread (1: all in the block it was read in)."""

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"seed={self.seed} must be >= 0")
        if self.buffer_size < 1:
            raise ValueError(f"buffer_size={self.buffer_size} must be >= 1")
        if self.copy_spread < 1:
            raise ValueError(f"copy_spread={self.copy_spread} must be >= 1")


class ClusterBalance:
    """Per-cluster emission rates computed once from the global labels (shared by every rank and worker).

    Args:
        labels: (N_rows,) integer cluster id of every global row; negative = unlabelled (never emitted).
            Kept by reference, so a memory-mapped array works and forked DataLoader workers share it.
        samples_per_epoch: expected emissions per epoch over all ranks and workers; ``None`` = the number
            of labelled rows.

    Attributes:
        sizes: (K,) int64 rows per cluster id (``K = max label + 1``; some may be empty).
        num_labelled: rows with a label ``>= 0``.
        num_nonempty: clusters with at least one row.
        rates: (K,) float64 expected emissions of one row of each cluster, ``T / (K_nonempty * size)``
            (0 for empty clusters).
    """

    def __init__(self, labels: np.ndarray, samples_per_epoch: int | None = None) -> None:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
        self.labels = labels
        self.sizes = _label_counts(labels)
        self.num_labelled = int(self.sizes.sum())
        if self.num_labelled == 0:
            raise ValueError("labels hold no labelled row (all negative or empty)")
        self.num_nonempty = int(np.count_nonzero(self.sizes))
        self.samples_per_epoch = self.num_labelled if samples_per_epoch is None else samples_per_epoch
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch={samples_per_epoch} must be >= 1")
        with np.errstate(divide="ignore"):
            rates = self.samples_per_epoch / (self.num_nonempty * self.sizes.astype(np.float64))
        self.rates = np.where(self.sizes > 0, rates, 0.0)

    def digest(self) -> str:
        """A short fingerprint of the cluster sizes and the target, to check a checkpoint's labels."""
        hasher = hashlib.sha1(self.sizes.astype(np.int64).tobytes())
        hasher.update(str(self.samples_per_epoch).encode())
        return hasher.hexdigest()[:16]

    def expected(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) float64 expected emissions of ``rows`` (0 for unlabelled rows)."""
        labels = self._labels_of(rows)
        return np.where(labels >= 0, self.rates[np.maximum(labels, 0)], 0.0)

    def counts(self, rows: np.ndarray, seed: int, epoch: int) -> np.ndarray:
        """(len(rows),) int64 emissions of ``rows`` in ``epoch``: ``floor(e)`` or ``floor(e) + 1``.

        A pure function of ``(seed, epoch, row)``: the same row gets the same count in any stream.
        """
        expected = self.expected(rows)
        whole = np.floor(expected)
        keys = row_keys(np.asarray(rows, dtype=np.int64).astype(np.uint64), stream_seed(seed, _TAG_EMIT, epoch))
        uniform = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53
        return (whole + (uniform < expected - whole)).astype(np.int64)

    def _labels_of(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.labels.shape[0]):
            raise ValueError(f"rows must be in [0, {self.labels.shape[0]}) (the labels' length), got "
                             f"[{rows.min()}, {rows.max()}]")
        return np.asarray(self.labels[rows], dtype=np.int64)


class BalancedStream:
    """Iterable transform ``(row, sample)`` stream -> cluster-balanced, block-shuffled ``(row, sample)`` stream.

    One object per (epoch, rank, DataLoader worker); see the module docstring for the scheme.

    Args:
        balance: the emission rates; ``None`` emits every input sample exactly once (a plain resumable
            block shuffle, e.g. for RotNet, which needs no labels).
        config: seed and buffer size.
        epoch: epoch number (changes the emission counts and the shuffles).
        rank: distributed rank (changes the shuffles).
        worker: DataLoader worker id within the rank (changes the shuffles).
    """

    def __init__(self, balance: ClusterBalance | None, config: StreamConfig, *, epoch: int = 0, rank: int = 0,
                 worker: int = 0) -> None:
        if min(epoch, rank, worker) < 0:
            raise ValueError(f"epoch, rank and worker must be >= 0, got {epoch}, {rank}, {worker}")
        self.balance = balance
        self.config = config
        self.rank = rank
        self.worker = worker
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (the next iteration must get the input from its start)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        self.epoch = epoch
        self._block = 0
        self._emitted = 0

    @property
    def input_position(self) -> int:
        """Number of input samples to skip when (re)starting the input stream for the next iteration."""
        return self._first_input_block * self.config.buffer_size

    @property
    def _first_input_block(self) -> int:
        """The first input block whose copies may still be emitted in the current output block."""
        return max(0, self._block - self.config.copy_spread + 1)

    def state_dict(self) -> dict[str, Any]:
        """The position after the last emitted item, as a JSON-able dict."""
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "seed": self.config.seed,
            "buffer_size": self.config.buffer_size, "copy_spread": self.config.copy_spread, "rank": self.rank,
            "worker": self.worker, "balance": None if self.balance is None else self.balance.digest(),
            "epoch": self.epoch, "block": self._block, "emitted": self._emitted,
            "input_position": self.input_position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by :meth:`state_dict`.

        The next iteration must be given the input stream starting at :attr:`input_position`.

        Raises:
            ValueError: the state is from a stream with another seed, buffer size, copy spread, rank, worker or
                labels.
        """
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(f"not a {STATE_FORMAT} v{STATE_VERSION} state: {state.get('format')!r} "
                             f"v{state.get('version')!r}")
        state = {"copy_spread": 1} | state  # states written before copies were spread
        mine = self.state_dict()
        for key in ("seed", "buffer_size", "copy_spread", "rank", "worker", "balance"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume: the state has {key}={state[key]!r} but this stream "
                                 f"{mine[key]!r}")
        self.set_epoch(int(state["epoch"]))
        self._block, self._emitted = int(state["block"]), int(state["emitted"])

    def __call__(self, samples: Iterable[tuple[int, T]]) -> Iterator[tuple[int, T]]:
        """Balance and shuffle ``samples``, which must start at :attr:`input_position` of this epoch's input."""
        source = iter(samples)
        size = self.config.buffer_size
        pending: dict[int, list[tuple[int, T]]] = {}  # output block -> the copies assigned to it
        for index in range(self._first_input_block, self._block):  # their copies still to come (resume)
            self._assign(_take(source, size, []), index, pending)
        block, skip = _take(source, size, []), self._emitted
        while block or pending:
            self._assign(block, self._block, pending)
            copies = pending.pop(self._block, [])
            order = stream_rng(self.config.seed, _TAG_SHUFFLE, self.epoch, self.rank, self.worker,
                               self._block).permutation(len(copies))
            following: list[tuple[int, T]] = []
            for index in range(skip, len(order)):
                # Read the next block in step with the emission of this one, so the input never stalls.
                _take(source, math.ceil((index + 1) * size / len(order)) - len(following), following)
                if index + 1 == len(order):
                    self._block, self._emitted = self._block + 1, 0
                else:
                    self._emitted = index + 1
                yield copies[order[index]]
            if not order.size:
                self._block, self._emitted = self._block + 1, 0
            block, skip = _take(source, size - len(following), following), 0

    def _assign(self, block: list[tuple[int, T]], block_index: int,
                pending: dict[int, list[tuple[int, T]]]) -> None:
        """Add the copies of input block ``block_index``'s samples to the output blocks they are emitted with
        (those before the current output block were emitted already)."""
        if not block:
            return
        if self.balance is None:
            counts = np.ones(len(block), dtype=np.int64)
        else:
            rows = np.fromiter((row for row, _ in block), dtype=np.int64, count=len(block))
            counts = self.balance.counts(rows, self.config.seed, self.epoch)
        items = np.repeat(np.arange(len(block)), counts)
        copy = np.arange(items.size) - np.repeat(np.cumsum(counts) - counts, counts)  # j of each copy
        targets = block_index + copy * self.config.copy_spread // counts[items]
        for target in np.unique(targets[targets >= self._block]).tolist():
            pending.setdefault(target, []).extend(block[i] for i in items[targets == target].tolist())


def _label_counts(labels: np.ndarray, block_rows: int = 1 << 16) -> np.ndarray:
    """(max label + 1,) int64 rows per non-negative label, a block at a time: the labelled rows' copy and its
    int64 copy in ``np.bincount`` would be 12 bytes a row (1.1 GB at 96M rows) in every process that builds it."""
    sizes = np.zeros(0, dtype=np.int64)
    for start in range(0, labels.shape[0], block_rows):
        block = np.asarray(labels[start:start + block_rows])
        counts = np.bincount(block[block >= 0])
        if counts.size > sizes.size:
            sizes = np.concatenate([sizes, np.zeros(counts.size - sizes.size, dtype=np.int64)])
        sizes[:counts.size] += counts
    return sizes


def _take(source: Iterator[T], count: int, into: list[T]) -> list[T]:
    """Append up to ``count`` more items of ``source`` to ``into`` (fewer at its end); return ``into``."""
    for _ in range(max(count, 0)):
        try:
            into.append(next(source))
        except StopIteration:
            break
    return into
