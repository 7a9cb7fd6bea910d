"""The HTTP/2 upstream side against a hand-written h2 server: a stream the server refused
(GOAWAY below it, or RST_STREAM REFUSED_STREAM) was never processed and is sent again on
another connection; a reset after the response began is the client's UC."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.errors
import h2.events
import httpx
import pytest

from tests.sidecar.grpc_fixtures import raw_grpc_call
from tests.sidecar.proxy_fixtures import WAIT, SidecarProcess, running_sidecar, url

pytestmark = pytest.mark.timeout(30)

# What the server does with the n-th request it receives (0-based): "goaway", "refuse", "hang"
# (no answer ever), "ok"
Script = Callable[[int], str]


@dataclass
class H2Server:
    script: Script
    connections: int = 0
    requests: int = 0
    server: asyncio.Server | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        try:
            while data := await reader.read(65536):
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        n = self.requests
                        self.requests += 1
                        action = self.script(n)
                        sid = event.stream_id
                        if action == "hang":
                            continue  # never answers
                        if action == "goaway":
                            conn.close_connection(last_stream_id=sid - 2 if sid > 1 else 0)
                        elif action == "refuse":
                            conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                        else:
                            conn.send_headers(
                                sid, [(b":status", b"200"), (b"content-length", b"2")]
                            )
                            conn.send_data(sid, b"ok", end_stream=True)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(
                            event.flow_controlled_length,
                            event.stream_id,  # type: ignore[arg-type]
                        )
                writer.write(conn.data_to_send())
                await writer.drain()
        except (ConnectionError, h2.exceptions.ProtocolError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def h2_server(script: Script) -> AsyncIterator[H2Server]:
    server = H2Server(script)
    server.server = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()


def http2_mesh(endpoint: str) -> dict[str, object]:
    return {"services": [{"name": "up", "port": 80, "protocol": "http2", "endpoints": [endpoint]}]}


@pytest.mark.parametrize("refusal", ["goaway", "refuse"])
async def test_a_refused_stream_is_sent_again_on_another_connection(refusal: str) -> None:
    async with (
        h2_server(lambda n: refusal if n == 0 else "ok") as server,
        running_sidecar(http2_mesh(server.address)) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        resp = await client.get(url(sidecar, path="/x"), headers={"host": "up"})
        assert (resp.status_code, resp.text) == (200, "ok")
    assert server.requests == 2
    assert server.connections == (2 if refusal == "goaway" else 1)


async def test_a_refused_stream_is_not_retried_forever() -> None:
    async with (
        h2_server(lambda n: "refuse") as server,
        running_sidecar(http2_mesh(server.address)) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        resp = await client.get(url(sidecar, path="/x"), headers={"host": "up"})
    assert resp.status_code == 503
    assert resp.headers["x-outrigger-flags"] == "UC"
    assert server.requests <= 3


async def test_grpc_timeout_bounds_the_call_in_the_sidecar() -> None:
    """A client that sends grpc-timeout but enforces no deadline itself, and an upstream that
    never answers: the sidecar ends the call with DEADLINE_EXCEEDED (flag UT) at the
    grpc-timeout, well before the route's own 5 s timeout."""
    mesh = {
        "services": [
            {
                "name": "up",
                "port": 80,
                "protocol": "grpc",
                "endpoints": [],
                "policy": {"timeout": "5s"},
            }
        ]
    }
    async with h2_server(lambda n: "hang") as server:
        mesh["services"][0]["endpoints"] = [server.address]  # type: ignore[index]
        async with running_sidecar(mesh) as sidecar:
            host, port = sidecar.addresses["outbound"]
            loop = asyncio.get_running_loop()
            started = loop.time()
            headers, trailers = await raw_grpc_call(
                host, port, b"up", "/test.Echo/Slow", b"3", [(b"grpc-timeout", b"300m")]
            )
            elapsed = loop.time() - started
    assert dict(headers)[b":status"] == b"200"
    assert dict(trailers)[b"grpc-status"] == b"4"
    assert dict(trailers)[b"x-outrigger-flags"] == b"UT"
    assert server.requests == 1
    assert 0.25 < elapsed < 2.5


async def test_an_upstream_stream_silent_past_the_stream_idle_timeout_ends_si(
    tmp_path: Path,
) -> None:
    """An HTTP/1.1 client has no HTTP/2 stream timer of its own: an upstream stream with no
    byte either way for the stream idle timeout is reset by the pool's sweep and answered 408
    SI; the connection goes on carrying the next request."""
    async with h2_server(lambda n: "hang" if n == 0 else "ok") as server:
        proc = await SidecarProcess.spawn(
            tmp_path, http2_mesh(server.address), extra=("--stream-idle-timeout", "500ms")
        )
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                resp = await client.get(proc.url("outbound", "/"), headers={"host": "up"})
                assert resp.status_code == 408
                assert resp.headers["x-outrigger-flags"] == "SI"
                resp = await client.get(proc.url("outbound", "/"), headers={"host": "up"})
                assert resp.status_code == 200
        finally:
            await proc.stop()
    assert (server.requests, server.connections) == (2, 1)
