"""Upstream side: one keep-alive connection pool per endpoint, and the forwarder.

`Upstreams.forward` is the innermost `EndpointHandler` of every service's stack (the router, in
Envoy's words): it takes an idle connection from the endpoint's pool and starts the exchange on
it at once: the request head is written from the parsed model (never the client's raw bytes),
with the body in the same write when it is already in hand. The connection replies with the
response as soon as its head is parsed (with a body that arrived whole in the same read, as one
in-memory body); the body streams on; when it ends, the connection goes back to the pool if
nothing about the exchange makes it unsafe to reuse (docs/hardening.md rules 6 and 9).

Only two things start a task: a pending connection (no idle one in the pool: connecting is a
coroutine, counted against `max_pending`), and a request body that is still arriving (pumped
with backpressure). A request waiting for its head can be interrupted (`Request.interrupt`): the
connection is aborted, never reused, and the exchange replies with the interrupting error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import cast

from mesh.http import IDEMPOTENT_METHODS_BYTES
from sidecar.config import Endpoint
from sidecar.exchange import (
    BodyNotReplayable,
    Flow,
    Reply,
    Request,
    RequestBodyFailed,
    Response,
    TunnelData,
)
from sidecar.flags import Flag, ProxyError
from sidecar.policy.concurrency import ConcurrencyError, PendingSlot
from sidecar.policy.stack import ServiceRegistry
from sidecar.protocol import serialize
from sidecar.protocol.events import Data, EndOfMessage, Reject, ResponseEvent, ResponseHead
from sidecar.protocol.response import ResponseParser
from sidecar.transport.body import EMPTY_BODY, BodyReset, BodyStream, BytesBody
from sidecar.transport.connect import UpstreamError, connect_within
from sidecar.transport.flow import WriteFlow
from sidecar.transport.h2upstream import H2Pool
from sidecar.transport.outbox import outbox, release_held

_new = object.__new__  # an instance without its __init__ (the one-read path sets every slot)

log = logging.getLogger("outrigger.upstream")

# A body in hand up to this size is written with its head in one buffer; a larger one with
# writelines (no copy of the body).
_JOIN_LIMIT = 64 * 1024

# Methods whose empty body is announced with `content-length: 0`.
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


class UpstreamConnection(WriteFlow, asyncio.Protocol):
    """One HTTP/1.1 connection to an endpoint; at most one exchange at a time.

    The exchange in progress is `reply` and `request`: set by `exchange`, cleared when the
    response head (or the error that ends the exchange) is handed to `reply`.
    """

    __slots__ = (
        "_idle_parser",
        "_interrupt",
        "_parser",
        "body",
        "busy",
        "closed",
        "endpoint",
        "got_bytes",
        "held",
        "idle_since",
        "idle_timeout",
        "last_activity",
        "outbox",
        "pool",
        "pump",
        "reply",
        "request",
        "request_sent",
        "reused",
        "transport",
        "tunnel",
        "upgraded",
    )

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.endpoint = pool.endpoint
        self.transport: asyncio.Transport | None = None
        self._parser: ResponseParser | None = None  # set while an exchange is in progress
        self._idle_parser: ResponseParser | None = None  # kept for the next exchange
        self.reply: Reply | None = None  # waiting for the response head
        self.request: Request | None = None
        self._interrupt = self.interrupt  # bound once: a request's on_interrupt while it waits
        self.body: BodyStream | None = None
        self.pump: asyncio.Task[None] | None = None  # a request body still being sent
        self.busy = False
        self.closed = False
        self.request_sent = False
        self.got_bytes = False
        self.reused = False  # the exchange runs on a connection taken from the pool
        self.upgraded = False  # answered 101: a tunnel now, never pooled
        self.write_paused = False
        self._waiter = None
        self.drain_callback: Callable[[], None] | None = None
        self.idle_since = 0.0
        # How long it may wait in the pool: the idle_timeout of the service it served last
        # (xDS common_http_protocol_options.idle_timeout); 0 keeps it until the peer closes it.
        self.idle_timeout = pool.upstreams.idle_timeout  # until a service's request sets its own
        self.last_activity = 0.0
        # A request head held to the end of the loop's round (sidecar/transport/outbox.py)
        self.held: bytes | None = None
        self.outbox = outbox(asyncio.get_running_loop())
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
        if len(events) == 3:
            head, body, end = events
            reply = self.reply
            if (
                type(head) is ResponseHead
                and type(body) is Data
                and type(end) is EndOfMessage
                and head.status >= 200
                and reply is not None
            ):
                # The common case, a final response whose head and body came in one read:
                # handed over as one in-memory body (no BodyStream, no flow control to arrange).
                request = self.request
                assert request is not None
                self.reply = self.request = None
                request.on_interrupt = None
                # Response(...) and BytesBody(...) inline: CPython 3.11 does not specialise a
                # call of a class with a Python __init__ (type_call, slot_tp_init and a frame,
                # ~1,200 instructions an object before its stores). Every slot is set here as
                # the two __init__ set them (tests/sidecar/transport/test_upstream.py holds it).
                whole = _new(BytesBody)
                whole._data = body.data
                whole._unread = True
                response = _new(Response)
                response.status = head.status
                response.reason = head.reason
                response.headers = head.headers
                response.body = whole
                response.endpoint = self.endpoint
                response.content_length = head.content_length
                response.has_body = head.has_body
                response.tunnel = None
                response.flags = []
                # Pooled before the reply, so the next request may use it (_exchange_done,
                # inline: not upgraded, a parser in use).
                self.busy = False
                self._parser = None
                if parser.reusable and self.request_sent and not self.closed:
                    self.idle_since = self.last_activity
                    self.pool.idle.append(self)
                else:
                    self.abort()
                reply(response)
                return
        self._on_events(events)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            self.tunnel(b"")
            return True  # a half-close: the client may still send, the tunnel closes both
        parser = self._parser
        if parser is not None:
            if self.reply is not None:
                # Closed before the response head was complete: a reset (UC, retryable as
                # `reset`; a stale pooled connection with no byte back may be retried), not
                # bad framing (UPE). Envoy: "upstream reset before headers".
                when = "mid-head" if self.got_bytes else "before responding"
                reason = f"{self.endpoint} closed the connection {when}"
                self.closed = True  # never pooled again, whatever the reply does
                self._fail(UpstreamError(Flag.UPSTREAM_RESET, reason))
                return None
            self._on_events(parser.feed_eof())
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        reason = "upstream connection closed" if exc is None else f"upstream connection lost: {exc}"
        if self.reply is not None:
            self._fail(UpstreamError(Flag.UPSTREAM_RESET, reason))
        if self.body is not None:
            self.body.fail(BodyReset(reason))
        self._fail_waiter(UpstreamError(Flag.UPSTREAM_RESET, reason))
        if self.tunnel is not None:
            self.tunnel(b"")

    # --- exchange ------------------------------------------------------------------------

    def exchange(self, req: Request, reply: Reply, reused: bool) -> None:
        """Send `req` and reply with the response head (or the error) when it comes."""
        self.busy = True
        self.request_sent = self.got_bytes = False
        self.body = None
        self.reused = reused
        parser = self._idle_parser
        if parser is None:
            parser = self._idle_parser = ResponseParser(req.method)
        else:
            parser.reset(req.method)
        self._parser = parser
        self.reply = reply
        self.request = req
        req.on_interrupt = self._interrupt
        self.last_activity = self.pool.clock()
        # The request head from the parsed model, with the body when it is in hand (one
        # write); a body still arriving is pumped by a task.
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
        head = serialize.request_head(
            req.method,
            req.path,
            req.authority,
            headers,
            content_length=length,
            chunked=chunked,
            parsed=True,  # every part came from our parser, plus our hex request id
        )
        if not length and not chunked:
            # No body: the head is held to the end of the loop's round (`Outbox.hold`, inline)
            if self.held is None:
                self.held = head
                box = self.outbox
                held = box.held
                if not held:
                    box.call_soon(box.flush)
                held.append(self)
            else:
                self.held += head
            self.request_sent = True
            return
        data = body.whole()
        if data is None:
            self.write(head)
            self.pump = asyncio.get_running_loop().create_task(_send_body(self, req, chunked))
            return
        if chunked:
            data = serialize.chunk(data) + serialize.LAST_CHUNK if data else serialize.LAST_CHUNK
        if len(data) <= _JOIN_LIMIT:
            self.write(head + data)
        else:
            self.writelines([head, data])
        self.request_sent = True

    def interrupt(self, error: ProxyError) -> None:
        """The request stops waiting (a deadline, the client gone): abort, reply `error`."""
        reply = self.reply
        self.reply = self.request = None
        self._stop_pump()
        self.abort()
        if reply is not None:
            reply(error)

    def body_failed(self, reason: str) -> None:
        """The client's request body failed while we sent it: the upstream must not see a
        short body, and the exchange ends with the client's failure (not the upstream's)."""
        self.pump = None
        reply = self.reply
        self.reply = None
        request, self.request = self.request, None
        if request is not None:
            request.on_interrupt = None
        self.abort()
        if reply is not None:
            reply(RequestBodyFailed(reason))

    release_held = release_held  # the held request head written now (sidecar/transport/outbox.py)

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.release_held()
            self.transport.write(data)

    def writelines(self, parts: list[bytes]) -> None:
        if self.transport is not None:
            self.release_held()
            self.transport.writelines(parts)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def write_eof(self) -> None:
        if self.transport is not None and not self.closed:
            self.release_held()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            else:
                self.close()

    def close(self) -> None:
        self.release_held()
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def set_receiver(self, receive: TunnelData, pause_peer: Flow, resume_peer: Flow) -> None:
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

    def _take_exchange(self) -> tuple[Reply, Request]:
        reply, request = self.reply, self.request
        assert reply is not None and request is not None
        self.reply = self.request = None
        request.on_interrupt = None
        return reply, request

    def _fail(self, error: UpstreamError) -> None:
        """The exchange ends before its response head."""
        reply, req = self._take_exchange()
        self._stop_pump()
        if (
            self.reused
            and error.flag is Flag.UPSTREAM_RESET
            and not self.got_bytes
            and not req.ended
            and req.method in IDEMPOTENT_METHODS_BYTES
            and req.body.replayable
        ):
            # A pooled connection the peer closed just before we wrote: nothing was processed,
            # so an idempotent request may go again on a fresh connection (RFC 9112 §9.3.1).
            self.pool.upstreams.connect_and_exchange(self.pool, req, reply)
            return
        reply(error)

    def _stop_pump(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None and not pump.done():
            pump.cancel()

    def _on_events(self, events: list[ResponseEvent]) -> None:
        # The head is handed over after the body bytes that came with it were fed (so a
        # response that arrived in one read leaves in one write), and after the end, if it
        # came too: then the connection is back in the pool before anyone sees the response.
        head: ResponseHead | None = None
        interim = False
        for event in events:
            kind = type(event)
            if kind is Data:
                if self.body is not None:
                    self.body.feed(cast(Data, event).data)
            elif kind is ResponseHead:
                event = cast(ResponseHead, event)
                if 100 <= event.status < 200 and event.status != 101:
                    interim = True  # 100 Continue: the sidecar answers the client itself
                    continue
                self.body = None
                if event.upgrade is not None:
                    self.upgraded = True  # a 101: this connection becomes the tunnel
                if event.has_body:
                    self.body = BodyStream(
                        event.content_length,
                        self.pause_reading,
                        self.resume_reading,
                        on_discard=self.abort,
                    )
                head = event
            elif kind is EndOfMessage:
                if interim:
                    interim = False  # the end of an interim response
                    continue
                body = self.body
                self._exchange_done()
                if body is not None:
                    body.finish()
                if head is not None:
                    self._deliver(head)
                return  # nothing follows the end of a response
            else:  # Reject: the upstream's framing is wrong (rule 9)
                if head is not None:
                    self._deliver(head)  # its body fails below, the client sees it cut
                reason = cast(Reject, event).reason
                self.closed = True
                if self.reply is not None:
                    error = f"invalid response from {self.endpoint}: {reason}"
                    self._fail(UpstreamError(Flag.UPSTREAM_PROTOCOL_ERROR, error))
                if self.body is not None:
                    self.body.fail(BodyReset(reason))
                self.abort()
                return
        if head is not None:
            self._deliver(head)

    def _deliver(self, head: ResponseHead) -> None:
        if self.reply is None:
            return  # interrupted meanwhile
        reply, _ = self._take_exchange()
        body = self.body
        reply(
            Response(
                head.status,
                head.reason,
                head.headers,
                body if body is not None else EMPTY_BODY,
                self.endpoint,
                head.content_length,
                head.has_body,
                self if head.upgrade is not None else None,
            )
        )

    def _exchange_done(self) -> None:
        if self.upgraded:
            return  # the connection becomes a tunnel; never pooled
        parser = self._parser
        self.busy = False
        self._parser = None
        if parser is not None and parser.reusable and self.request_sent and not self.closed:
            # EndpointPool.release, inline; its answer just came: no need to read the clock
            self.idle_since = self.last_activity
            self.pool.idle.append(self)
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

    __slots__ = ("clock", "connect", "connecting", "connections", "endpoint", "idle", "upstreams")

    def __init__(self, upstreams: Upstreams, endpoint: Endpoint) -> None:
        self.upstreams = upstreams
        self.endpoint = endpoint
        self.clock = upstreams.clock
        self.connect = upstreams.connect
        self.idle: list[UpstreamConnection] = []
        self.connections: set[UpstreamConnection] = set()  # open ones, idle or not
        self.connecting = 0

    @property
    def in_use(self) -> set[UpstreamConnection]:
        """The open connections not waiting in the pool (an exchange or a tunnel on them)."""
        idle = set(self.idle)
        return {conn for conn in self.connections if conn not in idle}

    async def open(self, connect_timeout: float) -> UpstreamConnection:
        """A new connection, ready for one exchange."""
        self.connecting += 1
        try:
            protocol = await connect_within(
                self.connect, lambda: UpstreamConnection(self), self.endpoint, connect_timeout
            )
        finally:
            self.connecting -= 1
        if not protocol.closed:
            self.connections.add(protocol)
        return protocol

    def release(self, conn: UpstreamConnection) -> None:
        conn.idle_since = self.clock()
        self.idle.append(conn)

    def begin(self, conn: UpstreamConnection, req: Request, reply: Reply) -> None:
        """The exchange on a connection just opened for it (`_Connecting`)."""
        conn.exchange(req, reply, False)

    keep = release  # a connection whose request was interrupted while it opened

    def forget(self, conn: UpstreamConnection) -> None:
        self.connections.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def sweep(self, now: float, stream_idle_timeout: float) -> None:
        """Close idle connections past their own idle timeout and stalled exchanges."""
        for conn in [c for c in self.idle if 0 < c.idle_timeout < now - c.idle_since]:
            conn.abort()
        if stream_idle_timeout <= 0:
            return
        for conn in [c for c in self.connections if now - c.last_activity > stream_idle_timeout]:
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
        self.h2_pools: dict[
            Endpoint, H2Pool
        ] = {}  # HTTP/2 services' (sidecar/transport/h2upstream.py)
        self.default_connect_timeout = default_connect_timeout
        self.idle_timeout = idle_timeout
        self.stream_idle_timeout = stream_idle_timeout
        self.clock = clock

    def pool(self, endpoint: Endpoint) -> EndpointPool:
        pool = self.pools.get(endpoint)
        if pool is None:
            pool = self.pools[endpoint] = EndpointPool(self, endpoint)
        return pool

    def sweep(self) -> None:
        now = self.clock()
        for pool in list(self.pools.values()):
            pool.sweep(now, self.stream_idle_timeout)
        for h2_pool in list(self.h2_pools.values()):
            h2_pool.sweep(now, self.stream_idle_timeout)

    def close_idle(self) -> None:
        for pool in self.pools.values():
            pool.close_idle()
        for h2_pool in self.h2_pools.values():
            h2_pool.close_idle()

    def forward(self, req: Request, endpoint: Endpoint, reply: Reply) -> None:
        pool = self.pools.get(endpoint)
        if pool is None:
            pool = self.pool(endpoint)
        idle = pool.idle
        while idle:  # the most recently used open idle connection
            conn = idle.pop()
            if not conn.closed:
                service = req.service
                if service is not None:
                    conn.idle_timeout = service.idle_timeout
                conn.exchange(req, reply, True)
                return
        self.connect_and_exchange(pool, req, reply)

    def forward_h2(self, req: Request, endpoint: Endpoint, reply: Reply) -> None:
        """The innermost handler of an HTTP/2 service: a stream on a multiplexed connection."""
        pool = self.h2_pools.get(endpoint)
        if pool is None:
            pool = self.h2_pools[endpoint] = H2Pool(
                endpoint, self.clock, self.idle_timeout, self.forward_h2
            )
        conn = pool.usable()
        if conn is not None:
            service = req.service
            if service is not None:
                conn.idle_timeout = service.idle_timeout
            conn.exchange(req, reply)
            return
        self.connect_and_exchange(pool, req, reply)

    def connect_and_exchange(self, pool: EndpointPool | H2Pool, req: Request, reply: Reply) -> None:
        """No idle connection: open one (a task), counted against the service's
        max_pending while it opens, then exchange on it."""
        slot: PendingSlot | None = None
        service = req.service
        if service is not None and self.services is not None:
            state = self.services.get(service.name)
            if state is not None:
                slot = state.load.pending_slot()
                try:
                    slot.__enter__()
                except ConcurrencyError as error:
                    reply(error)
                    return
        connecting = _Connecting(self, pool, req, reply, slot)
        req.on_interrupt = connecting.interrupt
        connecting.task = asyncio.get_running_loop().create_task(connecting.run())


class _Connecting:
    """A request waiting for a new connection to its endpoint."""

    __slots__ = ("_pool", "_reply", "_req", "_slot", "_upstreams", "task")

    def __init__(
        self,
        upstreams: Upstreams,
        pool: EndpointPool | H2Pool,
        req: Request,
        reply: Reply,
        slot: PendingSlot | None,
    ) -> None:
        self._upstreams = upstreams
        self._pool = pool
        self._req = req
        self._reply: Reply | None = reply
        self._slot = slot
        self.task: asyncio.Task[None] | None = None

    def interrupt(self, error: ProxyError) -> None:
        # The connect goes on (cancelling a finished connect would leak its socket); the
        # connection then waits in the pool for the next request.
        reply, self._reply = self._reply, None
        self._free_slot()
        if reply is not None:
            reply(error)

    async def run(self) -> None:
        req, pool = self._req, self._pool
        service = req.service
        timeout = (
            service.connect_timeout
            if service is not None
            else self._upstreams.default_connect_timeout
        )
        try:
            conn = await pool.open(timeout)
        except ProxyError as error:
            self._free_slot()  # before the reply: a retry may connect again at once
            self._answer(error)
            return
        except Exception as exc:  # not an error we know: say so, never hang the request
            log.exception("connecting to %s failed unexpectedly", pool.endpoint)
            self._free_slot()
            internal = UpstreamError(Flag.UPSTREAM_PROTOCOL_ERROR, f"internal error: {exc!r}", 500)
            self._answer(internal)
            return
        self._free_slot()
        if service is not None:
            conn.idle_timeout = service.idle_timeout
        reply, self._reply = self._reply, None
        if reply is None:  # interrupted while connecting: keep the connection for the next
            pool.keep(conn)  # type: ignore[arg-type]  # each pool takes its own connections
            return
        req.on_interrupt = None
        pool.begin(conn, req, reply)  # type: ignore[arg-type]

    def _answer(self, error: ProxyError) -> None:
        reply, self._reply = self._reply, None
        if reply is not None:
            self._req.on_interrupt = None
            reply(error)

    def _free_slot(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.__exit__(None, None, None)


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
    except BodyReset as exc:
        # The client's body failed mid-way: the upstream must not see a short body, and the
        # exchange reports the client's failure (not an upstream reset, UC).
        conn.body_failed(str(exc))
    except BodyNotReplayable:
        conn.abort()
    except ProxyError:
        pass  # the connection went away while we waited to write: the exchange was told
    finally:
        if conn.pump is asyncio.current_task():
            conn.pump = None
