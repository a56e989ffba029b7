"""Exclusive locks on outputs: one run writes an output at a time, a second one fails at once.

Every stage that writes an output (ingest, embed, cluster, report, train; synth and assign too) holds the
output's lock while it runs, taken by its library entry point after its inputs are checked. The lock is a small
JSON record of its owner (pid, host, process start time, when it was taken, command line) at ``OUTPUT.lock``,
*beside* the output: taking it never creates the output, and a run that fails leaves nothing inside it. A second
writer reads the record and fails with :class:`~dataengine.errors.OutputLockedError` naming the owner.

* Local (and network-mounted) folders: the lock file is created with ``O_NOFOLLOW`` and held with ``flock``
  for the whole run, so the kernel drops it when its owner dies, however it dies. A record left by a dead
  owner is *stale* and taken over when its host is this host and its pid is gone (or is another process, by
  start time). A record of another host cannot be checked from here: the message says which file to delete
  if that run is known to be gone.
* Object storage (``s3://``): the lock object is created with a conditional PUT (``If-None-Match: *``), which
  S3 (and moto) refuse when the object exists, so of two writers exactly one creates it. A stale record (same
  host, dead pid) is replaced with a PUT conditional on its ETag (``If-Match``), so of two runs taking it over
  one wins. A record naming this very process with a token it does not hold (an earlier run in this process
  failed while the store was unreachable and could not delete it) is stale too. A run killed on another host
  leaves a lock that only a person can judge: delete the object.

Multi-rank runs (``torchrun``) take the lock on rank 0 and tell the other ranks whether it got it
(:func:`locked_output`). Each node of a multi-node ingest locks its own part (``OUTPUT.node-003.lock``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from dataengine.errors import OutputLockedError, OutputUnusableError
from dataengine.fs import Location, is_remote, remove_dead_scratch, remove_scratch

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"

# Descriptors of the local locks this process holds. A forked child (an ingest or DataLoader worker) closes its
# copies at once: flock belongs to the open file, so a worker that outlives its killed parent would otherwise
# keep the output locked until it ends.
_held_fds: set[int] = set()

# Tokens of the locks this process holds now. A record naming this very process with a token not in here was
# left by an earlier run in this process that could not delete it (object storage unreachable when it failed):
# it is stale, as a dead process's record is.
_held_tokens: set[str] = set()


def _close_inherited_locks() -> None:
    for fd in _held_fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_fds.clear()
    _held_tokens.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


@dataclass(frozen=True, kw_only=True)
class Owner:
    """Who holds a lock."""

    pid: int
    """Process id of the owner."""
    host: str
    """Host name of the owner."""
    process_start: float
    """Start time of the owner process (seconds since the epoch): tells a reused pid from the owner."""
    taken: float
    """When the lock was taken (seconds since the epoch)."""
    command: str
    """The owner's command line (for the person reading the message)."""
    token: str = ""
    """Random identifier of this taking of the lock (tells a lock this process holds from one it left)."""

    @staticmethod
    def of_this_process() -> "Owner":
        return Owner(pid=os.getpid(), host=socket.gethostname(), process_start=_process_start(os.getpid()) or 0.0,
                     taken=time.time(), command=" ".join(sys.argv)[:500], token=os.urandom(8).hex())

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True) + "\n").encode()

    @staticmethod
    def from_bytes(data: bytes) -> "Owner | None":
        """The owner recorded in ``data``; None when it is empty or unreadable (a lock being written)."""
        try:
            value = json.loads(data)
            return Owner(pid=int(value["pid"]), host=str(value["host"]), process_start=float(value["process_start"]),
                         taken=float(value["taken"]), command=str(value.get("command", "")),
                         token=str(value.get("token", "")))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.taken))
        return f"pid {self.pid} on {self.host} since {since}"

    def is_stale(self) -> bool:
        """True when the owner is known to be gone: same host, and its pid is dead or now another process, or it
        is this process and the lock is not one it holds now (left by an earlier run that failed to delete it)."""
        if self.host != socket.gethostname():
            return False
        start = _process_start(self.pid)
        if start is None or abs(start - self.process_start) > 1.0:
            return True
        return self.pid == os.getpid() and self.token not in _held_tokens


def _process_start(pid: int) -> float | None:
    """Start time of process ``pid``, or None when there is no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # it exists (another user's): alive, start time unknown
        return -1.0


def lock_url(url: str, part: str = "") -> str:
    """Where the lock of output ``url`` lives: ``url.lock`` beside it (``url.PART.lock`` for a part); inside
    it only when it has no parent (a bucket's root)."""
    base = url.rstrip("/") if is_remote(url) else os.path.abspath(url.removeprefix("file://"))
    suffix = (f".{part}" if part else "") + LOCK_SUFFIX
    if is_remote(base):
        protocol, path = base.split("://", 1)
        if "/" not in path:
            return f"{base}/{suffix.lstrip('.')}"
        return base + suffix
    if os.path.dirname(base) == base:
        return os.path.join(base, suffix.lstrip("."))
    return base + suffix


def check_output_path(url: str) -> None:
    """Raise :class:`OutputUnusableError` when the local output ``url`` cannot be a folder we write: it is a
    file, lies under a file, or its nearest existing folder is not writable. Remote URLs pass (object storage
    has no such shapes; permissions show at the first write)."""
    if is_remote(url):
        return
    path = os.path.abspath(url.removeprefix("file://"))
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputUnusableError(f"output {url} exists and is a file, not a folder; choose another path")
    ancestor = os.path.dirname(path)
    while not os.path.lexists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputUnusableError(f"output {url} lies under {ancestor}, which is a file; choose another path")
    existing = path if os.path.isdir(path) else ancestor
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputUnusableError(f"output {url}: {existing} is not writable")


class OutputLock:
    """The exclusive lock of one output (see the module docstring).

    Args:
        url: the output (local folder or ``s3://`` prefix).
        storage_options: fsspec options of a remote output.
        part: names a part of the output locked on its own (a node of a multi-node ingest).
        file: the output is one file (an export), not a folder: its folder is checked instead.
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, part: str = "",
                 file: bool = False) -> None:
        self.url = url
        self.file = file
        self.storage_options = dict(storage_options or {})
        self.path = lock_url(url, part)
        self.owner: Owner | None = None
        self._fd: int | None = None
        self._created_dirs: list[str] = []
        self._etag: str | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------------------------------ taking

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLockedError` at once (never waits)."""
        if self.file and not is_remote(self.url):
            parent = os.path.dirname(os.path.abspath(self.url))
            if os.path.isdir(self.url):
                raise OutputUnusableError(f"output {self.url} is a folder, not a file; choose another path")
            if os.path.lexists(parent) and not os.path.isdir(parent):
                raise OutputUnusableError(f"output {self.url} lies under {parent}, which is a file; choose "
                                          "another path")
            check_output_path(parent)
        elif not self.file:
            check_output_path(self.url)
        owner = Owner.of_this_process()
        if is_remote(self.path):
            self._acquire_remote(owner)
        else:
            self._acquire_local(owner)
        self.owner = owner
        _held_tokens.add(owner.token)
        remove_dead_scratch(self.url, self.storage_options)
        logger.debug("locked %s (%s)", self.url, self.path)

    def _locked(self, owner: Owner | None, hint: str = "") -> OutputLockedError:
        who = owner.describe() if owner else "another run (its record is being written)"
        return OutputLockedError(f"{self.url} is being written by {who}; wait for it to finish{hint}")

    def _acquire_local(self, owner: Owner) -> None:
        import fcntl

        self._make_parent()
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._remove_created_dirs()
                raise OutputUnusableError(f"output {self.url}: cannot create its lock {self.path}: "
                                          f"{exc.strerror or exc}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                recorded = Owner.from_bytes(_read_fd(fd))
                os.close(fd)
                self._remove_created_dirs()
                raise self._locked(recorded) from None
            # A releaser may have deleted the file between our open and our flock: then it is not the lock.
            try:
                current = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) != (mine.st_dev, mine.st_ino):
                os.close(fd)
                continue
            recorded = Owner.from_bytes(_read_fd(fd))
            if recorded is not None:
                if not recorded.is_stale():
                    # Not held (flock), but its owner may live on a host whose locks do not reach us.
                    os.close(fd)
                    self._remove_created_dirs()
                    raise self._locked(recorded, f"; if that run is gone, delete {self.path}")
                logger.warning("taking over the lock of %s left by %s (no such process any more)", self.url,
                               recorded.describe())
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.to_bytes(), 0)
            os.fsync(fd)
            self._fd = fd
            _held_fds.add(fd)
            return
        raise self._locked(None)

    def _make_parent(self) -> None:
        """Create the lock's missing parent folders, remembering them to remove at release."""
        parent = os.path.dirname(self.path)
        missing = []
        while not os.path.isdir(parent):
            missing.append(parent)
            parent = os.path.dirname(parent)
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError:
                continue
            except OSError as exc:
                self._remove_created_dirs()
                raise OutputUnusableError(f"output {self.url}: cannot create {folder}: {exc.strerror or exc}") \
                    from exc
            self._created_dirs.append(folder)

    def _acquire_remote(self, owner: Owner) -> None:
        location = Location(self.url, self.storage_options)
        fs = location.fs
        path = fs._strip_protocol(self.path)
        try:
            fs.pipe_file(path, owner.to_bytes(), mode="create")
        except FileExistsError:
            pass
        else:
            self._etag = _etag(fs, path)
            return
        try:
            info = fs.info(path, refresh=True)
            recorded = Owner.from_bytes(fs.cat_file(path))
        except FileNotFoundError:  # released meanwhile: one more try, no more
            try:
                fs.pipe_file(path, owner.to_bytes(), mode="create")
            except FileExistsError:
                raise self._locked(None) from None
            self._etag = _etag(fs, path)
            return
        if recorded is None or not recorded.is_stale():
            hint = "" if recorded is None or recorded.host == socket.gethostname() else \
                f"; if that run is gone, delete {self.path}"
            raise self._locked(recorded, hint)
        etag = info.get("ETag") or info.get("etag")
        try:
            fs.call_s3("put_object", Bucket=path.split("/", 1)[0], Key=path.split("/", 1)[1],
                       Body=owner.to_bytes(), IfMatch=etag)
        except OSError:  # the ETag changed: another run took it over first
            raise self._locked(None) from None
        logger.warning("taking over the lock of %s left by %s (no such process any more)", self.url,
                       recorded.describe())
        self._etag = _etag(fs, path)

    # ------------------------------------------------------------------------------------------ leaving

    def release(self) -> None:
        """Give the lock up: delete the record, then this run's scratch, then the folders made for the lock."""
        if self.owner is None:
            return
        try:
            if self._fd is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)  # while holding flock: nobody can take a half-removed lock
                _held_fds.discard(self._fd)
                os.close(self._fd)
                self._fd = None
            else:
                location = Location(self.url, self.storage_options)
                with contextlib.suppress(FileNotFoundError):
                    location.fs.rm_file(location.fs._strip_protocol(self.path))
        finally:
            _held_tokens.discard(self.owner.token)
            self.owner = None
            remove_scratch(self.url)
            self._remove_created_dirs()

    def _remove_created_dirs(self) -> None:
        for folder in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only when empty
        self._created_dirs = []


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 1 << 16, 0)


def _etag(fs: Any, path: str) -> str | None:
    with contextlib.suppress(OSError):
        info = fs.info(path, refresh=True)
        return info.get("ETag") or info.get("etag")
    return None


@contextlib.contextmanager
def locked_output(url: str, storage_options: dict[str, Any] | None = None, *, part: str = "", rank: int = 0,
                  all_true: Callable[[bool], bool] | None = None, file: bool = False) -> Iterator[OutputLock | None]:
    """Hold the lock of output ``url`` for the body of the ``with``.

    Under several ranks rank 0 takes it and ``all_true`` (an all-reduce over the ranks, e.g.
    :func:`indexes.distributed.all_true`) tells the others whether it did; every rank raises when it did not.
    """
    lock, error = None, None
    if rank == 0:
        lock = OutputLock(url, storage_options, part, file)
        try:
            lock.acquire()
        except Exception as exc:  # re-raised below, after telling the other ranks
            lock, error = None, exc
    if all_true is not None and not all_true(error is None):
        if error is not None:
            raise error
        raise OutputLockedError(f"{url}: rank 0 could not take the output's lock (see its error)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
