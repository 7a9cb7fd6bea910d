"""gRPC through two sidecars: a real grpcio client dials the outbound listener with the
service's name as its authority; the request goes over HTTP/2 to the server's sidecar (inbound
listener) and on to a real grpcio server, both hops h2c. Every call shape, large and many
messages, metadata and trailers intact."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from prometheus_client import generate_latest

from mesh.model import parse_mesh
from sidecar import metrics
from sidecar.app import Sidecar
from sidecar.transport.server import ServerSettings
from sidecar.xds.interpret import snapshot_from_mesh
from tests.sidecar.grpc_fixtures import EchoServer, channel, echo_server, raw_grpc_call
from tests.sidecar.proxy_fixtures import SidecarProcess, running_sidecar
from tests.sidecar.resilience_fixtures import sidecar_settings

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


async def test_many_concurrent_calls_through_two_sidecars(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        unary = ch.unary_unary("/test.Echo/Unary")
        results = await asyncio.gather(*(unary(b"%d" % i, timeout=20) for i in range(200)))
        assert results == [(b"%d" % i)[::-1] for i in range(200)]
    assert len(server.calls) == 200


@pytest.mark.parametrize(("server_streams", "connections"), [(None, 1), (4, 4)])
async def test_calls_share_a_connection_until_the_servers_stream_limit(
    server_streams: int | None, connections: int
) -> None:
    """16 slow calls at once: one upstream connection carries them all, unless the server's
    SETTINGS_MAX_CONCURRENT_STREAMS (4) says otherwise: then 16 / 4 connections."""
    async with (
        echo_server(max_streams=server_streams) as server,
        running_sidecar(grpc_mesh(server.address)) as sidecar,
    ):
        host, port = sidecar.addresses["outbound"]
        async with channel(f"{host}:{port}", AUTHORITY) as ch:
            slow = ch.unary_unary("/test.Echo/Slow")
            answers = await asyncio.gather(*(slow(b"0.5", timeout=20) for _ in range(16)))
            assert answers == [b"late"] * 16
            (pool,) = sidecar.upstreams.h2_pools.values()
            assert len(pool.connections) == connections
    assert len(server.calls) == 16


# --- gRPC-aware errors and timeouts ------------------------------------------------------------


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {k: v for k, v in error.trailing_metadata() or () if isinstance(v, str)}


async def test_no_route_is_unavailable_with_the_flag_not_an_http_page(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), "nowhere:50051") as ch,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (failed.value.details() or "").startswith("NR: ")
    assert trailing(failed.value)["x-outrigger-flags"] == "NR"
    assert server.calls == []


async def test_connect_failure_is_unavailable_uf(tmp_path: Path) -> None:
    async with echo_server() as server:
        await server.server.stop(grace=None)  # type: ignore[union-attr]
        async with (
            two_sidecars(tmp_path, server) as (outbound, _),
            channel(target(outbound), AUTHORITY) as ch,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await ch.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    # The server's sidecar could not reach its app (UF); the client's passes that answer on.
    assert trailing(failed.value)["x-outrigger-flags"] == "UF"


async def test_route_timeout_is_deadline_exceeded_ut(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server, policy={"timeout": "300ms"}) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary("/test.Echo/Slow")(b"3", timeout=10)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (failed.value.details() or "").startswith("UT: ")
    assert trailing(failed.value)["x-outrigger-flags"] == "UT"


async def test_drain_sends_goaway_and_lets_an_open_stream_finish(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        call = ch.unary_stream("/test.Echo/Ticks")(b"6:0.2", timeout=15)
        got = [await call.read()]
        outbound.terminate()  # SIGTERM: drain
        while (message := await call.read()) is not grpc.aio.EOF:
            got.append(message)
        assert got == [b"tick %d" % i for i in range(6)]
        assert await call.code() == grpc.StatusCode.OK
        assert await outbound.wait(10) == 0


def grpc_counts(page: str, destination: str) -> dict[tuple[str, ...], str]:
    """outrigger_grpc_calls_total of a Prometheus page: (rpc_service, rpc_method,
    grpc_status) -> count, for one destination."""
    counts = {}
    for line in page.splitlines():
        if not line.startswith("outrigger_grpc_calls_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        if labels["destination"] == destination:
            key = tuple(labels[name] for name in ("rpc_service", "rpc_method", "grpc_status"))
            counts[key] = line.rsplit(" ", 1)[1]
    return counts


async def test_grpc_calls_are_counted_by_method_and_grpc_status(tmp_path: Path) -> None:
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        unary = ch.unary_unary("/test.Echo/Unary")
        assert await unary(b"ab", timeout=10) == b"ba"
        server.fail_next.append(grpc.StatusCode.NOT_FOUND)
        with pytest.raises(grpc.aio.AioRpcError):
            await unary(b"ab", timeout=10)
        assert len([m async for m in ch.unary_stream("/test.Echo/ServerStream")(b"2:x")]) == 2
        async with httpx.AsyncClient() as client:
            page = (await client.get(outbound.url("admin", "/stats/prometheus"))).text
    assert grpc_counts(page, "echo") == {
        ("test.Echo", "Unary", "0"): "1.0",
        ("test.Echo", "Unary", "5"): "1.0",  # NOT_FOUND
        ("test.Echo", "ServerStream", "0"): "1.0",
    }


async def test_method_labels_are_bounded_per_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path is the client's to choose: past the bound of distinct methods per destination
    (100; 3 here), and for a path that is not /package.Service/Method, calls count as
    other/other."""
    monkeypatch.setattr(metrics, "MAX_GRPC_METHODS", 3)
    async with echo_server() as server, running_sidecar(grpc_mesh(server.address)) as sidecar:
        host, port = sidecar.addresses["outbound"]
        paths = [f"/test.Echo/Missing{i}" for i in range(5)] + ["/test.Echo", "/test.Echo/Unary"]
        for path in paths:
            await raw_grpc_call(host, port, AUTHORITY.encode(), path, b"x", [])
        text = generate_latest(sidecar.metrics.registry()).decode()
    assert grpc_counts(text, "echo") == {
        ("test.Echo", "Missing0", "12"): "1.0",  # UNIMPLEMENTED
        ("test.Echo", "Missing1", "12"): "1.0",
        ("test.Echo", "Missing2", "12"): "1.0",
        ("other", "other", "12"): "3.0",  # Missing3, Missing4, and /test.Echo
        ("other", "other", "0"): "1.0",  # Unary came after the bound too
    }


# --- retries and breakers on gRPC status -------------------------------------------------------


@contextlib.asynccontextmanager
async def retrying(tmp_path: Path) -> AsyncIterator[tuple[EchoServer, grpc.aio.Channel]]:
    """An echo server behind two sidecars whose service retries UNAVAILABLE twice, and a
    channel to the client's sidecar."""
    retries = {"attempts": 2, "retry_on": ["unavailable"]}
    async with (
        echo_server() as server,
        two_sidecars(tmp_path, server, policy={"retries": retries}) as (outbound, _),
        channel(target(outbound), AUTHORITY) as ch,
    ):
        yield server, ch


async def test_unavailable_is_retried_and_the_app_sees_the_call_twice(tmp_path: Path) -> None:
    async with retrying(tmp_path) as (server, ch):
        server.fail_next.append(grpc.StatusCode.UNAVAILABLE)
        assert await ch.unary_unary("/test.Echo/Unary")(b"abc", timeout=10) == b"cba"
        # A status not asked for is the call's answer, not retried.
        server.fail_next.append(grpc.StatusCode.NOT_FOUND)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary("/test.Echo/Unary")(b"abc", timeout=10)
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert [name for name, _ in server.calls] == ["Unary", "Unary", "Unary"]


async def test_no_retry_once_a_message_was_forwarded(tmp_path: Path) -> None:
    async with retrying(tmp_path) as (server, ch):
        call = ch.unary_stream("/test.Echo/OneThenUnavailable")(b"x", timeout=10)
        assert await call.read() == b"first"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(server.calls) == 1


async def test_unavailable_after_the_headers_is_retried_and_the_app_sees_the_call_twice(
    tmp_path: Path,
) -> None:
    """The server sends its initial metadata, then UNAVAILABLE in the trailers with no message
    (not trailers-only): the sidecar held the headers, so the call is still retried, and the
    client gets the second attempt's metadata and answer."""
    async with retrying(tmp_path) as (server, ch):
        server.fail_next.append(grpc.StatusCode.UNAVAILABLE)
        call = ch.unary_unary("/test.Echo/HeadersFirst")(b"abc", timeout=10)
        assert await call == b"cba"
        assert ("x-early", "sent") in tuple(await call.initial_metadata())
        assert [name for name, _ in server.calls] == ["HeadersFirst", "HeadersFirst"]
        # Twice UNAVAILABLE after the headers: the last attempt's status reaches the client.
        server.fail_next.extend([grpc.StatusCode.UNAVAILABLE] * 3)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary("/test.Echo/HeadersFirst")(b"abc", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after the headers" in (failed.value.details() or "")
    assert len(server.calls) == 5


async def test_a_call_still_sending_gets_its_headers_at_once(tmp_path: Path) -> None:
    """Retries on a gRPC status hold an answer's headers only once the request was sent whole:
    a bidi client that waits for the server's initial metadata before it writes is not
    stalled by the hold."""
    async with retrying(tmp_path) as (server, ch):
        call = ch.stream_stream("/test.Echo/Bidi")(metadata=(("x-echo", "early"),), timeout=10)
        async with asyncio.timeout(5):
            metadata = await call.initial_metadata()  # sent by the server before any message
        assert ("x-echoed", "early") in tuple(metadata)
        await call.write(b"then")
        assert await call.read() == b"THEN"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
    assert [name for name, _ in server.calls] == ["Bidi"]


async def test_a_client_stream_is_retried_only_while_it_fits_the_retry_buffer(
    tmp_path: Path,
) -> None:
    """The server reads every message, then answers UNAVAILABLE: a client stream whose
    messages fit the retry buffer (64 KiB) is sent again whole; a larger one was forwarded
    and forgotten as it went, so its UNAVAILABLE is the call's answer."""

    async def messages(count: int) -> AsyncIterator[bytes]:
        for _ in range(count):
            yield b"m" * 1000

    async with retrying(tmp_path) as (server, ch):
        client_stream = ch.stream_unary("/test.Echo/ClientStream")
        server.fail_late.append(grpc.StatusCode.UNAVAILABLE)
        assert await client_stream(messages(20), timeout=10) == b"20 messages, 20000 bytes"
        assert len(server.calls) == 2
        server.fail_late.append(grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await client_stream(messages(100), timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "after 100 messages" in (failed.value.details() or "")
    assert len(server.calls) == 3


async def test_statuses_in_trailers_reach_the_metrics_and_the_access_log() -> None:
    """A grpc-status after the headers, and one after a message, are what the call is counted
    and logged with (not the 200 of the head)."""
    async with echo_server() as server:
        settings = dataclasses.replace(sidecar_settings(), access_log=True)
        sidecar = Sidecar(settings)
        sidecar.apply(snapshot_from_mesh(parse_mesh(grpc_mesh(server.address), "t")))
        async with asyncio.timeout(10):
            await sidecar.start()
        try:
            host, port = sidecar.addresses["outbound"]
            async with channel(f"{host}:{port}", AUTHORITY) as ch:
                server.fail_next.append(grpc.StatusCode.UNAVAILABLE)
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/test.Echo/HeadersFirst")(b"ab", timeout=5)
                server.fail_late.append(grpc.StatusCode.INTERNAL)
                stream = ch.unary_stream("/test.Echo/ServerStream")(b"3:x", timeout=5)
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in stream:
                        pass
                assert await ch.unary_unary("/test.Echo/HeadersFirst")(b"ab", timeout=5) == b"ba"
            lines = [json.loads(line) for line in sidecar.access_log.lines]
            counts = sidecar.metrics.grpc_calls()
        finally:
            async with asyncio.timeout(10):
                await sidecar.drain()
    assert [(line["path"], line["status"], line["grpc_status"]) for line in lines] == [
        ("/test.Echo/HeadersFirst", 200, 14),
        ("/test.Echo/ServerStream", 200, 13),
        ("/test.Echo/HeadersFirst", 200, 0),
    ]
    assert {key[3:]: count for key, count in counts.items()} == {
        ("test.Echo", "HeadersFirst", "14"): 1,
        ("test.Echo", "ServerStream", "13"): 1,
        ("test.Echo", "HeadersFirst", "0"): 1,
    }


@pytest.mark.parametrize("failure", ["trailers-only", "after the headers", "after a message"])
async def test_breaker_ejects_an_endpoint_answering_unavailable(
    tmp_path: Path, failure: str
) -> None:
    """UNAVAILABLE counts towards the endpoint's breaker whether it is trailers-only, in the
    trailers after the headers, or after a message (no retry policy here)."""
    method = {"trailers-only": "Unary", "after the headers": "HeadersFirst"}.get(failure)
    async with echo_server() as bad, echo_server() as good:
        if method is None:
            bad.fail_late.extend([grpc.StatusCode.UNAVAILABLE] * 50)
        else:
            bad.fail_next.extend([grpc.StatusCode.UNAVAILABLE] * 50)
        mesh = grpc_mesh(bad.address, policy={"circuit_breaker": {"consecutive_failures": 2}})
        mesh["services"][0]["endpoints"].append(good.address)
        proc = await SidecarProcess.spawn(tmp_path, mesh)
        try:
            async with channel(target(proc), AUTHORITY) as ch:
                codes = []
                for _ in range(12):
                    try:
                        if method is not None:
                            await ch.unary_unary(f"/test.Echo/{method}")(b"x", timeout=10)
                        else:
                            call = ch.unary_stream("/test.Echo/ServerStream")(b"2:x", timeout=10)
                            assert len([m async for m in call]) == 2
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as error:
                        codes.append(error.code())
        finally:
            await proc.stop()
    # Round robin: the bad endpoint answers UNAVAILABLE twice, then it is ejected and every
    # call goes to the good one.
    assert len(bad.calls) == 2
    assert codes.count(grpc.StatusCode.UNAVAILABLE) == 2
    assert codes[-8:] == [grpc.StatusCode.OK] * 8
    assert len(good.calls) == 10


# --- budgets on upstream HTTP/2 connections ----------------------------------------------------


def overflowed(error: grpc.aio.AioRpcError) -> bool:
    return (
        error.code() == grpc.StatusCode.UNAVAILABLE
        and (error.details() or "").startswith("UO: ")
        and trailing(error)["x-outrigger-flags"] == "UO"
    )


async def test_max_requests_bounds_the_streams_on_an_http2_upstream() -> None:
    """Envoy's max_requests is HTTP/2's max concurrent streams: with 2, while two slow calls
    hold both (two streams on the one multiplexed connection), three more calls get
    UNAVAILABLE UO at once and never reach the server; then there is room again."""
    policy = {"circuit_breaker": {"max_requests": 2}}
    async with (
        echo_server() as server,
        running_sidecar(grpc_mesh(server.address, policy=policy)) as sidecar,
    ):
        host, port = sidecar.addresses["outbound"]
        async with channel(f"{host}:{port}", AUTHORITY) as ch:
            slow = ch.unary_unary("/test.Echo/Slow")
            first = [asyncio.ensure_future(slow(b"1", timeout=10)) for _ in range(2)]
            while len(server.calls) < 2:  # both streams open upstream (bounded by the timeout)
                await asyncio.sleep(0.02)
            (endpoint,) = sidecar.clusters.document()["echo"]["endpoints"]
            assert (endpoint["http2_connections"], endpoint["http2_streams"]) == (1, 2)
            assert endpoint["active_requests"] == 2
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await slow(b"0", timeout=10)
                assert overflowed(failed.value)
            assert await asyncio.gather(*first) == [b"late", b"late"]
            assert await slow(b"0", timeout=10) == b"late"  # room again
        stats = sidecar.services.get("echo")
        assert stats is not None and stats.stats.overflows == 3
    assert len(server.calls) == 3


async def test_max_pending_bounds_calls_waiting_for_an_http2_connection() -> None:
    """A call waiting for an HTTP/2 connection (the endpoint accepts, but its SETTINGS have
    not come) holds a pending slot: with max_pending 1, a second call meanwhile is UO."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never answers: no SETTINGS

    upstream = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
    policy = {"circuit_breaker": {"max_pending": 1}, "connect_timeout": "1s"}
    try:
        async with running_sidecar(grpc_mesh(address, policy=policy)) as sidecar:
            host, port = sidecar.addresses["outbound"]
            async with channel(f"{host}:{port}", AUTHORITY) as ch:
                unary = ch.unary_unary("/test.Echo/Unary")
                waiting = asyncio.ensure_future(unary(b"x", timeout=10))
                while not accepted:
                    await asyncio.sleep(0.02)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await unary(b"x", timeout=10)
                assert overflowed(failed.value)
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await waiting
                # The first one waited for the SETTINGS until the connect timeout (UF).
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
                assert trailing(failed.value)["x-outrigger-flags"] == "UF"
    finally:
        for writer in accepted:
            writer.close()
        upstream.close()


async def test_long_streams_are_not_cut_by_the_http1_timers() -> None:
    """A bidi stream whose client pauses longer than the HTTP/1.1 body, header and idle
    timeouts, and a server stream that outlasts them, both complete."""
    short = ServerSettings(header_timeout=0.3, idle_timeout=0.3, body_timeout=0.3)
    async with echo_server() as server:
        doc = {
            "services": [
                {"name": "echo", "port": 50051, "protocol": "grpc", "endpoints": [server.address]}
            ]
        }
        async with running_sidecar(doc, server=short) as sidecar:
            host, port = sidecar.addresses["outbound"]
            async with channel(f"{host}:{port}", AUTHORITY) as ch:
                call = ch.stream_stream("/test.Echo/Bidi")(timeout=10)
                for i in range(3):
                    await call.write(b"slow %d" % i)
                    assert await call.read() == b"SLOW %d" % i
                    await asyncio.sleep(0.8)  # past every HTTP/1.1 timer, twice a sweep
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
                ticks = ch.unary_stream("/test.Echo/Ticks")(b"4:0.5", timeout=10)
                assert [m async for m in ticks] == [b"tick %d" % i for i in range(4)]


async def test_a_stream_idle_past_the_stream_idle_timeout_ends_unavailable_si(
    tmp_path: Path,
) -> None:
    """Envoy's stream_idle_timeout on HTTP/2 streams (`--stream-idle-timeout`): a stream that
    moves bytes more often than the timeout lasts as long as it likes; one with no bytes either
    way for the timeout ends UNAVAILABLE with the flag SI, mid-call (in the trailers) or before
    any answer."""
    async with echo_server() as server:
        proc = await SidecarProcess.spawn(
            tmp_path, grpc_mesh(server.address), extra=("--stream-idle-timeout", "500ms")
        )
        try:
            await _idle_streams(proc)
        finally:
            await proc.stop()


async def _idle_streams(proc: SidecarProcess) -> None:
    async with channel(target(proc), AUTHORITY) as ch:
        ticks = ch.unary_stream("/test.Echo/Ticks")(b"8:0.2", timeout=10)
        assert [m async for m in ticks] == [b"tick %d" % i for i in range(8)]  # 1.6 s

        bidi = ch.stream_stream("/test.Echo/Bidi")(timeout=10)
        await bidi.write(b"one")
        assert await bidi.read() == b"ONE"
        await asyncio.sleep(1.0)  # neither side sends anything
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await bidi.read()
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert (failed.value.details() or "").startswith("SI: no bytes on the stream")
        assert trailing(failed.value)["x-outrigger-flags"] == "SI"

        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await ch.unary_unary("/test.Echo/Slow")(b"2", timeout=10)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert trailing(failed.value)["x-outrigger-flags"] == "SI"


async def test_access_log_lines_carry_the_grpc_status() -> None:
    async with echo_server() as server:
        settings = dataclasses.replace(sidecar_settings(), access_log=True)
        sidecar = Sidecar(settings)
        doc = grpc_mesh(server.address)
        sidecar.apply(snapshot_from_mesh(parse_mesh(doc, "t")))
        async with asyncio.timeout(10):
            await sidecar.start()
        try:
            host, port = sidecar.addresses["outbound"]
            async with channel(f"{host}:{port}", AUTHORITY) as ch:
                assert await ch.unary_unary("/test.Echo/Unary")(b"ab", timeout=5) == b"ba"
                server.fail_next.append(grpc.StatusCode.NOT_FOUND)
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/test.Echo/Unary")(b"ab", timeout=5)
            lines = [json.loads(line) for line in sidecar.access_log.lines]
        finally:
            async with asyncio.timeout(10):
                await sidecar.drain()
    assert [(line["path"], line["status"], line["grpc_status"]) for line in lines] == [
        ("/test.Echo/Unary", 200, 0),
        ("/test.Echo/Unary", 200, 5),
    ]
