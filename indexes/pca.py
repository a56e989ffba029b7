"""PCA-whitening followed by l2-normalisation, fitted in one streaming pass.

DeeperCluster whitens the features before clustering: project on the top principal components, divide each
component by the square root of its eigenvalue, then l2-normalise each row. The covariance is accumulated
in float64 block by block (memory: a block and a d x d matrix), and all-reduced across ranks when a
:class:`~indexes.distributed.Reducer` is given, so every rank fits the same transform.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from indexes.data import RowSource, prefetched
from indexes.distributed import LocalReducer, Reducer

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PCAConfig:
    """How to fit the whitening."""

    num_components: int | None = 256
    """Output dimension (top principal components kept); ``None`` keeps every input dimension."""
    epsilon: float = 1e-6
    """Added to each eigenvalue, relative to the largest one, before the square root: bounds the gain of
    near-null directions (dead features) instead of dividing by ~0."""
    normalize: bool = True
    """l2-normalise each row after whitening (as DeeperCluster does)."""
    whiten: bool = True
    """Divide each component by the square root of its eigenvalue; ``False`` only projects (centred and
    rotated, on every component: distances unchanged)."""

    def __post_init__(self) -> None:
        if self.num_components is not None and self.num_components < 1:
            raise ValueError(f"num_components={self.num_components} must be >= 1 (or None for all)")
        if self.epsilon < 0:
            raise ValueError(f"epsilon={self.epsilon} must be >= 0")


@dataclass
class PCAWhitening:
    """A fitted whitening: ``y = normalize((x - mean) @ components.T / sqrt(eigenvalues + eps * max))``."""

    mean: np.ndarray
    """(d_in,) float64 mean of the fitted rows."""
    components: np.ndarray
    """(d_out, d_in) float64 principal directions, by decreasing eigenvalue."""
    eigenvalues: np.ndarray
    """(d_out,) float64 variance along each component."""
    epsilon: float
    normalize: bool
    total_variance: float = 0.0
    """Sum of all eigenvalues of the input covariance (for the explained-variance ratio)."""
    whiten: bool = True
    """Components scaled to unit variance (``False``: a plain projection)."""

    def __post_init__(self) -> None:
        scale = 1.0 / np.sqrt(self.eigenvalues + self.epsilon * max(float(self.eigenvalues.max(initial=0.0)), 0.0))
        if not self.whiten:
            scale = np.ones_like(self.eigenvalues)
        self._projection = np.ascontiguousarray((self.components.T * scale).astype(np.float32))
        self._offset = (self.mean @ self.components.T * scale).astype(np.float32)

    @property
    def input_dim(self) -> int:
        """Columns expected by :meth:`apply`."""
        return int(self.components.shape[1])

    @property
    def output_dim(self) -> int:
        """Columns returned by :meth:`apply`."""
        return int(self.components.shape[0])

    def apply(self, rows: np.ndarray) -> np.ndarray:
        """Whiten (and l2-normalise) rows: ``(n, input_dim)`` any float dtype -> ``(n, output_dim)`` float32."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.input_dim:
            raise ValueError(f"rows of shape {rows.shape} must have {self.input_dim} columns")
        out = rows @ self._projection
        out -= self._offset
        if self.normalize:
            norms = np.sqrt(np.einsum("ij,ij->i", out, out))
            out /= np.maximum(norms, np.finfo(np.float32).tiny)[:, None]
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The transform as named arrays (for the caller to store)."""
        return {
            "mean": self.mean,
            "components": self.components,
            "eigenvalues": self.eigenvalues,
            "params": np.array([self.epsilon, float(self.normalize), self.total_variance, float(self.whiten)]),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PCAWhitening:
        """Inverse of :meth:`to_arrays`."""
        params = [float(v) for v in np.asarray(arrays["params"])]
        epsilon, normalize, total = params[:3]
        whiten = params[3] if len(params) > 3 else 1.0  # stored before the plain projection existed
        return cls(
            mean=np.asarray(arrays["mean"], dtype=np.float64),
            components=np.asarray(arrays["components"], dtype=np.float64),
            eigenvalues=np.asarray(arrays["eigenvalues"], dtype=np.float64),
            epsilon=epsilon,
            normalize=bool(normalize),
            total_variance=total,
            whiten=bool(whiten),
        )

    def to_dict(self) -> dict:
        """JSON-able summary."""
        kept = float(self.eigenvalues.sum())
        return {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "epsilon": self.epsilon,
            "normalize": self.normalize,
            "whiten": self.whiten,
            "explained_variance_ratio": kept / self.total_variance if self.total_variance > 0 else 1.0,
        }


def fit_pca_whitening(
    data: RowSource,
    config: PCAConfig,
    *,
    reducer: Reducer | None = None,
    progress: Callable[[int], None] | None = None,
) -> PCAWhitening:
    """Fit the whitening on every row of ``data`` (all ranks of ``reducer`` together).

    Args:
        data: this process's rows (raw features).
        config: output dimension, regularisation and normalisation.
        reducer: ranks whose covariance sums are added; ``None`` for a single process.
        progress: called with the number of rows of each block read.
    """
    reducer = reducer or LocalReducer()
    dim = data.dim
    num_components = dim if config.num_components is None else config.num_components
    if num_components > dim:
        raise ValueError(f"num_components={num_components} exceeds the input dimension {dim}")
    count, total, gram = _moments(data, progress)
    packed = reducer.all_reduce_sum(np.concatenate([[count], total, gram.ravel()]))
    count, total, gram = packed[0], packed[1 : dim + 1], packed[dim + 1 :].reshape(dim, dim)
    if count < 2:
        raise ValueError(f"PCA needs at least 2 rows, got {int(count)}")
    mean = total / count
    covariance = (gram - count * np.outer(mean, mean)) / (count - 1)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1][:num_components]
    components = vectors[:, order].T
    # The sign of an eigenvector is arbitrary: fix it so the same data always gives the same transform.
    pivot = np.abs(components).argmax(axis=1)
    components *= np.sign(components[np.arange(num_components), pivot])[:, None]
    logger.info("PCA on %d rows: %d -> %d dimensions", int(count), dim, num_components)
    return PCAWhitening(
        mean=mean,
        components=components,
        eigenvalues=np.maximum(eigenvalues[order], 0.0),
        epsilon=config.epsilon,
        normalize=config.normalize,
        total_variance=float(np.maximum(eigenvalues, 0.0).sum()),
        whiten=config.whiten,
    )


def _moments(data: RowSource, progress: Callable[[int], None] | None) -> tuple[float, np.ndarray, np.ndarray]:
    """Row count, float64 column sums and float64 Gram matrix of the local rows."""
    total = np.zeros(data.dim)
    gram = np.zeros((data.dim, data.dim))
    count = 0
    for _, rows in prefetched(data.iter_blocks()):
        rows64 = rows.astype(np.float64)
        total += rows64.sum(axis=0)
        gram += rows64.T @ rows64
        count += rows.shape[0]
        if progress is not None:
            progress(rows.shape[0])
    return float(count), total, gram
