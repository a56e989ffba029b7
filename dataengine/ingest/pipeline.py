"""Ingest's worker processes: blocks of input rows -> processed samples, returned in input order.

Workers fetch each row's bytes (read, or download), normalise the image and build the sample's tar members
(:func:`dataengine.shards.sample_members`), so that the single writer in the main process only concatenates
them. With fork, members come back through a shared memory arena rather than the workers' pipes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import multiprocessing
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from dataengine.download import Downloader
from dataengine.images import ImageFiltered, ImageRejected, normalize_image, preload_plugins, reuse_image_buffers
from dataengine.ingest.config import IngestConfig
from dataengine.shards import sample_members
from dataengine.sources import MAX_FILE_BYTES, Fetcher, Row
from dataengine.workers import OrderedWorkers

logger = logging.getLogger(__name__)


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


@dataclass
class MetadataBlock:
    """A block of rows in metadata-only mode, by column: each row's index, key, status and error, and the
    parquet rows of its ok ones as one Arrow table built in the worker (a sample dict per row cost the writer
    more than the parsing cost the worker: it was the bottleneck of a metadata-only ingest)."""

    rows: list[int]
    keys: list[str | None]
    statuses: list[str]
    errors: list[str | None]
    table: Any
    """The ok rows' metadata (:func:`~dataengine.metadata_table.meta_schema`), in input order."""

    def __len__(self) -> int:
        return len(self.rows)


_worker_fetcher: Fetcher | None = None
_worker_config: IngestConfig | None = None
_worker_resize: Any = None
_worker_arena: Any = None  # shared memory (fork only): one slot per in-flight block for its members
_worker_slot_size = 0

_SAMPLE_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False)  # == json.dumps(..., same options)


def _init_worker(config: IngestConfig, arena: Any = None, slot_size: int = 0) -> None:
    global _worker_fetcher, _worker_config, _worker_resize, _worker_arena, _worker_slot_size
    downloader = None
    if config.fetches_urls:
        downloader = Downloader(config.download_threads, config.download_timeout, config.download_retries,
                                max_bytes=MAX_FILE_BYTES)
    _worker_fetcher = Fetcher(config.images, config.fetches_urls, config.storage_options, downloader)
    _worker_config, _worker_resize = config, config.resize
    _worker_arena, _worker_slot_size = arena, slot_size


def _init_pool_worker(config: IngestConfig, arena: Any, slot_size: int) -> None:
    _init_worker(config, arena, slot_size)
    # Workers that received image bytes by pickle got this by luck (see reuse_image_buffers); without it,
    # measured on 4,000 photos: 260,000 page faults and +0.7 CPU-s in the workers.
    reuse_image_buffers()


def process_block(rows: list[Row], slot: int = -1) -> list[tuple] | MetadataBlock:
    """Fetch and normalise a block of rows (runs in a worker process, or a Ray task); returns :class:`Sample`
    fields.

    The tar members of each ok sample are built here, so that the single writer only concatenates them.
    With a shared ``slot`` they are written into the arena and returned as ``(position, length)``;
    members that do not fit (or without an arena) travel as bytes.
    """
    config = _worker_config
    if config.metadata_only:
        return _metadata_block(rows)
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
            image = normalize_image(fetched.data, config.image_size, config.quality, config.max_pixels,
                                    _worker_resize)
        except ImageRejected as exc:
            samples.append((row.index, fetched.key, "filtered" if isinstance(exc, ImageFiltered) else "corrupt",
                            str(exc)))
            continue
        metadata = fetched.metadata
        stored = dict(width=image.width, height=image.height, sha256=sha256, key=fetched.key)
        if row.url_row is not None:  # img2dataset's fields
            stored.update(original_width=image.original_width, original_height=image.original_height)
        for name, value in stored.items():  # a webdataset sidecar's own different value is kept beside ours
            if metadata.get(name) not in (None, value):
                metadata[f"sidecar_{name}"] = metadata[name]
        metadata.update(stored)
        document = _SAMPLE_JSON.encode(metadata).encode()
        jpeg = image.jpeg
        member: Any = sample_members(fetched.key, jpeg, document, fetched.extras)
        size = len(member)
        if arena is not None and position + size <= end:
            arena[position : position + size] = member
            member = (position, size)
            position += size
        samples.append((row.index, fetched.key, "ok", None, metadata, sha256, member, len(jpeg)))
    return samples


def _metadata_block(rows: list[Row]) -> MetadataBlock:
    """Metadata-only mode: rows parsed and validated; an ok row's metadata is its whole output (in no shard)."""
    from dataengine.metadata_table import rows_to_table

    parsed = _worker_fetcher.parse_block(rows)
    ok = []
    for item in parsed:
        if item.status == "ok":
            item.metadata.update(key=item.key, shard=-1, position=-1, offset=-1, size=0)
            ok.append(item.metadata)
    return MetadataBlock([row.index for row in rows], [item.key for item in parsed],
                         [item.status for item in parsed], [item.error for item in parsed], rows_to_table(ok))


def _samples(result: list[tuple] | MetadataBlock) -> list[Sample] | MetadataBlock:
    return result if isinstance(result, MetadataBlock) else [Sample(*fields) for fields in result]


def init_for(config: IngestConfig) -> None:
    """Set this process up as a worker of ``config`` unless it already is (a Ray worker's first block)."""
    if _worker_config != config:
        _init_worker(config)
        reuse_image_buffers()


def _process_task(task: tuple[list[Row], int]) -> list[tuple]:
    return process_block(*task)


def ordered_results(config: IngestConfig, blocks: Iterable[list[Row]]) -> Iterator[list[Sample] | MetadataBlock]:
    """Process blocks on a worker pool, yielding results in input order with bounded look-ahead.

    With fork, workers write the members of a block into a slot of a shared arena (one slot per block in
    flight, reused once the block has been consumed) instead of pickling them back through the pool's pipe:
    moving 60 MB of members that way cost ~0.3 CPU-s against ~0.1 for hashing and writing them from the
    arena. Members handed out as views are valid until the next block is asked for; they are released then,
    so that a view kept too long fails loudly rather than reading a reused slot.
    """
    if config.distributor == "ray":
        from dataengine.ingest.distributed import ray_results

        for result in ray_results(config, blocks):
            yield _samples(result)
        return
    if config.workers == 0:
        _init_worker(config)
        for block in blocks:
            yield _samples(process_block(block))
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

    def collect(result: list[tuple] | MetadataBlock) -> list[Sample] | MetadataBlock:
        samples = _samples(result)
        if view is not None and not isinstance(samples, MetadataBlock):
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


def blocks_of(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    """``rows`` in lists of ``size`` (the last one may be shorter): the work items sent to workers."""
    block: list[Row] = []
    for row in rows:
        block.append(row)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block
