"""Opaque TCP pass-through: a client connection and its destination, bytes untouched both ways.

Everything that is not HTTP/1.x (TLS, the HTTP/2 preface, databases, server-first protocols)
is relayed by a `TcpProxy`. Its rules:

- Bytes are never parsed or changed. The bytes read while detecting the protocol are written
  upstream first (`replay`), then the stream follows: the replay is written in the upstream's
  own connection_made, so bytes and an EOF that arrive as it connects come after it, in order.
  Bytes read before the upstream is there join the replay and pause reading (uvloop starts
  reading after connection_made even when the protocol paused it there).
- Half-close is honoured: an EOF from one side is passed on (write_eof) and the other direction
  stays open until it ends too; only then are both connections closed (after their buffers
  drain). A client that half-closed during detection (`client_ended`) gets its EOF passed on
  right after the replay.
- Backpressure both ways: when one side's write buffer passes its high-water mark
  (pause_writing), the other side stops being read until it drains (resume_writing). Memory per
  connection stays bounded by the transports' buffer limits.
- A reset or error on one side aborts the other (the app sees a reset, as it would have seen
  it without the sidecar). A failed or timed-out connect (bounded by `connect_timeout`) aborts
  the client with flag UF, as the HTTP path flags a connect failure.
- Idle connections end: when no byte moved either way for `idle_timeout` (Envoy's tcp_proxy
  default, 1 h), both sides are closed, flag SI. One timer per connection, re-armed only when it
  fires (a byte does not touch it).
- One `TcpRecord` per connection: the observer hears when it opens and when it closes (bytes
  each way, duration, flags); the access log (`sidecar/telemetry/access_log.py`) writes it.

The client transport is handed over with `set_protocol` (asyncio and uvloop transports support
it), so the protocol that read the first bytes does not stay in the path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from sidecar.flags import Flag


@dataclass(frozen=True, slots=True)
class TcpSettings:
    connect_timeout: float = 5.0  # Envoy's default for a cluster that names none
    idle_timeout: float = 3600.0  # no byte either way for this long: closed (0: never)


@dataclass(slots=True)
class TcpRecord:
    """What happened to one passed-through connection; Envoy's names where it has them."""

    direction: str  # "outbound" | "inbound"
    downstream: str  # the client, host:port
    upstream: str  # where the bytes went (the original destination), host:port
    destination: str = "passthrough"  # the service, when the address is one
    protocol: str = "tcp"  # what detection saw: tcp | tls | h2
    server_name: str = ""  # TLS SNI, when the ClientHello named one
    # UF: connect failed; DC: the client left before the upstream answered; SI: idle timeout;
    # NR: refused (registry_only, or a loop to the sidecar itself); UH: a service without endpoints
    flags: str = ""
    bytes_received: int = 0  # from the client (Envoy: bytes_received), replayed bytes included
    bytes_sent: int = 0  # to the client (Envoy: bytes_sent)
    start: float = 0.0  # loop time
    duration: float = 0.0  # seconds, set when the connection is over
    started_at: float = field(default_factory=time.time)  # wall clock, for the log


# loop.create_connection's shape: how the upstream connection is made.
Connect = Callable[[Callable[[], asyncio.Protocol], str, int], Awaitable[Any]]


class TcpObserver(Protocol):
    """Metrics and logs: told once when a connection opens and once when it is over."""

    def tcp_opened(self, record: TcpRecord) -> None: ...

    def tcp_closed(self, record: TcpRecord) -> None: ...


class _Side(asyncio.Protocol):
    """One of the two connections; what it reads is written to the other."""

    __slots__ = ("closed", "ended", "is_client", "peer", "proxy", "transport")

    def __init__(self, proxy: TcpProxy, transport: asyncio.Transport | None) -> None:
        self.proxy = proxy
        self.transport = transport
        self.is_client = transport is not None
        self.peer: _Side | None = None
        self.ended = False  # this side sent EOF
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if not self.is_client:
            self.proxy.connected()

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        proxy.last_activity = proxy.loop.time()
        record = proxy.record
        if self.is_client:
            record.bytes_received += len(data)
        else:
            record.bytes_sent += len(data)
        peer = self.peer
        if peer is None or peer.transport is None:
            # Not connected yet: kept for the replay, and nothing more is read meanwhile (uvloop
            # starts reading after connection_made even when it paused reading).
            proxy.replay += data
            if self.transport is not None:
                self.transport.pause_reading()
        elif not peer.closed:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.ended = True
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.closed:
            _pass_eof(peer.transport)
        self.proxy.ended()
        return True  # keep writing to this side until the other direction ends

    def pause_writing(self) -> None:
        # Our buffer towards this side is full: stop reading what fills it.
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.lost(self, exc)


def _pass_eof(transport: asyncio.Transport) -> None:
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


class TcpProxy:
    """One passed-through connection: `start()` connects upstream and relays until both end."""

    __slots__ = (
        "client",
        "connect",
        "connecting",
        "destination",
        "done",
        "idle_timer",
        "last_activity",
        "loop",
        "observer",
        "record",
        "replay",
        "server",
        "settings",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        destination: tuple[str, int],
        record: TcpRecord,
        *,
        replay: bytes = b"",
        client_ended: bool = False,
        settings: TcpSettings | None = None,
        observer: TcpObserver | None = None,
        connect: Connect | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.connect = connect or self.loop.create_connection
        self.destination = destination
        self.record = record
        self.replay = replay
        self.settings = settings or TcpSettings()
        self.observer = observer
        self.client = _Side(self, client)
        self.server = _Side(self, None)
        self.client.peer, self.server.peer = self.server, self.client
        self.client.ended = client_ended
        self.connecting: asyncio.Task[None] | None = None
        self.done: asyncio.Future[None] = self.loop.create_future()  # set when both are closed
        self.last_activity = 0.0
        self.idle_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        client = self.client.transport
        assert client is not None
        client.set_protocol(self.client)
        client.pause_reading()  # until the upstream connection is there
        self.record.start = self.last_activity = self.loop.time()
        self.record.bytes_received += len(self.replay)
        if self.observer is not None:
            self.observer.tcp_opened(self.record)
        if self.settings.idle_timeout > 0:
            self.idle_timer = self.loop.call_later(self.settings.idle_timeout, self._idle)
        self.connecting = self.loop.create_task(self._connect())

    def _idle(self) -> None:
        self.idle_timer = None
        if self.done.done():
            return
        deadline = self.last_activity + self.settings.idle_timeout
        if self.loop.time() < deadline:  # bytes moved since: wait for the rest of the window
            self.idle_timer = self.loop.call_at(deadline, self._idle)
            return
        self.record.flags = self.record.flags or Flag.STREAM_IDLE_TIMEOUT.value
        self.close()

    def close(self) -> None:
        """End both sides now: what they hold is still sent (the idle timeout)."""
        self._end(reset=False)

    def abort(self) -> None:
        """Reset both sides (a drain that ran out of time)."""
        self._end(reset=True)

    def _end(self, *, reset: bool) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
            if self.server.transport is None:
                self.server.closed = True
        for side in (self.client, self.server):
            if side.transport is not None and not side.closed:
                if reset:
                    side.transport.abort()
                else:
                    side.transport.close()

    async def _connect(self) -> None:
        host, port = self.destination
        timeout = self.settings.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                await self.connect(lambda: self.server, host, port)
        except TimeoutError:
            self._fail(Flag.UPSTREAM_CONNECT_FAILURE)
            return
        except OSError:
            self._fail(Flag.UPSTREAM_CONNECT_FAILURE)
            return
        finally:
            self.connecting = None

    def connected(self) -> None:
        """The upstream's connection_made: the replay goes first, then the stream (from here on
        the client's bytes and EOF go straight to the upstream, in order)."""
        client, server = self.client.transport, self.server.transport
        assert client is not None and server is not None
        if self.client.closed:  # the client left while we connected
            server.abort()
            return
        replay, self.replay = self.replay, b""
        if replay:
            server.write(replay)
        if self.client.ended:  # before the start (detection) or while connecting
            _pass_eof(server)
        else:
            client.resume_reading()

    def _fail(self, flag: Flag) -> None:
        self.record.flags = flag.value
        self.server.closed = True
        client = self.client.transport
        if client is not None and not self.client.closed:
            client.abort()  # connection_lost -> lost() -> finished
        else:
            self._finish()

    def ended(self) -> None:
        """One side sent EOF; once both have, close both (their buffers drain first)."""
        if self.client.ended and self.server.ended:
            for side in (self.client, self.server):
                if side.transport is not None and not side.closed:
                    side.transport.close()

    def lost(self, side: _Side, exc: Exception | None) -> None:
        other = self.server if side is self.client else self.client
        if side is self.client and self.connecting is not None:
            self.record.flags = self.record.flags or Flag.DOWNSTREAM_DISCONNECT.value
            self.connecting.cancel()
            self.connecting = None
            if other.transport is None:  # not connected: nothing to close
                other.closed = True
        if not other.closed and other.transport is not None:
            if exc is None:
                other.transport.close()
            else:
                other.transport.abort()
        if other.closed or other.transport is None:
            self._finish()

    def _finish(self) -> None:
        if self.done.done():
            return
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        self.record.duration = self.loop.time() - self.record.start
        if self.observer is not None:
            self.observer.tcp_closed(self.record)
        self.done.set_result(None)
