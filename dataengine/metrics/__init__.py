"""Cluster quality against metadata: NMI with chance levels, per-cluster purity and size statistics.

DeeperCluster (section 5.3) judges a clustering of YFCC100M by its normalised mutual information (NMI)
with partitions given by the metadata: hashtags, users, GPS position, capture device and, where one
exists, a class label. This package holds the computations behind that report; rendering lives elsewhere.

* :mod:`~dataengine.metrics.labels` -- label encoding. Each metadata kind becomes an int64 code array with
  ``-1`` for a missing value: :func:`hashtag_labels` (least frequent tag, two-pass streamable through
  :func:`count_tags` and :func:`least_frequent_tags`), :func:`gps_cells`, :func:`device_labels` and
  :func:`categorical_codes` (users, class labels). :class:`CategoricalEncoder` keeps codes consistent across
  blocks.
* :mod:`~dataengine.metrics.contingency` and :mod:`~dataengine.metrics.nmi` -- :class:`Contingency`
  accumulates a sparse (cluster, label) count table over row blocks, in time linear in rows and memory
  proportional to the number of non-empty pairs. Its NMI is sklearn's quantity with sklearn's conventions
  (natural log, special cases), normalised by the geometric mean of the entropies as DeepCluster defines it
  (``average_method="arithmetic"``: sklearn's default, the arithmetic mean), so it equals
  ``sklearn.metrics.normalized_mutual_info_score`` with the same ``average_method`` on the rows where both
  codes are present. Beside each NMI go a chance level (the NMI of a seeded random permutation of the cluster
  assignments), the adjusted mutual information (:mod:`~dataengine.metrics.expected`: the expected mutual
  information from the two marginals) and a flag for an NMI within noise of chance.
* :mod:`~dataengine.metrics.profiles` -- per-cluster purity, landmark / single-user / device flags and size
  statistics.
* :mod:`~dataengine.metrics.stream` -- :class:`ClusteringEvaluator` updates, per block of rows, one table per
  (clustering, metadata kind), per pair of compared clusterings and the cluster sizes; it then yields NMI
  results, per-cluster profiles and size statistics. :func:`metadata_nmi`, :func:`nmi_sequence`,
  :func:`consecutive_nmi`, :func:`cluster_profiles` and :func:`nmi_score` wrap it for in-memory arrays.
* :mod:`~dataengine.metrics.store` -- the label codes of every metadata kind a feature store holds, block by
  block, and :func:`~dataengine.metrics.store.evaluate_store`, the streaming pass scoring clusterings of a
  store (imported on its own: it reads stores).

Codes are non-negative integers below ``2**31`` (cluster ids and label codes alike); negative ``-1``
marks a missing value. A pair is stored as the int64 key ``cluster << 32 | label``.
"""

from dataengine.metrics.contingency import (
    DEFAULT_BLOCK_ROWS, MAX_CODE, Contingency, PurityTable, cluster_purity, nmi_score,
)
from dataengine.metrics.labels import (
    KIND_DEVICE, KIND_GPS, KIND_HASHTAG, KIND_LABEL, KIND_USER, METADATA_KINDS, CategoricalEncoder, TagVocabulary,
    categorical_codes, count_tags, device_labels, gps_cell_bounds, gps_cells, gps_grid_shape, hashtag_labels,
    least_frequent_tags, normalize_device,
)
from dataengine.metrics.nmi import AVERAGE_METHODS, DEFAULT_AVERAGE_METHOD, NOISE_SIGMAS, NMIResult, finite_or_none
from dataengine.metrics.profiles import ClusterFlagConfig, ClusterProfiles, SizeStats, size_stats
from dataengine.metrics.stream import (
    ClusteringEvaluator, cluster_profiles, consecutive_nmi, consecutive_pairs, metadata_nmi, nmi_sequence,
)

__all__ = [
    "AVERAGE_METHODS", "DEFAULT_AVERAGE_METHOD", "DEFAULT_BLOCK_ROWS", "NOISE_SIGMAS", "KIND_DEVICE", "KIND_GPS", "KIND_HASHTAG", "KIND_LABEL", "KIND_USER",
    "MAX_CODE", "METADATA_KINDS", "CategoricalEncoder", "ClusterFlagConfig", "ClusterProfiles", "ClusteringEvaluator",
    "Contingency", "NMIResult", "PurityTable", "SizeStats", "TagVocabulary", "categorical_codes", "cluster_profiles",
    "cluster_purity", "consecutive_nmi", "consecutive_pairs", "count_tags", "device_labels", "finite_or_none",
    "gps_cell_bounds", "gps_cells", "gps_grid_shape", "hashtag_labels", "least_frequent_tags", "metadata_nmi",
    "nmi_score", "nmi_sequence", "normalize_device", "size_stats",
]
