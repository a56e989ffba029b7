"""Earlier neighbours (SemDeDup's rule): exact against brute force, earliest on ties, any block size."""

from __future__ import annotations

import numpy as np
import pytest

from indexes.dedup import earlier_neighbors


def _brute_force(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    neighbors, similarities = [-1], [np.nan]
    for i in range(1, len(unit)):
        scores = unit[:i] @ unit[i]
        neighbors.append(int(np.argmax(scores)))
        similarities.append(float(scores.max()))
    return np.array(neighbors), np.array(similarities)


@pytest.mark.parametrize("block_rows", [1, 7, 1024])
def test_matches_brute_force(block_rows):
    vectors = np.random.default_rng(0).normal(size=(150, 9)).astype(np.float32)
    neighbors, similarities = earlier_neighbors(vectors, block_rows=block_rows)
    expected, expected_sim = _brute_force(vectors.astype(np.float64))
    np.testing.assert_array_equal(neighbors, expected)
    np.testing.assert_allclose(similarities, expected_sim, atol=1e-5)
    assert neighbors[0] == -1 and np.isnan(similarities[0])


def test_an_exact_copy_points_to_the_earliest_original():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6, 4)).astype(np.float32)
    vectors[4] = vectors[1]
    vectors[5] = vectors[1] * 3  # same direction, other norm
    neighbors, similarities = earlier_neighbors(vectors, block_rows=2)
    assert neighbors[4] == 1 and neighbors[5] == 1  # row 4 is as similar, but row 1 comes first
    np.testing.assert_allclose(similarities[[4, 5]], 1.0, atol=1e-6)


def test_empty_and_single_row():
    for n in (0, 1):
        neighbors, similarities = earlier_neighbors(np.ones((n, 3), np.float32))
        assert neighbors.tolist() == [-1] * n and np.isnan(similarities).all()
    with pytest.raises(ValueError, match="block_rows"):
        earlier_neighbors(np.ones((2, 3)), block_rows=0)
