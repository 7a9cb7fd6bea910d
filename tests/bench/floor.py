"""The Python floor: the least a uvloop + httptools forwarder can do, as a bench reference row.

Not a proxy anyone should run. It forwards wrk's keep-alive GETs to one upstream over pooled
connections and copies the response back, and does nothing else: no validation beyond what
llhttp does while parsing, no routing, no hop-by-hop handling, no request ids, no metrics, no
timeouts, no error answers. Its row says how fast any Python data plane on this event loop and
parser can be on the same machine in the same run, so the Outrigger rows can be read against it
as well as against nginx.

`--task` runs each request in an asyncio task that awaits the upstream's response on a future:
the least machinery a data plane whose policies (timeouts, retries) are awaitable layers uses.

`--wake SECONDS` adds a timer that wakes the loop that often and does nothing else. Only for
running under callgrind (`cost.py --callgrind`): valgrind serves `callgrind_control`'s zero and
dump requests only while the process runs, and an idle floor sleeps in epoll_wait for good. The
timer's few instructions are in cost.py's idle window, which is subtracted.

    python tests/bench/floor.py LISTEN_PORT UPSTREAM_PORT [--task] [--wake SECONDS]
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Coroutine

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """One pooled upstream connection; hands each whole response to `deliver`."""

    def __init__(self, pool: deque[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.headers: list[bytes] = []
        self.body: list[bytes] = []
        self.deliver: asyncio.Future[bytes] | Downstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers = [b""]  # the status line, once llhttp has parsed it
        self.body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(name + b": " + value + b"\r\n")

    def on_headers_complete(self) -> None:
        self.headers[0] = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()
        self.headers.append(b"\r\n")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        response = b"".join(self.headers) + b"".join(self.body)
        deliver, self.deliver = self.deliver, None
        self.pool.append(self)
        if isinstance(deliver, Downstream):
            deliver.send(response)
        elif deliver is not None:
            deliver.set_result(response)


class Downstream(asyncio.Protocol):
    """One client connection: each request head is rebuilt and sent on a pooled connection."""

    def __init__(self, upstream: tuple[str, int], pool: deque[Upstream], task: bool) -> None:
        self.upstream = upstream
        self.pool = pool
        self.task = task
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b"/"
        self.head: list[bytes] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None  # a response that comes back later is dropped

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_begin(self) -> None:
        self.head = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head.append(name + b": " + value + b"\r\n")

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        request = method + b" " + self.url + b" HTTP/1.1\r\n" + b"".join(self.head) + b"\r\n"
        if self.task:
            self.spawn(self.exchange(request))
        elif self.pool:
            self.forward(self.pool.pop(), request, self)
        else:
            self.spawn(self.connect_and_send(request))

    def spawn(self, work: Coroutine[None, None, None]) -> None:
        """Run `work` in a task we hold on to (the loop keeps only weak references)."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def send(self, response: bytes) -> None:
        if self.transport is not None:
            self.transport.write(response)

    async def connection(self) -> Upstream:
        if self.pool:
            return self.pool.pop()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: Upstream(self.pool), *self.upstream)
        return conn

    @staticmethod
    def forward(
        conn: Upstream, request: bytes, deliver: asyncio.Future[bytes] | Downstream
    ) -> None:
        conn.deliver = deliver
        assert conn.transport is not None
        conn.transport.write(request)

    async def connect_and_send(self, request: bytes) -> None:
        self.forward(await self.connection(), request, self)

    async def exchange(self, request: bytes) -> None:
        conn = await self.connection()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.forward(conn, request, future)
        self.send(await future)


def wake_every(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    loop.call_later(seconds, wake_every, loop, seconds)


async def serve(listen: int, upstream: int, task: bool, wake: float | None) -> None:
    loop = asyncio.get_running_loop()
    if wake is not None:
        wake_every(loop, wake)
    pool: deque[Upstream] = deque()
    server = await loop.create_server(
        lambda: Downstream(("127.0.0.1", upstream), pool, task), "127.0.0.1", listen, backlog=4096
    )
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> None:
    listen, upstream = int(argv[0]), int(argv[1])
    options = argv[2:]
    wake = float(options[options.index("--wake") + 1]) if "--wake" in options else None
    uvloop.run(serve(listen, upstream, task="--task" in options, wake=wake))


if __name__ == "__main__":
    main(sys.argv[1:])
