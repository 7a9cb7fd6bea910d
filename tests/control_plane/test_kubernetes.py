"""The Kubernetes source with its real client against the strict fake API server, over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client as kube_client

from control_plane.app import ControlPlane
from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE
from control_plane.sources import SourceError
from control_plane.sources.kubernetes import KubernetesSource
from tests.control_plane.ads_fixtures import AdsTestClient
from tests.control_plane.kube_api import (
    FakeKubeApi,
    endpoint_slice,
    namespace,
    running_api,
    service,
    until,
)

PAYMENTS = "outbound|80||payments.shop.svc.cluster.local"
WAIT = 10.0


def source_for(api: FakeKubeApi, **settings: Any) -> KubernetesSource:
    settings.setdefault("debounce", 0.05)
    return KubernetesSource(
        kube_client.Configuration(host=api.url),
        watch_timeout=(5, 10),
        backoff=(0.05, 0.5),
        sync_timeout=WAIT,
        **settings,
    )


@contextlib.asynccontextmanager
async def kube_plane(api: FakeKubeApi, **settings: Any) -> AsyncIterator[ControlPlane]:
    plane = ControlPlane(source=source_for(api, **settings))
    async with asyncio.timeout(WAIT):
        await plane.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        yield plane
    finally:
        async with asyncio.timeout(WAIT):
            await plane.stop(0)


def shop(api: FakeKubeApi, *, endpoints: tuple[str, ...] = ("10.1.0.2", "10.1.0.1")) -> None:
    api.create(namespace("shop", {"outrigger.dev/timeout": "5s"}))
    api.create(service("payments", "shop", annotations={"outrigger.dev/retry-attempts": "2"}))
    api.create(endpoint_slice("payments-abc12", "shop", "payments", list(endpoints), 8080))


def services_of(plane: ControlPlane) -> dict[str, Any]:
    snapshot = plane.cache.get("shop")
    assert snapshot is not None
    return snapshot.of(CLUSTER_TYPE).decoded()


def endpoints_of(plane: ControlPlane, cluster: str = PAYMENTS) -> list[tuple[str, int]]:
    snapshot = plane.cache.get("shop")
    assert snapshot is not None
    assignment = snapshot.of(ENDPOINT_TYPE).decoded()[cluster]
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for locality in assignment.endpoints
        for e in locality.lb_endpoints
    ]


def versions(plane: ControlPlane, ns: str = "shop") -> dict[str, str]:
    snapshot = plane.cache.get(ns)
    assert snapshot is not None
    return {
        t: snapshot.of(t).version for t in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
    }


def set_addresses(api: FakeKubeApi, addresses: list[str]) -> None:
    """The payments slice now lists exactly `addresses` (ready)."""
    fresh = endpoint_slice("x", "shop", "payments", addresses, 8080)["endpoints"]
    api.edit("EndpointSlice", "shop", "payments-abc12", lambda s: s.update(endpoints=fresh))


def annotate(api: FakeKubeApi, **annotations: str) -> None:
    """Set outrigger.dev/ annotations on shop/payments (keys with _ for -)."""
    more = {f"outrigger.dev/{k.replace('_', '-')}": v for k, v in annotations.items()}
    api.edit("Service", "shop", "payments", lambda s: s["metadata"]["annotations"].update(more))


async def test_the_first_update_is_the_whole_cluster_with_policy_from_each_level() -> None:
    async with running_api() as api:
        shop(api)
        source = source_for(api)
        try:
            update = await source.first()
        finally:
            await source.close()
    (payments,) = update.mesh.services
    assert (payments.name, payments.namespace, payments.port) == ("payments", "shop", 80)
    assert [str(e) for e in payments.endpoints] == ["10.1.0.1:8080", "10.1.0.2:8080"]
    assert payments.addresses == (api.get("Service", "shop", "payments")["spec"]["clusterIP"],)
    assert payments.policy.timeout == 5.0 and payments.origin("timeout") == "namespace"
    assert payments.policy.retries is not None and payments.origin("retry-attempts") == "service"
    assert update.problems == ()
    # Listed in pages, then watched from the list's resourceVersion with bookmarks.
    (listed,) = api.requests_to("/api/v1/services", watch=False)
    assert listed["limit"] == "500"
    for watch in api.requests_to("/api/v1/services", watch=True):
        assert watch["resourceVersion"] and watch["allowWatchBookmarks"] in ("true", "True")


async def test_a_new_service_and_its_endpoints_reach_the_snapshot() -> None:
    async with running_api() as api, kube_plane(api) as plane:
        api.create(namespace("shop"))
        assert PAYMENTS not in services_of(plane)
        api.create(service("payments", "shop"))
        api.create(endpoint_slice("payments-1", "shop", "payments", ["10.1.0.9"], 8080))
        await until("payments in the snapshot", lambda: PAYMENTS in services_of(plane))
        await until("its endpoint", lambda: endpoints_of(plane) == [("10.1.0.9", 8080)])
        api.delete("Service", "shop", "payments")
        await until("payments gone", lambda: PAYMENTS not in services_of(plane))


async def test_an_endpoint_change_is_pushed_as_eds_only() -> None:
    async with running_api() as api:
        shop(api)
        async with kube_plane(api) as plane:
            client = AdsTestClient(f"127.0.0.1:{plane.xds_port}", namespace="shop")
            try:
                for type_url, names in (
                    (CLUSTER_TYPE, []),
                    (ENDPOINT_TYPE, [PAYMENTS]),
                    (LISTENER_TYPE, []),
                    (ROUTE_TYPE, ["outbound"]),
                ):
                    await client.send(type_url, names)
                    await client.ack(await client.recv())
                before = versions(plane)
                set_addresses(api, ["10.1.0.3", "10.1.0.1"])
                pushed = await client.recv()
                assert pushed.type_url == ENDPOINT_TYPE
                await client.ack(pushed)
                with pytest.raises(TimeoutError):
                    await client.recv(timeout=0.5)  # nothing else
                after = versions(plane)
                assert after[ENDPOINT_TYPE] != before[ENDPOINT_TYPE]
                assert {t: v for t, v in after.items() if t != ENDPOINT_TYPE} == {
                    t: v for t, v in before.items() if t != ENDPOINT_TYPE
                }
                assert endpoints_of(plane) == [("10.1.0.1", 8080), ("10.1.0.3", 8080)]
            finally:
                await client.close()


async def test_a_rollout_of_50_endpoint_changes_is_a_few_pushes() -> None:
    async with running_api() as api:
        shop(api, endpoints=())
        # A debounce far above the 10 ms between changes, so a loaded machine that stretches
        # them (a pause of a few hundred ms is seen on a busy 2-core CI box) still sees one
        # burst; at most max_delay (10 x debounce) apart.
        async with kube_plane(api, debounce=0.6) as plane:
            client = AdsTestClient(f"127.0.0.1:{plane.xds_port}", namespace="shop")
            try:
                await client.send(ENDPOINT_TYPE, [PAYMENTS])
                await client.ack(await client.recv())
                addresses: list[str] = []
                for i in range(50):  # one pod becoming ready every 10 ms
                    addresses.append(f"10.2.0.{i + 1}")
                    set_addresses(api, addresses)
                    await asyncio.sleep(0.01)
                pushes = 0
                with contextlib.suppress(TimeoutError):
                    while True:
                        await client.ack(await client.recv(timeout=2.0))
                        pushes += 1
                assert 1 <= pushes <= 5
                assert len(endpoints_of(plane)) == 50
            finally:
                await client.close()


async def test_410_gone_relists_and_sees_what_was_deleted_meanwhile() -> None:
    async with running_api() as api:
        shop(api)
        api.create(service("orders", "shop"))
        async with kube_plane(api) as plane:
            orders = "outbound|80||orders.shop.svc.cluster.local"
            assert orders in services_of(plane)
            await api.stop()  # the watches break; while nobody watches, history is compacted
            api.delete("Service", "shop", "orders")
            api.compact()
            lists_before = len(api.requests_to("/api/v1/services", watch=False))
            await api.start()
            await until("orders gone after a relist", lambda: orders not in services_of(plane))
            assert len(api.requests_to("/api/v1/services", watch=False)) == lists_before + 1
            assert PAYMENTS in services_of(plane)


async def test_an_api_server_restart_resumes_the_watch_and_pushes_nothing() -> None:
    async with running_api() as api:
        shop(api)
        async with kube_plane(api) as plane:
            client = AdsTestClient(f"127.0.0.1:{plane.xds_port}", namespace="shop")
            try:
                await client.send(CLUSTER_TYPE)
                await client.ack(await client.recv())
                await client.send(ENDPOINT_TYPE, [PAYMENTS])
                await client.ack(await client.recv())
                before = plane.cache.versions
                watches = len(api.requests_to("/api/v1/services", watch=True))
                await api.restart()
                await until(
                    "the services watch resumed",
                    lambda: len(api.requests_to("/api/v1/services", watch=True)) > watches,
                )
                with pytest.raises(TimeoutError):
                    await client.recv(timeout=0.6)  # no push: nothing changed
                assert plane.cache.versions == before
                resumed = api.requests_to("/api/v1/services", watch=True)[-1]
                assert int(resumed["resourceVersion"]) >= 1003  # from where it was, no relist
                assert len(api.requests_to("/api/v1/services", watch=False)) == 1
            finally:
                await client.close()


async def test_a_restart_that_loses_history_relists_and_still_pushes_nothing() -> None:
    async with running_api() as api:
        shop(api)
        async with kube_plane(api) as plane:
            before = plane.cache.versions
            pushes = plane.metrics.config_reloads._value.get()
            await api.stop()
            # While it is down, a change the mesh does not read moves the revision on, and the
            # new server keeps no history: the source's resourceVersion is too old (410).
            api.edit(
                "Service", "shop", "payments", lambda s: s["metadata"].update(labels={"a": "b"})
            )
            api.compact()
            await api.start()
            await until(
                "a relist", lambda: len(api.requests_to("/api/v1/services", watch=False)) == 2
            )
            await asyncio.sleep(0.3)
            assert plane.cache.versions == before
            assert plane.metrics.config_reloads._value.get() == pushes


async def test_two_replicas_watching_one_api_compute_equal_versions() -> None:
    async with running_api() as api:
        shop(api)
        api.create(namespace("bank"))
        api.create(service("payments", "bank", [{"port": 8443}]))
        async with kube_plane(api) as first, kube_plane(api) as second:
            assert first.cache.versions == second.cache.versions
            assert set(first.cache.versions) == {"", "bank", "shop"}
            before = dict(first.cache.versions)
            api.edit("Service", "shop", "payments",
                     lambda s: s["metadata"]["annotations"].update(
                         {"outrigger.dev/timeout": "1s"}))  # fmt: skip
            for plane in (first, second):
                await until(
                    "the change", lambda p=plane: p.cache.versions["shop"] != before["shop"]
                )
            assert first.cache.versions == second.cache.versions


async def test_an_invalid_annotation_falls_back_for_that_key_and_is_reported() -> None:
    async with running_api() as api:
        shop(api)
        async with kube_plane(api) as plane:
            annotate(api, timeout="2 seconds", load_balancer="random")
            (event,) = await until("an Event", lambda: api.events)
            assert event["reason"] == "InvalidPolicy"
            assert event["type"] == "Warning"
            assert event["regarding"]["kind"] == "Service"
            assert (event["regarding"]["namespace"], event["regarding"]["name"]) == (
                "shop",
                "payments",
            )
            assert event["note"] == (
                'outrigger.dev/timeout: must be a duration like "250ms", "1.5s", "2s" or "1m", '
                'got "2 seconds"; using 5s (namespace) instead'
            )
            (problem,) = plane.problems
            assert (problem.key, problem.value) == ("outrigger.dev/timeout", "2 seconds")
            assert plane.metrics.invalid_annotations.labels("Service")._value.get() == 1
            cluster = services_of(plane)[PAYMENTS]
            assert cluster.load_balancing_policy.policies  # the other key still applied
            await asyncio.sleep(0.3)
            assert len(api.events) == 1  # posted once while it lasts
            annotate(api, timeout="2s")
            await until("the problem fixed", lambda: plane.problems == ())
            assert plane.metrics.invalid_annotations.labels("Service")._value.get() == 0


async def test_namespaces_flag_watches_only_those_namespaces() -> None:
    async with running_api() as api:
        shop(api)
        api.create(namespace("bank"))
        api.create(service("ledger", "bank"))
        async with kube_plane(api, namespaces=("shop",)) as plane:
            names = set(services_of(plane))
            assert PAYMENTS in names
            assert not any("bank" in name for name in names)
            paths = {path for _, path, _ in api.requests}
            assert paths == {
                "/api/v1/namespaces/shop/services",
                "/apis/discovery.k8s.io/v1/namespaces/shop/endpointslices",
                "/api/v1/namespaces",
            }
            assert {q.get("fieldSelector") for q in api.requests_to("/api/v1/namespaces")} == {
                "metadata.name=shop"
            }


async def test_the_mesh_file_gives_defaults_and_outside_services(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(
        "defaults: {connect_timeout: 3s}\n"
        "outbound_policy: registry_only\n"
        "services:\n"
        "  - {name: stripe, namespace: external, endpoints: ['api.stripe.example:443']}\n"
        "  - {name: payments, namespace: shop, endpoints: []}\n"
    )
    async with running_api() as api:
        shop(api)
        async with kube_plane(api, mesh_path=mesh) as plane:
            clusters = services_of(plane)
            assert "outbound|80||stripe.external.svc.cluster.local" in clusters
            assert clusters[PAYMENTS].connect_timeout.seconds == 3
            assert "PassthroughCluster" not in clusters  # registry_only from the file
            (conflict,) = plane.problems
            assert conflict.reason == "ServiceConflict"
            assert "payments" in conflict.message and "cluster's is used" in conflict.message
            caplog.set_level(logging.ERROR, logger="outrigger.control_plane")
            mesh.write_text("defaults: {connect_timeout: soon}\n")
            await until("the bad edit refused", lambda: "refused" in caplog.text)
            assert services_of(plane)[PAYMENTS].connect_timeout.seconds == 3


async def test_no_api_at_start_is_a_clear_error() -> None:
    api = FakeKubeApi()
    await api.start()
    await api.stop()  # a port nobody listens on
    source = source_for(api)
    source.sync_timeout = 0.5
    try:
        with pytest.raises(SourceError, match=r"could not list services .*within 0.5s"):
            await source.first()
    finally:
        await source.close()


async def test_a_broken_api_is_retried_with_backoff_not_in_a_loop() -> None:
    async with running_api() as api:
        shop(api)
        source = source_for(api)
        try:
            await source.first()
            watched = {r.name: r.stats.watches for r in source.reflectors}
            await api.stop()
            await asyncio.sleep(1.5)
            attempts = sum(r.stats.failures for r in source.reflectors)
            # Backoff 0.05 s doubling to 0.5 s (jittered): about 6 tries each in 1.5 s.
            assert 3 <= attempts <= 3 * 10
            await api.start()
            await until(
                "watching again",
                lambda: all(r.stats.watches > watched[r.name] for r in source.reflectors),
            )
        finally:
            await source.close()
