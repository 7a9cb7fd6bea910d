"""Upstream side: one keep-alive connection pool per endpoint, and the forwarder.

`Upstreams.forward` is the innermost `EndpointHandler` of every service's stack (the router, in
Envoy's words): it takes a connection from the endpoint's pool, writes the request head from the
parsed model (never the client's raw bytes), streams the body with backpressure, and returns the
response as soon as its head is parsed. The response body streams on; when it ends, the
connection goes back to the pool if nothing about the exchange makes it unsafe to reuse
(docs/hardening.md rules 6 and 9).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import cast

from mesh.http import IDEMPOTENT_METHODS_BYTES
from sidecar.config import Endpoint
from sidecar.exchange import BodyNotReplayable, Request, Response, ResponseBody
from sidecar.flags import Flag, ProxyError
from sidecar.policy.stack import ServiceRegistry
from sidecar.protocol import serialize
from sidecar.protocol.events import Data, EndOfMessage, ResponseEvent, ResponseHead
from sidecar.protocol.response import ResponseParser
from sidecar.transport.body import EMPTY_BODY, BodyReset, BodyStream, BytesBody
from sidecar.transport.flow import WriteFlow


class UpstreamError(ProxyError):
    """Connecting to, or exchanging with, an upstream endpoint failed."""


class UpstreamConnection(WriteFlow, asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint; at most one exchange at a time."""

    __slots__ = (
        "_head",
        "_idle_parser",
        "_parser",
        "body",
        "busy",
        "closed",
        "endpoint",
        "got_bytes",
        "idle_since",
        "idle_timeout",
        "last_activity",
        "pool",
        "request_sent",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.endpoint = pool.endpoint
        self.transport: asyncio.Transport | None = None
        self._parser: ResponseParser | None = None  # set while an exchange is in progress
        self._idle_parser: ResponseParser | None = None  # kept for the next exchange
        # The head and its body travel together: by the time the awaiting coroutine resumes,
        # a short response may be complete and this connection already serving someone else.
        self._head: asyncio.Future[tuple[ResponseHead, ResponseBody | None]] | None = None
        self.body: BodyStream | None = None
        self.busy = False
        self.closed = False
        self.request_sent = False
        self.got_bytes = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        # How long it may wait in the pool: the idle_timeout of the service it served last
        # (xDS common_http_protocol_options.idle_timeout); 0 keeps it until the peer closes it.
        self.idle_timeout = 60.0
        self.last_activity = 0.0
        # Set on a 101: bytes from upstream go here instead of the parser.
        self.tunnel: Callable[[bytes], None] | None = None
        # In a tunnel: pause/resume the client's reading while our write buffer is full.
        self.tunnel_flow: tuple[Callable[[], None], Callable[[], None]] | None = None

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.pool.clock()
        if self.tunnel is not None:
            self.tunnel(data)
            return
        parser = self._parser
        if parser is None:
            # Bytes while idle: the peer is confused; never reuse this connection.
            self.abort()
            return
        self.got_bytes = True
        events = parser.feed(data)
        if len(events) == 3 and self._whole_response(events):
            return
        for event in events:
            self._on_event(event)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel(b"")
            return True  # a half-close: the client may still send, the tunnel closes both
        parser = self._parser
        if parser is not None:
            head = self._head
            if head is not None and not head.done():
                # Closed before the response head was complete: a reset (UC, retryable as
                # `reset`; a stale pooled connection with no byte back may be retried), not
                # bad framing (UPE). Envoy: "upstream reset before headers".
                when = "mid-head" if self.got_bytes else "before responding"
                reason = f"{self.endpoint} closed the connection {when}"
                head.set_exception(UpstreamError(Flag.UPSTREAM_RESET, reason))
                return None
            for event in parser.feed_eof():
                self._on_event(event)
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        reason = "upstream connection closed" if exc is None else f"upstream connection lost: {exc}"
        if self._head is not None and not self._head.done():
            self._head.set_exception(UpstreamError(Flag.UPSTREAM_RESET, reason))
        if self.body is not None:
            self.body.fail(BodyReset(reason))
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamError(Flag.UPSTREAM_RESET, reason))
        if self.tunnel is not None:
            self.tunnel(b"")

    # --- exchange ------------------------------------------------------------------------

    def begin(self, method: bytes) -> asyncio.Future[tuple[ResponseHead, ResponseBody | None]]:
        self.busy = True
        self.request_sent = False
        self.got_bytes = False
        self.body = None
        parser = self._idle_parser
        if parser is None:
            parser = self._idle_parser = ResponseParser(method)
        else:
            parser.reset(method)
        self._parser = parser
        self._head = asyncio.get_running_loop().create_future()
        self.last_activity = self.pool.clock()
        return self._head

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed:
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def set_receiver(
        self,
        receive: Callable[[bytes], None],
        pause_peer: Callable[[], None],
        resume_peer: Callable[[], None],
    ) -> None:
        """Turn this connection into a tunnel (after a 101): raw bytes go to `receive`."""
        self.tunnel = receive
        self.tunnel_flow = (pause_peer, resume_peer)
        self.pool.forget(self)
        parser = self._parser
        if parser is not None:
            rest = parser.take_upgrade_rest()
            if rest:
                receive(rest)
        if self.closed:
            receive(b"")  # the upstream closed right after its 101

    def _whole_response(self, events: list[ResponseEvent]) -> bool:
        """The common case, a final response whose head and body came in one read: hand them
        over as one in-memory body (no BodyStream, no flow control to arrange)."""
        head, data, end = events
        future = self._head
        if (
            type(head) is not ResponseHead
            or type(data) is not Data
            or type(end) is not EndOfMessage
            or head.status < 200
            or future is None
            or future.done()
        ):
            return False
        future.set_result((head, BytesBody(data.data)))
        self._exchange_done()
        return True

    def _on_event(self, event: ResponseEvent) -> None:
        if isinstance(event, Data):
            if self.body is not None:
                self.body.feed(event.data)
        elif isinstance(event, ResponseHead):
            if 100 <= event.status < 200 and event.status != 101:
                return  # interim (100 Continue): the sidecar answers the client itself
            self.body = None
            if event.has_body:
                self.body = BodyStream(
                    event.content_length,
                    self.pause_reading,
                    self.resume_reading,
                    on_discard=self.abort,
                )
            if self._head is not None and not self._head.done():
                self._head.set_result((event, self.body))
        elif isinstance(event, EndOfMessage):
            if self._head is not None and not self._head.done():
                return  # end of an interim response
            if self.body is not None:
                self.body.finish()
            self._exchange_done()
        else:  # Reject: the upstream's framing is wrong (rule 9)
            error = UpstreamError(
                Flag.UPSTREAM_PROTOCOL_ERROR,
                f"invalid response from {self.endpoint}: {event.reason}",
            )
            if self._head is not None and not self._head.done():
                self._head.set_exception(error)
            if self.body is not None:
                self.body.fail(BodyReset(event.reason))
            self.abort()

    def _exchange_done(self) -> None:
        parser = self._parser
        if self._head is not None and self._head.done() and not self._head.cancelled():
            head, _ = self._head.result()
            if head.upgrade is not None:
                return  # the connection becomes a tunnel; never pooled
        self.busy = False
        self._parser = None
        if parser is not None and parser.reusable and self.request_sent and not self.closed:
            self.pool.release(self)
        else:
            self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()


# Opens a connection for a protocol: `loop.create_connection`'s first three arguments. Tests pass
# one that hands the protocol a transport without a socket.
Connect = Callable[
    [Callable[[], UpstreamConnection], str, int],
    Awaitable[tuple[asyncio.BaseTransport, UpstreamConnection]],
]


async def open_connection(
    factory: Callable[[], UpstreamConnection], host: str, port: int
) -> tuple[asyncio.BaseTransport, UpstreamConnection]:
    """A TCP connection on the running loop (the default `Connect`)."""
    return await asyncio.get_running_loop().create_connection(factory, host, port)


class EndpointPool:
    """Idle keep-alive connections to one endpoint (most recently used first)."""

    __slots__ = ("clock", "connect", "connecting", "endpoint", "idle", "in_use")

    def __init__(
        self, endpoint: Endpoint, clock: Callable[[], float], connect: Connect = open_connection
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.connect = connect
        self.idle: list[UpstreamConnection] = []
        self.in_use: set[UpstreamConnection] = set()
        self.connecting = 0

    def take_idle(self) -> UpstreamConnection | None:
        """The most recently used open idle connection, if any (no await on the hot path)."""
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed:
                self.in_use.add(conn)
                return conn
        return None

    async def acquire(self, connect_timeout: float) -> tuple[UpstreamConnection, bool]:
        """A connection ready for one exchange, and whether it was reused."""
        conn = self.take_idle()
        if conn is not None:
            return conn, True
        self.connecting += 1
        try:
            async with asyncio.timeout(connect_timeout):
                _, protocol = await self.connect(
                    lambda: UpstreamConnection(self), self.endpoint.host, self.endpoint.port
                )
        except TimeoutError:
            raise UpstreamError(
                Flag.UPSTREAM_CONNECT_FAILURE,
                f"connect to {self.endpoint} timed out after {connect_timeout:g}s",
            ) from None
        except OSError as exc:
            raise UpstreamError(
                Flag.UPSTREAM_CONNECT_FAILURE, f"connect to {self.endpoint} failed: {exc.strerror}"
            ) from None
        finally:
            self.connecting -= 1
        self.in_use.add(protocol)
        return protocol, False

    def release(self, conn: UpstreamConnection) -> None:
        self.in_use.discard(conn)
        conn.idle_since = self.clock()
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        self.in_use.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float, stream_idle_timeout: float) -> None:
        """Close idle connections past their own idle timeout and stalled exchanges."""
        for conn in [c for c in self.idle if 0 < c.idle_timeout < now - c.idle_since]:
            conn.abort()
        for conn in [c for c in self.in_use if now - c.last_activity > stream_idle_timeout]:
            if conn.busy:
                conn.abort()

    def close_idle(self) -> None:
        for conn in list(self.idle):
            conn.abort()


class Upstreams:
    """Every endpoint's pool; `forward` is the innermost EndpointHandler."""

    def __init__(
        self,
        *,
        default_connect_timeout: float = 1.0,
        idle_timeout: float = 60.0,  # pooled connections of requests without a service
        stream_idle_timeout: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        services: ServiceRegistry | None = None,
        connect: Connect = open_connection,
    ) -> None:
        self.services = services  # for max_pending while connecting
        self.connect = connect
        self.pools: dict[Endpoint, EndpointPool] = {}
        self.default_connect_timeout = default_connect_timeout
        self.idle_timeout = idle_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.clock = clock

    def pool(self, endpoint: Endpoint) -> EndpointPool:
        pool = self.pools.get(endpoint)
        if pool is None:
            pool = self.pools[endpoint] = EndpointPool(endpoint, self.clock, self.connect)
        return pool

    def sweep(self) -> None:
        now = self.clock()
        for pool in list(self.pools.values()):
            pool.sweep(now, self.stream_idle_timeout)

    def close_idle(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()

    async def forward(self, req: Request, endpoint: Endpoint) -> Response:
        service = req.service
        connect_timeout = (
            service.connect_timeout if service is not None else self.default_connect_timeout
        )
        pool = self.pool(endpoint)
        idle = pool.take_idle()
        if idle is not None:
            conn, reused = idle, True
        elif service is None or self.services is None:
            conn, reused = await pool.acquire(connect_timeout)
        else:
            # Waiting for a new connection counts against the service's max_pending.
            state = self.services.get(service.name)
            if state is None:
                conn, reused = await pool.acquire(connect_timeout)
            else:
                with state.load.pending_slot():
                    conn, reused = await pool.acquire(connect_timeout)
        idle_timeout = service.idle_timeout if service is not None else self.idle_timeout
        conn.idle_timeout = idle_timeout
        try:
            return await self._exchange(req, conn)
        except UpstreamError as error:
            # A pooled connection the peer closed just before we wrote: nothing was processed,
            # so an idempotent request may go again on a fresh connection (RFC 9112 §9.3.1).
            if not (
                reused
                and error.flag is Flag.UPSTREAM_RESET
                and not conn.got_bytes
                and req.method in IDEMPOTENT_METHODS_BYTES
                and req.body.replayable
            ):
                raise
        conn, _ = await pool.acquire(connect_timeout)
        conn.idle_timeout = idle_timeout
        return await self._exchange(req, conn)

    async def _exchange(self, req: Request, conn: UpstreamConnection) -> Response:
        head_future = conn.begin(req.method)
        body = req.body
        length = body.length
        chunked = length is None
        if length == 0 and req.method not in _BODY_METHODS:
            length = None  # a GET without a body carries no framing header at all
        headers = req.headers
        if req.upgrade is not None:
            # The parser removed the hop-by-hop pair; the upstream must see the offer to
            # answer 101 (docs/hardening.md rule 7: a tunnel only after a matching 101).
            headers = [*headers, (b"connection", b"upgrade"), (b"upgrade", req.upgrade)]
        conn.write(
            serialize.request_head(
                req.method,
                req.path,
                req.authority,
                headers,
                content_length=length,
                chunked=chunked,
                parsed=True,  # every part came from our parser, plus our hex request id
            )
        )
        pump: asyncio.Task[None] | None = None
        if not length and not chunked:
            conn.request_sent = True
        else:
            pump = asyncio.get_running_loop().create_task(_send_body(conn, req, chunked))
        try:
            head, body_stream = await head_future
        except BaseException:
            if pump is not None:
                pump.cancel()
            conn.abort()
            if pump is not None and pump.done() and not pump.cancelled():
                failure = pump.exception()
                if isinstance(failure, BodyReset):
                    # We cut the upstream because the client's body failed: not the
                    # upstream's fault, so no UC for the breaker, and no retry.
                    raise failure from None
            raise
        if pump is not None and not pump.done():
            # Answered before the whole request was sent: keep sending; if the response ends
            # first the connection is not reused (request_sent stays False).
            pump.add_done_callback(_log_pump_result)
        elif pump is not None:
            _log_pump_result(pump)
        response = Response(
            head.status,
            head.reason,
            head.headers,
            body_stream if body_stream is not None else EMPTY_BODY,
            conn.endpoint,
            content_length=head.content_length,
            has_body=head.has_body,
            tunnel=conn if head.upgrade is not None else None,
        )
        return response


# Methods whose empty body is announced with `content-length: 0`.
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


def _log_pump_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not warn; the exchange saw the failure


async def _send_body(conn: UpstreamConnection, req: Request, chunked: bool) -> None:
    try:
        async for data in req.body.chunks():
            if not data:
                continue
            conn.write(serialize.chunk(data) if chunked else data)
            if conn.write_paused:
                await conn.drain()
        if chunked:
            conn.write(serialize.LAST_CHUNK)
        conn.request_sent = True
    except BodyReset:
        conn.abort()  # the client's body failed mid-way: the upstream must not see a short body
        raise  # the exchange reports the client's failure (not an upstream reset, UC)
    except BodyNotReplayable:
        conn.abort()
