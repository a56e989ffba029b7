"""Ingest's configuration, its result, and the status every input row ends with."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from dataengine.images import DEFAULT_MAX_PIXELS

STATUSES = ("ok", "missing", "corrupt", "duplicate", "video", "bad_metadata", "download_failed")
# Only these fields change what is written; the others (workers, credentials...) may differ on resume.
_OUTPUT_FIELDS = ("yfcc", "images", "download", "shard_size", "image_size", "quality", "keep_duplicates",
                  "max_pixels", "num_nodes", "split_rows")
UNSHUFFLED = {"shuffle": False, "seed": 0}
"""The order fields of an ingest recorded before they existed: input order."""


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """Configuration of one ingest run."""

    out: str
    """Output folder, local path or fsspec URL (``s3://bucket/prefix``)."""
    yfcc: str | None = None
    """YFCC100M metadata file (plain, .gz or .bz2; local or URL). ``None`` for folder/tar sources."""
    images: str | None = None
    """Images root for YFCC metadata, or an image folder / tar (class sub-folders become labels)."""
    download: bool = False
    """Fetch each photo from its download URL instead of reading ``images``."""
    shard_size: int = 1000
    """Samples per shard (the last shard may hold fewer)."""
    image_size: int = 256
    """Shorter side of stored images; smaller images are never upscaled."""
    quality: int = 90
    """JPEG quality of the re-encoded images."""
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    """Worker processes decoding images; 0 runs everything in the main process."""
    keep_duplicates: bool = False
    """Keep exact duplicates (same sha256 of the original bytes) instead of dropping them."""
    shuffle: bool | None = None
    """Write the rows in a seeded permutation of the input order (``None``: yes for an image folder or tar,
    which is usually sorted by class; no for YFCC metadata, whose lines are not, and whose permutation holds
    every line in memory). See :mod:`dataengine.ingest.order`."""
    seed: int = 0
    """Seed of the permutation (``shuffle``)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more pixels are rejected as decompression bombs."""
    num_nodes: int = 1
    """Number of nodes splitting the input."""
    node_rank: int = 0
    """This node's rank in ``[0, num_nodes)``."""
    split_rows: int = 1024
    """With several nodes, rows are dealt out round-robin in blocks of this many rows."""
    block_rows: int = 32
    """Rows per work item sent to a worker."""
    download_threads: int = 16
    """Concurrent HTTP requests per worker in download mode."""
    download_timeout: float = 10.0
    """Seconds an HTTP attempt may take in all (connection, redirects, headers, body) before it is cut off."""
    download_retries: int = 2
    """Retries of a transient HTTP failure (timeouts, 5xx)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for every URL (``endpoint_url``, ``key``, ``secret``...)."""
    overwrite: bool = False
    """Start over when ``out`` holds an ingest made with another configuration."""

    def __post_init__(self) -> None:
        if not self.yfcc and not self.images:
            raise ValueError("nothing to ingest: give yfcc=META (with images=ROOT or download=True) or images=FOLDER")
        if self.yfcc and not self.download and not self.images:
            raise ValueError("yfcc metadata needs images=ROOT or download=True")
        if self.download and not self.yfcc:
            raise ValueError("download=True needs yfcc metadata with download URLs")
        for name in ("shard_size", "image_size", "num_nodes", "split_rows", "block_rows", "download_threads",
                     "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if not self.download_timeout > 0:
            raise ValueError(f"download_timeout must be > 0 seconds, got {self.download_timeout}")
        if self.download_retries < 0:
            raise ValueError(f"download_retries must be >= 0, got {self.download_retries}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node_rank must be in [0, {self.num_nodes}), got {self.node_rank}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")

    @property
    def shuffled(self) -> bool:
        """Whether the rows are written permuted (``shuffle`` resolved: folder/tar inputs by default)."""
        return (not self.yfcc) if self.shuffle is None else self.shuffle

    def output_config(self) -> dict[str, Any]:
        """The fields that determine the output (recorded in the manifest, checked on resume); the order as
        resolved (``shuffle`` true or false, and the seed that made it)."""
        order = {"shuffle": self.shuffled, "seed": self.seed if self.shuffled else 0}
        return {name: getattr(self, name) for name in _OUTPUT_FIELDS} | order

    @property
    def shard_prefix(self) -> str:
        return "shard" if self.num_nodes == 1 else f"shard-r{self.node_rank:03d}"

    def owns(self, row_index: int) -> bool:
        return (row_index // self.split_rows) % self.num_nodes == self.node_rank


@dataclass
class IngestResult:
    """Summary of an ingest run."""

    out: str
    num_shards: int
    num_samples: int
    counts: dict[str, int]
    seconds: float
    resumed_shards: int = 0
    complete: bool = True
    cross_node_duplicates: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
