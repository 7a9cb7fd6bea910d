"""The demo apps' httpx client, on plain asyncio sockets instead of anyio's.

The apps call their downstream with one shared `httpx.AsyncClient`, as real apps do. httpx's
default transport reaches the socket through httpcore's anyio backend: per call, cancel scopes,
`sniffio` lookups and anyio's stream wrappers. Measured with `time.process_time` over 3,000
keep-alive GETs on the 2-core demo machine (the issue 14 work): 480-560 CPU-µs per call with the
default backend, 360-400 with this one. Everything above the socket (httpx's models, httpcore's
pool and h11) is unchanged; only the bytes' way in and out is shorter.

httpcore takes a network backend (`AsyncNetworkBackend`) but httpx's transport does not pass one
through, so `client` sets it on the transport's pool after construction: the one private
attribute this module relies on (httpx and httpcore are pinned in requirements.lock, and
tests/outrigger/test_demo_client.py fails if it stops taking effect).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from typing import Any, cast

import httpcore
import httpx
from httpcore import SOCKET_OPTION

# How much unsent data a write leaves in the transport before it waits for the peer.
HIGH_WATER = 64 * 1024


class _Socket(asyncio.Protocol):
    """One connection: bytes in a buffer, and a waiter while a read or a write must wait."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.waiter: asyncio.Future[None] | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.paused = False
        self._wake()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self, timeout: float | None) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout):
                await self.waiter
        finally:
            self.waiter = None


class AsyncioStream(httpcore.AsyncNetworkStream):
    def __init__(self, sock: _Socket) -> None:
        self.sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        sock = self.sock
        while not sock.buffer and not sock.eof:
            try:
                await sock.wait(timeout)
            except TimeoutError as exc:
                raise httpcore.ReadTimeout(str(exc)) from exc
        data = bytes(sock.buffer[:max_bytes])
        del sock.buffer[:max_bytes]
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        sock = self.sock
        if sock.transport is None or sock.transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        sock.transport.write(buffer)
        while sock.paused:
            try:
                await sock.wait(timeout)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(str(exc)) from exc

    async def aclose(self) -> None:
        if self.sock.transport is not None:
            self.sock.transport.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle pooled connection with bytes or EOF is not reused
            return bool(self.sock.buffer) or self.sock.eof
        if self.sock.transport is None:
            return None
        return self.sock.transport.get_extra_info(info)


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, sock = await loop.create_connection(
                    _Socket,
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        raw = cast(socket.socket | None, sock.transport and sock.transport.get_extra_info("socket"))
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                raw.setsockopt(*option)
        return AsyncioStream(sock)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def client(proxy: str | None) -> httpx.AsyncClient:
    """The apps' shared client: keep-alive, through `proxy` (the sidecar) when given."""
    transport = httpx.AsyncHTTPTransport(
        proxy=proxy, limits=httpx.Limits(max_connections=200, max_keepalive_connections=50)
    )
    transport._pool._network_backend = AsyncioBackend()  # see the module's docstring
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(10.0))
