"""The run folder (``RUN``): a local folder or a prefix on object storage (``s3://bucket/run``).

Every file the trainer writes there (``checkpoint.pt``, ``metrics.jsonl``, the backbone snapshots of the
re-clusterings) replaces the previous one whole, so that whenever the process stops a reader finds the old
file or the complete new one, never a part:

* Local: a temporary in the same folder, flushed to disk (``fsync``), renamed over the file, then the folder's
  entry flushed too; once :meth:`RunFolder.replace` returns the file survives a power loss.
* Object storage: the file is built in a private local scratch folder (``mkdtemp``, mode 0700, removed
  afterwards) and uploaded as one object, by a single PUT or a multipart upload that one final request
  completes: S3 shows an object only once that request succeeds, and keeps serving the previous one until
  then. An upload cut short (the process killed between parts) is an incomplete multipart upload that no
  reader sees; :meth:`RunFolder.remove_leftovers` aborts those under the run's prefix at the next start.

The feature stores of the re-clusterings (``RUN/features/epochNNN``, Zarr) are written by the embed and
cluster stages through fsspec; this module lists and removes them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import shutil
import tempfile
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from dataengine.fs import Location, is_remote, join

logger = logging.getLogger(__name__)

UPLOAD_PART_BYTES = 64 << 20
"""Part size of the multipart uploads of large files to S3 (a file under twice this goes in one PUT)."""


class RunFolder:
    """The files of one run folder, local or remote.

    Args:
        url: a local path or an fsspec URL (``s3://bucket/run``).
        storage_options: fsspec options for a remote folder (``endpoint_url``, ``key``, ``secret``...).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.remote = is_remote(url)
        self.storage_options = dict(storage_options or {})
        self.location = Location(url, self.storage_options)

    def child(self, *parts: str) -> str:
        """URL (or path) of a file or folder inside the run folder."""
        return join(self.url, *parts)

    def make(self) -> None:
        """Create the folder (object storage needs none)."""
        if not self.remote:
            os.makedirs(self.url, exist_ok=True)

    def exists(self, rel: str) -> bool:
        if self.remote:
            self.location.fs.invalidate_cache(self.location.path(rel))
        return self.location.exists(rel)

    def listdir(self, rel: str = "") -> list[str]:
        """Names of the entries directly inside ``rel`` (empty when it does not exist)."""
        return self.location.listdir(rel)

    # ------------------------------------------------------------------------------------------ writing

    def replace(self, rel: str, write: Callable[[BinaryIO], None], before_publish: Callable[[], None] | None = None,
                on_part: Callable[[], None] | None = None) -> None:
        """Write ``rel`` through ``write(handle)`` so that it is replaced whole (see the module docstring).

        ``before_publish`` is called once the new content is complete locally (tests stop the process there);
        ``on_part`` once the first part of a multipart upload is sent, the upload not complete (remote only).
        """
        if not self.remote:
            path = self.location.path(rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            replace_durably(path, write, before_publish)
            return
        scratch = tempfile.mkdtemp(prefix="dataengine-run-")  # mode 0700: private to this user
        try:
            local = os.path.join(scratch, "upload")
            with open(local, "xb") as handle:
                write(handle)
            if before_publish is not None:
                before_publish()
            self._upload(local, rel, on_part)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _upload(self, local: str, rel: str, on_part: Callable[[], None] | None) -> None:
        fs, target = self.location.fs, self.location.path(rel)
        if fs.protocol[0] not in ("s3", "s3a"):
            fs.put_file(local, target)  # fsspec's other object stores also publish an upload whole
            return
        from fsspec.callbacks import Callback

        class FirstPart(Callback):
            def relative_update(self, inc: int = 1) -> None:
                first = self.value == 0
                super().relative_update(inc)
                if on_part is not None and first and self.value < self.size:
                    on_part()

        fs.put_file(local, target, callback=FirstPart(), chunksize=UPLOAD_PART_BYTES)
        fs.invalidate_cache(target)

    def save(self, rel: str, obj: Any, before_publish: Callable[[], None] | None = None,
             on_part: Callable[[], None] | None = None) -> None:
        """``torch.save`` ``obj`` to ``rel`` through :meth:`replace`."""
        self.replace(rel, lambda handle: torch.save(obj, handle), before_publish, on_part)

    def write_text(self, rel: str, text: str) -> None:
        self.replace(rel, lambda handle: handle.write(text.encode()))

    # ------------------------------------------------------------------------------------------ reading

    def load(self, rel: str) -> Any:
        """``torch.load(weights_only=True)`` of ``rel`` on the CPU; ``None`` when it does not exist.

        Raises:
            ValueError: the file is not a readable torch file (for instance cut short by a copy).
        """
        if not self.exists(rel):
            return None
        try:
            if self.remote:
                source: Any = io.BytesIO(self.location.read_bytes(rel))
            else:
                source = self.location.path(rel)
            return torch.load(source, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as exc:
            if isinstance(exc, FileNotFoundError):
                return None
            raise ValueError(f"{self.child(rel)} cannot be read as a torch file ({type(exc).__name__}: {exc}); "
                             "use another --out") from exc

    # ------------------------------------------------------------------------------------------ removing

    def remove(self, rel: str) -> None:
        """Remove a file (nothing when it is absent)."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.location.fs.rm_file(self.location.path(rel))
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.location.path(rel))

    def remove_tree(self, rel: str) -> None:
        """Remove a folder and everything under it (nothing when it is absent)."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.location.fs.rm(self.location.path(rel), recursive=True)
            self.location.fs.invalidate_cache(self.location.path(rel))
        else:
            shutil.rmtree(self.location.path(rel), ignore_errors=True)

    def remove_leftovers(self) -> int:
        """Remove what writers killed mid-write left behind (call with no writer running): temporaries of
        :func:`replace_durably` in a local folder, incomplete multipart uploads under a remote prefix. Returns
        how many."""
        if not self.remote:
            return remove_stale_temporaries(self.url)
        fs = self.location.fs
        if fs.protocol[0] not in ("s3", "s3a"):
            return 0
        bucket, prefix, _ = fs.split_path(self.location.root)
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        listing = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix)
        uploads = listing.get("Uploads", [])
        for upload in uploads:
            fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        if uploads:
            logger.info("aborted %d incomplete uploads under %s", len(uploads), self.url)
        return len(uploads)


def replace_durably(path: str, write: Callable[[BinaryIO], None],
                    before_rename: Callable[[], None] | None = None) -> None:
    """Write a local file through ``write(handle)`` so that, whenever the process or the machine stops, ``path``
    holds the old file or the whole new one, and once this returns the new one survives a power loss: a
    temporary in the same folder, flushed to disk, renamed over ``path``, then the folder's entry flushed too.

    ``before_rename`` is called once the temporary is on disk (tests stop the process there).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_stale_temporaries(folder: str) -> int:
    """Remove the temporaries :func:`replace_durably` leaves in ``folder`` when a process is killed before its
    rename (call with no writer running there); returns how many."""
    names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(".tmp")] \
        if os.path.isdir(folder) else []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return len(names)
