"""Ingest's merge: once every node is done, its parts become ``metadata.parquet``, ``ledger.jsonl`` and last
``manifest.json``."""

from __future__ import annotations

import collections
import io
import logging
import os
from typing import Any

import numpy as np

from dataengine.errors import InputUnusableError
from dataengine.fs import Location, create_private
from dataengine.ingest.config import STATUSES, IngestConfig
from dataengine.ingest.resume import done_stats, read_part
from dataengine.metadata_table import meta_schema
from dataengine.shards import build_manifest

logger = logging.getLogger(__name__)


def _all_node_stats(out: Location, config: IngestConfig) -> list[dict[str, Any]]:
    stats = []
    for rank in range(config.num_nodes):
        prefix = "shard" if config.num_nodes == 1 else f"shard-r{rank:03d}"
        stats.extend(done_stats(out, prefix))
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
    metadata_only = recorded.get("metadata_only", False)
    config = IngestConfig(out=out_url, yfcc=recorded["yfcc"], images=recorded["images"],
                          download=recorded["download"], url_list=recorded.get("url_list"),
                          metadata_only=metadata_only, num_nodes=num_nodes, workers=0)
    all_stats = _all_node_stats(out, config)
    parts = [s for s in all_stats if s["num_samples"]]
    counts = collections.Counter()
    for stats in all_stats:
        counts.update(stats["counts"])
    if not counts.get("ok"):
        usable = "valid photo line" if metadata_only else "usable image"
        raise InputUnusableError(f"no {usable} among {sum(counts.values())} input rows: {dict(counts)}")
    cross_dups = _write_metadata(out, parts, num_nodes, bool(recorded.get("url_list")))
    _write_ledger(out, all_stats)
    manifest = build_manifest(recorded, [s for s in parts if s["name"]],
                              {status: counts.get(status, 0) for status in STATUSES}, cross_dups)
    if metadata_only:
        manifest["metadata_rows"] = sum(s["num_samples"] for s in parts)
    out.write_json("manifest.json", manifest)
    return manifest


def _write_metadata(out: Location, parts: list[dict[str, Any]], num_nodes: int, extra_columns: bool) -> int:
    """Concatenate the metadata parts into ``metadata.parquet``, one part in memory at a time; returns the
    cross-node duplicates. A part's rows get the index of their shard (-1 for metadata-only parts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataengine.foreign_shards import conform, unified_schema

    local = os.path.join(out.scratch_dir(), "metadata.parquet.partial")
    seen: dict[str, int] = {}
    cross = 0
    schema = meta_schema()
    if extra_columns:  # a URL list's: the ingest columns, then the extra columns of every part
        schema = unified_schema([pq.ParquetFile(io.BytesIO(out.read_bytes(f"meta/{s['part']}.parquet"))).schema_arrow
                                 for s in parts])
    with create_private(local) as handle, pq.ParquetWriter(handle, schema, compression="zstd") as writer:
        index = 0
        for stats in parts:
            table = read_part(out, stats["part"])
            table = conform(table, schema) if extra_columns else table
            if stats["name"]:
                table = table.set_column(table.schema.get_field_index("shard"), "shard",
                                         pa.array(np.full(table.num_rows, index, np.int32)))
                index += 1
            writer.write_table(table)
            if num_nodes > 1 and stats["name"]:
                for digest in table["sha256"].to_pylist():
                    rank = seen.setdefault(digest, stats["node_rank"])
                    cross += rank != stats["node_rank"]
    out.publish(local, "metadata.parquet")
    return cross


def _write_ledger(out: Location, all_stats: list[dict[str, Any]]) -> None:
    local = os.path.join(out.scratch_dir(), "ledger.jsonl.partial")
    with create_private(local) as handle:
        for stats in all_stats:
            handle.write(out.read_bytes(f"ledger/{stats['part']}.jsonl"))
    out.publish(local, "ledger.jsonl")
