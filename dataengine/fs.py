"""Local and object-storage locations behind one small interface (fsspec).

Every stage reads and writes through :class:`Location`, so the same code writes shards to a local folder or
to ``s3://bucket/prefix``. Publishing is atomic: locally a file is written under a temporary name and renamed;
on object storage a single PUT (or a completed multipart upload) makes an object visible all at once.

Files are built in a scratch folder private to the run (:meth:`Location.scratch_dir`): ``mkdtemp`` (mode 0700,
an unpredictable name) inside a local output's ``.tmp`` (same filesystem, so publishing is a rename), or
under ``TMPDIR`` for a remote output; files in it are created with ``O_EXCL | O_NOFOLLOW``
(:func:`create_private`), so a name planted by another user is never followed nor reused. Scratch folders
of runs whose process is gone (same host) are removed when the output's lock is next taken.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import posixpath
import shutil
import socket
import uuid
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from dataengine.errors import InputCorruptError, InputUnusableError, StorageConfigError

if TYPE_CHECKING:
    import fsspec

# fsspec is imported only for remote URLs (or when a caller asks for a filesystem object): local paths go
# through os and open, and fsspec's import (~35 ms, asyncio included) is off every local command's start-up.
_COMPRESSION_BY_SUFFIX = {".gz": "gzip", ".tgz": "gzip", ".bz2": "bz2"}


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """Parse the ``--storage-options`` JSON object (``None`` or empty gives ``{}``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options must be a JSON object, got {text!r}: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"--storage-options must be a JSON object, got {type(value).__name__}")
    return value


def is_remote(url: str) -> bool:
    """True for URLs with a protocol other than ``file://`` (``s3://``, ``http://``, ``memory://``...)."""
    return "://" in url and not url.startswith("file://")


S3_TIMEOUTS = {"connect_timeout": 5, "read_timeout": 15}
"""Seconds one attempt of an S3 request may take to connect, and to wait for each read of its response."""
S3_RETRIES = {"mode": "standard", "total_max_attempts": 5}
"""botocore's retries of one S3 request: 5 attempts in all, with exponential backoff and full jitter between them
(connection errors, timeouts, 5xx answers and throttling are retried)."""


def with_storage_defaults(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``storage_options`` for ``url`` with the network policy filled in where the caller set none.

    For ``s3://``: :data:`S3_TIMEOUTS` per attempt, :data:`S3_RETRIES` and the HTTP session
    :class:`dataengine.s3http.S3HTTPSession` (no ``Expect: 100-continue``, so that the read timeout bounds
    every wait for an answer) go into botocore's ``config_kwargs`` (a caller's keys win; a caller's
    ``retries`` keeps its attempt count and gets ``mode`` standard unless it names one). s3fs on top retries
    a request as a whole (up to 5 times, backing off 0.1 s x 1.7^n) when the connection breaks or a read times
    out. Every filesystem of the project is made from these options, so no request waits without a bound.
    """
    import copy

    options = copy.deepcopy(dict(storage_options or {}))  # botocore rewrites the retries dict it is given
    if "://" not in url or url.split("://", 1)[0] not in ("s3", "s3a"):
        return options
    from dataengine.s3http import S3HTTPSession

    config = {**S3_TIMEOUTS, "http_session_cls": S3HTTPSession, **(options.get("config_kwargs") or {})}
    retries = config.get("retries")
    if retries is None:
        config["retries"] = dict(S3_RETRIES)
    elif isinstance(retries, dict):
        config["retries"] = {"mode": S3_RETRIES["mode"], **retries}
    options["config_kwargs"] = config
    return options


def url_to_fs(url: str, storage_options: dict[str, Any] | None = None) -> tuple["fsspec.AbstractFileSystem", str]:
    """Return the filesystem and the protocol-less path of ``url`` (with :func:`with_storage_defaults`).

    Raises:
        StorageConfigError: ``storage_options`` has a key the filesystem does not take.
    """
    from fsspec.core import url_to_fs as _url_to_fs

    try:
        fs, path = _url_to_fs(url, **with_storage_defaults(url, storage_options))
    except TypeError as exc:
        raise StorageConfigError(f"--storage-options for {url}: {exc}") from exc
    check_storage_options(fs, url)
    return fs, path


def check_storage_options(fs: "fsspec.AbstractFileSystem", url: str) -> None:
    """Raise :class:`StorageConfigError` for options that the filesystem keeps for later and would refuse only
    at its first request (s3fs hands unknown keys to its botocore session)."""
    extra = getattr(fs, "kwargs", None)
    if not extra or fs.protocol[0] not in ("s3", "s3a"):
        return
    import inspect

    from aiobotocore.session import AioSession

    accepted = set(inspect.signature(AioSession.__init__).parameters) - {"self"}
    unknown = sorted(set(extra) - accepted)
    if unknown:
        raise StorageConfigError(f"--storage-options for {url}: unknown key(s) {', '.join(map(repr, unknown))} "
                                 "(see s3fs.S3FileSystem for the keys it takes)")


def create_private(path: str, buffering: int = -1) -> IO[bytes]:
    """Open a new file for writing, refusing an existing name (even a dangling symlink) and never following one:
    ``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "wb", buffering=buffering)


# ------------------------------------------------------------------------------------------ scratch folders

SCRATCH_PREFIX = "dataengine-"
# Output URL -> (this process's private scratch folder, the pid that made it). A forked child inherits the
# table but must not remove its parent's folders at exit.
_scratch: dict[str, tuple[str, int]] = {}


def _output_key(url: str) -> str:
    """``url`` spelled as :class:`Location` spells it (absolute local path, remote URL without a final /)."""
    return url.rstrip("/") if is_remote(url) else os.path.abspath(url.removeprefix("file://"))


def _scratch_parent(url: str) -> str | None:
    """Where the scratch folders of output ``url`` live: ``.tmp`` inside a local output, TMPDIR otherwise."""
    return os.path.join(_output_key(url), ".tmp") if not is_remote(url) else None


def scratch_for(url: str) -> str:
    """This run's private scratch folder for output ``url`` (made on first use; unique per process)."""
    made = _scratch.get(_output_key(url))
    if made is not None and made[1] == os.getpid() and os.path.isdir(made[0]):
        return made[0]
    import tempfile

    parent = _scratch_parent(url)
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=parent)
    if not _scratch:
        atexit.register(_remove_all_scratch)
    _scratch[_output_key(url)] = (path, os.getpid())
    return path


def remove_scratch(url: str) -> None:
    """Remove this process's scratch folder of output ``url`` (and a local output's ``.tmp`` once empty)."""
    made = _scratch.pop(_output_key(url), None)
    if made is None or made[1] != os.getpid():
        return
    shutil.rmtree(made[0], ignore_errors=True)
    parent = _scratch_parent(url)
    if parent is not None:
        try:
            os.rmdir(parent)
        except OSError:
            pass


def _remove_all_scratch() -> None:
    for url in list(_scratch):
        remove_scratch(url)


def remove_dead_scratch(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the scratch folders that runs on this host left behind when they died (their pid is gone)."""
    import psutil

    parent = _scratch_parent(url)
    if parent is None:
        import tempfile

        parent = tempfile.gettempdir()
    host = socket.gethostname()
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        if not name.startswith(f"{SCRATCH_PREFIX}{host}-"):
            continue
        pid = name[len(SCRATCH_PREFIX) + len(host) + 1:].split("-", 1)[0]
        path = os.path.join(parent, name)
        if pid.isdigit() and not psutil.pid_exists(int(pid)) and os.path.isdir(path) and not os.path.islink(path) \
                and os.stat(path).st_uid == os.getuid():
            shutil.rmtree(path, ignore_errors=True)


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URLs and with the OS separator for local paths."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def compression_of(url: str) -> str | None:
    """The fsspec compression name implied by the file suffix (``.gz``, ``.bz2``) or ``None``."""
    return _COMPRESSION_BY_SUFFIX.get(os.path.splitext(url)[1].lower())


def open_input(url: str, storage_options: dict[str, Any] | None = None, mode: str = "rb") -> IO:
    """Open a local or remote file for reading, decompressing ``.gz`` and ``.bz2`` transparently."""
    compression = compression_of(url)
    if not is_remote(url) and mode == "rb":
        path = url.removeprefix("file://")
        if compression == "gzip":
            import gzip

            return gzip.open(path, "rb")
        if compression == "bz2":
            import bz2

            return bz2.open(path, "rb")
        return open(path, "rb")
    import fsspec

    return fsspec.open(url, mode, compression=compression, **with_storage_defaults(url, storage_options)).open()


_LINE_CHUNK = 1 << 20


def is_decompression_error(exc: BaseException) -> bool:
    """True for the errors gzip, bz2 and lzma raise on truncated or corrupt compressed data.

    (bz2 raises a bare ``OSError`` without errno, unlike the I/O errors of the file underneath.)
    """
    import gzip
    import lzma
    import zlib

    if isinstance(exc, (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)):
        return True
    return type(exc) is OSError and exc.errno is None and "data stream" in str(exc)


def iter_lines(url: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> Iterator[bytes]:
    """Yield the lines of a (possibly compressed, possibly remote) file as bytes, without line endings.

    With ``max_bytes``, a line of more bytes (``\\r`` included, ``\\n`` not) is yielded as its first
    ``max_bytes + 1`` bytes, so that the caller can tell it apart, and the rest of it is skipped without being
    held in memory: a file without newlines cannot exhaust memory.
    """
    try:
        yield from _lines(url, storage_options, -1 if max_bytes is None else max_bytes)
    except IsADirectoryError as exc:
        raise InputUnusableError(f"{url} is a folder, not a file") from exc
    except Exception as exc:  # decompression errors become one named error; anything else propagates
        if is_decompression_error(exc):
            raise InputCorruptError(f"{url}: truncated or corrupt compressed data ({type(exc).__name__}: {exc})") from exc
        raise


def _lines(url: str, storage_options: dict[str, Any] | None, limit: int) -> Iterator[bytes]:
    with open_input(url, storage_options) as handle:
        pending = b""  # the start of a line whose end is in a later chunk
        skipping = False  # ``pending`` is already over the limit: drop bytes up to the line's newline
        while chunk := handle.read(_LINE_CHUNK):
            if skipping:
                end = chunk.find(b"\n")
                if end < 0:
                    continue
                yield pending
                pending, skipping, chunk = b"", False, chunk[end + 1 :]
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield line[: limit + 1] if 0 <= limit < len(line) else line.rstrip(b"\r")
            if 0 <= limit < len(pending):
                pending, skipping = pending[: limit + 1], True
        if pending:
            yield pending if skipping else pending.rstrip(b"\r")


class Location:
    """A folder, local or on object storage, with atomic publishing of files inside it.

    Args:
        url: a local path or an fsspec URL such as ``s3://bucket/prefix``.
        storage_options: passed to fsspec (``endpoint_url``, ``key``, ``secret``...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.local = not is_remote(url)
        self.url = os.path.abspath(url.removeprefix("file://")) if self.local else url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        if self.local:
            self.root = self.url
        else:
            self.fs, self.root = url_to_fs(self.url, self.storage_options)

    @functools.cached_property
    def fs(self) -> "fsspec.AbstractFileSystem":
        """The fsspec filesystem (created on first use for a local folder, whose methods use os directly)."""
        return url_to_fs(self.url, self.storage_options)[0]

    def path(self, rel: str) -> str:
        """Filesystem path (no protocol) of ``rel`` inside this location."""
        return posixpath.join(self.root, rel) if not self.local else os.path.join(self.root, rel)

    def child_url(self, rel: str) -> str:
        """Full URL (with protocol for remote locations) of ``rel`` inside this location."""
        return join(self.url, rel)

    def makedirs(self, rel: str = "") -> None:
        if self.local:
            os.makedirs(self.path(rel), exist_ok=True)

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.path(rel)) if self.local else self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        if self.local:
            with open(self.path(rel), "rb") as handle:
                return handle.read()
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the files directly inside ``rel``; empty when it does not exist."""
        if self.local:
            return sorted(os.listdir(self.path(rel))) if os.path.isdir(self.path(rel)) else []
        self.fs.invalidate_cache(self.path(rel))  # s3fs caches listings; other processes may have written
        try:
            entries = self.fs.ls(self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write ``data`` to ``rel`` atomically: readers see the old file, no file, or the whole new file."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            # The temporary lives in the scratch folder (same filesystem, so the rename is atomic), so a
            # kill mid-write leaves no stray file next to the outputs.
            tmp = os.path.join(self.scratch_dir(), f"atomic-{uuid.uuid4().hex}")
            with create_private(tmp) as handle:
                handle.write(data)
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, rel: str, value: Any) -> None:
        self.write_bytes(rel, (json.dumps(value, indent=1, sort_keys=True) + "\n").encode())

    def publish(self, local_file: str, rel: str) -> None:
        """Move (locally) or upload (remotely) a finished local file to ``rel`` atomically."""
        target = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(local_file, target)
        else:
            self.fs.put_file(local_file, target)
            os.remove(local_file)

    def remove(self, rel: str) -> None:
        if self.local:
            if os.path.exists(self.path(rel)):
                os.remove(self.path(rel))
        elif self.exists(rel):
            self.fs.rm(self.path(rel))

    def scratch_dir(self) -> str:
        """This run's private folder for files being built before they are published (see the module
        docstring)."""
        return scratch_for(self.url)
