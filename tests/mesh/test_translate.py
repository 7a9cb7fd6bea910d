from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.json_format import MessageToDict

from mesh.model import Mesh, MeshEndpoint, MeshService, Policy, Protocol, load_mesh, parse_mesh
from mesh.translate import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HTTP_PROTOCOL_OPTIONS,
    LISTENER_TYPE,
    PASSTHROUGH_CLUSTER,
    ROUTE_TYPE,
    Translation,
    translate,
    translate_namespaces,
    translate_update,
)
from mesh.xds import POLICY_METADATA, resources_version

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mesh.yaml"
PAYMENTS = "outbound|80||payments.default.svc.cluster.local"


def mesh_with(policy: dict[str, Any], **top: Any) -> Any:
    service = {"name": "payments", "endpoints": ["127.0.0.1:9001", "127.0.0.1:9002"]}
    return parse_mesh({**top, "services": [{**service, "policy": policy}]}, "mesh.yaml")


def payments_route(resources: dict[str, dict[str, Any]], config: str = "outbound") -> Any:
    for vhost in resources[ROUTE_TYPE][config].virtual_hosts:
        if "payments" in vhost.domains:
            return vhost.routes[0]
    raise AssertionError("no payments virtual host")


def test_resource_names_follow_the_scheme() -> None:
    resources = translate(load_mesh(EXAMPLE))
    assert list(resources) == [LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE]
    # From namespace "default": frontend (namespace web) has no bare-name gRPC listeners.
    assert sorted(resources[LISTENER_TYPE]) == [
        "frontend.web.svc.cluster.local",
        "frontend.web.svc.cluster.local:80",
        "orders",
        "orders.default.svc.cluster.local",
        "orders.default.svc.cluster.local:8080",
        "orders:8080",
        "outbound",
        "payments",
        "payments.default.svc.cluster.local",
        "payments.default.svc.cluster.local:80",
        "payments:80",
    ]
    assert sorted(resources[ROUTE_TYPE]) == [
        "frontend.web.svc.cluster.local:80",
        "orders.default.svc.cluster.local:8080",
        "outbound",
        "payments.default.svc.cluster.local:80",
    ]
    assert sorted(resources[CLUSTER_TYPE]) == [
        "PassthroughCluster",
        "outbound|8080||orders.default.svc.cluster.local",
        "outbound|80||frontend.web.svc.cluster.local",
        PAYMENTS,
    ]
    assert sorted(resources[ENDPOINT_TYPE]) == sorted(
        name for name in resources[CLUSTER_TYPE] if name != PASSTHROUGH_CLUSTER
    )


def test_retries_become_route_retry_policy() -> None:
    resources = translate(
        mesh_with(
            {
                "timeout": "2s",
                "retries": {
                    "attempts": 2,
                    "per_try_timeout": "500ms",
                    "retry_on": ["connect-failure", "reset", "503"],
                    "backoff": {"base": "25ms", "max": "250ms"},
                },
            }
        )
    )
    policy = payments_route(resources).route.retry_policy
    assert policy.num_retries.value == 2
    assert policy.per_try_timeout.ToMilliseconds() == 500
    assert policy.retry_back_off.base_interval.ToMilliseconds() == 25
    assert policy.retry_back_off.max_interval.ToMilliseconds() == 250
    assert policy.retry_on.split(",") == [
        "connect-failure",
        "reset",
        "retriable-status-codes",
        "unavailable",
    ]
    assert list(policy.retriable_status_codes) == [503]
    headers = {
        (m.name, m.string_match.exact or m.present_match) for m in policy.retriable_request_headers
    }
    assert (":method", "GET") in headers
    assert (":method", "POST") not in headers
    assert ("idempotency-key", True) in headers


def test_non_idempotent_true_leaves_request_headers_empty() -> None:
    resources = translate(mesh_with({"retries": {"attempts": 1, "non_idempotent": True}}))
    assert len(payments_route(resources).route.retry_policy.retriable_request_headers) == 0


def test_retriable_4xx_alone_adds_no_grpc_condition() -> None:
    resources = translate(mesh_with({"retries": {"attempts": 1, "retry_on": ["retriable-4xx"]}}))
    assert payments_route(resources).route.retry_policy.retry_on == "retriable-4xx"


def test_no_timeout_is_an_explicit_zero_and_no_retries_no_policy() -> None:
    route = payments_route(translate(mesh_with({}))).route
    assert route.HasField("timeout")
    assert route.timeout.ToNanoseconds() == 0
    assert not route.HasField("max_stream_duration")
    assert not route.HasField("retry_policy")


def test_timeout_also_reaches_grpc_clients() -> None:
    resources = translate(mesh_with({"timeout": "1.5s"}))
    route = payments_route(resources, "payments.default.svc.cluster.local:80").route
    assert route.timeout.ToMilliseconds() == 1500
    assert route.max_stream_duration.max_stream_duration.ToMilliseconds() == 1500
    assert route.max_stream_duration.grpc_timeout_header_max.ToMilliseconds() == 1500


def test_breaker_becomes_outlier_detection_and_circuit_breakers() -> None:
    resources = translate(
        mesh_with(
            {
                "circuit_breaker": {
                    "consecutive_failures": 5,
                    "open_for": "30s",
                    "max_ejection_percent": 50,
                    "max_requests": 100,
                    "max_pending": 10,
                },
                "retries": {"attempts": 1, "budget": {"percent": 20, "min_concurrency": 3}},
            }
        )
    )
    cluster = resources[CLUSTER_TYPE][PAYMENTS]
    od = cluster.outlier_detection
    assert od.consecutive_5xx.value == 5
    assert od.consecutive_gateway_failure.value == 5
    assert od.enforcing_consecutive_5xx.value == 100
    assert od.enforcing_consecutive_gateway_failure.value == 100
    assert od.enforcing_success_rate.value == 0
    assert od.base_ejection_time.ToSeconds() == 30
    assert od.max_ejection_percent.value == 50
    thresholds = cluster.circuit_breakers.thresholds[0]
    assert thresholds.max_requests.value == 100
    assert thresholds.max_pending_requests.value == 10
    assert thresholds.retry_budget.budget_percent.value == 20.0
    assert thresholds.retry_budget.min_retry_concurrency.value == 3


def test_no_consecutive_failures_means_no_outlier_detection() -> None:
    cluster = translate(mesh_with({}))[CLUSTER_TYPE][PAYMENTS]
    assert not cluster.HasField("outlier_detection")
    assert cluster.circuit_breakers.thresholds[0].max_requests.value == 1024
    assert not cluster.circuit_breakers.thresholds[0].HasField("retry_budget")


def test_least_request_uses_load_balancing_policy_with_round_robin_fallback() -> None:
    cluster = translate(mesh_with({"load_balancer": "least_request"}))[CLUSTER_TYPE][PAYMENTS]
    assert cluster.lb_policy == cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN
    types = [
        p.typed_extension_config.typed_config.type_url
        for p in cluster.load_balancing_policy.policies
    ]
    assert types == [
        "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest",
        "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin",
    ]


def test_random_uses_load_balancing_policy_and_round_robin_needs_none() -> None:
    random = translate(mesh_with({"load_balancer": "random"}))[CLUSTER_TYPE][PAYMENTS]
    first = random.load_balancing_policy.policies[0].typed_extension_config.typed_config
    assert first.type_url.endswith("random.v3.Random")
    plain = translate(mesh_with({}))[CLUSTER_TYPE][PAYMENTS]
    assert not plain.HasField("load_balancing_policy")


def test_cluster_is_eds_over_ads_with_connect_and_idle_timeouts() -> None:
    cluster = translate(mesh_with({"connect_timeout": "250ms"}))[CLUSTER_TYPE][PAYMENTS]
    assert cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    assert cluster.eds_cluster_config.service_name == PAYMENTS
    assert cluster.connect_timeout.ToMilliseconds() == 250
    options = http_protocol_options_pb2.HttpProtocolOptions()
    assert cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].Unpack(options)
    assert options.common_http_protocol_options.idle_timeout.ToSeconds() == 60


def test_load_assignment_lists_the_endpoints_in_one_weighted_locality() -> None:
    assignment = translate(mesh_with({}))[ENDPOINT_TYPE][PAYMENTS]
    locality = assignment.endpoints[0]
    assert locality.HasField("locality")  # gRPC NACKs an EDS locality without it
    assert locality.load_balancing_weight.value == 1
    addresses = [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for e in locality.lb_endpoints
    ]
    assert addresses == [("127.0.0.1", 9001), ("127.0.0.1", 9002)]


def test_outbound_listener_samples_traces_and_uses_rds() -> None:
    mesh = mesh_with({}, tracing={"sampling": 0.25})
    listener = translate(mesh)[LISTENER_TYPE]["outbound"]
    assert listener.address.socket_address.port_value == 15001
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert hcm.rds.route_config_name == "outbound"
    assert hcm.tracing.random_sampling.value == 25.0
    assert hcm.http_filters[-1].name == "envoy.filters.http.router"


def test_grpc_listener_is_an_api_listener_naming_the_service_route() -> None:
    resources = translate(mesh_with({}))
    for name in ("payments", "payments:80", "payments.default.svc.cluster.local:80"):
        hcm = hcm_pb2.HttpConnectionManager()
        assert resources[LISTENER_TYPE][name].api_listener.api_listener.Unpack(hcm)
        assert hcm.rds.route_config_name == "payments.default.svc.cluster.local:80"
        assert hcm.rds.config_source.HasField("ads")
        assert hcm.http_filters[-1].name == "envoy.filters.http.router"


def test_domains_cover_every_spelling() -> None:
    resources = translate(load_mesh(EXAMPLE))
    vhosts = {v.name: v for v in resources[ROUTE_TYPE]["outbound"].virtual_hosts}
    orders = vhosts["orders.default.svc.cluster.local:8080"]
    assert set(orders.domains) == {
        "orders",
        "orders:8080",
        "orders.default",
        "orders.default:8080",
        "orders.default.svc",
        "orders.default.svc:8080",
        "orders.default.svc.cluster.local",
        "orders.default.svc.cluster.local:8080",
    }


def test_allow_any_routes_the_catch_all_to_an_original_dst_cluster() -> None:
    resources = translate(mesh_with({}))
    catch_all = resources[ROUTE_TYPE]["outbound"].virtual_hosts[-1]
    assert list(catch_all.domains) == ["*"]
    assert catch_all.routes[0].route.cluster == PASSTHROUGH_CLUSTER
    passthrough = resources[CLUSTER_TYPE][PASSTHROUGH_CLUSTER]
    assert passthrough.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST


def test_registry_only_answers_the_catch_all_with_502() -> None:
    resources = translate(mesh_with({}, outbound_policy="registry_only"))
    catch_all = resources[ROUTE_TYPE]["outbound"].virtual_hosts[-1]
    assert list(catch_all.domains) == ["*"]
    assert catch_all.routes[0].direct_response.status == 502
    assert PASSTHROUGH_CLUSTER not in resources[CLUSTER_TYPE]


def test_translation_is_deterministic_and_versions_follow_content() -> None:
    mesh = load_mesh(EXAMPLE)
    first, second = translate(mesh), translate(mesh)
    assert resources_version(first) == resources_version(second)
    assert len(resources_version(first)) == 16
    changed = translate(mesh_with({"timeout": "3s"}))
    assert resources_version(changed) != resources_version(translate(mesh_with({"timeout": "2s"})))


# -- Kubernetes DNS rules, per namespace --------------------------------------------------------


def vhost_domains(resources: dict[str, dict[str, Any]], fqdn_port: str) -> set[str]:
    for vhost in resources[ROUTE_TYPE]["outbound"].virtual_hosts:
        if vhost.name == fqdn_port:
            return set(vhost.domains)
    raise AssertionError(f"no virtual host {fqdn_port}")


def two_namespaces() -> Any:
    return parse_mesh(
        {
            "services": [
                {"name": "payments", "namespace": "shop", "endpoints": ["10.0.0.1:8080"],
                 "addresses": ["10.96.0.10"]},
                {"name": "payments", "namespace": "bank", "port": 8443, "endpoints": []},
            ]
        },
        "mesh.yaml",
    )  # fmt: skip


def test_the_bare_name_reaches_only_the_callers_own_namespace() -> None:
    others, by_namespace = translate_namespaces(two_namespaces())
    assert sorted(by_namespace) == ["bank", "shop"]
    shop = vhost_domains(by_namespace["shop"], "payments.shop.svc.cluster.local:80")
    assert {
        "payments",
        "payments:80",
        "payments.shop",
        "payments.shop.svc.cluster.local:80",
    } <= shop
    assert {"10.96.0.10", "10.96.0.10:80"} <= shop  # the ClusterIP, from anywhere
    bank_from_shop = vhost_domains(by_namespace["shop"], "payments.bank.svc.cluster.local:8443")
    assert "payments" not in bank_from_shop and "payments:8443" not in bank_from_shop
    assert {"payments.bank", "payments.bank:8443"} <= bank_from_shop
    # A one-port service answers without a port too (a qualified name; not its address).
    assert "payments.bank.svc" in bank_from_shop
    bank = vhost_domains(by_namespace["bank"], "payments.bank.svc.cluster.local:8443")
    assert {"payments", "payments:8443"} <= bank
    elsewhere = vhost_domains(others, "payments.shop.svc.cluster.local:80")
    assert "payments" not in elsewhere and "payments.shop" in elsewhere
    assert translate(two_namespaces(), "shop") is not translate(two_namespaces(), "bank")


def test_clusters_and_endpoints_are_the_same_in_every_namespace() -> None:
    others, by_namespace = translate_namespaces(two_namespaces())
    versions = {
        resources_version({t: r[t] for t in (CLUSTER_TYPE, ENDPOINT_TYPE)})
        for r in [others, *by_namespace.values()]
    }
    assert len(versions) == 1
    routes = {resources_version({ROUTE_TYPE: r[ROUTE_TYPE]}) for r in by_namespace.values()}
    assert len(routes) == 2
    assert all(
        "outbound" in r[LISTENER_TYPE] and "outbound" in r[ROUTE_TYPE]
        for r in [others, *by_namespace.values()]
    )


def test_a_multi_port_service_answers_without_a_port_only_on_port_80() -> None:
    mesh = Mesh(
        services=(
            MeshService("web", "shop", 80, sole_port=False, addresses=("fd00::1",)),
            MeshService("web", "shop", 8080, sole_port=False, addresses=("fd00::1",)),
        )
    )
    resources = translate(mesh, "shop")
    web80 = vhost_domains(resources, "web.shop.svc.cluster.local:80")
    web8080 = vhost_domains(resources, "web.shop.svc.cluster.local:8080")
    assert {"web", "web.shop", "[fd00::1]", "[fd00::1]:80"} <= web80
    assert web8080 & {"web", "web.shop", "[fd00::1]"} == set()
    assert {"web:8080", "web.shop:8080", "[fd00::1]:8080"} <= web8080


def test_a_headless_service_keeps_the_original_destination_with_its_policy() -> None:
    service = MeshService(
        "db",
        "shop",
        5432,
        endpoints=(MeshEndpoint("10.1.0.7", 5432, hostname="db-0"), MeshEndpoint("10.1.0.8", 5432)),
        policy=Policy(timeout=2.0),
        headless=True,
    )
    resources = translate(Mesh(services=(service,)), "shop")
    name = "outbound|5432||db.shop.svc.cluster.local"
    cluster = resources[CLUSTER_TYPE][name]
    assert cluster.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST
    assert name not in resources[ENDPOINT_TYPE]
    domains = vhost_domains(resources, "db.shop.svc.cluster.local:5432")
    assert {
        "db-0.db:5432",
        "db-0.db.shop.svc.cluster.local",
        "10.1.0.7:5432",
        "10.1.0.8:5432",
    } <= domains
    route = payments_like(resources, "db.shop.svc.cluster.local:5432")
    assert route.route.cluster == name and route.route.timeout.ToSeconds() == 2


def payments_like(resources: dict[str, dict[str, Any]], vhost_name: str) -> Any:
    for vhost in resources[ROUTE_TYPE]["outbound"].virtual_hosts:
        if vhost.name == vhost_name:
            return vhost.routes[0]
    raise AssertionError(vhost_name)


def test_a_domain_two_services_claim_goes_to_the_first() -> None:
    mesh = Mesh(
        services=(
            MeshService("a", "shop", endpoints=(MeshEndpoint("10.1.0.7", 80),), headless=True),
            MeshService("b", "shop", endpoints=(MeshEndpoint("10.1.0.7", 80),), headless=True),
        )
    )
    resources = translate(mesh, "shop")
    assert "10.1.0.7" in vhost_domains(resources, "a.shop.svc.cluster.local:80")
    assert "10.1.0.7" not in vhost_domains(resources, "b.shop.svc.cluster.local:80")


def test_each_cluster_carries_its_policy_and_where_each_value_came_from() -> None:
    service = {"name": "payments", "endpoints": [], "policy": {"retries": {"attempts": 2}}}
    mesh = parse_mesh({"defaults": {"timeout": "3s"}, "services": [service]}, "mesh.yaml")
    cluster = translate(mesh)[CLUSTER_TYPE][PAYMENTS]
    metadata = MessageToDict(cluster.metadata.filter_metadata[POLICY_METADATA])
    assert metadata["service"] == "payments.default"
    assert metadata["policy"]["timeout"] == {"value": "3s", "origin": "mesh"}
    assert metadata["policy"]["retry-attempts"] == {"value": "2", "origin": "service"}
    assert metadata["policy"]["load-balancer"] == {"value": "round_robin", "origin": "built-in"}


# -- translate_update: an endpoint change reuses the previous translation ---------------------


def shop(payments: list[str], *, timeout: str = "2s", headless: bool = False) -> Any:
    orders: dict[str, Any] = {"name": "orders", "namespace": "shop", "endpoints": ["10.0.1.1:80"]}
    payments_service: dict[str, Any] = {
        "name": "payments",
        "namespace": "bank",
        "endpoints": payments,
        "policy": {"timeout": timeout},
    }
    if not headless:
        payments_service["addresses"] = ["10.96.0.10"]
    mesh = parse_mesh({"services": [orders, payments_service]}, "mesh.yaml")
    if headless:  # the mesh file has no headless services; the cluster source makes them
        services = tuple(
            dataclasses.replace(s, headless=True) if s.name == "payments" else s
            for s in mesh.services
        )
        mesh = dataclasses.replace(mesh, services=services)
    return mesh


def serialized(resources: dict[str, dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return {
        t: {n: m.SerializeToString(deterministic=True) for n, m in r.items()}
        for t, r in resources.items()
    }


def assert_same_as_full(update: Translation, mesh: Mesh) -> None:
    others, by_namespace = translate_namespaces(mesh)
    assert serialized(update.default) == serialized(others)
    assert update.by_namespace.keys() == by_namespace.keys()
    for ns, resources in by_namespace.items():
        assert serialized(update.by_namespace[ns]) == serialized(resources)


def test_an_endpoint_change_rebuilds_only_that_assignment() -> None:
    before = translate_update(shop(["10.0.2.1:8080", "10.0.2.2:8080"]))
    mesh = shop(["10.0.2.1:8080", "10.0.2.3:8080"])
    after = translate_update(mesh, before)
    assert after.endpoints_only
    assert_same_as_full(after, mesh)
    payments = "outbound|80||payments.bank.svc.cluster.local"
    for old, new in [(before.default, after.default), *(
        (before.by_namespace[ns], after.by_namespace[ns]) for ns in before.by_namespace
    )]:  # fmt: skip
        for type_url in (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE):
            assert new[type_url] is old[type_url]  # the very messages: nothing re-encoded
        assert new[ENDPOINT_TYPE][payments] is not old[ENDPOINT_TYPE][payments]
        orders = "outbound|80||orders.shop.svc.cluster.local"
        assert new[ENDPOINT_TYPE][orders] is old[ENDPOINT_TYPE][orders]
    # One dict of assignments, shared by every namespace's set (encoded once).
    assert len({id(r[ENDPOINT_TYPE]) for r in after.by_namespace.values()}) == 1
    assert after.by_namespace["shop"][ENDPOINT_TYPE] is after.default[ENDPOINT_TYPE]


def test_any_other_change_is_translated_in_full() -> None:
    before = translate_update(shop(["10.0.2.1:8080"]))
    for mesh in (
        shop(["10.0.2.1:8080"], timeout="3s"),  # policy
        dataclasses.replace(shop(["10.0.2.1:8080"]), outbound_policy="registry_only"),
        dataclasses.replace(shop(["10.0.2.1:8080"]), services=shop([]).services[:1]),  # removed
    ):
        after = translate_update(mesh, before)
        assert not after.endpoints_only
        assert_same_as_full(after, mesh)


def test_a_headless_service_s_endpoints_are_route_domains_so_they_translate_in_full() -> None:
    before = translate_update(shop(["10.0.2.1:8080"], headless=True))
    mesh = shop(["10.0.2.9:8080"], headless=True)
    after = translate_update(mesh, before)
    assert not after.endpoints_only
    assert_same_as_full(after, mesh)
    pods = vhost_domains(after.default, "payments.bank.svc.cluster.local:80")
    assert "10.0.2.9:8080" in pods and "10.0.2.1:8080" not in pods


def chains_by_name(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {chain.name: chain for chain in resources[LISTENER_TYPE]["outbound"].filter_chains}


def test_the_outbound_listener_matches_connections_as_envoy_does() -> None:
    web = MeshService("web", "shop", addresses=("10.96.0.10",))
    api = MeshService("api", "shop", addresses=("10.96.0.11",))
    db = MeshService("db", "shop", 5432, addresses=("fd00::12",), protocol=Protocol.TCP)
    resources = translate(Mesh(services=(web, api, db)), "shop")
    listener = resources[LISTENER_TYPE]["outbound"]
    assert [f.name for f in listener.listener_filters] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
        "envoy.filters.listener.http_inspector",
    ]
    chains = chains_by_name(resources)
    assert list(chains) == [
        "api.shop.svc.cluster.local:80|tcp",
        "db.shop.svc.cluster.local:5432|tcp",
        "web.shop.svc.cluster.local:80|tcp",
        "http1|80",
        "http",
    ]
    # undeclared: HTTP/1.x to the HTTP connection manager (one chain for the port's
    # addresses), the rest to each service's cluster as TCP
    http = chains["http1|80"]
    assert MessageToDict(http.filter_chain_match) == {
        "destinationPort": 80,
        "prefixRanges": [
            {"addressPrefix": "10.96.0.11", "prefixLen": 32},
            {"addressPrefix": "10.96.0.10", "prefixLen": 32},
        ],
        "applicationProtocols": ["http/1.0", "http/1.1"],
    }
    assert http.filters[0].name == "envoy.filters.network.http_connection_manager"
    tcp = chains["web.shop.svc.cluster.local:80|tcp"]
    proxy = tcp_proxy_pb2.TcpProxy()
    tcp.filters[0].typed_config.Unpack(proxy)
    assert (tcp.filters[0].name, proxy.cluster) == (
        "envoy.filters.network.tcp_proxy",
        "outbound|80||web.shop.svc.cluster.local",
    )
    assert MessageToDict(chains["db.shop.svc.cluster.local:5432|tcp"].filter_chain_match) == {
        "destinationPort": 5432,
        "prefixRanges": [{"addressPrefix": "fd00::12", "prefixLen": 128}],
    }
    assert MessageToDict(chains["http"].filter_chain_match) == {
        "applicationProtocols": ["http/1.0", "http/1.1"]
    }
    listener.default_filter_chain.filters[0].typed_config.Unpack(proxy)
    assert proxy.cluster == PASSTHROUGH_CLUSTER


def test_a_declared_http_service_is_always_http() -> None:
    api = MeshService("api", "shop", 8080, addresses=("10.96.0.11",), protocol=Protocol.HTTP)
    chains = chains_by_name(translate(Mesh(services=(api,)), "shop"))
    assert list(chains) == ["http|8080", "http"]
    assert MessageToDict(chains["http|8080"].filter_chain_match) == {
        "destinationPort": 8080,
        "prefixRanges": [{"addressPrefix": "10.96.0.11", "prefixLen": 32}],
    }


def test_a_tls_service_is_matched_by_address_and_by_its_names_as_server_names() -> None:
    secure = MeshService("secure", "shop", 443, addresses=("10.96.0.13",), protocol=Protocol.TLS)
    chains = chains_by_name(translate(Mesh(services=(secure,)), "shop"))
    assert MessageToDict(chains["secure.shop.svc.cluster.local:443|tls"].filter_chain_match) == {
        "destinationPort": 443,
        "prefixRanges": [{"addressPrefix": "10.96.0.13", "prefixLen": 32}],
        "transportProtocol": "tls",
    }
    assert MessageToDict(chains["secure.shop.svc.cluster.local:443|sni"].filter_chain_match) == {
        "destinationPort": 443,
        "serverNames": ["secure.shop", "secure.shop.svc", "secure.shop.svc.cluster.local"],
        "transportProtocol": "tls",
    }


def test_registry_only_sends_other_tcp_to_a_cluster_without_endpoints() -> None:
    resources = translate(parse_mesh({"outbound_policy": "registry_only"}, "m.yaml"))
    proxy = tcp_proxy_pb2.TcpProxy()
    resources[LISTENER_TYPE]["outbound"].default_filter_chain.filters[0].typed_config.Unpack(proxy)
    blackhole = resources[CLUSTER_TYPE][proxy.cluster]
    assert (proxy.cluster, blackhole.type) == ("BlackHoleCluster", cluster_pb2.Cluster.STATIC)
    assert len(blackhole.load_assignment.endpoints) == 0
    assert PASSTHROUGH_CLUSTER not in resources[CLUSTER_TYPE]


def test_an_address_and_port_two_services_claim_is_matched_for_the_first_only() -> None:
    pods = (MeshEndpoint("10.1.0.7", 80),)
    mesh = Mesh(
        services=(
            MeshService("a", "shop", endpoints=pods, headless=True, protocol=Protocol.TCP),
            MeshService("b", "shop", endpoints=pods, headless=True, protocol=Protocol.TCP),
        )
    )
    assert list(chains_by_name(translate(mesh, "shop"))) == [
        "a.shop.svc.cluster.local:80|tcp",
        "http",
    ]
