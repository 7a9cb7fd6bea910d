"""The ADS transport over real gRPC on loopback: versions, nonces, ACK/NACK, subscriptions."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.app import ControlPlane
from control_plane.cache import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    SnapshotError,
    make_snapshot,
)
from mesh.model import parse_mesh
from mesh.translate import translate
from tests.control_plane.ads_fixtures import AdsTestClient, assignment, mesh_resources


@pytest.fixture
async def client(plane: ControlPlane) -> AsyncIterator[AdsTestClient]:
    c = AdsTestClient(f"127.0.0.1:{plane.xds_port}")
    yield c
    await c.close()


def _services(payments_port: int = 9001) -> dict[str, list[tuple[str, int]]]:
    return {"payments": [("127.0.0.1", payments_port)], "orders": [("127.0.0.1", 9101)]}


async def _http_get(port: int, path: str) -> tuple[int, bytes]:
    async with asyncio.timeout(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_wildcard_lds_gets_every_listener_and_ack_is_not_answered(
    client: AdsTestClient,
) -> None:
    await client.send(LISTENER_TYPE)
    lds = await client.recv()
    assert client.names_of(lds) == ["orders", "outbound", "payments"]
    assert lds.version_info and lds.nonce
    await client.ack(lds)
    # The next thing on the stream must answer the CDS request, not resend LDS.
    await client.send(CLUSTER_TYPE)
    cds = await client.recv()
    assert cds.type_url == CLUSTER_TYPE
    assert client.names_of(cds) == ["orders", "payments"]


async def test_rds_and_eds_send_only_the_named_resources(client: AdsTestClient) -> None:
    await client.send(ROUTE_TYPE, ["payments"])
    rds = await client.recv()
    assert client.names_of(rds) == ["payments"]
    await client.send(ENDPOINT_TYPE, [])
    eds = await client.recv()
    assert eds.type_url == ENDPOINT_TYPE
    assert client.names_of(eds) == []  # empty names is not a wildcard for EDS
    await client.send(ENDPOINT_TYPE, ["orders"], nonce=eds.nonce, version=eds.version_info)
    eds = await client.recv()
    assert client.names_of(eds) == ["orders"]


async def test_changed_resource_names_on_an_ack_are_answered(client: AdsTestClient) -> None:
    await client.send(ROUTE_TYPE, ["payments"])
    rds = await client.recv()
    await client.send(
        ROUTE_TYPE, ["payments", "outbound"], nonce=rds.nonce, version=rds.version_info
    )
    rds2 = await client.recv()
    assert client.names_of(rds2) == ["outbound", "payments"]
    assert rds2.nonce != rds.nonce


async def test_snapshot_change_pushes_only_the_types_whose_content_changed(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    responses = {}
    for type_url, names in (
        (LISTENER_TYPE, []),
        (CLUSTER_TYPE, []),
        (ROUTE_TYPE, ["payments"]),
        (ENDPOINT_TYPE, ["payments", "orders"]),
    ):
        await client.send(type_url, names)
        responses[type_url] = await client.recv()
        await client.ack(responses[type_url])
    plane.cache.set_snapshot(make_snapshot(mesh_resources(_services(payments_port=9002))))
    pushed = await client.recv()
    assert pushed.type_url == ENDPOINT_TYPE
    assert pushed.version_info != responses[ENDPOINT_TYPE].version_info
    await client.ack(pushed)
    # Nothing else was pushed: the next response answers this new request.
    await client.send(ROUTE_TYPE, ["orders"], nonce=responses[ROUTE_TYPE].nonce)
    nxt = await client.recv()
    assert nxt.type_url == ROUTE_TYPE and client.names_of(nxt) == ["orders"]


async def test_a_change_outside_the_subscription_is_not_pushed(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await client.send(ENDPOINT_TYPE, ["orders"])
    eds = await client.recv()
    await client.ack(eds)
    plane.cache.set_snapshot(make_snapshot(mesh_resources(_services(payments_port=9002))))
    await client.send(CLUSTER_TYPE)
    nxt = await client.recv()
    assert nxt.type_url == CLUSTER_TYPE  # no EDS push: "orders" did not change


async def test_a_request_with_a_stale_nonce_is_ignored(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await client.send(ENDPOINT_TYPE, ["payments"])
    first = await client.recv()
    await client.ack(first)
    await client.send(LISTENER_TYPE)  # its answer shows the ACK was processed
    assert (await client.recv()).type_url == LISTENER_TYPE
    plane.cache.set_snapshot(make_snapshot(mesh_resources(_services(payments_port=9002))))
    second = await client.recv()
    assert second.type_url == ENDPOINT_TYPE and second.nonce != first.nonce
    # A late request carrying the first nonce (and other names) must change nothing.
    await client.send(ENDPOINT_TYPE, ["orders"], nonce=first.nonce, version=first.version_info)
    await client.send(CLUSTER_TYPE)
    nxt = await client.recv()
    assert nxt.type_url == CLUSTER_TYPE
    [stream] = plane.ads.streams.values()
    eds_state = stream.types[ENDPOINT_TYPE]
    assert eds_state.names == frozenset({"payments"})
    assert eds_state.nonce_sent == second.nonce
    assert eds_state.version_acked == first.version_info  # the stale request was not an ACK


async def test_nack_is_recorded_counted_and_not_answered(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await client.send(CLUSTER_TYPE)
    cds = await client.recv()
    await client.send(
        CLUSTER_TYPE, nonce=cds.nonce, version="", error="lb_policy MAGLEV unsupported"
    )
    await client.send(LISTENER_TYPE)
    nxt = await client.recv()
    assert nxt.type_url == LISTENER_TYPE
    status, body = await _http_get(plane.http_port, "/debug/syncz")
    assert status == 200
    [node] = json.loads(body)
    assert node["node_id"] == "test-node" and node["service"] == "web"
    cds_state = node["types"][CLUSTER_TYPE]
    assert cds_state["last_nack"] == "lb_policy MAGLEV unsupported"
    assert cds_state["version_sent"] == cds.version_info
    assert cds_state["version_acked"] == ""
    status, metrics = await _http_get(plane.http_port, "/metrics")
    assert b'outrigger_xds_nacks_total{type="Cluster"} 1.0' in metrics
    assert b"outrigger_xds_connected_proxies 1.0" in metrics


async def test_ack_feeds_the_push_latency_histogram(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await client.send(CLUSTER_TYPE)
    await client.ack(await client.recv())
    await client.send(LISTENER_TYPE)
    await client.recv()
    _, metrics = await _http_get(plane.http_port, "/metrics")
    assert b'outrigger_xds_push_ack_seconds_count{type="Cluster"} 1.0' in metrics
    assert b'outrigger_xds_pushes_total{type="Cluster"} 1.0' in metrics


def _requests_naming(name: str) -> int:
    """DiscoveryRequests alive in this process whose resource_names include `name`."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, discovery_pb2.DiscoveryRequest) and name in o.resource_names
    )


async def test_an_idle_stream_keeps_no_request_alive(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    # A sidecar's EDS ACK names every cluster it uses (~80 KiB of protobuf at 1,000): kept by
    # each idle stream until the next request, it was most of the control plane's memory.
    await client.send(ENDPOINT_TYPE, ["payments"])
    eds = await client.recv()
    # The last request: an ACK that adds names, answered with them.
    names = ["payments", "orders", "marker"]
    await client.send(ENDPOINT_TYPE, names, nonce=eds.nonce, version=eds.version_info)
    assert client.names_of(await client.recv()) == ["orders", "payments"]
    [stream] = plane.ads.streams.values()
    assert stream.types[ENDPOINT_TYPE].version_acked == eds.version_info
    assert _requests_naming("marker") == 0


async def test_node_is_kept_from_the_first_request(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await client.send(CLUSTER_TYPE)
    await client.recv()
    await client.send(LISTENER_TYPE, with_node=False)
    assert (await client.recv()).type_url == LISTENER_TYPE
    [stream] = plane.ads.streams.values()
    assert stream.node_id == "test-node"


async def test_first_request_without_node_is_refused(plane: ControlPlane) -> None:
    client = AdsTestClient(f"127.0.0.1:{plane.xds_port}")
    try:
        await client.send(CLUSTER_TYPE, with_node=False)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.recv()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await client.close()


async def test_subscription_before_any_snapshot_is_answered_when_one_arrives() -> None:
    cp = ControlPlane(None)
    async with asyncio.timeout(5):
        await cp.start("127.0.0.1:0", None)
    client = AdsTestClient(f"127.0.0.1:{cp.xds_port}")
    try:
        await client.send(CLUSTER_TYPE)
        await asyncio.sleep(0.05)
        cp.cache.set_snapshot(make_snapshot(mesh_resources(_services())))
        cds = await client.recv()
        assert client.names_of(cds) == ["orders", "payments"]
    finally:
        await client.close()
        async with asyncio.timeout(5):
            await cp.stop(0)


async def test_health_service_is_served_on_the_xds_port(plane: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.xds_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        async with asyncio.timeout(3):
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(
                    service="envoy.service.discovery.v3.AggregatedDiscoveryService"
                )
            )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_ready_endpoint(plane: ControlPlane) -> None:
    assert (await _http_get(plane.http_port, "/ready"))[0] == 200
    assert (await _http_get(plane.http_port, "/nope"))[0] == 404


async def test_live_answers_while_not_ready_so_the_liveness_probe_never_restarts_it() -> None:
    cp = ControlPlane(None)  # no source and no snapshot: not ready
    async with asyncio.timeout(5):
        await cp.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        assert (await _http_get(cp.http_port, "/ready"))[0] == 503
        assert await _http_get(cp.http_port, "/live") == (200, b"live\n")
    finally:
        async with asyncio.timeout(5):
            await cp.stop(0)


def test_snapshot_with_a_route_to_a_missing_cluster_is_refused() -> None:
    resources = mesh_resources(_services())
    del resources[CLUSTER_TYPE]["orders"]
    with pytest.raises(
        SnapshotError,
        match=r"^route configuration 'outbound' virtual host 'orders' routes to missing cluster "
        r"'orders'$",
    ):
        make_snapshot(resources)


def test_snapshot_passing_tcp_to_a_missing_cluster_is_refused() -> None:
    resources = translate(parse_mesh({"outbound_policy": "registry_only"}, "m.yaml"))
    del resources[CLUSTER_TYPE]["BlackHoleCluster"]
    with pytest.raises(
        SnapshotError, match="listener 'outbound' passes TCP to missing cluster 'BlackHoleCluster'"
    ):
        make_snapshot(resources)


def test_snapshot_with_an_eds_cluster_without_assignment_is_refused() -> None:
    resources = mesh_resources(_services())
    resources[ENDPOINT_TYPE] = {"payments": assignment("payments", [])}
    with pytest.raises(
        SnapshotError, match=r"^EDS cluster 'orders' has no ClusterLoadAssignment 'orders'$"
    ):
        make_snapshot(resources)


def test_snapshot_with_a_listener_naming_a_missing_route_is_refused() -> None:
    resources = mesh_resources(_services())
    del resources[ROUTE_TYPE]["payments"]
    with pytest.raises(SnapshotError, match="missing route configuration 'payments'"):
        make_snapshot(resources)


def test_versions_are_content_hashes_per_type() -> None:
    a = make_snapshot(mesh_resources(_services()))
    b = make_snapshot(mesh_resources(_services()))
    c = make_snapshot(mesh_resources(_services(payments_port=9002)))
    assert a.version == b.version != c.version
    assert a.of(LISTENER_TYPE).version == c.of(LISTENER_TYPE).version
    assert a.of(ENDPOINT_TYPE).version != c.of(ENDPOINT_TYPE).version
