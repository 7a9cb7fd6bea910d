"""Shared pieces for the end-to-end proxy tests (tests/sidecar/test_proxy_*.py).

Everything here binds real sockets on 127.0.0.1 port 0:

* `Upstream`: a raw `asyncio.start_server` whose handler gets an `UpstreamConn` with byte-exact
  helpers (read one request, write anything), and which counts accepted connections and records
  every request it parsed, so a test can say what the upstream saw (or that it saw nothing).
* `running_sidecar`: a real `Sidecar` in this process, listeners on port 0.
* `SidecarProcess`: a real `outrigger sidecar` subprocess, ports parsed from its "listening" line.
* `RawClient` / `read_response`: a byte-level HTTP/1.1 client for malformed input and framing.

Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh.model import parse_mesh
from sidecar.app import Sidecar
from sidecar.settings import SidecarSettings
from sidecar.transport.server import ServerSettings
from sidecar.xds.interpret import snapshot_from_mesh

WAIT = 5.0  # the bound on any single wait in these tests
Headers = list[tuple[bytes, bytes]]


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def header_names(headers: Headers) -> set[bytes]:
    return {key for key, _ in headers}


def parse_head(raw: bytes) -> tuple[list[bytes], Headers]:
    """Start line split in three, and lower-cased header names (test side: plain splitting)."""
    lines = raw[: raw.index(b"\r\n\r\n")].split(b"\r\n")
    start = lines[0].split(b" ", 2)
    headers: Headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.lower(), value.strip(b" \t")))
    return start, headers


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailers
            return bytes(body)
        body += await reader.readexactly(size)
        assert await reader.readexactly(2) == b"\r\n"


# --- upstream -------------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the upstream saw it on the wire."""

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    body: bytes
    raw_head: bytes
    chunked: bool

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)


class UpstreamConn:
    def __init__(
        self, upstream: Upstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.upstream = upstream
        self.reader = reader
        self.writer = writer

    async def read_head(self) -> Received | None:
        """The next request head (body not read), or None at EOF."""
        try:
            raw = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.upstream.leftover.append(exc.partial)
            return None
        except ConnectionError:
            return None
        start, headers = parse_head(raw)
        te = header(headers, b"transfer-encoding")
        return Received(
            start[0], start[1], start[2], headers, b"", raw, te is not None and b"chunked" in te
        )

    async def read_body(self, req: Received) -> bytes:
        if req.chunked:
            req.body = await read_chunked(self.reader)
        else:
            length = header(req.headers, b"content-length")
            req.body = await self.reader.readexactly(int(length)) if length else b""
        return req.body

    async def read_request(self) -> Received | None:
        req = await self.read_head()
        if req is None:
            return None
        await self.read_body(req)
        self.upstream.requests.append(req)
        self.upstream.request_arrived.set()
        return req

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


UpstreamHandler = Callable[[UpstreamConn], Awaitable[None]]


def ok(body: bytes = b"ok", status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def serve(respond: Callable[[Received], bytes | Awaitable[bytes]]) -> UpstreamHandler:
    """A keep-alive upstream: for each request on the connection, write `respond(request)`."""

    async def handler(conn: UpstreamConn) -> None:
        while (req := await conn.read_request()) is not None:
            out = respond(req)
            if not isinstance(out, bytes):
                out = await out
            await conn.send(out)

    return handler


@dataclass
class Upstream:
    handler: UpstreamHandler
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    leftover: list[bytes] = field(default_factory=list)
    request_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.AbstractServer | None = None
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(UpstreamConn(self, reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            self._writers.discard(writer)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=WAIT)
        if self.server is not None:
            async with asyncio.timeout(WAIT):
                await self.server.wait_closed()


@contextlib.asynccontextmanager
async def upstream(handler: UpstreamHandler) -> AsyncIterator[Upstream]:
    up = await Upstream(handler).start()
    try:
        yield up
    finally:
        await up.close()


# --- the sidecar ----------------------------------------------------------------------------


def mesh_doc(
    services: dict[str, list[str]] | None = None,
    *,
    policy: str = "allow_any",
    service_policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "outbound_policy": policy,
        "services": [
            {
                "name": name,
                "port": 80,
                "endpoints": endpoints,
                **({"policy": service_policy} if service_policy else {}),
            }
            for name, endpoints in (services or {}).items()
        ],
    }


def settings_namespace(app: str = "127.0.0.1:9", drain_timeout: str = "2s") -> argparse.Namespace:
    return argparse.Namespace(
        config=None,
        mesh=None,
        control_plane=None,
        service="frontend",
        namespace=None,
        node_id="frontend~test",
        outbound="127.0.0.1:0",
        inbound="127.0.0.1:0",
        app=app,
        admin="127.0.0.1:0",
        drain_timeout=drain_timeout,
        snapshot_cache=None,
        access_log=None,
    )


@contextlib.asynccontextmanager
async def running_sidecar(
    mesh: dict[str, Any] | None = None,
    *,
    app: str = "127.0.0.1:9",
    server: ServerSettings | None = None,
) -> AsyncIterator[Sidecar]:
    sidecar = Sidecar(SidecarSettings.from_args(settings_namespace(app)), server=server)
    sidecar.apply(snapshot_from_mesh(parse_mesh(mesh or mesh_doc(), "<test>")))
    async with asyncio.timeout(WAIT):
        await sidecar.start()
    try:
        yield sidecar
    finally:
        async with asyncio.timeout(WAIT):
            await sidecar.drain()
        for pool in sidecar.upstreams.pools.values():
            for conn in [*pool.in_use, *pool.idle]:
                conn.abort()
        await asyncio.sleep(0)  # let aborted transports run connection_lost


def url(sidecar: Sidecar, listener: str = "outbound", path: str = "/") -> str:
    host, port = sidecar.addresses[listener]
    return f"http://{host}:{port}{path}"


_LISTENING = re.compile(rb"outrigger sidecar listening (.*)")


class SidecarProcess:
    """`outrigger sidecar --mesh FILE ...` as a child process."""

    def __init__(self, proc: asyncio.subprocess.Process, addresses: dict[str, tuple[str, int]]):
        self.proc = proc
        self.addresses = addresses

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, listener: str = "outbound", path: str = "/") -> str:
        host, port = self.addresses[listener]
        return f"http://{host}:{port}{path}"

    def status(self, key: str) -> int:
        """A /proc/PID/status size in KiB (VmHWM, VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    async def wait(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    @classmethod
    async def spawn(
        cls,
        tmp_path: Path,
        mesh: dict[str, Any] | None,
        *,
        app: str = "127.0.0.1:9",
        drain_timeout: str = "5s",
        extra: tuple[str, ...] = (),
    ) -> SidecarProcess:
        """The process, once it printed where it listens; `mesh` None: no --mesh (give
        --control-plane in `extra`, or run on the embedded default)."""
        source: tuple[str, ...] = ()
        if mesh is not None:
            mesh_file = tmp_path / "mesh.yaml"
            mesh_file.write_text(yaml.safe_dump(mesh))
            source = ("--mesh", str(mesh_file))
        outrigger = Path(sys.executable).parent / "outrigger"
        stderr = (tmp_path / "sidecar.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                str(outrigger),
                "sidecar",
                *source,
                "--service",
                "frontend",
                "--outbound",
                "127.0.0.1:0",
                "--inbound",
                "127.0.0.1:0",
                "--app",
                app,
                "--admin",
                "127.0.0.1:0",
                "--drain-timeout",
                drain_timeout,
                *extra,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        finally:
            stderr.close()
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(15):
                while True:
                    line = await proc.stdout.readline()
                    if not line:
                        log = (tmp_path / "sidecar.log").read_text()
                        raise AssertionError(f"sidecar exited before listening:\n{log}")
                    match = _LISTENING.search(line)
                    if match:
                        break
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        addresses: dict[str, tuple[str, int]] = {}
        for part in match.group(1).decode().split():
            name, _, hostport = part.partition("=")
            host, _, port = hostport.rpartition(":")
            addresses[name] = (host, int(port))
        return cls(proc, addresses)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.wait(WAIT)
        # Close the stdout pipe transport now, so it is not collected after the loop closes.
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport.close()


@contextlib.asynccontextmanager
async def sidecar_process(
    tmp_path: Path, mesh: dict[str, Any], *, app: str = "127.0.0.1:9", drain_timeout: str = "5s"
) -> AsyncIterator[SidecarProcess]:
    proc = await SidecarProcess.spawn(tmp_path, mesh, app=app, drain_timeout=drain_timeout)
    try:
        yield proc
    finally:
        await proc.stop()


# --- a raw client ---------------------------------------------------------------------------


@dataclass
class RawResponse:
    version: bytes
    status: int
    reason: bytes
    headers: Headers
    body: bytes
    raw_head: bytes

    def header(self, name: bytes) -> bytes | None:
        return header(self.headers, name)


async def read_response(
    reader: asyncio.StreamReader, *, method: bytes = b"GET", interim: bool = False
) -> RawResponse:
    """One response; 1xx are returned only when `interim` (else skipped)."""
    while True:
        raw = await reader.readuntil(b"\r\n\r\n")
        start, headers = parse_head(raw)
        status = int(start[1])
        if 100 <= status < 200 and status != 101 and not interim:
            continue
        break
    reason = start[2] if len(start) > 2 else b""
    te = header(headers, b"transfer-encoding")
    length = header(headers, b"content-length")
    if method == b"HEAD" or 100 <= status < 200 or status in (204, 304):
        body = b""
    elif te is not None:
        body = await read_chunked(reader)
    elif length is not None:
        body = await reader.readexactly(int(length))
    else:
        body = await reader.read()
    return RawResponse(start[0], status, reason, headers, body, raw)


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: tuple[str, int]) -> RawClient:
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(*address)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(WAIT):
            await self.writer.drain()

    async def response(self, method: bytes = b"GET", *, interim: bool = False) -> RawResponse:
        async with asyncio.timeout(WAIT):
            return await read_response(self.reader, method=method, interim=interim)

    async def closed(self, timeout: float = WAIT) -> bool:
        """True when the peer closes (EOF or reset) with nothing more to read."""
        try:
            async with asyncio.timeout(timeout):
                rest = await self.reader.read(65536)
        except ConnectionError:
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(WAIT):
                await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_client(address: tuple[str, int]) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(address)
    try:
        yield client
    finally:
        await client.close()
