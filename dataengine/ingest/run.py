"""The ingest stage: check the output, resume after its done shards, process the rows, merge."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from dataengine.errors import InputUnusableError
from dataengine.fs import Location
from dataengine.locks import check_output_path, locked_output
from dataengine.ingest.config import IngestConfig, IngestResult
from dataengine.ingest.merging import merge
from dataengine.ingest.order import ingest_order
from dataengine.ingest.pipeline import blocks_of, ordered_results
from dataengine.ingest.resume import check_output, resume_state, start_output
from dataengine.ingest.writer import ShardWriter
from dataengine.sources import check_inputs, iter_rows

logger = logging.getLogger(__name__)


def run_ingest(config: IngestConfig, progress: Callable[[int], None] | None = None) -> IngestResult:
    """Ingest ``config``'s input into shards under ``config.out``, resuming any earlier partial run.

    Args:
        config: what to ingest and how.
        progress: called with the number of input rows just finished.

    Raises:
        InputUnusableError: the input is missing, has no rows, or no row gave a usable image (nothing is
            written when the input is missing or not what it should be).
        InputCorruptError: the metadata file or the images tar is truncated or malformed.
        OutputExistsError: ``out`` holds an ingest with another configuration (and not ``overwrite``).
        OutputUnusableError: ``out`` is a file, lies under a file, or is not writable.
        OutputLockedError: another run is writing ``out`` (or this node's part of it).
    """
    start = time.perf_counter()
    check_output_path(config.out)
    out = Location(config.out, config.storage_options)
    found = check_output(out, config)
    if found == "complete":
        return _complete(out, start)
    # before writing anything
    check_inputs(config.yfcc, config.images, config.download, config.storage_options, config.url_list_spec)
    # Each node of a multi-node ingest writes its own part of the output, under its own lock.
    part = f"node-{config.node_rank:03d}" if config.node_rank else ""
    with locked_output(config.out, config.storage_options, part=part):
        found = check_output(out, config)  # again: another run may have changed it before we held the lock
        if found == "complete":
            return _complete(out, start)
        return _ingest(out, config, found, start, progress)


def run_merge(out_url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """:func:`~dataengine.ingest.merging.merge` the finished nodes' parts under the output's lock (node 0's).

    Returns the manifest, or ``None`` when some node has not finished yet.
    """
    with locked_output(out_url, storage_options):
        return merge(out_url, storage_options)


def _complete(out: Location, start: float) -> IngestResult:
    manifest = out.read_json("manifest.json")
    logger.info("%s is already complete (%d shards); nothing to do", out.url, manifest["num_shards"])
    return _result(out, manifest, time.perf_counter() - start, manifest["num_shards"])


def _ingest(out: Location, config: IngestConfig, found: str, start: float,
            progress: Callable[[int], None] | None) -> IngestResult:
    if found != "partial":
        start_output(out, config, replace=found == "replace")
    state = resume_state(out, config)
    if state.next_index:
        logger.info("resuming: %d stats files done, continuing at input row %d", state.next_index, state.input_end)
    writer = ShardWriter(out, config, state)
    spool = os.path.join(out.scratch_dir(), f"ingest-spool-{config.node_rank:03d}")
    try:
        ordered = ingest_order(iter_rows(config.yfcc, config.images, config.storage_options, config.url_list_spec),
                               config.shuffled, config.seed, spool)
        rows = (r for r in ordered if r.index >= state.input_end and config.owns(r.index))
        for samples in ordered_results(config, blocks_of(rows, config.rows_per_block)):
            writer.add_block(samples)
            if progress:
                progress(len(samples))
        writer.close_shard()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(spool)
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
        raise InputUnusableError(f"no input rows found in {config.source}")
    out.write_json(f"nodes/node-{config.node_rank:03d}.json",
                   {"rank": config.node_rank, "num_shards": writer.num_shards, "counts": counts})


def _result(out: Location, manifest: dict[str, Any], seconds: float, resumed: int) -> IngestResult:
    return IngestResult(out.url, manifest["num_shards"], manifest["num_samples"], manifest["counts"], seconds,
                        resumed, cross_node_duplicates=manifest.get("cross_node_duplicates", 0))
