from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from mesh.model import load_mesh, parse_mesh
from mesh.policy import Backoff, CircuitBreaker, RetryBudget
from mesh.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Resources,
    translate,
)
from mesh.xds import pack_resources, resources_from_any, resources_version
from sidecar.config import (
    ConfigError,
    Endpoint,
    LbPolicy,
    OutboundPolicy,
    RetryPolicy,
)
from sidecar.xds.interpret import HONOURED_FIELDS, build_snapshot, snapshot_from_mesh

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mesh.yaml"
PAYMENTS = "outbound|80||payments.default.svc.cluster.local"


def resources_for(policy: dict[str, Any], **top: Any) -> Resources:
    service = {"name": "payments", "endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"]}
    return translate(parse_mesh({**top, "services": [{**service, "policy": policy}]}, "m.yaml"))


def outbound_payments_route(resources: Resources) -> Any:
    return resources[ROUTE_TYPE]["outbound"].virtual_hosts[0].routes[0]


def test_example_mesh_round_trips_into_the_policy_it_states() -> None:
    snapshot = snapshot_from_mesh(load_mesh(EXAMPLE))
    payments = snapshot.services[PAYMENTS]
    assert (payments.name, payments.namespace, payments.port) == ("payments", "default", 80)
    assert payments.endpoints == (Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002))
    assert payments.timeout == 2.0
    assert payments.connect_timeout == 1.0
    assert payments.lb is LbPolicy.LEAST_REQUEST
    assert payments.retry == RetryPolicy(
        attempts=2,
        retry_on=frozenset({"connect-failure", "reset", "gateway-error", "unavailable"}),
        retriable_status=frozenset({503}),
        per_try_timeout=0.5,
        backoff=Backoff(base=0.025, max=0.25),
        budget=RetryBudget(percent=20.0, min_concurrency=3),
        non_idempotent=False,
    )
    assert payments.breaker == CircuitBreaker(
        consecutive_failures=5,
        open_for=30.0,
        max_ejection_percent=50,
        max_requests=1024,
        max_pending=1024,
    )
    frontend = snapshot.services["outbound|80||frontend.web.svc.cluster.local"]
    assert frontend.timeout is None
    assert frontend.retry is None
    assert frontend.breaker.consecutive_failures is None
    assert frontend.lb is LbPolicy.ROUND_ROBIN
    assert snapshot.outbound_policy is OutboundPolicy.ALLOW_ANY
    assert snapshot.trace_sampling == pytest.approx(0.01)


def test_routes_cover_authorities_with_and_without_port() -> None:
    snapshot = snapshot_from_mesh(load_mesh(EXAMPLE))
    orders = snapshot.services["outbound|8080||orders.default.svc.cluster.local"]
    for authority in (b"orders", b"orders:8080", b"orders.default.svc.cluster.local:8080"):
        assert snapshot.route(authority) is orders
    assert snapshot.route(b"orders:9999") is None
    assert snapshot.route(b"payments:80") is snapshot.services[PAYMENTS]


def test_non_idempotent_true_reads_back() -> None:
    resources = resources_for({"retries": {"attempts": 1, "non_idempotent": True}})
    retry = build_snapshot(resources, "v1").services[PAYMENTS].retry
    assert retry is not None
    assert retry.non_idempotent is True
    assert retry.budget is None


def test_version_and_config_dump() -> None:
    resources = resources_for({})
    snapshot = build_snapshot(resources, resources_version(resources))
    assert snapshot.version == resources_version(resources)
    dumped = snapshot.resources[CLUSTER_TYPE][PAYMENTS]
    assert dumped["name"] == PAYMENTS
    assert dumped["eds_cluster_config"]["service_name"] == PAYMENTS
    assert set(snapshot.resources) == {LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE}


def test_allow_any_and_registry_only() -> None:
    allow = build_snapshot(resources_for({}), "v1")
    assert allow.outbound_policy is OutboundPolicy.ALLOW_ANY
    registry = build_snapshot(resources_for({}, outbound_policy="registry_only"), "v1")
    assert registry.outbound_policy is OutboundPolicy.REGISTRY_ONLY
    assert registry.route(b"example.com") is None


def test_catch_all_to_an_eds_cluster_is_refused() -> None:
    resources = resources_for({})
    catch_all = resources[ROUTE_TYPE]["outbound"].virtual_hosts[-1]
    catch_all.routes[0].route.cluster = PAYMENTS
    with pytest.raises(ConfigError, match=r'RouteConfiguration "outbound": virtual_hosts\[1\]'):
        build_snapshot(resources, "v1")


def test_absent_fields_take_envoy_defaults() -> None:
    resources = resources_for({})
    outbound_payments_route(resources).route.ClearField("timeout")
    cluster = resources[CLUSTER_TYPE][PAYMENTS]
    cluster.ClearField("connect_timeout")
    cluster.ClearField("circuit_breakers")
    cluster.outlier_detection.SetInParent()
    service = build_snapshot(resources, "v1").services[PAYMENTS]
    assert service.timeout == 15.0
    assert service.connect_timeout == 5.0
    assert service.breaker == CircuitBreaker(consecutive_failures=5, max_ejection_percent=10)


def test_lb_policy_enum_is_read_when_no_list() -> None:
    resources = resources_for({})
    resources[CLUSTER_TYPE][PAYMENTS].lb_policy = cluster_pb2.Cluster.LbPolicy.RANDOM
    assert build_snapshot(resources, "v1").services[PAYMENTS].lb is LbPolicy.RANDOM


def _break_missing_cluster(resources: Resources) -> None:
    del resources[CLUSTER_TYPE][PAYMENTS]


def _break_missing_endpoints(resources: Resources) -> None:
    del resources[ENDPOINT_TYPE][PAYMENTS]


def _break_missing_listener(resources: Resources) -> None:
    del resources[LISTENER_TYPE]["outbound"]


def _break_lb_policy(resources: Resources) -> None:
    resources[CLUSTER_TYPE][PAYMENTS].lb_policy = cluster_pb2.Cluster.LbPolicy.MAGLEV


def _break_lb_list(resources: Resources) -> None:
    cluster = resources[CLUSTER_TYPE][PAYMENTS]
    policy = cluster.load_balancing_policy.policies.add()
    policy.typed_extension_config.name = "maglev"
    policy.typed_extension_config.typed_config.type_url = "type.googleapis.com/x.Maglev"


def _break_retry_on(resources: Resources) -> None:
    outbound_payments_route(
        resources
    ).route.retry_policy.retry_on = "connect-failure,refused-stream"


def _break_duration(resources: Resources) -> None:
    resources[CLUSTER_TYPE][PAYMENTS].connect_timeout.seconds = -1


def _break_request_headers(resources: Resources) -> None:
    policy = outbound_payments_route(resources).route.retry_policy
    policy.retriable_request_headers.add(name="x-retry-me", present_match=True)


def _break_second_route(resources: Resources) -> None:
    vhost = resources[ROUTE_TYPE]["outbound"].virtual_hosts[0]
    vhost.routes.add().CopyFrom(vhost.routes[0])


def _break_endpoint_port(resources: Resources) -> None:
    lb_endpoint = resources[ENDPOINT_TYPE][PAYMENTS].endpoints[0].lb_endpoints[1]
    lb_endpoint.endpoint.address.socket_address.port_value = 0


def _break_weighted_clusters(resources: Resources) -> None:
    action = outbound_payments_route(resources).route
    action.weighted_clusters.clusters.add(name=PAYMENTS).weight.value = 100


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (
            _break_missing_cluster,
            rf'Cluster "{PAYMENTS}": missing \(referenced by RouteConfiguration "outbound" '
            r"virtual_hosts\[0\]\.routes\[0\]\.route\.cluster\)",
        ),
        (_break_missing_endpoints, rf'ClusterLoadAssignment "{PAYMENTS}": missing'),
        (_break_missing_listener, r'Listener "outbound": missing'),
        (_break_lb_policy, rf'Cluster "{PAYMENTS}": lb_policy: MAGLEV is not supported'),
        (_break_lb_list, rf'Cluster "{PAYMENTS}": load_balancing_policy\.policies: none of'),
        (
            _break_retry_on,
            r'RouteConfiguration "outbound": virtual_hosts\[0\]\.routes\[0\]\.route\.retry_policy'
            r"\.retry_on: 'refused-stream' is not supported",
        ),
        (_break_duration, rf'Cluster "{PAYMENTS}": connect_timeout: must be a non-negative'),
        (_break_request_headers, r"retry_policy\.retriable_request_headers: only the idempotency"),
        (_break_second_route, r"virtual_hosts\[0\]\.routes: must hold exactly one route"),
        (
            _break_endpoint_port,
            rf'ClusterLoadAssignment "{PAYMENTS}": endpoints\[0\]\.lb_endpoints\[1\]\.endpoint'
            r"\.address\.socket_address: needs an address and a port_value",
        ),
        (_break_weighted_clusters, r"routes\[0\]\.route\.cluster: a service's route must forward"),
    ],
)
def test_a_broken_resource_raises_config_error_naming_the_field(
    breaker: Any, expected: str
) -> None:
    resources = resources_for({"retries": {"attempts": 1}})
    breaker(resources)
    with pytest.raises(ConfigError, match=expected):
        build_snapshot(resources, "v1")


def test_grpc_retry_conditions_are_read() -> None:
    """The translation adds `unavailable` for proxyless gRPC clients; the sidecar reads it as
    they do (it applies to HTTP/2 services' trailers-only answers)."""
    resources = resources_for({"retries": {"attempts": 1, "retry_on": ["connect-failure"]}})
    policy = outbound_payments_route(resources).route.retry_policy
    assert "unavailable" in policy.retry_on
    retry = build_snapshot(resources, "v1").services[PAYMENTS].retry
    assert retry is not None
    assert retry.retry_on == frozenset({"connect-failure", "unavailable"})
    assert retry.retriable_status == frozenset()


def test_unhealthy_endpoints_are_left_out() -> None:
    resources = resources_for({})
    resources[ENDPOINT_TYPE][PAYMENTS].endpoints[0].lb_endpoints[0].health_status = 2  # UNHEALTHY
    endpoints = build_snapshot(resources, "v1").services[PAYMENTS].endpoints
    assert endpoints == (Endpoint("127.0.0.1", 9002),)


def test_resources_from_any_round_trips_and_unwraps_discovery_resources() -> None:
    resources = translate(load_mesh(EXAMPLE))
    packed = pack_resources(resources)
    wrapped = any_pb2.Any()
    wrapped.Pack(discovery_pb2.Resource(name="x", resource=packed[0]))
    unpacked = resources_from_any([wrapped, *packed[1:]])
    assert resources_version(unpacked) == resources_version(resources)
    assert build_snapshot(unpacked, "v").services == snapshot_from_mesh(load_mesh(EXAMPLE)).services


def test_honoured_fields_table_names_the_policy_fields() -> None:
    fields = {field for _, field, _ in HONOURED_FIELDS}
    for required in (
        "route.timeout",
        "route.retry_policy.retry_on",
        "route.retry_policy.retriable_request_headers",
        "outlier_detection",
        "load_balancing_policy",
        "connect_timeout",
        "tracing.random_sampling",
    ):
        assert required in fields
