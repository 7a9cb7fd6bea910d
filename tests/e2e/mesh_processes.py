"""Real `outrigger` processes on loopback for the end-to-end tests, the demo's app, and a tiny
upstream app.

Every process binds port 0 and reports the addresses it bound on one line of its output
(`outrigger control-plane: xDS ... on H:P, HTTP on H:P`, `outrigger sidecar listening ...`,
`outrigger demo app NAME listening H:P`);
nothing here picks "free" ports. Output goes to a log file per process, so a failing test can
show it and a chatty process never blocks on a full pipe. `Processes.close()` kills every
process it started, by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

OUTRIGGER = (sys.executable, "-m", "outrigger.cli")
START_TIMEOUT = 10.0
POLL = 0.02

_CONTROL_PLANE_LINE = re.compile(
    r"xDS \(ADS, CSDS, health\) on (?P<xds>\S+:\d+), HTTP on (?P<http>\S+:\d+)"
)
_DEMO_APP_LINE = re.compile(r"outrigger demo app (?P<name>\S+) listening (?P<address>\S+:\d+)")
_SIDECAR_LINE = re.compile(
    r"outrigger sidecar listening outbound=(?P<outbound>\S+) "
    r"inbound=(?P<inbound>\S+) admin=(?P<admin>\S+)"
)


class Child:
    """One started process; its output (stdout and stderr) goes to `log_path`."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    async def wait_for_output(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the output; fails if the process exits first."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    match = pattern.search(self.output())
                    if match is not None:
                        return match
                    if not self.alive():
                        raise AssertionError(f"{self.name} exited {self.popen.returncode}")
                    await asyncio.sleep(POLL)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(
                f"{self.name}: no {pattern.pattern!r} in its output ({exc or 'timeout'}):\n"
                + self.output()[-3000:]
            ) from None

    def kill(self) -> None:
        """SIGKILL (no goodbye to anyone) and reap."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=5)


@dataclass
class Processes:
    """Starts children with logs under `workdir`; `close()` kills whatever is still running."""

    workdir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, *args: str) -> Child:
        log_path = self.workdir / f"{name}.{len(self.children)}.log"
        child = Child(name, [*OUTRIGGER, *args], log_path)
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logs(self) -> str:
        return "\n".join(f"--- {c.name} ---\n{c.output()[-2000:]}" for c in self.children)


@dataclass
class ControlPlaneProc:
    child: Child
    xds: str
    http: str


async def start_control_plane(
    procs: Processes,
    mesh: Path | None,
    xds: str = "127.0.0.1:0",
    http: str = "127.0.0.1:0",
    extra: tuple[str, ...] = (),
) -> ControlPlaneProc:
    mesh_args = ("--mesh", str(mesh)) if mesh is not None else ()
    child = procs.start("control-plane", "control-plane", *mesh_args,
                        "--xds", xds, "--http", http, *extra)  # fmt: skip
    match = await child.wait_for_output(_CONTROL_PLANE_LINE, START_TIMEOUT)
    return ControlPlaneProc(child, match["xds"], match["http"])


@dataclass
class SidecarProc:
    child: Child
    node_id: str
    outbound: str
    inbound: str
    admin: str


async def start_sidecar(
    procs: Processes, node_id: str, *, control_plane: str, app: str, extra: tuple[str, ...] = ()
) -> SidecarProc:
    service = node_id.split("~", 1)[0]
    child = procs.start(
        f"sidecar-{node_id}",
        "sidecar",
        "--control-plane", control_plane,
        "--service", service,
        "--node-id", node_id,
        "--outbound", "127.0.0.1:0",
        "--inbound", "127.0.0.1:0",
        "--admin", "127.0.0.1:0",
        "--app", app,
        *extra,
    )  # fmt: skip
    match = await child.wait_for_output(_SIDECAR_LINE, START_TIMEOUT)
    return SidecarProc(child, node_id, match["outbound"], match["inbound"], match["admin"])


async def start_demo_app(procs: Processes, name: str, *args: str) -> str:
    """`python -m outrigger.demo.service --name NAME ARGS`, on `--listen 127.0.0.1:0` unless
    ARGS say where; the address it bound."""
    argv = [sys.executable, "-m", "outrigger.demo.service", "--name", name, *args]
    if "--listen" not in args and "--fd" not in args:
        argv += ["--listen", "127.0.0.1:0"]
    child = Child(f"app-{name}", argv, procs.workdir / f"app-{name}.{len(procs.children)}.log")
    procs.children.append(child)
    match = await child.wait_for_output(_DEMO_APP_LINE, START_TIMEOUT)
    assert match["name"] == name, match.group()
    return match["address"]


def write_mesh(path: Path, services: dict[str, tuple[list[str], str]]) -> None:
    """Replace the mesh file atomically: {name: ([endpoints], timeout)}."""
    lines = ["services:"] if services else ["services: []"]
    for name, (endpoints, timeout) in services.items():
        lines += [
            f"  - name: {name}",
            f"    endpoints: {json.dumps(endpoints)}",
            f"    policy: {{timeout: {timeout}}}",
        ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    response = await client.get(url)
    response.raise_for_status()
    return response.json()


async def wait_until(what: str, check: Any, timeout: float = START_TIMEOUT) -> Any:
    """Poll the async `check()` until it returns something truthy; that is the result."""
    last: Any = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                last = await check()
                if last:
                    return last
                await asyncio.sleep(POLL * 5)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what} (last: {last!r})") from None


class UpstreamApp:
    """A minimal keep-alive HTTP/1.1 app on 127.0.0.1 port 0: 200 `app <method> <path>`."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.address = ""
        self.requests = 0
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self._connections.values():
                writer.close()
            async with asyncio.timeout(5):
                await self.server.wait_closed()
                if self._connections:
                    await asyncio.wait(list(self._connections))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            while True:
                async with asyncio.timeout(30):
                    head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if length:
                    async with asyncio.timeout(30):
                        await reader.readexactly(length)
                self.requests += 1
                body = f"app {method} {target}".encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                async with asyncio.timeout(30):
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            del self._connections[task]
            writer.close()
