"""Export a feature store to one Parquet file that pandas, polars, duckdb or Spark read without dataengine.

One row per store row, in row order (row ``r`` of the file is row ``r`` of the store and of the ingest's
``metadata.parquet``), columns:

=========================== ================================================================================
``row``                     int64 row number
``key``                     string sample key
``valid``                   bool, False for rows whose image could not be decoded at embedding
``user``, ``device``,       the store's metadata columns: strings (dictionary-encoded), ``tags`` a list of
``label``, ``tags``,        strings, ``lat``/``lon`` float64 (null when missing); with ``source_metadata``
``lat``, ``lon``            every column of the source's ``metadata.parquet`` instead (YFCC fields, or an
                            img2dataset's ``url``, ``caption``, ``status``... for foreign shards)
``level0``, ``level1``...   int32 cluster id per level of the clustering (null: the row has none); with
                            several clusterings, ``<name>_level0``...
``features``                ``fixed_size_list<float32>[d]`` (only with ``features``)
=========================== ================================================================================

The file's key-value metadata ``dataengine`` holds the export's configuration, the store's source and model,
and each clustering's configuration (JSON).

Streaming: rows go out in blocks (one Parquet row group each) of ``block_rows`` rows, a multiple of the store's
chunk rows sized to about 16 MiB of float32 features. Memory is a few copies of a block, at most about
``block_rows x 32 d`` bytes with features (measured: 5 to 8 KB per row for d = 256 with pyarrow 26 and
zarr 3, blocks of 500 to 5,000 rows; 40% of it Parquet encoding), so about 130 MB by default, plus one or two
chunks (up to 262,144 rows each) of every per-row metadata array and the vocabularies of the string columns
(users, devices, labels, tags): never a per-row array of the whole store. The file is written under a
temporary name and renamed (locally) or uploaded as one object (``s3://``), so a reader never sees a partial
export; re-running with the same configuration on an unchanged store skips the work.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dataengine.errors import InputUnusableError, OutputExistsError
from dataengine.fs import create_private, is_remote, open_input, url_to_fs, with_storage_defaults
from dataengine.locks import locked_output
from dataengine.store import FeatureStore, metadata_batches, open_store

logger = logging.getLogger(__name__)

FORMAT = "dataengine.export"
VERSION = 1
_TARGET_BLOCK_BYTES = 16 << 20
_METADATA_KEY = b"dataengine"


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Configuration of one export of a feature store to Parquet."""

    store: str
    """Feature store written by ``dataengine embed`` (local path or URL)."""
    out: str
    """The Parquet file to write (local path or ``s3://`` URL)."""
    clusterings: tuple[str, ...] = ()
    """Clusterings whose assignments become columns (every level of each)."""
    features: bool = False
    """Also write the features, as a fixed-size list of float32 per row."""
    source_metadata: bool = False
    """Write every column of the source's ``metadata.parquet`` instead of the store's metadata columns."""
    shards: str | None = None
    """Where the source shards are (ingest output, pattern or folder); default: the store's recorded source."""
    block_rows: int | None = None
    """Rows per block and row group; ``None`` = chunk-aligned, about 16 MiB of float32 features."""
    overwrite: bool = False
    """Replace an existing file made with another configuration instead of raising."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for the store, the source and the output."""

    def __post_init__(self) -> None:
        if not self.out.endswith(".parquet"):
            raise ValueError(f"out must be a .parquet file, got {self.out!r}")
        if self.block_rows is not None and self.block_rows < 1:
            raise ValueError(f"block_rows must be >= 1 (or None for automatic), got {self.block_rows}")
        if len(set(self.clusterings)) != len(self.clusterings):
            raise ValueError(f"clusterings named twice: {list(self.clusterings)}")

    def recorded(self) -> dict[str, Any]:
        """What the output depends on (no storage options: they may hold secrets; no block size)."""
        values = asdict(self)
        for name in ("storage_options", "overwrite", "block_rows", "out"):
            values.pop(name)
        values["clusterings"] = list(self.clusterings)
        return values


@dataclass
class ExportResult:
    """Summary of an export."""

    out: str
    num_rows: int
    num_columns: int
    columns: list[str]
    row_groups: int
    bytes: int
    seconds: float
    skipped: bool = False
    """True when the file already held this export (nothing was written)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_export(config: ExportConfig, progress: Callable[[int], None] | None = None) -> ExportResult:
    """Write the Parquet export of ``config.store`` (see the module docstring for the columns).

    Raises:
        KeyError: a clustering that the store does not hold complete.
        IncompleteOutputError: the store is not complete.
        InputUnusableError: the source metadata does not match the store (other rows or another input).
        OutputExistsError: ``out`` holds another export (and not ``overwrite``).
        OutputLockedError: another run is writing ``out``.
    """
    import time

    start = time.perf_counter()
    store = open_store(config.store, config.storage_options)
    plan = _plan(config, store)
    with locked_output(config.out, config.storage_options, file=True):
        existing = _existing_metadata(config.out, config.storage_options)
        if existing is not None:
            if existing == json.loads(json.dumps(plan.metadata, sort_keys=True)):
                logger.info("%s already holds this export; nothing to do", config.out)
                return _result(config, start, skipped=True)
            if not config.overwrite:
                raise OutputExistsError(f"{config.out} holds another export (other store, clusterings or "
                                        "options); use another --out or --overwrite")
        _write(config, store, plan, progress)
        return _result(config, start)


@dataclass
class _Plan:
    levels: list[tuple[str, Any]]
    """``(column name, zarr array)`` of every assignment array."""
    block_rows: int
    metadata: dict[str, Any]
    source_metadata_url: str | None = None


def _plan(config: ExportConfig, store: FeatureStore) -> _Plan:
    from dataengine.clustering import open_clustering

    attrs = store.attrs
    levels, clusterings = [], {}
    for name in config.clusterings:
        clustering = open_clustering(store, name)
        clusterings[name] = clustering.config
        for level in clustering.levels:
            column = f"level{level}" if len(config.clusterings) == 1 else f"{name}_level{level}"
            levels.append((column, clustering.assignment_array(level)))
    metadata = {"format": FORMAT, "version": VERSION, "config": config.recorded(), "num_rows": store.num_rows,
                "store": {"url": config.store, "source": attrs.get("source"), "model": attrs.get("model"),
                          "config": attrs.get("config")}, "clusterings": clusterings}
    chunk = int(store.features.chunks[0])
    rows = config.block_rows or max(1, _TARGET_BLOCK_BYTES // max(1, store.dim * 4))
    block_rows = max(chunk, rows // chunk * chunk) if config.block_rows is None else rows
    plan = _Plan(levels, block_rows, metadata)
    if config.source_metadata:
        plan.source_metadata_url = _source_metadata(config, store)
    return plan


def _source_metadata(config: ExportConfig, store: FeatureStore) -> str:
    """The source's ``metadata.parquet``, checked to be the input the store was embedded from."""
    from dataengine.shards import load_shard_set

    source = store.attrs.get("source") or {}
    url = config.shards or source.get("url")
    if not url:
        raise InputUnusableError(f"{store.url} records no source; pass --shards")
    shard_set = load_shard_set(url, config.storage_options)
    if shard_set.digest != source.get("digest") or shard_set.num_samples != store.num_rows:
        raise InputUnusableError(f"{url} is not the input {store.url} was embedded from (digest or row count "
                                 "differs): its metadata would not align with the store's rows")
    return shard_set.metadata_url


def _existing_metadata(out: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The ``dataengine`` metadata of an existing export at ``out``; ``None`` when there is no file.

    Raises:
        OutputExistsError: ``out`` exists but is not an export (never overwritten silently).
    """
    import pyarrow.parquet as pq

    fs, path = url_to_fs(out, storage_options)
    if not fs.exists(path):
        return None
    try:
        with open_input(out, storage_options) as handle:
            values = pq.ParquetFile(handle).schema_arrow.metadata or {}
        return json.loads(values[_METADATA_KEY])
    except Exception:  # not a Parquet file, or not ours: only --overwrite replaces it
        return {"format": "unknown"}


# --------------------------------------------------------------------------------------------- writing


def _write(config: ExportConfig, store: FeatureStore, plan: _Plan, progress: Callable[[int], None] | None) -> None:
    import pyarrow.parquet as pq

    columns = _StoreColumns(store, plan, config.features)
    source = _SourceRows(plan.source_metadata_url, config.storage_options) if plan.source_metadata_url else None
    with _atomic_output(config.out, config.storage_options) as handle:
        writer = None
        try:
            for start in range(0, store.num_rows, plan.block_rows):
                end = min(start + plan.block_rows, store.num_rows)
                table = columns.block(start, end, source.rows(end - start) if source else None)
                if writer is None:
                    schema = table.schema.with_metadata({_METADATA_KEY: json.dumps(plan.metadata, sort_keys=True)})
                    # Dictionary pages for the float features would cost 13 bytes of memory per byte of
                    # features, for nothing (floats rarely repeat): 3.6 without (pyarrow 26).
                    writer = pq.ParquetWriter(handle, schema, compression="zstd",
                                              use_dictionary=_dictionary_columns(schema))
                writer.write_table(table.cast(writer.schema), row_group_size=end - start)
                if progress:
                    progress(end - start)
        finally:
            if writer is not None:
                writer.close()
            if source is not None:
                source.close()
    logger.info("exported %d rows of %s to %s", store.num_rows, store.url, config.out)


def _dictionary_columns(schema: Any) -> list[str]:
    """Parquet column paths to dictionary-encode: every column but the features (list columns by their leaf
    path, ``tags.list.element``)."""
    import pyarrow as pa

    paths = []
    for item in schema:
        if item.name == "features":
            continue
        nested = pa.types.is_list(item.type) or pa.types.is_fixed_size_list(item.type)
        paths.append(f"{item.name}.list.element" if nested else item.name)
    return paths


class _StoreColumns:
    """Blocks of the store's columns as Arrow tables: per-row arrays are read by row range, only the
    vocabularies of the categorical and list columns are held whole."""

    def __init__(self, store: FeatureStore, plan: _Plan, features: bool) -> None:
        import pyarrow as pa

        self.store = store
        self.plan = plan
        self.features = features
        self.kinds: dict[str, str] = dict(store.attrs.get("metadata_columns", {}))
        self.vocab = {name: pa.array([str(v) for v in store.group[f"metadata/{name}/vocab"][...].tolist()],
                                     pa.string())
                      for name, kind in self.kinds.items() if kind in ("categorical", "ragged")}
        self._windows: dict[str, _Window] = {}

    def _read(self, path: str, start: int, end: int, array: Any = None) -> np.ndarray:
        """Rows ``[start, end)`` of the array at ``path`` in the store (or of ``array``, named ``path``)."""
        if path not in self._windows:
            self._windows[path] = _Window(self.store.group[path] if array is None else array)
        return self._windows[path].read(start, end)

    def block(self, start: int, end: int, source: Any | None) -> Any:
        import pyarrow as pa

        keys = [str(key) for key in self._read("keys", start, end).tolist()]
        arrays = {"row": pa.array(np.arange(start, end, dtype=np.int64)), "key": pa.array(keys, pa.string()),
                  "valid": pa.array(np.asarray(self._read("valid", start, end), dtype=bool))}
        if source is None:
            for name in self.kinds:
                arrays[name] = self._metadata(name, start, end)
        else:
            if source.column("key").to_pylist() != keys:
                raise InputUnusableError(f"rows {start}..{end}: the source's keys differ from the store's")
            for name in source.schema.names:
                if name != "key":
                    arrays[name] = source.column(name)
        for column, array in self.plan.levels:
            ids = np.asarray(self._read(f"level column {column}", start, end, array), dtype=np.int32)
            arrays[column] = pa.array(ids, mask=ids < 0)
        if self.features:
            block = np.ascontiguousarray(self.store.features[start:end], dtype=np.float32)
            arrays["features"] = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), block.shape[1])
        return pa.table(arrays)

    def _metadata(self, name: str, start: int, end: int) -> Any:
        import pyarrow as pa

        kind = self.kinds[name]
        if kind == "float":  # NaN = missing
            values = np.asarray(self._read(f"metadata/{name}", start, end), dtype=np.float64)
            return pa.array(values, mask=np.isnan(values))
        if kind == "categorical":
            codes = np.asarray(self._read(f"metadata/{name}/codes", start, end), dtype=np.int32)
            return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), self.vocab[name])
        offsets = np.asarray(self._read(f"metadata/{name}/offsets", start, end + 1), dtype=np.int64)
        codes = np.asarray(self._read(f"metadata/{name}/codes", int(offsets[0]), int(offsets[-1])), dtype=np.int64)
        return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]).astype(np.int32)),
                                        self.vocab[name].take(pa.array(codes)))


class _Window:
    """Reads of consecutive row ranges of a 1-D zarr array through its current chunk, decoded once (the
    per-row metadata arrays have chunks of up to 262,144 rows, much longer than a block)."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.chunk = int(array.chunks[0])
        self.start, self.values = 0, array[0:0]

    def read(self, start: int, end: int) -> np.ndarray:
        if start >= self.start and end <= self.start + len(self.values):
            return self.values[start - self.start:end - self.start]
        if end - start > self.chunk:  # longer than a chunk: read it directly
            return self.array[start:end]
        first, stop = start // self.chunk * self.chunk, -(-end // self.chunk) * self.chunk
        self.start, self.values = first, self.array[first:min(stop, self.array.shape[0])]
        return self.values[start - first:end - first]


class _SourceRows:
    """The source's ``metadata.parquet`` read front to back in record batches, handed out ``n`` rows at a time."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        import pyarrow.parquet as pq

        self._handle = open_input(url, storage_options)
        self._batches: Iterator[Any] = metadata_batches(pq.ParquetFile(self._handle), None, batch_rows=8192)
        self._pending: list[Any] = []
        self._pending_rows = 0

    def rows(self, count: int) -> Any:
        import pyarrow as pa

        while self._pending_rows < count:
            batch = next(self._batches, None)
            if batch is None:
                raise InputUnusableError("the source's metadata.parquet has fewer rows than the store")
            self._pending.append(batch)
            self._pending_rows += batch.num_rows
        table = pa.Table.from_batches(self._pending)
        head, rest = table.slice(0, count), table.slice(count)
        self._pending, self._pending_rows = rest.to_batches(), rest.num_rows
        return head.combine_chunks()

    def close(self) -> None:
        self._handle.close()


class _atomic_output:
    """A binary file handle at a temporary name, published at ``url`` when the block exits without error:
    renamed locally; on object storage written as one object, visible only once complete."""

    def __init__(self, url: str, storage_options: dict[str, Any]) -> None:
        self.url = url
        self.storage_options = storage_options
        self.remote = is_remote(url)
        self.partial = None if self.remote else f"{url}.{uuid.uuid4().hex[:8]}.partial"

    def __enter__(self) -> Any:
        if self.remote:
            import fsspec

            self.handle = fsspec.open(self.url, "wb", **with_storage_defaults(self.url, self.storage_options)).open()
        else:
            os.makedirs(os.path.dirname(os.path.abspath(self.url)), exist_ok=True)
            self.handle = create_private(self.partial)  # a new file, never through a planted symlink
        return self.handle

    def __exit__(self, kind: Any, *exc: Any) -> None:
        if self.remote:
            # close() completes the upload; discard() drops it, so a failed export leaves no object behind.
            self.handle.close() if kind is None else self.handle.discard()
            return
        self.handle.close()
        if kind is None:
            os.replace(self.partial, self.url)
        else:
            os.remove(self.partial)


def _result(config: ExportConfig, start: float, skipped: bool = False) -> ExportResult:
    import time

    import pyarrow.parquet as pq

    with open_input(config.out, config.storage_options) as handle:
        parquet = pq.ParquetFile(handle)
        names = parquet.schema_arrow.names
        rows, groups = parquet.metadata.num_rows, parquet.metadata.num_row_groups
    fs, path = url_to_fs(config.out, config.storage_options)
    return ExportResult(out=config.out, num_rows=rows, num_columns=len(names), columns=names, row_groups=groups,
                        bytes=int(fs.size(path)), seconds=time.perf_counter() - start, skipped=skipped)

