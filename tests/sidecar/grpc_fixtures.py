"""A real grpcio server and client for the HTTP/2 tests: the four call shapes, bytes in and out.

`EchoServer` is a grpc.aio server on 127.0.0.1 port 0 serving `/test.Echo/*` with identity
(de)serializers, so messages are whatever bytes a test sends. It records every call it saw and
can be told to fail the next N calls with a status (for retries and breakers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.events

SERVICE = "test.Echo"


@dataclass
class EchoServer:
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    fail_next: list[grpc.StatusCode] = field(default_factory=list)  # popped per call
    # Popped per call late: ServerStream after its first message (the status in the trailers
    # after it), ClientStream after reading every message
    fail_late: list[grpc.StatusCode] = field(default_factory=list)
    server: grpc.aio.Server | None = None
    port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _seen(self, method: str, context: grpc.aio.ServicerContext) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append((method, metadata))
        if self.fail_next:
            code = self.fail_next.pop(0)
            await context.abort(code, f"told to fail with {code.name}")
        echo = metadata.get("x-echo")
        if echo is not None:
            await context.send_initial_metadata((("x-echoed", echo),))
            context.set_trailing_metadata((("x-trailer", echo + "-done"),))

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await self._seen("Unary", context)
        return request[::-1]

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await self._seen("ServerStream", context)
        count = int(request.split(b":")[0])
        for i in range(count):
            yield b"%d:" % i + request
            if self.fail_late:
                code = self.fail_late.pop(0)
                await context.abort(code, f"told to fail with {code.name} after a message")

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        await self._seen("ClientStream", context)
        total = 0
        count = 0
        async for message in requests:
            total += len(message)
            count += 1
        if self.fail_late:
            code = self.fail_late.pop(0)
            await context.abort(code, f"told to fail with {code.name} after {count} messages")
        return b"%d messages, %d bytes" % (count, total)

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        await self._seen("Bidi", context)
        async for message in requests:
            yield message.upper()

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Answers after `request` seconds."""
        await self._seen("Slow", context)
        await asyncio.sleep(float(request))
        return b"late"

    async def ticks(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """`count:interval`: count messages, interval seconds apart."""
        await self._seen("Ticks", context)
        count, interval = request.split(b":")
        for i in range(int(count)):
            await asyncio.sleep(float(interval))
            yield b"tick %d" % i

    async def one_then_unavailable(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """One message, then UNAVAILABLE in the trailers (not trailers-only)."""
        await self._seen("OneThenUnavailable", context)
        yield b"first"
        await context.abort(grpc.StatusCode.UNAVAILABLE, "gone after one message")

    async def headers_first(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        """Initial metadata first (HEADERS on the wire), then the answer, or the status it is
        told to fail with in the trailers, no message before it (not trailers-only)."""
        self.calls.append(("HeadersFirst", {}))
        await context.send_initial_metadata((("x-early", "sent"),))
        if self.fail_next:
            code = self.fail_next.pop(0)
            await context.abort(code, f"told to fail with {code.name} after the headers")
        return request[::-1]

    async def start(self, max_streams: int | None = None) -> EchoServer:
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
                "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
                "Ticks": grpc.unary_stream_rpc_method_handler(self.ticks),
                "OneThenUnavailable": grpc.unary_stream_rpc_method_handler(
                    self.one_then_unavailable
                ),
                "HeadersFirst": grpc.unary_unary_rpc_method_handler(self.headers_first),
            },
        )
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        if max_streams is not None:
            options.append(("grpc.max_concurrent_streams", max_streams))
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self


@contextlib.asynccontextmanager
async def echo_server(max_streams: int | None = None) -> AsyncIterator[EchoServer]:
    """`max_streams`: the server's SETTINGS_MAX_CONCURRENT_STREAMS."""
    server = await EchoServer().start(max_streams)
    try:
        yield server
    finally:
        assert server.server is not None
        await server.server.stop(grace=None)


@contextlib.asynccontextmanager
async def channel(target: str, authority: str) -> AsyncIterator[grpc.aio.Channel]:
    """A client channel to `target` that names `authority` (what a gRPC client dialling the
    service by name sends as :authority)."""
    options = [
        ("grpc.default_authority", authority),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.enable_retries", 0),
    ]
    async with grpc.aio.insecure_channel(target, options=options) as ch:
        yield ch


async def raw_grpc_call(
    host: str,
    port: int,
    authority: bytes,
    path: str,
    message: bytes,
    extra: list[tuple[bytes, bytes]],
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    """One unary gRPC call written with h2 by hand; (response headers, trailers). A
    trailers-only answer comes back as headers with no trailers: then both are the same."""
    reader, writer = await asyncio.open_connection(host, port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding=None))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *extra,
        ],
    )
    conn.send_data(1, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
    writer.write(conn.data_to_send())
    headers: list[tuple[bytes, bytes]] = []
    trailers: list[tuple[bytes, bytes]] = []
    try:
        async with asyncio.timeout(10):
            while True:
                data = await reader.read(65536)
                assert data, "the sidecar closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        headers = list(event.headers)  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = list(event.headers)  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.StreamEnded):
                        return headers, trailers or headers
                writer.write(conn.data_to_send())
    finally:
        writer.close()
