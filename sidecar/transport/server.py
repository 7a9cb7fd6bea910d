"""Downstream side: one `asyncio.Protocol` per client connection (uvicorn's shape).

The protocol feeds bytes to the sans-IO request parser and runs one request cycle (`_Cycle`,
uvicorn's RequestResponseCycle) per request; pipelined requests wait their turn, with reading
paused. A cycle hands its request to the route's handler with itself as the reply (see
`sidecar/exchange.py`), and writes what comes back: no task per request. A request is handed
over once its head and the body bytes that came with it are parsed (so a small body travels in
hand), or at once when its body is still arriving (it then streams to the policy stack). The
response body is written as it comes, by callbacks, with flow control both ways: head and a
body that arrived whole leave in one write. `ServerState` knows every connection: it enforces the
time limits of docs/hardening.md rule 5 with one sweep a second (no timer per request) and
drains them gracefully.

This is also the one place that turns a `ProxyError` into a response: status from the flag, the
flag in `x-outrigger-flags` and in the plain-text body.
"""

from __future__ import annotations

import asyncio
import binascii
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, cast

from mesh.http import REASON_PHRASES
from sidecar.config import Endpoint, ServiceConfig
from sidecar.exchange import (
    DownstreamGone,
    Handler,
    Request,
    RequestBody,
    RequestBodyFailed,
    Response,
    Result,
)
from sidecar.flags import Flag, ProxyError
from sidecar.policy.deadline import Timer, call_at
from sidecar.protocol import serialize
from sidecar.protocol.events import Data, EndOfMessage, Reject, RequestEvent, RequestHead
from sidecar.protocol.limits import H2Limits, Limits
from sidecar.protocol.request import RequestParser
from sidecar.transport.body import EMPTY_BODY, BodyReset, BodyStream
from sidecar.transport.flow import WriteFlow
from sidecar.transport.outbox import outbox, release_held

_new = object.__new__  # an instance without its __init__ (the request path sets every slot)

log = logging.getLogger("outrigger.server")

# Headers that steer the mesh; a client never gets to set them (docs/hardening.md rule 8).
MESH_HEADER_PREFIX = b"x-outrigger-"
FLAGS_HEADER = b"x-outrigger-flags"
REQUEST_ID = b"x-request-id"
_HEX = frozenset(b"0123456789abcdefABCDEF-")

REASONS = {status: phrase.encode() for status, phrase in REASON_PHRASES.items()}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    limits: Limits = field(default_factory=Limits)
    header_timeout: float = 10.0  # from a request's first byte to its last header byte
    idle_timeout: float = 60.0  # keep-alive connection with no request
    body_timeout: float = 60.0  # request body that stops moving
    send_timeout: float = 60.0  # peer that stops reading our response
    # A tunnel (after a 101) with no byte either way for this long is closed, both sides
    # (Envoy's stream_idle_timeout, which also applies to upgraded streams; its default); an
    # HTTP/2 stream with no byte either way ends then too (h2server.py). 0: never.
    stream_idle_timeout: float = 300.0
    retry_buffer: int = 64 * 1024  # request bodies up to this size are kept for retries
    h2: H2Limits = field(default_factory=H2Limits)  # HTTP/2 connections (h2server.py)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the sidecar decided for one request head."""

    handler: Handler
    service: ServiceConfig | None
    name: str  # the service name for logs and metrics ("passthrough", "inbound", ...)


Dispatch = Callable[[RequestHead], Decision]


# Told when a request cycle (or an HTTP/2 stream) ends: (head, decision, status, flags, start on
# the loop's clock, request, grpc_status); decision and request are None when there was no route,
# head is None too when the request was refused before its head was whole (a 400 from the parser,
# a 408 header timeout); grpc_status is an HTTP/2 gRPC call's status (None: not gRPC, or the
# stream ended without one: reset).
Completed = Callable[
    [RequestHead | None, Decision | None, int, str, float, Request | None, int | None], None
]


# Connection phases for the sweep.
IDLE, HEADERS, BODY, WAITING, TUNNEL = range(5)


class Connection(Protocol):
    """What the sweep and the drain ask of a downstream connection (HTTP/1.1 or HTTP/2)."""

    def check_timeouts(self, now: float) -> None: ...

    def close_when_idle(self) -> None: ...

    def abort(self) -> None: ...


class ServerState:
    """Every downstream connection of one listener group; time limits and graceful drain."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.connections: set[Connection] = set()
        self.draining = False
        self.total_connections = 0
        # HTTP/2 connections closed for breaking a rule of docs/hardening.md, by reason
        self.h2_refused: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._empty: asyncio.Event | None = None

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def add(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.total_connections += 1

    def remove(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._empty is not None:
            self._empty.set()

    async def _sweep_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.5)
            now = loop.time()
            for conn in list(self.connections):
                conn.check_timeouts(now)

    async def drain(self, timeout: float) -> bool:
        """Finish in-flight requests, close idle connections; True if all ended in time."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            self._empty = asyncio.Event()
            try:
                async with asyncio.timeout(timeout):
                    await self._empty.wait()
            except TimeoutError:
                log.warning("drain timeout: closing %d connection(s)", len(self.connections))
                for conn in list(self.connections):
                    conn.abort()
                return False
        return True

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()


_REQUEST_ID_BATCH = 256  # request ids per os.urandom call


def _request_id_batch(count: int) -> list[bytes]:
    # hex digits with a space after every 16 bytes, split there: all in C, and cheaper per id
    # than a regex findall of 32-digit runs
    return binascii.hexlify(os.urandom(count * 16), b" ", 16).split(b" ")


# A new request's id: 32 hex digits (128 random bits). Unique, not secret. Drawn from the kernel's
# random source 256 at a time, as the bytes the header carries; next() on the chain is C, so a
# request pays one C call where getrandbits, to_bytes, hex and encode made four objects.
_request_id: Callable[[], bytes] = itertools.chain.from_iterable(
    map(_request_id_batch, itertools.repeat(_REQUEST_ID_BATCH))
).__next__


def _request_id_ok(value: bytes) -> bool:
    return 0 < len(value) <= 128 and all(c in _HEX for c in value)


def local_response(error: ProxyError) -> tuple[int, Flag, bytes]:
    """Status, flag and body for a locally generated error."""
    body = f"{error.flag.value}: {error.detail}\n".encode("ascii", "replace")
    return error.status, error.flag, body


class Downstream(asyncio.Protocol):
    """What an HTTP/1.1 (`DownstreamProtocol`) and an HTTP/2 (`h2server.H2DownstreamProtocol`)
    client connection share: the listener's dispatch and `completed` callback, what the sweep
    reads, and the end of each request cycle (`cycle_done`)."""

    peer = "client"  # in logs

    def __init__(
        self,
        state: ServerState,
        dispatch: Dispatch,
        completed: Completed | None = None,
        request_ids: bool = True,
        destination: Endpoint | None = None,
    ) -> None:
        self.state = state
        self.dispatch = dispatch
        self.completed = completed
        self.request_ids = request_ids
        self.destination = destination  # the connection's original destination, if redirected
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False
        self.write_paused_at = 0.0  # for the send timeout
        self.last_activity = 0.0
        self._init_connection()

    def _init_connection(self) -> None:
        """The protocol's own state, for a connection not yet made."""
        raise NotImplementedError

    def cycle_done(self, cycle: RequestCycle) -> None:
        """`cycle` ended (after the `completed` callback heard of it)."""
        raise NotImplementedError

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _send_timed_out(self, now: float) -> bool:
        """The send timeout (docs/hardening.md rule 5): a client that stopped reading our bytes
        for that long is cut off (True)."""
        timeout = self.state.settings.send_timeout
        if self.write_paused and now - self.write_paused_at > timeout:
            log.info("%s stopped reading for %.0fs: closing", self.peer, timeout)
            self.abort()
            return True
        return False


class DownstreamProtocol(WriteFlow, Downstream):
    """One client connection."""

    def _init_connection(self) -> None:
        self.parser = RequestParser(self.state.settings.limits)
        self.pending: deque[RequestEvent] = deque()  # parsed, waiting for the cycle before
        self.processing = False  # inside _process: a cycle that ends now must not recurse
        self.body: BodyStream | None = None  # the current request's body, while it arrives
        self.cycle: _Cycle | None = None  # the request cycle in flight
        self.request_complete = False
        self.response_started = False
        self.close_after = False
        self.read_paused_by: set[str] = set()
        self._waiter = None
        self.drain_callback: Callable[[], None] | None = None
        self.phase = IDLE
        self.phase_since = 0.0
        self.tunnel_upstream: Callable[[bytes], None] | None = None
        self.tunnel_abort: Callable[[], None] | None = None
        # In a tunnel: stop/start reading the upstream while the client is not taking our bytes.
        self.tunnel_flow: tuple[Callable[[], None], Callable[[], None]] | None = None
        # Why the sidecar failed the request body of the cycle in flight (status, reason).
        self.body_failure: tuple[int, str] | None = None
        # A whole response held to the end of the loop's round (sidecar/transport/outbox.py)
        self.held: bytes | None = None
        self.outbox = outbox(self.loop)

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.phase_since = self.last_activity = self.loop.time()
        self.state.add(self)
        if self.state.draining:
            self.close_after = True

    def data_received(self, data: bytes) -> None:
        now = self.last_activity = self.loop.time()
        if self.tunnel_upstream is not None:
            self.tunnel_upstream(data)
            return
        if self.phase == IDLE:
            self.phase = HEADERS
            self.phase_since = now
        events = self.parser.feed(data)
        if self.cycle is not None:
            if self.request_complete:
                # A response is on its way: what follows waits its turn, unread.
                self.pending.extend(events)
                self._pause("pipeline")
                return
        elif len(events) == 2 and not self.pending:
            head, end = events
            if type(head) is RequestHead and type(end) is EndOfMessage and not head.chunked:
                # The common case, one whole request without a body: no queue to go through,
                # handed over from `_start_cycle` itself.
                self._start_cycle(head, now, True)
                return
        self.pending.extend(events)
        self._process()

    def eof_received(self) -> bool | None:
        if self.tunnel_upstream is not None:
            self.tunnel_upstream(b"")
            return True  # half-close: the upstream side may still answer
        events = self.parser.feed_eof()
        if events:
            self.pending.extend(events)
            self._process()
        if self.cycle is None:
            return None  # nothing in flight: close
        self.close_after = True
        return True  # keep the write side open to finish the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.remove(self)
        if self.body is not None:
            self.body.fail(BodyReset("client closed the connection"))
        cycle = self.cycle
        if cycle is not None:
            # Nobody is listening: stop the exchange, mid-response too, so that the upstream
            # connection closes now instead of being read into the void (flag DC).
            cycle.client_gone()
        self.drain_callback = None
        self._fail_waiter(ConnectionResetError("client closed the connection"))
        if self.tunnel_abort is not None:
            self.tunnel_abort()

    def pause_writing(self) -> None:
        self.write_paused_at = self.loop.time()  # for the send timeout
        super().pause_writing()

    release_held = release_held  # the held response written now (sidecar/transport/outbox.py)

    def _close(self) -> None:
        self.release_held()
        super()._close()

    # --- parsing -------------------------------------------------------------------------

    def _process(self) -> None:
        """Work through the parsed events: bodies to their request, each request handed over
        once it is whole or its body streams, the next one only after the response before it
        (a cycle that ends while we are in here does not recurse: the loop goes on)."""
        if self.processing:
            return
        self.processing = True
        pending = self.pending
        try:
            while not self.closed and self.tunnel_upstream is None:
                cycle = self.cycle
                if cycle is not None:
                    if not cycle.started:
                        if self.request_complete or not pending:
                            cycle.begin()  # may end at once (a local answer)
                            continue
                    elif self.request_complete:
                        break  # its response comes later; what follows waits
                if not pending:
                    break
                event = pending.popleft()
                kind = type(event)
                if kind is Data:
                    if self.body is not None:
                        self.body.feed(cast(Data, event).data)
                        self.last_activity = self.loop.time()
                elif kind is RequestHead:
                    self._start_cycle(cast(RequestHead, event), self.loop.time())
                elif kind is EndOfMessage:
                    self._end_of_request()
                else:
                    self._reject(cast(Reject, event))
                    break
        finally:
            self.processing = False
        if self.closed or self.tunnel_upstream is not None:
            return
        if pending:
            self._pause("pipeline")
        elif self.cycle is None or not self.request_complete:
            # Nothing more queued; a request in flight may still be receiving its body, which
            # must be read (a request after it is held back on arrival).
            self._resume("pipeline")

    def _end_of_request(self) -> None:
        self.request_complete = True
        if self.body is not None:
            self.body.finish()
            self.body = None
        if self.phase == BODY:
            self.phase = WAITING

    def _start_cycle(self, head: RequestHead, now: float, whole: bool = False) -> _Cycle:
        """The cycle of a request whose head was just parsed; `whole`: the request has all
        arrived, and is handed over now (`RequestCycle.begin`, inline: a call less per request)."""
        self.request_complete = False
        self.response_started = False
        self.body_failure = None
        if not head.keep_alive:
            self.close_after = True
        body: RequestBody
        if head.chunked or head.content_length:
            body = self.body = BodyStream(
                head.content_length,
                self._pause_body,
                self._resume_body,
                keep_limit=self.state.settings.retry_buffer,
                on_first_read=self._send_continue if head.expect_continue else None,
            )
            self.phase = BODY  # timed from the last byte (last_activity)
        else:
            body = EMPTY_BODY
            self.phase = WAITING  # not timed here: the policy's timeouts are
        headers = head.headers
        request_id = None
        mesh_headers = False
        for name, value in headers:  # one pass for both questions
            if name == REQUEST_ID:
                request_id = value
            elif name.startswith(MESH_HEADER_PREFIX):
                mesh_headers = True
        if mesh_headers:
            headers = [(n, v) for n, v in headers if not n.startswith(MESH_HEADER_PREFIX)]
        if self.request_ids:
            if request_id is None:
                headers.append((REQUEST_ID, _request_id()))
            elif not _request_id_ok(request_id):
                headers = [(n, v) for n, v in headers if n != REQUEST_ID]
                headers.append((REQUEST_ID, _request_id()))
        try:
            decision = self.dispatch(head)
        except ProxyError as error:
            cycle = self.cycle = _Cycle(self, head, None, None, now)
            cycle.error = error
            if whole:
                self.request_complete = True
                cycle.begin()
            return cycle
        # Request(...) and _Cycle(...) inline: CPython 3.11 does not specialise a call of a
        # class with a Python __init__ (type_call, slot_tp_init and a frame, ~1,200
        # instructions an object before its stores). Every slot is set as the two __init__ set
        # them (tests/sidecar/transport/test_server.py holds it).
        request = _new(Request)
        request.method = head.method
        request.path = head.path
        request.authority = head.authority
        request.headers = headers
        request.body = body
        request.version = head.version
        request.upgrade = head.upgrade
        request.service = decision.service
        request.destination = self.destination
        request.deadline = None
        request.attempts = 0
        request.tried = []
        request.flags = []
        request.on_interrupt = None
        request.ended = False
        request.trace = None
        cycle = self.cycle = _new(_Cycle)
        cycle.conn = self
        cycle.head = head
        cycle.decision = decision
        cycle.request = request
        cycle.start = now
        cycle.error = None
        cycle.started = False
        cycle.replied = False
        cycle.done = False
        cycle.status = 0
        cycle.flags = ""
        cycle.response = None
        cycle._timer = None
        cycle.grpc_status = None
        if whole:
            self.request_complete = cycle.started = True
            try:
                decision.handler(request, cycle.__call__)
            except Exception:
                cycle._handler_failed()
        return cycle

    def _reject(self, event: Reject) -> None:
        # docs/hardening.md rule 6: after a rejected request nothing more is parsed or forwarded.
        self.pending.clear()
        self.close_after = True
        self._pause("rejected")
        if self.body is not None:
            self.body_failure = (event.status, event.reason)
            self.body.fail(BodyReset(event.reason))
            self.body = None
        cycle = self.cycle
        if cycle is not None:
            if not cycle.started:
                # Its body went bad before it was handed over: answer without an exchange.
                cycle.started = True
                cycle(RequestBodyFailed(event.reason))
            return  # the in-flight response finishes, then the connection closes
        self._refuse(event.status, event.reason)

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request that never got a cycle (refused or timed out before its head was
        whole), report it like any other, and close."""
        body = f"{reason}\n".encode("ascii", "replace")
        self._write_local(status, Flag.DOWNSTREAM_PROTOCOL_ERROR, body, b"1.1", close=True)
        if self.completed is not None:
            dpe = Flag.DOWNSTREAM_PROTOCOL_ERROR.value
            self.completed(None, None, status, dpe, self.phase_since, None, None)
        self._close()

    # --- writing -------------------------------------------------------------------------

    def _open_tunnel(self, response: Response, upgrade: bytes) -> None:
        tunnel = response.tunnel
        assert tunnel is not None and self.transport is not None
        self.release_held()
        self.response_started = True
        self.close_after = True
        self.transport.write(
            serialize.response_head(
                101,
                response.reason,
                [(b"connection", b"upgrade"), (b"upgrade", upgrade), *response.headers],
                version=b"1.1",
                content_length=None,
                chunked=False,
                close=False,
            )
        )
        transport = self.transport
        self.phase = TUNNEL  # timed from the last byte either way (last_activity)
        # Each side's EOF is passed on as a half-close; once both sides are done, or one is
        # gone, both connections close after sending what they hold (neither closes by itself:
        # an asyncio transport that returned True from eof_received stays open).
        client_done = upstream_done = False

        def end() -> None:
            self.tunnel_abort = None  # a close, not a reset: what is buffered still goes out
            tunnel.close()
            transport.close()

        def from_upstream(data: bytes) -> None:
            nonlocal upstream_done
            self.last_activity = self.loop.time()
            if data:
                transport.write(data)
                return
            if client_done or tunnel.closed or not transport.can_write_eof():
                end()
            elif not upstream_done:
                transport.write_eof()
            upstream_done = True

        def to_upstream(data: bytes) -> None:
            nonlocal client_done
            if data:
                tunnel.write(data)
                return
            client_done = True
            if upstream_done:
                end()
            else:
                tunnel.write_eof()

        self.tunnel_upstream = to_upstream
        self.tunnel_abort = tunnel.abort
        self.tunnel_flow = (tunnel.pause_reading, tunnel.resume_reading)
        tunnel.set_receiver(
            from_upstream, lambda: self._pause("tunnel"), lambda: self._resume("tunnel")
        )
        rest = self.parser.take_upgrade_rest()
        if rest:
            tunnel.write(rest)
        self.pending.clear()
        self._resume("pipeline")
        self._resume("rejected")

    def _write_local(
        self, status: int, flag: Flag, body: bytes, version: bytes, *, close: bool
    ) -> None:
        if self.transport is None or self.closed:
            return
        self.release_held()
        if not self.request_complete:
            close = True
        if close:
            self.close_after = True
        self.response_started = True
        headers = [(b"content-type", b"text/plain"), (FLAGS_HEADER, flag.value.encode())]
        self.transport.write(
            serialize.response_head(
                status,
                REASONS.get(status, b""),
                headers,
                version=version,
                content_length=len(body),
                chunked=False,
                close=close,
            )
            + body
        )

    def _send_continue(self) -> None:
        if self.transport is not None and not self.response_started and not self.closed:
            self.release_held()
            self.transport.write(serialize.informational(100, b"Continue"))

    def cycle_done(self, cycle: RequestCycle) -> None:
        self.drain_callback = None
        if self.cycle is not cycle:
            return
        self.cycle = None
        if self.phase == TUNNEL:
            return
        if self.close_after or self.closed or not self.request_complete:
            # (a request whose body was not read to its end leaves the connection unusable)
            self._close()
            return
        self.phase = IDLE
        self.phase_since = self.loop.time()
        if self.pending:
            self._process()
        elif self.read_paused_by:
            self._resume("pipeline")

    # --- flow control and time limits -----------------------------------------------------

    def _pause_body(self) -> None:
        self._pause("body")

    def _resume_body(self) -> None:
        self._resume("body")

    def _pause(self, reason: str) -> None:
        if not self.read_paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.read_paused_by.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self.read_paused_by:
            self.read_paused_by.discard(reason)
            if not self.read_paused_by and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def check_timeouts(self, now: float) -> None:
        settings = self.state.settings
        if self._send_timed_out(now):
            return
        if self.phase == IDLE and now - self.phase_since > settings.idle_timeout:
            self._close()
        elif self.phase == HEADERS and now - self.phase_since > settings.header_timeout:
            self._timeout_request(408, "request headers not received in time")
        elif self.phase == BODY and now - self.last_activity > settings.body_timeout:
            self._timeout_request(408, "request body stopped arriving")
        elif self.phase == TUNNEL and 0 < settings.stream_idle_timeout < now - self.last_activity:
            log.info("tunnel idle for %.0fs: closing", settings.stream_idle_timeout)
            if self.tunnel_abort is not None:
                self.tunnel_abort()
            self.abort()

    def _timeout_request(self, status: int, reason: str) -> None:
        if self.body is not None:
            self.body_failure = (status, reason)
            self.body.fail(BodyReset(reason))
            self.body = None
        if self.cycle is None:
            self._refuse(status, reason)
        else:
            self.close_after = True

    def close_when_idle(self) -> None:
        self.close_after = True
        if self.cycle is None and self.phase in (IDLE, HEADERS) and not self.pending:
            self._close()


_DC = Flag.DOWNSTREAM_DISCONNECT.value
_UC = Flag.UPSTREAM_RESET.value
_UT = Flag.UPSTREAM_TIMEOUT.value


class RequestCycle:
    """What an HTTP/1.1 request cycle (`_Cycle`) and an HTTP/2 stream (`h2server._Stream`)
    share: one request and the state of its reply, and one way to end: `finish` cancels the
    deadline timer, tells the connection's `completed` callback (once, however the cycle ended)
    and then the connection itself (`cycle_done`)."""

    __slots__ = (
        "_timer",
        "conn",
        "decision",
        "done",
        "error",
        "flags",
        "grpc_status",
        "head",
        "replied",
        "request",
        "response",
        "start",
        "started",
        "status",
    )

    def __init__(
        self,
        conn: Downstream,
        head: RequestHead,
        decision: Decision | None,
        request: Request | None,
        start: float,
    ) -> None:
        self.conn = conn
        self.head = head
        self.decision = decision
        self.request = request
        self.start = start  # on the loop's clock
        self.error: ProxyError | None = None  # routing refused it: answered with this
        self.started = False  # handed to its handler
        self.replied = False
        self.done = False
        self.status = 0
        self.flags = ""
        self.response: Response | None = None
        self._timer: Timer | None = None
        self.grpc_status: int | None = None  # a gRPC call's status, once known (HTTP/2 only)

    def __call__(self, result: Result) -> None:
        raise NotImplementedError

    def begin(self) -> None:
        """Hand the request to its route's handler, with this cycle as its reply; or answer
        with the error routing refused it with."""
        self.started = True
        decision, request = self.decision, self.request
        if decision is None or request is None:
            error = self.error
            assert error is not None
            self(error)
            return
        try:
            # The bound method, not the cycle: a call through a bound method is the
            # interpreter's fast path, a callable instance's `__call__` is not.
            decision.handler(request, self.__call__)
        except Exception:
            self._handler_failed()

    def _handler_failed(self) -> None:
        """The handler raised (a bug): answer, if nothing was yet, and log it."""
        raise NotImplementedError

    def _gone(self, detail: str, interruptible: bool) -> None:
        """The client is gone (`detail`). An exchange still waiting (`interruptible`: it has its
        request) replies 499 DC through every layer; else the cycle ends here, flagged DC, its
        response (if any) discarded: its upstream connection closes, never half-read."""
        if self.done:
            return
        if not self.replied:
            request = self.request
            gone = DownstreamGone(detail)
            if interruptible and request is not None and request.interrupt(gone, end=True):
                return  # the exchange replied (499 DC) through every layer
            self.replied = True  # nothing interruptible waited: whatever comes later is dropped
            self.status = 499
            self.flags = _DC
            self.finish()
            return
        if self.response is not None:
            self.flags = f"{self.flags},{_DC}" if self.flags else _DC
            self.response.discard()
        self.finish()

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        conn = self.conn
        if conn.completed is not None:
            conn.completed(
                self.head,
                self.decision,
                self.status,
                self.flags,
                self.start,
                self.request,
                self.grpc_status,
            )
        conn.cycle_done(self)


class _Cycle(RequestCycle):
    """One request and its response on a connection: the reply of the route's handler.

    It writes the response the handler replies with, the body as it arrives (head and a body
    already in hand in one write), bounds the body by the request's deadline (the total timeout
    covers the whole response, as Envoy's route timeout does), and tells the connection's
    `completed` callback once, however the cycle ends. A reply that comes after the cycle ended
    (its client gone, nothing interruptible waiting) is dropped, its response discarded.
    """

    __slots__ = ("_chunked",)

    conn: DownstreamProtocol

    def _handler_failed(self) -> None:
        if not self.replied:
            self._internal_error()
        else:
            log.exception("unexpected error serving %r", self.head.path)

    # --- the reply -------------------------------------------------------------------------

    def __call__(self, result: Result) -> None:
        """The reply: write the response (the head, and the body as it comes), or answer with
        the error. One method for both (a call less per request)."""
        if self.replied or self.done:
            if isinstance(result, Response):
                result.discard()  # late: the cycle was answered already
            return
        self.replied = True
        if not isinstance(result, Response):
            try:
                self._fail(result)
            except Exception:
                self._internal_error()
            return
        response = result
        try:
            conn, head = self.conn, self.head
            self.response = response
            self.status = response.status
            if response.flags:
                self.flags = ",".join([f.value for f in response.flags])
            if response.tunnel is not None:
                if response.status == 101 and head.upgrade is not None:
                    conn._open_tunnel(response, head.upgrade)
                    self.finish()
                    return
                response.tunnel.abort()
            transport = conn.transport
            if transport is None or conn.closed:
                # Lost the client before a byte of the response: close it all.
                response.discard()
                self.flags = self.flags or _DC
                conn.abort()
                self.finish()
                return
            version = head.version
            if head.upgrade is not None:
                # An upgrade refused: don't parse what the client sends next.
                conn.close_after = True
            send_body = response.has_body and head.method != b"HEAD"
            length = response.content_length
            chunked = send_body and length is None and version != b"1.0"
            close = conn.close_after or conn.state.draining
            if (send_body and length is None and not chunked) or not conn.request_complete:
                # An HTTP/1.0 body of unknown length ends with the connection; a client still
                # sending a body nobody will read cannot send another request.
                close = conn.close_after = True
            elif close:
                conn.close_after = True
            conn.response_started = True
            head_bytes = serialize.response_head(
                response.status,
                response.reason,
                response.headers,
                version=version,
                content_length=length,
                chunked=chunked,
                close=close,
                parsed=response.endpoint is not None,  # an upstream's head, from our parser
            )
            if conn.held is not None:
                conn.release_held()  # a response before this one (pipelined) goes first
            if not send_body:
                transport.write(head_bytes)
                if response.has_body:
                    response.discard()  # a HEAD: the upstream's body (if any) is not forwarded
                self.finish()
                return
            data = response.body.whole()
            if data is not None:
                # The whole body is here (most responses): one write, no waiting, held to
                # the end of the loop's round (`Outbox.hold`, inline; sidecar/transport/outbox.py)
                if chunked:
                    data = (
                        serialize.chunk(data) + serialize.LAST_CHUNK
                        if data
                        else serialize.LAST_CHUNK
                    )
                conn.held = head_bytes + data
                box = conn.outbox
                held = box.held
                if not held:
                    box.call_soon(box.flush)
                held.append(conn)
                self.finish()
                return
            self._chunked = chunked
            self.pump(head_bytes)
        except Exception:
            self._internal_error()

    def _fail(self, error: ProxyError) -> None:
        conn = self.conn
        if isinstance(error, RequestBodyFailed | DownstreamGone):
            failure = conn.body_failure
            if failure is None or conn.closed:
                self.status, self.flags = 499, _DC
                self.finish()
                return
            # The sidecar cut the request body (timeout, bad chunk): the client is told why.
            self.status, self.flags = failure[0], Flag.DOWNSTREAM_PROTOCOL_ERROR.value
            reason = f"{failure[1]}\n".encode("ascii", "replace")
            conn._write_local(
                failure[0], Flag.DOWNSTREAM_PROTOCOL_ERROR, reason, self.head.version, close=True
            )
            self.finish()
            return
        status, flag, body = local_response(error)
        self.status, self.flags = status, flag.value
        conn._write_local(status, flag, body, self.head.version, close=conn.close_after)
        self.finish()

    # --- the response body -----------------------------------------------------------------

    def pump(self, out: bytes = b"") -> None:
        """Write what the body has now (after `out`: the head, the first time), then wait: for
        more body (`notify`), or for the client to take our bytes (`drain_callback`)."""
        response, conn = self.response, self.conn
        if self.done or response is None:
            return
        transport = conn.transport
        if transport is None or conn.closed:
            self.client_gone()
            return
        body = response.body
        chunked = self._chunked
        try:
            while True:
                data = body.take()
                if data is None:
                    break
                if not data:
                    transport.write(out + serialize.LAST_CHUNK if chunked else out)
                    self.finish()
                    return
                if chunked:
                    data = serialize.chunk(data)
                out = out + data if out else data
        except BodyReset:
            # Lost the upstream mid-response: the client saw a truncated message; close it.
            if out:
                transport.write(out)
            self.flags = self.flags or _UC
            response.discard()
            conn.abort()
            self.finish()
            return
        except Exception:
            response.discard()
            raise
        if out:
            transport.write(out)
        if conn.write_paused:
            conn.drain_callback = self.pump
        else:
            body.notify(self.pump)
        deadline = self.request.deadline if self.request is not None else None
        if deadline is not None and self._timer is None:
            self._timer = call_at(deadline, self._deadline_passed)

    def _deadline_passed(self) -> None:
        # The total timeout covers the whole response (Envoy's route timeout), not only its
        # head: a body still streaming at the deadline is cut (UT). The deadline is on the
        # loop's clock (policy.clock.loop_time).
        self._timer = None
        if self.done or self.response is None:
            return
        self.flags = _UT
        self.response.discard()
        self.conn.abort()
        self.finish()

    # --- endings ---------------------------------------------------------------------------

    def client_gone(self) -> None:
        """The client connection is gone (lost, or cut off by the send timeout)."""
        self._gone("the client closed the connection", self.started)

    def _internal_error(self) -> None:
        log.exception("unexpected error serving %r", self.head.path)
        self.replied = True
        self.status, self.flags = 500, Flag.UPSTREAM_PROTOCOL_ERROR.value
        conn = self.conn
        if self.response is not None:
            self.response.discard()
        if not conn.response_started:
            conn._write_local(
                500,
                Flag.UPSTREAM_PROTOCOL_ERROR,
                b"internal error\n",
                self.head.version,
                close=True,
            )
        else:
            conn.abort()
        self.finish()
