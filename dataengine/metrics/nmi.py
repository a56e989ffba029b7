"""Normalised mutual information from the marginals of a contingency table, with sklearn's conventions.

The formulas behind :class:`~dataengine.metrics.contingency.Contingency`: entropies, mutual information from
``sum x log x`` of the cells and of both marginals, the normaliser, and :class:`NMIResult`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")


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
    """NMI of a clustering against one partition, with its chance level and coverage."""

    nmi: float
    """NMI on the rows where both codes are present (NaN when there are none)."""
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

    @property
    def coverage(self) -> float:
        """``rows_used / rows_total`` (NaN for no rows)."""
        return self.rows_used / self.rows_total if self.rows_total else math.nan

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-ready fields, coverage included; NaN (undefined or skipped) becomes None."""
        fields = {**asdict(self), "coverage": self.coverage}
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
