"""The shard format, both directions: how ingest writes samples and the manifest, and how later stages read
them back (the manifest, shard URLs, webdataset streams).

An ingest output (local folder or ``s3://`` prefix) holds ``manifest.json`` (written last) listing webdataset
tar shards in row order: row ``r`` of ``metadata.parquet`` is the r-th sample when reading the shards in
manifest order, each tar in order. :class:`ShardSet` gives every shard its first global row, so a range of
rows maps to the shards overlapping it (:meth:`ShardSet.overlapping`).

A sample is two consecutive tar members, ``<key>.jpg`` (the re-encoded image) then ``<key>.json`` (its
metadata), followed by the other sidecars of a webdataset sample that was ingested (``<key>.txt``...):
:func:`sample_members` packs them, :func:`build_manifest` writes the manifest that :func:`load_shard_set`
checks. Tar bytes themselves are read and packed by :mod:`dataengine.tario`.

Shards written by another tool (a brace pattern, a ``::`` list, a folder of tars without a manifest) are
indexed by :mod:`dataengine.foreign_shards` into an equivalent manifest and ``metadata.parquet``;
:func:`load_shard_set` returns the same :class:`ShardSet` for both, with the same row alignment.

Streams follow webdataset's sample conventions; shards are opened with webdataset's ``gopen``, remote ones
through fsspec by an opener registered in ``webdataset.gopen_schemes`` (:func:`register_fsspec_opener`): never through ``pipe:`` subprocesses.
Per-sample problems met while streaming go through one handler, :class:`StreamErrors`, which records data
errors (a corrupt tar member, a truncated tar) and re-raises I/O errors, which are worth a retry rather than
marking rows invalid for good.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from dataengine.errors import IncompleteOutputError, InputUnusableError
from dataengine.fs import Location, url_to_fs
from dataengine.tario import BLOCK, iter_members, ustar_header

logger = logging.getLogger(__name__)

FORMAT = "dataengine.shards"
VERSION = 1
"""Version written by this dataengine."""
SUPPORTED_VERSIONS = (1,)
# Protocols whose shards are opened through fsspec. Local paths and file:// URLs are opened by webdataset.
FSSPEC_PROTOCOLS = ("s3", "gcs", "gs", "az", "abfs", "memory")
# Storage options per protocol, read by the gopen opener (webdataset passes no options through its stages).
_STORAGE_OPTIONS: dict[str, dict[str, Any]] = {}


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a shard set.

    Attributes:
        index: position in the manifest.
        name: path relative to the shard set root (``shards/shard-000000.tar``).
        url: full URL or local path of the tar.
        num_samples: samples in the tar.
        first_row: global row (in ``metadata.parquet``) of the shard's first sample.
    """

    index: int
    name: str
    url: str
    num_samples: int
    first_row: int

    @property
    def end_row(self) -> int:
        """One past the global row of the shard's last sample."""
        return self.first_row + self.num_samples


@dataclass(frozen=True)
class ShardSet:
    """A complete ingest output: its manifest and shards with their global row ranges.

    Attributes:
        url: root of the ingest output.
        storage_options: fsspec options to read it.
        manifest: the parsed ``manifest.json``.
        digest: sha256 of the manifest's bytes (identifies the exact input of later stages).
        shards: the shards in row order.
    """

    url: str
    storage_options: dict[str, Any]
    manifest: dict[str, Any]
    digest: str
    shards: tuple[ShardInfo, ...]
    _starts: tuple[int, ...] = field(repr=False, default=())
    metadata_file: str | None = None
    """Where ``metadata.parquet`` is when it is not in ``url``: the shard index of foreign shards."""

    @property
    def num_samples(self) -> int:
        """Total number of samples (rows of ``metadata.parquet``)."""
        return self.shards[-1].end_row if self.shards else 0

    @property
    def metadata_url(self) -> str:
        """URL of ``metadata.parquet``."""
        if self.metadata_file is not None:
            return self.metadata_file
        return Location(self.url, self.storage_options).child_url("metadata.parquet")

    def urls(self) -> list[str]:
        """Shard URLs (local paths for local sets) in manifest order."""
        return [shard.url for shard in self.shards]

    def overlapping(self, row_start: int, row_end: int) -> list[tuple[ShardInfo, int, int]]:
        """Shards overlapping global rows ``[row_start, row_end)``, each with the overlap as shard positions.

        Returns:
            ``(shard, first_position, end_position)`` for every shard with samples in the range, in order.
        """
        found = []
        index = max(0, bisect.bisect_right(self._starts, row_start) - 1)
        while index < len(self.shards) and self.shards[index].first_row < row_end:
            shard = self.shards[index]
            low, high = max(row_start, shard.first_row), min(row_end, shard.end_row)
            if low < high:
                found.append((shard, low - shard.first_row, high - shard.first_row))
            index += 1
        return found


def load_shard_set(url: str, storage_options: dict[str, Any] | None = None,
                   index_root: str | None = None) -> ShardSet:
    """Load and validate the manifest of an ingest output, or index webdataset shards written by another tool.

    Args:
        url: the folder given to ``dataengine ingest --out`` (local path or fsspec URL); or shards that ingest
            did not write: a ``.tar`` URL, a brace pattern (``shards/{00000..00099}.tar``), a ``::`` list of
            them, or a folder of tars without ``manifest.json`` (see :mod:`dataengine.foreign_shards`).
        storage_options: fsspec options (``endpoint_url``, ``key``, ``secret``...).
        index_root: where the index of foreign shards is cached (default: the user's cache folder).

    Raises:
        IncompleteOutputError: a folder without ``manifest.json`` nor tars (the ingest did not finish).
        InputUnusableError: the manifest is not a supported ``dataengine.shards`` manifest, or lists no sample.
        FileNotFoundError: a named shard does not exist.
    """
    from dataengine import foreign_shards

    if foreign_shards.is_shard_spec(url):
        return foreign_shards.load_foreign_shard_set(url, storage_options, index_root=index_root)
    location = Location(url, storage_options)
    if not location.exists("manifest.json"):
        tars = foreign_shards.tars_in_folder(url, storage_options)
        if tars:
            return foreign_shards.load_foreign_shard_set(url, storage_options, urls=tars, index_root=index_root)
        raise IncompleteOutputError(f"{location.url} has no manifest.json: not an ingest output, or the ingest "
                                    "has not finished (re-run `dataengine ingest` to complete it); shards written "
                                    "by another tool are named by a pattern such as shards/{00000..00099}.tar")
    data = location.read_bytes("manifest.json")
    manifest = _parse_manifest(data, location.url)
    shards, row = [], 0
    for index, entry in enumerate(manifest["shards"]):
        shards.append(ShardInfo(index, entry["name"], location.child_url(entry["name"]), int(entry["num_samples"]),
                                row))
        row += int(entry["num_samples"])
    if row == 0:
        raise InputUnusableError(f"{location.url}: the manifest lists no sample")
    return ShardSet(location.url, dict(storage_options or {}), manifest, hashlib.sha256(data).hexdigest(),
                    tuple(shards), tuple(s.first_row for s in shards))


def _parse_manifest(data: bytes, url: str) -> dict[str, Any]:
    import json

    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise InputUnusableError(f"{url}/manifest.json is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputUnusableError(f"{url}/manifest.json is not a {FORMAT!r} manifest")
    if manifest.get("version") not in SUPPORTED_VERSIONS:
        raise InputUnusableError(f"{url}/manifest.json has version {manifest.get('version')!r}; this dataengine "
                                 f"reads versions {SUPPORTED_VERSIONS}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) and "name" in s and "num_samples" in s
                                               for s in shards):
        raise InputUnusableError(f"{url}/manifest.json: 'shards' must be a list of {{name, num_samples, ...}}")
    total = sum(int(s["num_samples"]) for s in shards)
    if manifest.get("num_samples", total) != total:
        raise InputUnusableError(f"{url}/manifest.json: num_samples {manifest['num_samples']} differs from the "
                                 f"sum over shards {total}")
    return manifest


# ------------------------------------------------------------------------------------------------ writing

_ZEROS = memoryview(bytes(BLOCK))
IMAGE_DATA_OFFSET = BLOCK
"""Where the JPEG's bytes start inside :func:`sample_members`'s output (after its header)."""


def sample_members(key: str, jpeg: bytes, document: bytes, extras: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """The tar bytes of one sample: ``<key>.jpg`` then ``<key>.json`` (headers, data, padding), then the
    ``extras`` ``(extension, bytes)`` as ``<key>.<extension>`` (the sidecars of a webdataset sample ingested).

    Built by ingest's workers, so that the single shard writer only concatenates them.
    """
    parts = [ustar_header(f"{key}.jpg", len(jpeg)), jpeg, _ZEROS[: -len(jpeg) % BLOCK],
             ustar_header(f"{key}.json", len(document)), document, _ZEROS[: -len(document) % BLOCK]]
    for extension, data in extras:
        parts += [ustar_header(f"{key}.{extension}", len(data)), data, _ZEROS[: -len(data) % BLOCK]]
    return b"".join(parts)


def build_manifest(config: dict[str, Any], shards: list[dict[str, Any]], counts: dict[str, int],
                   cross_node_duplicates: int) -> dict[str, Any]:
    """The ``manifest.json`` of a shard set (written last: its presence means the set is complete).

    Args:
        config: the resolved output-defining ingest config.
        shards: ``{name, num_samples, bytes, sha256}`` of every shard, in row order (other keys are dropped).
        counts: input rows per status.
        cross_node_duplicates: duplicates kept because they were ingested by different nodes.
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "shards": [{"name": s["name"], "num_samples": s["num_samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                   for s in shards],
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "counts": counts,
        "cross_node_duplicates": cross_node_duplicates,
    }


# --------------------------------------------------------------------------------------------- streaming


def register_fsspec_opener(storage_options: dict[str, Any] | None = None,
                           protocols: Iterable[str] = FSSPEC_PROTOCOLS) -> None:
    """Make webdataset open ``protocol://`` shard URLs with fsspec, using ``storage_options``.

    Call it in every process that streams (DataLoader workers started with ``spawn`` do not inherit it).
    """
    import webdataset

    for protocol in protocols:
        _STORAGE_OPTIONS[protocol] = dict(storage_options or {})
        webdataset.gopen_schemes[protocol] = _gopen_fsspec


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset opener: a sequential-read fsspec file (no subprocess)."""
    protocol = url.split("://", 1)[0]
    fs, path = url_to_fs(url, _STORAGE_OPTIONS.get(protocol, {}))
    # Read-ahead suits tarfile's sequential stream reads; large blocks keep the request count low.
    return fs.open(path, mode, block_size=8 << 20, cache_type="readahead")


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""Member extensions read as a sample's image, in this order of preference (ingest writes ``jpg``)."""


def image_member(sample: dict[str, Any]) -> bytes | None:
    """The image bytes of a streamed sample (its first member among :data:`IMAGE_EXTENSIONS`), or ``None``."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return sample[extension]
    return None


# Errors that mean "the shard's bytes are bad": a truncated or corrupt tar, a duplicate member name.
DATA_ERRORS = (tarfile.TarError, EOFError, ValueError)


class StreamErrors:
    """The one handler for per-sample problems met while streaming shards (webdataset handler shape).

    Data errors (:data:`DATA_ERRORS`: a corrupt or truncated tar, a duplicate member name) are recorded and
    the stream continues. Anything else (``OSError``: missing shard, network failure; or a bug) is re-raised:
    the run should stop and be resumed rather than mark rows invalid for good because of it.

    Attributes:
        errors: the recorded messages, in order.
    """

    def __init__(self) -> None:
        self.errors: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, DATA_ERRORS):
            raise exn
        message = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
        logger.warning("shard stream: %s", message)
        self.errors.append(message)
        return True


def sample_stream(urls: list[str], handler: Callable[[Exception], bool] | None = None,
                  opener: Callable[[str], IO[bytes]] | None = None) -> Iterator[dict[str, Any]]:
    """Stream the samples of ``urls`` in order (``{"__key__", "__url__", "jpg", "json", ...}`` dicts).

    webdataset's sample semantics: consecutive members ``<key>.<ext>`` form one sample keyed ``<key>`` (the
    name up to the first dot of its last path component), extensions lower-cased, ``__*__`` members skipped,
    a repeated extension within a sample is a ``ValueError``. Shards are opened with webdataset's ``gopen``
    (remote URLs need :func:`register_fsspec_opener` first in this process) and closed as soon as the stream
    moves past them or is dropped; members are read by :func:`dataengine.tario.iter_members`, several times
    faster than webdataset's ``tarfile``-based expander (see ``tools/bench_train.py``).

    Args:
        urls: shard URLs, read in this order.
        handler: called with every error; returns True to go on (a tar error skips the rest of that shard,
            keeping the samples read before it), False to stop. Default: re-raise.
        opener: opens a URL for reading instead of webdataset's ``gopen`` (whose import brings in torch, seconds
            of start-up for a command that needs no model), e.g. :func:`dataengine.fs.open_input`.
    """
    if opener is None:
        from webdataset import gopen as opener

    for url in urls:
        try:
            stream = opener(url)
        except Exception as exn:
            if handler is None or not handler(exn):
                raise
            continue
        with stream:
            current: dict[str, Any] | None = None
            try:
                for name, data in iter_members(stream):
                    match = _MEMBER.match(name)
                    if match is None or _META.match(name):
                        continue
                    key, extension = match.group(1), match.group(2).lower()
                    if current is None or key != current["__key__"]:
                        if current is not None:
                            yield current
                        current = {"__key__": key, "__url__": url}
                    if extension in current:
                        error = ValueError(f"{name}: duplicate file name in tar file {url}")
                        if handler is None or not handler(error):
                            raise error
                        continue
                    current[extension] = data
            except Exception as exn:
                if handler is None or not handler(exn):
                    raise
            if current is not None:
                yield current


# webdataset's key/extension split and metadata-member rule.
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")
