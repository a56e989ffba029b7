"""Ingest inputs: the ordered rows of a source, and how a worker turns a row into bytes plus metadata.

These kinds of source exist:

* a YFCC metadata file plus an images root (``<root>/<photo_id>.<ext>`` or the download URL's basename);
* a YFCC metadata file in download mode (each photo fetched from its download URL over HTTP);
* an image folder or a tar of images, where a class sub-folder becomes the ``label``;
* a URL list in img2dataset's formats (txt, csv, tsv, json, jsonl, parquet; see :mod:`dataengine.url_lists`),
  each URL fetched over HTTP like download mode;
* a webdataset tar (samples ``<key>.jpg`` with sidecars ``<key>.json``/``.txt``/``.cls``..., e.g. a shard
  of img2dataset): each sample is a row that keeps its key, its ``.json`` fields in its metadata and its
  other sidecars as members of the output sample (see :func:`dataengine.foreign_shards.webdataset_tar_samples`).

The main process enumerates rows in input order (cheap: lines, file names, or tar members); workers do the
expensive part (reading or downloading bytes, decoding). Row order alone decides the output.

Hostile input stays a per-row status: a file name built from metadata (``<photo_id>.<ext>``, the download
URL's basename) is used only when it is a plain name (no separator, NUL, ``.``/``..``, at most 255 bytes);
a local file is read only when its real path (symlinks resolved) lies under the real images root, and only
when it is a regular file (opened non-blocking and checked with ``fstat``, so a FIFO cannot hang a worker).
Files and tar members above :data:`MAX_FILE_BYTES` and metadata lines above
:data:`dataengine.yfcc.MAX_LINE_BYTES` are refused without being read. Filesystem errors that concern one
file (permissions, name too long, symlink loops...) are that row's status; errors of the storage itself
(I/O errors, a full disk, the network) stop the run, which a re-run resumes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import posixpath
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dataengine import yfcc
from dataengine.download import Downloader
from dataengine.errors import InputCorruptError, InputUnusableError
from dataengine.fs import is_decompression_error, is_remote, iter_lines, open_input, url_to_fs
from dataengine.tario import iter_members, scan_tar
from dataengine.url_lists import UrlList, UrlRow, check_url_list, iter_url_rows

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
MAX_FILE_BYTES = 64 << 20
"""Largest image file (or tar member, or download) read into memory; larger ones are refused unread."""
_NAME_MAX = 255
# Errors that concern one file, not the storage: the row gets a status and the run goes on.
_PER_FILE_ERRNOS = frozenset((errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP,
                              errno.EACCES, errno.EPERM, errno.ENXIO, errno.EINVAL, errno.ENODEV))


@dataclass(frozen=True)
class Row:
    """One input row: its index in input order and what the worker needs to fetch it."""

    index: int
    line: bytes | None = None  # YFCC metadata line
    path: str | None = None  # image path relative to the folder/tar root
    data: bytes | None = None  # image bytes already read (tar members on object storage)
    offset: int = -1  # byte range of a member inside a local tar, read by the worker
    size: int = 0
    error: str | None = None  # why the row is unusable before any fetching (too long a line, too big a member)
    key: str | None = None  # a webdataset sample's key (kept as the ingest key)
    sidecars: tuple[tuple[str, bytes], ...] = ()  # a webdataset sample's other members: (extension, bytes)
    member_file: str | None = None  # local file holding the bytes at ``offset`` (None: the images tar itself)
    url_row: UrlRow | None = None  # a URL list's row


@dataclass
class Fetched:
    """A row after fetching: bytes (or a status explaining why there are none) and its metadata."""

    key: str | None
    metadata: dict[str, Any]
    data: bytes | None = None
    status: str = "ok"
    error: str | None = None
    extras: tuple[tuple[str, bytes], ...] = ()
    """Members written after ``<key>.json`` in the output sample: a webdataset sample's sidecars."""


def folder_key(relative_path: str) -> str:
    """Stable 16-hex key of an image inside a folder or tar (keys must not contain dots).

    Hashes the name's bytes: a file name that is not UTF-8 (held as surrogate escapes) gets a key too.
    """
    return hashlib.sha1(relative_path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def printable_name(path: str) -> str:
    """``path`` as valid Unicode for metadata and ledgers: name bytes that are not UTF-8 become U+FFFD."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def label_of(relative_path: str) -> str | None:
    """The class sub-folder of an image (its parent folder's name), ``None`` for files at the root."""
    path = relative_path.replace(os.sep, "/")
    return _folder_label(path[: path.rfind("/") + 1])  # the folder part decides; a folder holds many images


@functools.lru_cache(maxsize=4096)
def _folder_label(folder: str) -> str | None:
    return posixpath.basename(posixpath.dirname(folder)) or None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def iter_rows(yfcc_url: str | None, images_url: str | None, storage_options: dict[str, Any],
              url_list: UrlList | None = None) -> Iterator[Row]:
    """Enumerate the input rows in input order."""
    if url_list is not None:
        for index, url_row in enumerate(iter_url_rows(url_list, storage_options)):
            yield Row(index, url_row=url_row)
    elif yfcc_url:
        index = 0
        for line in iter_lines(yfcc_url, storage_options, max_bytes=yfcc.MAX_LINE_BYTES):
            if line.strip():  # blank lines are not rows
                yield Row(index, line=line)
                index += 1
    elif images_url and _is_tar(images_url):
        try:
            yield from _iter_tar_rows(images_url, storage_options)
        except Exception as exc:  # a malformed archive is one named error; I/O errors propagate unchanged
            if isinstance(exc, tarfile.TarError) or is_decompression_error(exc):
                raise InputCorruptError(f"images tar {images_url}: {type(exc).__name__}: {exc}") from exc
            raise
    elif images_url:
        yield from _iter_folder_rows(images_url, storage_options)
    else:
        raise ValueError("give --yfcc META (with --images ROOT or --download) or --images FOLDER_OR_TAR")


def check_inputs(yfcc_url: str | None, images_url: str | None, download: bool,
                 storage_options: dict[str, Any], url_list: UrlList | None = None) -> None:
    """Check that the inputs exist and are what they should be (a file, a folder), before any output is made.

    Raises:
        InputUnusableError: an input is missing, a folder where a file is expected or the reverse, or
            unreadable.
        InputCorruptError: the metadata file's compression is broken from its first bytes.
    """
    if url_list is not None:
        _check_kind(url_list.url, "file", "URL list", storage_options)
        check_url_list(url_list, storage_options)
    if yfcc_url:
        _check_kind(yfcc_url, "file", "metadata file", storage_options)
        if is_remote(yfcc_url) or os.path.isfile(_local_path(yfcc_url)):  # not a pipe: a probe would eat its bytes
            _probe_compression(yfcc_url, storage_options)
    if images_url and not download:
        tar = not yfcc_url and _is_tar(images_url)
        _check_kind(images_url, "file" if tar else "folder", "images tar" if tar else "images folder",
                    storage_options)


def _probe_compression(url: str, storage_options: dict[str, Any]) -> None:
    try:
        with open_input(url, storage_options) as handle:
            handle.read(1)
    except Exception as exc:  # the first bytes tell a wrong compression; anything else propagates
        if is_decompression_error(exc):
            raise InputCorruptError(f"metadata file {url}: {type(exc).__name__}: {exc}") from exc
        raise


def _check_kind(url: str, kind: str, what: str, storage_options: dict[str, Any]) -> None:
    if is_remote(url):
        fs, path = url_to_fs(url, storage_options)
        is_dir = fs.isdir(path)
        exists = is_dir or fs.exists(path)
    else:
        path = _local_path(url)
        exists, is_dir = os.path.exists(path), os.path.isdir(path)
    if not exists:
        raise InputUnusableError(f"{what} {url} does not exist")
    if is_dir != (kind == "folder"):
        raise InputUnusableError(f"{what} {url} is a {'folder' if is_dir else 'file'}, not a {kind}")
    if not is_remote(url) and not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        raise InputUnusableError(f"{what} {url} is not readable (permission denied)")


def _is_tar(url: str) -> bool:
    return url.lower().endswith((".tar", ".tar.gz", ".tgz"))


def _iter_folder_rows(root_url: str, storage_options: dict[str, Any]) -> Iterator[Row]:
    fs, root = url_to_fs(root_url, storage_options)
    if not fs.isdir(root):
        raise InputUnusableError(f"image folder {root_url!r} does not exist")
    found = fs.find(root)
    files = sorted(p for p in found if is_image_name(p))
    if len(found) > len(files):
        logger.info("skipping %d files without an image extension in %s", len(found) - len(files), root_url)
    for index, path in enumerate(files):
        yield Row(index, path=posixpath.relpath(path, root))


def _iter_tar_rows(tar_url: str, storage_options: dict[str, Any]) -> Iterator[Row]:
    from dataengine.foreign_shards import webdataset_tar_samples

    # Telling a webdataset tar apart reads its start a second time: a pipe, read once, is a plain tar of images.
    rereadable = is_remote(tar_url) or os.path.isfile(_local_path(tar_url))
    samples = webdataset_tar_samples(tar_url, storage_options, MAX_FILE_BYTES) if rereadable else None
    if samples is not None:
        for index, sample in enumerate(samples):
            yield Row(index, path=sample.image, data=sample.data, offset=sample.offset, size=max(sample.size, 0),
                      error=sample.error, key=sample.key, sidecars=sample.sidecars)
        return
    if not is_remote(tar_url) and tar_url.lower().endswith(".tar") and os.path.isfile(_local_path(tar_url)):
        # A local uncompressed tar file: only headers are read here; workers read member bytes by offset.
        members = ((n, o, s) for n, o, s in scan_tar(_local_path(tar_url)) if is_image_name(n))
        for index, (name, offset, size) in enumerate(members):
            yield Row(index, path=name, offset=offset, size=size, error=_too_large(size))
        return
    # Compressed, remote or a pipe: one front-to-back read of the stream (members in memory one at a time).
    with open_input(tar_url, storage_options) as stream:
        index = 0
        for name, data in iter_members(stream, max_bytes=MAX_FILE_BYTES):
            if is_image_name(name):
                yield Row(index, path=name, data=data, error=None if data is not None else _too_large())
                index += 1


def _too_large(size: int | None = None) -> str | None:
    """The row error of a file over :data:`MAX_FILE_BYTES` (``size`` unknown: a skipped tar member)."""
    if size is None:
        return f"more than the {MAX_FILE_BYTES} bytes read at most"
    return f"{size} bytes, more than the {MAX_FILE_BYTES} read at most" if size > MAX_FILE_BYTES else None


def _local_path(url: str) -> str:
    return url.removeprefix("file://")


def _plain_name_problem(name: str) -> str | None:
    """Why ``name`` (from metadata) cannot be a file name inside the images root, or ``None``."""
    if name in ("", ".", ".."):
        return "not a file name"
    if "/" in name or "\\" in name or "\0" in name:
        return "contains a path separator or NUL"
    if len(name.encode("utf-8", "replace")) > _NAME_MAX:
        return f"longer than {_NAME_MAX} bytes"
    return None


class _Unusable(Exception):
    """One candidate file cannot be used; ``status`` is what its row gets if no other candidate is found."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Fetcher:
    """Turns rows into bytes + metadata inside a worker process."""

    def __init__(self, images_url: str | None, download: bool, storage_options: dict[str, Any],
                 downloader: Downloader | None = None) -> None:
        self.images_url = images_url
        self.download = download
        self.storage_options = storage_options
        self.downloader = downloader
        self._fs = None
        self._root = ""
        self._local_root: str | None = None  # the real path of a local images root
        self._member_fds: dict[str, int] = {}  # local files read by offset (the images tar, a spool file)
        if images_url and not (download or _is_tar(images_url)):
            if is_remote(images_url):
                self._fs, self._root = url_to_fs(images_url, storage_options)
            else:
                self._local_root = os.path.realpath(_local_path(images_url))

    def parse_block(self, rows: list[Row]) -> list[Fetched]:
        """A block of rows parsed and validated, without fetching any bytes."""
        return [self._parse(row) for row in rows]

    def fetch_block(self, rows: list[Row]) -> list[Fetched]:
        """Fetch a block of rows (downloads run concurrently within the block)."""
        parsed = self.parse_block(rows)
        if self.download:
            wanted = [p for p in parsed if p.status == "ok"]
            urls = [p.metadata.get("download_url") for p in wanted]
            for item, result in zip(wanted, self.downloader.fetch_all(urls)):
                item.data, item.error = result.data, result.error
                item.status = "ok" if result.data is not None else "download_failed"
        else:
            for row, item in zip(rows, parsed):
                if item.status == "ok" and item.data is None:
                    self._read_tar_member(row, item) if row.offset >= 0 else self._read_local(row, item)
        return parsed

    def _parse(self, row: Row) -> Fetched:
        if row.url_row is not None:
            return _url_list_row(row.url_row)
        if row.key is not None:
            return _webdataset_sample(row)
        if row.line is None:
            relative = row.path.replace(os.sep, "/")
            shown = printable_name(relative)
            metadata = {"label": label_of(shown), "source": shown}
            if row.error:
                return Fetched(folder_key(relative), metadata, status="corrupt", error=row.error)
            return Fetched(folder_key(relative), metadata, data=row.data)
        record = yfcc.parse_line(row.line)
        if isinstance(record, yfcc.BadLine):
            key = str(record.photo_id) if record.photo_id is not None else None
            return Fetched(key, {}, status="bad_metadata", error=record.reason)
        metadata = record.to_dict()
        if record.is_video:
            return Fetched(str(record.photo_id), metadata, status="video", error="marker 1 (video)")
        if self.download and not record.download_url:
            return Fetched(str(record.photo_id), metadata, status="bad_metadata", error="no download URL")
        metadata["source"] = record.download_url if self.download else None
        return Fetched(str(record.photo_id), metadata)

    def _candidates(self, metadata: dict[str, Any]) -> tuple[list[str], list[str]]:
        """File names that may hold the photo, and the refused ones with the reason."""
        photo_id = metadata["photo_id"]
        names = []
        ext = (metadata.get("extension_original") or "").lower()
        for extension in dict.fromkeys(e for e in (ext, "jpg", "jpeg", "png", "JPG") if e):
            names.append(f"{photo_id}.{extension}")
        if metadata.get("download_url"):
            names.append(posixpath.basename(metadata["download_url"].split("?")[0]))
        refused = []
        for name in names:
            problem = _plain_name_problem(name)
            if problem:
                refused.append(f"{name[:60]!r} ({problem})")
        return [name for name in names if not _plain_name_problem(name)], refused

    def _read_tar_member(self, row: Row, item: Fetched) -> None:
        path = row.member_file or _local_path(self.images_url)
        if path not in self._member_fds:
            self._member_fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        item.data = os.pread(self._member_fds[path], row.size, row.offset)

    def _read_local(self, row: Row, item: Fetched) -> None:
        if row.line is None:  # a listed file of an image folder
            names, refused = [row.path], []
        else:
            names, refused = self._candidates(item.metadata)
        corrupt: str | None = None  # a candidate that exists but is not a usable file
        for name in names:
            try:
                item.data = self._read_file(name)
            except FileNotFoundError:
                continue
            except _Unusable as exc:
                refused.append(f"{name} ({exc})")
                corrupt = corrupt or (f"{name}: {exc}" if exc.status == "corrupt" else None)
                continue
            if row.line is not None:  # a folder row's source is already its (printable) path
                item.metadata["source"] = name
            return
        tried = f"tried {', '.join(names) or 'no usable name'}" + (f"; refused {', '.join(refused)}" if refused else "")
        if corrupt:
            item.status, item.error = "corrupt", printable_name(corrupt)
        else:
            item.status, item.error = "missing", printable_name(f"not found under {self.images_url}: {tried}")

    def _read_file(self, name: str) -> bytes:
        """The bytes of ``name`` under the images root.

        Raises:
            FileNotFoundError: there is no such file.
            _Unusable: the file exists but cannot or must not be read (outside the root, not a regular
                file, too large, unreadable).
        """
        if self._local_root is None:
            return self._read_remote(name)
        real = os.path.realpath(os.path.join(self._local_root, name))
        if not real.startswith(self._local_root.rstrip(os.sep) + os.sep):
            raise _Unusable("missing", "resolves outside the images root")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise _file_error(exc) from None
        try:
            info = os.fstat(fd)  # before any file object: one over a folder's descriptor cannot even be made
            if not stat.S_ISREG(info.st_mode):
                if stat.S_ISDIR(info.st_mode):
                    raise FileNotFoundError(real)  # a folder named like the photo: not a candidate
                raise _Unusable("corrupt", f"not a regular file (mode {stat.filemode(info.st_mode)})")
            if info.st_size > MAX_FILE_BYTES:
                raise _Unusable("corrupt", _too_large(info.st_size))
            with open(fd, "rb", buffering=0, closefd=False) as handle:
                return handle.read()
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise _file_error(exc) from None
        finally:
            os.close(fd)

    def _read_remote(self, name: str) -> bytes:
        path = self._fs.sep.join([self._root.rstrip(self._fs.sep), name])
        try:
            with self._fs.open(path, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except (IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(path) from None
        except PermissionError as exc:
            raise _Unusable("missing", f"{type(exc).__name__}: {exc}") from None
        if len(data) > MAX_FILE_BYTES:
            raise _Unusable("corrupt", _too_large())
        return data


def _url_list_row(url_row: UrlRow) -> Fetched:
    """A URL list's row: fetched from its URL; ``url``, ``caption`` and the additional columns in its metadata
    (as img2dataset names them), the caption also as the sample's ``.txt``."""
    from dataengine.foreign_shards import merge_sidecar_fields

    metadata: dict[str, Any] = {"key": url_row.key}
    fields: dict[str, Any] = dict(url_row.extras)
    fields["url"] = url_row.url
    if url_row.caption is not None:
        fields["caption"] = url_row.caption
    merge_sidecar_fields(metadata, fields)  # an additional column named like an ingest column must fit its type
    metadata.update(download_url=url_row.url, source=url_row.url)
    if url_row.error:
        return Fetched(url_row.key, metadata, status="bad_metadata", error=url_row.error)
    extras = (("txt", url_row.caption.encode("utf-8", "replace")),) if url_row.caption is not None else ()
    return Fetched(url_row.key, metadata, extras=extras)


def _webdataset_sample(row: Row) -> Fetched:
    """A webdataset sample: its key, its sidecar metadata, its other members carried to the output."""
    from dataengine.foreign_shards import sidecar_metadata

    sidecars = dict(row.sidecars)
    metadata = sidecar_metadata(row.key, sidecars)
    source = metadata.pop("source", None)
    if source is not None and source != row.path:
        metadata["sidecar_source"] = source
    metadata["source"] = row.path
    extras = tuple((extension, data) for extension, data in row.sidecars if extension != "json")
    longest = max([f"{row.key}.{extension}" for extension, _ in extras] + [f"{row.key}.json"], key=len)
    if len(longest.encode("utf-8")) > 100:
        return Fetched(row.key, metadata, status="bad_metadata", error=f"member name {longest[:60]!r}... is longer "
                       "than the 100 bytes of a tar header")
    if row.error:
        return Fetched(row.key, metadata, status="corrupt", error=row.error)
    if row.path is None:
        return Fetched(row.key, metadata, status="missing", error=f"sample {row.key} has no image member "
                       f"(members: {', '.join(sorted(sidecars))})")
    return Fetched(row.key, metadata, data=row.data, extras=extras)


def _file_error(exc: OSError) -> Exception:
    """A per-file OSError as ``FileNotFoundError``/:class:`_Unusable`; others (EIO, ENOSPC...) unchanged."""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return FileNotFoundError(exc.errno, exc.strerror, exc.filename)
    if exc.errno in _PER_FILE_ERRNOS:
        return _Unusable("missing", f"{type(exc).__name__}: {exc.strerror}")
    return exc
