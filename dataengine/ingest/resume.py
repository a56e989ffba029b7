"""Ingest's resume side: the recorded output config, and the done prefix of shards a re-run continues after."""

from __future__ import annotations

import collections
import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dataengine.errors import OutputExistsError
from dataengine.fs import Location
from dataengine.ingest.config import IngestConfig
from dataengine.metadata_table import meta_schema

if TYPE_CHECKING:
    import pyarrow as pa

logger = logging.getLogger(__name__)


@dataclass
class ResumeState:
    """What the done prefix of this node's shards holds: where to continue, and what was already seen."""

    next_index: int = 0
    input_end: int = 0
    num_shards: int = 0
    num_samples: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seen_hashes: dict[bytes, str] = field(default_factory=dict)
    seen_keys: set[str] = field(default_factory=set)


def done_stats(out: Location, prefix: str) -> list[dict[str, Any]]:
    """Stats of this node's done shards: the contiguous prefix ``prefix-000000``, ``prefix-000001``..."""
    names = set(out.listdir("stats"))
    stats = []
    while f"{prefix}-{len(stats):06d}.json" in names:
        stats.append(out.read_json(f"stats/{prefix}-{len(stats):06d}.json"))
    return stats


def resume_state(out: Location, config: IngestConfig) -> ResumeState:
    """The state after this node's done shards (hashes and keys reloaded from their metadata parts)."""
    state = ResumeState()
    counts: collections.Counter = collections.Counter()
    for stats in done_stats(out, config.shard_prefix):
        state.next_index, state.input_end = stats["index"] + 1, stats["input_end"]
        counts.update(stats["counts"])
        if stats["name"]:
            state.num_shards += 1
            state.num_samples += stats["num_samples"]
            table = read_part(out, stats["part"], columns=["key", "sha256"])
            for key, digest in zip(table["key"].to_pylist(), table["sha256"].to_pylist()):
                state.seen_hashes.setdefault(bytes.fromhex(digest)[:16], key)
                state.seen_keys.add(key)
    state.counts = dict(counts)
    return state


def read_part(out: Location, part: str, columns: list[str] | None = None) -> "pa.Table":
    """A shard's metadata part. ``ParquetFile`` rather than ``read_table``: the latter imports pyarrow.dataset
    and pyarrow.compute (~0.05 s of CPU, a sizeable share of a small ingest)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(io.BytesIO(out.read_bytes(f"meta/{part}.parquet"))).read(columns=columns)
    schema = meta_schema()
    if columns is None and not table.schema.equals(schema):
        table = table.cast(schema)
    return table


def check_config(out: Location, config: IngestConfig) -> bool:
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
