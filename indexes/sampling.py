"""Training samples and initial centroids chosen by "smallest row keys first".

Every row has a pseudo-random key (:func:`indexes.data.row_keys`, a function of its global index and a
seed). The training sample of a group of rows is its ``n`` rows with the smallest keys, and the initial
centroids are its ``k`` rows with the smallest keys (taken in row order). Both are uniform random draws
without replacement, and both come out the same whatever the storage, the block size or the number of
ranks, which is what makes out-of-core, in-memory and distributed runs agree.

:func:`smallest_key_sample` draws the samples of every row of a process block by block, holding the kept
rows and at most twice the wanted number of candidate keys per group, never a key or an index per row.
"""

from __future__ import annotations

import logging

import numpy as np

from indexes.data import block_bincount, row_keys
from indexes.distributed import Reducer, kth_smallest

logger = logging.getLogger(__name__)


SAMPLE_BLOCK_ROWS = 1 << 18
"""Rows whose keys :func:`smallest_key_sample` computes at once (about 40 bytes a row of temporaries: 10 MB)."""


def group_sizes(labels: np.ndarray | None, num_rows: int, num_groups: int) -> np.ndarray:
    """(num_groups,) int64 local rows of each group, with the checks of :func:`group_members`."""
    if labels is None:
        return np.array([num_rows], dtype=np.int64)
    labels = _checked_labels(labels, num_rows, num_groups)
    return block_bincount(labels, num_groups)


def _checked_labels(labels: np.ndarray, num_rows: int, num_groups: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (num_rows,):
        raise ValueError(f"labels of shape {labels.shape} must have one entry per row ({num_rows})")
    if labels.size and (labels.min() < 0 or labels.max() >= num_groups):
        raise ValueError(f"labels must lie in [0, {num_groups})")
    return labels


def group_members(labels: np.ndarray | None, num_rows: int, num_groups: int) -> list[np.ndarray]:
    """Local row indices of each group, each in increasing order.

    Args:
        labels: group id of every local row, or ``None`` for a single group of all rows.
        num_rows: number of local rows.
        num_groups: number of groups (ids are ``0 .. num_groups - 1``).
    """
    if labels is None:
        return [np.arange(num_rows, dtype=np.int64)]
    labels = _checked_labels(labels, num_rows, num_groups)
    order = np.argsort(labels, kind="stable")  # stable: indices stay increasing within a group
    bounds = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_groups))])
    return [order[bounds[g] : bounds[g + 1]].astype(np.int64) for g in range(num_groups)]


def smallest_key_rows(
    members: list[np.ndarray],
    wanted: np.ndarray,
    *,
    row_offset: int,
    seed: int,
    reducer: Reducer,
) -> list[np.ndarray]:
    """Per group, the local rows among the group's ``wanted[g]`` rows of smallest key over all ranks.

    Args:
        members: per group, its local row indices (increasing).
        wanted: per group, how many rows to keep globally; a group with fewer rows keeps them all.
        row_offset: global index of local row 0.
        seed: key seed (:func:`indexes.data.row_keys`).
        reducer: the ranks sharing the groups.

    Returns:
        Per group, the kept local row indices in increasing order.
    """
    wanted = np.asarray(wanted, dtype=np.int64)
    sizes = reducer.all_reduce_sum(np.array([m.size for m in members], dtype=np.int64))
    cut = np.flatnonzero(wanted < sizes)
    if cut.size == 0:
        return list(members)
    keys = {g: row_keys(row_offset + members[g], seed) for g in cut}
    sorted_keys = [np.sort(keys[g]) for g in cut]
    thresholds = kth_smallest(sorted_keys, np.maximum(wanted[cut], 1), reducer)
    kept = list(members)
    for g, threshold in zip(cut, thresholds):
        kept[g] = members[g][keys[g] <= threshold] if wanted[g] > 0 else members[g][:0]
    return kept


def smallest_key_sample(
    labels: np.ndarray | None,
    num_rows: int,
    wanted: np.ndarray,
    *,
    row_offset: int,
    seed: int,
    reducer: Reducer,
    block_rows: int = SAMPLE_BLOCK_ROWS,
) -> list[np.ndarray]:
    """:func:`smallest_key_rows` of every local row, grouped by ``labels``, read ``block_rows`` rows at a time.

    The same rows as ``smallest_key_rows(group_members(labels, num_rows, len(wanted)), wanted, ...)``, in two
    passes over blocks of row indices: the first keeps each cut group's smallest local keys (at most twice
    its ``wanted`` between reductions; the ``wanted`` smallest of every rank hold the global threshold), the
    second the rows at or below the threshold. Memory: the kept rows, the candidate keys and one block, not
    the 8 bytes a row of member indices and keys (800 MB each at 96M rows) of the unstreamed form.

    Args:
        labels: group of every local row, or ``None`` for a single group of all rows.
        num_rows: number of local rows.
        wanted: per group, how many rows to keep globally; a group with fewer rows keeps them all.
        row_offset: global index of local row 0.
        seed: key seed (:func:`indexes.data.row_keys`).
        reducer: the ranks sharing the groups.
        block_rows: rows whose keys are computed at once.

    Returns:
        Per group, the kept local row indices (int64) in increasing order.
    """
    wanted = np.asarray(wanted, dtype=np.int64)
    sizes = reducer.all_reduce_sum(group_sizes(labels, num_rows, len(wanted)))
    cut = wanted < sizes
    thresholds = np.zeros(len(wanted), dtype=np.uint64)
    if cut.any():
        candidates = _smallest_local_keys(labels, num_rows, wanted, cut, row_offset, seed, block_rows)
        groups = np.flatnonzero(cut)
        thresholds[groups] = kth_smallest([np.sort(candidates[g]) for g in groups],
                                          np.maximum(wanted[groups], 1), reducer)
    kept: list[list[np.ndarray]] = [[] for _ in wanted]
    for start, members, keys in _key_blocks(labels, num_rows, len(wanted), row_offset, seed,
                                                           block_rows, cut):
        for g, rows in enumerate(members):
            if rows.size and not cut[g]:
                kept[g].append(start + rows)
            elif rows.size and wanted[g] > 0:
                kept[g].append(start + rows[keys[g] <= thresholds[g]])
    return [np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64) for parts in kept]


def _key_blocks(labels, num_rows, num_groups, row_offset, seed, block_rows, cut):
    """Per block of rows: its start, its groups' local members (block-relative) and, for the cut groups, their
    keys."""
    for start in range(0, num_rows, block_rows):
        stop = min(start + block_rows, num_rows)
        block_labels = None if labels is None else np.asarray(labels[start:stop])
        members = group_members(block_labels, stop - start, num_groups)
        keys = {g: row_keys(row_offset + start + members[g], seed) for g in np.flatnonzero(cut)}
        yield start, members, keys


def _smallest_local_keys(labels, num_rows, wanted, cut, row_offset, seed, block_rows) -> dict[int, np.ndarray]:
    """Per cut group, its ``wanted`` smallest local keys (all of them when it has fewer here)."""
    pending: dict[int, list[np.ndarray]] = {int(g): [] for g in np.flatnonzero(cut)}
    held = dict.fromkeys(pending, 0)
    for _, _, keys in _key_blocks(labels, num_rows, len(wanted), row_offset, seed, block_rows, cut):
        for g, block_keys in keys.items():
            pending[g].append(block_keys)
            held[g] += block_keys.size
            if held[g] > 2 * max(wanted[g], 1):
                pending[g] = [_smallest(np.concatenate(pending[g]), wanted[g])]
                held[g] = pending[g][0].size
    return {g: _smallest(np.concatenate(parts) if parts else np.zeros(0, np.uint64), wanted[g])
            for g, parts in pending.items()}


def _smallest(keys: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` smallest of distinct ``keys`` (unsorted), or all of them (at least one when ``count`` is 0)."""
    count = max(int(count), 1)
    return keys if keys.size <= count else np.partition(keys, count - 1)[:count]


def gather_rows(rows: np.ndarray, reducer: Reducer) -> np.ndarray:
    """Concatenate every rank's ``rows`` in rank order, on every rank.

    Used once per group for the initial centroids (``k x d`` values), never per iteration.
    """
    counts = np.zeros(reducer.world_size, dtype=np.int64)
    counts[reducer.rank] = rows.shape[0]
    counts = reducer.all_reduce_sum(counts)
    if reducer.world_size == 1:
        return np.ascontiguousarray(rows, dtype=np.float32)
    start = int(counts[: reducer.rank].sum())
    buffer = np.zeros((int(counts.sum()), rows.shape[1]), dtype=np.float32)
    buffer[start : start + rows.shape[0]] = rows  # zeros elsewhere: the sum is exact
    return reducer.all_reduce_sum(buffer)
