"""Smallest-key sampling against brute force, on one rank and on several in-process ranks."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from indexes.data import row_keys
from indexes.distributed import LocalReducer
from indexes.sampling import gather_rows, group_members, smallest_key_rows


class ThreadRanks:
    """``world_size`` ranks as threads of this process, summing arrays through a barrier (the Reducer protocol
    without processes, so multi-rank logic is checked in milliseconds)."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self._slots: list[np.ndarray | None] = [None] * world_size
        self._barrier = threading.Barrier(world_size)

    def reducer(self, rank: int) -> "ThreadRanks._Reducer":
        return ThreadRanks._Reducer(self, rank)

    def run(self, work) -> list:
        """``work(rank, reducer)`` on every rank at once; the results in rank order."""
        with ThreadPoolExecutor(self.world_size) as pool:
            return list(pool.map(lambda rank: work(rank, self.reducer(rank)), range(self.world_size)))

    class _Reducer:
        def __init__(self, ranks: "ThreadRanks", rank: int) -> None:
            self._ranks, self.rank, self.world_size = ranks, rank, ranks.world_size

        def all_reduce_sum(self, array: np.ndarray) -> np.ndarray:
            ranks = self._ranks
            ranks._slots[self.rank] = np.asarray(array)
            ranks._barrier.wait()
            total = np.sum(np.stack(ranks._slots), axis=0).astype(np.asarray(array).dtype)
            ranks._barrier.wait()  # nobody overwrites a slot before every rank has summed
            return total

        def barrier(self) -> None:
            self._ranks._barrier.wait()


def brute_force(labels: np.ndarray, wanted: np.ndarray, seed: int) -> list[np.ndarray]:
    """Per group, its ``wanted[g]`` global rows of smallest key, in increasing order."""
    keys = row_keys(np.arange(labels.size), seed)
    kept = []
    for group, count in enumerate(wanted):
        rows = np.flatnonzero(labels == group)
        kept.append(np.sort(rows[np.argsort(keys[rows])[:count]]))
    return kept


def test_group_members_are_each_groups_rows_in_order():
    labels = np.random.default_rng(0).integers(0, 5, 200)
    members = group_members(labels, 200, 6)  # group 5 is empty
    assert len(members) == 6 and members[5].size == 0
    for group, rows in enumerate(members):
        assert np.array_equal(rows, np.flatnonzero(labels == group)) and rows.dtype == np.int64
    assert np.array_equal(group_members(None, 7, 1)[0], np.arange(7))
    with pytest.raises(ValueError, match="one entry per row"):
        group_members(labels[:5], 200, 6)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        group_members(labels, 200, 4)
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        group_members(labels - 1, 200, 6)


def test_one_rank_keeps_the_rows_of_smallest_key():
    labels = np.random.default_rng(1).integers(0, 4, 500)
    wanted = np.array([10, 0, 1000, 37])  # a normal cut, nothing, more than the group holds, another cut
    kept = smallest_key_rows(group_members(labels, 500, 4), wanted, row_offset=0, seed=9, reducer=LocalReducer())
    expected = brute_force(labels, wanted, seed=9)
    assert [k.tolist() for k in kept] == [e.tolist() for e in expected]
    assert kept[1].size == 0 and kept[2].size == np.count_nonzero(labels == 2)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_keep_together_what_one_process_keeps(world_size):
    """Uneven shards of the rows: the union of every rank's kept rows is the single-process sample."""
    labels = np.random.default_rng(2).integers(0, 3, 401)
    wanted = np.array([25, 3, 90])
    bounds = np.linspace(0, labels.size, world_size + 1).astype(int) + np.array([0] + [7] * (world_size - 1) + [0])

    def work(rank, reducer):
        start, stop = bounds[rank], bounds[rank + 1]
        members = group_members(labels[start:stop], stop - start, 3)
        return [start + rows for rows in smallest_key_rows(members, wanted, row_offset=start, seed=4,
                                                           reducer=reducer)]

    per_rank = ThreadRanks(world_size).run(work)
    for group, expected in enumerate(brute_force(labels, wanted, seed=4)):
        assert np.array_equal(np.concatenate([kept[group] for kept in per_rank]), expected)


def test_gather_rows_concatenates_in_rank_order():
    parts = [np.full((count, 3), rank, dtype=np.float32) for rank, count in enumerate([2, 0, 3])]
    gathered = ThreadRanks(3).run(lambda rank, reducer: gather_rows(parts[rank], reducer))
    for copy in gathered:
        assert np.array_equal(copy, np.concatenate(parts))
    alone = gather_rows(np.arange(6, dtype=np.float64).reshape(2, 3), LocalReducer())
    assert alone.dtype == np.float32 and alone.flags.c_contiguous and alone.tolist() == [[0, 1, 2], [3, 4, 5]]
