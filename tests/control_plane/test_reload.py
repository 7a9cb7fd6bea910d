"""Mesh file edits reach the streams: debounced into one push; an invalid edit is refused."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_pb2

from control_plane.app import ControlPlane, ControlPlaneError
from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE
from tests.control_plane.ads_fixtures import AdsTestClient

PAYMENTS = "outbound|80||payments.default.svc.cluster.local"  # the cluster / assignment name


def mesh_text(port: int) -> str:
    return f'services:\n  - name: payments\n    endpoints: ["127.0.0.1:{port}"]\n'


async def _subscribed(tmp_path: Path) -> tuple[ControlPlane, Path, AdsTestClient, str]:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text(9000))
    plane = ControlPlane(mesh)
    async with asyncio.timeout(5):
        await plane.start("127.0.0.1:0", "127.0.0.1:0")
    client = AdsTestClient(f"127.0.0.1:{plane.xds_port}")
    await client.send(ENDPOINT_TYPE, [PAYMENTS])
    first = await client.recv()
    await client.ack(first)
    return plane, mesh, client, first.version_info


async def test_a_burst_of_five_edits_is_one_push(tmp_path: Path) -> None:
    plane, mesh, client, v0 = await _subscribed(tmp_path)
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for port in range(9001, 9006):
            mesh.write_text(mesh_text(port))
            await asyncio.sleep(0.03)
        pushed = await client.recv(timeout=2)
        assert loop.time() - start < 1.0
        assert pushed.version_info != v0
        await client.ack(pushed)
        cla = endpoint_pb2.ClusterLoadAssignment()
        pushed.resources[0].Unpack(cla)
        ports = [
            e.endpoint.address.socket_address.port_value
            for group in cla.endpoints
            for e in group.lb_endpoints
        ]
        assert ports == [9005]  # the last edit of the burst
        with pytest.raises(TimeoutError):
            await client.recv(timeout=0.8)  # no second push for the same burst
        assert plane.metrics.config_reloads._value.get() == 2  # the initial load and the burst
    finally:
        await client.close()
        await plane.stop(0)


async def test_an_invalid_edit_is_refused_counted_and_the_last_good_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plane, mesh, client, v0 = await _subscribed(tmp_path)
    try:
        caplog.set_level(logging.ERROR, logger="outrigger.control_plane")
        mesh.write_text(mesh_text(9001) + "    policy:\n      retries: {attempts: two}\n")
        async with asyncio.timeout(3):
            while plane.metrics.invalid_config_reloads._value.get() < 1:
                await asyncio.sleep(0.02)
        assert "policy.retries.attempts" in caplog.text
        assert "refused" in caplog.text
        snapshot = plane.cache.get("")
        assert snapshot is not None
        # The stream is still served the last good version: a new subscription gets it.
        await client.send(ENDPOINT_TYPE, [PAYMENTS, "x"], nonce="", version=v0)
        again = await client.recv()
        assert again.version_info == v0
        # A good edit afterwards is published.
        mesh.write_text(mesh_text(9002))
        pushed = await client.recv(timeout=3)
        assert pushed.version_info != v0
    finally:
        await client.close()
        await plane.stop(0)


async def test_an_invalid_mesh_at_start_is_an_error(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("services:\n  - name: Payments!\n")
    plane = ControlPlane(mesh)
    with pytest.raises(ControlPlaneError, match="name"):
        await plane.start("127.0.0.1:0", None)
    await plane.stop(0)


async def test_a_removed_service_keeps_its_cluster_until_routes_stop_using_it(
    tmp_path: Path,
) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(mesh_text(9000) + '  - name: orders\n    endpoints: ["127.0.0.1:9100"]\n')
    plane = ControlPlane(mesh)
    plane.lingering.grace = 0.5
    async with asyncio.timeout(5):
        await plane.start("127.0.0.1:0", None)
    client = AdsTestClient(f"127.0.0.1:{plane.xds_port}")
    orders = "outbound|80||orders.default.svc.cluster.local"
    try:
        await client.send(CLUSTER_TYPE)
        await client.ack(await client.recv())
        await client.send(ROUTE_TYPE, ["outbound"])
        await client.ack(await client.recv())
        mesh.write_text(mesh_text(9000))  # orders removed
        first = await client.recv(timeout=3)
        await client.ack(first)
        assert first.type_url == ROUTE_TYPE  # the routes stop using orders; CDS is unchanged
        routes = route_pb2.RouteConfiguration()
        first.resources[0].Unpack(routes)
        assert all("orders" not in v.domains for v in routes.virtual_hosts)
        assert orders in plane.cache.get("").of(CLUSTER_TYPE).resources
        final = await client.recv(timeout=3)  # after the grace period: the cluster goes
        assert final.type_url == CLUSTER_TYPE
        assert orders not in AdsTestClient.names_of(final)
    finally:
        await client.close()
        await plane.stop(0)
