"""Webdataset shards that ``dataengine ingest`` did not write (img2dataset's output, ``webdataset.ShardWriter``,
any tar of ``<key>.<ext>`` members): named by URL patterns, indexed once, then read like an ingest output.

Shards are named by (:func:`expand_shard_spec`):

* a brace pattern, local or remote: ``shards/{00000..00099}.tar``, ``s3://bucket/laion/{000..127}.tar``;
* a list of URLs or patterns joined by ``::`` (webdataset's separator): ``a.tar::b/{0..3}.tar``;
* a folder without ``manifest.json`` holding ``*.tar`` files (img2dataset's output folder): its tars in name
  order.

Only uncompressed ``.tar`` shards are read. The *shard index* is built on first use, by reading every tar once
(only the member headers and the small sidecars of a local tar; the whole stream of a remote one), and kept in
a cache folder (``index_root``, by default ``$XDG_CACHE_HOME/dataengine/shard-index`` or
``~/.cache/dataengine/shard-index``) under a fingerprint of the URLs, sizes and modification times (or ETags)
of the shards, so a changed shard gets a new index. The index holds a ``manifest.json`` (format
``dataengine.shards`` with ``"source": "webdataset"``, every shard's URL and sample count) and a
``metadata.parquet`` (one row group per shard). It is published atomically: ranks or machines building it at
the same time end with the same content.

Row alignment, the guarantee every stage relies on: row ``r`` of the index's ``metadata.parquet``, of a feature
store embedded from the shards and of the trainer's labels is the ``r``-th sample met when reading the shards
in the order given (pattern expansion order; a folder's tars by name), each tar front to back. A *sample* is
what webdataset makes of the tar: consecutive members ``<key>.<ext>`` sharing a key (the member name up to
the first dot of its last path component), ``__*__`` members skipped, a repeated extension within a sample
skipped, a corrupt or truncated tar ending its shard after the samples before the damage. Samples are never
re-ordered or dropped; img2dataset writes samples in download-completion order, and that order is kept. A
sample's image is its first member among :data:`dataengine.shards.IMAGE_EXTENSIONS`; a sample without one
is a row that embed marks invalid.

Columns of ``metadata.parquet``: every column of an ingest's (:func:`dataengine.metadata_table.meta_schema`;
``key``/``shard``/``position`` and the ``offset``/``size`` of the image member for random access, the others
null unless a sidecar holds them), then one column per other field of the ``.json`` sidecars
(img2dataset: ``url``, ``caption``, ``status``, ``error_message``, ``original_width``, ``original_height``,
``exif``, plus its ``--save_additional_columns``), ``txt`` and ``cls`` for those members. A sidecar field named
like an ingest column fills it when its value has the column's type (``width``, ``height``, ``sha256``,
``label``, ``tags``, ``lat``...), otherwise the value is kept in ``sidecar_<name>``; img2dataset's ``key``
equals the sample key. ``label`` falls back to the ``.cls`` member. Nested JSON values, and columns whose
types differ between samples, are stored as JSON text. A sidecar that is not a JSON object sets that row's
``sidecar_error``; a ``.txt``/``.cls`` member over 64 KiB is left out (counted in the manifest).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

from dataengine.errors import InputUnusableError
from dataengine.fs import is_remote, url_to_fs

logger = logging.getLogger(__name__)

INDEX_VERSION = 1
SEPARATOR = "::"
MAX_TEXT_BYTES = 64 << 10
_TEXT_MEMBERS = ("txt", "cls")
_STRUCTURAL = ("key", "shard", "position", "offset", "size")


# --------------------------------------------------------------------------------------------- naming


def is_shard_spec(spec: str) -> bool:
    """True when ``spec`` names tar shards (a ``.tar`` URL, a brace pattern, a ``::`` list), not a folder."""
    parts = [part.strip() for part in spec.split(SEPARATOR) if part.strip()]
    # Compressed tars count too, so that expand_shard_spec names the problem rather than a missing manifest.
    return bool(parts) and all(part.lower().endswith((".tar", ".tar.gz", ".tgz")) for part in parts)


def absolute_spec(spec: str) -> str:
    """``spec`` with its local parts made absolute (a spec recorded in a store must not depend on the cwd)."""
    parts = [part.strip() for part in spec.split(SEPARATOR) if part.strip()]
    return SEPARATOR.join(part if is_remote(part) else os.path.abspath(part.removeprefix("file://"))
                          for part in parts)


def expand_shard_spec(spec: str) -> list[str]:
    """The shard URLs of a pattern or ``::`` list, in order (local paths made absolute).

    Raises:
        ValueError: a URL that is not an uncompressed ``.tar``, or a shard listed twice (its rows would be
            counted twice).
    """
    from braceexpand import braceexpand

    urls = [url for part in absolute_spec(spec).split(SEPARATOR) for url in braceexpand(part)]
    for url in urls:
        if not url.lower().endswith(".tar"):
            raise ValueError(f"{url}: only uncompressed .tar shards are read (from {spec!r})")
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise ValueError(f"{url} is listed twice in {spec!r}")
        seen.add(url)
    if not urls:
        raise ValueError(f"{spec!r} names no shard")
    return urls


def tars_in_folder(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    """URLs of the ``*.tar`` files directly inside a folder, by name; empty when there are none."""
    if not is_remote(url):
        folder = os.path.abspath(url.removeprefix("file://"))
        if not os.path.isdir(folder):
            return []
        return [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.lower().endswith(".tar")]
    fs, path = url_to_fs(url, storage_options)
    try:
        names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []
    return [f"{url.rstrip('/')}/{name}" for name in names if name.lower().endswith(".tar")]


def default_index_root() -> str:
    """``$XDG_CACHE_HOME/dataengine/shard-index``, else ``~/.cache/dataengine/shard-index``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "dataengine", "shard-index")


# --------------------------------------------------------------------------------------------- loading


def load_foreign_shard_set(spec: str, storage_options: dict[str, Any] | None = None,
                           urls: list[str] | None = None, index_root: str | None = None,
                           workers: int = 8) -> Any:
    """The :class:`~dataengine.shards.ShardSet` of foreign shards, indexing them first when needed.

    Args:
        spec: the pattern, list or folder as given (recorded as the set's ``url``).
        storage_options: fsspec options for remote shards.
        urls: the shard URLs when already known (a folder's tars); default :func:`expand_shard_spec`.
        index_root: cache folder of shard indexes (default :func:`default_index_root`).
        workers: shards indexed at once (threads).

    Raises:
        FileNotFoundError: a shard does not exist.
        InputUnusableError: the shards hold no sample.
    """
    urls = urls if urls is not None else expand_shard_spec(spec)
    spec = absolute_spec(spec)
    stats = _stat_shards(urls, storage_options)
    fingerprint = hashlib.sha256(json.dumps([[u, *s] for u, s in zip(urls, stats)]).encode()).hexdigest()[:32]
    folder = os.path.join(index_root or default_index_root(), fingerprint)
    if not os.path.exists(os.path.join(folder, "manifest.json")):
        _build_index(folder, urls, [size for size, _ in stats], storage_options, workers)
    return _shard_set(spec, storage_options, folder)


def _shard_set(spec: str, storage_options: dict[str, Any] | None, folder: str) -> Any:
    from dataengine.shards import ShardInfo, ShardSet

    with open(os.path.join(folder, "manifest.json"), "rb") as handle:
        manifest = json.load(handle)
    shards, row = [], 0
    for index, entry in enumerate(manifest["shards"]):
        shards.append(ShardInfo(index, entry["url"], entry["url"], int(entry["num_samples"]), row))
        row += int(entry["num_samples"])
    if row == 0:
        raise InputUnusableError(f"{spec}: the shards hold no sample")
    return ShardSet(spec, dict(storage_options or {}), manifest, manifest["content_digest"], tuple(shards),
                    tuple(s.first_row for s in shards), metadata_file=os.path.join(folder, "metadata.parquet"))


def _stat_shards(urls: list[str], storage_options: dict[str, Any] | None) -> list[tuple[int, str]]:
    """``(size, version)`` of every shard: the modification time locally, the ETag (or time) on object stores,
    listing each remote folder once."""
    stats: list[tuple[int, str]] = []
    listings: dict[str, dict[str, dict[str, Any]]] = {}
    for url in urls:
        if not is_remote(url):
            path = url.removeprefix("file://")
            try:
                status = os.stat(path)
            except FileNotFoundError:
                raise FileNotFoundError(f"shard not found: {url}") from None
            stats.append((status.st_size, str(status.st_mtime_ns)))
            continue
        fs, path = url_to_fs(url, storage_options)
        parent = posixpath.dirname(path)
        if parent not in listings:
            try:
                listings[parent] = {e["name"].rstrip("/"): e for e in fs.ls(parent, detail=True)}
            except FileNotFoundError:
                listings[parent] = {}
        info = listings[parent].get(path)
        if info is None:
            raise FileNotFoundError(f"shard not found: {url}")
        version = info.get("ETag") or info.get("LastModified") or info.get("mtime") or ""
        stats.append((int(info.get("size") or 0), str(version)))
    return stats


# --------------------------------------------------------------------------------------------- indexing


Member = tuple[str, int, int, Callable[[], "bytes | None"]]
"""``(name, data offset, size, read())`` of one regular tar member."""


@dataclass
class _Sample:
    key: str
    position: int
    members: dict[str, tuple[str, int, int, Callable[[], bytes | None]]] = field(default_factory=dict)
    """Extension -> ``(member name, data offset, size, read())``, the first member of each extension."""


def group_samples(members: Iterator[Member], errors: list[str]) -> Iterator[_Sample]:
    """webdataset's samples of a member stream (consecutive members sharing a key, ``__*__`` members and
    names without an extension skipped, the first of a repeated extension kept). A data error (a corrupt or
    truncated tar) ends the stream after the sample it interrupted; its message is appended to ``errors``."""
    from dataengine.shards import DATA_ERRORS

    current: _Sample | None = None
    position = 0
    try:
        for name, offset, size, read in members:
            parsed = split_member(name)
            if parsed is None:
                continue
            key, extension = parsed
            if current is None or key != current.key:
                if current is not None:
                    yield current
                current, position = _Sample(key, position), position + 1
            current.members.setdefault(extension, (name, offset, size, read))
    except DATA_ERRORS as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    if current is not None:
        yield current


@dataclass
class ShardIndex:
    """What indexing one shard found."""

    rows: list[dict[str, Any]]
    """One dict per sample: the metadata row (structural columns and sidecar fields)."""
    error: str | None = None
    """A data error that ended the shard early (the samples before it are kept)."""
    skipped_text: int = 0
    """``.txt``/``.cls`` members left out for being over :data:`MAX_TEXT_BYTES`."""


def index_shard(index: int, url: str, storage_options: dict[str, Any] | None = None) -> ShardIndex:
    """Index one tar with webdataset's sample semantics (see the module docstring).

    Raises:
        OSError: the shard cannot be read (worth a retry, never recorded as an empty shard).
    """
    found = ShardIndex(rows=[])
    errors: list[str] = []
    with _open_members(url, storage_options) as members:
        for sample in group_samples(members, errors):
            found.rows.append(_row(index, url, sample, found))
    if errors:
        found.error = errors[0]
        logger.warning("%s: %s; indexed the %d samples before it", url, found.error, len(found.rows))
    return found


def split_member(name: str) -> tuple[str, str] | None:
    """``(key, lower-cased extension)`` of a tar member as webdataset splits it, ``None`` for members it skips."""
    from dataengine.shards import _MEMBER, _META

    match = _MEMBER.match(name)
    if match is None or _META.match(name):
        return None
    return match.group(1), match.group(2).lower()


@contextlib.contextmanager
def _open_members(url: str, storage_options: dict[str, Any] | None) -> Iterator[Iterator[Member]]:
    """``(name, data offset, size, read())`` of every regular member, while the shard is open: headers only for
    a local tar (``read`` preads the member), one sequential pass over a remote one (``read`` returns the bytes
    already read)."""
    from dataengine.tario import iter_members

    if not is_remote(url):
        path = url.removeprefix("file://")
        fd = os.open(path, os.O_RDONLY)
        try:
            yield _local_members(path, fd)
        finally:
            os.close(fd)
        return
    fs, path = url_to_fs(url, storage_options)
    with fs.open(path, "rb", block_size=8 << 20, cache_type="readahead") as raw:
        counting = _CountingReader(raw)

        def members() -> Iterator[Member]:
            for name, data in iter_members(counting):
                # The stream stands right after the member's padded data.
                offset = counting.position - (len(data) + (-len(data) % 512))
                yield name, offset, len(data), lambda d=data: d

        yield members()


def _local_members(path: str, fd: int) -> Iterator[Member]:
    from dataengine.tario import scan_tar

    end = os.fstat(fd).st_size
    for name, offset, size in scan_tar(path):
        # A member whose padded data runs past the end: where the sequential stream raises, so must the index.
        if offset + size + (-size % 512) > end:
            raise tarfile.ReadError(f"unexpected end of tar data in {name} ({end - offset} of {size} bytes)")
        yield name, offset, size, lambda o=offset, s=size: os.pread(fd, s, o)


class _CountingReader:
    """A read-only stream that counts the bytes read (the data offsets of a sequential tar scan)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.position += len(data)
        return data


def _row(index: int, url: str, sample: _Sample, found: ShardIndex) -> dict[str, Any]:
    from dataengine.shards import IMAGE_EXTENSIONS

    image = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
    offset, size = (sample.members[image][1:3]) if image else (-1, 0)
    sidecars = {}
    for extension in ("json", *_TEXT_MEMBERS):
        if extension in sample.members:
            if extension != "json" and sample.members[extension][2] > MAX_TEXT_BYTES:
                found.skipped_text += 1
                continue
            sidecars[extension] = sample.members[extension][3]()
    row = sidecar_metadata(sample.key, sidecars)
    row.update(shard=index, position=sample.position, offset=offset, size=size)
    row.setdefault("source", url)
    return row


def sidecar_metadata(key: str, sidecars: dict[str, bytes | None]) -> dict[str, Any]:
    """A sample's metadata from its sidecars: the ``.json`` fields (ingest columns when the value fits, else
    ``sidecar_<name>``; ``sidecar_error`` when it is not a JSON object), ``txt`` and ``cls`` text, ``label``
    from the JSON or else the ``.cls``."""
    row: dict[str, Any] = {"key": key}
    fields: dict[str, Any] = {}
    if sidecars.get("json") is not None:
        try:
            value = json.loads(sidecars["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            value, row["sidecar_error"] = None, f"{key}.json is not JSON: {exc}"
        if value is not None and not isinstance(value, dict):
            row["sidecar_error"] = f"{key}.json holds a {type(value).__name__}, not an object"
        elif isinstance(value, dict):
            fields = value
    for extension in _TEXT_MEMBERS:
        if sidecars.get(extension) is not None:
            row[extension] = sidecars[extension].decode("utf-8", "replace")
    merge_sidecar_fields(row, fields)
    if row.get("label") is None and row.get("cls") is not None:
        row["label"] = row["cls"].strip()
    return row


def merge_sidecar_fields(row: dict[str, Any], sidecar: dict[str, Any]) -> None:
    """Put the sidecar's fields into the row: ingest columns when the value fits, else ``sidecar_<name>``."""
    from dataengine.metadata_table import meta_schema

    schema = meta_schema()
    for name, value in sidecar.items():
        name = str(name)
        if name == "key" and value == row["key"]:
            continue
        if name in _STRUCTURAL or name in _TEXT_MEMBERS or name == "sidecar_error":
            row[f"sidecar_{name}"] = value
        elif name in schema.names:
            converted = _convert(value, str(schema.field(name).type))
            if converted is _MISMATCH:
                row[f"sidecar_{name}"] = value
            elif converted is not None:
                row[name] = converted
        else:
            row[name] = value


_MISMATCH = object()


def _convert(value: Any, kind: str) -> Any:
    """``value`` as a value of an ingest column of Arrow type ``kind``, ``None`` for null, or ``_MISMATCH``."""
    if value is None:
        return None
    if kind == "string":
        return value if isinstance(value, str) else str(value) if isinstance(value, int) and not isinstance(
            value, bool) else _MISMATCH
    if kind in ("int32", "int64"):
        bound = 2**31 if kind == "int32" else 2**63
        ok = isinstance(value, int) and not isinstance(value, bool) and -bound <= value < bound
        return value if ok else _MISMATCH
    if kind == "double":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _MISMATCH
    if kind == "list<item: string>":
        ok = isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
        return [str(v) for v in value] if ok else _MISMATCH
    return _MISMATCH


# --------------------------------------------------------------------------------------------- tables


def rows_table(rows: list[dict[str, Any]]) -> Any:
    """A shard's rows as an Arrow table: the ingest columns, then every other field in order of appearance."""
    import pyarrow as pa

    from dataengine.metadata_table import meta_schema, rows_to_table

    if not rows:
        return meta_schema().empty_table()
    table = rows_to_table(rows)
    extras: list[str] = []
    for row in rows:
        extras.extend(name for name in row if name not in table.schema.names and name not in extras)
    for name in extras:
        table = table.append_column(name, _column([row.get(name) for row in rows]))
    return table


def _column(values: list[Any]) -> Any:
    """Scalars keep their Arrow type; nested values, and mixed types, become JSON text."""
    import pyarrow as pa

    try:
        array = pa.array(values)
        if pa.types.is_string(array.type) or pa.types.is_integer(array.type) or pa.types.is_floating(
                array.type) or pa.types.is_boolean(array.type) or pa.types.is_null(array.type):
            return array
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        pass
    return pa.array([None if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                     for v in values], pa.string())


def unified_schema(schemas: list[Any]) -> Any:
    """One schema for every shard's table: the ingest columns, then the extra columns in order of first
    appearance, each with the common type (integers and floats: float64; other mixes: string)."""
    import pyarrow as pa

    from dataengine.metadata_table import meta_schema

    base = meta_schema()
    types: dict[str, list[Any]] = {}
    for schema in schemas:
        for item in schema:
            if item.name not in base.names:
                types.setdefault(item.name, []).append(item.type)
    fields = list(base)
    for name, kinds in types.items():
        known = {t for t in kinds if not pa.types.is_null(t)}
        if not known:
            kind = pa.string()
        elif len(known) == 1:
            kind = known.pop()
        elif all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in known):
            kind = pa.float64()
        else:
            kind = pa.string()
        fields.append(pa.field(name, kind))
    return pa.schema(fields)


def conform(table: Any, schema: Any) -> Any:
    """``table`` with exactly ``schema``'s columns (absent ones null) and types."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for item in schema:
        if item.name in table.schema.names:
            column = table.column(item.name)
            columns.append(column if column.type == item.type else pc.cast(column, item.type))
        else:
            columns.append(pa.nulls(table.num_rows, item.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _build_index(folder: str, urls: list[str], sizes: list[int], storage_options: dict[str, Any] | None,
                 workers: int) -> None:
    """Index every shard into a scratch folder beside ``folder``, then publish it with one rename."""
    import pyarrow.parquet as pq

    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    scratch = os.path.join(parent, f".{os.path.basename(folder)}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(os.path.join(scratch, "parts"))
    logger.info("indexing %d webdataset shards (once; cached in %s)", len(urls), folder)
    try:
        entries = _index_parts(scratch, urls, storage_options, workers)
        schemas = [pq.read_schema(os.path.join(scratch, "parts", f"{i:06d}.parquet")) for i in range(len(urls))]
        schema = unified_schema(schemas)
        with pq.ParquetWriter(os.path.join(scratch, "metadata.parquet"), schema, compression="zstd") as writer:
            for index in range(len(urls)):
                part = os.path.join(scratch, "parts", f"{index:06d}.parquet")
                writer.write_table(conform(pq.read_table(part), schema))
                os.remove(part)
        os.rmdir(os.path.join(scratch, "parts"))
        manifest = _manifest(urls, sizes, entries)
        with open(os.path.join(scratch, "manifest.json"), "w") as handle:
            json.dump(manifest, handle, indent=1, sort_keys=True)
        _publish(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _index_parts(scratch: str, urls: list[str], storage_options: dict[str, Any] | None,
                 workers: int) -> list[dict[str, Any]]:
    """Index the shards on a thread pool; each shard's table goes to ``parts/``; returns their manifest entries."""
    import pyarrow.parquet as pq

    def one(index: int) -> dict[str, Any]:
        found = index_shard(index, urls[index], storage_options)
        table = rows_table(found.rows)
        pq.write_table(table, os.path.join(scratch, "parts", f"{index:06d}.parquet"))
        digest = hashlib.sha256()
        for row in found.rows:  # what the shard holds, in order: keys, image locations, sidecars (not its URL)
            content = {k: v for k, v in row.items() if k != "source" or v != urls[index]}
            digest.update(json.dumps(content, sort_keys=True, default=str).encode())
        return {"url": urls[index], "num_samples": len(found.rows), "error": found.error,
                "skipped_text_members": found.skipped_text, "index_sha256": digest.hexdigest()}

    with ThreadPoolExecutor(max(1, min(workers, len(urls)))) as pool:
        return list(pool.map(one, range(len(urls))))


def _manifest(urls: list[str], sizes: list[int], entries: list[dict[str, Any]]) -> dict[str, Any]:
    shards = [dict(entry, name=entry["url"], bytes=size) for entry, size in zip(entries, sizes)]
    content = hashlib.sha256()
    for shard in shards:  # content only: the same shards under other URLs (a copy) give the same digest
        content.update(f"{shard['num_samples']}:{shard['bytes']}:{shard['index_sha256']};".encode())
    from dataengine.shards import FORMAT

    return {"format": FORMAT, "version": INDEX_VERSION, "source": "webdataset", "shards": shards,
            "num_shards": len(shards), "num_samples": sum(s["num_samples"] for s in shards),
            "content_digest": content.hexdigest(),
            "errors": [{"url": s["url"], "error": s["error"]} for s in shards if s["error"]]}


def _publish(scratch: str, folder: str) -> None:
    try:
        os.rename(scratch, folder)
    except OSError:
        if not os.path.exists(os.path.join(folder, "manifest.json")):
            raise
        # Another process published the same index first: keep its copy.


# --------------------------------------------------------------------------------------------- ingest input


@dataclass(frozen=True)
class TarSample:
    """One webdataset sample of a tar given to ``dataengine ingest --images``.

    Attributes:
        key: the sample key, kept as the ingest key.
        image: member name of its image (the first of :data:`dataengine.shards.IMAGE_EXTENSIONS`), or None.
        offset: data offset of the image in a local tar (-1 when streamed).
        size: image bytes (-1 for an image of a streamed tar skipped for its size).
        data: the image bytes of a streamed tar (None for a local tar: read by offset).
        sidecars: every other member as ``(extension, bytes)``, in tar order.
        error: why the sample cannot be used (members over ``max_bytes``), or None.
    """

    key: str
    image: str | None
    offset: int
    size: int
    data: bytes | None
    sidecars: tuple[tuple[str, bytes], ...]
    error: str | None = None


def webdataset_tar_samples(url: str, storage_options: dict[str, Any] | None,
                           max_bytes: int) -> Iterator[TarSample] | None:
    """The samples of a webdataset tar, or ``None`` when the tar is a plain tar of images.

    A tar is a webdataset when its first sample holding an image also holds another member (a ``.json``,
    ``.txt``, ``.cls`` sidecar...). Members over ``max_bytes`` are not read (their sample gets an ``error``).

    Raises:
        tarfile.TarError: a corrupt or truncated tar (after the samples before the damage).
    """
    from dataengine.shards import IMAGE_EXTENSIONS

    for sample in _tar_samples(url, storage_options, max_bytes):
        if any(e in sample.members for e in IMAGE_EXTENSIONS):
            if len(sample.members) == 1:
                return None
            return _sidecar_samples(url, storage_options, max_bytes)
    return None


def _sidecar_samples(url: str, storage_options: dict[str, Any] | None, max_bytes: int) -> Iterator[TarSample]:
    from dataengine.shards import IMAGE_EXTENSIONS

    for sample in _tar_samples(url, storage_options, max_bytes):
        image = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
        name, offset, size, read = sample.members[image] if image else (None, -1, 0, lambda: None)
        sidecars, too_large = [], []
        for extension, (member, _, _, member_read) in sample.members.items():
            if extension == image:
                continue
            data = member_read()
            if data is None:
                too_large.append(member)
            else:
                sidecars.append((extension, data))
        data = read() if image and offset < 0 else None  # a local tar's image is read by offset, in a worker
        if image and (size > max_bytes or (offset < 0 and data is None)):
            too_large.insert(0, name)
        error = f"over the {max_bytes} bytes read at most: {', '.join(too_large)}" if too_large else None
        yield TarSample(sample.key, name, offset, size, data, tuple(sidecars), error)


def _tar_samples(url: str, storage_options: dict[str, Any] | None, max_bytes: int) -> Iterator[_Sample]:
    """Samples of a local ``.tar`` (headers scanned, members read by offset) or of any other tar read front to
    back (``.tar.gz``, object storage); members over ``max_bytes`` are never held in memory (``read()`` gives
    None)."""
    from dataengine.fs import open_input
    from dataengine.tario import iter_members, scan_tar

    errors: list[str] = []
    if not is_remote(url) and url.lower().endswith(".tar"):
        path = url.removeprefix("file://")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            members = ((name, offset, size, _bounded_pread(fd, offset, size, max_bytes))
                       for name, offset, size in scan_tar(path))
            yield from group_samples(members, errors)
        finally:
            os.close(fd)
    else:
        with open_input(url, storage_options) as stream:
            members = ((name, -1, -1 if data is None else len(data), lambda d=data: d)
                       for name, data in iter_members(stream, max_bytes=max_bytes))
            yield from group_samples(members, errors)
    if errors:
        raise tarfile.ReadError(f"{url}: {errors[0]}")


def _bounded_pread(fd: int, offset: int, size: int, max_bytes: int) -> Callable[[], bytes | None]:
    return lambda: os.pread(fd, size, offset) if size <= max_bytes else None
