"""Fixtures of the dataengine tests: a local HTTP server on 127.0.0.1 for the downloader and the ingest of
downloaded rows (YFCC download mode, URL lists)."""

from __future__ import annotations

import http.server
import io
import threading
import time
import urllib.parse

import pytest
from PIL import Image

BODY = bytes(range(256)) * 4


def jpeg_of(seed: int, size: tuple[int, int] = (24, 16)) -> bytes:
    """A small solid-colour JPEG (the colour from ``seed``)."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 40 % 256, 60, 90)).save(buffer, "JPEG")
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    attempts: dict[str, int] = {}
    sent: dict[str, int] = {}  # body bytes written before the client went away
    images: dict[str, bytes] = {}

    def do_GET(self):  # noqa: N802 (http.server API)
        path = self.path
        self.attempts[path] = self.attempts.get(path, 0) + 1
        kind = path.split("?")[0].strip("/").split("/")[0]
        getattr(self, f"_{kind.replace('-', '_')}", self._missing)(path)

    def _send(self, status: int, body: bytes, length: int | None = None, **headers: str) -> None:
        self.send_response(status)
        if length is not None or body:
            self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _ok(self, path):
        self._send(200, self.images.get(path.rsplit("/", 1)[-1], BODY))

    def _drip(self, path, data: bytes, pause: float) -> None:
        """Write ``data`` a byte at a time, counting what was sent before the client went away."""
        self.sent[path] = 0
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                self.sent[path] += 1
                time.sleep(pause)
        except OSError:
            pass
        self.close_connection = True

    def _trickle(self, path, with_length=True):  # 40 bytes at 4 bytes a second: 10 s for the whole body
        self.send_response(200)
        self.send_header(*(("Content-Length", "40") if with_length else ("Connection", "close")))
        self.end_headers()
        self._drip(path, b"x" * 40, 0.25)

    def _trickle_nolength(self, path):
        self._trickle(path, with_length=False)

    def _trickle_headers(self, path):
        self._drip(path, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Slow: " + b"y" * 60, 0.1)

    def _short(self, path):
        self._send(200, BODY[:500], length=1000)
        self.close_connection = True

    def _chunked_cut(self, path):
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"400\r\n" + BODY[:100])
        self.close_connection = True

    def _flaky(self, path):
        if self.attempts[path] == 1:
            self._send(503, b"busy")
        else:
            self._ok(path)

    def _status(self, path):
        self._send(int(path.rsplit("/", 1)[-1]), b"status")

    def _big(self, path):
        self._send(200, b"", length=1 << 40)
        self.close_connection = True

    def _big_nolength(self, path):
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(64):
                self.wfile.write(BODY * 16)
        except OSError:
            pass
        self.close_connection = True

    def _redirect(self, path):  # /redirect/?to=TARGET
        self._send(302, b"", length=0, Location=urllib.parse.unquote(path.split("?to=", 1)[1]))

    def _loop(self, path):
        self._send(302, b"", length=0, Location=path)

    def _missing(self, path):
        self._send(404, b"no such thing")

    def log_message(self, *args):
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def handle_error(self, request, client_address):
        pass  # clients that give up on purpose


class ServerURL(str):
    """The server's base URL; ``handler`` is its request handler class (``attempts``, ``sent``, ``images``)."""

    handler = _Handler
    body = BODY
    jpeg = staticmethod(jpeg_of)


@pytest.fixture()
def server():
    _Handler.attempts, _Handler.sent, _Handler.images = {}, {}, {}
    httpd = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield ServerURL(f"http://127.0.0.1:{httpd.server_address[1]}")
    httpd.shutdown()


