"""The downloader against a local HTTP server on 127.0.0.1: a total deadline per attempt (trickling bodies and
headers), short bodies retried, 5xx/408/429 retried with backoff, 4xx not, size limits, redirects kept to
http(s), concurrency keeping order; and download-mode ingest recording these as ``download_failed``."""

from __future__ import annotations

import json
import socket
import time
import urllib.parse

import pyarrow.parquet as pq
import pytest

from dataengine.download import Downloader
from dataengine.ingest import IngestConfig, run_ingest
from dataengine.yfcc import FIELDS_25


def yfcc_line(photo_id: int, download_url: str) -> str:
    values = dict.fromkeys(FIELDS_25, "")
    values.update(photo_id=str(photo_id), marker="0", download_url=download_url)
    return "\t".join(values[name] for name in FIELDS_25)


def _downloader(**options) -> Downloader:
    settings = {"num_threads": 4, "timeout": 1.0, "retries": 2, "backoff": 0.05}
    settings.update(options)
    return Downloader(**settings)


def test_a_plain_download(server):
    assert _downloader().fetch(f"{server}/ok/a").data == server.body


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["trickle", "trickle-nolength", "trickle-headers"])
def test_a_trickling_server_is_cut_off_at_the_deadline(server, kind):
    """A byte every 0.25 s never trips a 1 s socket timeout; the attempt's deadline cuts it off anyway."""
    result = _downloader(retries=0).fetch(f"{server}/{kind}/x")
    assert result.data is None and "DeadlineExceeded: no complete response within 1 s" in result.error, result
    time.sleep(0.6)  # let the server notice the closed connection
    assert server.handler.sent[f"/{kind}/x"] < 20, server.handler.sent  # it was cut off well before its 10 s


def test_a_short_body_is_retried_then_fails_instead_of_passing_as_data(server):
    result = _downloader(retries=2).fetch(f"{server}/short/x")
    assert result.data is None and "ShortBody: connection closed after 500 of 1000 bytes" in result.error
    assert server.handler.attempts["/short/x"] == 3 and "after 3 attempt(s)" in result.error


def test_a_cut_chunked_body_is_retried(server):
    result = _downloader(retries=1).fetch(f"{server}/chunked-cut/x")
    assert result.data is None and server.handler.attempts["/chunked-cut/x"] == 2


@pytest.mark.parametrize("status, attempts", [(500, 3), (503, 3), (429, 3), (408, 3), (404, 1), (403, 1), (410, 1)])
def test_server_errors_are_retried_and_client_errors_are_not(server, status, attempts):
    result = _downloader(retries=2).fetch(f"{server}/status/{status}")
    assert result.data is None and f"HTTP Error {status}" in result.error
    assert server.handler.attempts[f"/status/{status}"] == attempts


def test_a_flaky_server_succeeds_on_retry_after_backoff(server):
    downloader = _downloader(retries=2, backoff=0.2)
    start = time.monotonic()
    assert downloader.fetch(f"{server}/flaky/a").data == server.body
    assert server.handler.attempts["/flaky/a"] == 2 and time.monotonic() - start >= 0.2  # it waited before retrying


def test_a_refused_connection_is_retried(server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens once it is closed
    result = _downloader(retries=1).fetch(f"http://127.0.0.1:{port}/x")
    assert result.data is None and "Connection refused" in result.error and "after 2 attempt(s)" in result.error


def test_bodies_over_the_limit_are_refused_and_not_retried(server):
    downloader = _downloader(max_bytes=4096)
    declared = downloader.fetch(f"{server}/big/x")  # Content-Length of 1 TiB: refused before reading
    assert "BodyTooLarge: body of 1099511627776 bytes" in declared.error and server.handler.attempts["/big/x"] == 1
    streamed = downloader.fetch(f"{server}/big-nolength/x")
    assert "BodyTooLarge" in streamed.error and server.handler.attempts["/big-nolength/x"] == 1


def test_redirects_are_followed_only_to_http(server):
    downloader = _downloader()
    assert downloader.fetch(f"{server}/redirect/?to=/ok/a").data == server.body
    for target in ("file:///etc/passwd", "ftp://127.0.0.1/x", "data:,hello"):
        result = downloader.fetch(f"{server}/redirect/?to={urllib.parse.quote(target)}")
        assert result.data is None and ("redirect to a non-HTTP URL" in result.error  # ftp: urllib would follow
                                        or "is not allowed" in result.error), result
        assert server.handler.attempts[f"/redirect/?to={urllib.parse.quote(target)}"] == 1
    looped = downloader.fetch(f"{server}/loop/x")
    assert looped.data is None and server.handler.attempts["/loop/x"] <= 10


def test_urls_that_are_not_http_are_not_fetched():
    downloader = _downloader()
    for url in (None, "", "file:///etc/passwd", "ftp://h/x", "javascript:alert(1)"):
        assert downloader.fetch(url).error.startswith("not an http(s) URL")
    assert "InvalidURL" in downloader.fetch("http://h/a\x00b").error  # a control character: permanent


def test_fetch_all_keeps_the_order_of_the_urls(server):
    urls = [f"{server}/ok/{i}" if i % 3 else f"{server}/status/404" for i in range(12)]
    results = _downloader(num_threads=5).fetch_all(urls)
    assert [r.data is not None for r in results] == [bool(i % 3) for i in range(12)]


@pytest.mark.timeout(120)
def test_download_mode_records_each_failure_as_download_failed(tmp_path, server):
    """404, a trickle, a short body: download_failed (a short body used to pass as data and end corrupt); a
    503 once is retried to ok; the sample's source is its URL."""
    server.handler.images = {f"{i}.jpg": server.jpeg(i) for i in range(8)}
    urls = [f"{server}/ok/{i}.jpg" for i in range(4)] + [f"{server}/flaky/4.jpg", f"{server}/trickle/5.jpg",
                                                        f"{server}/short/6.jpg", f"{server}/status/404"]
    (tmp_path / "meta.tsv").write_text("\n".join(yfcc_line(i, url) for i, url in enumerate(urls)))
    result = run_ingest(IngestConfig(yfcc=str(tmp_path / "meta.tsv"), download=True, out=str(tmp_path / "out"),
                                     workers=1, download_timeout=1.0, download_retries=1))
    assert result.counts["ok"] == 5 and result.counts["download_failed"] == 3 and result.counts["corrupt"] == 0
    ledger = {e["id"]: e["error"] for e in map(json.loads, (tmp_path / "out" / "ledger.jsonl").read_text().splitlines())}
    assert "DeadlineExceeded" in ledger["5"] and "ShortBody" in ledger["6"] and "HTTP Error 404" in ledger["7"]
    assert server.handler.attempts["/flaky/4.jpg"] == 2
    metadata = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert {row["key"]: row["source"] for row in metadata}["4"] == urls[4]


def test_download_options_are_checked():
    for bad in ({"download_timeout": 0}, {"download_timeout": float("nan")}, {"download_retries": -1}):
        with pytest.raises(ValueError, match="download_"):
            IngestConfig(yfcc="m.tsv", download=True, out="o", **bad)
