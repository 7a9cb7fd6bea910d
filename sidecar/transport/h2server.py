"""Downstream HTTP/2 (h2c, prior knowledge): one `asyncio.Protocol` per client connection.

The listener hands a connection here when its first bytes are the HTTP/2 client preface (RFC
9113 §3.4); everything else stays on the HTTP/1.1 path (`server.py`), which pays nothing for
HTTP/2 being possible. Framing, HPACK and flow-control bookkeeping are python-hyper's `h2`
(sans-IO); this module is the I/O around it.

Each stream is one request cycle, the same as an HTTP/1.1 request: its head goes through the
listener's dispatch (`:authority` routes exactly as Host does), its body is a `BodyStream`, and
the route's handler is called with the stream (`_Stream`) as the reply, so the policy stack is
the same one. The reply writes HEADERS, then DATA as the body comes (within the peer's flow-control
windows), then the upstream's trailers (gRPC's `grpc-status`) or END_STREAM. A `ProxyError` on a
gRPC request (content-type application/grpc...) is answered as gRPC does: a trailers-only
response with `grpc-status` 14 UNAVAILABLE (4 DEADLINE_EXCEEDED for a timeout), the flag in
`grpc-message` and in `x-outrigger-flags`; on any other request, the status and text body the
HTTP/1.1 path would send.

Flow control: a request body's DATA is acknowledged (WINDOW_UPDATE) as it is fed, except while
its `BodyStream` asks the producer to pause; then the bytes are acknowledged when it resumes, so a
slow upstream holds back one stream's sender, not the connection. Response bytes that do not fit
the peer's window wait in the stream until a WINDOW_UPDATE comes.

The connection's time limits are HTTP/2's own: it is idle (closed after the idle timeout) only
with no stream open; a stream is never cut by the HTTP/1.1 header/body timers (long gRPC
streams), only by the policy's timeouts and the send timeout. Drain sends GOAWAY and lets open
streams finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame

from sidecar.exchange import DownstreamGone, Request, RequestBody, Response, Result
from sidecar.flags import Flag, ProxyError
from sidecar.policy.deadline import Timer, call_at
from sidecar.policy.timeout import UpstreamTimeoutError
from sidecar.protocol.events import RequestHead
from sidecar.protocol.grpc import (
    GRPC_CONTENT_TYPE,
    error_code,
    grpc_status_of,
    grpc_timeout,
    is_grpc,
    percent_encode,
)
from sidecar.transport.body import EMPTY_BODY, BodyReset, BodyStream
from sidecar.transport.server import (
    FLAGS_HEADER,
    MESH_HEADER_PREFIX,
    REQUEST_ID,
    Downstream,
    RequestCycle,
    _request_id,
    _request_id_ok,
    local_response,
)

log = logging.getLogger("outrigger.h2")

VERSION = b"2"

# Connection-specific header fields (RFC 9113 §8.2.2): never sent on HTTP/2. An HTTP/1.1
# upstream's hop-by-hop fields were removed by its parser already; these are the ones it keeps.
CONNECTION_SPECIFIC = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
        b"host",
    )
)


# The connection-level receive window we grant a peer (both sides: h2upstream.py too). Each
# stream's own window (65,535, the default) is what holds back one stream's sender while its
# body waits (its reader paused); the connection's must be larger than the streams that may
# stall at once could hold, or one stalled stream stops every other stream on the connection:
# all of a gRPC client's calls, or every client's calls to an endpoint on the shared upstream
# connection. It does not add to what is buffered: that is bounded per stream (its body's high
# water and its window).
CONNECTION_WINDOW = 16 * 1024 * 1024


def open_connection_window(h2conn: h2.connection.H2Connection) -> None:
    """Grant the peer CONNECTION_WINDOW on the connection (after `initiate_connection`)."""
    h2conn.increment_flow_control_window(CONNECTION_WINDOW - h2conn.inbound_flow_control_window)


def grpc_error_headers(error: ProxyError) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC response for a local error: the flag in grpc-message and in
    x-outrigger-flags (a gRPC client cannot read an HTTP 503 page)."""
    message = f"{error.flag.value}: {error.detail}"
    return [
        (b":status", b"200"),
        (b"content-type", GRPC_CONTENT_TYPE),
        (b"grpc-status", str(error_code(error.flag)).encode()),
        (b"grpc-message", percent_encode(message)),
        (FLAGS_HEADER, error.flag.value.encode()),
    ]


def h2_config(client_side: bool) -> h2.config.H2Configuration:
    """Every header block received is validated (docs/hardening.md rule 17); what we send is
    not again: it was validated when it arrived (by h2, or by the HTTP/1.1 codec, whose names
    are lower-case and values trimmed), and connection-specific fields are dropped here
    (CONNECTION_SPECIFIC), and checking it twice is a good share of h2's work per call."""
    return h2.config.H2Configuration(
        client_side=client_side,
        header_encoding=None,
        validate_inbound_headers=True,
        normalize_inbound_headers=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )


class H2DownstreamProtocol(Downstream):
    """One HTTP/2 client connection: its streams are request cycles."""

    peer = "HTTP/2 client"

    def _init_connection(self) -> None:
        self.h2 = h2.connection.H2Connection(h2_config(client_side=False))
        self.streams: dict[int, _Stream] = {}
        self.goaway_sent = False
        self.goaway_last: int | None = None  # the last stream id our GOAWAY let in
        self.idle_since = 0.0
        self.limits = self.state.settings.h2
        # What the client did in the current window (docs/hardening.md rules 15-16)
        self.window_start = self.loop.time()
        self.resets = self.control_frames = self.empty_frames = 0

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.idle_since = self.last_activity = self.loop.time()
        self.state.add(self)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: (
                    self.state.settings.limits.max_header_bytes
                ),
            },
        )
        self.h2.initiate_connection()
        open_connection_window(self.h2)
        self._flush()
        if self.state.draining:
            self.close_when_idle()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 queued the GOAWAY (docs/hardening.md rules 12-14, 17)
            self._refuse(_refusal(exc), str(exc))
            return
        started: list[_Stream] = []
        for event in events:
            kind = type(event)
            if kind in _BUDGETED and self._over_budget(event):
                return
            if kind is h2.events.DataReceived:
                event = cast(h2.events.DataReceived, event)
                stream = self.streams.get(event.stream_id)
                if stream is None or stream.body is None:
                    self.h2.acknowledge_received_data(
                        event.flow_controlled_length,
                        event.stream_id,
                    )
                else:
                    stream.received(event.data or b"", event.flow_controlled_length)
            elif kind is h2.events.RequestReceived:
                event = cast(h2.events.RequestReceived, event)
                stream = self._open(event.stream_id, event.headers, event.stream_ended is not None)
                if stream is not None:
                    started.append(stream)
            elif kind is h2.events.StreamEnded:
                stream = self.streams.get(cast(h2.events.StreamEnded, event).stream_id)
                if stream is not None:
                    stream.request_ended()
            elif kind is h2.events.TrailersReceived:
                stream = self.streams.get(cast(h2.events.TrailersReceived, event).stream_id)
                if stream is not None:
                    stream.request_ended()  # request trailers are not forwarded
            elif kind is h2.events.StreamReset:
                stream = self.streams.get(cast(h2.events.StreamReset, event).stream_id)
                if stream is not None:
                    stream.reset_by_client()
            elif kind is h2.events.WindowUpdated:
                stream_id = cast(h2.events.WindowUpdated, event).stream_id
                if stream_id:
                    stream = self.streams.get(stream_id)
                    if stream is not None:
                        stream.pump()
                else:
                    for stream in list(self.streams.values()):
                        stream.pump()
            elif kind is h2.events.RemoteSettingsChanged:
                for stream in list(self.streams.values()):
                    stream.pump()  # INITIAL_WINDOW_SIZE may have grown
            elif kind is h2.events.ConnectionTerminated:
                self.goaway_sent = True  # the client is leaving: no new stream from us either
        for stream in started:
            stream.begin()
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # HTTP/2 has no half-close of the connection: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.state.remove(self)
        for stream in list(self.streams.values()):
            stream.reset_by_client()

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.pump()
        self._flush()

    # --- hardening ---------------------------------------------------------------------

    def _over_budget(self, event: h2.events.Event) -> bool:
        """Count what the client does that costs us work but carries no request (rules 15,
        16); past a budget, GOAWAY ENHANCE_YOUR_CALM and close."""
        limits = self.limits
        now = self.loop.time()
        if now - self.window_start > limits.window:
            self.window_start = now
            self.resets = self.control_frames = self.empty_frames = 0
        kind = type(event)
        if kind is h2.events.StreamReset:
            self.resets += 1
            if self.resets <= limits.max_resets:
                return False
            reason = "rapid_reset"
        elif kind is h2.events.DataReceived:
            data = cast(h2.events.DataReceived, event)
            if data.flow_controlled_length or data.stream_ended is not None:
                return False
            self.empty_frames += 1
            if self.empty_frames <= limits.max_empty_frames:
                return False
            reason = "empty_frames"
        else:  # PING, SETTINGS, SETTINGS ACK
            self.control_frames += 1
            if self.control_frames <= limits.max_control_frames:
                return False
            reason = "control_flood"
        self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self._refuse(reason, f"more than the budget of {reason} in {limits.window}s")
        return True

    def _refuse(self, reason: str, detail: str) -> None:
        """Close the connection after its GOAWAY, and count it (docs/hardening.md)."""
        log.info("HTTP/2 client connection closed (%s): %s", reason, detail)
        refused = self.state.h2_refused
        refused[reason] = refused.get(reason, 0) + 1
        self._flush()
        self._close()

    # --- streams -------------------------------------------------------------------------

    def _open(self, stream_id: int, raw: list[tuple[bytes, bytes]], ended: bool) -> _Stream | None:
        now = self.loop.time()
        if self.goaway_last is not None and stream_id > self.goaway_last:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return None
        method = path = authority = b""
        host = b""
        headers: list[tuple[bytes, bytes]] = []
        request_id: bytes | None = None
        for name, value in raw:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value.lower()
                continue
            if name == b"host":
                host = value.lower()
                continue
            if name.startswith(MESH_HEADER_PREFIX):
                continue  # docs/hardening.md rule 8: a client never sets the mesh's headers
            if name == REQUEST_ID:
                if not _request_id_ok(value):
                    continue
                request_id = value
            headers.append((name, value))
        if self.request_ids and request_id is None:
            headers.append((REQUEST_ID, _request_id()))
        content_length: int | None = None
        for name, value in headers:
            if name == b"content-length":
                content_length = int(value) if value.isdigit() else None
        head = RequestHead(
            method,
            path,
            authority or host,
            VERSION,
            headers,
            True,
            content_length,
            False,
            False,
            None,
            False,
        )
        stream = _Stream(self, stream_id, head, now, is_grpc(headers))
        self.streams[stream_id] = stream
        try:
            decision = self.dispatch(head)
        except ProxyError as error:
            stream.error = error
            if not ended:
                stream.body = BodyStream(None, _nothing, _nothing)  # read and dropped
            return stream
        body: RequestBody = EMPTY_BODY
        if not ended:
            body = stream.body = BodyStream(
                content_length,
                stream.pause_body,
                stream.resume_body,
                keep_limit=self.state.settings.retry_buffer,
            )
        stream.decision = decision
        stream.request = Request(
            method,
            path,
            head.authority,
            headers,
            body,
            VERSION,
            None,
            decision.service,
            destination=self.destination,
        )
        return stream

    def cycle_done(self, cycle: RequestCycle) -> None:
        if self.streams.pop(cast(_Stream, cycle).stream_id, None) is None:
            return
        if not self.streams:
            self.idle_since = self.loop.time()
            if self.goaway_sent:
                self._flush()
                self._close()

    # --- writing -------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.closed:
            self.transport.write(data)

    # --- what ServerState asks of every connection ----------------------------------------

    def check_timeouts(self, now: float) -> None:
        if self._send_timed_out(now):
            return
        if not self.streams and now - self.idle_since > self.state.settings.idle_timeout:
            self.close_when_idle()

    def close_when_idle(self) -> None:
        """Drain: GOAWAY now (no new streams), close once the open streams have finished."""
        if self.closed:
            return
        if not self.goaway_sent:
            # Written by hand: h2's close_connection moves its state machine to CLOSED, after
            # which the open streams could send nothing more. The GOAWAY names the last stream
            # we took; later ones are refused (REFUSED_STREAM: the client may retry them).
            self.goaway_sent = True
            self._flush()
            frame = hyperframe.frame.GoAwayFrame(0)
            frame.last_stream_id = self.goaway_last = self.h2.highest_inbound_stream_id
            frame.error_code = h2.errors.ErrorCodes.NO_ERROR
            if self.transport is not None:
                self.transport.write(frame.serialize())
        if not self.streams:
            self._close()


def _nothing() -> None:
    return None


# Events counted against the connection's budgets (H2Limits).
_BUDGETED = frozenset(
    (
        h2.events.StreamReset,
        h2.events.DataReceived,
        h2.events.PingReceived,
        h2.events.RemoteSettingsChanged,
        h2.events.SettingsAcknowledged,
    )
)


def _refusal(exc: h2.exceptions.ProtocolError) -> str:
    """The metric's reason for a protocol error h2 refused the connection with."""
    if isinstance(exc, h2.exceptions.TooManyStreamsError):
        return "streams"  # rule 12
    if isinstance(exc, h2.exceptions.DenialOfServiceError):
        return "headers"  # rule 13: header list or HPACK decoded size over the limit
    if "continuation" in str(exc).lower():
        return "continuation"  # rule 14
    return "protocol"  # rule 17: invalid preface, frames, pseudo or connection headers


class _Stream(RequestCycle):
    """One HTTP/2 stream: the request cycle, and the reply of the route's handler."""

    __slots__ = (
        "_idle",
        "_outbound",
        "_trailers",
        "_unacked",
        "body",
        "grpc",
        "grpc_status",
        "last_activity",
        "paused",
        "stream_id",
    )

    conn: H2DownstreamProtocol

    def __init__(
        self,
        conn: H2DownstreamProtocol,
        stream_id: int,
        head: RequestHead,
        start: float,
        grpc: bool,
    ) -> None:
        super().__init__(conn, head, None, None, start)
        self.stream_id = stream_id
        self.grpc = grpc
        self.grpc_status: int | None = None  # the call's, once known
        self.body: BodyStream | None = None  # the request body while it arrives
        self.paused = False
        self._unacked = 0  # request bytes not yet acknowledged (the body asked to pause)
        self._outbound = b""  # response bytes waiting for the peer's window
        self._trailers: list[tuple[bytes, bytes]] | None = None
        # The stream idle timeout (Envoy's stream_idle_timeout): checked when it could have
        # passed, against the last time bytes moved on the stream either way.
        self.last_activity = start
        idle = conn.state.settings.stream_idle_timeout
        self._idle: Timer | None = call_at(start + idle, self._idle_check) if idle > 0 else None

    # --- the request -----------------------------------------------------------------------

    def begin(self) -> None:
        if self.done:
            return  # reset by the client in the same read that opened it: nothing to do
        if self.grpc and self.request is not None:
            self._grpc_deadline(self.request)
        super().begin()

    def _handler_failed(self) -> None:
        log.exception("unexpected error serving %r", self.head.path)
        if not self.replied:
            self(ProxyError(Flag.UPSTREAM_PROTOCOL_ERROR, "internal error", 500))

    def _grpc_deadline(self, request: Request) -> None:
        """The call's grpc-timeout bounds it like a route timeout (the shorter one wins: the
        total timeout takes the earlier deadline), and ends it with DEADLINE_EXCEEDED."""
        value = request.header(b"grpc-timeout")
        timeout = grpc_timeout(value) if value is not None else None
        if timeout is None:
            return
        deadline = self.conn.loop.time() + timeout
        if request.deadline is None or deadline < request.deadline:
            request.deadline = deadline
        self._timer = call_at(deadline, self._deadline_passed)

    def received(self, data: bytes, flow: int) -> None:
        body = self.body
        assert body is not None
        self.last_activity = self.conn.last_activity
        if self.paused:
            self._unacked += flow
        else:
            self._ack(flow)
        if data:
            body.feed(data)

    def _ack(self, size: int) -> None:
        conn = self.conn
        if size and not conn.closed:
            try:
                conn.h2.acknowledge_received_data(size, self.stream_id)
            except h2.exceptions.StreamClosedError:
                return

    def pause_body(self) -> None:
        self.paused = True

    def resume_body(self) -> None:
        self.paused = False
        size, self._unacked = self._unacked, 0
        self._ack(size)
        self.conn._flush()

    def request_ended(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            body.finish()

    def reset_by_client(self) -> None:
        """RST_STREAM from the client, or its connection is gone."""
        body, self.body = self.body, None
        if body is not None:
            body.fail(BodyReset("the client reset the stream"))
        self._gone("the client reset the stream", True)  # nothing is written

    # --- the reply -------------------------------------------------------------------------

    def __call__(self, result: Result) -> None:
        if self.replied or self.done:
            if isinstance(result, Response):
                result.discard()
            return
        self.replied = True
        conn = self.conn
        if conn.closed or self.stream_id not in conn.streams:
            if isinstance(result, Response):
                result.discard()
            self.status, self.flags = 499, Flag.DOWNSTREAM_DISCONNECT.value
            self.finish()
            return
        try:
            if isinstance(result, Response):
                self._respond(result)
            else:
                self._fail(result)
        except h2.exceptions.StreamClosedError:
            if isinstance(result, Response):
                result.discard()
            self.flags = self.flags or Flag.DOWNSTREAM_DISCONNECT.value
            self.finish()
        conn._flush()

    def _fail(self, error: ProxyError) -> None:
        h2conn = self.conn.h2
        if isinstance(error, DownstreamGone):
            self.status, self.flags = 499, Flag.DOWNSTREAM_DISCONNECT.value
            self.finish()
            return
        self.flags = error.flag.value
        if self.grpc:
            self.status = 200
            headers = grpc_error_headers(error)
            self.grpc_status = grpc_status_of(headers)
            h2conn.send_headers(self.stream_id, headers, end_stream=True)
        else:
            status, flag, text = local_response(error)
            self.status = status
            h2conn.send_headers(
                self.stream_id,
                [
                    (b":status", str(status).encode()),
                    (b"content-type", b"text/plain"),
                    (b"content-length", str(len(text)).encode()),
                    (FLAGS_HEADER, flag.value.encode()),
                ],
            )
            self._outbound = text
            self._trailers = None
            self.response = None
            self._send_outbound(end=True)
            return
        self.finish()

    def _respond(self, response: Response) -> None:
        self.response = response
        self.last_activity = self.conn.loop.time()
        self.status = response.status
        if response.flags:
            self.flags = ",".join([f.value for f in response.flags])
        if response.tunnel is not None:
            response.tunnel.abort()  # no Upgrade on HTTP/2 (RFC 9113 §8.6)
            self._fail(ProxyError(Flag.UPSTREAM_PROTOCOL_ERROR, "upgrade answered on HTTP/2"))
            return
        headers = [(b":status", str(response.status).encode())]
        headers += [(n, v) for n, v in response.headers if n not in CONNECTION_SPECIFIC]
        send_body = response.has_body and self.head.method != b"HEAD"
        length = response.content_length
        if length is not None and response.endpoint is not None and not _has(headers):
            headers.append((b"content-length", str(length).encode()))
        h2conn = self.conn.h2
        if not send_body:
            if response.has_body:
                response.discard()
            self.grpc_status = grpc_status_of(headers) if self.grpc else None
            h2conn.send_headers(self.stream_id, headers, end_stream=True)
            self.finish()
            return
        body = response.body
        data = body.whole()
        if data is not None and not data and getattr(body, "trailers", None) is None:
            self.grpc_status = grpc_status_of(headers) if self.grpc else None
            h2conn.send_headers(self.stream_id, headers, end_stream=True)  # gRPC trailers-only
            self.finish()
            return
        h2conn.send_headers(self.stream_id, headers)
        if data is not None:
            self._outbound = data
            self._trailers = getattr(body, "trailers", None)
            self._send_outbound(end=True)
            return
        self.pump()

    def pump(self) -> None:
        """Send what the response body has, within the windows; then wait for more body, or
        for a WINDOW_UPDATE, or for the transport to drain."""
        response, conn = self.response, self.conn
        if self.done or not self.replied:
            return
        if conn.closed:
            self.reset_by_client()
            return
        if response is None:
            self._send_outbound(end=True)  # a local answer's body
            return
        if self._outbound and not self._send_outbound(end=False):
            return  # the rest waits for a window
        body = response.body
        try:
            while True:
                data = body.take()
                if data is None:
                    break
                if not data:
                    self._trailers = getattr(body, "trailers", None)
                    self._send_outbound(end=True)
                    conn._flush()
                    return
                self._outbound += data
                if not self._send_outbound(end=False):
                    conn._flush()
                    return
        except BodyReset:
            # Lost the upstream mid-response: the client is told with a reset, not a clean end.
            self.flags = self.flags or Flag.UPSTREAM_RESET.value
            response.discard()
            self._reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
            return
        conn._flush()
        body.notify(self.pump)
        deadline = self.request.deadline if self.request is not None else None
        if deadline is not None:
            timer = self._timer
            if timer is None or deadline < timer.when:
                if timer is not None:
                    timer.cancel()
                self._timer = call_at(deadline, self._deadline_passed)

    def _send_outbound(self, *, end: bool) -> bool:
        """Send `_outbound` as far as the windows allow; with `end`, then the trailers or
        END_STREAM. True when all of it went."""
        conn = self.conn
        h2conn = conn.h2
        stream_id = self.stream_id
        data = self._outbound
        if data:
            self.last_activity = conn.loop.time()
        while data:
            if conn.write_paused:
                self._outbound = data
                return False
            window = min(
                h2conn.local_flow_control_window(stream_id), h2conn.max_outbound_frame_size
            )
            if window <= 0:
                self._outbound = data
                return False
            h2conn.send_data(stream_id, data[:window])
            data = data[window:]
        self._outbound = b""
        if end:
            trailers = self._trailers
            if trailers:
                self.grpc_status = grpc_status_of(trailers) if self.grpc else None
                h2conn.send_headers(
                    stream_id,
                    [(n, v) for n, v in trailers if n not in CONNECTION_SPECIFIC],
                    end_stream=True,
                )
            else:
                h2conn.end_stream(stream_id)
            conn._flush()
            self.finish()
        return True

    def _deadline_passed(self) -> None:
        """The request's deadline (route timeout or grpc-timeout) passed."""
        self._timer = None
        if not self.done:
            self._cut(UpstreamTimeoutError("the request's deadline passed"))

    def _idle_check(self) -> None:
        """The stream idle timeout may have passed: cut the stream if no byte moved on it
        since, else check again when it could pass next."""
        self._idle = None
        if self.done:
            return
        conn = self.conn
        idle = conn.state.settings.stream_idle_timeout
        if conn.loop.time() - self.last_activity < idle:
            self._idle = call_at(self.last_activity + idle, self._idle_check)
            return
        self._cut(ProxyError(Flag.STREAM_IDLE_TIMEOUT, f"no bytes on the stream for {idle:g}s"))

    def _cut(self, error: ProxyError) -> None:
        """End the stream early with `error`: the answer when nothing was sent yet; mid-response
        a gRPC call ends with the error's grpc-status in the trailers, anything else is reset."""
        if not self.replied:
            request = self.request
            if request is None or not request.interrupt(error, end=True):
                self(error)  # nothing interruptible waited: answer now, drop what comes later
            return
        response = self.response
        if response is not None:
            response.discard()
        self.flags = error.flag.value
        if self.grpc and not self.conn.closed:
            self._outbound = b""
            headers = grpc_error_headers(error)[2:]
            self.grpc_status = grpc_status_of(headers)
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.conn.h2.send_headers(self.stream_id, headers, end_stream=True)
            self.conn._flush()
            self.finish()
            return
        self._reset(h2.errors.ErrorCodes.CANCEL)

    def _reset(self, code: h2.errors.ErrorCodes) -> None:
        conn = self.conn
        if not conn.closed:
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                conn.h2.reset_stream(self.stream_id, code)
            conn._flush()
        self.finish()

    def finish(self) -> None:
        idle = self._idle
        if idle is not None:
            self._idle = None
            idle.cancel()
        super().finish()


def _has(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(name == b"content-length" for name, _ in headers)
