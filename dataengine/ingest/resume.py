"""Ingest's resume side: the recorded output config, and the done prefix of shards a re-run continues after."""

from __future__ import annotations

import collections
import io
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dataengine.errors import OutputExistsError
from dataengine.fs import Location
from dataengine.ingest.config import UNSHUFFLED, IngestConfig
from dataengine.ingest.seen import KeySet
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
    seen_keys: KeySet = field(default_factory=KeySet)


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
        state.num_shards += bool(stats["name"])
        state.num_samples += stats["num_samples"]
        if stats["num_samples"]:
            table = read_part(out, stats["part"], columns=["key", "sha256"])
            keys = table["key"].to_pylist()
            state.seen_keys.add_many(keys)
            for key, digest in zip(keys, table["sha256"].to_pylist()):
                if digest is not None:  # None: a metadata-only row
                    state.seen_hashes.setdefault(bytes.fromhex(digest)[:16], key)
    state.counts = dict(counts)
    return state


def read_part(out: Location, part: str, columns: list[str] | None = None) -> "pa.Table":
    """A shard's metadata part. ``ParquetFile`` rather than ``read_table``: the latter imports pyarrow.dataset
    and pyarrow.compute (~0.05 s of CPU, a sizeable share of a small ingest)."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(io.BytesIO(out.read_bytes(f"meta/{part}.parquet"))).read(columns=columns)
    schema = meta_schema()
    if columns is None and not table.schema.equals(schema) and table.schema.names == schema.names:
        table = table.cast(schema)  # an empty part's nulls typed; a URL list's extra columns are kept
    return table


def check_output(out: Location, config: IngestConfig) -> str:
    """What ``out`` holds for ``config``, found without writing anything.

    Returns:
        ``"complete"`` (nothing to do), ``"partial"`` (resume it), ``"new"``, or ``"replace"``: another
        configuration, replaced because of ``overwrite``, or because it recorded no work at all (what a
        command that failed on its input leaves, which must not make the corrected command refuse ``out``).

    Raises:
        OutputExistsError: ``out`` holds work of another configuration and ``overwrite`` is not set.
    """
    if not out.exists("ingest_config.json"):
        return "new"
    recorded = UNSHUFFLED | out.read_json("ingest_config.json")  # written before ingest could shuffle
    if recorded == config.output_config():
        return "complete" if out.exists("manifest.json") else "partial"
    if config.overwrite or (config.num_nodes == recorded.get("num_nodes") == 1 and not _work_recorded(out)):
        return "replace"
    raise OutputExistsError(f"{out.url} holds an ingest made with another configuration ({recorded}); "
                            "use another --out or --overwrite")


def _work_recorded(out: Location) -> bool:
    return bool(out.exists("manifest.json") or out.listdir("stats") or out.listdir("nodes"))


def start_output(out: Location, config: IngestConfig, replace: bool) -> None:
    """Create ``out`` and record ``config`` in it (first removing what another configuration left)."""
    if replace:
        _clear(out)
    out.makedirs()
    out.write_json("ingest_config.json", config.output_config())


def _clear(out: Location) -> None:
    logger.warning("removing the previous ingest (another configuration) in %s", out.url)
    for folder in ("shards", "stats", "ledger", "meta", "nodes"):
        if out.exists(folder):
            out.fs.rm(out.path(folder), recursive=True)
    for name in ("manifest.json", "metadata.parquet", "ledger.jsonl", "ingest_config.json"):
        out.remove(name)
