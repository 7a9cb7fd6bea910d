"""Deciding what a connection speaks: bytes fed to a Sniffer, and silence timed by the loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
import uvloop

from sidecar.protocol.detect import Detected
from sidecar.transport.sniffer import FirstBytes, Sniffer, SniffSettings
from tests.sidecar.protocol.tls_hellos import real_client_hello
from tests.sidecar.transport.relay_fixtures import WAIT, FakeTransport

FAST = SniffSettings(detect_timeout=0.02, decide_timeout=0.05)


class Decisions:
    def __init__(self) -> None:
        self.made: list[FirstBytes] = []
        self.event = asyncio.Event()

    def __call__(self, first: FirstBytes) -> None:
        self.made.append(first)
        self.event.set()

    async def one(self) -> FirstBytes:
        async with asyncio.timeout(WAIT):
            await self.event.wait()
        await asyncio.sleep(0.1)  # a second decision would show up here
        [first] = self.made
        return first


def sniffing(settings: SniffSettings = FAST) -> tuple[Sniffer, FakeTransport, Decisions]:
    decisions = Decisions()
    sniffer = Sniffer(decisions, settings)
    transport = FakeTransport()
    transport.set_protocol(sniffer)
    sniffer.connection_made(transport)
    return sniffer, transport, decisions


async def test_an_http_request_is_decided_when_its_version_arrives_with_every_byte() -> None:
    sniffer, transport, decisions = sniffing()
    sniffer.data_received(b"GET /orders HT")
    assert decisions.made == []
    sniffer.data_received(b"TP/1.1\r\nHost: orders\r\n\r\n")
    first = await decisions.one()
    assert first.protocol is Detected.HTTP1
    assert first.data == b"GET /orders HTTP/1.1\r\nHost: orders\r\n\r\n"
    assert first.transport is transport and not first.ended


async def test_a_silent_client_is_tcp_after_the_detection_window() -> None:
    _, _, decisions = sniffing()
    started = asyncio.get_running_loop().time()
    first = await decisions.one()
    assert first.protocol is Detected.TCP
    assert first.data == b""
    assert asyncio.get_running_loop().time() - started >= FAST.detect_timeout


async def test_a_tls_client_hello_is_read_whole_for_its_server_name() -> None:
    hello = real_client_hello("payments.example", ("h2",))
    sniffer, _, decisions = sniffing()
    sniffer.data_received(hello[:40])
    sniffer.data_received(hello[40:100])
    assert decisions.made == []  # TLS already, but the name is still to come
    sniffer.data_received(hello[100:])
    first = await decisions.one()
    assert first.protocol is Detected.TLS
    assert first.hello is not None and first.hello.server_name == "payments.example"
    assert first.data == hello


async def test_bytes_that_stop_before_deciding_are_tcp_after_the_decide_timeout() -> None:
    sniffer, _, decisions = sniffing()
    sniffer.data_received(b"GE")
    first = await decisions.one()
    assert (first.protocol, first.data) == (Detected.TCP, b"GE")


async def test_a_tls_hello_cut_short_is_tls_without_a_name() -> None:
    hello = real_client_hello("payments.example", ())
    sniffer, _, decisions = sniffing()
    sniffer.data_received(hello[:50])
    first = await decisions.one()
    assert first.protocol is Detected.TLS
    assert first.hello is None


async def test_a_client_that_half_closes_is_decided_with_what_it_sent() -> None:
    sniffer, _, decisions = sniffing()
    sniffer.data_received(b"QUI")  # could still be a request line
    assert sniffer.eof_received() is True  # the answer may still be written
    first = await decisions.one()
    assert (first.protocol, first.data, first.ended) == (Detected.TCP, b"QUI", True)


async def test_a_client_gone_before_deciding_is_never_decided() -> None:
    sniffer, _, decisions = sniffing()
    sniffer.data_received(b"GET / HT")
    sniffer.connection_lost(None)
    await asyncio.sleep(FAST.decide_timeout * 2)
    assert decisions.made == []


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop])
def test_bytes_that_arrived_while_the_loop_was_busy_past_the_window_still_count(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    """A loop blocked past the window must read what is waiting before its timer says silent."""

    async def scenario() -> FirstBytes:
        decisions = Decisions()
        accepted = asyncio.Event()

        def factory() -> Sniffer:
            accepted.set()
            return Sniffer(decisions, SniffSettings(detect_timeout=0.05))

        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        async with server, asyncio.timeout(WAIT):
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
            await accepted.wait()
            await asyncio.sleep(0)  # connection_made has run: the window is open
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            time.sleep(0.2)  # the loop is busy past the window; the bytes are waiting
            first = await decisions.one()
            first.transport.close()
            writer.close()
            await writer.wait_closed()
        return first

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        first = runner.run(scenario())
    assert first.protocol is Detected.HTTP1
