"""The sidecar's XdsClient against a real control plane over gRPC on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2

from control_plane.app import ControlPlane
from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, make_snapshot
from mesh.model import load_mesh
from mesh.translate import translate
from sidecar.config import ServiceConfig, Snapshot
from sidecar.xds.client import XdsClient


def _cluster(service: str) -> str:
    return f"outbound|80||{service}.default.svc.cluster.local"


def mesh_text(port: int, timeout: str = "2s") -> str:
    return (
        "services:\n"
        "  - name: payments\n"
        f'    endpoints: ["127.0.0.1:{port}"]\n'
        f"    policy: {{timeout: {timeout}}}\n"
        "  - name: orders\n"
        '    endpoints: ["127.0.0.1:9101"]\n'
    )


async def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def _ports(snapshot: Snapshot | None, cluster: str = "payments") -> list[int]:
    assert snapshot is not None
    [service] = [s for s in snapshot.services.values() if s.name == cluster]
    return [e.port for e in service.endpoints]


class Sidecar:
    """An XdsClient running as a task, with every snapshot it applied."""

    def __init__(self, address: str, cache: Path | None = None, node_id: str = "payments~a"):
        self.applied: list[Snapshot] = []
        self.client = XdsClient(
            address,
            node_id=node_id,
            service="payments",
            namespace="default",
            apply=self.applied.append,
            snapshot_cache=cache,
            backoff_base=0.05,
            backoff_max=0.2,
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.client.run())

    async def stop(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(5):
                await self.task


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text(9001))
    cp = ControlPlane(mesh)
    async with asyncio.timeout(5):
        await cp.start("127.0.0.1:0", "127.0.0.1:0")
    yield cp
    async with asyncio.timeout(5):
        await cp.stop(0)


async def test_first_snapshot_is_applied_and_every_type_acked(
    plane: ControlPlane, tmp_path: Path
) -> None:
    sidecar = Sidecar(f"127.0.0.1:{plane.xds_port}", cache=tmp_path / "cache.json")
    sidecar.start()
    try:
        async with asyncio.timeout(5):
            await sidecar.client.ready.wait()
        assert len(sidecar.applied) == 1
        assert _ports(sidecar.applied[0]) == [9001]
        [stream] = plane.ads.streams.values()
        assert stream.node_id == "payments~a" and stream.service == "payments"
        assert stream.node.user_agent_name == "outrigger"
        assert stream.node.metadata.fields["namespace"].string_value == "default"
        await _wait_for(
            lambda: (
                len(stream.types) == 4
                and all(t.version_acked == t.version_sent != "" for t in stream.types.values())
            )
        )
        assert stream.types[LISTENER_TYPE].names is None  # wildcard
        assert stream.types[CLUSTER_TYPE].names is None
        assert stream.types[ENDPOINT_TYPE].names == frozenset(
            {_cluster("payments"), _cluster("orders")}
        )
        assert (tmp_path / "cache.json").exists()
    finally:
        await sidecar.stop()


async def test_a_mesh_edit_is_applied(plane: ControlPlane, tmp_path: Path) -> None:
    sidecar = Sidecar(f"127.0.0.1:{plane.xds_port}")
    sidecar.start()
    try:
        async with asyncio.timeout(5):
            await sidecar.client.ready.wait()
        assert plane.mesh_path is not None
        plane.mesh_path.write_text(mesh_text(9002, timeout="3s"))

        # Endpoints (EDS) and the timeout (RDS) are pushed as two responses; each one that
        # completes a consistent set is applied.
        def payments() -> ServiceConfig:
            [service] = [s for s in sidecar.applied[-1].services.values() if s.name == "payments"]
            return service

        await _wait_for(lambda: payments().timeout == 3.0 and _ports(sidecar.applied[-1]) == [9002])
        assert sidecar.client.snapshot is sidecar.applied[-1]
    finally:
        await sidecar.stop()


async def test_an_endpoint_edit_sends_one_assignment_and_the_sidecar_keeps_the_others(
    plane: ControlPlane,
) -> None:
    sidecar = Sidecar(f"127.0.0.1:{plane.xds_port}")
    sidecar.start()
    try:
        async with asyncio.timeout(5):
            await sidecar.client.ready.wait()
        [stream] = plane.ads.streams.values()
        await _wait_for(lambda: stream.types[ENDPOINT_TYPE].acked)
        assert plane.mesh_path is not None
        plane.mesh_path.write_text(mesh_text(9002))  # payments moves; orders stays
        await _wait_for(lambda: _ports(sidecar.applied[-1]) == [9002])
        snapshot = plane.cache.get("")
        assert snapshot is not None
        # The push carried only payments' assignment (the stream had ACKed the version before).
        assert snapshot.of(ENDPOINT_TYPE).changed == {_cluster("payments")}
        assert _ports(sidecar.applied[-1], "orders") == [9101]
        await _wait_for(
            lambda: stream.types[ENDPOINT_TYPE].version_acked == snapshot.of(ENDPOINT_TYPE).version
        )
    finally:
        await sidecar.stop()


async def test_a_config_it_cannot_apply_is_nacked_and_the_previous_snapshot_stays(
    plane: ControlPlane,
) -> None:
    sidecar = Sidecar(f"127.0.0.1:{plane.xds_port}")
    sidecar.start()
    try:
        async with asyncio.timeout(5):
            await sidecar.client.ready.wait()
        good = sidecar.client.snapshot
        assert plane.mesh_path is not None
        resources = translate(load_mesh(plane.mesh_path))
        resources[CLUSTER_TYPE][_cluster("payments")].lb_policy = cluster_pb2.Cluster.MAGLEV
        plane.cache.set_snapshot(make_snapshot(resources, "bad", check=True))
        [stream] = plane.ads.streams.values()
        cds = stream.types[CLUSTER_TYPE]
        await _wait_for(lambda: bool(cds.last_nack))
        assert cds.nacked_version == cds.version_sent != cds.version_acked
        assert "MAGLEV" in cds.last_nack or "lb" in cds.last_nack.lower()
        assert plane.metrics.nacks.labels("Cluster")._value.get() == 1
        assert sidecar.client.snapshot is good
        assert len(sidecar.applied) == 1
        assert sidecar.client.last_error == cds.last_nack
    finally:
        await sidecar.stop()


async def test_reconnects_and_resyncs_after_a_control_plane_restart(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text(9001))
    first = ControlPlane(mesh)
    async with asyncio.timeout(5):
        await first.start("127.0.0.1:0", None)
    port = first.xds_port
    sidecar = Sidecar(f"127.0.0.1:{port}")
    sidecar.start()
    second: ControlPlane | None = None
    try:
        async with asyncio.timeout(5):
            await sidecar.client.ready.wait()
        async with asyncio.timeout(5):
            await first.stop(0)
        await _wait_for(lambda: not sidecar.client.connected)
        mesh.write_text(mesh_text(9003))  # changed while the control plane was down
        second = ControlPlane(mesh)
        async with asyncio.timeout(5):
            await second.start(f"127.0.0.1:{port}", None)
        await _wait_for(lambda: _ports(sidecar.applied[-1]) == [9003])
        await _wait_for(lambda: len(second.ads.streams) == 1)
    finally:
        await sidecar.stop()
        if second is not None:
            async with asyncio.timeout(5):
                await second.stop(0)


async def test_a_control_plane_at_its_stream_limit_is_retried_until_it_has_room(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text(9001))
    plane = ControlPlane(mesh, max_streams=1)
    async with asyncio.timeout(5):
        await plane.start("127.0.0.1:0", None)
    holder = Sidecar(f"127.0.0.1:{plane.xds_port}", node_id="orders~a")
    waiting = Sidecar(f"127.0.0.1:{plane.xds_port}", node_id="payments~b")
    try:
        holder.start()
        async with asyncio.timeout(5):
            await holder.client.ready.wait()
        with caplog.at_level(logging.WARNING, logger="outrigger.sidecar.xds.client"):
            waiting.start()
            registry = plane.metrics.registry
            # Refused, backed off, refused again: it keeps trying.
            await _wait_for(
                lambda: (registry.get_sample_value("outrigger_xds_refused_streams_total") or 0) >= 2
            )
        assert "failed: RESOURCE_EXHAUSTED this control plane serves 1 xDS streams" in caplog.text
        assert not waiting.client.ready.is_set()
        await holder.stop()  # room for one: the waiting sidecar's next attempt is served
        async with asyncio.timeout(5):
            await waiting.client.ready.wait()
        assert _ports(waiting.applied[-1]) == [9001]
    finally:
        for sidecar in (holder, waiting):
            if sidecar.task is not None and not sidecar.task.done():
                await sidecar.stop()
        async with asyncio.timeout(5):
            await plane.stop(0)


async def test_cached_snapshot_is_applied_when_the_control_plane_is_down(
    plane: ControlPlane, tmp_path: Path
) -> None:
    cache = tmp_path / "cache.json"
    online = Sidecar(f"127.0.0.1:{plane.xds_port}", cache=cache)
    online.start()
    try:
        async with asyncio.timeout(5):
            await online.client.ready.wait()
    finally:
        await online.stop()
    assert online.client.snapshot is not None
    offline = Sidecar("127.0.0.1:1", cache=cache)  # nothing listens there
    assert offline.client.load_cached() is not None
    offline.start()
    try:
        async with asyncio.timeout(5):
            await offline.client.ready.wait()
        assert _ports(offline.applied[0]) == [9001]
        assert offline.applied[0].version == online.client.snapshot.version
    finally:
        await offline.stop()


def test_load_cached_without_a_file_or_with_garbage_is_none(tmp_path: Path) -> None:
    def client(cache: Path | None) -> XdsClient:
        return XdsClient(
            "127.0.0.1:1", node_id="n", service="s", namespace="d", apply=lambda _: None,
            snapshot_cache=cache,
        )  # fmt: skip

    assert client(None).load_cached() is None
    assert client(tmp_path / "missing.json").load_cached() is None
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    assert client(garbage).load_cached() is None
