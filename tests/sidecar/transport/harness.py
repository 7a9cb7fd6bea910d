"""The transport's protocols on fake transports: the one place that knows their constructors.

* `downstream(handler)`: a `DownstreamProtocol` whose every request goes to `handler`, with the
  client's side as a `FakeTransport`.
* `Scripted`: a handler whose every call waits until the test answers it.
* `Proxy`: a `DownstreamProtocol` in front of a real `Upstreams` (the forwarder and its pools),
  whose connections are opened by a `FakeConnector`: the test plays the client and the upstream.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sidecar.config import Endpoint, ServiceConfig
from sidecar.exchange import Handler, Request, Response
from sidecar.protocol.events import RequestHead
from sidecar.transport.body import BytesBody
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


class Scripted:
    """A handler that records each request and returns what the test passes to `answer`."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._answers: list[asyncio.Future[Response]] = []

    async def __call__(self, request: Request) -> Response:
        answer = asyncio.get_running_loop().create_future()
        self.requests.append(request)
        self._answers.append(answer)
        return await answer

    async def request(self, index: int) -> Request:
        """The index-th request (0 is the first), once the handler has been called with it."""
        await until(lambda: len(self.requests) > index)
        return self.requests[index]

    def answer(self, index: int, response: Response) -> None:
        self._answers[index].set_result(response)


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

    async def forward(request: Request) -> Response:
        return await upstreams.forward(request, ENDPOINT)

    outcomes: list[tuple[int, str]] = []
    protocol, client = downstream(
        forward,
        settings,
        can_write_eof=can_write_eof,
        completed=lambda head, decision, status, flags, start, request: outcomes.append(
            (status, flags)
        ),
        service=service,
    )
    return Proxy(protocol, client, upstreams, connector, outcomes, forward)
