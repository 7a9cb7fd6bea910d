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

SERVICE = "test.Echo"


@dataclass
class EchoServer:
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    fail_next: list[grpc.StatusCode] = field(default_factory=list)  # popped per call
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

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        await self._seen("ClientStream", context)
        total = 0
        count = 0
        async for message in requests:
            total += len(message)
            count += 1
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

    async def start(self) -> EchoServer:
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
            },
        )
        options = [
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
        self.server = grpc.aio.server(options=options)
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return self


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
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
