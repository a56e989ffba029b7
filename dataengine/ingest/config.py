"""Ingest's configuration, its result, and the status every input row ends with."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from dataengine.images import DEFAULT_MAX_PIXELS, Resize
from dataengine.url_lists import UrlList

STATUSES = ("ok", "missing", "corrupt", "duplicate", "video", "bad_metadata", "download_failed", "filtered")
# Only these fields change what is written; the others (workers, credentials...) may differ on resume.
_OUTPUT_FIELDS = ("yfcc", "images", "download", "shard_size", "image_size", "quality", "keep_duplicates",
                  "max_pixels", "num_nodes", "split_rows")
# Fields added later: recorded only when they differ from their default, so that an output made before they
# existed (or without them) keeps its recorded configuration and resumes.
_LATER_OUTPUT_FIELDS = ("url_list", "input_format", "url_col", "caption_col", "save_additional_columns",
                        "resize_mode", "resize_only_if_bigger", "min_image_size", "max_aspect_ratio", "metadata_only")
DISTRIBUTORS = ("multiprocessing", "ray")
METADATA_BLOCK_ROWS = 1024  # rows per work item in metadata-only mode (see IngestConfig.rows_per_block)
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
    metadata_only: bool = False
    """Only parse and validate the YFCC metadata: every valid photo line becomes a row of
    ``metadata.parquet`` (``shard``, ``position`` and ``offset`` -1) with status ``ok``, and the ledger
    is written; no image is read and no shard made. Measures and prepares the metadata path alone."""
    url_list: str | None = None
    """A URL list (txt, csv, tsv, json, jsonl, parquet; local or URL) whose URLs are fetched over HTTP."""
    input_format: str | None = None
    """Format of ``url_list`` (default: from its name)."""
    url_col: str = "url"
    """Column of ``url_list`` holding the URLs."""
    caption_col: str | None = None
    """Column of ``url_list`` holding captions (kept as ``caption`` and as the sample's ``.txt``)."""
    save_additional_columns: tuple[str, ...] = ()
    """Columns of ``url_list`` kept in each sample's metadata under their own names."""
    resize_mode: str = "keep_ratio"
    """keep_ratio (shorter side = ``image_size``), center_crop (then the centre square), border (longer side =
    ``image_size``, padded with white to a square) or no (original size)."""
    resize_only_if_bigger: bool = True
    """Resize only images larger than ``image_size``: never upscale (img2dataset's default is to upscale)."""
    min_image_size: int = 0
    """Images whose shorter side is smaller are refused (status ``filtered``)."""
    max_aspect_ratio: float = float("inf")
    """Images whose longer side is more than this many times the shorter are refused (``filtered``)."""
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
    """Rows per work item sent to a worker (in metadata-only mode at least :data:`METADATA_BLOCK_ROWS`)."""
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
    distributor: str = "multiprocessing"
    """Who runs the workers: ``multiprocessing`` (``workers`` processes here) or ``ray`` (tasks on the Ray
    cluster that ``ray.init()`` finds; see :mod:`dataengine.ingest.distributed`). Same output either way."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "save_additional_columns", tuple(self.save_additional_columns))
        if self.url_list and (self.yfcc or self.images or self.download):
            raise ValueError("a URL list is its own input: give url_list alone, without yfcc, images or download")
        if not self.yfcc and not self.images and not self.url_list:
            raise ValueError("nothing to ingest: give yfcc=META (with images=ROOT or download=True), "
                             "images=FOLDER or url_list=FILE")
        if self.metadata_only:
            if not self.yfcc or self.images or self.download:
                raise ValueError("metadata_only needs yfcc metadata and neither images nor download")
        elif self.yfcc and not self.download and not self.images:
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
        if self.distributor not in DISTRIBUTORS:
            raise ValueError(f"distributor must be one of {', '.join(DISTRIBUTORS)}, got {self.distributor!r}")
        self.resize  # noqa: B018 (validates the resize options)
        if self.url_list:
            self.url_list_spec  # noqa: B018 (validates the columns and the format)
        elif self.caption_col or self.save_additional_columns or self.input_format:
            raise ValueError("caption, additional columns and input format are options of a URL list (url_list)")

    @property
    def fetches_urls(self) -> bool:
        """Rows are fetched over HTTP (download mode, or a URL list)."""
        return self.download or bool(self.url_list)

    @property
    def resize(self) -> Resize:
        """The resize mode and size filters."""
        return Resize(mode=self.resize_mode, only_if_bigger=self.resize_only_if_bigger,
                      min_image_size=self.min_image_size, max_aspect_ratio=self.max_aspect_ratio)

    @property
    def url_list_spec(self) -> UrlList | None:
        """The URL list and its columns, ``None`` for other inputs."""
        if not self.url_list:
            return None
        return UrlList(url=self.url_list, input_format=self.input_format, url_col=self.url_col,
                       caption_col=self.caption_col, additional_columns=self.save_additional_columns)

    @property
    def source(self) -> str:
        """The input, for messages."""
        return self.url_list or self.yfcc or self.images or ""

    @property
    def rows_per_block(self) -> int:
        """Rows per work item: ``block_rows``, raised in metadata-only mode, where a row is ~40 us of parsing
        and a block returns one Arrow table (small blocks made the tables' overhead the cost)."""
        return max(self.block_rows, METADATA_BLOCK_ROWS) if self.metadata_only else self.block_rows

    @property
    def shuffled(self) -> bool:
        """Whether the rows are written permuted (``shuffle`` resolved: folder/tar inputs by default, not YFCC
        metadata nor URL lists)."""
        return (not self.yfcc and not self.url_list) if self.shuffle is None else self.shuffle

    def output_config(self) -> dict[str, Any]:
        """The fields that determine the output (recorded in the manifest, checked on resume); the order as
        resolved (``shuffle`` true or false, and the seed that made it)."""
        order = {"shuffle": self.shuffled, "seed": self.seed if self.shuffled else 0}
        later = {name: getattr(self, name) for name in _LATER_OUTPUT_FIELDS
                 if getattr(self, name) != _DEFAULTS[name]}
        if "save_additional_columns" in later:
            later["save_additional_columns"] = list(later["save_additional_columns"])  # as JSON reads it back
        if "max_aspect_ratio" in later:
            later["max_aspect_ratio"] = float(later["max_aspect_ratio"])
        return {name: getattr(self, name) for name in _OUTPUT_FIELDS} | later | order

    @property
    def shard_prefix(self) -> str:
        return "shard" if self.num_nodes == 1 else f"shard-r{self.node_rank:03d}"

    def owns(self, row_index: int) -> bool:
        return (row_index // self.split_rows) % self.num_nodes == self.node_rank


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(IngestConfig) if f.name in _LATER_OUTPUT_FIELDS}


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
