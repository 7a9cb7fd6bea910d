"""gRPC through two sidecars: a real grpcio client dials the outbound listener with the
service's name as its authority; the request goes over HTTP/2 to the server's sidecar (inbound
listener) and on to a real grpcio server, both hops h2c. Every call shape, large and many
messages, metadata and trailers intact."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from tests.sidecar.grpc_fixtures import EchoServer, channel, echo_server
from tests.sidecar.proxy_fixtures import SidecarProcess

pytestmark = pytest.mark.timeout(60)

AUTHORITY = "echo:50051"


def grpc_mesh(endpoint: str, **service: Any) -> dict[str, Any]:
    return {
        "outbound_policy": "registry_only",
        "services": [
            {"name": "echo", "port": 50051, "protocol": "grpc", "endpoints": [endpoint], **service}
        ],
    }


@contextlib.asynccontextmanager
async def two_sidecars(
    tmp_path: Path, server: EchoServer, **service: Any
) -> AsyncIterator[tuple[SidecarProcess, SidecarProcess]]:
    """The server's sidecar (inbound to the grpcio server) and the client's (outbound, with
    the service `echo` declared grpc at the server sidecar's inbound listener)."""
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    inbound = await SidecarProcess.spawn(tmp_path / "server", {"services": []}, app=server.address)
    try:
        host, port = inbound.addresses["inbound"]
        outbound = await SidecarProcess.spawn(
            tmp_path / "client", grpc_mesh(f"{host}:{port}", **service)
        )
        try:
            yield outbound, inbound
        finally:
            await outbound.stop()
    finally:
        await inbound.stop()


def target(proc: SidecarProcess) -> str:
    host, port = proc.addresses["outbound"]
    return f"{host}:{port}"


async def test_all_four_call_shapes_through_two_sidecars(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        unary = ch.unary_unary("/test.Echo/Unary")
        assert await unary(b"hello", timeout=10) == b"olleh"

        server_stream = ch.unary_stream("/test.Echo/ServerStream")
        got = [m async for m in server_stream(b"500:x" * 10, timeout=10)]
        assert len(got) == 500
        assert got[499] == b"499:" + b"500:x" * 10

        client_stream = ch.stream_unary("/test.Echo/ClientStream")

        async def many() -> AsyncIterator[bytes]:
            for _ in range(1000):
                yield b"m" * 1000

        assert await client_stream(many(), timeout=10) == b"1000 messages, 1000000 bytes"

        bidi = ch.stream_stream("/test.Echo/Bidi")
        call = bidi(timeout=10)
        for i in range(50):
            await call.write(b"ping %d" % i)
            assert await call.read() == b"PING %d" % i
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
    assert [name for name, _ in server.calls] == ["Unary", "ServerStream", "ClientStream", "Bidi"]


async def test_an_http1_upstream_declaration_does_not_carry_grpc(tmp_path: Path) -> None:
    """The declaration matters: declared `http`, the request goes upstream as HTTP/1.1, which
    a grpcio server does not speak (the call fails, and the server sees no call)."""
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server, protocol="http") as (
            outbound,
            _,
        ),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        with pytest.raises(grpc.aio.AioRpcError):
            await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=5)
    assert server.calls == []


async def test_large_messages_both_ways(tmp_path: Path) -> None:
    """Messages far past every flow-control window (64 KiB by default), both directions."""
    big = bytes(range(256)) * (8 * 1024 * 1024 // 256)  # 8 MiB
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        unary = ch.unary_unary("/test.Echo/Unary")
        assert await unary(big, timeout=20) == big[::-1]
        bidi = ch.stream_stream("/test.Echo/Bidi")
        call = bidi(timeout=20)
        for _ in range(3):
            await call.write(big[: 2 * 1024 * 1024])
            assert await call.read() == big[: 2 * 1024 * 1024].upper()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_metadata_and_trailers_pass_through(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        call = ch.unary_unary("/test.Echo/Unary")(
            b"abc", metadata=(("x-echo", "marker-1"),), timeout=10
        )
        assert await call == b"cba"
        assert ("x-echoed", "marker-1") in tuple(await call.initial_metadata())
        assert ("x-trailer", "marker-1-done") in tuple(await call.trailing_metadata())
        # An error status from the app reaches the client with its message (trailers-only).
        server.fail_next.append(grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
        assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "told to fail" in (failed.value.details() or "")
    assert server.calls[0][1].get("x-echo") == "marker-1"


async def test_many_concurrent_calls_share_one_connection(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        unary = ch.unary_unary("/test.Echo/Unary")
        results = await asyncio.gather(*(unary(b"%d" % i, timeout=20) for i in range(200)))
        assert results == [(b"%d" % i)[::-1] for i in range(200)]
    assert len(server.calls) == 200
