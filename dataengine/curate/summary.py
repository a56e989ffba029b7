"""The curated subset beside the original: cluster-size distribution and NMI against every metadata kind.

Both are scored on the clusters of the curation level, with the labels of the feature store (the same
encoders as ``dataengine report``): ``original`` counts every row that has a cluster, ``curated`` only the
kept rows. A balanced subset flattens the size distribution (Gini towards 0, normalised entropy towards 1).
"""

from __future__ import annotations

import csv
import dataclasses
import io
from typing import Any

import numpy as np

from dataengine.curate.select import NEAR_DUPLICATE, SELECTED, Selection
from dataengine.fs import Location
from dataengine.store import FeatureStore


def compare_subsets(store: FeatureStore, selection: Selection, seed: int = 0) -> dict[str, Any]:
    """Size statistics and metadata NMI (with chance level) of the original rows and of the kept ones.

    Returns:
        ``{"level", "num_clusters", "sizes": {"original", "curated"}, "nmi": {"original": {kind: ...},
        "curated": {kind: ...}}}`` (JSON-ready; NaN figures are ``None``).
    """
    from dataengine.metrics.store import StoreLabels, evaluate_store, row_blocks

    blocks = row_blocks(store.num_rows, max(store.features.chunks[0], 1 << 16))
    kept = np.where(selection.status == SELECTED, selection.cluster, -1)
    evaluator = evaluate_store(StoreLabels(store), {"original": selection.cluster, "curated": kept}, blocks)
    nmi = evaluator.nmi(chance_seed=seed)
    return {
        "level": selection.level,
        "num_clusters": selection.num_clusters,
        "sizes": {name: _finite(dataclasses.asdict(evaluator.size_stats(name, selection.num_clusters)))
                  for name in ("original", "curated")},
        "nmi": {name: {kind: result.as_dict() for kind, result in nmi[name].items()}
                for name in ("original", "curated")},
    }


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    from dataengine.metrics import finite_or_none

    return {name: finite_or_none(value) if isinstance(value, float) else value for name, value in values.items()}


def write_cluster_sizes(out: Location, selection: Selection) -> None:
    """``cluster_sizes.csv``: per cluster of the curation level, its rows, near-duplicates dropped and rows kept."""
    has = selection.cluster >= 0
    count = lambda mask: np.bincount(selection.cluster[has & mask], minlength=selection.num_clusters)  # noqa: E731
    rows = count(np.ones_like(has))
    dropped = count(selection.status == NEAR_DUPLICATE)
    kept = count(selection.status == SELECTED)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["cluster", "rows", "near_duplicates", "kept"])
    writer.writerows(zip(range(selection.num_clusters), rows.tolist(), dropped.tolist(), kept.tolist()))
    out.write_bytes("cluster_sizes.csv", text.getvalue().encode())
