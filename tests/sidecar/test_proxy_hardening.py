"""End to end: docs/hardening.md through the real proxy, and the flags on local errors."""

from __future__ import annotations

import asyncio
import socket

import httpx

from sidecar.transport.server import ServerSettings
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

GOOD = b"GET /good HTTP/1.1\r\nHost: payments\r\n\r\n"
SMUGGLE = (
    b"POST /bad HTTP/1.1\r\nHost: payments\r\nContent-Length: 4\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
)


def answer(req: Received) -> bytes:
    return ok(b"seen " + req.target)


async def test_content_length_with_chunked_is_400_and_the_upstream_sees_nothing() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(SMUGGLE + GOOD)
        response = await client.response()
        assert await client.closed()
    assert response.status == 400
    assert response.header(b"connection") == b"close"
    assert payments.connections == 0


async def test_pipelined_bad_request_after_a_good_one_is_400_and_nothing_more_forwarded() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(GOOD + SMUGGLE + b"GET /third HTTP/1.1\r\nHost: payments\r\n\r\n")
        good = await client.response()
        bad = await client.response()
        assert await client.closed()
    assert (good.status, good.body) == (200, b"seen /good")
    assert bad.status == 400
    assert [r.target for r in payments.requests] == [b"/good"]


async def test_underscore_in_a_header_name_is_400() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET / HTTP/1.1\r\nHost: payments\r\nX_Forwarded_For: 1.2.3.4\r\n\r\n")
        response = await client.response()
        assert await client.closed()
    assert response.status == 400
    assert payments.connections == 0


async def test_oversize_header_block_is_431() -> None:
    filler = b"".join(b"x-filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(70))
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET / HTTP/1.1\r\nHost: payments\r\n" + filler + b"\r\n")
        response = await client.response()
    assert response.status == 431
    assert payments.connections == 0


async def test_long_request_line_is_414() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: payments\r\n\r\n")
        response = await client.response()
    assert response.status == 414
    assert payments.connections == 0


async def test_upstream_conflicting_framing_is_502_upe_and_its_connection_closed() -> None:
    upstream_eof = asyncio.Event()

    async def respond(conn: UpstreamConn) -> None:
        req = await conn.read_request()
        if req is not None and req.target == b"/bad":
            await conn.send(
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            )
            if await conn.reader.read() == b"":
                upstream_eof.set()
            return
        if req is not None:
            await conn.send(answer(req))
        await serve(answer)(conn)

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET /bad HTTP/1.1\r\nHost: payments\r\n\r\n")
        bad = await client.response()
        async with asyncio.timeout(WAIT):
            await upstream_eof.wait()
        await client.send(b"GET /next HTTP/1.1\r\nHost: payments\r\n\r\n")
        after = await client.response()
    assert bad.status == 502
    assert bad.header(b"x-outrigger-flags") == b"UPE"
    assert bad.body.startswith(b"UPE")
    assert after.body == b"seen /next"
    assert payments.connections == 2


async def test_hop_by_hop_headers_are_not_forwarded_either_way() -> None:
    def respond(req: Received) -> bytes:
        return ok(
            b"ok",
            extra=b"Connection: keep-alive, X-Upstream-Secret\r\nX-Upstream-Secret: 1\r\n"
            b"Keep-Alive: timeout=5\r\nX-Kept: yes\r\n",
        )

    async with (
        upstream(serve(respond)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: keep-alive, X-Secret, Foo\r\n"
            b"X-Secret: 1\r\nFoo: bar\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\nX-Kept: yes\r\n\r\n"
        )
        response = await client.response()
    seen = {name for name, _ in payments.requests[0].headers}
    hop_by_hop = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"transfer-encoding"}
    assert not seen & (hop_by_hop | {b"x-secret", b"foo", b"upgrade"})
    assert b"x-kept" in seen
    got = {name for name, _ in response.headers}
    assert not got & {b"keep-alive", b"x-upstream-secret"}
    assert response.header(b"connection") in (None, b"keep-alive")
    assert response.header(b"x-kept") == b"yes"


async def test_client_sent_mesh_control_headers_are_stripped() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"GET / HTTP/1.1\r\nHost: payments\r\nX-Outrigger-Flags: UF\r\n"
            b"x-outrigger-retry-attempts: 9\r\nX-Outrigger-Timeout: 1h\r\n\r\n"
        )
        response = await client.response()
    assert response.status == 200
    seen = [name for name, _ in payments.requests[0].headers]
    assert not [name for name in seen if name.startswith(b"x-outrigger-")]


async def test_request_id_is_added_when_absent() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        await client.get("http://payments/")
        await client.get("http://payments/")
    ids = [r.header(b"x-request-id") for r in payments.requests]
    assert all(ids) and ids[0] != ids[1]
    assert all(
        len([n for n, _ in r.headers if n == b"x-request-id"]) == 1 for r in payments.requests
    )


async def test_request_id_is_kept_when_present() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        await client.get("http://payments/", headers={"x-request-id": "0af7651916cd43dd"})
    assert payments.requests[0].header(b"x-request-id") == b"0af7651916cd43dd"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connect_refused_is_503_uf() -> None:
    dead = f"127.0.0.1:{closed_port()}"
    async with (
        running_sidecar(mesh_doc({"payments": [dead]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.get("http://payments/")
    assert response.status_code == 503
    assert response.headers["x-outrigger-flags"] == "UF"
    assert response.text.startswith("UF")


async def test_upstream_closing_mid_head_is_503_uc() -> None:
    async def respond(conn: UpstreamConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-le")

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.get("http://payments/")
    assert response.status_code == 503
    assert response.headers["x-outrigger-flags"] == "UC"
    assert response.text.startswith("UC")


async def test_upstream_closing_before_responding_is_503_uc() -> None:
    async def respond(conn: UpstreamConn) -> None:
        await conn.read_request()

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.post("http://payments/", content=b"x")
    assert response.status_code == 503
    assert response.headers["x-outrigger-flags"] == "UC"


async def test_stale_pooled_connection_closed_by_upstream_is_replayed_for_get() -> None:
    # The upstream answers, then closes its side after the next request arrives without
    # answering it (a keep-alive race): a GET goes again on a fresh connection.
    async def respond(conn: UpstreamConn) -> None:
        req = await conn.read_request()
        if req is not None:
            await conn.send(answer(req))
        if payments.connections == 1:
            await conn.read_request()  # then close without a byte
            return
        await serve(answer)(conn)

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        first = await client.get("http://payments/one")
        second = await client.get("http://payments/two")
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.text == "seen /two"


async def test_slowloris_half_a_head_gets_408_after_the_header_timeout() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(
            mesh_doc({"payments": [payments.address]}),
            server=ServerSettings(header_timeout=0.5),
        ) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.send(b"GET / HTTP/1.1\r\nHost: pay")
        response = await client.response()
        elapsed = loop.time() - started
        assert await client.closed()
    assert response.status == 408
    assert 0.4 < elapsed < 3.0
    assert payments.connections == 0


async def test_too_many_headers_is_431() -> None:
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(101))
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET / HTTP/1.1\r\nHost: payments\r\n" + many + b"\r\n")
        response = await client.response()
    assert response.status == 431
    assert payments.connections == 0


async def test_request_body_that_stops_arriving_times_out() -> None:
    upstream_eof = asyncio.Event()

    async def respond(conn: UpstreamConn) -> None:
        await conn.read_head()
        await conn.reader.read()
        upstream_eof.set()

    async with (
        upstream(respond) as payments,
        running_sidecar(
            mesh_doc({"payments": [payments.address]}),
            server=ServerSettings(body_timeout=0.5),
        ) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"POST / HTTP/1.1\r\nHost: payments\r\nContent-Length: 10\r\n\r\nabc")
        response = await client.response()
        assert await client.closed()
        async with asyncio.timeout(WAIT):
            await upstream_eof.wait()  # the upstream connection that saw a part is closed
    assert response.status == 408


async def test_idle_keep_alive_connection_is_closed_after_the_idle_timeout() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(
            mesh_doc({"payments": [payments.address]}),
            server=ServerSettings(idle_timeout=0.5),
        ) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(GOOD)
        assert (await client.response()).status == 200
        assert await client.closed(timeout=3.0)


async def test_h2c_upgrade_is_not_forwarded_as_an_upgrade() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        response = await client.response()
    assert response.status in (200, 400)
    for seen in payments.requests:
        assert seen.header(b"upgrade") is None
        assert seen.header(b"http2-settings") is None


async def test_malformed_chunk_mid_body_is_400_and_the_upstream_never_gets_a_whole_body() -> None:
    upstream_saw: list[bytes] = []
    done = asyncio.Event()

    async def respond(conn: UpstreamConn) -> None:
        await conn.read_head()
        try:
            upstream_saw.append(await conn.reader.read())
        finally:
            done.set()

    async with (
        upstream(respond) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"POST / HTTP/1.1\r\nHost: payments\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        )
        await asyncio.sleep(0.1)  # the exchange with the upstream has started
        await client.send(b"zz\r\nbad\r\n0\r\n\r\n")
        response = await client.response()
        assert await client.closed()
        async with asyncio.timeout(WAIT):
            await done.wait()
    assert response.status == 400
    assert response.header(b"x-outrigger-flags") == b"DPE"
    assert not upstream_saw[0].endswith(b"0\r\n\r\n")


async def test_connect_is_refused_and_never_forwarded() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            f"CONNECT {payments.address} HTTP/1.1\r\nHost: {payments.address}\r\n\r\n".encode()
        )
        response = await client.response()
        assert await client.closed()
    assert 400 <= response.status < 600
    assert response.status not in (200, 502, 503)
    assert payments.connections == 0


async def test_a_malformed_request_id_from_the_client_is_replaced() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET / HTTP/1.1\r\nHost: payments\r\nX-Request-Id: not{an}id\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    ids = [value for name, value in payments.requests[0].headers if name == b"x-request-id"]
    assert len(ids) == 1 and ids[0] != b"not{an}id"
    assert len(ids[0]) == 32 and all(c in b"0123456789abcdef" for c in ids[0])


async def test_a_client_cannot_nominate_away_the_request_id_the_sidecar_sets() -> None:
    async with (
        upstream(serve(answer)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(
            b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: x-request-id\r\n"
            b"X-Request-Id: 0af7651916cd43dd\r\n\r\n"
        )
        response = await client.response()
    assert response.status == 200
    # Connection named the client's request id, so it went; the sidecar's own is still sent.
    ids = [value for name, value in payments.requests[0].headers if name == b"x-request-id"]
    assert len(ids) == 1 and ids[0] != b"0af7651916cd43dd"


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout() -> None:
    declared = 256 * 1024 * 1024  # far more than every socket buffer on the way can hold

    async def firehose(conn: UpstreamConn) -> None:
        await conn.read_request()
        conn.writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % declared)
        block = b"x" * 65536
        for _ in range(declared // len(block)):
            await conn.send(block)

    async with (
        upstream(firehose) as payments,
        running_sidecar(
            mesh_doc({"payments": [payments.address]}), server=ServerSettings(send_timeout=0.5)
        ) as sidecar,
    ):
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            # A small receive window, so the sidecar's writes back up at once.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            async with asyncio.timeout(WAIT):
                await loop.sock_connect(sock, sidecar.addresses["outbound"])
                await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
            await asyncio.sleep(2.5)  # read nothing: 0.5 s send timeout, 0.5 s sweeps
            received = 0
            async with asyncio.timeout(WAIT):
                while data := await loop.sock_recv(sock, 1 << 20):
                    received += len(data)
    assert 0 < received < declared
