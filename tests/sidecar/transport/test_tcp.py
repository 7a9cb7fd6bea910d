"""TCP pass-through: first with recording transports (every rule), then over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sidecar.telemetry.access_log import AccessLog
from sidecar.transport.sniffer import SniffSettings
from sidecar.transport.tcp import TcpProxy, TcpRecord, TcpSettings
from tests.sidecar.transport.relay_fixtures import (
    WAIT,
    FakeTransport,
    Observed,
    echo_until_eof,
    relay_listener,
    tls_contexts,
)


def record() -> TcpRecord:
    return TcpRecord("outbound", "10.0.0.1:40000", "10.0.0.9:5432")


class Upstream:
    """Hands out FakeTransports as upstream connections, or fails or hangs as told."""

    def __init__(
        self,
        fail: Exception | None = None,
        hang: bool = False,
        returns: asyncio.Event | None = None,
    ) -> None:
        self.fail = fail
        self.hang = hang
        # Set: the connect returns only once this is set, after connection_made (uvloop's
        # create_connection returns a loop turn or more after the protocol heard of it).
        self.returns = returns
        self.transport = FakeTransport(("10.0.0.9", 5432))
        self.asked: list[tuple[str, int]] = []
        self.connected = asyncio.Event()

    async def __call__(
        self, factory: Callable[[], asyncio.Protocol], host: str, port: int
    ) -> tuple[asyncio.Transport, asyncio.Protocol]:
        self.asked.append((host, port))
        if self.fail is not None:
            raise self.fail
        if self.hang:
            await asyncio.Event().wait()
        protocol = factory()
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        self.connected.set()
        if self.returns is not None:
            await self.returns.wait()
        return self.transport, protocol


async def started(
    upstream: Upstream,
    *,
    replay: bytes = b"",
    client_ended: bool = False,
    settings: TcpSettings | None = None,
) -> tuple[TcpProxy, FakeTransport, Observed]:
    client = FakeTransport()
    observed = Observed()
    proxy = TcpProxy(
        client,
        ("10.0.0.9", 5432),
        record(),
        replay=replay,
        client_ended=client_ended,
        settings=settings,
        observer=observed,
        connect=upstream,
    )
    proxy.start()
    assert not client.reading  # nothing is read from the client until the upstream is there
    if not upstream.hang and upstream.fail is None:
        async with asyncio.timeout(WAIT):
            await upstream.connected.wait()
            await asyncio.sleep(0)
    return proxy, client, observed


async def test_the_bytes_read_during_detection_go_upstream_first_then_the_stream() -> None:
    upstream = Upstream()
    proxy, client, observed = await started(upstream, replay=b"\x16\x03\x01hello")
    assert upstream.asked == [("10.0.0.9", 5432)]
    assert bytes(upstream.transport.written) == b"\x16\x03\x01hello"
    assert client.reading
    client.proto.data_received(b" and more")
    upstream.transport.proto.data_received(b"answer")
    assert bytes(upstream.transport.written) == b"\x16\x03\x01hello and more"
    assert bytes(client.written) == b"answer"
    assert observed.opened == [proxy.record]
    assert (proxy.record.bytes_received, proxy.record.bytes_sent) == (17, 6)


async def test_half_close_keeps_the_other_direction_open_until_it_ends_too() -> None:
    upstream = Upstream()
    proxy, client, observed = await started(upstream)
    server = upstream.transport
    client.proto.data_received(b"request")
    assert client.proto.eof_received() is True  # keep the client's write side
    assert server.eof_written and not server.closed and not client.closed
    server.proto.data_received(b"late answer")
    assert bytes(client.written) == b"late answer"
    server.proto.eof_received()
    assert client.eof_written
    assert client.closed and server.closed
    [closed] = await observed.wait_closed()
    assert closed.flags == ""
    assert (closed.bytes_received, closed.bytes_sent) == (7, 11)
    assert proxy.done.done()


async def test_a_full_buffer_on_one_side_pauses_reading_the_other() -> None:
    upstream = Upstream()
    _, client, _ = await started(upstream)
    server = upstream.transport
    server.proto.pause_writing()  # the upstream is slow to take the client's bytes
    assert not client.reading and server.reading
    server.proto.resume_writing()
    assert client.reading
    client.proto.pause_writing()  # the client is slow to take the upstream's bytes
    assert not server.reading and client.reading
    client.proto.resume_writing()
    assert server.reading


async def test_a_client_reset_aborts_the_upstream() -> None:
    upstream = Upstream()
    _, client, observed = await started(upstream)
    client.proto.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert upstream.transport.aborted
    assert len(await observed.wait_closed()) == 1


async def test_an_upstream_reset_aborts_the_client() -> None:
    upstream = Upstream()
    _, client, observed = await started(upstream)
    upstream.transport.proto.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
    assert client.aborted
    assert len(await observed.wait_closed()) == 1


async def test_a_refused_connect_resets_the_client_with_flag_uf() -> None:
    upstream = Upstream(fail=ConnectionRefusedError(111, "Connection refused"))
    proxy, client, observed = await started(upstream, replay=b"x")
    [closed] = await observed.wait_closed()
    assert client.aborted
    assert closed.flags == "UF"
    assert proxy.done.done()


async def test_a_connect_that_never_completes_is_bounded_by_the_connect_timeout() -> None:
    upstream = Upstream(hang=True)
    _, client, observed = await started(upstream, settings=TcpSettings(connect_timeout=0.05))
    [closed] = await observed.wait_closed()
    assert closed.flags == "UF"
    assert client.aborted


async def test_bytes_and_eof_arriving_as_the_upstream_connects_follow_the_replay_in_order() -> None:
    returns = asyncio.Event()
    upstream = Upstream(returns=returns)
    client = FakeTransport()
    proxy = TcpProxy(client, ("10.0.0.9", 5432), record(), replay=b"first", connect=upstream)
    proxy.start()
    async with asyncio.timeout(WAIT):
        await upstream.connected.wait()
    # the upstream is connected, the connect call has not returned yet: the client goes on
    client.proto.data_received(b" second")
    client.proto.eof_received()
    returns.set()
    async with asyncio.timeout(WAIT):
        while not upstream.transport.eof_written:
            await asyncio.sleep(0)
    assert bytes(upstream.transport.written) == b"first second"  # the EOF came after them


async def test_bytes_read_before_the_upstream_is_there_are_kept_and_reading_pauses() -> None:
    upstream = Upstream(hang=True)
    client = FakeTransport()
    proxy = TcpProxy(client, ("10.0.0.9", 5432), record(), connect=upstream)
    proxy.start()
    client.resume_reading()  # uvloop starts reading after connection_made, paused or not
    client.proto.data_received(b"early")
    assert proxy.replay == b"early"
    assert not client.reading  # bounded: nothing more is read until the upstream is there
    proxy.abort()


async def test_a_client_that_half_closed_during_detection_has_its_eof_passed_on() -> None:
    upstream = Upstream()
    _, client, _ = await started(upstream, replay=b"QUIT\r\n", client_ended=True)
    assert bytes(upstream.transport.written) == b"QUIT\r\n"
    assert upstream.transport.eof_written
    upstream.transport.proto.data_received(b"221 bye\r\n")
    assert bytes(client.written) == b"221 bye\r\n"


async def test_a_client_gone_while_connecting_stops_the_connect_with_flag_dc() -> None:
    upstream = Upstream(hang=True)
    proxy, client, observed = await started(upstream)
    client.proto.connection_lost(None)
    [closed] = await observed.wait_closed()
    assert closed.flags == "DC"
    await asyncio.sleep(0)
    assert proxy.connecting is None


async def test_a_connection_idle_past_its_timeout_is_closed_with_flag_si() -> None:
    upstream = Upstream()
    _, client, observed = await started(upstream, settings=TcpSettings(idle_timeout=0.2))
    await asyncio.sleep(0.12)
    client.proto.data_received(b"still here")  # a byte moves the window
    await asyncio.sleep(0.12)
    assert not client.closed  # 0.24 s since the start, 0.12 s since the last byte
    [closed] = await observed.wait_closed()
    assert closed.flags == "SI"
    assert client.closed and upstream.transport.closed
    assert not client.aborted  # closed, so what was buffered still goes out
    assert 0.3 <= closed.duration < 2.0


def test_the_access_log_line_names_the_connection() -> None:
    log = AccessLog()
    log.tcp(
        TcpRecord(
            "outbound",
            "10.0.0.1:40000",
            "10.0.0.9:443",
            protocol="tls",
            server_name="api.example.com",
            bytes_received=517,
            bytes_sent=4096,
            duration=0.25,
        )
    )
    [line] = log.lines
    fields = json.loads(line)
    assert fields["sni"] == "api.example.com"
    assert fields["upstream"] == "10.0.0.9:443"
    assert (fields["bytes_received"], fields["bytes_sent"]) == (517, 4096)
    assert fields["duration_ms"] == 250.0
    assert fields["flags"] == "-"


# --- over real sockets on 127.0.0.1 ---------------------------------------------------------


async def serve(handler: Any, **kwargs: Any) -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, **kwargs)
    async with server:
        yield server.sockets[0].getsockname()[:2]


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, int]]:
    async for address in serve(echo_until_eof):
        yield address


async def relay_to(
    address: tuple[str, int], observed: Observed, sniff: SniffSettings | None = None
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    factory = relay_listener(lambda _: address, observer=observed, sniff=sniff)
    return await loop.create_server(factory, "127.0.0.1", 0)


async def test_bytes_pass_untouched_both_ways_with_half_close(echo: tuple[str, int]) -> None:
    observed = Observed()
    relay = await relay_to(echo, observed)
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    async with relay, asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(*relay.sockets[0].getsockname()[:2])
        writer.write(payload)
        writer.write_eof()  # half-close: the echo must still come back
        received = await reader.read(-1)
        writer.close()
        [closed] = await observed.wait_closed()
    assert received == payload + b"<eof>"
    assert closed.protocol == "tcp"
    assert (closed.bytes_received, closed.bytes_sent) == (len(payload), len(payload) + 5)


async def test_a_slow_reader_gets_every_byte(echo: tuple[str, int]) -> None:
    observed = Observed()
    relay = await relay_to(echo, observed)
    payload = b"x" * (4 * 1024 * 1024)
    async with relay, asyncio.timeout(WAIT * 2):
        reader, writer = await asyncio.open_connection(*relay.sockets[0].getsockname()[:2])

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        received = bytearray()
        while chunk := await reader.read(16384):
            received += chunk
            if len(received) < 1024 * 1024:
                await asyncio.sleep(0.001)  # slow at first: the relay must hold back, not drop
        await sending
        writer.close()
    assert bytes(received) == payload + b"<eof>"


async def test_a_server_that_speaks_first_is_relayed_after_the_detection_window() -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 smtp.example ESMTP ready\r\n")
        line = await reader.readline()
        writer.write(b"250 hello " + line)
        await writer.drain()
        writer.close()

    observed = Observed()
    async for address in serve(banner):
        relay = await relay_to(address, observed, SniffSettings(detect_timeout=0.05))
        async with relay, asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(*relay.sockets[0].getsockname()[:2])
            greeting = await reader.readline()  # the client says nothing until it hears this
            writer.write(b"EHLO client\r\n")
            answer = await reader.read(-1)
            writer.close()
            [closed] = await observed.wait_closed()
    assert greeting == b"220 smtp.example ESMTP ready\r\n"
    assert answer == b"250 hello EHLO client\r\n"
    assert closed.protocol == "tcp"


async def test_a_tls_handshake_passes_through_untouched_and_its_sni_is_read() -> None:
    server_context, client_context = tls_contexts("payments.example")

    async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"secret: " + await reader.readline())
        await writer.drain()
        writer.close()

    observed = Observed()
    async for address in serve(tls_echo, ssl=server_context):
        relay = await relay_to(address, observed)
        async with relay, asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(
                *relay.sockets[0].getsockname()[:2],
                ssl=client_context,
                server_hostname="payments.example",
            )
            writer.write(b"hello over tls\n")
            answer = await reader.read(-1)
            writer.close()
            [closed] = await observed.wait_closed()
    assert answer == b"secret: hello over tls\n"  # the certificate verified: nothing in between
    assert (closed.protocol, closed.server_name) == ("tls", "payments.example")
