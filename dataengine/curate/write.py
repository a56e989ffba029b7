"""The curated shard set on disk: the recorded config, the selection and ledger, shards, metadata, manifest.

The output has the layout of an ingest output (see :mod:`dataengine.shards`), so ``embed``, ``train``,
``report`` and webdataset read it as they read an ingest::

    OUT/curate_config.json          the output-defining config (a re-run with another one is refused)
    OUT/selection.npz               every source row's status, cluster, earlier near-duplicate and similarity
    OUT/ledger.jsonl                the same, one JSON line per source row, in source order
    OUT/shards/shard-000000.tar     the kept samples (<key>.jpg, <key>.json and any sidecars, bytes as in the
                                    source)
    OUT/meta/shard-000000.parquet   their metadata rows (shard, position, offset and size of the new tars)
    OUT/stats/shard-000000.json     a shard is done only when its stats exist (done shards form a prefix)
    OUT/metadata.parquet            one row per kept sample, in shard order
    OUT/cluster_sizes.csv           per cluster of the curation level: rows, near-duplicates, kept
    OUT/curate.json                 the summary: counts, size distribution and NMI before and after
    OUT/manifest.json               written last: format, version, config, shards, counts per status

The selection and ledger are written before any shard, so a re-run after a kill reloads the decision rather
than recomputing it, and continues after the last done shard.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dataengine.curate.config import STATUSES, CurateConfig
from dataengine.curate.select import NEAR_DUPLICATE, SELECTED, Selection, reasons
from dataengine.errors import InputUnusableError, OutputExistsError
from dataengine.fs import Location, open_input
from dataengine.shards import IMAGE_DATA_OFFSET, ShardSet, sample_members, sample_stream
from dataengine.tario import TarWriter

logger = logging.getLogger(__name__)

CONFIG_FILE = "curate_config.json"
SELECTION_FILE = "selection.npz"
_OUTPUTS = ("shards", "meta", "stats")
_FILES = ("manifest.json", "metadata.parquet", "ledger.jsonl", "curate.json", "cluster_sizes.csv", SELECTION_FILE,
          CONFIG_FILE)
_LEDGER_JSON = json.JSONEncoder(ensure_ascii=False)


def check_config(out: Location, config: CurateConfig, wanted: dict[str, Any]) -> bool:
    """Record the output config, or check it against the recorded one. True when the curation is complete."""
    if out.exists(CONFIG_FILE):
        recorded = out.read_json(CONFIG_FILE)
        if recorded == wanted:
            return out.exists("manifest.json")
        if not config.overwrite:
            raise OutputExistsError(f"{out.url} holds a curation made with another configuration ({recorded}); "
                                    "use another --out or --overwrite")
        logger.warning("--overwrite: removing the previous curation in %s", out.url)
        _clear(out)
    elif out.listdir():
        raise OutputExistsError(f"{out.url} exists and is not a curation output; choose another --out")
    out.makedirs()
    out.write_json(CONFIG_FILE, wanted)
    return False


def _clear(out: Location) -> None:
    for folder in _OUTPUTS:
        if out.exists(folder):
            out.fs.rm(out.path(folder), recursive=True)
    for name in _FILES:
        out.remove(name)


# ------------------------------------------------------------------------------------------- the selection


def save_selection(out: Location, selection: Selection, keys: list[str], strategy: str, shard_size: int) -> None:
    """Write ``selection.npz`` then ``ledger.jsonl`` (both atomically)."""
    buffer = io.BytesIO()
    np.savez(buffer, status=selection.status, cluster=selection.cluster, duplicate_of=selection.duplicate_of,
             similarity=selection.similarity, level=np.int64(selection.level),
             num_clusters=np.int64(selection.num_clusters))
    out.write_bytes(SELECTION_FILE, buffer.getvalue())
    local = os.path.join(out.scratch_dir(), "ledger.jsonl.partial")
    with open(local, "w", encoding="utf-8") as handle:
        for lines in _ledger_lines(selection, keys, strategy, shard_size):
            handle.write(lines)
    out.publish(local, "ledger.jsonl")


def _ledger_lines(selection: Selection, keys: list[str], strategy: str, shard_size: int) -> Iterator[str]:
    fixed = reasons(strategy)
    kept_rank = np.cumsum(selection.status == SELECTED) - 1
    status, cluster = selection.status.tolist(), selection.cluster.tolist()
    similarity = [None if np.isnan(s) else round(s, 6) for s in selection.similarity.tolist()]
    duplicate_of = selection.duplicate_of.tolist()
    lines = []
    for row, key in enumerate(keys):
        code = status[row]
        entry = {"row": row, "id": key, "status": STATUSES[code], "reason": fixed.get(code),
                 "cluster": cluster[row] if cluster[row] >= 0 else None,
                 "shard": f"shards/{shard_name(int(kept_rank[row]) // shard_size)}.tar" if code == SELECTED else None,
                 "duplicate_of": None, "similarity": similarity[row]}
        if code == NEAR_DUPLICATE:
            other = duplicate_of[row]
            entry["duplicate_of"] = keys[other]
            entry["reason"] = f"cosine similarity {similarity[row]} to earlier row {other} of its cluster"
        lines.append(_LEDGER_JSON.encode(entry) + "\n")
        if len(lines) == 65536:
            yield "".join(lines)
            lines = []
    yield "".join(lines)


def load_selection(out: Location) -> Selection | None:
    """The selection a previous run saved, or ``None``."""
    if not out.exists(SELECTION_FILE) or not out.exists("ledger.jsonl"):
        return None
    with np.load(io.BytesIO(out.read_bytes(SELECTION_FILE)), allow_pickle=False) as saved:
        return Selection(status=saved["status"], cluster=saved["cluster"], duplicate_of=saved["duplicate_of"],
                         similarity=saved["similarity"], level=int(saved["level"]),
                         num_clusters=int(saved["num_clusters"]))


# ------------------------------------------------------------------------------------------------ shards


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def done_shards(out: Location) -> list[dict[str, Any]]:
    """Stats of the done shards: the contiguous prefix ``shard-000000``, ``shard-000001``..."""
    names = set(out.listdir("stats"))
    stats = []
    while f"{shard_name(len(stats))}.json" in names:
        stats.append(out.read_json(f"stats/{shard_name(len(stats))}.json"))
    return stats


class CuratedShardWriter:
    """Packs kept samples, in source order, into shards of ``shard_size`` published atomically, each followed
    by its metadata part and last its stats."""

    def __init__(self, out: Location, shard_size: int, index: int) -> None:
        self.out = out
        self.shard_size = shard_size
        self.index = index
        self.scratch = out.scratch_dir()
        self._tar: TarWriter | None = None
        self._meta: list[dict[str, Any]] = []

    def add(self, key: str, jpeg: bytes, document: bytes, meta: dict[str, Any],
            extras: tuple[tuple[str, bytes], ...] = ()) -> None:
        """Append one sample, sidecar members ``extras`` included (its metadata row is completed with its place
        in the new shard)."""
        if self._tar is None:
            self._tar = TarWriter(os.path.join(self.scratch, f"{shard_name(self.index)}.tar.partial"))
        meta.update(shard=self.index, position=len(self._meta), offset=self._tar.offset + IMAGE_DATA_OFFSET,
                    size=len(jpeg))
        self._tar.write(sample_members(key, jpeg, document, extras))
        self._meta.append(meta)
        if len(self._meta) == self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        """Publish the open shard: tar, metadata part, and last its stats."""
        from dataengine.metadata_table import rows_to_parquet_bytes

        if self._tar is None:
            return
        size, digest = self._tar.close()
        name = shard_name(self.index)
        self.out.publish(self._tar.path, f"shards/{name}.tar")
        self.out.write_bytes(f"meta/{name}.parquet", rows_to_parquet_bytes(self._meta))
        self.out.write_json(f"stats/{name}.json", {"index": self.index, "name": f"shards/{name}.tar",
                                                   "num_samples": len(self._meta), "bytes": size, "sha256": digest})
        self.index += 1
        self._tar, self._meta = None, []


def write_shards(out: Location, source: ShardSet, rows: np.ndarray, shard_size: int,
                 progress: Callable[[int], None] | None = None) -> int:
    """Copy the samples of source ``rows`` (increasing) into shards, after those already done.

    Returns:
        The number of shards that were already done.

    Raises:
        InputUnusableError: the source shards do not hold the samples their metadata lists (changed since).
    """
    done = len(done_shards(out))
    rows = rows[done * shard_size:]
    if not rows.size:
        return done
    metadata = _metadata_rows(source, rows)
    writer = CuratedShardWriter(out, shard_size, done)
    position = 0
    for shard, first, end in _shards_holding(source, rows):
        wanted = rows[(rows >= shard.first_row + first) & (rows < shard.first_row + end)]
        for sample, row in _samples_at(shard, wanted, source.storage_options):
            meta = metadata[position]
            if sample["__key__"] != meta["key"]:
                raise InputUnusableError(f"{shard.url}: sample {row - shard.first_row} is {sample['__key__']!r}, "
                                         f"metadata.parquet says {meta['key']!r}; the ingest output changed after "
                                         "embedding")
            if "jpg" not in sample or "json" not in sample:
                raise InputUnusableError(f"{shard.url}: sample {sample['__key__']!r} has members "
                                         f"{sorted(k for k in sample if not k.startswith('__'))}; curate copies "
                                         "samples in the ingest layout (a .jpg and a .json)")
            extras = tuple((extension, data) for extension, data in sample.items()  # sidecars, in tar order
                           if not extension.startswith("__") and extension not in ("jpg", "json"))
            writer.add(meta["key"], sample["jpg"], sample["json"], meta, extras)
            position += 1
            if progress:
                progress(1)
    writer.close_shard()
    return done


def _shards_holding(source: ShardSet, rows: np.ndarray) -> list[tuple[Any, int, int]]:
    """The source shards holding at least one of ``rows``, with the overlap as shard positions."""
    found = []
    for shard, first, end in source.overlapping(int(rows[0]), int(rows[-1]) + 1):
        lo, hi = np.searchsorted(rows, [shard.first_row + first, shard.first_row + end])
        if hi > lo:
            found.append((shard, first, end))
    return found


def _samples_at(shard: Any, wanted: np.ndarray, options: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """The samples of ``shard`` at global rows ``wanted`` (increasing), streamed in order."""
    targets = iter(wanted.tolist())
    target = next(targets)
    for position, sample in enumerate(sample_stream([shard.url], opener=lambda url: open_input(url, options))):
        if shard.first_row + position == target:
            yield sample, target
            target = next(targets, None)
            if target is None:
                return
    raise InputUnusableError(f"{shard.url} ends before row {target - shard.first_row} of its "
                             f"{shard.num_samples} samples; the ingest output changed after embedding")


def _metadata_rows(source: ShardSet, rows: np.ndarray) -> list[dict[str, Any]]:
    """The source ``metadata.parquet`` rows ``rows`` as dicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataengine.metadata_table import meta_schema

    with open_input(source.metadata_url, source.storage_options) as handle:
        table = pq.ParquetFile(handle).read()
    if table.num_rows != source.num_samples:
        raise InputUnusableError(f"{source.metadata_url} has {table.num_rows} rows but the manifest lists "
                                 f"{source.num_samples} samples")
    table = table.take(pa.array(rows)).select(meta_schema().names)  # without a URL list's or sidecars' extras
    if not table.schema.equals(meta_schema()):
        table = table.cast(meta_schema())
    return table.to_pylist()


def write_metadata(out: Location, num_shards: int) -> None:
    """Concatenate the metadata parts of the ``num_shards`` shards into ``metadata.parquet``."""
    import pyarrow.parquet as pq

    from dataengine.metadata_table import meta_schema

    local = os.path.join(out.scratch_dir(), "metadata.parquet.partial")
    with pq.ParquetWriter(local, meta_schema()) as writer:
        for index in range(num_shards):
            part = pq.ParquetFile(io.BytesIO(out.read_bytes(f"meta/{shard_name(index)}.parquet"))).read()
            writer.write_table(part.cast(meta_schema()))
    out.publish(local, "metadata.parquet")
