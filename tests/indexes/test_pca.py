"""PCA-whitening: identity covariance, unit rows, streaming equals one block, round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from indexes.data import ArrayDataset
from indexes.pca import PCAConfig, PCAWhitening, fit_pca_whitening


def _correlated(n=4000, d=12, seed=0):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) * np.linspace(3, 0.1, d)
    return (rng.standard_normal((n, d)) @ mixing.T + 5.0).astype(np.float32)


def test_whitened_rows_have_identity_covariance():
    rows = _correlated()
    pca = fit_pca_whitening(ArrayDataset(rows, block_rows=300), PCAConfig(num_components=6, normalize=False, epsilon=0))
    out = pca.apply(rows)
    assert out.shape == (4000, 6) and out.dtype == np.float32
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(out.astype(np.float64), rowvar=False), np.eye(6), atol=2e-3)
    assert np.all(np.diff(pca.eigenvalues) <= 0)
    reference = np.sort(np.linalg.eigvalsh(np.cov(rows.astype(np.float64), rowvar=False)))[::-1][:6]
    np.testing.assert_allclose(pca.eigenvalues, reference, rtol=1e-8)


def test_normalised_output_has_unit_rows_and_streaming_equals_one_block():
    rows = _correlated(seed=1)
    config = PCAConfig(num_components=4)
    streamed = fit_pca_whitening(ArrayDataset(rows, block_rows=128), config)
    whole = fit_pca_whitening(ArrayDataset(rows, block_rows=10_000), config)
    np.testing.assert_allclose(streamed.components, whole.components, atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(streamed.apply(rows), axis=1), 1.0, atol=1e-5)
    json.dumps(streamed.to_dict())


def test_round_trip_through_arrays_gives_the_same_transform():
    rows = _correlated(seed=2)
    pca = fit_pca_whitening(ArrayDataset(rows), PCAConfig(num_components=5))
    again = PCAWhitening.from_arrays({k: np.array(v) for k, v in pca.to_arrays().items()})
    np.testing.assert_array_equal(again.apply(rows[:50]), pca.apply(rows[:50]))
    assert again.to_dict() == pca.to_dict()


def test_whitening_as_the_dataset_transform():
    rows = _correlated(seed=3).astype(np.float16)
    pca = fit_pca_whitening(ArrayDataset(rows), PCAConfig(num_components=3))
    data = ArrayDataset(rows, block_rows=500, transform=pca.apply, transform_dim=pca.output_dim)
    np.testing.assert_array_equal(data.take(np.array([0, 7, 3999])), pca.apply(rows[[0, 7, 3999]]))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="num_components=0"):
        PCAConfig(num_components=0)
    with pytest.raises(ValueError, match="exceeds"):
        fit_pca_whitening(ArrayDataset(np.zeros((5, 3), dtype=np.float32)), PCAConfig(num_components=4))


def test_without_whitening_the_transform_is_a_rotation_and_keeps_distances():
    """ClusterFit clusters the features as they are: centred and rotated on every component, not scaled nor
    normalised, pairwise distances (hence the k-means) are unchanged; the flag survives storage, and a transform
    stored before it existed reads as whitened."""
    rows = _correlated(seed=4)
    plain = fit_pca_whitening(ArrayDataset(rows), PCAConfig(num_components=None, whiten=False, normalize=False))
    out = plain.apply(rows[:40]).astype(np.float64)
    distances = np.linalg.norm(rows[:40, None] - rows[None, :40], axis=-1)
    np.testing.assert_allclose(np.linalg.norm(out[:, None] - out[None], axis=-1), distances, rtol=1e-4, atol=1e-4)
    again = PCAWhitening.from_arrays({k: np.array(v) for k, v in plain.to_arrays().items()})
    assert not again.whiten and again.to_dict() == plain.to_dict()
    whitened = fit_pca_whitening(ArrayDataset(rows), PCAConfig(num_components=None))
    old = dict(whitened.to_arrays(), params=whitened.to_arrays()["params"][:3])
    assert PCAWhitening.from_arrays(old).whiten
