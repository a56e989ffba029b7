"""The clusterings a report reads: the level reported, the pairs compared, how many rows have a cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dataengine.clustering import Clustering, open_clustering
from dataengine.metrics import ClusteringEvaluator, consecutive_pairs
from dataengine.store import FeatureStore


@dataclass(frozen=True)
class Series:
    """One level of one clustering, as read from the store."""

    clustering: Clustering
    level: int

    @property
    def name(self) -> str:
        return self.clustering.name

    @property
    def label(self) -> str:
        """``NAME/levelL``: its name in the evaluator and in the report."""
        return f"{self.name}/level{self.level}"

    @property
    def ids(self) -> Any:
        """The ``(N,)`` array of cluster ids (read in blocks)."""
        return self.clustering.assignment_array(self.level)

    @property
    def num_clusters(self) -> int | None:
        """Clusters at that level including empty ones, when the clustering records it."""
        return self.clustering.num_clusters(self.level)


def open_series(store: FeatureStore, name: str, level: int | None) -> tuple[Clustering, Series]:
    """Clustering ``name`` of the store and its level ``level`` (``None``: the finest).

    Raises:
        KeyError: no complete clustering of that name (the message lists those present).
        ValueError: a level the clustering does not have.
    """
    clustering = open_clustering(store, name)
    if level is not None and level not in clustering.levels:
        raise ValueError(f"clustering {name!r} has levels {clustering.levels}; level {level} is not among them")
    return clustering, Series(clustering, clustering.leaf_level if level is None else level)


def comparisons(sequence: list[str]) -> list[tuple[str, str]]:
    """Consecutive pairs along the sequence, then the first one against each other."""
    pairs = consecutive_pairs(sequence)
    pairs += [(sequence[0], other) for other in sequence[2:]]
    return pairs


def coverage_warnings(series: list[Series], evaluator: ClusteringEvaluator, store: FeatureStore) -> list[str]:
    """One line per clustering level where some rows have no cluster, saying how many and whether the
    embedding explains them (rows invalid at embedding get none); valid rows without a cluster mean a
    clustering that lost rows."""
    num_rows, num_invalid = store.num_rows, int(store.attrs.get("num_invalid", 0))
    warnings = []
    for one in series:
        assigned = int(evaluator.sizes(one.label)[1].sum())
        if assigned == num_rows:
            continue
        line = (f"{one.label}: {num_rows - assigned} of {num_rows} rows have no cluster "
                f"(coverage {assigned / num_rows:.4f})")
        lost = num_rows - num_invalid - assigned
        line += (f", {lost} of them valid rows: the clustering is incomplete" if lost > 0
                 else "; they are the rows invalid at embedding")
        warnings.append(line)
    return warnings
