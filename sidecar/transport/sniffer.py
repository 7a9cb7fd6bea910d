"""The first protocol on an intercepted connection: what does the client speak?

A `Sniffer` reads the client's first bytes until `detect` decides (HTTP/1.x, the HTTP/2 preface,
TLS, or TCP) and then calls `decided(FirstBytes)`, which hands the transport to the protocol
that serves it and replays the bytes read. For TLS it reads on to the end of the ClientHello, so
the server name is known before anything connects upstream. It waits at most:

- `detect_timeout` (100 ms, --detect-timeout) for the first byte: a client still silent then
  is TCP. That is how protocols where the server speaks first (MySQL, SMTP, ...) pass.
- `decide_timeout` (1 s) from the first byte for the rest of what decides (a request line or a
  ClientHello split over reads); then what was read decides: TCP, or TLS without a server name.

Bytes that arrived while the loop was busy past the window still count: both asyncio's loop and
libuv (since 1.45) poll for input before they run the timers that fell due meanwhile (a test
holds both to it). Bytes are held until a decision, at most `MAX_SNIFF`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from sidecar.protocol.detect import DETECT_TIMEOUT, MAX_REQUEST_LINE, Detected, detect
from sidecar.protocol.tls import ClientHello, NeedMore, parse_client_hello

MAX_SNIFF: Final = 128 * 1024  # a ClientHello in tiny records still fits


@dataclass(frozen=True, slots=True)
class SniffSettings:
    detect_timeout: float = DETECT_TIMEOUT
    decide_timeout: float = 1.0
    max_request_line: int = MAX_REQUEST_LINE


@dataclass(frozen=True, slots=True)
class FirstBytes:
    transport: asyncio.Transport
    protocol: Detected
    data: bytes  # everything read so far: the next protocol replays it
    ended: bool  # the client half-closed already
    hello: ClientHello | None  # TLS: the ClientHello, when it was read whole


class Sniffer(asyncio.Protocol):
    __slots__ = (
        "buffer",
        "decided",
        "done",
        "ended",
        "loop",
        "settings",
        "timer",
        "transport",
    )

    def __init__(
        self, decided: Callable[[FirstBytes], None], settings: SniffSettings | None = None
    ) -> None:
        self.decided = decided
        self.settings = settings or SniffSettings()
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False
        self.done = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.timer = self.loop.call_later(self.settings.detect_timeout, self._silent)

    def data_received(self, data: bytes) -> None:
        if self.done:
            return
        if not self.buffer and self.timer is not None:
            self.timer.cancel()
            self.timer = self.loop.call_later(self.settings.decide_timeout, self._decide_now)
        self.buffer += data
        self._try(final=len(self.buffer) >= MAX_SNIFF)

    def eof_received(self) -> bool:
        self.ended = True
        if not self.done:
            self._try(final=True)
        return True  # the next protocol may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()

    def _silent(self) -> None:
        if not self.done and not self.buffer:
            self._decide(Detected.TCP, None)

    def _decide_now(self) -> None:
        if not self.done:
            self._try(final=True)

    def _try(self, *, final: bool) -> None:
        data = bytes(self.buffer)
        kind = detect(data, self.settings.max_request_line)
        hello: ClientHello | None = None
        if kind is Detected.TLS:
            result = parse_client_hello(data)
            if isinstance(result, NeedMore) and not final:
                return
            hello = result if isinstance(result, ClientHello) else None
        elif kind is None:
            if not final:
                return
            kind = Detected.TCP
        self._decide(kind, hello)

    def _decide(self, kind: Detected, hello: ClientHello | None) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        assert self.transport is not None
        self.decided(FirstBytes(self.transport, kind, bytes(self.buffer), self.ended, hello))
