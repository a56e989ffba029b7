"""Nearest-centroid assignment and float64 sums."""

from __future__ import annotations

import numpy as np
import pytest

from indexes import assign as assign_module
from indexes.assign import Assigner, ClusterSums, assign_source, block_rows, rows_per_task
from indexes.data import ArrayDataset


def _assert_matches_brute_force(rows, centroids, labels, sqdist, atol: float = 1e-3) -> None:
    """Labels equal the float64 brute-force argmin wherever the two nearest centroids are not near-tied
    (those are > 95% of the rows), and distances match to float32 precision."""
    d2 = ((rows[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    nearest = np.sort(d2, axis=1)
    clear = (nearest[:, 1] - nearest[:, 0]) > 1e-3 * (1 + nearest[:, 0])
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(labels[clear], d2.argmin(1)[clear])
    np.testing.assert_allclose(sqdist, d2.min(1), rtol=1e-4, atol=atol)


@pytest.mark.parametrize("backend", ["blas", "torch", "faiss"])
def test_backends_match_brute_force(backend):
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((3000, 24)).astype(np.float32)
    centroids = rng.standard_normal((37, 24)).astype(np.float32)
    labels, sqdist = Assigner(centroids, backend=backend, num_threads=2).assign(rows)
    _assert_matches_brute_force(rows, centroids, labels, sqdist)


@pytest.mark.parametrize(
    ("num_clusters", "task_rows"),
    [(300, None), (600, 512)],  # dense (k, d) partials over 4-block tasks; sparse (unique-label) partials
)
def test_sums_are_exact_float64_and_thread_count_does_not_matter(monkeypatch, num_clusters, task_rows):
    if task_rows is not None:
        monkeypatch.setattr(assign_module, "_TASK_ROWS", task_rows)
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((5000, 8)).astype(np.float32)
    centroids = rows[:num_clusters].copy()
    results = []
    for threads in (1, 2):
        sums = ClusterSums.zeros(num_clusters, 8)
        assigner = Assigner(centroids, backend="blas", num_threads=threads)
        assert (num_clusters > assigner.rows_per_task) == (task_rows is not None)
        labels, sqdist = assigner.assign(rows, sums)
        results.append((labels, sqdist, sums))
    (labels, sqdist, sums), (labels2, sqdist2, sums2) = results
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_array_equal(sqdist, sqdist2)
    np.testing.assert_array_equal(sums.sums, sums2.sums)
    assert sums.objective == sums2.objective == float(sqdist.sum(dtype=np.float64))
    expected = np.zeros((num_clusters, 8))
    np.add.at(expected, labels, rows.astype(np.float64))
    np.testing.assert_allclose(sums.sums, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(sums.counts, np.bincount(labels, minlength=num_clusters))
    _assert_matches_brute_force(rows, centroids, labels, sqdist, atol=1e-4)


def test_sums_accumulate_over_calls():
    rng = np.random.default_rng(5)
    rows = rng.standard_normal((3000, 6)).astype(np.float32)
    assigner = Assigner(rng.standard_normal((20, 6)).astype(np.float32), backend="blas", num_threads=2)
    whole, halves = ClusterSums.zeros(20, 6), ClusterSums.zeros(20, 6)
    assigner.assign(rows, whole)
    assigner.assign(rows[:1000], halves)
    assigner.assign(rows[1000:], halves)
    np.testing.assert_allclose(halves.sums, whole.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(halves.counts, whole.counts)
    assert halves.objective == pytest.approx(whole.objective, rel=1e-12)


def test_scratch_buffers_are_shared_safely_between_assigners():
    """Per-thread scratch is reused across assigners: different k and d (same padded width) in turn."""
    rng = np.random.default_rng(6)
    for dim, num_clusters in [(127, 40), (126, 3), (127, 300), (8, 40)]:
        rows = rng.standard_normal((700, dim)).astype(np.float32)
        centroids = rng.standard_normal((num_clusters, dim)).astype(np.float32)
        labels, sqdist = Assigner(centroids, backend="blas", num_threads=1).assign(rows)
        _assert_matches_brute_force(rows, centroids, labels, sqdist)


def test_dense_partial_sums_for_small_k():
    rng = np.random.default_rng(2)
    rows = rng.standard_normal((10000, 4)).astype(np.float32)
    centroids = rng.standard_normal((3, 4)).astype(np.float32)
    sums = ClusterSums.zeros(3, 4)
    labels, _ = Assigner(centroids, backend="blas", num_threads=2).assign(rows, sums)
    for c in range(3):
        np.testing.assert_allclose(sums.sums[c], rows[labels == c].astype(np.float64).sum(0), rtol=1e-10)


def test_centroid_tiles_give_the_same_answer_as_one_tile(monkeypatch):
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((500, 6)).astype(np.float32)
    centroids = rng.standard_normal((100, 6)).astype(np.float32)
    whole = Assigner(centroids, backend="blas").assign(rows)
    monkeypatch.setattr(assign_module, "_CENTROID_TILE", 16)  # 7 tiles, the last one partial
    tiled = Assigner(centroids, backend="blas").assign(rows)
    np.testing.assert_array_equal(tiled[0], whole[0])
    np.testing.assert_allclose(tiled[1], whole[1], rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lowest_cluster_id():
    centroids = np.array([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)
    labels, _ = Assigner(centroids, backend="blas").assign(np.array([[2.0, 0.0], [-3.0, 0.0]], dtype=np.float32))
    np.testing.assert_array_equal(labels, [0, 2])


def test_assign_source_streams_blocks():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((1000, 5)).astype(np.float32)
    centroids = rng.standard_normal((9, 5)).astype(np.float32)
    seen = []
    labels, sqdist = assign_source(ArrayDataset(rows, block_rows=128), centroids, progress=seen.append)
    expected, _ = Assigner(centroids).assign(rows)
    assert labels.dtype == np.int32 and sum(seen) == 1000
    np.testing.assert_array_equal(labels, expected)


def test_rows_per_task_depends_on_k_only():
    assert [block_rows(k) for k in (4, 256, 1024, 100_000)] == [4096, 2048, 512, 512]
    assert [rows_per_task(k) for k in (4, 256, 1024, 100_000)] == [4096, 4096, 4096, 4096]
    with pytest.raises(ValueError, match="backend"):
        Assigner(np.zeros((2, 2), dtype=np.float32), backend="gpu")
    with pytest.raises(ValueError, match="columns"):
        Assigner(np.zeros((2, 2), dtype=np.float32)).assign(np.zeros((3, 5), dtype=np.float32))
