"""Endpoint changes are cheap: snapshots built from the ones they replace, and RDS/EDS pushes
that carry only what changed to a stream that ACKed the version before."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from control_plane.app import ControlPlane
from control_plane.cache import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Encoded,
    SnapshotError,
    XdsSnapshot,
    make_snapshot,
    make_snapshots,
    settled,
)
from mesh.model import parse_mesh
from mesh.translate import translate_namespaces, translate_update
from tests.control_plane.ads_fixtures import AdsTestClient, assignment, mesh_resources

PAYMENTS = "outbound|80||payments.default.svc.cluster.local"
SERVICES = {"payments": [("127.0.0.1", 9001)], "orders": [("127.0.0.1", 9101)]}


def with_payments_on(resources: dict[str, dict[str, Any]], port: int) -> dict[str, Any]:
    """The same resources (the same message objects) with a new payments assignment."""
    changed = {t: dict(r) for t, r in resources.items()}
    changed[ENDPOINT_TYPE]["payments"] = assignment("payments", [("127.0.0.1", port)])
    return changed


def served(snapshot: XdsSnapshot) -> dict[str, dict[str, Any]]:
    """A snapshot's resources as the control plane keeps them: encoded, not messages."""
    return {t: dict(r.resources) for t, r in snapshot.types.items()}


def test_a_snapshot_built_from_the_previous_one_reuses_its_encodings() -> None:
    resources = mesh_resources(SERVICES)
    before = make_snapshot(resources)
    after = make_snapshot(with_payments_on(served(before), 9002), previous=before)
    assert after == make_snapshot(with_payments_on(resources, 9002))  # the same versions
    orders = after.of(ENDPOINT_TYPE).resources["orders"]
    assert orders is before.of(ENDPOINT_TYPE).resources["orders"]
    assert after.of(ENDPOINT_TYPE).changed == {"payments"}
    assert after.of(ENDPOINT_TYPE).previous_version == before.of(ENDPOINT_TYPE).version
    for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE):
        assert after.of(type_url).changed == frozenset()
        assert after.of(type_url).fields is before.of(type_url).fields


def test_a_reused_encoding_is_still_checked_against_the_new_resources() -> None:
    before = make_snapshot(mesh_resources(SERVICES))
    broken = served(before)
    del broken[ROUTE_TYPE]["payments"]  # the payments listener (reused as it is) still names it
    with pytest.raises(SnapshotError, match="missing route configuration 'payments'"):
        make_snapshot(broken, previous=before)


def test_a_snapshot_decodes_to_the_messages_it_was_made_of() -> None:
    resources = mesh_resources(SERVICES)
    snapshot = make_snapshot(resources)
    for type_url, messages in resources.items():
        assert snapshot.of(type_url).decoded() == messages


def test_incremental_snapshots_of_a_mesh_equal_full_ones() -> None:
    def mesh(port: int) -> Any:
        return parse_mesh(
            {
                "services": [
                    {"name": "payments", "namespace": "bank", "endpoints": [f"10.0.0.1:{port}"]},
                    {"name": "orders", "namespace": "shop", "endpoints": ["10.0.1.1:80"]},
                ]
            },
            "mesh.yaml",
        )

    first = translate_update(mesh(8080))
    before = make_snapshots(first.default, first.by_namespace)
    kept = settled(first, *before)  # encodings, not messages
    for resources in (kept.default, *kept.by_namespace.values()):
        assert all(isinstance(e, Encoded) for r in resources.values() for e in r.values())
    # A type the namespaces share stays one dict.
    assert kept.by_namespace["bank"][CLUSTER_TYPE] is kept.default[CLUSTER_TYPE]
    second = translate_update(mesh(8081), kept)
    incremental = make_snapshots(second.default, second.by_namespace, before)
    full = make_snapshots(*translate_namespaces(mesh(8081)))
    assert incremental == full  # every namespace's snapshot: the same version, type by type
    payments = "outbound|80||payments.bank.svc.cluster.local"
    pairs = [(incremental[0], before[0])]
    pairs += [(incremental[1][ns], before[1][ns]) for ns in ("bank", "shop")]
    for snapshot, old in pairs:
        assert snapshot.of(ENDPOINT_TYPE).changed == {payments}
        for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE):  # reused, not encoded again
            assert snapshot.of(type_url).resources is old.of(type_url).resources


# -- the ADS server: only what changed, to a stream that has the rest ------------------------


@pytest.fixture
async def client(plane: ControlPlane) -> AsyncIterator[AdsTestClient]:
    c = AdsTestClient(f"127.0.0.1:{plane.xds_port}")
    yield c
    await c.close()


def publish_payments_on(plane: ControlPlane, port: int) -> None:
    current = plane.cache.get("")
    assert current is not None
    resources = served(current)
    plane.cache.set_snapshot(make_snapshot(with_payments_on(resources, port), previous=current))


async def subscribe_eds(client: AdsTestClient, *, ack: bool = True) -> Any:
    await client.send(ENDPOINT_TYPE, ["payments", "orders"])
    eds = await client.recv()
    assert client.names_of(eds) == ["orders", "payments"]
    if ack:
        await client.ack(eds)
        await client.send(LISTENER_TYPE)  # its answer shows the ACK was processed
        assert (await client.recv()).type_url == LISTENER_TYPE
    return eds


async def test_a_stream_that_acked_is_sent_only_the_changed_assignment(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await subscribe_eds(client)
    publish_payments_on(plane, 9002)
    pushed = await client.recv()
    assert pushed.type_url == ENDPOINT_TYPE
    assert client.names_of(pushed) == ["payments"]
    current = plane.cache.get("")
    assert current is not None and pushed.version_info == current.of(ENDPOINT_TYPE).version
    # A client ACKs with its whole subscription (the response named only what changed).
    await client.send(
        ENDPOINT_TYPE, ["payments", "orders"], nonce=pushed.nonce, version=pushed.version_info
    )
    await client.send(CLUSTER_TYPE)  # its answer shows the ACK was processed
    assert (await client.recv()).type_url == CLUSTER_TYPE
    publish_payments_on(plane, 9003)  # and again, from the version it just ACKed
    again = await client.recv()
    assert client.names_of(again) == ["payments"]


async def test_a_stream_that_has_not_acked_gets_its_whole_subscription(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await subscribe_eds(client, ack=False)
    publish_payments_on(plane, 9002)
    pushed = await client.recv()
    assert client.names_of(pushed) == ["orders", "payments"]


async def test_a_stream_that_nacked_gets_its_whole_subscription(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    eds = await subscribe_eds(client, ack=False)
    await client.send(
        ENDPOINT_TYPE, ["payments", "orders"], nonce=eds.nonce, error="cannot use orders"
    )
    await client.send(LISTENER_TYPE)
    assert (await client.recv()).type_url == LISTENER_TYPE
    publish_payments_on(plane, 9002)
    pushed = await client.recv()
    assert client.names_of(pushed) == ["orders", "payments"]


async def test_a_push_it_missed_makes_the_next_one_whole(
    plane: ControlPlane, client: AdsTestClient
) -> None:
    await subscribe_eds(client)
    publish_payments_on(plane, 9002)
    first = await client.recv()
    assert client.names_of(first) == ["payments"]
    # Not ACKed yet when orders changes: what it holds is not known, so all of it is sent.
    current = plane.cache.get("")
    assert current is not None
    resources = served(current)
    resources[ENDPOINT_TYPE]["orders"] = assignment("orders", [("127.0.0.1", 9102)])
    plane.cache.set_snapshot(make_snapshot(resources, previous=current))
    second = await client.recv()
    assert client.names_of(second) == ["orders", "payments"]


# -- the control plane: an endpoint edit is an endpoints-only build --------------------------


async def test_an_endpoint_edit_is_built_from_the_previous_translation(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    text = 'services:\n  - name: payments\n    endpoints: ["127.0.0.1:{port}"]\n'
    mesh.write_text(text.format(port=9001))
    plane = ControlPlane(mesh, poll_interval=0.02, debounce=0.02)
    async with asyncio.timeout(5):
        await plane.start("127.0.0.1:0", None)
    try:
        first = plane.cache.get("")
        mesh.write_text(text.format(port=9002))
        async with asyncio.timeout(5):
            while plane.cache.get("") is first:
                await asyncio.sleep(0.02)
        metrics = plane.metrics.render().decode()
        assert 'outrigger_snapshot_build_seconds_count{kind="full"} 1.0' in metrics
        assert 'outrigger_snapshot_build_seconds_count{kind="endpoints"} 1.0' in metrics
        now = plane.cache.get("")
        assert now is not None and first is not None
        for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE):
            assert now.of(type_url).version == first.of(type_url).version
            assert now.of(type_url).resources is first.of(type_url).resources  # not re-encoded
        assert now.of(ENDPOINT_TYPE).changed == {PAYMENTS}
        # What it keeps between updates is bytes: no message of its resources stays alive.
        gc.collect()
        kept = [
            o
            for o in gc.get_objects()
            if isinstance(o, cluster_pb2.Cluster | endpoint_pb2.ClusterLoadAssignment)
            and PAYMENTS in (getattr(o, "name", ""), getattr(o, "cluster_name", ""))
        ]
        assert kept == []
    finally:
        async with asyncio.timeout(5):
            await plane.stop(0)
