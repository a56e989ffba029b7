"""What the training loop logs about each re-clustering: NMI against metadata and against the last one.

Reuses the report stage's readers (:class:`dataengine.metrics.store_labels.StoreLabels`) and the streaming NMI of
:mod:`dataengine.metrics`, on the leaf level of the clustering.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dataengine.metrics import finite_or_none, metadata_nmi, nmi_score
from dataengine.metrics.store_labels import StoreLabels, row_blocks
from dataengine.store import open_store


def _leaf(store: Any, name: str) -> np.ndarray:
    levels = len(store.read_attrs(f"clusterings/{name}")["config"]["levels"])
    return store.read_array(f"clusterings/{name}/level{levels - 1}").astype(np.int64)


def clustering_nmi(store_url: str, name: str, previous_url: str | None = None,
                   previous_name: str | None = None, block_rows: int = 1 << 20) -> dict[str, Any]:
    """NMI of clustering ``name`` against every metadata kind of its store (with chance level and
    coverage), and against the previous clustering of the same rows when given."""
    store = open_store(store_url)
    clusters = _leaf(store, name)
    labels = StoreLabels(store)
    blocks = row_blocks(store.num_rows, block_rows)
    labels.count_tags(blocks)
    parts = [labels.block(start, end) for start, end in blocks]
    by_kind = {kind: np.concatenate([part[kind] for part in parts]) for kind in labels.kinds}
    results = metadata_nmi(clusters, by_kind)
    summary: dict[str, Any] = {"nmi": {kind: {"nmi": finite_or_none(r.nmi), "chance": finite_or_none(r.chance_nmi),
                                              "coverage": r.coverage} for kind, r in results.items()},
                               "num_clusters": int(clusters.max(initial=-1) + 1)}
    if previous_url and previous_name:
        previous = _leaf(open_store(previous_url), previous_name)
        both = (clusters >= 0) & (previous >= 0)
        summary["nmi_previous"] = finite_or_none(nmi_score(clusters[both], previous[both]))
    return summary
