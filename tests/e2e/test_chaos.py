"""Chaos, end to end with real processes: the data plane does not need the control plane.

    httpx ──► sidecar a (outbound, Host: b) ──► sidecar b (inbound) ──► app (in this process)
                   ▲                                  ▲
                   └──────── control plane (ADS) ─────┘

Sidecar a learns service `b` (endpoint: sidecar b's inbound listener) from the control plane.
The control plane is SIGKILLed under traffic, restarted on the same ports, and fed a policy
change; a sidecar started while it is down serves from its snapshot cache, or, with no cache,
from the embedded default once its initial fetch timeout passes.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.mesh_processes import (
    OUTRIGGER,
    ControlPlaneProc,
    Processes,
    SidecarProc,
    UpstreamApp,
    get_json,
    start_control_plane,
    start_sidecar,
    wait_until,
    write_mesh,
)

REQUEST_TIMEOUT = 5.0
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


@pytest.fixture
async def app() -> AsyncIterator[UpstreamApp]:
    upstream = UpstreamApp()
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False, timeout=REQUEST_TIMEOUT) as c:
        yield c


@dataclass
class Mesh:
    """Control plane + sidecar b (fronting the app) + sidecar a, with service b routed."""

    path: Path
    cp: ControlPlaneProc
    a: SidecarProc
    b: SidecarProc


async def start_mesh(
    procs: Processes, app: UpstreamApp, client: httpx.AsyncClient, a_extra: tuple[str, ...] = ()
) -> Mesh:
    path = procs.workdir / "mesh.yaml"
    write_mesh(path, {})
    cp = await start_control_plane(procs, path)
    b, a = await asyncio.gather(
        start_sidecar(procs, "b~chaos", control_plane=cp.xds, app=app.address),
        start_sidecar(procs, "a~chaos", control_plane=cp.xds, app="127.0.0.1:9", extra=a_extra),
    )
    write_mesh(path, {"b": ([b.inbound], "2s")})  # b's address is known only now
    await wait_until("sidecar a to route service b", lambda: _services(client, a))
    return Mesh(path, cp, a, b)


async def _services(client: httpx.AsyncClient, sidecar: SidecarProc) -> list[str]:
    return sorted(await get_json(client, f"http://{sidecar.admin}/clusters"))


async def _config(client: httpx.AsyncClient, sidecar: SidecarProc) -> dict[str, Any]:
    doc: dict[str, Any] = await get_json(client, f"http://{sidecar.admin}/config_dump")
    return doc


async def _synced(client: httpx.AsyncClient, cp: ControlPlaneProc, nodes: set[str]) -> bool:
    """Every node has a stream to `cp` and ACKed every type it was sent."""
    try:
        streams = await get_json(client, f"http://{cp.http}/debug/syncz")
    except httpx.HTTPError:
        return False
    seen = set()
    for stream in streams:
        types = stream["types"].values()
        if types and all(t["version_sent"] and t["version_sent"] == t["version_acked"]
                         for t in types):  # fmt: skip
            seen.add(stream["node_id"])
    return nodes <= seen


@dataclass
class Traffic:
    """Requests through sidecar a's outbound listener until stopped; every outcome counted."""

    client: httpx.AsyncClient
    outbound: str
    host: str
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def worker(self, index: int, fresh_connections: bool) -> None:
        n = 0
        while not self.stop.is_set():
            path = f"/w{index}/{n}"
            headers = {"Host": self.host}
            if fresh_connections:
                headers["Connection"] = "close"
            try:
                r = await self.client.get(f"http://{self.outbound}{path}", headers=headers)
            except httpx.HTTPError as exc:
                self.failures.append(f"{path}: {exc!r}")
            else:
                if r.status_code == 200 and r.text == f"app GET {path}":
                    self.ok += 1
                else:
                    self.failures.append(f"{path}: {r.status_code} {r.text[:200]!r}")
            n += 1

    async def run(self, concurrency: int) -> None:
        """One sequential worker on fresh connections, `concurrency` more on kept-alive ones."""
        await asyncio.gather(
            self.worker(0, fresh_connections=True),
            *(self.worker(i, fresh_connections=False) for i in range(1, concurrency + 1)),
        )

    async def wait_for(self, count: int, timeout: float = 5.0) -> None:
        target = self.ok + count

        async def enough() -> bool:
            return self.ok >= target or bool(self.failures)

        await wait_until(f"{count} more requests", enough, timeout)


async def test_traffic_survives_a_control_plane_kill_and_the_restart_applies_a_policy_change(
    procs: Processes, app: UpstreamApp, client: httpx.AsyncClient
) -> None:
    mesh = await start_mesh(procs, app, client)
    before = await _config(client, mesh.a)
    traffic = Traffic(client, mesh.a.outbound, "b")
    task = asyncio.create_task(traffic.run(concurrency=4))
    try:
        await traffic.wait_for(20)

        mesh.cp.child.kill()
        refused = re.compile(
            rf"xDS stream to {re.escape(mesh.cp.xds)} failed: UNAVAILABLE.*refused"
        )
        for sidecar in (mesh.a, mesh.b):  # both lost the stream and failed to reconnect
            await sidecar.child.wait_for_output(refused, 5)
        await traffic.wait_for(50)  # the outage: traffic keeps flowing
        ready = await client.get(f"http://{mesh.a.admin}/ready")
        assert (ready.status_code, ready.text) == (200, "ready\n")

        cp = await start_control_plane(procs, mesh.path, xds=mesh.cp.xds, http=mesh.cp.http)
        assert (cp.xds, cp.http) == (mesh.cp.xds, mesh.cp.http)
        await wait_until(
            "both sidecars to resync with the restarted control plane",
            lambda: _synced(client, cp, {"a~chaos", "b~chaos"}),
        )
        assert (await _config(client, mesh.a))["version"] == before["version"]  # same content

        # A policy change through the restarted control plane: b's timeout, and a new service
        # c that routes to the same place.
        write_mesh(
            mesh.path,
            {"b": ([mesh.b.inbound, app.address], "3s"), "c": ([mesh.b.inbound], "2s")},
        )

        async def changed() -> dict[str, Any] | None:
            doc = await _config(client, mesh.a)
            return doc if doc["version"] != before["version"] else None

        after = await wait_until("sidecar a to apply the edit", changed)
        assert _route_timeouts(after) == {"b": "3s", "c": "2s"}
        assert _route_timeouts(before) == {"b": "2s"}
        r = await client.get(f"http://{mesh.a.outbound}/via-c", headers={"Host": "c"})
        assert (r.status_code, r.text) == (200, "app GET /via-c")
        await traffic.wait_for(20)
    finally:
        traffic.stop.set()
        async with asyncio.timeout(REQUEST_TIMEOUT * 2):
            await task
    assert traffic.failures == [], procs.logs()
    assert traffic.ok >= 90


async def test_status_shows_both_sidecars_synced(
    procs: Processes, app: UpstreamApp, client: httpx.AsyncClient
) -> None:
    mesh = await start_mesh(procs, app, client)
    await wait_until(
        "both sidecars to ACK", lambda: _synced(client, mesh.cp, {"a~chaos", "b~chaos"})
    )
    status = await asyncio.create_subprocess_exec(
        *OUTRIGGER, "status", "--control-plane", mesh.cp.xds,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(10):
            out, err = await status.communicate()
    finally:
        if status.returncode is None:
            status.kill()
            await status.wait()
    assert status.returncode == 0, err.decode()
    rows = {line.split()[0]: line.split() for line in out.decode().splitlines()[1:]}
    assert set(rows) == {"a~chaos", "b~chaos"}, out.decode()
    for node in ("a~chaos", "b~chaos"):
        node_id, service, *cells = rows[node]
        assert service == node_id.split("~")[0]
        # LDS RDS CDS EDS: "SYNCED sent/acked" each, with sent == acked
        assert cells[0:8:2] == ["SYNCED"] * 4, out.decode()
        for pair in cells[1:8:2]:
            sent, acked = pair.split("/")
            assert sent == acked and sent != "-", out.decode()
        assert cells[8:] == [mesh.cp.xds, "-"]  # the replica asked; no NACK


async def test_a_sidecar_started_while_the_control_plane_is_down_serves_its_cached_snapshot(
    procs: Processes, app: UpstreamApp, client: httpx.AsyncClient
) -> None:
    cache = procs.workdir / "a.snapshot.json"
    mesh = await start_mesh(procs, app, client, a_extra=("--snapshot-cache", str(cache)))
    version = (await _config(client, mesh.a))["version"]

    async def cache_written() -> bool:
        return cache.exists()

    await wait_until("the snapshot cache to be written", cache_written)
    mesh.cp.child.kill()
    mesh.a.child.kill()

    a2 = await start_sidecar(
        procs,
        "a~again",
        control_plane=mesh.cp.xds,  # nobody listens there now
        app="127.0.0.1:9",
        extra=("--snapshot-cache", str(cache), "--initial-fetch-timeout", "60s"),
    )
    ready = await client.get(f"http://{a2.admin}/ready")
    assert (ready.status_code, ready.text) == (200, "ready\n")
    assert (await _config(client, a2))["version"] == version
    assert await _services(client, a2) == ["b"]
    r = await client.get(f"http://{a2.outbound}/cached", headers={"Host": "b"})
    assert (r.status_code, r.text) == (200, "app GET /cached")
    assert "started from the cached snapshot" in a2.child.output()


async def test_with_no_config_within_the_initial_fetch_timeout_the_embedded_default_serves(
    procs: Processes, app: UpstreamApp, client: httpx.AsyncClient
) -> None:
    # A bound socket that does not listen: connections to it are refused, and no one else can
    # take the port while the test runs.
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{dead.getsockname()[1]}"
        sidecar = await start_sidecar(
            procs,
            "lonely~test",
            control_plane=address,
            app="127.0.0.1:9",
            extra=("--initial-fetch-timeout", "1s"),
        )
        ready = await client.get(f"http://{sidecar.admin}/ready")
        assert ready.status_code == 503
        assert ready.text == (
            f"not ready: no config yet (waiting for the control plane at {address}; "
            "initial fetch timeout 1s)\n"
        )

        async def is_ready() -> bool:
            return (await client.get(f"http://{sidecar.admin}/ready")).status_code == 200

        await wait_until("the initial fetch timeout", is_ready, 5)
        assert (
            f"no config from the control plane at {address} within 1s: serving the embedded "
            "default" in sidecar.child.output()
        )
        doc = await _config(client, sidecar)
        assert doc["outbound_policy"] == "allow_any"
        assert await _services(client, sidecar) == []
        # allow_any: an unknown authority passes through to itself (here, the app)
        r = await client.get(f"http://{sidecar.outbound}/pass", headers={"Host": app.address})
        assert (r.status_code, r.text) == (200, "app GET /pass")


def _route_timeouts(config_dump: dict[str, Any]) -> dict[str, str]:
    """Service short name -> route timeout, from a sidecar's /config_dump resources."""
    out: dict[str, str] = {}
    for config in config_dump["resources"].get(ROUTE, {}).values():
        for vhost in config.get("virtual_hosts", []):
            for route in vhost.get("routes", []):
                action = route.get("route", {})
                if "timeout" in action and vhost["domains"][0] != "*":
                    out[vhost["domains"][0].split(".")[0]] = action["timeout"]
    return out
