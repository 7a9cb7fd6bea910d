"""One request cycle as the policy layers see it, and how they call each other.

The server builds a `Request` from the parsed head and hands it to the route's handler with a
`Reply`: the handler calls `reply` exactly once, with a `Response` whose head is known and whose
body has not been read yet, or with the `ProxyError` that ends the attempt. Layers are plain
callbacks, like Envoy's filter chain: a layer acts on the request on the way down (calls the
layer below with its own reply, or replies at once), and on the result on the way back (its reply
runs, then calls the reply it was given). Nothing reaches the client until the outermost reply
runs, so a layer may drop a response (`Response.discard`) and try again: a retry can never
follow bytes already sent to the client.

No task, coroutine or future per request on the common path: a request that waits only for the
network runs from the downstream protocol's `data_received`, down the layers to a pooled
upstream connection's write, and back from that connection's `data_received` up to the client's
write. A layer starts a task only when it must wait for something else (a retry's backoff, a new
upstream connection, a request body that streams).

Interruption: while a request waits, whoever holds the wait (the forwarder's exchange, a
connect, a backoff) sets `Request.on_interrupt`; `Request.interrupt(error)` stops that wait and
its holder replies with `error`, which then travels up through every layer like any other result
(the breaker records a timeout, the balancer releases its counts). The timeouts interrupt with
their own error; the server interrupts with `DownstreamGone` when the client leaves. Those two
`end` the request (`Request.ended`): no layer starts another attempt for it.

Layers above the balancer are `Handler`s; the balancer picks an endpoint and calls the
`EndpointHandler`s below it (breaker, the forwarder).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Protocol

from sidecar.config import Endpoint, ServiceConfig
from sidecar.flags import Flag, ProxyError


class DownstreamGone(ProxyError):
    """The client went away (or its request body failed) before the response head: 499 DC.

    What the server interrupts a request with when its client is gone; the layers see a local
    outcome (no verdict for a breaker, nothing to retry)."""

    def __init__(self, detail: str) -> None:
        super().__init__(Flag.DOWNSTREAM_DISCONNECT, detail)


class RequestBodyFailed(ProxyError):
    """The client's request body did not arrive whole (cut short, refused or timed out), so the
    exchange with the upstream was aborted: not the upstream's fault (a local outcome: no
    verdict for a breaker, no retry). The server answers with the reason it cut the body, or
    499 DC when the client left."""

    def __init__(self, detail: str) -> None:
        super().__init__(Flag.DOWNSTREAM_PROTOCOL_ERROR, detail)


class BodyNotReplayable(Exception):
    """A streamed request body was asked for a second time (it is not buffered for retries)."""


class RequestBody(Protocol):
    """The request body, read once per attempt.

    `replayable` is True when the whole body is buffered (absent, or no larger than the retry
    buffer limit); then every call to `chunks()` yields the same bytes. A streamed body yields
    once; a second `chunks()` raises BodyNotReplayable.
    """

    @property
    def replayable(self) -> bool: ...

    @property
    def length(self) -> int | None:
        """Content-Length when known (0 for no body), None when chunked and not buffered."""
        ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def whole(self) -> bytes | None:
        """The whole body if it has all arrived and may be read now (counted as one read, as
        `chunks()` is); None when it is still arriving or was streamed away already. Lets the
        forwarder write head and body at once, without a task to pump them."""
        ...


class ResponseBody(Protocol):
    """The upstream response body, read once by the server.

    The server reads it with `take()` and, when nothing has arrived yet, asks to be called back
    (`notify`): no coroutine per response. `read()` is the same for a coroutine.
    """

    def take(self) -> bytes | None:
        """The bytes received since the last take; b"" once the body ended; None when nothing
        new has arrived (then `notify` says when something does).

        Raises BodyReset when the body cannot be completed (the upstream went away)."""
        ...

    def notify(self, callback: Callable[[], None]) -> None:
        """Call `callback` once, as soon as `take()` has something new (data, the end or a
        failure); at once if it has now."""
        ...

    def whole(self) -> bytes | None:
        """Every byte of the body, when it has all arrived and none was taken yet; None
        otherwise. The server's shortcut for a response that came whole."""
        ...

    async def read(self) -> bytes:
        """The bytes received since the last read (waiting for some); b"" once the body ended.

        Raises BodyReset when the body cannot be completed (the upstream went away)."""
        ...

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the body has been received whole, failed or been
        discarded (at once if that already happened)."""
        ...

    def discard(self) -> None:
        """Drop the response unread: its upstream connection is closed, never reused."""
        ...


TunnelData = Callable[[bytes], None]  # the bytes a tunnel's upstream sent; b"" at its end
Flow = Callable[[], None]  # pause or resume reading from the other side


class Tunnel(Protocol):
    """An upstream connection that answered 101 and now carries raw bytes both ways."""

    @property
    def closed(self) -> bool:
        """The connection is gone: nothing more can be written to it."""
        ...

    def write(self, data: bytes) -> None: ...

    def write_eof(self) -> None:
        """The client is done sending (a half-close); the upstream may still answer."""
        ...

    def close(self) -> None:
        """Both ways are done: close once what was written has been sent."""
        ...

    def set_receiver(self, receive: TunnelData, pause_peer: Flow, resume_peer: Flow) -> None:
        """`receive(data)` gets every byte from upstream; b"" means the upstream sent its EOF
        or is gone (then `closed` is True).

        `pause_peer`/`resume_peer` are called when the upstream stops/starts taking our writes,
        so the client side stops reading meanwhile (flow control through the tunnel).
        """
        ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def abort(self) -> None: ...


class Request:
    __slots__ = (
        "attempts",
        "authority",
        "body",
        "deadline",
        "destination",
        "ended",
        "flags",
        "headers",
        "method",
        "on_interrupt",
        "path",
        "service",
        "timeouts",
        "trace",
        "tried",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        method: bytes,
        path: bytes,
        authority: bytes,
        headers: list[tuple[bytes, bytes]],
        body: RequestBody,
        version: bytes = b"1.1",
        upgrade: bytes | None = None,
        service: ServiceConfig | None = None,
        destination: Endpoint | None = None,
    ) -> None:
        self.method = method  # upper-case token
        self.path = path  # origin-form target
        self.authority = authority  # lower-case host[:port]; decides the route
        self.headers = headers  # lower-case names, hop-by-hop already removed
        self.body = body
        self.version = version  # downstream's version, b"1.1" or b"1.0"
        self.upgrade = upgrade  # protocol named by Upgrade when Connection: upgrade
        self.service = service  # the route's service, None for passthrough
        # Where the client's connection was going before interception redirected it
        # (SO_ORIGINAL_DST); None when it was made to the sidecar directly.
        self.destination = destination
        self.deadline: float | None = None  # loop time the whole exchange must finish by
        self.attempts = 0  # attempts started so far
        self.tried: list[Endpoint] = []  # endpoints already tried, in order
        self.flags: list[Flag] = []  # flags recorded along the way (e.g. a retried UF)
        # Stops what the request waits for now; set by whoever holds that wait (see the module
        # docstring), cleared when the wait ends.
        self.on_interrupt: Callable[[ProxyError], None] | None = None
        self.ended = False  # the total timeout fired or the client left: no further attempt
        # A sampled request's trace record (sidecar.telemetry.tracing's, opaque to the rest).
        self.trace: object | None = None

    # `timeouts`: the per-request state of a timeout layer that owns both the request's and
    # each attempt's deadline (sidecar/policy/timeout.py `Timeouts`), set by it and read only
    # by it, and cleared when it answers; unset on requests no such layer saw (no store per
    # request for the others).
    timeouts: object | None  # opaque here, as `trace` is

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def interrupt(self, error: ProxyError, *, end: bool = False) -> bool:
        """Stop what the request waits for now; its holder replies with `error`. `end`: the
        request is over (no further attempt). False when nothing was waiting."""
        if end:
            self.ended = True
        hook = self.on_interrupt
        if hook is None:
            return False
        self.on_interrupt = None
        hook(error)
        return True


class Response:
    __slots__ = (
        "body",
        "content_length",
        "endpoint",
        "flags",
        "has_body",
        "headers",
        "reason",
        "status",
        "tunnel",
    )

    def __init__(
        self,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        body: ResponseBody,
        endpoint: Endpoint | None = None,
        content_length: int | None = None,
        has_body: bool = True,
        tunnel: Tunnel | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers  # lower-case names, hop-by-hop already removed
        self.body = body
        self.endpoint = endpoint  # which endpoint answered
        self.content_length = content_length  # None: chunked or close-delimited
        self.has_body = has_body  # False for HEAD, 204, 304 (content_length may still be set)
        self.tunnel = tunnel  # set on a 101: the upstream side of an Upgrade tunnel
        self.flags: list[Flag] = []

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def discard(self) -> None:
        self.body.discard()


Result = Response | ProxyError
Reply = Callable[[Result], None]  # called exactly once per call of a handler
Handler = Callable[[Request, Reply], None]
EndpointHandler = Callable[[Request, Endpoint, Reply], None]
