"""Hierarchical k-means: ids consistent with parents, balanced splits, out-of-core equals in-memory."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexes.assign import Assigner
from indexes.data import ArrayDataset
from indexes.hierarchical import HierarchicalKMeansConfig, children_per_parent, fit_hierarchical_kmeans


def _check_consistent(result, num_rows):
    for upper, lower in zip(result.levels[:-1], result.levels[1:]):
        np.testing.assert_array_equal(lower.parents[lower.assignments], upper.assignments)
        assert len(lower.group_offsets) - 1 == upper.num_clusters
        # a cluster's size is the sum of its children's sizes
        np.testing.assert_array_equal(np.bincount(lower.parents, weights=lower.sizes, minlength=upper.num_clusters),
                                      upper.sizes)
    for level in result.levels:
        assert level.assignments.dtype == np.int32 and level.assignments.shape == (num_rows,)
        assert level.sizes.sum() == num_rows


def test_three_levels_ids_consistent_with_parents(blobs):
    rows = blobs(4000, 12, centers=40)
    result = fit_hierarchical_kmeans(ArrayDataset(rows, block_rows=900),
                                     HierarchicalKMeansConfig(levels=(3, 4, 5), seed=1, max_points_per_centroid=64))
    assert [lv.num_clusters for lv in result.levels] == [3, 12, 60]
    _check_consistent(result, 4000)
    np.testing.assert_array_equal(result.levels[2].group_offsets, np.arange(0, 61, 5))
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["config"]["levels"] == [3, 4, 5]
    assert set(result.arrays()) >= {"level0/assignments", "level2/parents", "level1/centroids"}


def test_each_row_goes_to_the_nearest_child_of_its_parent(blobs):
    rows = blobs(3000, 8, centers=20)
    result = fit_hierarchical_kmeans(ArrayDataset(rows), HierarchicalKMeansConfig(levels=(4, 6), seed=0))
    top, leaf = result.levels
    for parent in range(4):
        members = np.flatnonzero(top.assignments == parent)
        children = slice(leaf.group_offsets[parent], leaf.group_offsets[parent + 1])
        labels, _ = Assigner(leaf.centroids[children]).assign(rows[members])
        np.testing.assert_array_equal(leaf.assignments[members], labels + leaf.group_offsets[parent])


def test_balanced_gives_children_in_proportion_to_size():
    counts = children_per_parent(np.array([600, 300, 100, 0]), 10, balanced=True)
    assert counts.sum() == 40 and counts[3] == 0
    np.testing.assert_array_equal(counts, [24, 12, 4, 0])
    np.testing.assert_array_equal(children_per_parent(np.array([5, 50]), 10, balanced=False), [5, 10])
    # rounding by largest remainders still sums to k * parents; tiny parents get at least one child
    counts = children_per_parent(np.array([1000, 1000, 3]), 5, balanced=True)
    assert counts.sum() == 15 and counts.min() >= 1


def test_balanced_hierarchy_follows_parent_sizes(blobs):
    rows = blobs(5000, 8, centers=25)
    result = fit_hierarchical_kmeans(ArrayDataset(rows),
                                     HierarchicalKMeansConfig(levels=(3, 10), balanced=True, seed=2))
    top, leaf = result.levels
    children = np.diff(leaf.group_offsets)
    assert children.sum() == 30
    np.testing.assert_array_equal(children, children_per_parent(top.sizes, 10, balanced=True))
    _check_consistent(result, 5000)


def test_hierarchy_out_of_core_equals_in_memory(tmp_path, blobs):
    zarr = pytest.importorskip("zarr")
    rows = blobs(5000, 16, centers=30)
    on_disk = zarr.create_array(store=str(tmp_path / "f.zarr"), shape=rows.shape, chunks=(400, 16), dtype="float32")
    on_disk[:] = rows
    config = HierarchicalKMeansConfig(levels=(4, 8), seed=9, max_points_per_centroid=32)
    in_memory = fit_hierarchical_kmeans(ArrayDataset(rows), config)
    streamed = fit_hierarchical_kmeans(ArrayDataset(on_disk, block_rows=800), config)
    for a, b in zip(in_memory.levels, streamed.levels):
        np.testing.assert_array_equal(a.assignments, b.assignments)
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.num_train_rows, b.num_train_rows)


@pytest.mark.parametrize("per_centroid", [None, 20])
def test_progress_counts_every_row_once_per_level(per_centroid, blobs):
    seen = []
    config = HierarchicalKMeansConfig(levels=(2, 3), seed=0, max_points_per_centroid=per_centroid)
    fit_hierarchical_kmeans(ArrayDataset(blobs(1500, 4), block_rows=400), config, progress=seen.append)
    assert sum(seen) == 2 * 1500


def test_same_seed_same_hierarchy(blobs):
    rows = blobs(2000, 8)
    config = HierarchicalKMeansConfig(levels=(2, 5), seed=3, max_points_per_centroid=40)
    first = fit_hierarchical_kmeans(ArrayDataset(rows), config)
    second = fit_hierarchical_kmeans(ArrayDataset(rows, block_rows=333), config)
    np.testing.assert_array_equal(first.leaf_assignments, second.leaf_assignments)


def test_levels_are_validated():
    with pytest.raises(ValueError, match="levels"):
        HierarchicalKMeansConfig(levels=())
    with pytest.raises(ValueError, match="levels"):
        HierarchicalKMeansConfig(levels=(4, 0))


def test_memory_is_the_assignments_not_a_key_or_index_per_row():
    """2M rows, sampled training at both levels: beside the 4 bytes a row of assignments per level, only
    blocks' temporaries (Python-visible peak, tracemalloc). Drawing the samples from an index and a key per
    row held 40 bytes a row or more (4 GB at 96M rows)."""
    import tracemalloc

    rows = 2_000_000
    data = ArrayDataset(np.random.default_rng(0).standard_normal((rows, 2), dtype=np.float32), block_rows=1 << 16)
    config = HierarchicalKMeansConfig(levels=(2, 3), num_iterations=2, points_per_centroid=(1024,), num_threads=1)
    fit_hierarchical_kmeans(ArrayDataset(np.asarray(data.array[:10_000])), config)  # compiled kernels: not rows
    tracemalloc.start()
    try:
        result = fit_hierarchical_kmeans(data, config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [lv.assignments.dtype for lv in result.levels] == [np.int32, np.int32]
    assert peak < 14 * rows, f"{peak / rows:.1f} bytes a row"  # 8: the two levels' assignments; 11 measured
