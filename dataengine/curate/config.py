"""What one curation computes: :class:`CurateConfig`, the status every source row ends with, the result."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("balanced", "random", "hierarchical")
DEDUP_SPACES = ("whitened", "features")
STATUSES = ("selected", "not_selected", "near_duplicate", "invalid")
"""Ledger status of a source row: kept; left out by the strategy; dropped as a near-duplicate of an earlier
row of its cluster; without features (its image failed to decode at embedding, so it has no cluster)."""
# Only these fields change what is written; the others (credentials, memory budget...) may differ on resume.
_OUTPUT_FIELDS = ("store", "clustering", "level", "strategy", "total", "per_cluster", "seed", "dedup_threshold",
                  "dedup_space", "shard_size")


@dataclass(frozen=True, kw_only=True)
class CurateConfig:
    """Configuration of one curated subset of a clustered feature store."""

    store: str
    """Feature store holding the clustering (local path or fsspec URL)."""
    clustering: str
    """Name of the clustering in the store."""
    out: str
    """Output folder for the curated shard set (local path or fsspec URL)."""
    shards: str | None = None
    """Ingest output the store was embedded from; ``None`` = the one the store records (checked by digest)."""
    strategy: str = "balanced"
    """``balanced`` (even over the clusters of ``level``), ``random`` (uniform, ignores clusters) or
    ``hierarchical`` (balanced among the children of every cluster, from the top level down to ``level``)."""
    total: int | None = None
    """Rows wanted in the subset (at most the rows left after deduplication). With neither ``total`` nor
    ``per_cluster``, every row left after deduplication is kept."""
    per_cluster: int | None = None
    """Instead of ``total``: at most this many rows per cluster of ``level`` (balanced) or per top-level cluster
    (hierarchical). Not for ``random``."""
    level: int | None = None
    """Clustering level whose clusters are balanced and deduplicated within; ``None`` = the finest."""
    seed: int = 0
    """Seed of every random choice (rows within clusters, the extra rows of a split)."""
    dedup_threshold: float | None = None
    """Drop a row when an earlier row of its cluster has a cosine similarity above this; ``None`` = no
    deduplication."""
    dedup_space: str = "whitened"
    """Vectors compared: ``whitened`` (the clustering's PCA-whitening, the space it was clustered in) or
    ``features`` (the stored features as they are)."""
    dedup_memory_bytes: int = 1 << 30
    """Vectors held at once while deduplicating; clusters are processed in batches that fit (one pass over the
    store per batch)."""
    shard_size: int = 1000
    """Samples per output shard (the last one may hold fewer)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for every URL (``endpoint_url``, ``key``, ``secret``...)."""
    overwrite: bool = False
    """Start over when ``out`` holds a curation made with another configuration."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.total is not None and self.per_cluster is not None:
            raise ValueError("give one of total=N (--total) and per_cluster=N (--per-cluster), not both")
        if self.total is None and self.per_cluster is None and self.dedup_threshold is None:
            raise ValueError("nothing to curate: give total=N (--total), per_cluster=N (--per-cluster) or "
                             "dedup_threshold=COS (--dedup-threshold)")
        if self.strategy == "random" and self.per_cluster is not None:
            raise ValueError("the random strategy ignores clusters: give total=N (--total), not per_cluster")
        for name in ("total", "per_cluster", "level"):
            value = getattr(self, name)
            if value is not None and value < (1 if name != "level" else 0):
                raise ValueError(f"{name} must be >= {1 if name != 'level' else 0}, got {value}")
        if self.dedup_threshold is not None and not (math.isfinite(self.dedup_threshold)
                                                     and -1.0 <= self.dedup_threshold < 1.0):
            raise ValueError(f"dedup_threshold is a cosine similarity and must be in [-1, 1), got "
                             f"{self.dedup_threshold}")
        if self.dedup_space not in DEDUP_SPACES:
            raise ValueError(f"dedup_space must be one of {', '.join(DEDUP_SPACES)}, got {self.dedup_space!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")
        if self.dedup_memory_bytes < 1 << 20:
            raise ValueError(f"dedup_memory_bytes must be >= 1 MiB, got {self.dedup_memory_bytes}")

    def output_config(self) -> dict[str, Any]:
        """The fields that determine the output (recorded, checked on resume, copied into the manifest)."""
        return {name: getattr(self, name) for name in _OUTPUT_FIELDS}


@dataclass
class CurateResult:
    """Summary of a curation: counts per status, shards written, and the subset beside the original.

    ``report`` holds, for the original rows and for the curated ones, the cluster-size distribution at the
    curation level and the NMI against every metadata kind of the store (with chance levels).
    """

    out: str
    num_rows: int
    num_selected: int
    counts: dict[str, int]
    num_shards: int
    level: int
    num_clusters: int
    seconds: float
    resumed_shards: int = 0
    dedup_threshold: float | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
