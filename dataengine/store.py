"""The feature store: one Zarr v3 group per embedding run, local or on object storage.

Layout (``N`` rows, row ``r`` = row ``r`` of the ingest's ``metadata.parquet``)::

    STORE/zarr.json                 root group; attributes below
    STORE/features                  (N, d) float16 (or float32), chunks of ``chunk_rows`` rows x d (>= 1 MB by
                                    default); with ``chunks_per_shard > 1`` the sharding codec packs that many
                                    chunks into one object
    STORE/valid                     (N,) bool: False for rows whose image could not be decoded (features 0)
    STORE/keys                      (N,) string: the sample keys (YFCC photo id, or 16-hex id)
    STORE/metadata/user/codes       (N,) int32 code into ``vocab``, -1 = missing     (categorical column)
    STORE/metadata/user/vocab       (V,) string, sorted
    STORE/metadata/tags/codes       (T,) int32, the tags of every row, concatenated  (ragged column)
    STORE/metadata/tags/offsets     (N + 1,) int64: row r's tags are codes[offsets[r]:offsets[r + 1]]
    STORE/metadata/tags/vocab       (V,) string, sorted
    STORE/metadata/lat, lon         (N,) float64, NaN = missing                      (float column)
    STORE/progress                  (num_blocks,) string, one object per block: the block's completion record
                                    (JSON: rows, invalid rows and their errors), "" until the block is done
    STORE/<anything>/...            groups written by later stages (clusterings: :mod:`dataengine.clustering`)

Categorical metadata (``user``, ``device``, ``label``; ``tags`` per tag) is stored as int32 codes plus a
sorted string vocabulary rather than as one string per row: reports and NMI computations work on the codes
directly, and codes are 4 bytes a row however long the strings are. Columns that are empty for every row
(e.g. ``label`` for YFCC input, ``user`` for an image folder) are not written.

A *block* is the unit of work and of completion: ``rows_per_block = chunk_rows * chunks_per_shard`` rows,
one stored object of ``features`` and one of ``valid``. Ranks own disjoint ranges of blocks, so no two ranks
ever write the same object; a block's record in ``progress`` is written after its features, so a block with
a record is complete. Root attributes: ``format`` (``dataengine.features``), ``version``, ``state``
(``initializing`` -> ``embedding`` -> ``complete``), ``complete`` (bool, set last), ``num_rows``, ``dim``,
``dtype``, ``chunk_rows``, ``rows_per_block``, ``num_blocks``, ``model``, ``layer``, ``preprocessing``,
``source`` (ingest URL, manifest sha256), ``config`` (the resolved output-defining config),
``metadata_columns`` (name -> kind), and once complete ``num_invalid`` and ``failures`` (first 1000).

Reading needs only zarr: ``zarr.open_group(STORE)["features"]``; :func:`open_store` adds typed helpers.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dataengine.errors import IncompleteOutputError, OutputExistsError
from dataengine.fs import is_remote, url_to_fs, with_storage_defaults

logger = logging.getLogger(__name__)

FORMAT = "dataengine.features"
VERSION = 1
# Kinds of the metadata columns copied from metadata.parquet.
METADATA_COLUMNS = {"user": "categorical", "device": "categorical", "label": "categorical", "tags": "ragged",
                    "lat": "float", "lon": "float"}
MAX_RECORDED_FAILURES = 1000
# Rows per chunk of the per-row metadata arrays written once at creation: large objects, few requests.
_META_CHUNK_ROWS = 1 << 18
METADATA_BATCH_ROWS = _META_CHUNK_ROWS
"""Rows per record batch in which ``metadata.parquet`` is streamed into a store."""


def metadata_batches(parquet: Any, columns: list[str] | None, batch_rows: int = METADATA_BATCH_ROWS) -> Iterator[Any]:
    """The record batches of ``columns`` (``None``: all) of an open ``pyarrow.parquet.ParquetFile``, front to
    back, one row group at a time.

    A reader over the whole file (``ParquetFile.iter_batches``) held memory growing with the file read so
    far: about 60 bytes a row (110 MB at 2M rows, GBs at 96M); a reader per row group holds one row group.
    """
    for group in range(parquet.metadata.num_row_groups):
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)


_PARTIAL = re.compile(r"\.[0-9a-f]{32}\.partial$")


@dataclass(frozen=True)
class CategoricalColumn:
    """A string column as codes into a sorted vocabulary.

    Attributes:
        codes: ``(N,)`` int32, ``-1`` for a missing value.
        vocab: ``(V,)`` strings.
    """

    codes: np.ndarray
    vocab: np.ndarray

    def values(self) -> list[str | None]:
        """The decoded strings (``None`` where missing)."""
        vocab = list(self.vocab)
        return [vocab[c] if c >= 0 else None for c in self.codes.tolist()]


@dataclass(frozen=True)
class RaggedColumn:
    """A list-of-strings column: flat codes, row offsets and a sorted vocabulary.

    Attributes:
        codes: ``(T,)`` int32 codes of every row's items, concatenated in row order.
        offsets: ``(N + 1,)`` int64; row ``r`` holds ``codes[offsets[r]:offsets[r + 1]]``.
        vocab: ``(V,)`` strings.
    """

    codes: np.ndarray
    offsets: np.ndarray
    vocab: np.ndarray

    def row(self, index: int) -> list[str]:
        """The decoded items of row ``index``."""
        return [str(self.vocab[c]) for c in self.codes[self.offsets[index]:self.offsets[index + 1]]]

    def lists(self) -> list[list[str]]:
        """Every row's decoded items."""
        vocab = list(self.vocab)
        codes = self.codes.tolist()
        bounds = self.offsets.tolist()
        return [[vocab[c] for c in codes[bounds[r]:bounds[r + 1]]] for r in range(len(bounds) - 1)]


def zarr_store(url: str, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> Any:
    """A zarr store object for a local path or an fsspec URL (``s3://bucket/prefix.zarr``)."""
    import zarr.storage

    if is_remote(url):
        url_to_fs(url, storage_options)  # an unknown storage option is a one-line error now, not at a first read
        return zarr.storage.FsspecStore.from_url(url, storage_options=with_storage_defaults(url, storage_options),
                                                 read_only=read_only)
    return zarr.storage.LocalStore(os.path.abspath(url.removeprefix("file://")), read_only=read_only)


class FeatureStore:
    """An open feature store (see the module docstring for the layout).

    Args:
        group: the root zarr group.
        url: where it lives.
        storage_options: fsspec options used to open it.
    """

    def __init__(self, group: Any, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.group = group
        self.url = url
        self.storage_options = dict(storage_options or {})

    # ------------------------------------------------------------------------------------------ reading

    @property
    def attrs(self) -> dict[str, Any]:
        """The root attributes (a copy)."""
        return dict(self.group.attrs)

    @property
    def features(self) -> Any:
        """The ``(N, d)`` zarr array of features."""
        return self.group["features"]

    @property
    def keys(self) -> Any:
        """The ``(N,)`` zarr array of sample keys (``store.keys[:]`` reads them all)."""
        return self.group["keys"]

    @property
    def valid(self) -> np.ndarray:
        """``(N,)`` bool: False for rows whose image could not be decoded."""
        return np.asarray(self.group["valid"][:], dtype=bool)

    @property
    def num_rows(self) -> int:
        return int(self.group["features"].shape[0])

    @property
    def dim(self) -> int:
        return int(self.group["features"].shape[1])

    @property
    def complete(self) -> bool:
        return bool(self.group.attrs.get("complete", False))

    @property
    def metadata_names(self) -> list[str]:
        """Names of the metadata columns present."""
        return list(self.group.attrs.get("metadata_columns", {}))

    def metadata(self, name: str) -> np.ndarray | CategoricalColumn | RaggedColumn:
        """A metadata column: float array, :class:`CategoricalColumn` or :class:`RaggedColumn`.

        Raises:
            KeyError: the store has no such column (see :attr:`metadata_names`).
        """
        kinds = self.group.attrs.get("metadata_columns", {})
        if name not in kinds:
            raise KeyError(f"no metadata column {name!r} in {self.url}; present: {sorted(kinds)}")
        base = f"metadata/{name}"
        if kinds[name] == "float":
            return self.read_array(base)
        vocab = self.read_array(f"{base}/vocab")
        codes = self.read_array(f"{base}/codes")
        if kinds[name] == "categorical":
            return CategoricalColumn(codes, vocab)
        return RaggedColumn(codes, self.read_array(f"{base}/offsets"), vocab)

    def has(self, path: str) -> bool:
        """True when an array or group exists at ``path``."""
        try:
            self.group[path]
        except KeyError:
            return False
        return True

    def read_array(self, path: str) -> np.ndarray:
        """The whole array at ``path`` (e.g. ``metadata/lat``) as numpy."""
        return self.group[path][...]

    def read_attrs(self, path: str = "") -> dict[str, Any]:
        """The attributes of the group or array at ``path`` (``""`` = root)."""
        node = self.group[path] if path else self.group
        return dict(node.attrs)

    # ------------------------------------------------------------------------------------------ writing

    def write_array(self, path: str, array: np.ndarray, chunks: tuple[int, ...] | None = None,
                    attrs: dict[str, Any] | None = None) -> Any:
        """Write ``array`` at ``path`` (intermediate groups are created), replacing what was there.

        Args:
            path: slash-separated path inside the store.
            array: the data (numeric or strings).
            chunks: chunk shape; default: about 4 MB of leading-axis rows, whole trailing axes.
            attrs: attributes to set on the array.
        """
        array = np.asarray(array)
        dtype = str if array.dtype.kind in "OUT" else array.dtype
        chunks = chunks or _default_chunks(array)
        node = self.group.create_array(path, shape=array.shape, dtype=dtype, chunks=chunks, overwrite=True,
                                       attributes=attrs or {})
        if array.size:
            node[...] = array
        return node

    def write_attrs(self, path: str, attrs: dict[str, Any]) -> None:
        """Merge ``attrs`` into the attributes of the group or array at ``path`` (created as a group if absent;
        ``""`` = root)."""
        if path and not self.has(path):
            self.group.require_group(path)
        node = self.group[path] if path else self.group
        node.update_attributes(attrs)

    # ------------------------------------------------------------------------------------------ blocks

    def block_records(self) -> list[dict[str, Any] | None]:
        """The completion record of every block, ``None`` for blocks not done yet."""
        records: list[dict[str, Any] | None] = []
        for text in self.group["progress"][:].tolist():
            try:
                records.append(json.loads(text) if text else None)
            except json.JSONDecodeError:  # cannot happen with atomic writes; recompute the block if it does
                records.append(None)
        return records

    def write_block(self, block: int, start: int, features: np.ndarray, valid: np.ndarray,
                    record: dict[str, Any]) -> None:
        """Write one block's rows, then its completion record (the record last: present = block done)."""
        end = start + len(features)
        self.group["features"][start:end] = features
        self.group["valid"][start:end] = valid
        self.group["progress"][block] = json.dumps(record, sort_keys=True)


def _default_chunks(array: np.ndarray) -> tuple[int, ...]:
    if array.ndim == 0:
        return ()
    row_bytes = max(1, int(np.prod(array.shape[1:], dtype=np.int64)) * max(array.dtype.itemsize, 1))
    rows = max(1, min(array.shape[0], (4 << 20) // row_bytes))
    return (rows,) + tuple(max(1, s) for s in array.shape[1:])


def open_store(url: str, storage_options: dict[str, Any] | None = None, *, mode: str = "r",
               allow_incomplete: bool = False) -> FeatureStore:
    """Open a feature store for reading (``mode="r"``) or for adding results (``mode="r+"``).

    Raises:
        FileNotFoundError: nothing at ``url``.
        IncompleteOutputError: the embedding has not finished (unless ``allow_incomplete``).
    """
    import zarr

    try:
        # Read-only first: opening a missing local store for writing would create an empty folder.
        group = zarr.open_group(store=zarr_store(url, storage_options, read_only=True), mode="r")
        if mode != "r":
            group = zarr.open_group(store=zarr_store(url, storage_options), mode=mode)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no feature store at {url}") from exc
    store = FeatureStore(group, url, storage_options)
    if store.attrs.get("format") != FORMAT:
        raise IncompleteOutputError(f"{url} is not a dataengine feature store (no format={FORMAT!r} attribute)")
    if not allow_incomplete and not store.complete:
        raise IncompleteOutputError(f"{url}: the embedding is not complete; re-run `dataengine embed` to finish it")
    return store


# ----------------------------------------------------------------------------------------------- creation


@dataclass(frozen=True, kw_only=True)
class StoreLayout:
    """Shapes and chunking of a new feature store."""

    num_rows: int
    """Rows (samples)."""
    dim: int
    """Feature dimension."""
    dtype: str
    """``float16`` or ``float32``."""
    chunk_rows: int
    """Rows per chunk of ``features``."""
    chunks_per_shard: int = 1
    """Chunks per stored object (sharding codec) when > 1."""

    @property
    def rows_per_block(self) -> int:
        return self.chunk_rows * self.chunks_per_shard

    @property
    def num_blocks(self) -> int:
        return -(-self.num_rows // self.rows_per_block)

    def block_rows(self, block: int) -> tuple[int, int]:
        """Global rows ``[start, end)`` of ``block``."""
        start = block * self.rows_per_block
        return start, min(start + self.rows_per_block, self.num_rows)


def inspect_existing(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Root attributes of the feature store at ``url``; ``None`` when nothing is there.

    Raises:
        OutputExistsError: ``url`` holds something that is not a feature store.
    """
    import zarr

    try:
        group = zarr.open_group(store=zarr_store(url, storage_options, read_only=True), mode="r")
    except FileNotFoundError:
        # Only the temporary of a first root write (a writer killed inside it) counts as nothing there.
        if not is_remote(url) and os.path.isdir(url) and not all(_PARTIAL.search(n) for n in os.listdir(url)):
            raise OutputExistsError(f"{url} exists and is not a feature store; choose another --out") from None
        return None
    attrs = dict(group.attrs)
    if attrs.get("format") != FORMAT:
        raise OutputExistsError(f"{url} holds a zarr group that is not a dataengine feature store; choose "
                                "another --out")
    return attrs


def create_store(url: str, storage_options: dict[str, Any] | None, layout: StoreLayout,
                 attrs: dict[str, Any]) -> FeatureStore:
    """Create (replacing anything there) the arrays of a feature store; root attributes ``attrs``.

    The caller writes keys and metadata next, then sets ``state`` to ``embedding``.
    """
    import zarr

    _clear_for_create(url, storage_options)
    # The root zarr.json is written once, attributes included: a kill never leaves a root without them.
    group = zarr.open_group(store=zarr_store(url, storage_options), mode="w",
                            attributes=dict(attrs, format=FORMAT, version=VERSION, state="initializing",
                                            complete=False))
    shards = None
    if layout.chunks_per_shard > 1:
        shards = (layout.rows_per_block, layout.dim)
    group.create_array("features", shape=(layout.num_rows, layout.dim), dtype=layout.dtype,
                       chunks=(layout.chunk_rows, layout.dim), shards=shards, fill_value=0)
    group.create_array("valid", shape=(layout.num_rows,), dtype=bool, chunks=(layout.rows_per_block,),
                       fill_value=False)
    group.create_array("progress", shape=(layout.num_blocks,), dtype=str, chunks=(1,))
    return FeatureStore(group, url, storage_options)


def _clear_for_create(url: str, storage_options: dict[str, Any] | None) -> None:
    """Empty the store at ``url`` so that a kill at any point leaves something a re-run recognises.

    An existing root is first marked ``initializing`` (one atomic write), then everything else is deleted,
    and the root last (by ``zarr.open_group(mode="w")``): a store is never seen half-deleted yet complete,
    nor as a directory of leftovers that is not a store.
    """
    import zarr

    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(posixpath.join(path, "zarr.json")):
        return
    root = zarr.open_group(store=zarr_store(url, storage_options), mode="r+")
    root.update_attributes({"state": "initializing", "complete": False})
    for entry in fs.ls(path, detail=False):
        if posixpath.basename(entry.rstrip("/")) != "zarr.json":
            fs.rm(entry, recursive=True)


def write_keys_and_metadata(store: FeatureStore, table: Any) -> dict[str, str]:
    """Copy ``key`` and the analysis columns of a ``metadata.parquet`` table (in memory) into the store.

    Returns:
        The metadata columns written, name -> kind (columns null for every row are skipped).
    """
    return write_metadata_batches(store, lambda: iter(table.to_batches(_META_CHUNK_ROWS)), table.num_rows)


def write_metadata_batches(store: FeatureStore, batches: Callable[[], Iterator[Any]], num_rows: int, *,
                           chunk_rows: int = _META_CHUNK_ROWS) -> dict[str, str]:
    """Copy ``key`` and the analysis columns of ``metadata.parquet`` into the store, streaming.

    ``batches()`` yields the table's Arrow record batches front to back; it is called twice: a first pass
    collects each column's vocabulary (its distinct values, not its rows), the second writes codes, offsets
    and floats in whole chunks of ``chunk_rows`` rows. Memory: a batch, a chunk per column and the
    vocabularies, whatever ``num_rows`` (reading a 96M-row table whole took several GB for its keys and tags).

    Returns:
        The metadata columns written, name -> kind (columns null for every row are skipped).

    Raises:
        ValueError: the batches do not hold ``num_rows`` rows.
    """
    found = _scan_columns(batches, num_rows)
    chunk = min(chunk_rows, max(1, num_rows))
    sinks: dict[str, _ColumnSink] = {"key": _ColumnSink(store, "keys", num_rows, chunk, dtype=str)}
    written: dict[str, str] = {}
    for name, scan in found.items():
        if scan.empty:
            continue
        written[name] = scan.kind
        sinks[name] = _ColumnSink(store, name, num_rows, chunk, scan=scan)
    found.clear()  # the sinks hold their vocabularies as value -> code: the scans' sets of values can go
    for batch in batches():
        for name, sink in sinks.items():
            sink.append(batch.column(batch.schema.get_field_index(name)))
    for sink in sinks.values():
        sink.close()
    return written


@dataclass
class _ColumnScan:
    kind: str
    values: set = field(default_factory=set)  # distinct non-null values (categorical and ragged kinds)
    total: int = 0  # ragged: the number of list items over all rows
    any_value: bool = False  # float: some row is not NaN

    @property
    def empty(self) -> bool:
        return not (self.values or self.any_value)


def _scan_columns(batches: Callable[[], Iterator[Any]], num_rows: int) -> dict[str, _ColumnScan]:
    """First pass: the vocabulary of each categorical and ragged column, and whether a float column has values."""
    import pyarrow.compute as pc

    scans: dict[str, _ColumnScan] = {}
    rows = 0
    for batch in batches():
        rows += batch.num_rows
        for name, kind in METADATA_COLUMNS.items():
            if name not in batch.schema.names:
                continue
            scan = scans.setdefault(name, _ColumnScan(kind))
            column = batch.column(batch.schema.get_field_index(name))
            if kind == "float":
                scan.any_value = scan.any_value or bool((~np.isnan(_floats(column))).any())
                continue
            if kind == "ragged":
                column = pc.list_flatten(column)
                scan.total += len(column) - column.null_count  # null items are dropped (see _ColumnSink)
            scan.values.update(v for v in pc.unique(column).to_pylist() if v is not None)
    if rows != num_rows:
        raise ValueError(f"the metadata has {rows} rows, expected {num_rows}")
    return scans


def _floats(column: Any) -> np.ndarray:
    import pyarrow as pa

    return column.cast(pa.float64()).to_numpy(zero_copy_only=False)


class _ColumnSink:
    """One metadata column written to the store in appended batches, flushed in whole chunks."""

    def __init__(self, store: FeatureStore, name: str, num_rows: int, chunk: int, *, dtype: Any = None,
                 scan: _ColumnScan | None = None) -> None:
        self.kind = None if scan is None else scan.kind  # None: the keys
        self.chunk = chunk
        if scan is None:
            self.main = _Appender(store.group.create_array(name, shape=(num_rows,), dtype=dtype, chunks=(chunk,),
                                                           overwrite=True))
            return
        path = f"metadata/{name}"
        if scan.kind == "float":
            self.main = _Appender(store.group.create_array(path, shape=(num_rows,), dtype="float64",
                                                           chunks=(chunk,), overwrite=True))
            return
        vocab = sorted(scan.values)
        store.write_array(f"{path}/vocab", np.asarray(vocab, dtype=object))
        # Looked up a batch's distinct values at a time. pyarrow's index_in(value_set=vocabulary) rebuilt the
        # vocabulary's hash table at every batch: rows x vocabulary / batch work, and users grow with the rows
        # (19 s of 56 at 10M rows, ~30 min at 96M).
        self.code_of = {value: code for code, value in enumerate(vocab)}
        del vocab
        length = scan.total if scan.kind == "ragged" else num_rows
        self.main = _Appender(store.group.create_array(f"{path}/codes", shape=(length,), dtype="int32",
                                                       chunks=(min(chunk, max(1, length)),), overwrite=True))
        if scan.kind == "ragged":
            self.offsets = _Appender(store.group.create_array(f"{path}/offsets", shape=(num_rows + 1,), dtype="int64",
                                                              chunks=(min(chunk, num_rows + 1),), overwrite=True))
            self.offsets.append(np.zeros(1, np.int64))
            self.items = 0

    def append(self, column: Any) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.kind is None:
            self.main.append(np.asarray(column.to_pylist(), dtype=object))
        elif self.kind == "float":
            self.main.append(_floats(column))
        elif self.kind == "categorical":
            self.main.append(self._codes(column.cast(pa.string())))
        else:
            # A null item inside a list is dropped: coded -1 it read back as the vocabulary's last value.
            items = pc.list_flatten(column)
            parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
            if items.null_count:
                valid = items.is_valid()
                items, parents = items.filter(valid), parents[valid.to_numpy(zero_copy_only=False)]
            lengths = np.bincount(parents, minlength=len(column)).astype(np.int64)
            self.offsets.append(self.items + np.cumsum(lengths))
            self.items += int(lengths.sum())
            self.main.append(self._codes(items))

    def _codes(self, values: Any) -> np.ndarray:
        """int32 code of each value in the vocabulary, -1 for nulls."""
        import pyarrow.compute as pc

        encoded = pc.dictionary_encode(values)
        distinct = encoded.dictionary.to_pylist()
        codes = np.fromiter((self.code_of.get(value, -1) for value in distinct), dtype=np.int32, count=len(distinct))
        codes = np.append(codes, np.int32(-1))  # a null's index, -1 below, picks this last -1
        return codes[pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)]

    def close(self) -> None:
        self.main.close()
        if self.kind == "ragged":
            self.offsets.close()


class _Appender:
    """Appends to a 1-D zarr array, writing only whole chunks (and the last one): no chunk is written twice."""

    def __init__(self, array: Any) -> None:
        self.array, self.chunk = array, array.chunks[0]
        self.position = 0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def append(self, values: np.ndarray) -> None:
        self.pending.append(values)
        self.pending_rows += len(values)
        if self.pending_rows >= self.chunk:
            self._flush(whole_chunks=True)

    def _flush(self, whole_chunks: bool) -> None:
        if not self.pending_rows:
            return
        values = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        count = len(values) - len(values) % self.chunk if whole_chunks else len(values)
        if count:
            self.array[self.position:self.position + count] = values[:count]
            self.position += count
        self.pending = [values[count:]] if count < len(values) else []
        self.pending_rows = len(values) - count

    def close(self) -> None:
        self._flush(whole_chunks=False)
        if self.position != self.array.shape[0]:
            raise ValueError(f"wrote {self.position} of the {self.array.shape[0]} rows of {self.array.path}")


def remove_partial_writes(url: str) -> int:
    """Delete the temporaries a killed writer left in a local store (zarr writes ``*.<uuid>.partial`` files
    then renames them). Call only while no other process writes. Returns how many were removed."""
    if is_remote(url):
        return 0  # object stores publish whole objects: nothing partial to clean
    removed = 0
    for folder, _, names in os.walk(os.path.abspath(url)):
        for name in names:
            if _PARTIAL.search(name):
                os.remove(os.path.join(folder, name))
                removed += 1
    return removed
