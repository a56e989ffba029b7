"""Curate: a subset of a clustered collection written as a new shard set, with a ledger of every row.

Following the clustering-based curation of Vo et al. (2024) and SemDeDup (Abbas et al., 2023):

* :mod:`~dataengine.curate.config` -- :class:`CurateConfig` (strategy ``balanced``, ``random`` or
  ``hierarchical``; ``total`` or ``per_cluster``; seed; near-duplicate threshold), the row statuses and
  :class:`CurateResult`.
* :mod:`~dataengine.curate.select` -- the decision for every row: near-duplicates within clusters (an earlier
  row of the cluster more similar than the threshold), then the seeded subset (algorithms in
  :mod:`indexes.selection` and :mod:`indexes.dedup`).
* :mod:`~dataengine.curate.write` -- the output in the ingest layout (readable by ``embed``, ``train`` and
  webdataset), resumable after the last done shard.
* :mod:`~dataengine.curate.summary` -- cluster-size distribution and metadata NMI of the subset beside the
  original's.
* :mod:`~dataengine.curate.run` -- :func:`run_curate`, the stage.
* :mod:`~dataengine.curate.evaluate` -- precision and recall of near-duplicate removal against known
  duplicates, and a threshold chosen on a validation collection.
"""

from dataengine.curate.config import DEDUP_SPACES, STATUSES, STRATEGIES, CurateConfig, CurateResult
from dataengine.curate.run import run_curate
from dataengine.curate.evaluate import DedupScores, choose_threshold, dedup_scores
from dataengine.curate.select import Selection, clustering_similarities, compute_selection, near_duplicate_similarities

__all__ = ["DEDUP_SPACES", "STATUSES", "STRATEGIES", "CurateConfig", "CurateResult", "DedupScores", "Selection",
           "choose_threshold", "clustering_similarities", "compute_selection", "dedup_scores",
           "near_duplicate_similarities", "run_curate"]
