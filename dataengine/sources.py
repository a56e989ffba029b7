"""Ingest inputs: the ordered rows of a source, and how a worker turns a row into bytes plus metadata.

Three kinds of source exist:

* a YFCC metadata file plus an images root (``<root>/<photo_id>.<ext>`` or the download URL's basename);
* a YFCC metadata file in download mode (each photo fetched from its download URL over HTTP);
* an image folder or a tar of images, where a class sub-folder becomes the ``label``.

The main process enumerates rows in input order (cheap: lines, file names, or tar members); workers do the
expensive part (reading or downloading bytes, decoding). Row order alone decides the output.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dataengine import yfcc
from dataengine.download import Downloader
from dataengine.errors import InputUnusableError
from dataengine.fs import is_remote, iter_lines, open_input, url_to_fs
from dataengine.tario import scan_tar

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class Row:
    """One input row: its index in input order and what the worker needs to fetch it."""

    index: int
    line: bytes | None = None  # YFCC metadata line
    path: str | None = None  # image path relative to the folder/tar root
    data: bytes | None = None  # image bytes already read (tar members on object storage)
    offset: int = -1  # byte range of a member inside a local tar, read by the worker
    size: int = 0


@dataclass
class Fetched:
    """A row after fetching: bytes (or a status explaining why there are none) and its metadata."""

    key: str | None
    metadata: dict[str, Any]
    data: bytes | None = None
    status: str = "ok"
    error: str | None = None


def folder_key(relative_path: str) -> str:
    """Stable 16-hex key of an image inside a folder or tar (keys must not contain dots)."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


def label_of(relative_path: str) -> str | None:
    """The class sub-folder of an image (its parent folder's name), ``None`` for files at the root."""
    path = relative_path.replace(os.sep, "/")
    return _folder_label(path[: path.rfind("/") + 1])  # the folder part decides; a folder holds many images


@functools.lru_cache(maxsize=4096)
def _folder_label(folder: str) -> str | None:
    return posixpath.basename(posixpath.dirname(folder)) or None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def iter_rows(yfcc_url: str | None, images_url: str | None, storage_options: dict[str, Any]) -> Iterator[Row]:
    """Enumerate the input rows in input order."""
    if yfcc_url:
        index = 0
        for line in iter_lines(yfcc_url, storage_options):
            if line.strip():  # blank lines are not rows
                yield Row(index, line=line)
                index += 1
    elif images_url and _is_tar(images_url):
        yield from _iter_tar_rows(images_url, storage_options)
    elif images_url:
        yield from _iter_folder_rows(images_url, storage_options)
    else:
        raise ValueError("give --yfcc META (with --images ROOT or --download) or --images FOLDER_OR_TAR")


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
    if not is_remote(tar_url) and tar_url.lower().endswith(".tar"):
        # A local uncompressed tar: only headers are read here; workers read member bytes by offset.
        members = ((n, o, s) for n, o, s in scan_tar(tar_url) if is_image_name(n))
        for index, (name, offset, size) in enumerate(members):
            yield Row(index, path=name, offset=offset, size=size)
        return
    # Streaming mode ("r|*") reads the tar front to back once, so it works on object storage too.
    with open_input(tar_url, storage_options) as raw, tarfile.open(fileobj=raw, mode="r|*") as archive:
        index = 0
        for member in archive:
            if not member.isfile() or not is_image_name(member.name):
                continue
            handle = archive.extractfile(member)
            yield Row(index, path=member.name, data=handle.read() if handle else b"")
            index += 1


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
        self._tar_fd: int | None = None
        if images_url and not (download or _is_tar(images_url)):
            self._fs, self._root = url_to_fs(images_url, storage_options)

    def fetch_block(self, rows: list[Row]) -> list[Fetched]:
        """Fetch a block of rows (downloads run concurrently within the block)."""
        parsed = [self._parse(row) for row in rows]
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
        if row.line is None:
            relative = row.path.replace(os.sep, "/")
            metadata = {"label": label_of(relative), "source": relative}
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

    def _candidates(self, metadata: dict[str, Any]) -> list[str]:
        photo_id = metadata["photo_id"]
        names = []
        ext = (metadata.get("extension_original") or "").lower()
        for extension in dict.fromkeys(e for e in (ext, "jpg", "jpeg", "png", "JPG") if e):
            names.append(f"{photo_id}.{extension}")
        if metadata.get("download_url"):
            names.append(posixpath.basename(metadata["download_url"].split("?")[0]))
        return names

    def _read_tar_member(self, row: Row, item: Fetched) -> None:
        if self._tar_fd is None:
            self._tar_fd = os.open(self.images_url, os.O_RDONLY)
        item.data = os.pread(self._tar_fd, row.size, row.offset)

    def _read_local(self, row: Row, item: Fetched) -> None:
        names = [row.path] if row.line is None else self._candidates(item.metadata)
        for name in names:
            path = self._fs.sep.join([self._root.rstrip(self._fs.sep), name])
            try:
                with self._fs.open(path, "rb") as handle:
                    item.data = handle.read()
            except (FileNotFoundError, IsADirectoryError):
                continue
            item.metadata["source"] = name
            return
        item.status, item.error = "missing", f"not found under {self.images_url}: tried {', '.join(names)}"
