"""Cluster objects -> the mesh: endpoints, ports by name, headless, ExternalName, no-op updates.

Objects are made by the fake API server (defaulted and validated as the API would), then fed to
`ClusterState` as the source's reflectors do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from control_plane.sources.cluster import ClusterState, cluster_mesh
from mesh.model import Mesh, MeshService, Protocol, load_mesh
from outrigger.demo.meshfile import TEMPLATE as DEMO_MESH
from tests.control_plane.kube_api import (
    RESOURCES,
    FakeKubeApi,
    endpoint_slice,
    namespace,
    service,
)


def state_of(*objects: dict[str, Any]) -> tuple[ClusterState, FakeKubeApi]:
    api = FakeKubeApi()
    state = ClusterState()
    for obj in objects:
        stored = api.create(obj)
        state.put(stored["kind"], stored)
    return state, api


def mesh_of(
    state: ClusterState, base: Mesh | None = None
) -> dict[tuple[str, str, int], MeshService]:
    update = cluster_mesh(state, base or Mesh())
    return {(s.name, s.namespace, s.port): s for s in update.mesh.services}


def hosts(service: MeshService) -> list[str]:
    return [str(e) for e in service.endpoints]


def test_endpoints_of_several_slices_are_merged_sorted_and_deduplicated() -> None:
    state, _ = state_of(
        service("web", "shop"),
        endpoint_slice("web-a", "shop", "web", ["10.1.0.3", "10.1.0.1"], 8080),
        endpoint_slice("web-b", "shop", "web", ["10.1.0.2", "10.1.0.1"], 8080),
    )
    assert hosts(mesh_of(state)[("web", "shop", 80)]) == [
        "10.1.0.1:8080",
        "10.1.0.2:8080",
        "10.1.0.3:8080",
    ]


def test_terminating_but_serving_endpoints_only_when_none_is_ready() -> None:
    going = endpoint_slice("web-old", "shop", "web", ["10.1.0.9"], 8080, ready=False,
                           serving=True, terminating=True)  # fmt: skip
    state, api = state_of(
        service("web", "shop"),
        endpoint_slice("web-new", "shop", "web", ["10.1.0.1"], 8080),
        going,
    )
    assert hosts(mesh_of(state)[("web", "shop", 80)]) == ["10.1.0.1:8080"]
    state.delete("EndpointSlice", api.get("EndpointSlice", "shop", "web-new"))
    assert hosts(mesh_of(state)[("web", "shop", 80)]) == ["10.1.0.9:8080"]
    not_serving = endpoint_slice("web-old", "shop", "web", ["10.1.0.9"], 8080, ready=False,
                                 serving=False, terminating=True)  # fmt: skip
    state.put("EndpointSlice", api.update(not_serving))
    assert hosts(mesh_of(state)[("web", "shop", 80)]) == []


def test_each_service_port_takes_the_slice_port_of_the_same_name() -> None:
    web = service("web", "shop", [{"name": "http", "port": 80, "targetPort": "web"},
                                  {"name": "admin", "port": 9090, "targetPort": 9901},
                                  {"name": "dns", "port": 53, "protocol": "UDP"}])  # fmt: skip
    http = endpoint_slice("web-1", "shop", "web", ["10.1.0.1"], 8080, port_name="http")
    admin = endpoint_slice("web-2", "shop", "web", ["10.1.0.1"], 9901, port_name="admin")
    state, _ = state_of(web, http, admin)
    mesh = mesh_of(state)
    assert sorted(mesh) == [("web", "shop", 80), ("web", "shop", 9090)]  # UDP is not routed
    assert hosts(mesh[("web", "shop", 80)]) == ["10.1.0.1:8080"]
    assert hosts(mesh[("web", "shop", 9090)]) == ["10.1.0.1:9901"]
    assert not mesh[("web", "shop", 80)].sole_port


def test_a_service_without_selector_uses_hand_made_slices() -> None:
    legacy = service("legacy", "shop", [{"port": 5432}])  # no selector, unnamed port
    hand_made = endpoint_slice("legacy-1", "shop", "legacy", ["192.0.2.10"], 5432, port_name="")
    state, _ = state_of(legacy, hand_made)
    entry = mesh_of(state)[("legacy", "shop", 5432)]
    assert hosts(entry) == ["192.0.2.10:5432"]
    assert entry.sole_port


def test_a_headless_service_keeps_pod_hostnames() -> None:
    db = service("db", "shop", [{"name": "pg", "port": 5432}], clusterIP="None")
    pods = endpoint_slice("db-1", "shop", "db", ["10.1.0.7", "10.1.0.8"], 5432, port_name="pg",
                          hostnames=["db-0", "db-1"])  # fmt: skip
    state, _ = state_of(db, pods)
    entry = mesh_of(state)[("db", "shop", 5432)]
    assert entry.headless and entry.addresses == ()
    assert [e.hostname for e in entry.endpoints] == ["db-0", "db-1"]


def test_an_external_name_service_routes_to_its_host() -> None:
    state, _ = state_of(
        service("stripe", "shop", [{"port": 443}], type="ExternalName",
                externalName="api.stripe.example"),
        service("mail", "shop", [], type="ExternalName", externalName="smtp.example"),
    )  # fmt: skip
    mesh = mesh_of(state)
    assert hosts(mesh[("stripe", "shop", 443)]) == ["api.stripe.example:443"]
    assert hosts(mesh[("mail", "shop", 80)]) == ["smtp.example:80"]


def test_a_port_declares_its_protocol_by_app_protocol_else_by_its_name() -> None:
    ports = [
        {"name": "web", "port": 80, "appProtocol": "http"},
        {"name": "tcp-db", "port": 5432},
        {"name": "mysql", "port": 3306},
        {"name": "redis-cache", "port": 6379},
        {"name": "https", "port": 443},
        {"name": "tls-legacy", "port": 8443},
        {"name": "http-admin", "port": 9000, "appProtocol": "tcp"},  # appProtocol wins
        {"name": "grpc-api", "port": 9090},  # Istio's name prefix
        {"name": "http2-web", "port": 9091},
        {"name": "rpc", "port": 9092, "appProtocol": "kubernetes.io/h2c"},
        {"name": "rpc2", "port": 9093, "appProtocol": "grpc"},
        {"name": "rpc3", "port": 9094, "appProtocol": "h2c"},
        {"name": "metrics", "port": 9100},  # no known prefix: detected
    ]
    state, _ = state_of(service("mixed", "shop", ports))
    declared = {port: s.protocol for (_, _, port), s in mesh_of(state).items()}
    assert declared == {
        80: Protocol.HTTP,
        5432: Protocol.TCP,
        3306: Protocol.TCP,
        6379: Protocol.TCP,
        443: Protocol.TLS,
        8443: Protocol.TLS,
        9000: Protocol.TCP,
        9090: Protocol.GRPC,
        9091: Protocol.HTTP2,
        9092: Protocol.HTTP2,
        9093: Protocol.GRPC,
        9094: Protocol.HTTP2,
        9100: None,
    }


def test_cluster_ips_are_the_virtual_addresses() -> None:
    state, api = state_of(service("web", "shop"))
    cluster_ip = api.get("Service", "shop", "web")["spec"]["clusterIP"]
    assert mesh_of(state)[("web", "shop", 80)].addresses == (cluster_ip,)


def test_an_update_the_mesh_does_not_read_changes_nothing() -> None:
    state, api = state_of(service("web", "shop"), namespace("shop"))
    relabelled = api.edit("Service", "shop", "web",
                          lambda s: s["metadata"].update(labels={"team": "a"}))  # fmt: skip
    assert state.put("Service", relabelled) is False
    annotated = api.edit("Service", "shop", "web",
                         lambda s: s["metadata"].update(
                             annotations={"outrigger.dev/timeout": "1s"}))  # fmt: skip
    assert state.put("Service", annotated) is True


def test_a_relist_replaces_exactly_what_was_listed() -> None:
    state, api = state_of(service("a", "shop"), service("b", "shop"), service("c", "bank"))
    b = api.get("Service", "shop", "b")
    assert state.replace("Service", [b], namespace="shop") is True
    assert sorted(name for name, _, _ in mesh_of(state)) == ["b", "c"]  # bank untouched
    assert state.replace("Service", [b], namespace="shop") is False


def test_a_namespace_problem_is_reported_once_on_the_namespace() -> None:
    state, _ = state_of(
        namespace("shop", {"outrigger.dev/max-requests": "lots"}),
        service("a", "shop"),
        service("b", "shop"),
    )
    update = cluster_mesh(state, Mesh())
    (problem,) = update.problems
    assert problem.where == "Namespace shop"
    assert problem.message.endswith("; using 1024 (built-in) instead")


def test_the_example_shop_becomes_the_policies_it_annotates() -> None:
    path = Path(__file__).resolve().parents[2] / "k8s" / "examples" / "shop.yaml"
    objects = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] in RESOURCES]
    state, _ = state_of(*objects)
    update = cluster_mesh(state, Mesh())
    assert update.problems == ()
    shop = {s.name: s for s in update.mesh.services}
    assert sorted(shop) == ["frontend", "orders", "payments"]
    assert (shop["frontend"].policy.timeout, shop["frontend"].origin("timeout")) == (5.0, "service")
    assert shop["frontend"].origin("connect-timeout") == "namespace"
    assert shop["frontend"].calls == ("orders",)
    assert (shop["orders"].policy.timeout, shop["orders"].policy.retries) == (3.0, None)
    # payments is annotated with the demo's policy (make demo's mesh file), to the last field.
    demo = {s.name: s for s in load_mesh(DEMO_MESH).services}
    assert shop["payments"].policy == demo["payments"].policy
    assert shop["payments"].policy.retries is not None
    assert shop["payments"].policy.circuit_breaker.consecutive_failures == 3
