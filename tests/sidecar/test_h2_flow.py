"""HTTP/2 flow control through the sidecar: a peer that stops granting window holds back the
other side, not the sidecar's memory, and not the other streams.

A client that reads frames but never sends WINDOW_UPDATE for its stream (the slow reader) must
stop the upstream's response after what the sidecar buffers per stream (its body high water and
one stream window), not after the whole response; an upstream that stops reading a request body
must stop the client's upload the same way. Meanwhile other streams keep moving: the ones of
other clients on the sidecar's shared upstream HTTP/2 connection, and the client's own others on
its connection (a stalled stream must not hold the connection's window). Real sockets, h2 on
both ends written by hand, the sidecar in-process under tracemalloc.
"""

from __future__ import annotations

import asyncio
import contextlib
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import pytest

from sidecar.app import Sidecar
from tests.sidecar.proxy_fixtures import WAIT, running_sidecar

pytestmark = pytest.mark.timeout(60)

TOTAL = 256 * 1024 * 1024  # what the upstream would send, or the client upload, unchecked
BOUND = 16 * 1024 * 1024  # what may pass before backpressure holds (sidecar + kernel buffers)
MEMORY = 8 * 1024 * 1024  # tracemalloc's peak while it holds (measured: about 1 MiB)
CHUNK = b"x" * 65536


@dataclass
class Counter:
    """Bytes an upstream or a client sent, and when that last changed."""

    count: int = 0
    requests: int = 0
    moved_at: float = field(default_factory=lambda: asyncio.get_running_loop().time())

    def add(self, size: int) -> None:
        self.count += size
        self.moved_at = asyncio.get_running_loop().time()

    async def stalled(self, quiet: float = 0.5) -> int:
        """Wait until something moved, then nothing for `quiet` seconds (bounded); the count
        then."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            while not self.count or loop.time() - self.moved_at < quiet:
                await asyncio.sleep(0.1)
        return self.count


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def serving(serve: Serve) -> AsyncIterator[str]:
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, h2.exceptions.ProtocolError):
            await serve(reader, writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.close()
        server.close()


# --- upstreams -----------------------------------------------------------------------------
# Both answer GET /big with TOTAL bytes, as fast as they are taken (counted in `sent`), take
# POST /upload's head and never read its body, and answer anything else with 'ok'.


def h1_upstream(sent: Counter) -> Serve:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while head := await reader.readuntil(b"\r\n\r\n"):
            sent.requests += 1
            if head.startswith(b"POST /upload "):
                await asyncio.Event().wait()
            if not head.startswith(b"GET /big "):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % TOTAL)
            for _ in range(TOTAL // len(CHUNK)):
                writer.write(CHUNK)
                await writer.drain()
                sent.add(len(CHUNK))

    return serve


def h2_upstream(sent: Counter) -> Serve:
    """HTTP/2: /upload's body is never read means no WINDOW_UPDATE for it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        big: dict[int, int] = {}  # stream -> bytes still to send
        unread: set[int] = set()  # /upload streams
        while True:
            for stream_id, left in list(big.items()):
                while left:
                    window = min(
                        conn.local_flow_control_window(stream_id),
                        conn.max_outbound_frame_size,
                        left,
                    )
                    if window <= 0:
                        break
                    conn.send_data(stream_id, CHUNK[:window])
                    sent.add(window)
                    left -= window
                big[stream_id] = left
            writer.write(conn.data_to_send())
            await writer.drain()
            data = await reader.read(65536)
            if not data:
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    sent.requests += 1
                    stream_id = event.stream_id
                    assert stream_id is not None
                    path = dict(event.headers).get(b":path")  # type: ignore[arg-type]
                    if path == b"/upload":
                        unread.add(stream_id)
                        continue
                    conn.send_headers(stream_id, [(b":status", b"200")])
                    if path == b"/big":
                        big[stream_id] = TOTAL
                    else:
                        conn.send_data(stream_id, b"ok", end_stream=True)
                elif isinstance(event, h2.events.DataReceived) and event.stream_id not in unread:
                    conn.acknowledge_received_data(
                        event.flow_controlled_length,
                        event.stream_id,  # type: ignore[arg-type]
                    )

    return serve


# --- the client ------------------------------------------------------------------------------


class Client:
    """An h2 client on one connection to the sidecar's outbound listener. It reads every
    frame; it grants window (WINDOW_UPDATE) only for the streams in `acking`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.acking: set[int] = set()
        self.received: dict[int, int] = {}
        self.ended: dict[int, asyncio.Event] = {}
        self.window = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def open(
        self, authority: bytes, path: bytes, *, body: bytes | None = None, ack: bool = True
    ) -> int:
        """A request; with `body`, a POST whose body is `body` and then whatever `upload`
        sends (b"": nothing yet, the stream stays open)."""
        stream_id = self.conn.get_next_available_stream_id()
        method = b"GET" if body is None else b"POST"
        headers = [(b":method", method), (b":scheme", b"http"), (b":path", path)]
        self.conn.send_headers(
            stream_id, [*headers, (b":authority", authority)], end_stream=body is None
        )
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.received[stream_id] = 0
        self.ended[stream_id] = asyncio.Event()
        if ack:
            self.acking.add(stream_id)
        self.flush()
        return stream_id

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())

    async def run(self) -> None:
        while data := await self.reader.read(65536):
            for event in self.conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    stream_id = event.stream_id
                    assert stream_id is not None
                    self.received[stream_id] += len(event.data or b"")
                    if stream_id in self.acking:
                        self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset):
                    stream_id = event.stream_id
                    assert stream_id is not None
                    self.ended[stream_id].set()
                elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                    self.window.set()
            self.flush()

    async def upload(self, stream_id: int, sent: Counter) -> None:
        """Send TOTAL bytes on the stream as the sidecar's windows allow (until cancelled)."""
        while sent.count < TOTAL:
            conn = self.conn
            window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
            if window <= 0:
                self.window.clear()
                await self.window.wait()
                continue
            conn.send_data(stream_id, CHUNK[:window])
            sent.add(window)
            self.flush()
            await self.writer.drain()


@contextlib.asynccontextmanager
async def client(sidecar: Sidecar) -> AsyncIterator[Client]:
    host, port = sidecar.addresses["outbound"]
    reader, writer = await asyncio.open_connection(host, port)
    c = Client(reader, writer)
    c.conn.initiate_connection()
    c.flush()
    c.task = asyncio.get_running_loop().create_task(c.run())
    try:
        yield c
    finally:
        c.task.cancel()
        writer.close()


def mesh(protocol: str, endpoint: str) -> dict[str, object]:
    return {"services": [{"name": "up", "port": 80, "protocol": protocol, "endpoints": [endpoint]}]}


@contextlib.asynccontextmanager
async def traced() -> AsyncIterator[list[int]]:
    """tracemalloc around the block; yields a list that gets the peak (bytes) at the end."""
    tracemalloc.start()
    peak: list[int] = []
    try:
        yield peak
    finally:
        peak.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()


# --- the tests -------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["http", "http2"])
async def test_a_client_that_grants_no_window_holds_back_the_upstream(protocol: str) -> None:
    """The client takes the first stream window of a 256 MiB response and grants no more:
    the upstream stops after a bounded amount, the sidecar's memory stays bounded, and a
    second client's request to the same upstream (for HTTP/2: the same multiplexed
    connection) is answered meanwhile."""
    sent = Counter()
    serve = h2_upstream(sent) if protocol == "http2" else h1_upstream(sent)
    async with (
        serving(serve) as address,
        running_sidecar(mesh(protocol, address)) as sidecar,
        traced() as peak,
        client(sidecar) as slow,
    ):
        stream_id = slow.open(b"up", b"/big", ack=False)
        stalled = await sent.stalled()
        assert slow.received[stream_id] <= 65535  # one stream window, never granted more
        assert 0 < stalled < BOUND, f"the upstream sent {stalled} bytes"
        async with client(sidecar) as other:
            small = other.open(b"up", b"/small")
            async with asyncio.timeout(WAIT):
                await other.ended[small].wait()
            assert other.received[small] == 2
        assert sent.count < BOUND  # still held back
    assert peak[0] < MEMORY, f"tracemalloc peak {peak[0]} bytes"


@pytest.mark.parametrize("protocol", ["http", "http2"])
async def test_an_upstream_that_stops_reading_holds_back_the_client(protocol: str) -> None:
    """The upstream takes the request head and none of a 256 MiB body: the client's upload
    stops after a bounded amount, the sidecar's memory stays bounded, and the client's other
    streams on the same connection still get their answers."""
    uploaded = Counter()
    serve = h2_upstream(Counter()) if protocol == "http2" else h1_upstream(Counter())
    async with (
        serving(serve) as address,
        serving(h1_upstream(Counter())) as ok_address,
        running_sidecar(
            {
                "services": [
                    {"name": "up", "port": 80, "protocol": protocol, "endpoints": [address]},
                    {"name": "ok", "port": 80, "endpoints": [ok_address]},
                ]
            }
        ) as sidecar,
        traced() as peak,
        client(sidecar) as fast,
    ):
        stream_id = fast.open(b"up", b"/upload", body=b"")
        upload = asyncio.get_running_loop().create_task(fast.upload(stream_id, uploaded))
        try:
            stalled = await uploaded.stalled()
            assert 0 < stalled < BOUND, f"the client uploaded {stalled} bytes"
            assert not upload.done()
            other = fast.open(b"ok", b"/small", body=b"a small body")
            async with asyncio.timeout(WAIT):
                await fast.ended[other].wait()
            assert fast.received[other] == 2
        finally:
            upload.cancel()
    assert peak[0] < MEMORY, f"tracemalloc peak {peak[0]} bytes"
