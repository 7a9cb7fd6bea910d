"""The asyncio Protocol under the demo's apps and the load generator: bytes from the socket go
to an httptools (llhttp) parser, whose callbacks are the subclass's; input that is not HTTP/1.1
goes to `refuse`."""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

import httptools


class _Parser(Protocol):
    def feed_data(self, data: bytes) -> None: ...


class ParsingProtocol(asyncio.Protocol):
    parser: _Parser  # the subclass's httptools.HttpRequestParser or HttpResponseParser
    transport: asyncio.Transport | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.refuse()

    def refuse(self) -> None:
        """What the peer sent is not HTTP/1.1 (llhttp said so)."""
        raise NotImplementedError
