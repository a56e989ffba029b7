"""Normalised mutual information from the marginals of a contingency table, with sklearn's conventions.

The formulas behind :class:`~dataengine.metrics.contingency.Contingency`: entropies, mutual information from
``sum x log x`` of the cells and of both marginals, the normaliser, adjusted mutual information, and
:class:`NMIResult`.

Normalisation: DeepCluster and DeeperCluster define ``NMI(A; B) = I(A; B) / sqrt(H(A) H(B))``, the geometric
mean of the entropies (:data:`DEFAULT_AVERAGE_METHOD`); scikit-learn's default is the arithmetic mean
``(H(A) + H(B)) / 2``, which gives a lower or equal figure. Every result carries both.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")
DEFAULT_AVERAGE_METHOD = "geometric"
"""The papers' normalisation (DeepCluster, DeeperCluster): ``I / sqrt(H(A) H(B))``."""
NOISE_SIGMAS = 3.0
"""An NMI is "near chance" when its mutual information exceeds the expected one of independent partitions by
less than this many standard deviations of that null (:attr:`NMIResult.near_chance`)."""


def finite_or_none(value: object) -> object:
    """JSON has no NaN nor infinity: an undefined float figure (or None) becomes None, anything else stays."""
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _sum_xlogx(values: np.ndarray) -> float:
    """``sum(x * log(x))`` of positive counts, pairwise-summed in float64."""
    as_float = values.astype(np.float64)
    terms = np.log(as_float)
    terms *= as_float
    return float(terms.sum())


def _mutual_info(cells_xlogx: float, cluster_xlogx: float, label_xlogx: float, rows: int) -> float:
    """Mutual information (nats) from ``sum x log x`` of the non-empty cells and of both marginals.

    ``MI = sum n_ij/N log(N n_ij / (a_i b_j)) = log N + (sum n log n - sum a log a - sum b log b) / N``:
    the same quantity as sklearn's ``mutual_info_score`` without any per-cell lookup of the marginals.
    Its rounding error is a few ulps of ``log N`` (as for sklearn's per-cell form); a result within that
    error of 0 is 0, so independent partitions score exactly 0 as they do in sklearn.
    """
    log_rows = math.log(rows)
    mutual_info = log_rows + (cells_xlogx - cluster_xlogx - label_xlogx) / rows
    if mutual_info < 16 * np.finfo(np.float64).eps * (log_rows + 1):
        return 0.0
    return mutual_info


def _entropy(sums: np.ndarray) -> float:
    """Entropy (nats) of a partition from its non-zero class sizes, as sklearn computes it."""
    if sums.size <= 1:
        return 0.0
    sizes = sums.astype(np.float64)
    total = sizes.sum()
    return float(-np.sum((sizes / total) * (np.log(sizes) - math.log(total))))


def _generalized_average(u: float, v: float, method: str) -> float:
    if method == "arithmetic":
        return (u + v) / 2
    if method == "geometric":
        return math.sqrt(u * v)
    if method == "min":
        return min(u, v)
    return max(u, v)


@dataclass(frozen=True, kw_only=True)
class NMIResult:
    """NMI of a clustering against one partition, with its chance level, adjusted MI and coverage."""

    nmi: float
    """NMI on the rows where both codes are present (NaN when there are none), normalised by ``average_method``."""
    chance_nmi: float
    """NMI of a seeded random permutation of the cluster assignments on the same rows (NaN if skipped)."""
    mutual_info: float
    """Mutual information in nats."""
    rows_used: int
    """Rows where both the cluster and the label are present."""
    rows_total: int
    """All rows seen."""
    num_clusters: int
    """Distinct clusters among the rows used."""
    num_labels: int
    """Distinct labels among the rows used."""
    average_method: str = DEFAULT_AVERAGE_METHOD
    """Mean of the two entropies that normalises ``nmi``, ``chance_nmi``, ``ami`` and ``noise``."""
    nmi_geometric: float = math.nan
    """NMI normalised by ``sqrt(H(A) H(B))`` (DeepCluster's definition)."""
    nmi_arithmetic: float = math.nan
    """NMI normalised by ``(H(A) + H(B)) / 2`` (scikit-learn's default)."""
    expected_mutual_info: float = math.nan
    """Expected mutual information (nats) of independent partitions with the same class sizes
    (hypergeometric model); NaN when not computed."""
    ami: float = math.nan
    """Adjusted mutual information ``(I - E[I]) / (mean(H(A), H(B)) - E[I])`` (scikit-learn's
    ``adjusted_mutual_info_score``): 0 at chance, 1 for identical partitions; NaN when not computed."""
    noise: float = math.nan
    """Standard deviation of ``nmi`` for independent partitions with these marginals (chi-square
    approximation, :func:`dataengine.metrics.expected.null_mutual_info_std`)."""

    @property
    def coverage(self) -> float:
        """``rows_used / rows_total`` (NaN for no rows)."""
        return self.rows_used / self.rows_total if self.rows_total else math.nan

    @property
    def near_chance(self) -> bool:
        """The NMI is within :data:`NOISE_SIGMAS` standard deviations (``noise``) of the expected NMI of
        independent partitions: it shows no association beyond noise."""
        if not (math.isfinite(self.nmi) and math.isfinite(self.noise) and math.isfinite(self.expected_mutual_info)):
            return False
        if self.mutual_info == 0:
            return self.num_clusters > 1 and self.num_labels > 1
        expected = self.nmi * self.expected_mutual_info / self.mutual_info
        return self.nmi - expected < NOISE_SIGMAS * self.noise

    def as_dict(self) -> dict[str, float | int | str | bool | None]:
        """JSON-ready fields, coverage and the near-chance flag included; NaN (undefined or skipped) becomes
        None."""
        fields = {**asdict(self), "coverage": self.coverage, "near_chance": self.near_chance}
        return {name: finite_or_none(value) for name, value in fields.items()}


@dataclass(frozen=True)
class _Summary:
    rows: int
    num_clusters: int
    num_labels: int
    mutual_info: float
    cluster_entropy: float
    label_entropy: float
    cluster_xlogx: float
    label_xlogx: float
    cluster_sizes: np.ndarray
    label_sizes: np.ndarray
    num_cells: int = 0

    def expected_mutual_info(self) -> float:
        from dataengine.metrics.expected import expected_mutual_info

        return expected_mutual_info(self.cluster_sizes, self.label_sizes)

    def ami(self, expected: float, average_method: str) -> float:
        """scikit-learn's adjusted mutual information with these marginals and ``expected`` = E[MI]."""
        if self.rows == 0:
            return math.nan
        if self.num_clusters == self.num_labels == self.num_cells:
            return 1.0  # the same partition (E[I] may equal I: sklearn's 1.0 then comes from rounding)
        if self.num_clusters == 1 or self.num_labels == 1:
            return 0.0
        denominator = _generalized_average(self.label_entropy, self.cluster_entropy, average_method) - expected
        eps = np.finfo(np.float64).eps  # sklearn keeps the sign of a denominator rounded to about zero
        denominator = min(denominator, -eps) if denominator < 0 else max(denominator, eps)
        return float((self.mutual_info - expected) / denominator)

    def noise(self, average_method: str) -> float:
        """Standard deviation of the NMI of independent partitions with these marginals."""
        from dataengine.metrics.expected import null_mutual_info_std

        normalizer = _generalized_average(self.label_entropy, self.cluster_entropy, average_method)
        if self.rows == 0 or normalizer <= 0:
            return math.nan
        return null_mutual_info_std(self.num_clusters, self.num_labels, self.rows) / normalizer

    def nmi(self, mutual_info: float, average_method: str) -> float:
        """sklearn's NMI conventions around ``mutual_info`` of a table with these marginals."""
        if self.rows == 0:
            return math.nan
        if self.num_clusters == self.num_labels == 1:
            return 1.0
        if mutual_info == 0:
            return 0.0
        normalizer = _generalized_average(self.label_entropy, self.cluster_entropy, average_method)
        return float(mutual_info / normalizer)
