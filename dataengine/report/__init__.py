"""Report stage: how a clustering of a feature store relates to the photos' metadata, as JSON and HTML.

``run_report`` reads a clustering written by ``dataengine cluster`` (one int32 cluster id per row and level,
through :class:`dataengine.clustering.Clustering`) and the metadata columns that ``dataengine embed`` copied
into the store, in blocks of rows, and feeds them to :class:`dataengine.metrics.ClusteringEvaluator`:

* NMI against each metadata kind present (hashtag, user, GPS cell, device, class label) with its chance level
  and coverage, for every level of the clustering; NMI between clusterings and along a sequence of named
  clusterings (e.g. the trainer's epochs): ``NAME`` first, then the compared ones in the order given;
* per cluster: size, purity and dominant value per kind, landmark / single-user / device flags; the
  distribution of cluster sizes (min, median, max, entropy, Gini);
* 3x3 grids of random photos of selected clusters (largest, purest per kind, landmarks, a device cluster, a
  head-tag and a tail-tag cluster), read from the ingest shards by random access (:mod:`dataengine.thumbnails`).

Passes over the store: tag counts (hashtags need the global tag distribution first), then every clustering
and label code, then the selected clusters' rows for the thumbnails. Memory is one block of rows plus the
sparse contingency tables. Output (``OUT`` local or fsspec URL; re-running recomputes and replaces it)::

    OUT/report.json     every figure (NMI tables, size statistics, selected clusters, failures, config)
    OUT/clusters.csv    one line per cluster: size, flags, purity and dominant value per kind
    OUT/plots/*.png     the plots; OUT/grids/*.jpg the photo grids
    OUT/index.html      self-contained report (images inlined as data URIs), written last

Modules: :mod:`~dataengine.report.config` (what is asked, what comes back), :mod:`~dataengine.report.clusterings`
(levels and pairs read), :mod:`~dataengine.report.selection` (clusters shown as grids, their photos),
:mod:`~dataengine.report.run` (the passes), :mod:`~dataengine.report.outputs` (files written) and
:mod:`~dataengine.report.html` (plots and HTML rendering). Label codes are read by
:class:`dataengine.metrics.store.StoreLabels`.
"""

from dataengine.metrics.store import StoreLabels, row_blocks
from dataengine.report.clusterings import Series, open_series
from dataengine.report.config import FORMAT, VERSION, ReportConfig, ReportResult, SelectedCluster
from dataengine.report.run import run_report
from dataengine.report.selection import sample_rows, select_clusters

__all__ = [
    "FORMAT", "VERSION", "ReportConfig", "ReportResult", "SelectedCluster", "Series", "StoreLabels",
    "open_series", "row_blocks", "run_report", "sample_rows", "select_clusters",
]
