"""Helpers for the resilience end-to-end tests: scripted upstreams and an in-process sidecar.

An `Upstream` is a real HTTP/1.1 server on 127.0.0.1 port 0 whose answer to each request comes
from a script (answer, answer late, stall, reset mid-body, drop the connection before answering).
It records every request, every connection, and which connections the peer (the sidecar) closed.
`running_sidecar` starts a real `Sidecar` from a mesh document and drains it afterwards.
Every wait here is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from mesh.model import parse_mesh
from sidecar.app import Sidecar
from sidecar.settings import SidecarSettings
from sidecar.xds.interpret import snapshot_from_mesh

# Every await on the network is bounded by this unless a test says otherwise.
WAIT = 5.0


# --- what an upstream does with one request ------------------------------------------------


@dataclass(frozen=True, slots=True)
class Respond:
    status: int = 200
    body: bytes = b"ok"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before the head is written


@dataclass(frozen=True, slots=True)
class Stall:
    """Never answer (until `Upstream.release` is set, then answer `then`)."""

    then: Respond = field(default_factory=Respond)


@dataclass(frozen=True, slots=True)
class ResetMidBody:
    """Send the head and part of the body, then reset the connection."""

    declared: int = 1000
    partial: bytes = b"partial-body"


@dataclass(frozen=True, slots=True)
class Drop:
    """Reset the connection without answering (after reading the request)."""


Action = Respond | Stall | ResetMidBody | Drop
Script = Callable[[int], Action]  # request index at this upstream (0-based) -> action


def always(action: Action) -> Script:
    return lambda _n: action


def first(count: int, action: Action, then: Action | None = None) -> Script:
    """`action` for the first `count` requests, then `then` (200 by default)."""
    after = then if then is not None else Respond()
    return lambda n: action if n < count else after


@dataclass(slots=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # the upstream connection's number (0-based, in accept order)


class Upstream:
    """A scripted HTTP/1.1 server on 127.0.0.1 port 0."""

    def __init__(self, script: Script, name: str = "upstream") -> None:
        self.script = script
        self.name = name
        self.requests: list[Seen] = []
        self.connections = 0
        self.closed_by_peer: set[int] = set()  # connections the sidecar closed
        self.active = 0  # requests read and not yet answered
        self.release = asyncio.Event()  # lets stalled requests answer
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> Upstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        async with asyncio.timeout(WAIT):
            self._server = await asyncio.start_server(self._serve, sock=sock, backlog=512)
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        # The handlers see their connections end and return by themselves (cancelling a
        # start_server handler makes asyncio log an error on 3.11).
        tasks = list(self._tasks)
        if tasks:
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            async with asyncio.timeout(WAIT):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        conn = self.connections
        self.connections += 1
        try:
            while True:
                seen = await _read_request(reader, conn)
                if seen is None:
                    self.closed_by_peer.add(conn)
                    return
                index = len(self.requests)
                self.requests.append(seen)
                self.active += 1
                try:
                    keep = await self._act(self.script(index), reader, writer, conn)
                finally:
                    self.active -= 1
                if not keep or seen.headers.get("connection", "").lower() == "close":
                    writer.close()
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_peer.add(conn)
        finally:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _act(
        self,
        action: Action,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: int,
    ) -> bool:
        """Carry out one action; False when the connection is done."""
        if isinstance(action, Stall):
            released = asyncio.ensure_future(self.release.wait())
            eof = asyncio.ensure_future(reader.read(1))
            try:
                done, _ = await asyncio.wait({released, eof}, return_when="FIRST_COMPLETED")
            finally:
                released.cancel()
                eof.cancel()
            if eof in done:
                self.closed_by_peer.add(conn)
                return False
            action = action.then
        if isinstance(action, Drop):
            writer.transport.abort()
            return False
        if isinstance(action, ResetMidBody):
            writer.write(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                + f"content-length: {action.declared}\r\n\r\n".encode()
                + action.partial
            )
            await writer.drain()
            await asyncio.sleep(0.05)  # let the sidecar pass the partial body on first
            writer.transport.abort()
            return False
        assert isinstance(action, Respond)
        if action.delay:
            await asyncio.sleep(action.delay)
        head = [f"HTTP/1.1 {action.status} X", f"content-length: {len(action.body)}"]
        head += [f"{name}: {value}" for name, value in action.headers]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + action.body)
        await writer.drain()
        return True


async def _read_request(reader: asyncio.StreamReader, conn: int) -> Seen | None:
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = raw.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    return Seen(method, path, headers, body, conn)


@contextlib.asynccontextmanager
async def upstreams(*scripts: Script) -> AsyncIterator[list[Upstream]]:
    started: list[Upstream] = []
    try:
        for i, script in enumerate(scripts):
            started.append(await Upstream(script, f"upstream-{i}").start())
        yield started
    finally:
        for upstream in started:
            await upstream.stop()


def refused_address() -> str:
    """A loopback port nobody listens on: bound, then closed."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


# --- the sidecar ---------------------------------------------------------------------------


def sidecar_settings(
    service: str = "frontend", app: str = "127.0.0.1:1", **extra: Any
) -> SidecarSettings:
    """A sidecar's settings as from its command line: every port 0, no config or cache files;
    `extra` adds flags (otlp_endpoint=...)."""
    return SidecarSettings.from_args(
        argparse.Namespace(
            config=None,
            mesh=None,
            control_plane=None,
            service=service,
            namespace=None,
            node_id=None,
            outbound="127.0.0.1:0",
            inbound="127.0.0.1:0",
            app=app,
            admin="127.0.0.1:0",
            drain_timeout="1s",
            snapshot_cache=None,
            access_log=None,
            **extra,
        )
    )


def mesh(
    endpoints: Sequence[str], policy: dict[str, Any] | None = None, name: str = "payments"
) -> dict[str, Any]:
    """A mesh document with one service."""
    service: dict[str, Any] = {"name": name, "endpoints": list(endpoints)}
    if policy is not None:
        service["policy"] = policy
    return {"services": [service]}


@contextlib.asynccontextmanager
async def running_sidecar(doc: dict[str, Any], service: str = "frontend") -> AsyncIterator[Proxy]:
    sidecar = Sidecar(sidecar_settings(service))
    sidecar.apply(snapshot_from_mesh(parse_mesh(doc, "test")))
    async with asyncio.timeout(WAIT):
        await sidecar.start()
    proxy = Proxy(sidecar)
    try:
        yield proxy
    finally:
        async with asyncio.timeout(WAIT):
            await proxy.client.aclose()
            await proxy.admin.aclose()
        async with asyncio.timeout(WAIT):
            await sidecar.drain()


class Proxy:
    """A started sidecar with clients for its outbound listener and admin port."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        host, port = sidecar.addresses["outbound"]
        ahost, aport = sidecar.addresses["admin"]
        self.outbound = f"http://{host}:{port}"
        timeout = httpx.Timeout(WAIT)
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        self.client = httpx.AsyncClient(
            base_url=self.outbound, timeout=timeout, trust_env=False, limits=limits
        )
        self.admin = httpx.AsyncClient(
            base_url=f"http://{ahost}:{aport}", timeout=timeout, trust_env=False
        )

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        *,
        service: str = "payments",
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        timeout: float = WAIT,
    ) -> httpx.Response:
        """One request through the outbound listener to `service`, bounded by `timeout`."""
        async with asyncio.timeout(timeout):
            return await self.client.request(
                method, path, headers={"host": service, **(headers or {})}, content=content
            )

    async def clusters(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            resp = await self.admin.get("/clusters")
        resp.raise_for_status()
        doc: dict[str, Any] = resp.json()
        return doc

    async def prometheus(self) -> str:
        async with asyncio.timeout(WAIT):
            resp = await self.admin.get("/stats/prometheus")
        resp.raise_for_status()
        return resp.text

    async def metric(self, name: str, destination: str = "payments") -> float:
        """The value of `name{destination=...}` on /stats/prometheus (0 when absent)."""
        text = await self.prometheus()
        pattern = re.compile(
            rf'^{re.escape(name)}\{{destination="{re.escape(destination)}"\}} (\S+)$', re.M
        )
        match = pattern.search(text)
        return float(match.group(1)) if match else 0.0


def flags(resp: httpx.Response) -> str:
    value: str = resp.headers.get("x-outrigger-flags", "")
    return value


async def wait_for(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start
