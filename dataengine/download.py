"""Bounded, retrying HTTP downloads for ingest's download mode.

Each worker process owns one :class:`Downloader`: a thread pool of ``num_threads`` fetches a block of URLs
concurrently; every request has a timeout; transient failures (timeouts, connection errors, HTTP 5xx and
429) are retried with exponential backoff; permanent ones (other HTTP 4xx) are not.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_USER_AGENT = "dataengine/0.1 (+ingest download mode)"


@dataclass(frozen=True)
class DownloadResult:
    """The body of a successful download, or the error of the last attempt."""

    data: bytes | None
    error: str | None = None


def _is_transient(exc: Exception) -> bool:
    import urllib.error

    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, (urllib.error.URLError, TimeoutError, ConnectionError, OSError))


class Downloader:
    """Fetch URLs with a bounded thread pool, timeouts and retries.

    Args:
        num_threads: concurrent requests per worker process.
        timeout: seconds for connecting and for each read.
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

        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            body = response.read(self.max_bytes + 1)
        if len(body) > self.max_bytes:
            raise ValueError(f"body larger than {self.max_bytes} bytes")
        return body

    def fetch_all(self, urls: list[str | None]) -> list[DownloadResult]:
        """Download many URLs concurrently; results are in the order of ``urls``."""
        return list(self._pool.map(self.fetch, urls))
