"""One request cycle as the policy layers see it.

The server builds a `Request` from the parsed head; layers call each other with it and return a
`Response` whose head is known and whose body has not been read yet. Nothing reaches the client
until the outermost layer returns, so a layer may drop a response (`Response.discard`) and try
again: a retry can never follow bytes already sent to the client.

Layers above the balancer are `Handler`s; the balancer picks an endpoint and calls the
`EndpointHandler`s below it (breaker, concurrency, the forwarder).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from sidecar.config import Endpoint, ServiceConfig
from sidecar.flags import Flag


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


class ResponseBody(Protocol):
    """The upstream response body, read once by the server.

    `read()` is a plain coroutine, not an async generator: a body that arrived with its head
    (most responses) is read without suspending, and without the per-generator bookkeeping
    asyncio does for async generators (a WeakSet entry and its removal: measured at about a
    tenth of the sidecar's instructions per request when every body went through two of them).
    """

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

    def set_receiver(
        self,
        receive: Callable[[bytes], None],
        pause_peer: Callable[[], None],
        resume_peer: Callable[[], None],
    ) -> None:
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
        "flags",
        "headers",
        "method",
        "path",
        "service",
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
        *,
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

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


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
        *,
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


Handler = Callable[[Request], Awaitable[Response]]
EndpointHandler = Callable[[Request, Endpoint], Awaitable[Response]]
