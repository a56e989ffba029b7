"""The data interface: blocks, gathers, shards, row keys and prefetching."""

from __future__ import annotations

import numpy as np
import pytest

from indexes.data import ArrayDataset, prefetched, row_keys, shard_bounds, stream_seed


class SliceOnly:
    """A chunked array stand-in: supports only .shape, .dtype and a[a:b] (like Zarr), and counts reads."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array
        self.shape = array.shape
        self.dtype = array.dtype
        self.reads = 0

    def __getitem__(self, item):
        assert isinstance(item, slice) and item.step is None, "only contiguous row slices are supported"
        self.reads += 1
        return self._array[item].copy()


def test_iter_blocks_cover_every_row_once_as_float32():
    array = np.arange(70, dtype=np.float16).reshape(35, 2)
    data = ArrayDataset(SliceOnly(array), block_rows=8)
    blocks = list(data.iter_blocks())
    assert [start for start, _ in blocks] == [0, 8, 16, 24, 32]
    joined = np.concatenate([rows for _, rows in blocks])
    assert joined.dtype == np.float32 and joined.flags.c_contiguous
    np.testing.assert_array_equal(joined, array.astype(np.float32))


@pytest.mark.parametrize("block_rows", [1, 7, 100])
def test_take_matches_fancy_indexing_for_chunked_and_numpy(block_rows):
    array = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    indices = np.array([0, 3, 4, 19, 20, 21, 49])
    chunked = SliceOnly(array)
    np.testing.assert_array_equal(ArrayDataset(chunked, block_rows=block_rows).take(indices), array[indices])
    np.testing.assert_array_equal(ArrayDataset(array, block_rows=block_rows).take(indices), array[indices])
    assert chunked.reads <= len(indices)  # one read per block that holds a wanted row


def test_take_rejects_unsorted_or_out_of_range_indices():
    data = ArrayDataset(np.zeros((10, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="increasing"):
        data.take(np.array([3, 1]))
    with pytest.raises(ValueError, match="increasing"):
        data.take(np.array([9, 10]))


def test_transform_is_applied_to_blocks_and_gathers():
    array = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    data = ArrayDataset(array, block_rows=6, transform=lambda x: x[:, :2] * 2, transform_dim=2)
    assert data.dim == 2
    np.testing.assert_allclose(np.concatenate([r for _, r in data.iter_blocks()]), array[:, :2] * 2)
    np.testing.assert_allclose(data.take(np.array([1, 5, 19])), array[[1, 5, 19], :2] * 2)


def test_shards_partition_the_rows_in_rank_order():
    bounds = [shard_bounds(11, rank, 3) for rank in range(3)]
    assert bounds == [(0, 4), (4, 8), (8, 11)]
    array = np.arange(22, dtype=np.float32).reshape(11, 2)
    shards = [ArrayDataset(array, block_rows=3).shard(rank, 3) for rank in range(3)]
    assert [s.row_offset for s in shards] == [0, 4, 8]
    rows = np.concatenate([np.concatenate([r for _, r in s.iter_blocks()]) for s in shards])
    np.testing.assert_array_equal(rows, array)
    with pytest.raises(ValueError, match="rank"):
        shard_bounds(10, 3, 3)


def test_row_keys_are_distinct_and_depend_on_seed_and_index_only():
    keys = row_keys(np.arange(100_000), seed=5)
    assert np.unique(keys).size == keys.size
    np.testing.assert_array_equal(row_keys(np.arange(500, 600), seed=5), keys[500:600])
    assert not np.array_equal(row_keys(np.arange(100), seed=6), keys[:100])
    # smallest keys look uniform over the rows: the 1000 smallest are spread over the whole range
    smallest = np.argsort(keys)[:1000]
    assert 40_000 < smallest.mean() < 60_000
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3) != stream_seed(1, 3, 2)


def test_prefetched_yields_in_order_and_reraises():
    assert list(prefetched(iter(range(10)), depth=2)) == list(range(10))

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(failing()))
    # abandoning the iterator early stops the producer
    stream = prefetched(iter(range(1000)))
    assert next(stream) == 0
    stream.close()
