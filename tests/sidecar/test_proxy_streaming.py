"""End to end: bodies, interim responses, bodiless responses and upgrades through the sidecar."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx

from tests.sidecar.proxy_fixtures import (
    WAIT,
    Received,
    UpstreamConn,
    mesh_doc,
    ok,
    raw_client,
    running_sidecar,
    serve,
    upstream,
    url,
)

GET = b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n"


def echo_body(req: Received) -> bytes:
    framing = b"chunked" if req.chunked else b"length"
    return ok(framing + b":" + req.body)


async def test_chunked_request_body_is_forwarded_chunked() -> None:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(50):
            yield b"%d," % i * 1000

    async with (
        upstream(serve(echo_body)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.post("http://payments/upload", content=parts())
    expected = b"".join(b"%d," % i * 1000 for i in range(50))
    assert response.status_code == 200
    assert response.content == b"chunked:" + expected
    seen = payments.requests[0]
    assert seen.header(b"transfer-encoding") == b"chunked"
    assert seen.header(b"content-length") is None


async def test_content_length_body_is_forwarded_with_content_length() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB: larger than the retry buffer, so it streams
    async with (
        upstream(serve(echo_body)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.put("http://payments/blob", content=body)
    assert response.status_code == 200
    assert response.content == b"length:" + body
    seen = payments.requests[0]
    assert seen.header(b"content-length") == str(len(body)).encode()
    assert seen.header(b"transfer-encoding") is None


async def test_chunked_response_body_streams_to_the_client() -> None:
    async def respond(conn: UpstreamConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await asyncio.sleep(0.05)
        await conn.send(b"6\r\n world\r\n0\r\n\r\n")
        await conn.read_request()

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(GET)
        response = await client.response()
    assert response.status == 200
    assert response.header(b"transfer-encoding") == b"chunked"
    assert response.body == b"hello world"


async def test_expect_100_continue_gets_100_then_the_final_response() -> None:
    async with (
        upstream(serve(echo_body)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: payments\r\nExpect: 100-continue\r\n"
            b"Content-Length: 5\r\n\r\n"
        )
        interim = await client.response(interim=True)
        assert interim.status == 100
        await client.send(b"hello")
        final = await client.response()
    assert final.status == 200
    assert final.body == b"length:hello"


async def test_http10_client_gets_its_response_and_the_connection_closes() -> None:
    async with (
        upstream(serve(lambda req: ok(b"old"))) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET / HTTP/1.0\r\nHost: payments\r\n\r\n")
        response = await client.response()
        assert await client.closed()
    assert response.status == 200
    assert response.version == b"HTTP/1.0"
    assert response.body == b"old"


async def test_http10_client_gets_a_chunked_upstream_body_close_delimited() -> None:
    async def respond(conn: UpstreamConn) -> None:
        await conn.read_request()
        await conn.send(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        await conn.read_request()

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET / HTTP/1.0\r\nHost: payments\r\n\r\n")
        response = await client.response()
    assert response.header(b"transfer-encoding") is None
    assert response.body == b"abc"


async def test_head_forwards_no_body_and_keeps_content_length() -> None:
    async def respond(conn: UpstreamConn) -> None:
        req = await conn.read_request()
        assert req is not None and req.method == b"HEAD"
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 1234\r\n\r\n")
        await serve(lambda req: ok(b"after"))(conn)

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"HEAD / HTTP/1.1\r\nHost: payments\r\n\r\n")
        head = await client.response(b"HEAD")
        await client.send(GET)
        after = await client.response()
    assert head.status == 200
    assert head.header(b"content-length") == b"1234"
    assert after.body == b"after"
    assert payments.connections == 1


async def test_204_and_304_carry_no_body() -> None:
    answers = iter(
        [
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b'HTTP/1.1 304 Not Modified\r\netag: "x"\r\n\r\n',
            ok(b"third"),
        ]
    )
    async with (
        upstream(serve(lambda req: next(answers))) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(GET)
        no_content = await client.response()
        await client.send(GET)
        not_modified = await client.response()
        await client.send(GET)
        third = await client.response()
    assert (no_content.status, not_modified.status, third.status) == (204, 304, 200)
    assert no_content.header(b"content-length") is None
    assert no_content.header(b"transfer-encoding") is None
    assert not_modified.header(b"transfer-encoding") is None
    assert third.body == b"third"
    assert payments.connections == 1


async def test_bytes_after_a_204_never_reach_the_client_and_the_connection_is_not_reused() -> None:
    def respond(req: Received) -> bytes:
        if req.target == b"/first":
            return b"HTTP/1.1 204 No Content\r\n\r\n" + ok(b"SMUGGLED")
        return ok(b"clean")

    async with (
        upstream(serve(respond)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET /first HTTP/1.1\r\nHost: payments\r\n\r\n")
        first = await client.response()
        await client.send(b"GET /second HTTP/1.1\r\nHost: payments\r\n\r\n")
        second = await client.response()
    assert first.status == 204
    assert second.body == b"clean"
    assert payments.connections == 2


async def test_bytes_sent_late_after_a_204_close_the_idle_upstream_connection() -> None:
    async def respond(conn: UpstreamConn) -> None:
        req = await conn.read_request()
        if req is not None and req.target == b"/first":
            await conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
            await asyncio.sleep(0.05)
            await conn.send(ok(b"SMUGGLED"))
        elif req is not None:
            await conn.send(ok(b"clean"))
        await serve(lambda req: ok(b"clean"))(conn)

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET /first HTTP/1.1\r\nHost: payments\r\n\r\n")
        first = await client.response()
        await asyncio.sleep(0.2)
        await client.send(b"GET /second HTTP/1.1\r\nHost: payments\r\n\r\n")
        second = await client.response()
    assert first.status == 204
    assert second.body == b"clean"
    assert payments.connections == 2


UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def test_upgrade_becomes_a_tunnel_after_101() -> None:
    async def respond(conn: UpstreamConn) -> None:
        req = await conn.read_request()
        assert req is not None
        assert req.header(b"upgrade") == b"websocket"
        assert b"upgrade" in (req.header(b"connection") or b"").lower()
        await conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"server-hello"
        )
        while data := await conn.reader.read(1024):
            await conn.send(b"echo:" + data)

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(UPGRADE)
        switched = await client.response(interim=True)
        assert switched.status == 101
        assert switched.header(b"upgrade") == b"websocket"
        async with asyncio.timeout(WAIT):
            assert await client.reader.readexactly(12) == b"server-hello"
            await client.send(b"ping")
            assert await client.reader.readexactly(9) == b"echo:ping"
            await client.send(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: raw bytes
            assert await client.reader.readexactly(23) == b"echo:GET / HTTP/1.1\r\n\r\n"


async def test_refused_upgrade_gets_a_normal_response_and_the_connection_closes() -> None:
    async with (
        upstream(serve(lambda req: ok(b"no upgrade here"))) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(UPGRADE)
        response = await client.response()
        assert await client.closed()
    assert response.status == 200
    assert response.body == b"no upgrade here"
    assert response.header(b"connection") == b"close"


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with (
        upstream(serve(lambda req: ok(req.target))) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"".join(b"GET /%d HTTP/1.1\r\nHost: payments\r\n\r\n" % i for i in range(5))
        )
        bodies = [(await client.response()).body for _ in range(5)]
    assert bodies == [b"/%d" % i for i in range(5)]
    assert payments.connections == 1


async def test_concurrent_clients_are_all_answered() -> None:
    async with (
        upstream(serve(lambda req: ok(req.target))) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        responses = await asyncio.gather(*(client.get(f"http://payments/{i}") for i in range(50)))
    assert [r.text for r in responses] == [f"/{i}" for i in range(50)]


async def test_upstream_interim_100_is_not_forwarded_to_a_client_that_did_not_ask() -> None:
    async def respond(req: Received) -> bytes:
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"final")

    async with (
        upstream(serve(respond)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(GET)
        response = await client.response(interim=True)
    assert (response.status, response.body) == (200, b"final")


async def test_head_response_with_a_stray_body_is_cut_and_not_reused() -> None:
    def respond(req: Received) -> bytes:
        if req.method == b"HEAD":
            return b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSTRAYBOD"
        return ok(b"clean")

    async with (
        upstream(serve(respond)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"HEAD / HTTP/1.1\r\nHost: payments\r\n\r\n")
        head = await client.response(b"HEAD")
        await client.send(GET)
        after = await client.response()
    assert head.header(b"content-length") == b"8"
    assert after.body == b"clean"
    assert payments.connections == 2


async def test_client_gone_mid_upload_never_completes_the_upstream_request() -> None:
    upstream_saw: list[bytes] = []
    done = asyncio.Event()

    async def respond(conn: UpstreamConn) -> None:
        head = await conn.read_head()
        assert head is not None
        try:
            upstream_saw.append(await conn.reader.read())
        finally:
            done.set()

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
    ):
        async with raw_client(sidecar.addresses["outbound"]) as client:
            await client.send(
                b"POST / HTTP/1.1\r\nHost: payments\r\nContent-Length: 100\r\n\r\n" + b"x" * 10
            )
            await asyncio.sleep(0.1)
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert len(upstream_saw[0]) < 100  # the upstream saw a cut connection, not a whole body
