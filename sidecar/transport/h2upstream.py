"""Upstream HTTP/2 (h2c, prior knowledge): multiplexed connections per endpoint.

A service whose `protocol:` is `http2` or `grpc` (xDS: the Cluster's HTTP/2 protocol options)
gets `Upstreams.forward_h2` as its stack's innermost handler instead of `forward`, chosen when
the stack is built: HTTP/1.1 services pay nothing per request. The inbound listener forwards a
request that came over HTTP/2 to the app over HTTP/2 (the app spoke it to its client).

`H2Pool` keeps the endpoint's connections; a request takes the first one with a free stream
(under the peer's SETTINGS_MAX_CONCURRENT_STREAMS), else a new connection is opened (a task,
counted against `max_pending` as for HTTP/1.1), used once the peer's first SETTINGS came (its
stream limit), and shared by the requests that arrive while it opens, as far as its limit goes.
Each exchange is one stream (`_UpStream`): HEADERS from the parsed request (connection-specific
fields dropped), the body within the peer's windows (pumped by a task when it is still
arriving), and the response handed to the reply as soon as its HEADERS arrive, its body a
`BodyStream` that also carries the trailers.
Response DATA is acknowledged as the consumer takes it (the BodyStream's pause/resume), so a
slow client holds back its own stream, not the connection.

A stream the peer refused (RST_STREAM REFUSED_STREAM, or above the last stream id of a GOAWAY)
was never processed: it is sent again on another connection when its body can be replayed
(RFC 9113 §8.7). Discarding a response resets its stream (CANCEL); the connection carries on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import cast

import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from sidecar.config import Endpoint
from sidecar.exchange import (
    BodyNotReplayable,
    EndpointHandler,
    Reply,
    Request,
    RequestBodyFailed,
    Response,
)
from sidecar.flags import Flag, ProxyError
from sidecar.protocol.grpc import GRPC_RETRY_ON, grpc_status_of, is_grpc
from sidecar.transport.body import EMPTY_BODY, BodyReset, BodyStream
from sidecar.transport.connect import UpstreamError, connect_within
from sidecar.transport.flow import Waiting
from sidecar.transport.h2server import CONNECTION_SPECIFIC, h2_config, open_connection_window

log = logging.getLogger("outrigger.h2.upstream")

_SCHEME = b"http"
MAX_REFUSED = 2  # times one request is sent again after a refusal (then: 503 UC)


class H2Body(BodyStream):
    """A response body from an HTTP/2 upstream, with the trailers once they came, and their
    grpc-status (`grpc_status`: what the classifier, the breaker and the spans read)."""

    __slots__ = ("grpc_status", "trailers")

    def __init__(
        self,
        length: int | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
        on_discard: Callable[[], None],
    ) -> None:
        super().__init__(length, pause, resume, on_discard=on_discard)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.grpc_status: int | None = None

    @property
    def failed(self) -> bool:
        """It ended without its end: the stream was reset or the connection lost."""
        return self._error is not None


class H2UpstreamConnection(asyncio.Protocol):
    """One HTTP/2 connection to an endpoint, carrying many exchanges at once."""

    def __init__(self, pool: H2Pool) -> None:
        self.pool = pool
        self.endpoint = pool.endpoint
        self.transport: asyncio.Transport | None = None
        self.h2 = h2.connection.H2Connection(h2_config(client_side=True))
        self.streams: dict[int, _UpStream] = {}
        self.closed = False
        self.going_away = False  # GOAWAY received (or sent): no new streams here
        # Resolved by the peer's first SETTINGS (its stream limit), or by the connection's end
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.write_paused = False
        self.idle_since = self.last_activity = pool.clock()  # last_activity: bytes received
        # Closed after this long without a stream: the idle_timeout of the service it served last.
        self.idle_timeout = pool.idle_timeout

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,
            },
        )
        self.h2.initiate_connection()
        open_connection_window(self.h2)
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.pool.clock()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._lost(
                f"HTTP/2 protocol error from {self.endpoint}: {exc}", Flag.UPSTREAM_PROTOCOL_ERROR
            )
            self.flush()
            self.abort()
            return
        for event in events:
            kind = type(event)
            if kind is h2.events.DataReceived:
                event = cast(h2.events.DataReceived, event)
                stream = self.streams.get(event.stream_id)
                if stream is None:
                    self._ack(event.stream_id, event.flow_controlled_length)
                else:
                    stream.received(event.data or b"", event.flow_controlled_length)
            elif kind is h2.events.ResponseReceived:
                event = cast(h2.events.ResponseReceived, event)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.head(event.headers, event.stream_ended is not None)
            elif kind is h2.events.InformationalResponseReceived:
                continue  # 100 Continue and friends: the sidecar answers the client itself
            elif kind is h2.events.TrailersReceived:
                event = cast(h2.events.TrailersReceived, event)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.trailers(event.headers)
            elif kind is h2.events.StreamEnded:
                stream = self.streams.get(cast(h2.events.StreamEnded, event).stream_id)
                if stream is not None:
                    stream.ended()
            elif kind is h2.events.StreamReset:
                event = cast(h2.events.StreamReset, event)
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.reset(event.error_code)
            elif kind is h2.events.WindowUpdated:
                stream_id = cast(h2.events.WindowUpdated, event).stream_id
                targets = (
                    [self.streams[stream_id]]
                    if stream_id and stream_id in self.streams
                    else list(self.streams.values())
                )
                for stream in targets:
                    stream.window_opened()
            elif kind is h2.events.RemoteSettingsChanged:
                if not self.settled.done():
                    self.settled.set_result(None)
                for stream in list(self.streams.values()):
                    stream.window_opened()
            elif kind is h2.events.ConnectionTerminated:
                self._goaway(cast(h2.events.ConnectionTerminated, event))
        self.flush()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.settled.done():
            self.settled.set_result(None)
        self.pool.forget(self)
        reason = (
            f"{self.endpoint} closed the HTTP/2 connection"
            if exc is None
            else f"HTTP/2 connection to {self.endpoint} lost: {exc}"
        )
        self._lost(reason, Flag.UPSTREAM_RESET)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.window_opened()
        self.flush()

    # --- streams -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """How many more streams this connection may open now."""
        if self.closed or self.going_away:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams
        return limit - len(self.streams)

    def exchange(self, req: Request, reply: Reply) -> None:
        stream_id = self.h2.get_next_available_stream_id()
        stream = _UpStream(self, stream_id, req, reply)
        self.streams[stream_id] = stream
        stream.send()
        self.flush()

    def stream_done(self, stream: _UpStream) -> None:
        if self.streams.pop(stream.stream_id, None) is not None and not self.streams:
            self.idle_since = self.pool.clock()
            if self.going_away:
                self.close()

    def _ack(self, stream_id: int, size: int) -> None:
        if size and not self.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(size, stream_id)

    def _goaway(self, event: h2.events.ConnectionTerminated) -> None:
        self.going_away = True
        self.pool.forget(self)
        last = event.last_stream_id if event.last_stream_id is not None else 0
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last:
                # Never processed by the peer (RFC 9113 §6.8): safe to send elsewhere.
                stream.refused(f"{self.endpoint} sent GOAWAY before processing the stream")
        if not self.streams:
            self.close()

    def _lost(self, reason: str, flag: Flag) -> None:
        for stream in list(self.streams.values()):
            stream.lost(reason, flag)

    # --- writing -------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()


class _UpStream(Waiting):
    """One exchange on an HTTP/2 upstream connection."""

    __slots__ = (
        "_held",
        "_paused",
        "_pending",
        "_unacked",
        "body",
        "conn",
        "got_response",
        "last_activity",
        "reply",
        "request",
        "responded",
        "stream_id",
        "task",
    )

    def __init__(
        self, conn: H2UpstreamConnection, stream_id: int, req: Request, reply: Reply
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.request: Request | None = req
        self.reply: Reply | None = reply
        self.body: H2Body | None = None
        self.responded = False
        self.got_response = False
        self.task: asyncio.Task[None] | None = None
        self._paused = False
        self._unacked = 0
        self._pending = b""  # request bytes waiting for a window
        self._waiter = None
        # A gRPC response whose head waits for its first message or its trailers (`head`)
        self._held: Response | None = None
        self.last_activity = conn.pool.clock()  # bytes either way (H2Pool.sweep)
        req.on_interrupt = self.interrupt

    # --- the request -----------------------------------------------------------------------

    def send(self) -> None:
        req = self.request
        assert req is not None
        headers = [
            (b":method", req.method),
            (b":scheme", _SCHEME),
            (b":authority", req.authority),
            (b":path", req.path),
        ]
        for name, value in req.headers:
            if name not in CONNECTION_SPECIFIC or (name == b"te" and value == b"trailers"):
                headers.append((name, value))
        body = req.body
        h2conn = self.conn.h2
        if body.length == 0:
            h2conn.send_headers(self.stream_id, headers, end_stream=True)
            return
        h2conn.send_headers(self.stream_id, headers)
        data = body.whole()
        if data is not None:
            self._pending = data
            self._send_pending(end=True)
            return
        self.task = asyncio.get_running_loop().create_task(self._pump(req))

    def _send_pending(self, *, end: bool) -> bool:
        conn = self.conn
        h2conn = conn.h2
        data = self._pending
        if data:
            self.last_activity = conn.pool.clock()
        while data:
            if conn.closed:
                return False
            window = min(
                h2conn.local_flow_control_window(self.stream_id), h2conn.max_outbound_frame_size
            )
            if window <= 0 or conn.write_paused:
                self._pending = data
                return False
            h2conn.send_data(self.stream_id, data[:window])
            data = data[window:]
        self._pending = b""
        if end:
            h2conn.end_stream(self.stream_id)
        return True

    async def _pump(self, req: Request) -> None:
        conn = self.conn
        try:
            async for data in req.body.chunks():
                self._pending += data
                while not self._send_pending(end=False):
                    if conn.closed or (self.reply is None and not self.responded):
                        return
                    await self._wait()
                conn.flush()
            self._send_pending(end=True)
            conn.flush()
        except BodyReset as exc:
            self._reset_stream(h2.errors.ErrorCodes.CANCEL)
            self._answer(RequestBodyFailed(str(exc)))
        except BodyNotReplayable:
            self._reset_stream(h2.errors.ErrorCodes.CANCEL)
            self._answer(
                UpstreamError(Flag.UPSTREAM_RESET, "the streamed request body cannot be sent again")
            )
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the stream ended meanwhile (reset, or the response came and went)
        finally:
            self.task = None

    def window_opened(self) -> None:
        self._wake_waiter()

    # --- the response ----------------------------------------------------------------------

    def head(self, raw: list[tuple[bytes, bytes]], ended: bool) -> None:
        status = 0
        length: int | None = None
        headers: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                if name == b"content-length" and value.isdigit():
                    length = int(value)
                headers.append((name, value))
        self.got_response = True
        self.last_activity = self.conn.last_activity
        req = self.request
        method = req.method if req is not None else b""
        if ended:
            response = Response(status, b"", headers, EMPTY_BODY, self.conn.endpoint, length, False)
            self._done()
        else:
            self.body = H2Body(length, self._pause, self._resume, on_discard=self._discard)
            response = Response(
                status, b"", headers, self.body, self.conn.endpoint, length, method != b"HEAD"
            )
            if req is not None and _may_retry_on_grpc_status(req) and is_grpc(headers):
                # Held until the first message or the trailers (Envoy's router holds a head
                # while a retry may still replace it): a grpc-status that comes before any
                # message can then still be retried, and is classified (`classify_grpc`).
                self._held = response
                return
        self._answer(response)

    def received(self, data: bytes, flow: int) -> None:
        self.last_activity = self.conn.last_activity
        body = self.body
        if self._paused or body is None:
            self._unacked += flow
        else:
            self.conn._ack(self.stream_id, flow)
        if body is not None and data:
            body.feed(data)
            if self._held is not None:
                self._release()  # a message: the head goes now, no retry from here on

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            self._answer(held)

    def _pause(self) -> None:
        self._paused = True

    def _resume(self) -> None:
        self._paused = False
        size, self._unacked = self._unacked, 0
        self.conn._ack(self.stream_id, size)
        self.conn.flush()

    def trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        body = self.body
        if body is not None:
            body.trailers = headers
            body.grpc_status = grpc_status_of(headers)

    def ended(self) -> None:
        body = self.body
        self._done()
        if body is not None:
            body.finish()
        self._release()  # no message came: the trailers' grpc-status decides (classify_grpc)

    def _discard(self) -> None:
        self._reset_stream(h2.errors.ErrorCodes.CANCEL)
        self._done()

    # --- endings ---------------------------------------------------------------------------

    def interrupt(self, error: ProxyError) -> None:
        """The request stops waiting (a deadline, the client gone): reset the stream only."""
        self._reset_stream(h2.errors.ErrorCodes.CANCEL)
        self._done()
        self._answer(error)

    def reset(self, code: int) -> None:
        if code == h2.errors.ErrorCodes.REFUSED_STREAM and not self.got_response:
            self.refused(f"{self.conn.endpoint} refused the stream")
            return
        self.lost(f"{self.conn.endpoint} reset the stream (error code {code})", Flag.UPSTREAM_RESET)

    def refused(self, reason: str) -> None:
        """Never processed by the peer: send it again on another connection if we can."""
        req, reply = self.request, self.reply
        self._done()
        if reply is None or req is None:
            return
        if (
            not req.ended
            and req.body.replayable
            and self.task is None
            and req.flags.count(Flag.UPSTREAM_RESET) < MAX_REFUSED
        ):
            req.flags.append(Flag.UPSTREAM_RESET)  # a retried UC, as the retry layer notes it
            self.reply = None
            req.on_interrupt = None
            self.conn.pool.again(req, self.conn.endpoint, reply)
            return
        self._answer(UpstreamError(Flag.UPSTREAM_RESET, reason))

    def idle(self, timeout: float) -> None:
        """No byte either way for the stream idle timeout (`H2Pool.sweep`): reset, flag SI."""
        self._reset_stream(h2.errors.ErrorCodes.CANCEL)
        self.lost(f"no bytes on the upstream stream for {timeout:g}s", Flag.STREAM_IDLE_TIMEOUT)

    def lost(self, reason: str, flag: Flag) -> None:
        body = self.body
        self._done()
        if body is not None:
            body.fail(BodyReset(reason))
        self._answer(UpstreamError(flag, reason))

    def _answer(self, result: Response | ProxyError) -> None:
        self._held = None  # an error replaces a held head: nothing of it was forwarded
        reply, self.reply = self.reply, None
        if reply is None:
            if isinstance(result, Response):
                result.discard()
            return
        self.responded = True
        req = self.request
        if req is not None and req.on_interrupt == self.interrupt:
            req.on_interrupt = None
        reply(result)

    def _reset_stream(self, code: h2.errors.ErrorCodes) -> None:
        conn = self.conn
        if conn.closed or self.stream_id not in conn.streams:
            return
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            conn.h2.reset_stream(self.stream_id, code)
        conn.flush()

    def _done(self) -> None:
        task, self.task = self.task, None
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        self.window_opened()
        self.conn.stream_done(self)


def _may_retry_on_grpc_status(req: Request) -> bool:
    """The request's service retries on a gRPC status, and its body has been sent whole and
    can be sent again. A call still sending (a bidi stream, a client stream the server
    answers early) gets its head at once: its client may wait for the head before it sends
    more, and holding it would stall the call."""
    service = req.service
    retry = service.retry if service is not None else None
    body = req.body
    return (
        retry is not None
        and retry.attempts > 0
        and not retry.retry_on.isdisjoint(GRPC_RETRY_ON)
        and body.replayable
        and getattr(body, "finished", True)  # a BodyStream still arriving: not yet
    )


class H2Pool:
    """One endpoint's HTTP/2 connections (each multiplexed); the `Connecting` pool for them."""

    def __init__(
        self,
        endpoint: Endpoint,
        clock: Callable[[], float],
        idle_timeout: float,
        again: EndpointHandler,
    ) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self.idle_timeout = idle_timeout  # for connections of requests without a service
        self.again = again  # the forwarder: a request to start over on another connection
        self.connections: list[H2UpstreamConnection] = []
        self._opening: asyncio.Task[H2UpstreamConnection] | None = None

    def usable(self) -> H2UpstreamConnection | None:
        for conn in self.connections:
            if conn.capacity > 0:
                return conn
        return None

    async def open(self, connect_timeout: float) -> H2UpstreamConnection:
        """A connection with a free stream: the one being opened when it has room for this
        request too (requests arriving together share it), else a new one."""
        while (opening := self._opening) is not None:
            conn = await asyncio.shield(opening)  # its failure is this request's too (UF)
            if conn.capacity > 0:
                return conn
            if self._opening is opening:
                break  # it is full (or closed), and nobody opened another meanwhile
        opening = self._opening = asyncio.get_running_loop().create_task(
            self._connect(connect_timeout)
        )
        opening.add_done_callback(self._opened)
        return await asyncio.shield(opening)

    def _opened(self, opening: asyncio.Task[H2UpstreamConnection]) -> None:
        if self._opening is opening and (opening.cancelled() or opening.exception() is not None):
            self._opening = None  # a failed connect is not waited for again

    async def _connect(self, connect_timeout: float) -> H2UpstreamConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        protocol = await connect_within(
            loop.create_connection,
            lambda: H2UpstreamConnection(self),
            self.endpoint,
            connect_timeout,
        )
        # Streams wait for the peer's SETTINGS: until then its stream limit is unknown, and
        # streams past it would be refused (and sent again elsewhere).
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(protocol.settled)
        except TimeoutError:
            protocol.abort()
            raise UpstreamError(
                Flag.UPSTREAM_CONNECT_FAILURE,
                f"{self.endpoint} sent no HTTP/2 SETTINGS within {connect_timeout:g}s",
            ) from None
        if not protocol.closed:
            self.connections.append(protocol)
        return protocol

    def begin(self, conn: H2UpstreamConnection, req: Request, reply: Reply) -> None:
        if conn.capacity > 0:
            conn.exchange(req, reply)
        else:  # filled up (or went away) while this request waited for it: another one
            self.again(req, self.endpoint, reply)

    def keep(self, conn: H2UpstreamConnection) -> None:
        return None  # an interrupted connect's connection stays in `connections` for the next

    def forget(self, conn: H2UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self.connections.remove(conn)

    def sweep(self, now: float, stream_idle_timeout: float) -> None:
        """Close connections idle past their idle timeout, and end streams with no byte either
        way for the stream idle timeout (the client's side may be HTTP/1.1, with no timer of
        its own for a response that stops coming)."""
        for conn in list(self.connections):
            idle = conn.idle_timeout
            if not conn.streams and 0 < idle < now - conn.idle_since:
                conn.close()
            elif stream_idle_timeout > 0:
                for stream in list(conn.streams.values()):
                    if now - stream.last_activity > stream_idle_timeout:
                        stream.idle(stream_idle_timeout)

    def close_idle(self) -> None:
        for conn in list(self.connections):
            if not conn.streams:
                conn.close()
