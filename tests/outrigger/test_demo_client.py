"""The demo apps' httpx client (its own HTTP/1.1 transport, a cookie jar that keeps nothing),
against real sockets: it keeps connections alive, does not reuse one the server has closed,
frames bodies both ways, reports connect, read and protocol failures as httpx errors, and works
through a proxy (the sidecar)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from outrigger.demo.client import client
from tests.sidecar.proxy_fixtures import Received, UpstreamConn, ok, serve, upstream


async def test_requests_share_one_kept_alive_connection() -> None:
    async with upstream(serve(lambda req: ok(b"hello " + req.target))) as up, client(None) as http:
        replies = [await http.get(f"http://{up.address}/{i}?q={i}") for i in range(5)]
        assert [r.text for r in replies] == [f"hello /{i}?q={i}" for i in range(5)]
        assert up.connections == 1
    assert {(r.status_code, r.reason_phrase, r.http_version) for r in replies} == {
        (200, "OK", "HTTP/1.1")
    }
    assert up.requests[0].header(b"host") == up.address.encode()


async def test_concurrent_requests_each_get_their_own_answer_and_connections_are_reused() -> None:
    async def slow(req: Received) -> bytes:
        await asyncio.sleep(0.02)
        return ok(req.target)

    async with upstream(serve(slow)) as up, client(None) as http:
        for _ in range(2):
            replies = await asyncio.gather(
                *(http.get(f"http://{up.address}/{i}") for i in range(8))
            )
            assert [r.text for r in replies] == [f"/{i}" for i in range(8)]
        assert up.connections == 8  # the second round reused the first round's connections


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


async def test_chunked_and_close_delimited_bodies_arrive_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )

    async def until_close(conn: UpstreamConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")

    async with upstream(serve(lambda req: chunked)) as up, client(None) as http:
        assert [(await http.get(f"http://{up.address}/")).text for _ in range(2)] == [
            "hello world"
        ] * 2
        assert up.connections == 1
    async with upstream(until_close) as up, client(None) as http:
        assert (await http.get(f"http://{up.address}/")).text == "until the end"


async def test_a_request_body_goes_out_framed_by_its_length_or_in_chunks() -> None:
    async def parts() -> object:
        yield b"ab"
        yield b"cd"

    async with upstream(serve(lambda req: ok(req.body))) as up, client(None) as http:
        assert (await http.post(f"http://{up.address}/", content=b"payload")).text == "payload"
        assert (await http.post(f"http://{up.address}/", content=parts())).text == "abcd"
    assert up.requests[0].header(b"content-length") == b"7"
    assert up.requests[1].chunked


async def test_a_head_answer_has_no_body_and_1xx_answers_are_skipped() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    early = b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + ok(b"final")
    async with upstream(serve(lambda req: head)) as up, client(None) as http:
        reply = await asyncio.wait_for(http.head(f"http://{up.address}/"), 2)
        assert (reply.status_code, reply.content, reply.headers["content-length"]) == (
            200,
            b"",
            "5",
        )
    async with upstream(serve(lambda req: early)) as up, client(None) as http:
        reply = await http.get(f"http://{up.address}/")
        assert (reply.status_code, reply.text, "link" in reply.headers) == (200, "final", False)


async def test_the_client_keeps_no_cookies() -> None:
    def set_cookie(req: Received) -> bytes:
        return ok(extra=b"set-cookie: session=abc; Path=/\r\n")

    async with upstream(serve(set_cookie)) as up, client(None) as http:
        reply = await http.get(f"http://{up.address}/")
        assert reply.headers["set-cookie"] == "session=abc; Path=/"  # the app still sees it
        await http.get(f"http://{up.address}/")
        assert len(http.cookies) == 0
    assert [r.header(b"cookie") for r in up.requests] == [None, None]


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


async def test_a_broken_or_missing_answer_is_an_httpx_protocol_error() -> None:
    async def hang_up(conn: UpstreamConn) -> None:
        await conn.read_request()

    async def short_body(conn: UpstreamConn) -> None:  # 3 bytes of 9, then the end
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc")

    async with upstream(serve(lambda req: b"HTTP/1.1 abc\r\n\r\n")) as up, client(None) as http:
        with pytest.raises(httpx.RemoteProtocolError, match=r"not valid HTTP/1\.1"):
            await http.get(f"http://{up.address}/")
    async with upstream(hang_up) as up, client(None) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without a response"):
            await http.get(f"http://{up.address}/")
    async with upstream(short_body) as up, client(None) as http:
        with pytest.raises(httpx.RemoteProtocolError, match="before the end of the body"):
            await http.get(f"http://{up.address}/")


async def test_what_it_cannot_send_is_refused_before_anything_is_sent() -> None:
    async with upstream(serve(lambda req: ok())) as up, client(None) as http:
        with pytest.raises(httpx.UnsupportedProtocol, match="plain http:// only"):
            await http.get(f"https://{up.address}/")
        with pytest.raises(httpx.LocalProtocolError, match="CR or LF"):
            await http.get(f"http://{up.address}/", headers={"x-a": "1\r\nx-b: 2"})
    assert up.connections == 0


async def test_through_a_proxy_the_request_goes_to_the_proxy_with_the_absolute_url() -> None:
    async with (
        upstream(serve(lambda req: ok(b"via proxy"))) as proxy,
        client(f"http://{proxy.address}") as http,
    ):
        reply = await http.get("http://payments/charge?x=1")
        assert reply.text == "via proxy"
    assert [r.target for r in proxy.requests] == [b"http://payments/charge?x=1"]
    assert proxy.requests[0].header(b"host") == b"payments"
