"""The demo apps' httpx client: an `httpx.AsyncClient` on a small HTTP/1.1 transport.

The apps call their downstream with one shared `httpx.AsyncClient` and ordinary
`await client.get(...)` calls, as real apps do. What is theirs is below httpx's models, through
httpx's documented extension points:

- the transport (`httpx.AsyncBaseTransport`): keep-alive HTTP/1.1 over an asyncio Protocol,
  responses parsed by httptools (llhttp, the parser the apps' server already uses), instead of
  httpx's default: httpcore's connection pool, h11 and anyio. Measured on orders' client calling
  payments in a tight loop (3,000 keep-alive GETs, cProfile on process time, 2026-12-05): 1,749
  Python calls per call, of which httpx 23% of the time, httpcore 17%, h11 16%, anyio 7% (the
  pool's locks and shielded cancel scopes, taken per request even on asyncio), the cookie shims
  4%, the rest builtins and asyncio. An earlier step had only swapped httpcore's network backend
  for an asyncio Protocol (480-560 CPU-µs per call to 360-400); this transport took it to 635
  Python calls and 150-220 CPU-µs.
- the cookies: `Client`, an `httpx.AsyncClient` whose `cookies` keep nothing (a `NoCookies`
  jar, and httpx's `Cookies` over it without the per-response shims). httpx hands every
  response to `http.cookiejar` behind urllib Request and Response shims even when no cookie is
  set (the shims parse the URL again: 12% of the call once the transport was ours); a
  service-to-service client has no session to keep. 635 to 524 Python calls, ~150 CPU-µs.
- the URL: the app passes an `httpx.URL` (outrigger/demo/service.py), which httpx takes as it
  is; a string is parsed on every call. 388 Python calls, 70-150 CPU-µs; callgrind: 1.83 M
  instructions per call before all this, 0.42 M after.

What the transport does not do: TLS (`https://`) and CONNECT through a proxy, HTTP/2, reusing a
connection after a HEAD (it is closed instead), `Expect: 100-continue` (1xx answers are skipped).
It raises `httpx.UnsupportedProtocol` for a URL it cannot serve, and httpx's own timeout and
transport errors (`ConnectError`, `ReadTimeout`, `RemoteProtocolError`, ...) as httpx's
transport does; tests/outrigger/test_demo_client.py checks these through real sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.cookiejar
import socket
from collections import deque
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx

# How much unsent data a write leaves in the transport before it waits for the peer.
HIGH_WATER = 64 * 1024
MAX_CONNECTIONS = 200  # open at once, per client (httpx.Limits' meaning)
MAX_IDLE = 50  # kept alive between requests, per origin


class NoCookies(http.cookiejar.CookieJar):
    """A cookie jar that keeps nothing: responses' Set-Cookie are not parsed, requests get no
    Cookie header from the client (a request's own `Cookie` header still goes out)."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None

    def add_cookie_header(self, request: Any) -> None:
        return None

    def set_cookie(self, cookie: http.cookiejar.Cookie) -> None:
        return None


class _Connection(asyncio.Protocol):
    """One kept-alive connection: httptools parses its responses into the current exchange's
    state; a reader waits on `waiter` until there is something for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.closed = False  # EOF, an error or closed by us: never reused
        self.error: str | None = None
        self.begin()

    def begin(self) -> None:
        """Forget the previous exchange (before a request is written)."""
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.informational = False
        self.head_done = False
        self.body: list[bytes] = []
        self.complete = False
        self.keep_alive = False
        self.framed = False  # content-length or chunked: the body does not end at EOF

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = f"the server's response is not valid HTTP/1.1: {exc}"
            self.close()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.paused = False
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    # httptools callbacks
    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints: skipped
            self.informational = True
            self.reason = b""
            self.headers = []
            self.framed = False
        else:
            self.head_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        else:
            self.complete = True
            self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it after this

    # for the transport
    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(
        self,
        timeout: float | None,
        request: httpx.Request,
        error: type[httpx.TimeoutException],
        what: str,
    ) -> None:
        """Until data, EOF or writability; after `timeout` seconds the connection is closed and
        `error` (httpx's ReadTimeout or WriteTimeout) raised: "`what` for `timeout`s"."""
        waiter = self.waiter = self.loop.create_future()
        timer = None if timeout is None else self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        except TimeoutError:
            self.close()
            raise error(f"{what} for {timeout}s", request=request) from None
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def reusable(self) -> bool:
        """Idle and fit for another request: nothing unread, not closed by either side."""
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@dataclasses.dataclass(eq=False)
class _ResponseBody(httpx.AsyncByteStream):
    """The body as it arrives; closing it returns the connection to the pool if the response
    was read whole and the server keeps the connection alive, else closes it."""

    transport: Transport
    origin: tuple[str, int]
    conn: _Connection
    request: httpx.Request
    read_timeout: float | None
    released: bool = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self.conn
        if self.request.method == "HEAD":  # no body, whatever the headers say
            return
        while True:
            if conn.body:
                chunks, conn.body = conn.body, []
                for chunk in chunks:
                    yield chunk
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise httpx.RemoteProtocolError(conn.error, request=self.request)
            if conn.closed:
                if not conn.framed:  # the body is what came before EOF
                    conn.complete = True
                    return
                raise httpx.RemoteProtocolError(
                    "the server closed the connection before the end of the body",
                    request=self.request,
                )
            await conn.wait(self.read_timeout, self.request, httpx.ReadTimeout, "no data")

    async def aclose(self) -> None:
        if self.released:
            return
        self.released = True
        conn = self.conn
        keep = conn.keep_alive and not conn.body and self.request.method != "HEAD"
        self.transport.release(self.origin, conn, keep)


class Transport(httpx.AsyncBaseTransport):
    """Keep-alive HTTP/1.1 to `http://` origins, directly or through an HTTP proxy (the request
    line then carries the absolute URL, as to the sidecar's outbound listener)."""

    def __init__(self, proxy: str | None = None) -> None:
        self.proxy: tuple[str, int] | None = None
        if proxy is not None:
            url = httpx.URL(proxy)
            if url.scheme != "http":
                raise ValueError(f"the demo client reaches a proxy over http:// only, got {proxy}")
            self.proxy = (url.host, url.port or 80)
        self.idle: dict[tuple[str, int], list[_Connection]] = {}
        self.open = 0
        self.queue: deque[asyncio.Future[None]] = deque()  # requests waiting for a connection

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme != "http":
            raise httpx.UnsupportedProtocol(
                f"the demo client speaks plain http:// only, not {url.scheme}:// ({url})",
                request=request,
            )
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        if self.proxy is None:
            origin = (url.host, url.port or 80)
            target = url.raw_path
        else:
            origin = self.proxy
            target = str(url).encode("ascii")
        head = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        data = b"".join(head)
        if data.count(b"\n") != len(request.headers.raw) + 2 or data.count(b"\r") != data.count(
            b"\n"
        ):
            raise httpx.LocalProtocolError(
                "a request header name or value contains CR or LF", request=request
            )
        try:
            body = request.content
        except httpx.RequestNotRead:  # a streamed body: sent as it is framed in the headers
            chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"
            parts = [data]
            async for chunk in request.stream:  # type: ignore[union-attr]
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n") if chunked else (chunk,)
            if chunked:
                parts.append(b"0\r\n\r\n")
            body = b"".join(parts)
            data = b""
        conn = await self._connection(origin, request, timeouts)
        try:
            await self._send(conn, data + body if body else data, request, timeouts.get("write"))
            read_timeout = timeouts.get("read")
            while not conn.head_done:
                if conn.error is not None:
                    raise httpx.RemoteProtocolError(conn.error, request=request)
                if conn.closed:
                    raise httpx.RemoteProtocolError(
                        "the server closed the connection without a response", request=request
                    )
                await conn.wait(read_timeout, request, httpx.ReadTimeout, "no response")
        except BaseException:
            conn.close()
            self.release(origin, conn, False)
            raise
        return httpx.Response(
            conn.parser.get_status_code(),
            headers=conn.headers,
            stream=_ResponseBody(self, origin, conn, request, read_timeout),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": conn.reason},
        )

    async def _send(
        self, conn: _Connection, data: bytes, request: httpx.Request, timeout: float | None
    ) -> None:
        conn.begin()
        if conn.transport is None or not conn.reusable():
            raise httpx.WriteError("the connection is closed", request=request)
        conn.transport.write(data)
        while conn.paused and not conn.closed:
            await conn.wait(timeout, request, httpx.WriteTimeout, "the server took no data")

    async def _connection(
        self, origin: tuple[str, int], request: httpx.Request, timeouts: dict[str, float | None]
    ) -> _Connection:
        """An idle connection to `origin`, else a new one (waiting while MAX_CONNECTIONS are
        open, at most the pool timeout)."""
        idle = self.idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
            self.open -= 1
        while self.open >= MAX_CONNECTIONS:
            waiter = asyncio.get_running_loop().create_future()
            self.queue.append(waiter)
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await waiter
            except TimeoutError:
                raise httpx.PoolTimeout(
                    f"all {MAX_CONNECTIONS} connections stayed busy", request=request
                ) from None
            finally:
                if waiter in self.queue:
                    self.queue.remove(waiter)
        self.open += 1
        try:
            return await self._connect(origin, request, timeouts.get("connect"))
        except BaseException:
            self.open -= 1
            self._next_waiter()
            raise

    async def _connect(
        self, origin: tuple[str, int], request: httpx.Request, timeout: float | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = origin
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(lambda: _Connection(loop), host, port)
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"connecting to {host}:{port} took over {timeout}s", request=request
            ) from None
        except OSError as exc:
            raise httpx.ConnectError(f"{host}:{port}: {exc}", request=request) from exc
        raw = conn.transport.get_extra_info("socket") if conn.transport is not None else None
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def release(self, origin: tuple[str, int], conn: _Connection, keep: bool) -> None:
        """The exchange on `conn` is over: back to the idle list, or closed."""
        idle = self.idle.setdefault(origin, [])
        if keep and conn.reusable() and len(idle) < MAX_IDLE:
            idle.append(conn)
        else:
            conn.close()
            self.open -= 1
        self._next_waiter()

    def _next_waiter(self) -> None:
        while self.queue:
            waiter = self.queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def aclose(self) -> None:
        for idle in self.idle.values():
            for conn in idle:
                conn.close()
            self.open -= len(idle)
            idle.clear()


class _Cookies(httpx.Cookies):
    """httpx's cookies over a `NoCookies` jar, without the urllib shims httpx builds for
    every response before it asks the jar (they were most of the cost the jar alone left)."""

    def extract_cookies(self, response: httpx.Response) -> None:
        return None


class Client(httpx.AsyncClient):
    """An `httpx.AsyncClient` that keeps no cookies: `cookies` is always empty and cannot be
    replaced; everything else is httpx's."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs, cookies=NoCookies())
        self._no_cookies = _Cookies(self._cookies.jar)

    @property
    def cookies(self) -> httpx.Cookies:
        return self._no_cookies

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        raise AttributeError("the demo client keeps no cookies; send a Cookie header instead")


def client(proxy: str | None) -> Client:
    """The apps' shared client: keep-alive, through `proxy` (the sidecar) when given."""
    return Client(transport=Transport(proxy), timeout=httpx.Timeout(10.0))
