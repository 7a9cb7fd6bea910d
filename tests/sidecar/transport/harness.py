"""The transport's protocols on fake transports: the one place that knows their constructors.

* `downstream(handler)`: a `DownstreamProtocol` whose every request goes to `handler`, with the
  client's side as a `FakeTransport`.
* `Scripted`: a handler whose every call waits until the test answers it.
* `answering(coroutine)`: a handler that runs a coroutine per request and replies with what it
  returns (for tests whose handler must wait, e.g. read the request body).
* `Proxy`: a `DownstreamProtocol` in front of a real `Upstreams` (the forwarder and its pools),
  whose connections are opened by a `FakeConnector`: the test plays the client and the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sidecar.config import Endpoint, ServiceConfig
from sidecar.exchange import Handler, Reply, Request, RequestBodyFailed, Response, Result
from sidecar.flags import ProxyError
from sidecar.protocol.events import RequestHead
from sidecar.transport.body import BodyReset, BytesBody
from sidecar.transport.server import (
    Completed,
    Decision,
    DownstreamProtocol,
    ServerSettings,
    ServerState,
)
from sidecar.transport.upstream import Upstreams
from tests.sidecar.transport.fake import FakeConnector, FakeTransport, until

ENDPOINT = Endpoint("10.0.0.7", 8080)


def downstream(
    handler: Handler,
    settings: ServerSettings | None = None,
    *,
    can_write_eof: bool = True,
    completed: Completed | None = None,
    service: ServiceConfig | None = None,
) -> tuple[DownstreamProtocol, FakeTransport]:
    state = ServerState(settings or ServerSettings())

    def dispatch(head: RequestHead) -> Decision:
        return Decision(handler, service, "test")

    protocol = DownstreamProtocol(state, dispatch, completed, request_ids=False)
    return protocol, FakeTransport(protocol, can_write_eof=can_write_eof).connect()


def ok(body: bytes = b"", status: int = 200, reason: bytes = b"OK") -> Response:
    return Response(status, reason, [], BytesBody(body), content_length=len(body))


def answering(respond: Callable[[Request], Awaitable[Response]]) -> Handler:
    """A handler that runs `respond(request)` in a task and replies with its response, or the
    ProxyError it raises (a request body that failed under it: RequestBodyFailed, as the
    forwarder replies)."""
    tasks: set[asyncio.Future[None]] = set()  # held until done (the loop keeps weak references)

    def handler(request: Request, reply: Reply) -> None:
        async def run() -> None:
            result: Result
            try:
                result = await respond(request)
            except ProxyError as error:
                result = error
            except BodyReset as exc:
                result = RequestBodyFailed(str(exc))
            reply(result)

        task = asyncio.ensure_future(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return handler


class Scripted:
    """A handler that records each request and replies with what the test passes to `answer`.

    Like the forwarder it can be interrupted while it waits (the client gone): it then replies
    with the interrupting error, and `interrupted` says which requests were."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.interrupted: list[int] = []
        self._replies: list[Reply] = []

    def __call__(self, request: Request, reply: Reply) -> None:
        index = len(self.requests)
        self.requests.append(request)
        self._replies.append(reply)

        def interrupt(error: ProxyError) -> None:
            self.interrupted.append(index)
            reply(error)

        request.on_interrupt = interrupt

    async def request(self, index: int) -> Request:
        """The index-th request (0 is the first), once the handler has been called with it."""
        await until(lambda: len(self.requests) > index)
        return self.requests[index]

    def answer(self, index: int, response: Response) -> None:
        self.requests[index].on_interrupt = None
        self._replies[index](response)


@dataclass
class Proxy:
    protocol: DownstreamProtocol
    client: FakeTransport
    upstreams: Upstreams
    connector: FakeConnector
    outcomes: list[tuple[int, str]]  # (status, flags) of each finished request cycle, in order
    forward: Handler  # every request to ENDPOINT through the pools

    async def upstream(self, index: int = 0) -> FakeTransport:
        """The index-th upstream connection, once a whole request head was written on it."""
        conn = await self.connector.connection(index)
        await until(lambda: b"\r\n\r\n" in conn.written)
        return conn

    def another_client(self) -> FakeTransport:
        """A second client connection to the same sidecar (it shares the upstream pools)."""
        return downstream(self.forward)[1]


def proxy(
    settings: ServerSettings | None = None,
    *,
    can_write_eof: bool = True,
    service: ServiceConfig | None = None,
) -> Proxy:
    """`service`: the route's service for every request (its policy is not applied here, only
    what the pools read from it)."""
    connector = FakeConnector()
    upstreams = Upstreams(clock=asyncio.get_running_loop().time, connect=connector)

    def forward(request: Request, reply: Reply) -> None:
        upstreams.forward(request, ENDPOINT, reply)

    outcomes: list[tuple[int, str]] = []
    protocol, client = downstream(
        forward,
        settings,
        can_write_eof=can_write_eof,
        completed=lambda head, decision, status, flags, start, request, *_: outcomes.append(
            (status, flags)
        ),
        service=service,
    )
    return Proxy(protocol, client, upstreams, connector, outcomes, forward)
