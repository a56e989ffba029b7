"""Ingest: photos + YFCC100M metadata (or an image folder / tar) -> webdataset shards, resumably.

Design (see README, "Ingest output"):

* The main process enumerates input rows in order and hands blocks of rows to ``workers`` processes, which
  fetch bytes (read, or download), normalise images and build each sample's tar members (through a shared
  memory arena, not the pool's pipe). Results come back *in input order* and the main process alone packs
  them into shards of exactly ``shard_size`` samples (the last one may be smaller).
* A shard is built in a local scratch file, published atomically (rename, or upload), followed by its
  ledger part, its metadata part and last its stats file: a shard is done only when its stats exist. Done
  shards always form a prefix, so a re-run after SIGKILL resumes at the first row after the last done shard,
  with the set of already-seen hashes reloaded, and produces byte-identical shards.
* Exact duplicates (same sha256 of the original bytes) are dropped in input order (the first one wins).
* With several nodes, input rows are dealt out in blocks of ``split_rows`` rows round-robin; each node
  writes its own shards (``shard-r003-000000.tar``) and a done marker; whichever node finds all markers
  present merges: ``metadata.parquet``, ``ledger.jsonl`` and last ``manifest.json``. Duplicates are found
  within a node; duplicates across nodes are counted in the manifest (``cross_node_duplicates``).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import logging
import mmap
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dataengine.download import Downloader
from dataengine.errors import InputUnusableError, OutputExistsError
from dataengine.fs import Location
from dataengine.images import (DEFAULT_MAX_PIXELS, ImageRejected, normalize_image, preload_plugins,
                               reuse_image_buffers)
from dataengine.metadata_table import meta_schema, rows_to_parquet_bytes
from dataengine.sources import Fetcher, Row, iter_rows
from dataengine.workers import OrderedWorkers

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)

FORMAT = "dataengine.shards"
VERSION = 1
STATUSES = ("ok", "missing", "corrupt", "duplicate", "video", "bad_metadata", "download_failed")
# Only these fields change what is written; the others (workers, credentials...) may differ on resume.
_OUTPUT_FIELDS = ("yfcc", "images", "download", "shard_size", "image_size", "quality", "keep_duplicates",
                  "max_pixels", "num_nodes", "split_rows")


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
    """Seconds before an HTTP request times out."""
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
        for name in ("shard_size", "image_size", "num_nodes", "split_rows", "block_rows", "download_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be in [1, 100], got {self.quality}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if not 0 <= self.node_rank < self.num_nodes:
            raise ValueError(f"node_rank must be in [0, {self.num_nodes}), got {self.node_rank}")

    def output_config(self) -> dict[str, Any]:
        """The fields that determine the output (recorded in the manifest, checked on resume)."""
        return {name: getattr(self, name) for name in _OUTPUT_FIELDS}

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


@dataclass
class Sample:
    """One processed input row (workers return its fields as a plain tuple, the cheapest to pickle)."""

    row: int
    key: str | None
    status: str
    error: str | None = None
    metadata: dict[str, Any] | None = None
    """ok samples: the sample's metadata (also its ``.json`` member), completed into its parquet row."""
    sha256: str | None = None
    member: bytes | memoryview | None = None
    """ok samples: the ready-to-write tar bytes of ``<key>.jpg`` then ``<key>.json`` (headers, data, padding)."""
    jpeg_size: int = 0
    """Bytes of the JPEG, whose data starts 512 bytes into ``member``."""


# ----------------------------------------------------------------------------------------------- workers

_worker_fetcher: Fetcher | None = None
_worker_config: IngestConfig | None = None
_worker_arena: Any = None  # shared memory (fork only): one slot per in-flight block for its members
_worker_slot_size = 0

_SAMPLE_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)  # == json.dumps(..., same options)
_LEDGER_JSON = json.JSONEncoder(ensure_ascii=False)
_ZEROS = memoryview(bytes(512))


def _init_worker(config: IngestConfig, arena: Any = None, slot_size: int = 0) -> None:
    global _worker_fetcher, _worker_config, _worker_arena, _worker_slot_size
    downloader = None
    if config.download:
        downloader = Downloader(config.download_threads, config.download_timeout, config.download_retries)
    _worker_fetcher = Fetcher(config.images, config.download, config.storage_options, downloader)
    _worker_config = config
    _worker_arena, _worker_slot_size = arena, slot_size


def _init_pool_worker(config: IngestConfig, arena: Any, slot_size: int) -> None:
    _init_worker(config, arena, slot_size)
    # Workers that received image bytes by pickle got this by luck (see reuse_image_buffers); without it,
    # measured on 4,000 photos: 260,000 page faults and +0.7 CPU-s in the workers.
    reuse_image_buffers()


def _process_block(rows: list[Row], slot: int = -1) -> list[tuple]:
    """Fetch and normalise a block of rows (runs in a worker process); returns :class:`Sample` fields.

    The tar members of each ok sample are built here, so that the single writer only concatenates them.
    With a shared ``slot`` they are written into the arena and returned as ``(position, length)``;
    members that do not fit (or without an arena) travel as bytes.
    """
    config = _worker_config
    arena = _worker_arena if slot >= 0 else None
    position = slot * _worker_slot_size
    end = position + _worker_slot_size
    samples = []
    for row, fetched in zip(rows, _worker_fetcher.fetch_block(rows)):
        if fetched.status != "ok":
            samples.append((row.index, fetched.key, fetched.status, fetched.error))
            continue
        sha256 = hashlib.sha256(fetched.data).hexdigest()
        try:
            image = normalize_image(fetched.data, config.image_size, config.quality, config.max_pixels)
        except ImageRejected as exc:
            samples.append((row.index, fetched.key, "corrupt", str(exc)))
            continue
        metadata = fetched.metadata
        metadata.update(width=image.width, height=image.height, sha256=sha256, key=fetched.key)
        document = _SAMPLE_JSON.encode(metadata).encode()
        jpeg = image.jpeg
        member: Any = b"".join((_ustar_header(f"{fetched.key}.jpg", len(jpeg)), jpeg, _ZEROS[: -len(jpeg) % 512],
                                _ustar_header(f"{fetched.key}.json", len(document)), document,
                                _ZEROS[: -len(document) % 512]))
        size = len(member)
        if arena is not None and position + size <= end:
            arena[position : position + size] = member
            member = (position, size)
            position += size
        samples.append((row.index, fetched.key, "ok", None, metadata, sha256, member, len(jpeg)))
    return samples


def _process_task(task: tuple[list[Row], int]) -> list[tuple]:
    return _process_block(*task)


def _ordered_results(config: IngestConfig, blocks: Iterable[list[Row]]) -> Iterator[list[Sample]]:
    """Process blocks on a worker pool, yielding results in input order with bounded look-ahead.

    With fork, workers write the members of a block into a slot of a shared arena (one slot per block in
    flight, reused once the block has been consumed) instead of pickling them back through the pool's pipe:
    moving 60 MB of members that way cost ~0.3 CPU-s against ~0.1 for hashing and writing them from the
    arena. Members handed out as views are valid until the next block is asked for; they are released then,
    so that a view kept too long fails loudly rather than reading a reused slot.
    """
    if config.workers == 0:
        _init_worker(config)
        for block in blocks:
            yield [Sample(*fields) for fields in _process_block(block)]
        return
    # fork starts workers instantly with everything imported; but fork cannot safely copy a process that
    # runs other threads (s3fs's event loop once object storage was touched): then spawn.
    fork = threading.active_count() == 1
    context = multiprocessing.get_context("fork" if fork else "spawn")
    if fork:
        preload_plugins()  # once here rather than in every worker
    in_flight = 4 * config.workers
    slot_size = max(1 << 20, config.block_rows << 16)  # 64 KiB per row; a member that does not fit is pickled
    arena = None
    if fork:
        try:
            arena = mmap.mmap(-1, in_flight * slot_size)  # shared and anonymous: the forked workers see it
        except OSError as exc:  # strict overcommit on a huge pool: members go through the pipe
            logger.warning("no shared arena for worker results (%s)", exc)
    view = memoryview(arena) if arena is not None else None
    handed_out: list[memoryview] = []

    def collect(result: list[tuple]) -> list[Sample]:
        samples = [Sample(*fields) for fields in result]
        if view is not None:
            for sample in samples:
                if type(sample.member) is tuple:
                    start, length = sample.member
                    sample.member = view[start : start + length]
                    handed_out.append(sample.member)
        return samples

    def release() -> None:
        for member in handed_out:
            member.release()
        handed_out.clear()

    tasks = ((block, sequence % in_flight if arena is not None else -1) for sequence, block in enumerate(blocks))
    try:
        with OrderedWorkers(context, config.workers, _process_task, initializer=_init_pool_worker,
                            initargs=(config, arena, slot_size if arena is not None else 0)) as workers:
            # Slots are reused round-robin: block `sequence` takes the slot of block `sequence - in_flight`, which
            # was consumed (imap submits it only once the caller has asked for the next result).
            for result in workers.imap(tasks, ahead=in_flight):
                yield collect(result)
                release()
    finally:
        release()
        if view is not None:
            view.release()


def _blocks(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    block: list[Row] = []
    for row in rows:
        block.append(row)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


# ----------------------------------------------------------------------------------------------- writing


class _TarBuilder:
    """A deterministic USTAR file in a local scratch file (fixed mtime, owner and mode).

    Headers are packed directly (tarfile's header code costs ~80 us per member) by the workers, which build
    each sample's members (see :func:`_process_block`): adding a sample here is one write and one hash
    update. The result is a plain POSIX tar that tarfile and webdataset read.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._file = open(path, "wb", buffering=1 << 20)
        self._hasher = hashlib.sha256()
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes that are already tar members (headers, data, padding)."""
        self._file.write(data)
        self._hasher.update(data)
        self.offset += len(data)

    def close(self) -> tuple[int, str]:
        """Finish the tar (two zero blocks, padded to tar's 10 KiB record); returns its size and sha256."""
        end = 1024 + (-(self.offset + 1024) % 10240)
        self.write(b"\0" * end)
        self._file.close()
        return self.offset, self._hasher.hexdigest()


def _header_template() -> tuple[bytes, int]:
    header = bytearray(512)
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime 0: reproducible shards
    header[148:156] = b" " * 8  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_HEADER, _HEADER_SUM = _header_template()


def _ustar_header(name: str, size: int) -> bytes:
    """A USTAR header; the checksum is the template's byte sum plus that of the name and size fields."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a USTAR header")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_HEADER_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded, _HEADER[len(encoded) : 124], size_field, _HEADER[136:148], checksum, _HEADER[156:]))


class ShardWriter:
    """Packs samples, in input order, into shards of ``shard_size`` and publishes each one atomically."""

    def __init__(self, out: Location, config: IngestConfig, state: "_ResumeState") -> None:
        self.out = out
        self.config = config
        self.index = state.next_index
        self.seen_hashes = state.seen_hashes
        self.seen_keys = state.seen_keys
        self.input_start = state.input_end
        self.scratch = out.scratch_dir()
        self.done_counts = collections.Counter(state.counts)
        self.num_shards = state.num_shards
        self.num_samples = state.num_samples
        self._reset()

    def _reset(self) -> None:
        self._tar: _TarBuilder | None = None
        self._meta: list[dict[str, Any]] = []
        self._ledger: list[dict[str, Any]] = []
        self._counts: collections.Counter = collections.Counter()
        self._last_row = self.input_start - 1
        self._shard = f"shards/{self.name}.tar"

    @property
    def name(self) -> str:
        return f"{self.config.shard_prefix}-{self.index:06d}"

    def add(self, sample: Sample) -> None:
        """Record one row; ok samples go into the open shard, which closes once full."""
        self._classify(sample)
        shard = self._shard if sample.status == "ok" else None
        self._ledger.append({"row": sample.row, "id": sample.key, "status": sample.status,
                             "error": sample.error, "shard": shard})
        self._counts[sample.status] += 1
        self._last_row = sample.row
        if sample.status == "ok":
            self._write_sample(sample)
            if len(self._meta) == self.config.shard_size:
                self.close_shard()

    def _classify(self, sample: Sample) -> None:
        if sample.status != "ok":
            return
        if sample.key in self.seen_keys:
            sample.status, sample.error = "bad_metadata", f"photo id {sample.key} appears again"
            return
        digest = bytes.fromhex(sample.sha256)[:16]
        first = self.seen_hashes.get(digest)
        if first is not None and not self.config.keep_duplicates:
            sample.status, sample.error = "duplicate", f"same bytes as {first}"
            return
        self.seen_hashes.setdefault(digest, sample.key)
        self.seen_keys.add(sample.key)

    def _write_sample(self, sample: Sample) -> None:
        if self._tar is None:
            self._tar = _TarBuilder(os.path.join(self.scratch, f"{self.name}.tar.partial"))
        offset = self._tar.offset + 512  # the JPEG's data follows its header
        self._tar.write(sample.member)
        row = sample.metadata  # the worker's copy: completed in place into the parquet row
        row.update(shard=-1, position=len(self._meta), offset=offset, size=sample.jpeg_size)
        self._meta.append(row)

    def close_shard(self) -> None:
        """Publish the open shard: tar, ledger part, metadata part, and last its stats."""
        if not self._ledger:
            return
        stats: dict[str, Any] = {"index": self.index, "part": self.name, "name": None, "num_samples": len(self._meta), "bytes": 0,
                                 "sha256": None, "input_start": self.input_start, "input_end": self._last_row + 1,
                                 "counts": dict(self._counts), "node_rank": self.config.node_rank}
        if self._tar is not None:
            size, digest = self._tar.close()
            stats.update(name=self._shard, bytes=size, sha256=digest)
            self.out.publish(self._tar.path, stats["name"])
            self.out.write_bytes(f"meta/{self.name}.parquet", rows_to_parquet_bytes(self._meta))
            self.num_shards += 1
        ledger = "".join(_LEDGER_JSON.encode(entry) + "\n" for entry in self._ledger)
        self.out.write_bytes(f"ledger/{self.name}.jsonl", ledger.encode())
        self.out.write_json(f"stats/{self.name}.json", stats)
        self.done_counts.update(self._counts)
        self.num_samples += len(self._meta)
        self.index += 1
        self.input_start = self._last_row + 1
        self._reset()


# ----------------------------------------------------------------------------------------------- resume


@dataclass
class _ResumeState:
    next_index: int = 0
    input_end: int = 0
    num_shards: int = 0
    num_samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seen_hashes: dict[bytes, str] = field(default_factory=dict)
    seen_keys: set[str] = field(default_factory=set)


def _done_stats(out: Location, prefix: str) -> list[dict[str, Any]]:
    """Stats of this node's done shards: the contiguous prefix ``prefix-000000``, ``prefix-000001``..."""
    names = set(out.listdir("stats"))
    stats = []
    while f"{prefix}-{len(stats):06d}.json" in names:
        stats.append(out.read_json(f"stats/{prefix}-{len(stats):06d}.json"))
    return stats


def _resume_state(out: Location, config: IngestConfig) -> _ResumeState:
    state = _ResumeState()
    counts: collections.Counter = collections.Counter()
    for stats in _done_stats(out, config.shard_prefix):
        state.next_index, state.input_end = stats["index"] + 1, stats["input_end"]
        counts.update(stats["counts"])
        if stats["name"]:
            state.num_shards += 1
            state.num_samples += stats["num_samples"]
            table = _read_part(out, stats["part"], columns=["key", "sha256"])
            for key, digest in zip(table["key"].to_pylist(), table["sha256"].to_pylist()):
                state.seen_hashes.setdefault(bytes.fromhex(digest)[:16], key)
                state.seen_keys.add(key)
    state.counts = dict(counts)
    return state


def _read_part(out: Location, part: str, columns: list[str] | None = None) -> "pa.Table":
    """A shard's metadata part. ``ParquetFile`` rather than ``read_table``: the latter imports pyarrow.dataset
    and pyarrow.compute (~0.05 s of CPU, a sizeable share of a small ingest)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(io.BytesIO(out.read_bytes(f"meta/{part}.parquet"))).read(columns=columns)
    schema = meta_schema()
    if columns is None and not table.schema.equals(schema):
        table = table.cast(schema)
    return table


def _check_config(out: Location, config: IngestConfig) -> bool:
    """Record the output config, or check it against the recorded one. True when the ingest is complete."""
    wanted = config.output_config()
    if out.exists("ingest_config.json"):
        recorded = out.read_json("ingest_config.json")
        if recorded != wanted:
            if not config.overwrite:
                raise OutputExistsError(
                    f"{out.url} holds an ingest made with another configuration ({recorded}); "
                    "use another --out or --overwrite"
                )
            _clear(out)
        else:
            return out.exists("manifest.json")
    out.makedirs()
    out.write_json("ingest_config.json", wanted)
    return False


def _clear(out: Location) -> None:
    logger.warning("--overwrite: removing the previous ingest in %s", out.url)
    for folder in ("shards", "stats", "ledger", "meta", "nodes"):
        if out.exists(folder):
            out.fs.rm(out.path(folder), recursive=True)
    for name in ("manifest.json", "metadata.parquet", "ledger.jsonl", "ingest_config.json"):
        out.remove(name)


# ----------------------------------------------------------------------------------------------- merge


def _all_node_stats(out: Location, config: IngestConfig) -> list[dict[str, Any]]:
    stats = []
    for rank in range(config.num_nodes):
        prefix = "shard" if config.num_nodes == 1 else f"shard-r{rank:03d}"
        stats.extend(_done_stats(out, prefix))
    return stats


def merge(out_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Write ``metadata.parquet``, ``ledger.jsonl`` and ``manifest.json`` once every node is done.

    Returns the manifest, or ``None`` when some node has not finished yet.
    """
    out = Location(out_url, storage_options)
    recorded = out.read_json("ingest_config.json")
    num_nodes = recorded["num_nodes"]
    markers = set(out.listdir("nodes"))
    missing = [r for r in range(num_nodes) if f"node-{r:03d}.json" not in markers]
    if missing:
        logger.info("merge waits for node(s) %s", missing)
        return None
    config = IngestConfig(out=out_url, yfcc=recorded["yfcc"], images=recorded["images"],
                          download=recorded["download"], num_nodes=num_nodes, workers=0)
    all_stats = _all_node_stats(out, config)
    shards = [s for s in all_stats if s["name"]]
    counts = collections.Counter()
    for stats in all_stats:
        counts.update(stats["counts"])
    if not counts.get("ok"):
        raise InputUnusableError(f"no usable image among {sum(counts.values())} input rows: {dict(counts)}")
    cross_dups = _write_metadata(out, shards, num_nodes)
    _write_ledger(out, all_stats)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "config": recorded,
        "shards": [{"name": s["name"], "num_samples": s["num_samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                   for s in shards],
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "counts": {status: counts.get(status, 0) for status in STATUSES},
        "cross_node_duplicates": cross_dups,
    }
    out.write_json("manifest.json", manifest)
    return manifest


def _write_metadata(out: Location, shards: list[dict[str, Any]], num_nodes: int) -> int:
    """Concatenate the per-shard metadata parts into ``metadata.parquet``; returns cross-node duplicates."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = os.path.join(out.scratch_dir(), "metadata.parquet.partial")
    seen: dict[str, int] = {}
    cross = 0
    with pq.ParquetWriter(local, meta_schema()) as writer:
        for index, stats in enumerate(shards):
            table = _read_part(out, stats["part"])
            table = table.set_column(table.schema.get_field_index("shard"), "shard",
                                     pa.array([index] * table.num_rows, pa.int32()))
            writer.write_table(table)
            if num_nodes > 1:
                for digest in table["sha256"].to_pylist():
                    rank = seen.setdefault(digest, stats["node_rank"])
                    cross += rank != stats["node_rank"]
    out.publish(local, "metadata.parquet")
    return cross


def _write_ledger(out: Location, all_stats: list[dict[str, Any]]) -> None:
    local = os.path.join(out.scratch_dir(), "ledger.jsonl.partial")
    with open(local, "wb") as handle:
        for stats in all_stats:
            handle.write(out.read_bytes(f"ledger/{stats['part']}.jsonl"))
    out.publish(local, "ledger.jsonl")


# ----------------------------------------------------------------------------------------------- run


def run_ingest(config: IngestConfig, progress: Callable[[int], None] | None = None) -> IngestResult:
    """Ingest ``config``'s input into shards under ``config.out``, resuming any earlier partial run.

    Args:
        config: what to ingest and how.
        progress: called with the number of input rows just finished.

    Raises:
        InputUnusableError: the input has no rows, or no row gave a usable image.
        OutputExistsError: ``out`` holds an ingest with another configuration (and not ``overwrite``).
    """
    start = time.perf_counter()
    out = Location(config.out, config.storage_options)
    if _check_config(out, config):
        manifest = out.read_json("manifest.json")
        logger.info("%s is already complete (%d shards); nothing to do", out.url, manifest["num_shards"])
        return _result(out, manifest, time.perf_counter() - start, manifest["num_shards"])
    state = _resume_state(out, config)
    if state.next_index:
        logger.info("resuming: %d stats files done, continuing at input row %d", state.next_index, state.input_end)
    writer = ShardWriter(out, config, state)
    rows = (r for r in iter_rows(config.yfcc, config.images, config.storage_options)
            if r.index >= state.input_end and config.owns(r.index))
    for samples in _ordered_results(config, _blocks(rows, config.block_rows)):
        for sample in samples:
            writer.add(sample)
        if progress:
            progress(len(samples))
    writer.close_shard()
    _finish_node(out, config, writer)
    manifest = merge(config.out, config.storage_options)
    seconds = time.perf_counter() - start
    if manifest is None:
        return IngestResult(out.url, writer.num_shards, writer.num_samples, dict(writer.done_counts), seconds,
                            state.num_shards, complete=False)
    return _result(out, manifest, seconds, state.num_shards)


def _finish_node(out: Location, config: IngestConfig, writer: ShardWriter) -> None:
    counts = dict(writer.done_counts)
    if config.num_nodes == 1 and not sum(counts.values()):
        raise InputUnusableError(f"no input rows found in {config.yfcc or config.images}")
    out.write_json(f"nodes/node-{config.node_rank:03d}.json",
                   {"rank": config.node_rank, "num_shards": writer.num_shards, "counts": counts})


def _result(out: Location, manifest: dict[str, Any], seconds: float, resumed: int) -> IngestResult:
    return IngestResult(out.url, manifest["num_shards"], manifest["num_samples"], manifest["counts"], seconds,
                        resumed, cross_node_duplicates=manifest.get("cross_node_duplicates", 0))
