"""A loopback TCP proxy that injects seeded network faults, for the object-storage fault suite.

:class:`FaultProxy` listens on 127.0.0.1 and forwards every connection to an upstream (the moto S3 server).
It knows nothing of HTTP; it sees *exchanges*: an exchange begins when the client sends bytes after the server
has answered (or on a new connection), so that a kept-alive connection carrying many requests gets a fault
decision per request, not once for its whole life. Each exchange draws its fate from a generator seeded with
``(seed, connection number, exchange number)``, so the same seed gives the same fates to the same connections
whatever the thread timing:

* ``pass``: forwarded untouched;
* ``delay``: held ``delay_s`` seconds before the request is forwarded and once more partway through the reply;
* ``reset``: the connection is reset (RST, ``SO_LINGER`` 0) before the request reaches the server; on the first
  exchange of a connection this is a reset at connect;
* ``cut``: the request is forwarded, then the connection is reset after a drawn number of reply bytes (the
  server has acted on the request, the client never sees all of its answer);
* ``stall``: the request is forwarded and the reply is never delivered (only the client's read timeout ends it).

An outage (:meth:`FaultProxy.start_outage`, ``outage_after`` exchanges into the run, or at the first request
that matches ``outage_on``) resets every live
connection at once and every new one at connect until it heals (after ``outage_s`` seconds, or at
:meth:`FaultProxy.heal`). Counters of what was done are in :attr:`FaultProxy.stats`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
import re
import socket
import struct
import threading
import time

ACTIONS = ("pass", "delay", "reset", "cut", "stall")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FaultPlan:
    """What fraction of exchanges gets which fault (the rest pass)."""

    delay: float = 0.0
    """Fraction of exchanges delayed (before the request and once partway through the reply)."""
    reset: float = 0.0
    """Fraction of exchanges reset before the request reaches the server (at connect on a new connection)."""
    cut: float = 0.0
    """Fraction of exchanges whose reply is cut by a reset after ``cut_bytes`` bytes."""
    stall: float = 0.0
    """Fraction of exchanges whose reply never comes."""
    delay_s: tuple[float, float] = (0.05, 0.3)
    """Range of one delay, in seconds."""
    cut_bytes: tuple[int, int] = (0, 64 << 10)
    """Range of the number of reply bytes delivered before a cut (a reply shorter than the draw is not cut)."""
    targets: tuple[tuple[str, str], ...] = ()
    """(regular expression, action) pairs: the first exchange whose first request bytes match the expression
    (e.g. ``r"PUT /bucket/out/manifest.json"``) gets the action instead of a drawn one; one match per pair."""
    outage_after: int | None = None
    """Begin an outage when this many exchanges have been seen (``None``: only by :meth:`FaultProxy.start_outage`)."""
    outage_on: str | None = None
    """Begin an outage at the first exchange whose first request bytes match this regular expression (e.g.
    ``r"PUT /bucket/out/shards/shard-000002.tar"``): a cut at a chosen point of a run."""
    outage_s: float | None = None
    """Length of an outage in seconds (``None``: until :meth:`FaultProxy.heal`)."""

    def __post_init__(self) -> None:
        total = self.delay + self.reset + self.cut + self.stall
        if min(self.delay, self.reset, self.cut, self.stall) < 0 or total > 1:
            raise ValueError(f"fault fractions must be >= 0 and sum to <= 1, got {self}")
        for _, action in self.targets:
            if action not in ACTIONS:
                raise ValueError(f"unknown action {action!r}; one of {ACTIONS}")

    @property
    def faulty(self) -> float:
        """Fraction of exchanges that get any fault."""
        return self.delay + self.reset + self.cut + self.stall

    def draw(self, seed: int, connection: int, exchange: int) -> tuple[str, float, int]:
        """The fate of one exchange: (action, delay in seconds, reply bytes before a cut)."""
        rng = random.Random(f"{seed}:{connection}:{exchange}")
        roll = rng.random()
        delay_s = rng.uniform(*self.delay_s)
        cut_bytes = rng.randint(*self.cut_bytes)
        for action, fraction in (("delay", self.delay), ("reset", self.reset), ("cut", self.cut),
                                 ("stall", self.stall)):
            if roll < fraction:
                return action, delay_s, cut_bytes
            roll -= fraction
        return "pass", delay_s, cut_bytes


_CHUNK = 64 << 10


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection with a TCP RST instead of a FIN (the peer sees ECONNRESET)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class _Connection:
    """One proxied connection: two pumps (client to server, server to client) and the current exchange."""

    def __init__(self, proxy: "FaultProxy", number: int, client: tuple, upstream: tuple) -> None:
        self.proxy, self.number = proxy, number
        (self.client_reader, self.client), (self.upstream_reader, self.upstream) = client, upstream
        self.closed = False
        self.exchange = -1
        self.replied = True  # the server has sent bytes since the client last did: next client bytes start an exchange
        self.action, self.delay_s, self.cut_bytes = "pass", 0.0, 0
        self.reply_bytes = 0  # bytes of the current exchange's reply forwarded so far
        self.reply_delayed = False

    async def run(self) -> None:
        await asyncio.gather(self._client_to_server(), self._server_to_client())
        self.kill("close")

    def kill(self, how: str = "reset") -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if how == "reset":
                _reset(writer)
            else:
                writer.close()
        self.proxy._live.discard(self)

    async def _client_to_server(self) -> None:
        try:
            while data := await self.client_reader.read(_CHUNK):
                begins, self.replied = self.replied, False
                if begins and not self._begin_exchange(data):
                    return
                if begins and self.action == "delay":
                    await asyncio.sleep(self.delay_s)
                if self.closed:
                    return
                self.upstream.write(data)
                await self.upstream.drain()
            if not self.closed and self.upstream.can_write_eof():
                self.upstream.write_eof()
        except (OSError, RuntimeError):
            self.kill()

    def _begin_exchange(self, first_bytes: bytes) -> bool:
        """Draw the next exchange's fate; False when the connection dies instead (a reset or an outage)."""
        self.exchange += 1
        self.action, self.delay_s, self.cut_bytes = self.proxy.plan.draw(self.proxy.seed, self.number, self.exchange)
        targeted = self.proxy._targeted(first_bytes)
        if targeted is not None:
            self.action = targeted
        self.reply_bytes, self.reply_delayed = 0, False
        if not self.proxy._count_exchange(self.action, first_bytes) or self.action == "reset":
            self.kill()
            return False
        return True

    async def _server_to_client(self) -> None:
        try:
            while data := await self.upstream_reader.read(_CHUNK):
                self.replied = True
                if self.action == "stall":
                    continue  # swallow the reply: the client waits until its read timeout
                if self.action == "cut" and self.reply_bytes + len(data) > self.cut_bytes:
                    self.client.write(data[: self.cut_bytes - self.reply_bytes])
                    await self.client.drain()
                    # A reset makes the peer's kernel drop what it has not read yet: give it a moment to read.
                    await asyncio.sleep(0.05)
                    self.proxy._note("cut_fired")
                    self.kill()
                    return
                if self.action == "delay" and not self.reply_delayed and self.reply_bytes:
                    self.reply_delayed = True
                    await asyncio.sleep(self.delay_s)
                if self.closed:
                    return
                self.reply_bytes += len(data)
                self.client.write(data)
                await self.client.drain()
            if self.action == "stall":
                return  # the server is done, the client must not know: it waits until its read timeout
            if not self.closed and self.client.can_write_eof():
                self.client.write_eof()
        except (OSError, RuntimeError):
            self.kill()


class FaultProxy:
    """Forward ``127.0.0.1:port`` to ``upstream`` with the faults of ``plan`` (see the module docstring).

    Use as a context manager, or call :meth:`start` and :meth:`stop`. :attr:`endpoint_url` is what clients use.
    The proxy runs an asyncio loop in a thread of its own; its public methods may be called from any thread.
    """

    def __init__(self, upstream: tuple[str, int], plan: FaultPlan | None = None, seed: int = 0) -> None:
        self.upstream = upstream
        self.plan = plan or FaultPlan()
        self.seed = seed
        self.stats: collections.Counter[str] = collections.Counter()
        self._stats_lock = threading.Lock()
        self._live: set[_Connection] = set()
        self._outage_until: float | None = None  # inf while an outage lasts until heal()
        self._connections = 0
        self._targets_used: set[int] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "FaultProxy":
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()

        loop = self._loop

        def main() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            # Stopped: end the connections' tasks before the loop goes (no "Task was destroyed" warnings).
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="faultproxy")
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return

        def close() -> None:
            self._server.close()
            for connection in list(self._live):
                connection.kill("close")
            self._loop.stop()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(10)
        self._loop = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ outages

    def start_outage(self, seconds: float | None = None) -> None:
        """Cut every live connection and reset new ones at connect for ``seconds`` (None: until :meth:`heal`)."""
        self._outage_until = float("inf") if seconds is None else time.monotonic() + seconds
        self._note("outages")
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cut_all)

    def heal(self) -> None:
        """End the outage now."""
        self._outage_until = None

    @property
    def in_outage(self) -> bool:
        until = self._outage_until
        return until is not None and time.monotonic() < until

    def _cut_all(self) -> None:
        for connection in list(self._live):
            connection.kill()
            self._note("outage_cut")

    # ------------------------------------------------------------------ internals

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self._connections
        self._connections += 1
        self._note("connections")
        if self.in_outage:
            self._note("outage_refused")
            _reset(writer)
            return
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, asyncio.TimeoutError):
            _reset(writer)
            return
        connection = _Connection(self, number, (reader, writer), upstream)
        self._live.add(connection)
        await connection.run()

    def _count_exchange(self, action: str, first_bytes: bytes) -> bool:
        """Count an exchange and its fate; False when an outage is on (or begins now): the exchange dies."""
        self._note("exchanges")
        planned = self.plan.outage_after is not None and self.stats["exchanges"] == self.plan.outage_after
        if self.plan.outage_on is not None and not self.stats["outages"]:
            planned = planned or re.match(self.plan.outage_on, first_bytes[:512].decode("latin-1")) is not None
        if planned:
            self.start_outage(self.plan.outage_s)
            self._cut_all()
            return False
        if self.in_outage:
            self._note("outage_refused")
            return False
        self._note(action)
        return True

    def _targeted(self, first_bytes: bytes) -> str | None:
        """The action of the first unused target whose expression matches ``first_bytes``, or None."""
        head = first_bytes[:512].decode("latin-1")
        with self._stats_lock:
            for index, (pattern, action) in enumerate(self.plan.targets):
                if index not in self._targets_used and re.match(pattern, head):
                    self._targets_used.add(index)
                    self.stats["targeted"] += 1
                    return action
        return None

    def _note(self, what: str) -> None:
        with self._stats_lock:
            self.stats[what] += 1
