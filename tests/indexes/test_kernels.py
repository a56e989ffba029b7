"""The numba kernels against numpy references (same additions in the same order: the same bits)."""

from __future__ import annotations

import numpy as np
import pytest

kernels = pytest.importorskip("indexes.kernels")


def reference_sums(rows: np.ndarray, labels: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 sums and counts of rows per label, added one row at a time in row order (unbuffered)."""
    sums = np.zeros((num_clusters, rows.shape[1]))
    np.add.at(sums, labels, rows.astype(np.float64))
    return sums, np.bincount(labels, minlength=num_clusters).astype(np.int64)


def test_accumulate_rows_equals_the_row_order_float64_sums():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((1000, 24)) * 1e3).astype(np.float32)
    labels = rng.integers(0, 7, 1000)
    sums, counts = np.full((7, 24), 0.5), np.full(7, 2, dtype=np.int64)  # added to, not overwritten
    kernels.accumulate_rows(rows, labels, sums, counts)
    expected_sums, expected_counts = reference_sums(rows, labels, 7)
    assert np.array_equal(sums - 0.5, expected_sums) and np.array_equal(counts - 2, expected_counts)


@pytest.mark.parametrize("tile", [True, False])
def test_finish_block_distances_and_sums(tile):
    """sqdist = max(||x||^2 + (||c||^2 - 2 x.c), 0) of the nearest centroid, read from the score tile or from
    ``best``; the sums of each row into its cluster, or none with empty sums."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((300, 16)).astype(np.float32)
    centroids = rng.standard_normal((5, 16)).astype(np.float32)
    rows[0] = centroids[2]  # at a centroid: rounding may go below 0, which must read 0
    scores = ((centroids ** 2).sum(1)[None, :] - 2 * rows @ centroids.T).astype(np.float32)
    labels = scores.argmin(1).astype(np.int64)
    best = scores.min(1)
    sqdist = np.full(300, -1, dtype=np.float32)
    sums, counts = np.zeros((5, 16)), np.zeros(5, dtype=np.int64)
    tile_scores = scores if tile else np.zeros((0, 5), np.float32)
    kernels.finish_block(rows, tile_scores, labels, best, sqdist, sums, counts)
    exact = ((rows.astype(np.float64) - centroids[labels]) ** 2).sum(1)
    assert (sqdist >= 0).all() and np.allclose(sqdist, exact, rtol=1e-4, atol=1e-4) and labels[0] == 2
    expected_sums, expected_counts = reference_sums(rows, labels, 5)
    assert np.array_equal(sums, expected_sums) and np.array_equal(counts, expected_counts)
    untouched = np.zeros(5, dtype=np.int64)
    kernels.finish_block(rows, tile_scores, labels, best, sqdist, np.zeros((0, 16)), untouched)
    assert not untouched.any()
    negative = np.full(1, -1.0, dtype=np.float32)  # a score below -||x||^2 (rounding): the distance is 0
    kernels.finish_block(rows[:1], np.zeros((0, 5), np.float32), labels[:1], np.array([-1e3], np.float32),
                         negative, np.zeros((0, 16)), untouched)
    assert negative[0] == 0.0
