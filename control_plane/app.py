"""`outrigger control-plane`: the mesh file source, the snapshot cache, ADS/CSDS/health over
gRPC on the xDS port, and `/metrics`, `/debug/syncz`, `/ready` on the HTTP port.

`ControlPlane` assembles the pieces and is what tests start in process; `run_control_plane` is
the command. A mesh edit is loaded, translated, checked and published as one snapshot; an edit
that fails any of those steps is logged with the reason, counted, and the last good snapshot
keeps being served.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from pathlib import Path

import grpc
from envoy.service.status.v3 import csds_pb2_grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.cache import SnapshotCache, SnapshotError, make_snapshot
from control_plane.metrics import CONTENT_TYPE, ControlPlaneMetrics
from control_plane.server import ADS_SERVICE, AdsServer, CsdsServer, syncz, version_summary
from control_plane.watch import FileWatcher
from mesh.address import join_host_port, split_host_port
from mesh.http import reason_phrase

log = logging.getLogger("outrigger.control_plane")

HTTP_READ_TIMEOUT = 5.0
HTTP_MAX_HEAD = 16 * 1024


class ControlPlaneError(Exception):
    """The control plane cannot start (bad address, unusable first mesh file)."""


def split_address(address: str) -> tuple[str, int]:
    """`127.0.0.1:15010`, `[::1]:15010`, `:15010` (all interfaces) -> (host, port)."""
    host, port = split_host_port(address) or ("", None)
    if port is None:
        raise ControlPlaneError(f"address {address!r} is not HOST:PORT")
    return host or "0.0.0.0", port


class ControlPlane:
    def __init__(
        self,
        mesh_path: Path | None = None,
        *,
        poll_interval: float = 0.1,
        debounce: float = 0.2,
    ) -> None:
        self.mesh_path = mesh_path
        self.cache = SnapshotCache()
        self.metrics = ControlPlaneMetrics()
        self.ads = AdsServer(self.cache, self.metrics)
        self.health = health_aio.HealthServicer()
        self.xds_port = 0
        self.http_port = 0
        self.last_error = ""
        self._grpc: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watcher = (
            FileWatcher(mesh_path, self.reload, poll_interval=poll_interval, debounce=debounce)
            if mesh_path is not None
            else None
        )

    def reload(self) -> bool:
        """Load, translate, check and publish the mesh file. False (and logged) if refused."""
        if self.mesh_path is None:
            return False
        from mesh.model import MeshError, load_mesh
        from mesh.translate import translate
        from mesh.xds import resources_version

        try:
            resources = translate(load_mesh(self.mesh_path))
            snapshot = make_snapshot(resources, resources_version(resources))
        except (MeshError, SnapshotError) as exc:
            current = self.cache.get("")
            self.last_error = str(exc)
            self.metrics.invalid_config_reloads.inc()
            log.error(
                "mesh file %s refused: %s (still serving version %s)",
                self.mesh_path,
                exc,
                current.version if current else "none",
            )
            return False
        self.last_error = ""
        if self.cache.set_snapshot(snapshot):
            self.metrics.config_reloads.inc()
            log.info("serving version %s %s", snapshot.version, dict(version_summary(snapshot)))
        return True

    async def start(self, xds: str = "127.0.0.1:0", http: str | None = "127.0.0.1:0") -> None:
        """Load the mesh (it must be valid), bind both ports, start watching the file."""
        if self.mesh_path is not None:
            if not self.reload():
                raise ControlPlaneError(f"mesh file {self.mesh_path}: {self.last_error}")
            if self._watcher is not None:
                self._watcher.mark_current()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((self.ads.handler(),))
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(
            CsdsServer(self.ads), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        host, port = split_address(xds)
        bound = server.add_insecure_port(join_host_port(host, port))
        if bound == 0:
            raise ControlPlaneError(f"cannot bind xDS address {xds}")
        self.xds_port = bound
        await server.start()
        self._grpc = server
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(ADS_SERVICE, serving)
        if http is not None:
            host, port = split_address(http)
            try:
                self._http = await asyncio.start_server(self._serve_http, host, port)
            except OSError as exc:
                raise ControlPlaneError(f"cannot bind HTTP address {http}: {exc}") from exc
            self.http_port = self._http.sockets[0].getsockname()[1]
        if self._watcher is not None:
            self._tasks.append(asyncio.create_task(self._watcher.run()))

    async def stop(self, grace: float = 1.0) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None
        if self._grpc is not None:
            await self.health.enter_graceful_shutdown()
            await self._grpc.stop(grace)
            self._grpc = None

    @property
    def ready(self) -> bool:
        return self._grpc is not None and self.cache.get("") is not None

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HTTP_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > HTTP_MAX_HEAD:
                raise ValueError("head too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = self._http_route(method, target.split("?", 1)[0])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        try:
            writer.write(
                f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            async with asyncio.timeout(HTTP_READ_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    def _http_route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics.render()
        if path == "/debug/syncz":
            return 200, "application/json", json.dumps(syncz(self.ads), indent=1).encode()
        if path == "/ready":
            if self.ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        return 404, "text/plain", b"not found\n"


async def _main(args: argparse.Namespace) -> int:
    plane = ControlPlane(Path(args.mesh))
    try:
        await plane.start(args.xds, args.http)
    except ControlPlaneError as exc:
        print(f"outrigger control-plane: {exc}", file=sys.stderr)
        await plane.stop(0)
        return 1
    host = split_address(args.xds)[0]
    http_host = split_address(args.http)[0]
    print(
        f"outrigger control-plane: xDS (ADS, CSDS, health) on {host}:{plane.xds_port}, "
        f"HTTP on {http_host}:{plane.http_port}",
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await plane.stop(1.0)
    return 0


def run_control_plane(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.kubernetes:
        print(
            "outrigger control-plane: --kubernetes is not yet supported; use --mesh FILE",
            file=sys.stderr,
        )
        return 2
    if not args.mesh:
        print("outrigger control-plane: --mesh FILE is required", file=sys.stderr)
        return 2
    return asyncio.run(_main(args))
