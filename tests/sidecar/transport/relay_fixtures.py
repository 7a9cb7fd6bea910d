"""Pieces for the pass-through tests: a transport that records, and a minimal relay listener.

`FakeTransport` drives a protocol without sockets (uvicorn's way): what the protocol writes,
pauses, half-closes and aborts is recorded, and the test calls the protocol's callbacks.
`relay_listener` is the smallest listener built from the pass-through pieces: a `Sniffer` per
connection, then a `TcpProxy` to wherever `destination` says (the original destination in the
namespace tests). No sidecar wiring: that comes with the listeners' own work.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import trustme

from sidecar.transport.sniffer import FirstBytes, Sniffer, SniffSettings
from sidecar.transport.tcp import TcpObserver, TcpProxy, TcpRecord, TcpSettings

WAIT = 5.0  # the bound on any single wait in these tests


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: tuple[str, int] = ("10.0.0.1", 40000)) -> None:
        super().__init__()
        self.protocol: asyncio.BaseProtocol | None = None
        self.peer = peer
        self.written = bytearray()
        self.eof_written = False
        self.reading = True
        self.closed = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.eof_written, "write after write_eof"
        assert not self.closed, "write after close"
        self.written += data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self._lose(None)

    def abort(self) -> None:
        self.aborted = True
        self._lose(None)

    def _lose(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            protocol = self.protocol
            assert isinstance(protocol, asyncio.Protocol)
            asyncio.get_running_loop().call_soon(protocol.connection_lost, exc)

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    @property
    def proto(self) -> asyncio.Protocol:
        assert isinstance(self.protocol, asyncio.Protocol)
        return self.protocol


class Observed:
    """A TcpObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.opened: list[TcpRecord] = []
        self.closed: list[TcpRecord] = []
        self.changed = asyncio.Event()

    def tcp_opened(self, record: TcpRecord) -> None:
        self.opened.append(record)
        self.changed.set()

    def tcp_closed(self, record: TcpRecord) -> None:
        self.closed.append(record)
        self.changed.set()

    async def wait_closed(self, count: int = 1, timeout: float = WAIT) -> list[TcpRecord]:
        async with asyncio.timeout(timeout):
            while len(self.closed) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.closed


def tls_contexts(server_name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a trustme CA's certificate for `server_name`, and trust in it."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(server_name).configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def echo_until_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo everything, then answer the EOF with `<eof>` and close (a half-close user)."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write(b"<eof>")
    await writer.drain()
    writer.close()


Destination = Callable[[asyncio.Transport], tuple[str, int] | None]


def relay_listener(
    destination: Destination,
    *,
    direction: str = "outbound",
    observer: TcpObserver | None = None,
    sniff: SniffSettings | None = None,
    tcp: TcpSettings | None = None,
) -> Callable[[], Sniffer]:
    """A protocol factory for loop.create_server: sniff, then relay every connection."""

    def decided(first: FirstBytes) -> None:
        target = destination(first.transport)
        if target is None:  # not redirected: a loop, refused
            first.transport.abort()
            return
        peer = first.transport.get_extra_info("peername")
        record = TcpRecord(
            direction=direction,
            downstream=address(peer[0], peer[1]),
            upstream=address(*target),
            protocol=first.protocol.value,
            server_name=(first.hello.server_name or "") if first.hello is not None else "",
        )
        proxy = TcpProxy(
            first.transport,
            target,
            record,
            replay=first.data,
            client_ended=first.ended,
            settings=tcp,
            observer=observer,
        )
        proxy.start()

    return lambda: Sniffer(decided, sniff)
