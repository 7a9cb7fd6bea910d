"""End to end through a real `outrigger sidecar` process: memory under big bodies, and drain."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tests.sidecar.proxy_fixtures import (
    WAIT,
    Received,
    SidecarProcess,
    UpstreamConn,
    mesh_doc,
    ok,
    raw_client,
    serve,
    sidecar_process,
    upstream,
)

MIB = 1024 * 1024
BIG = 200 * MIB
CHUNK = 256 * 1024
# Idle, the sidecar holds about 38 MiB (measured). While moving BIG bytes its peak may grow by
# a few body buffers (256 KiB high water each) and socket buffers, never by the body itself.
GROWTH_LIMIT_KIB = 24 * 1024
RSS_LIMIT_KIB = 80 * 1024


def _peak_growth(proc: SidecarProcess, idle_kib: int) -> int:
    peak = proc.status("VmHWM")
    assert peak < RSS_LIMIT_KIB, f"sidecar peak RSS {peak} KiB"
    return peak - idle_kib


async def test_200_mib_upload_streams_with_bounded_sidecar_memory(tmp_path: Path) -> None:
    received = 0

    async def slow_reader(conn: UpstreamConn) -> None:
        nonlocal received
        head = await conn.read_head()
        assert head is not None
        await asyncio.sleep(0.5)  # let every buffer between client and upstream fill up
        while received < BIG:
            data = await conn.reader.read(CHUNK)
            if not data:
                break
            received += len(data)
        await conn.send(ok(b"%d" % received))

    async with (
        upstream(slow_reader) as payments,
        sidecar_process(tmp_path, mesh_doc({"payments": [payments.address]})) as proc,
    ):
        idle = proc.status("VmRSS")
        host, port = proc.addresses["outbound"]
        async with raw_client((host, port)) as client:
            await client.send(
                b"PUT /upload HTTP/1.1\r\nHost: payments\r\nContent-Length: %d\r\n\r\n" % BIG
            )
            block = b"u" * CHUNK
            async with asyncio.timeout(30):
                for _ in range(BIG // CHUNK):
                    client.writer.write(block)
                    await client.writer.drain()
            response = await client.response()
        growth = _peak_growth(proc, idle)
    assert response.status == 200
    assert response.body == b"%d" % BIG
    assert growth < GROWTH_LIMIT_KIB, f"sidecar grew {growth} KiB for a {BIG // MIB} MiB upload"


async def test_200_mib_download_streams_with_bounded_sidecar_memory(tmp_path: Path) -> None:
    async def sender(conn: UpstreamConn) -> None:
        await conn.read_request()
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BIG)
        block = b"d" * CHUNK
        for _ in range(BIG // CHUNK):
            conn.writer.write(block)
            await conn.writer.drain()
        await conn.read_request()

    async with (
        upstream(sender) as payments,
        sidecar_process(tmp_path, mesh_doc({"payments": [payments.address]})) as proc,
    ):
        idle = proc.status("VmRSS")
        async with raw_client(proc.addresses["outbound"]) as client:
            await client.send(b"GET /download HTTP/1.1\r\nHost: payments\r\n\r\n")
            async with asyncio.timeout(WAIT):
                head = await client.reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(0.5)  # a slow client at first
            got = 0
            async with asyncio.timeout(30):
                while got < BIG:
                    data = await client.reader.read(CHUNK)
                    assert data, f"download ended early at {got} bytes"
                    got += len(data)
        growth = _peak_growth(proc, idle)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: %d" % BIG in head.lower()
    assert got == BIG
    assert growth < GROWTH_LIMIT_KIB, f"sidecar grew {growth} KiB for a {BIG // MIB} MiB download"


async def _drain_while_in_flight(
    tmp_path: Path, trigger: str
) -> tuple[SidecarProcess, httpx.Response, bool, int]:
    async def slow(req: Received) -> bytes:
        await asyncio.sleep(1.0)
        return ok(b"slow done")

    async with (
        upstream(serve(slow)) as payments,
        sidecar_process(
            tmp_path, mesh_doc({"payments": [payments.address]}), drain_timeout="5s"
        ) as proc,
        httpx.AsyncClient(proxy=proc.url(), timeout=WAIT) as client,
    ):
        in_flight = asyncio.create_task(client.get("http://payments/slow"))
        async with asyncio.timeout(WAIT):
            await payments.request_arrived.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        if trigger == "SIGTERM":
            proc.proc.send_signal(signal.SIGTERM)
        else:
            async with httpx.AsyncClient(timeout=WAIT) as admin:
                answer = await admin.post(proc.url("admin", "/drain"))
            assert answer.status_code == 200
        await asyncio.sleep(0.2)
        refused = False
        try:
            async with raw_client(proc.addresses["outbound"]) as late:
                await late.send(b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n")
                refused = await late.closed()
        except ConnectionRefusedError:
            refused = True
        async with asyncio.timeout(WAIT):
            response = await in_flight
        code = await proc.wait(6.0)
        assert loop.time() - started < 5.0
    return proc, response, refused, code


@pytest.mark.parametrize("trigger", ["SIGTERM", "POST /drain"])
async def test_drain_finishes_in_flight_refuses_new_and_exits_0(
    tmp_path: Path, trigger: str
) -> None:
    _, response, refused, code = await _drain_while_in_flight(tmp_path, trigger)
    assert response.status_code == 200
    assert response.text == "slow done"
    assert response.headers["connection"] == "close"
    assert refused, "a new connection was served while draining"
    assert code == 0


async def test_inbound_through_the_process_reaches_the_app(tmp_path: Path) -> None:
    async with (
        upstream(serve(lambda req: ok(b"app:" + req.target))) as app,
        sidecar_process(tmp_path, mesh_doc(), app=app.address) as proc,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        response = await client.get(proc.url("inbound", "/x"))
        ready = await client.get(proc.url("admin", "/ready"))
    assert response.text == "app:/x"
    assert ready.status_code == 200


async def test_tunnel_to_a_slow_client_keeps_sidecar_memory_bounded(tmp_path: Path) -> None:
    """After a 101 the sidecar still applies backpressure: upstream bytes wait in the upstream."""
    sent = 0
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )

    async def firehose(conn: UpstreamConn) -> None:
        nonlocal sent
        await conn.read_request()
        await conn.send(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: ws\r\n\r\n"
        )
        block = b"t" * CHUNK
        while sent < BIG:
            conn.writer.write(block)
            await conn.writer.drain()
            sent += len(block)

    async with (
        upstream(firehose) as payments,
        sidecar_process(tmp_path, mesh_doc({"payments": [payments.address]})) as proc,
    ):
        idle = proc.status("VmRSS")
        async with raw_client(proc.addresses["outbound"]) as client:
            await client.send(upgrade)
            async with asyncio.timeout(WAIT):
                head = await client.reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(1.0)  # the client reads nothing for a while
            stalled_at = sent
            got = 0
            async with asyncio.timeout(30):
                while got < BIG:
                    data = await client.reader.read(CHUNK)
                    assert data, f"tunnel ended early at {got} bytes"
                    got += len(data)
        growth = _peak_growth(proc, idle)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert got == BIG
    # Without backpressure the upstream would have pushed everything into the sidecar.
    assert stalled_at < 32 * MIB, f"upstream sent {stalled_at // MIB} MiB to a stalled client"
    assert growth < GROWTH_LIMIT_KIB, f"sidecar grew {growth} KiB tunnelling {BIG // MIB} MiB"
