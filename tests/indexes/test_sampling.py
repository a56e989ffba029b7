"""Smallest-key sampling against brute force, on one rank and on several in-process ranks."""

from __future__ import annotations

import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from indexes.data import row_keys
from indexes.distributed import LocalReducer
from indexes.sampling import gather_rows, group_members, group_sizes, smallest_key_rows, smallest_key_sample


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


@pytest.mark.parametrize("block_rows", [1, 7, 64, 1 << 20])
def test_streamed_sample_is_the_sample_of_the_members(block_rows):
    """Block by block (blocks smaller than a group's sample, a row each, or the whole): the same rows."""
    labels = np.random.default_rng(5).integers(0, 4, 500)
    wanted = np.array([10, 0, 1000, 37])
    kept = smallest_key_sample(labels, 500, wanted, row_offset=3, seed=9, reducer=LocalReducer(),
                               block_rows=block_rows)
    expected = smallest_key_rows(group_members(labels, 500, 4), wanted, row_offset=3, seed=9,
                                 reducer=LocalReducer())
    assert [k.tolist() for k in kept] == [e.tolist() for e in expected] and all(k.dtype == np.int64 for k in kept)
    alone = smallest_key_sample(None, 300, np.array([20]), row_offset=0, seed=1, reducer=LocalReducer(),
                                block_rows=block_rows)
    assert alone[0].tolist() == brute_force(np.zeros(300, np.int64), np.array([20]), seed=1)[0].tolist()
    assert group_sizes(labels, 500, 5).tolist() == np.bincount(labels, minlength=5).tolist()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        group_sizes(labels, 500, 3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_streamed_sample_over_ranks_is_the_one_process_sample(world_size):
    labels = np.random.default_rng(6).integers(0, 3, 401)
    wanted = np.array([25, 3, 90])
    bounds = np.linspace(0, labels.size, world_size + 1).astype(int)

    def work(rank, reducer):
        start, stop = bounds[rank], bounds[rank + 1]
        return [start + rows for rows in smallest_key_sample(labels[start:stop], stop - start, wanted,
                                                             row_offset=start, seed=4, reducer=reducer,
                                                             block_rows=16)]

    per_rank = ThreadRanks(world_size).run(work)
    for group, expected in enumerate(brute_force(labels, wanted, seed=4)):
        assert np.array_equal(np.concatenate([kept[group] for kept in per_rank]), expected)


def test_streamed_sample_holds_no_key_or_index_per_row():
    """A sample of 1,000 rows out of 2M: the peak of Python-visible memory is a block's temporaries, not 16
    bytes a row or more of member indices and keys."""
    rows, block = 2_000_000, 1 << 16
    tracemalloc.start()
    try:
        kept = smallest_key_sample(None, rows, np.array([1000]), row_offset=0, seed=2, reducer=LocalReducer(),
                                   block_rows=block)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert kept[0].size == 1000
    assert peak < 4 * rows, f"{peak / rows:.1f} bytes a row"  # a block's temporaries (4 MB), not 8 bytes a row


def test_gather_rows_concatenates_in_rank_order():
    parts = [np.full((count, 3), rank, dtype=np.float32) for rank, count in enumerate([2, 0, 3])]
    gathered = ThreadRanks(3).run(lambda rank, reducer: gather_rows(parts[rank], reducer))
    for copy in gathered:
        assert np.array_equal(copy, np.concatenate(parts))
    alone = gather_rows(np.arange(6, dtype=np.float64).reshape(2, 3), LocalReducer())
    assert alone.dtype == np.float32 and alone.flags.c_contiguous and alone.tolist() == [[0, 1, 2], [3, 4, 5]]
