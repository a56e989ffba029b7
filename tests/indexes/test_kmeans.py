"""Flat k-means: re-seeding of empty clusters, determinism, sampling, out-of-core equals in-memory."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from indexes.assign import Assigner
from indexes.data import ArrayDataset
from indexes.kmeans import KMeansConfig, LloydConfig, assign_groups, fit_kmeans, update_centroids


def _zarr_array(tmp_path, rows: np.ndarray, chunk_rows: int):
    zarr = pytest.importorskip("zarr")
    array = zarr.create_array(
        store=str(tmp_path / "features.zarr"), shape=rows.shape, chunks=(chunk_rows, rows.shape[1]), dtype=rows.dtype
    )
    array[:] = rows
    return array


def test_update_splits_an_empty_cluster_symmetrically():
    sums = np.array([[4.0, 8.0], [0.0, 0.0], [30.0, 30.0]])
    counts = np.array([4, 0, 10])
    previous = np.full((3, 2), 7.0, dtype=np.float32)
    eps = 1 / 1024
    centroids, splits = update_centroids(sums, counts, previous, rng=np.random.default_rng(0), split_eps=eps)
    assert splits == 1
    # cluster 2 (10 rows) or cluster 0 (4 rows) was split; either way the pair straddles its mean
    donor = 2 if np.allclose(centroids[0], [1.0, 2.0]) else 0
    mean = sums[donor] / counts[donor]
    np.testing.assert_allclose(centroids[1], mean * [1 + eps, 1 - eps], rtol=1e-6)
    np.testing.assert_allclose(centroids[donor], mean * [1 - eps, 1 + eps], rtol=1e-6)
    np.testing.assert_allclose((centroids[1] + centroids[donor]) / 2, mean, rtol=1e-6)
    again, _ = update_centroids(sums, counts, previous, rng=np.random.default_rng(0), split_eps=eps)
    np.testing.assert_array_equal(again, centroids)


def test_update_chooses_donors_in_proportion_to_size():
    sums = np.array([[1.0], [0.0], [1.0]])
    counts = np.array([2, 0, 31])  # weights (count - 1): 1 and 30
    rng = np.random.default_rng(0)
    picks = []
    for _ in range(600):
        centroids, _ = update_centroids(sums * counts[:, None], counts, np.zeros((3, 1), np.float32),
                                        rng=rng, split_eps=0.5)
        picks.append(0 if centroids[0, 0] != 1.0 else 2)
    assert 0.005 < np.mean(np.array(picks) == 0) < 0.08  # expected 1/31


def test_update_keeps_previous_centroid_when_nothing_can_be_split():
    previous = np.array([[1.0, 1.0], [2.0, 2.0]], dtype=np.float32)
    centroids, splits = update_centroids(np.array([[5.0, 5.0], [0, 0]]), np.array([1, 0]), previous,
                                         rng=np.random.default_rng(0), split_eps=0.1)
    assert splits == 0
    np.testing.assert_array_equal(centroids, [[5.0, 5.0], [2.0, 2.0]])


def _duplicates_and_blob() -> np.ndarray:
    """60% identical rows: the initial centroids hold duplicates, which leaves clusters empty."""
    rng = np.random.default_rng(0)
    same = np.full((1200, 8), 5.0, dtype=np.float32)
    return np.concatenate([same, rng.standard_normal((800, 8)).astype(np.float32)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_empty_clusters_are_reseeded_and_logged(seed, caplog):
    with caplog.at_level(logging.INFO, logger="indexes.kmeans"):
        result = fit_kmeans(ArrayDataset(_duplicates_and_blob()), KMeansConfig(num_clusters=6, seed=seed))
    assert result.empty_splits[0, 0] >= 1
    assert any("empty clusters split" in message for message in caplog.messages)
    assert result.sizes.min() > 0, "every empty cluster ends up with rows"
    assert result.size_range_history[0, 0, 0] == 0  # the first assignment left a cluster empty
    assert result.size_range_history.shape == (1, 10, 2)
    assert result.sizes.sum() == 2000
    assert result.to_dict()["total_empty_splits"] == int(result.empty_splits.sum())


def test_same_seed_same_result_other_seed_other_result(blobs):
    rows = blobs(3000, 12, centers=30)
    config = KMeansConfig(num_clusters=25, seed=11, max_points_per_centroid=40)
    first, second = fit_kmeans(ArrayDataset(rows), config), fit_kmeans(ArrayDataset(rows), config)
    np.testing.assert_array_equal(first.assignments, second.assignments)
    np.testing.assert_array_equal(first.centroids, second.centroids)
    np.testing.assert_array_equal(first.objective_history, second.objective_history)
    other = fit_kmeans(ArrayDataset(rows), KMeansConfig(num_clusters=25, seed=12, max_points_per_centroid=40))
    assert not np.array_equal(other.centroids, first.centroids)


def test_result_is_a_lloyd_fixed_point_of_its_centroids(blobs):
    rows = blobs(4000, 10, centers=8, spread=6.0)
    result = fit_kmeans(ArrayDataset(rows, block_rows=700), KMeansConfig(num_clusters=8, seed=0, num_iterations=15))
    labels, sqdist = Assigner(result.centroids).assign(rows)
    np.testing.assert_array_equal(result.assignments, labels)
    assert result.objective == pytest.approx(float(sqdist.sum(dtype=np.float64)), rel=1e-6)
    np.testing.assert_array_equal(result.sizes, np.bincount(labels, minlength=8))
    history = result.objective_history[0]
    assert np.all(np.diff(history) <= 1e-6 * history[0]), "Lloyd's objective never increases without splits"
    assert result.assignments.dtype == np.int32 and result.centroids.dtype == np.float32
    json.dumps(result.to_dict())


def test_sample_size_is_k_times_points_per_centroid(blobs):
    rows = blobs(5000, 8)
    result = fit_kmeans(ArrayDataset(rows), KMeansConfig(num_clusters=10, seed=0, max_points_per_centroid=30))
    assert result.num_train_rows.tolist() == [300]
    assert result.assignments.shape == (5000,) and result.sizes.sum() == 5000  # every row assigned
    full = fit_kmeans(ArrayDataset(rows), KMeansConfig(num_clusters=10, seed=0))
    assert full.num_train_rows.tolist() == [5000]


def test_out_of_core_equals_in_memory_for_the_same_sample(tmp_path, blobs):
    rows = blobs(6000, 16, centers=20)
    on_disk = _zarr_array(tmp_path, rows.astype(np.float16), chunk_rows=512)
    config = KMeansConfig(num_clusters=16, seed=4, max_points_per_centroid=50)
    in_memory = fit_kmeans(ArrayDataset(rows.astype(np.float16)), config)
    streamed = fit_kmeans(ArrayDataset(on_disk, block_rows=1024), config)
    np.testing.assert_array_equal(streamed.centroids, in_memory.centroids)
    np.testing.assert_array_equal(streamed.assignments, in_memory.assignments)
    assert streamed.objective == pytest.approx(in_memory.objective, rel=1e-6)


def test_streamed_assignment_equals_reused_training_assignment(blobs):
    rows = blobs(3000, 8)
    config = KMeansConfig(num_clusters=12, seed=2)  # no sampling: the training assignment is reused
    result = fit_kmeans(ArrayDataset(rows), config)
    streamed, objective = assign_groups(ArrayDataset(rows, block_rows=250), None, [result.centroids], config)
    np.testing.assert_array_equal(streamed, result.assignments)
    assert objective == pytest.approx(result.objective, rel=1e-6)


def test_more_clusters_than_rows_is_refused():
    with pytest.raises(ValueError, match="fewer than its 20 clusters"):
        fit_kmeans(ArrayDataset(np.zeros((10, 2), dtype=np.float32)), KMeansConfig(num_clusters=20))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_clusters": 0}, "num_clusters=0"),
        ({"num_clusters": 2, "num_iterations": 0}, "num_iterations=0"),
        ({"num_clusters": 2, "max_points_per_centroid": 0}, "max_points_per_centroid=0"),
        ({"num_clusters": 2, "split_eps": 1.5}, "split_eps=1.5"),
        ({"num_clusters": 2, "backend": "tpu"}, "backend='tpu'"),
    ],
)
def test_config_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KMeansConfig(**kwargs)
    assert isinstance(KMeansConfig(num_clusters=2), LloydConfig)
