"""The fault proxy of the object-storage fault suite does what it says: seeded fates, resets, cuts, stalls,
delays and outages, observed from both ends of a real TCP connection."""

from __future__ import annotations

import collections
import http.client
import http.server
import socket
import threading
import time

import pytest

BODY = bytes(range(256)) * 1024  # 256 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: several exchanges per connection

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)
        size = int(self.path.rsplit("/", 1)[1])
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(BODY[:size])

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def _proxy(fault_proxy, upstream, **plan):
    return fault_proxy(upstream=upstream.server_address, **plan)


def _raw_get(port: int, path: str, timeout: float = 5.0) -> tuple[bytes, BaseException | None]:
    """Bytes received for one GET on a fresh connection, and the error that ended the read (None: EOF)."""
    received = b""
    try:  # a reset may reach a loaded machine's client while it is still in connect()
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    except OSError as exc:
        return received, exc
    with sock:
        try:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            while chunk := sock.recv(65536):
                received += chunk
        except OSError as exc:
            return received, exc
    return received, None


def test_clean_plan_forwards_every_byte_over_kept_alive_connections(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream)
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    for size in (0, 1, 1000, len(BODY), 77):
        connection.request("GET", f"/n/{size}")
        assert connection.getresponse().read() == BODY[:size]
    connection.close()
    assert proxy.stats["exchanges"] == proxy.stats["pass"] == 5 and proxy.stats["connections"] == 1


def test_fates_are_seeded_per_connection_and_exchange_and_follow_the_fractions():
    from faultproxy import FaultPlan

    plan = FaultPlan(delay=0.05, reset=0.05, cut=0.04, stall=0.01)
    fates = [plan.draw(7, c, e) for c in range(100) for e in range(100)]
    assert fates == [plan.draw(7, c, e) for c in range(100) for e in range(100)]
    assert fates != [plan.draw(8, c, e) for c in range(100) for e in range(100)]
    counts = collections.Counter(action for action, _, _ in fates)
    for action, fraction in (("delay", 0.05), ("reset", 0.05), ("cut", 0.04), ("stall", 0.01), ("pass", 0.85)):
        assert abs(counts[action] / len(fates) - fraction) < 0.01, counts
    assert all(0.05 <= delay <= 0.3 for action, delay, _ in fates if action == "delay")
    with pytest.raises(ValueError, match="sum"):
        FaultPlan(reset=0.6, cut=0.6)
    with pytest.raises(ValueError, match="unknown action"):
        FaultPlan(targets=(("GET", "explode"),))


def test_reset_stops_the_request_before_the_server(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream, targets=((r"GET /n/1000", "reset"),))
    received, error = _raw_get(proxy.port, "/n/1000")
    assert received == b"" and isinstance(error, ConnectionResetError)
    assert upstream.requests == []
    assert _raw_get(proxy.port, "/n/1000")[0].endswith(BODY[:1000])  # one match per target: the next passes
    assert upstream.requests == ["/n/1000"]


def test_cut_delivers_the_drawn_number_of_reply_bytes_then_resets(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream, cut_bytes=(5000, 5000), targets=((r"GET /n/", "cut"),))
    received, error = _raw_get(proxy.port, f"/n/{len(BODY)}")
    # A reset makes the kernel drop bytes not read yet, so the client may see fewer than the 5000 sent.
    assert len(received) <= 5000 and isinstance(error, ConnectionResetError)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.") and len(body) < len(BODY) and BODY.startswith(body)
    assert upstream.requests == [f"/n/{len(BODY)}"]  # the server acted on the request
    assert proxy.stats["cut_fired"] == 1


def test_stall_withholds_the_reply_until_the_client_gives_up(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream, targets=((r"GET /n/", "stall"),))
    received, error = _raw_get(proxy.port, "/n/10", timeout=0.5)
    assert received == b"" and isinstance(error, TimeoutError)
    assert upstream.requests == ["/n/10"]


def test_delay_holds_the_request_then_delivers_it_whole(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream, delay_s=(0.3, 0.3), targets=((r"GET /n/", "delay"),))
    start = time.monotonic()
    received, error = _raw_get(proxy.port, f"/n/{len(BODY)}")
    assert time.monotonic() - start >= 0.3  # a lower bound set by the proxy's own sleep
    assert received.endswith(BODY) and error is None


def test_outage_cuts_live_connections_refuses_new_ones_and_heals(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream)
    live = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    live.request("GET", "/n/10")
    assert live.getresponse().read() == BODY[:10]
    proxy.start_outage()
    assert proxy.in_outage
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        live.request("GET", "/n/10")
        live.getresponse().read()
    for _ in range(3):
        received, error = _raw_get(proxy.port, "/n/10")
        assert received == b"" and isinstance(error, ConnectionResetError)
    proxy.heal()
    assert _raw_get(proxy.port, "/n/10")[0].endswith(BODY[:10])
    assert proxy.stats["outage_cut"] == 1 and proxy.stats["outage_refused"] >= 3


def test_outage_begins_at_the_planned_exchange_and_ends_after_its_length(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream, outage_after=3, outage_s=0.5)
    assert _raw_get(proxy.port, "/n/10")[0].endswith(BODY[:10])
    assert _raw_get(proxy.port, "/n/10")[0].endswith(BODY[:10])
    assert isinstance(_raw_get(proxy.port, "/n/10")[1], ConnectionResetError)  # the third exchange
    assert proxy.in_outage
    time.sleep(0.6)
    assert not proxy.in_outage and _raw_get(proxy.port, "/n/10")[0].endswith(BODY[:10])
    assert upstream.requests == ["/n/10"] * 3


def test_outage_begins_at_the_first_request_matching_outage_on(fault_proxy, upstream):
    proxy = _proxy(fault_proxy, upstream, outage_on=r"GET /n/7")
    assert _raw_get(proxy.port, "/n/10")[0].endswith(BODY[:10])
    assert isinstance(_raw_get(proxy.port, "/n/7")[1], ConnectionResetError)
    assert proxy.in_outage and isinstance(_raw_get(proxy.port, "/n/10")[1], ConnectionResetError)
    proxy.heal()
    assert _raw_get(proxy.port, "/n/7")[0].endswith(BODY[:7])  # one outage per plan
    assert upstream.requests == ["/n/10", "/n/7"]
