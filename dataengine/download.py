"""Bounded, retrying HTTP downloads for ingest's download mode.

Each worker process owns one :class:`Downloader`: a thread pool of ``num_threads`` fetches a block of URLs
concurrently. Every attempt has a total deadline of ``timeout`` seconds, connection, redirects, headers and
body included: a watchdog thread shuts the attempt's sockets down when it is over, so that a server
trickling a byte a second cannot hold a row (a socket timeout alone bounds each read, not the response).
Transient failures (deadline, connection errors, a body shorter than its ``Content-Length``, HTTP 5xx, 408
and 429) are retried with exponential backoff; permanent ones (other HTTP 4xx, a body over ``max_bytes``, a
redirect to anything but http(s)) are not. A row thus takes at most ``(retries + 1) * timeout`` seconds
plus the backoff (name resolution excepted: the resolver has no timeout of its own).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_USER_AGENT = "dataengine/0.1 (+ingest download mode)"
_TRANSIENT_HTTP = frozenset((408, 429))


@dataclass(frozen=True)
class DownloadResult:
    """The body of a successful download, or the error of the last attempt."""

    data: bytes | None
    error: str | None = None


class DeadlineExceeded(TimeoutError):
    """An attempt did not complete (connection, headers and body) within its deadline."""


class ShortBody(ConnectionError):
    """The connection ended before the body reached its ``Content-Length`` (transient: retried)."""


class BodyTooLarge(ValueError):
    """The body is larger than the downloader accepts (permanent: not retried)."""


def _is_transient(exc: Exception) -> bool:
    import http.client
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in _TRANSIENT_HTTP
    if isinstance(exc, BodyTooLarge):
        return False
    if isinstance(exc, urllib.error.URLError):  # a socket error of the connection, or a malformed URL (text)
        return isinstance(exc.reason, BaseException)
    return isinstance(exc, (TimeoutError, OSError, http.client.HTTPException))


class _Attempt:
    """One request's sockets, shut down together when its deadline passes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.expired = False
        self.finished = False

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def expire(self) -> None:
        with self._lock:
            if self.finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def finish(self) -> bool:
        """End the attempt (its deadline can no longer strike); True when it had already expired."""
        with self._lock:
            self.finished = True
            self._sockets.clear()
            return self.expired


def _shutdown(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for TLS sockets (whose own would tear down TLS state that the reading
    # thread is using): a blocked recv returns at once.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Watchdog:
    """One thread that expires attempts at their deadlines (a heap; finished attempts are skipped)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, _Attempt]] = []
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, attempt: _Attempt, deadline: float) -> None:
        with self._condition:
            heapq.heappush(self._heap, (deadline, next(self._sequence), attempt))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="download-watchdog", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _run(self) -> None:
        with self._condition:
            while True:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    heapq.heappop(self._heap)[2].expire()
                self._condition.wait(self._heap[0][0] - now if self._heap else None)


_current = threading.local()  # the attempt the calling download thread is making


def _build_opener() -> Any:
    """A urllib opener whose connections register with the current attempt and whose redirects stay http(s)."""
    import http.client
    import urllib.error
    import urllib.request

    def attach(sock: socket.socket) -> None:
        attempt = getattr(_current, "attempt", None)
        if attempt is not None:
            attempt.attach(sock)

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            super().connect()
            attach(self.sock)

    class TLSConnection(http.client.HTTPSConnection):
        def connect(self) -> None:
            super().connect()
            attach(self.sock)

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(Connection, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            options: dict[str, Any] = {"context": self._context}
            if getattr(self, "_check_hostname", None) is not None:
                options["check_hostname"] = self._check_hostname
            return self.do_open(TLSConnection, req, **options)

    class RedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
            if not newurl.lower().startswith(("http://", "https://")):
                raise urllib.error.HTTPError(newurl, code, f"redirect to a non-HTTP URL {newurl[:100]!r}", headers, fp)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler, RedirectHandler)


class Downloader:
    """Fetch URLs with a bounded thread pool, a deadline per attempt and retries.

    Args:
        num_threads: concurrent requests per worker process.
        timeout: seconds an attempt may take in all (connection, redirects, headers and body).
        retries: extra attempts after the first for transient failures.
        backoff: seconds before the first retry; doubles on each further retry.
        max_bytes: bodies larger than this are refused (protects memory).
    """

    def __init__(self, num_threads: int = 16, timeout: float = 10.0, retries: int = 2, backoff: float = 0.5,
                 max_bytes: int = 64 << 20) -> None:
        self.num_threads = num_threads
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_bytes = max_bytes
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="download")
        self._watchdog = _Watchdog()
        self._opener: Any = None
        self._opener_lock = threading.Lock()

    def fetch(self, url: str | None) -> DownloadResult:
        """Download one URL; never raises."""
        if not url or not url.lower().startswith(("http://", "https://")):
            return DownloadResult(None, f"not an http(s) URL: {url!r}")
        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return DownloadResult(self._get(url))
            except Exception as exc:  # classified below; every failure is reported, none is swallowed
                error = f"{type(exc).__name__}: {exc}"
                if not _is_transient(exc):
                    break
        logger.debug("download failed for %s: %s", url, error)
        return DownloadResult(None, f"{error} (after {attempt + 1} attempt(s))")

    def _get(self, url: str) -> bytes:
        import urllib.request  # lazily: ~0.1 s of start-up that only download mode needs

        with self._opener_lock:
            if self._opener is None:
                self._opener = _build_opener()
        attempt = _Attempt()
        _current.attempt = attempt
        self._watchdog.watch(attempt, time.monotonic() + self.timeout)
        late = f"no complete response within {self.timeout:g} s"
        try:
            request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
            with self._opener.open(request, timeout=self.timeout) as response:
                body = self._body(response)
        except Exception as exc:
            if attempt.finish():
                raise DeadlineExceeded(late) from exc
            raise
        finally:
            _current.attempt = None
        if attempt.finish():  # a body without Content-Length ends quietly when its socket is shut down
            raise DeadlineExceeded(late)
        return body

    def _body(self, response: Any) -> bytes:
        declared = response.headers.get("Content-Length", "")
        expected = int(declared) if declared.isdigit() else None
        if expected is not None and expected > self.max_bytes:
            raise BodyTooLarge(f"body of {expected} bytes, more than {self.max_bytes}")
        body = response.read(self.max_bytes + 1)
        if len(body) > self.max_bytes:
            raise BodyTooLarge(f"body larger than {self.max_bytes} bytes")
        if expected is not None and len(body) != expected:  # http.client returns a cut body without error
            raise ShortBody(f"connection closed after {len(body)} of {expected} bytes")
        return body

    def fetch_all(self, urls: list[str | None]) -> list[DownloadResult]:
        """Download many URLs concurrently; results are in the order of ``urls``."""
        return list(self._pool.map(self.fetch, urls))
