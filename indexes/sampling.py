"""Training samples and initial centroids chosen by "smallest row keys first".

Every row has a pseudo-random key (:func:`indexes.data.row_keys`, a function of its global index and a
seed). The training sample of a group of rows is its ``n`` rows with the smallest keys, and the initial
centroids are its ``k`` rows with the smallest keys (taken in row order). Both are uniform random draws
without replacement, and both come out the same whatever the storage, the block size or the number of
ranks, which is what makes out-of-core, in-memory and distributed runs agree.
"""

from __future__ import annotations

import logging

import numpy as np

from indexes.data import row_keys
from indexes.distributed import Reducer, kth_smallest

logger = logging.getLogger(__name__)


def group_members(labels: np.ndarray | None, num_rows: int, num_groups: int) -> list[np.ndarray]:
    """Local row indices of each group, each in increasing order.

    Args:
        labels: group id of every local row, or ``None`` for a single group of all rows.
        num_rows: number of local rows.
        num_groups: number of groups (ids are ``0 .. num_groups - 1``).
    """
    if labels is None:
        return [np.arange(num_rows, dtype=np.int64)]
    labels = np.asarray(labels)
    if labels.shape != (num_rows,):
        raise ValueError(f"labels of shape {labels.shape} must have one entry per row ({num_rows})")
    if labels.size and (labels.min() < 0 or labels.max() >= num_groups):
        raise ValueError(f"labels must lie in [0, {num_groups})")
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
