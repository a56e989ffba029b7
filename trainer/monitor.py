"""What the training loop logs about each re-clustering: NMI against metadata and against the last one.

The same streaming pass as the report stage (:func:`dataengine.metrics.store.evaluate_store`), on the leaf
level of the clustering: memory is one block of rows plus the sparse tables.
"""

from __future__ import annotations

from typing import Any

from dataengine.clustering import open_clustering
from dataengine.metrics import DEFAULT_AVERAGE_METHOD, finite_or_none
from dataengine.metrics.store import StoreLabels, evaluate_store, row_blocks
from dataengine.store import open_store

_CURRENT, _PREVIOUS = "current", "previous"


def clustering_nmi(store_url: str, name: str, previous_url: str | None = None,
                   previous_name: str | None = None, block_rows: int = 1 << 20,
                   average_method: str = DEFAULT_AVERAGE_METHOD,
                   storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """NMI of clustering ``name`` against every metadata kind of its store (with chance level, adjusted mutual
    information, both normalisations and coverage), and against the previous clustering of the same rows when
    given.

    Args:
        average_method: normalisation of ``nmi``, ``chance``, ``ami`` and ``nmi_previous`` (geometric: DeepCluster's
            definition).
        storage_options: fsspec options of remote stores.

    Returns:
        ``{"nmi": {kind: {"nmi", "chance", "ami", "nmi_geometric", "nmi_arithmetic", "near_chance",
        "coverage"}}, "num_clusters": int, "nmi_average": str}`` plus ``"nmi_previous"`` (on the rows assigned
        in both) with a previous clustering; undefined figures are None.
    """
    store = open_store(store_url, storage_options)
    current = open_clustering(store, name)
    leaves = {_CURRENT: current.assignment_array(current.leaf_level)}
    if previous_url and previous_name:
        previous = open_clustering(open_store(previous_url, storage_options), previous_name)
        leaves[_PREVIOUS] = previous.assignment_array(previous.leaf_level)
    compare = [(_CURRENT, _PREVIOUS)] if _PREVIOUS in leaves else []
    evaluator = evaluate_store(StoreLabels(store), leaves, row_blocks(store.num_rows, block_rows), compare=compare,
                               scored=[_CURRENT])
    results = evaluator.nmi(average_method=average_method)[_CURRENT]
    cluster_ids = evaluator.sizes(_CURRENT)[0]
    fields = ("nmi", "ami", "nmi_geometric", "nmi_arithmetic", "near_chance", "coverage")
    summary: dict[str, Any] = {
        "nmi": {kind: {"chance": values["chance_nmi"], **{name: values[name] for name in fields}}
                for kind, r in results.items() for values in [r.as_dict()]},
        "num_clusters": int(cluster_ids[-1] + 1) if cluster_ids.size else 0, "nmi_average": average_method,
    }
    if compare:
        pair = evaluator.pair_nmi(average_method=average_method)[_CURRENT, _PREVIOUS]
        summary["nmi_previous"] = finite_or_none(pair.nmi)
        summary["ami_previous"] = finite_or_none(pair.ami)
    return summary
