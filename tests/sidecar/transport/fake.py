"""A transport with no socket, for driving the sidecar's protocols byte by byte (uvicorn's way).

`FakeTransport` records what a protocol does to its connection (writes, write_eof, close, abort,
pause/resume of reading) and lets the test play the peer: `peer_sends(bytes)` is
`data_received`, `peer_closes()` is an EOF, `peer_stops_reading()` is the kernel's send buffer
filling up (`pause_writing`). It keeps a real transport's rules where they matter to the code
under test:

* while reading is paused, the peer's bytes (and its EOF) wait, as they would in the socket,
  and arrive on the loop's next turn after `resume_reading`;
* `close` and `abort` report `connection_lost` on the loop's next turn, once;
* an EOF whose `eof_received` does not ask to stay open closes the transport;
* bytes written after an abort go nowhere, and writing after `write_eof` raises.

`FakeConnector` stands in for `loop.create_connection` (the pool's `Connect`): every connection
it opens is a `FakeTransport` the test can answer on. `until` and `settle` run the loop.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from sidecar.transport.upstream import UpstreamConnection

WAIT = 2.0  # the bound on any single wait in these tests (nothing here touches the network)


class FakeTransport(asyncio.Transport):
    def __init__(self, protocol: asyncio.Protocol, *, can_write_eof: bool = True) -> None:
        super().__init__()
        self.protocol = protocol
        self.writes: list[bytes] = []
        self.eof_written = False
        self.closed = False  # close() or abort() was called
        self.aborted = False
        self.lost = False  # connection_lost was delivered
        self.reading = True
        self.read_pauses = 0  # how many times reading went from on to off
        self.write_paused = False  # the protocol was told to stop writing
        self._can_write_eof = can_write_eof
        self._taken = 0
        self._inbox: deque[bytes] = deque()

    def connect(self) -> FakeTransport:
        """Hand this transport to its protocol (`connection_made`)."""
        self.protocol.connection_made(self)
        return self

    # --- what the protocol sees (asyncio.Transport) --------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not self.aborted:
            self.writes.append(bytes(data))

    def write_eof(self) -> None:
        if not self._can_write_eof:
            raise NotImplementedError("this transport cannot half-close")
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return self._can_write_eof

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().call_soon(self._lose, None)

    def abort(self) -> None:
        if not self.aborted:
            self.aborted = True
            if not self.closed:
                self.closed = True
                asyncio.get_running_loop().call_soon(self._lose, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        if self.reading:
            self.read_pauses += 1
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            asyncio.get_running_loop().call_soon(self._deliver)

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return 1 << 20 if self.write_paused else 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    # --- what the test sees ----------------------------------------------------------------

    @property
    def written(self) -> bytes:
        """Every byte the protocol wrote."""
        return b"".join(self.writes)

    @property
    def fresh(self) -> bytes:
        """The bytes written since the last `take`."""
        return self.written[self._taken :]

    def take(self) -> bytes:
        """The bytes written since the last `take`, marked as seen."""
        data = self.fresh
        self._taken += len(data)
        return data

    @property
    def waiting(self) -> bytes:
        """The peer's bytes not delivered yet because reading is paused."""
        return b"".join(self._inbox)

    # --- what the peer (and the kernel) do -------------------------------------------------

    def peer_sends(self, data: bytes) -> None:
        assert data, "an empty send is an EOF: use peer_closes()"
        self._inbox.append(data)
        self._deliver()

    def peer_closes(self) -> None:
        """The peer's EOF (it may keep reading: a half-close)."""
        self._inbox.append(b"")
        self._deliver()

    def peer_resets(self) -> None:
        """The connection is gone at once (RST): nothing waiting is delivered."""
        self._inbox.clear()
        self.closed = True
        self._lose(ConnectionResetError("connection reset by peer"))

    def peer_stops_reading(self) -> None:
        """Our send buffer fills up: the protocol is told to pause writing."""
        if not self.write_paused:
            self.write_paused = True
            self.protocol.pause_writing()

    def peer_reads(self) -> None:
        """Our send buffer drains: the protocol is told to resume writing."""
        if self.write_paused:
            self.write_paused = False
            self.protocol.resume_writing()

    # --- internals ---------------------------------------------------------------------------

    def _deliver(self) -> None:
        while self._inbox and self.reading and not self.closed:
            data = self._inbox.popleft()
            if not data:  # the peer's EOF
                if not self.protocol.eof_received():
                    self.close()
                return
            self.protocol.data_received(data)

    def _lose(self, exc: Exception | None) -> None:
        if not self.lost:
            self.lost = True
            self.protocol.connection_lost(exc)


class FakeConnector:
    """`Connect` for an `Upstreams`: each new connection is a `FakeTransport` (in `opened`)."""

    def __init__(self) -> None:
        self.opened: list[FakeTransport] = []
        self.refuse: OSError | None = None  # set to make the next connects fail

    async def __call__(
        self, factory: Callable[[], UpstreamConnection], host: str, port: int
    ) -> tuple[asyncio.BaseTransport, UpstreamConnection]:
        if self.refuse is not None:
            raise self.refuse
        protocol = factory()
        transport = FakeTransport(protocol).connect()
        self.opened.append(transport)
        return transport, protocol

    async def connection(self, index: int) -> FakeTransport:
        """The index-th connection opened (0 is the first), once it is open."""
        await until(lambda: len(self.opened) > index)
        return self.opened[index]


async def until(predicate: Callable[[], object], timeout: float = WAIT) -> None:
    """Run the loop until `predicate()` holds; TimeoutError after `timeout` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)


async def settle(turns: int = 20) -> None:
    """Let the loop run every callback that is ready, and what those make ready, a few turns
    deep: for asserting that something did not happen."""
    for _ in range(turns):
        await asyncio.sleep(0)
