"""What the training loop logs about each re-clustering: NMI against metadata and against the last one.

The same streaming pass as the report stage (:func:`dataengine.metrics.store.evaluate_store`), on the leaf
level of the clustering: memory is one block of rows plus the sparse tables.
"""

from __future__ import annotations

from typing import Any

from dataengine.clustering import open_clustering
from dataengine.metrics import finite_or_none
from dataengine.metrics.store import StoreLabels, evaluate_store, row_blocks
from dataengine.store import open_store

_CURRENT, _PREVIOUS = "current", "previous"


def clustering_nmi(store_url: str, name: str, previous_url: str | None = None,
                   previous_name: str | None = None, block_rows: int = 1 << 20) -> dict[str, Any]:
    """NMI of clustering ``name`` against every metadata kind of its store (with chance level and
    coverage), and against the previous clustering of the same rows when given.

    Returns:
        ``{"nmi": {kind: {"nmi", "chance", "coverage"}}, "num_clusters": int}`` plus ``"nmi_previous"`` (on
        the rows assigned in both) with a previous clustering; undefined figures are None.
    """
    store = open_store(store_url)
    current = open_clustering(store, name)
    leaves = {_CURRENT: current.assignment_array(current.leaf_level)}
    if previous_url and previous_name:
        previous = open_clustering(open_store(previous_url), previous_name)
        leaves[_PREVIOUS] = previous.assignment_array(previous.leaf_level)
    compare = [(_CURRENT, _PREVIOUS)] if _PREVIOUS in leaves else []
    evaluator = evaluate_store(StoreLabels(store), leaves, row_blocks(store.num_rows, block_rows), compare=compare,
                               scored=[_CURRENT])
    results = evaluator.nmi()[_CURRENT]
    cluster_ids = evaluator.sizes(_CURRENT)[0]
    summary: dict[str, Any] = {
        "nmi": {kind: {"nmi": finite_or_none(r.nmi), "chance": finite_or_none(r.chance_nmi), "coverage": r.coverage}
                for kind, r in results.items()},
        "num_clusters": int(cluster_ids[-1] + 1) if cluster_ids.size else 0,
    }
    if compare:
        summary["nmi_previous"] = finite_or_none(evaluator.pair_nmi()[_CURRENT, _PREVIOUS].nmi)
    return summary
