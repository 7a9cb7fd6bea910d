"""The demo apps' httpx client on plain asyncio sockets: it keeps connections alive, does not
reuse one the server has closed, reports connect and read failures as httpx errors, and works
through a proxy (the sidecar)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from outrigger.demo.client import AsyncioStream, client
from tests.sidecar.proxy_fixtures import Received, ok, serve, upstream


def streams(http: httpx.AsyncClient) -> list[object]:
    """The network streams of the client's pooled connections (httpcore's pool internals)."""
    pool = http._transport._pool  # type: ignore[attr-defined]
    return [conn._connection._network_stream for conn in pool.connections]


async def test_requests_share_one_kept_alive_connection_on_the_asyncio_backend() -> None:
    async with upstream(serve(lambda req: ok(b"hello " + req.target))) as up, client(None) as http:
        bodies = [(await http.get(f"http://{up.address}/{i}")).text for i in range(5)]
        assert bodies == [f"hello /{i}" for i in range(5)]
        assert up.connections == 1
        # The backend took effect: the connection is ours, not anyio's.
        assert [type(s) for s in streams(http)] == [AsyncioStream]


async def test_a_connection_the_server_closed_is_not_reused() -> None:
    def once_then_close(req: Received) -> bytes:
        return ok(b"bye", extra=b"connection: close\r\n") if req.target == b"/last" else ok()

    async with upstream(serve(once_then_close)) as up, client(None) as http:
        assert (await http.get(f"http://{up.address}/last")).text == "bye"
        await asyncio.sleep(0.05)
        assert (await http.get(f"http://{up.address}/again")).text == "ok"
        assert up.connections == 2


async def test_a_large_body_arrives_whole() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB, many reads
    async with upstream(serve(lambda req: ok(body))) as up, client(None) as http:
        assert (await http.get(f"http://{up.address}/")).content == body


async def test_a_refused_connection_is_an_httpx_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with client(None) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/")


async def test_a_silent_server_is_an_httpx_read_timeout() -> None:
    async def silent(req: Received) -> bytes:
        await asyncio.sleep(5)
        return ok()

    async with upstream(serve(silent)) as up, client(None) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"http://{up.address}/", timeout=0.2)


async def test_through_a_proxy_the_request_goes_to_the_proxy_with_the_absolute_url() -> None:
    async with (
        upstream(serve(lambda req: ok(b"via proxy"))) as proxy,
        client(f"http://{proxy.address}") as http,
    ):
        reply = await http.get("http://payments/charge")
        assert reply.text == "via proxy"
    assert [r.target for r in proxy.requests] == [b"http://payments/charge"]
    assert proxy.requests[0].header(b"host") == b"payments"
