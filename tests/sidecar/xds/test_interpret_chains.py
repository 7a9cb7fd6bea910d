"""The outbound listener's filter chains -> what the sidecar does with each intercepted
connection: by original destination, by TLS server name, and by default."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from mesh.model import Mesh, MeshEndpoint, MeshService, Protocol, parse_mesh
from mesh.translate import LISTENER_TYPE, Resources, translate
from mesh.xds import TCP_PROXY_TYPE
from sidecar.config import ChainProtocol, ConfigError, Endpoint
from sidecar.xds.interpret import build_snapshot

SHOP = "outbound|{port}||{name}.shop.svc.cluster.local"


def mesh_resources(outbound_policy: str = "allow_any") -> Resources:
    def service(name: str, port: int, address: str, protocol: str | None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": name,
            "namespace": "shop",
            "port": port,
            "addresses": [address],
            "endpoints": [f"10.1.0.{port % 250}:{port + 1000}"],
        }
        if protocol is not None:
            doc["protocol"] = protocol
        return doc

    return translate(
        parse_mesh(
            {
                "outbound_policy": outbound_policy,
                "services": [
                    service("web", 80, "10.96.0.10", None),
                    service("api", 8080, "10.96.0.11", "http"),
                    service("db", 5432, "10.96.0.12", "tcp"),
                    service("secure", 443, "fd00::13", "tls"),
                    {
                        "name": "pods",
                        "namespace": "shop",
                        "port": 9000,
                        "protocol": "tcp",
                        "endpoints": ["10.1.0.7:9000", "10.1.0.8:9000"],
                    },
                ],
            },
            "m.yaml",
        ),
        "shop",
    )


def test_each_destination_gets_its_declared_protocol_and_its_cluster() -> None:
    snapshot = build_snapshot(mesh_resources(), "v1")
    web = snapshot.destinations[Endpoint("10.96.0.10", 80)]
    assert web.protocol is ChainProtocol.DETECT
    assert web.tcp is not None and web.tcp.name == "web"
    assert web.tcp.cluster == SHOP.format(port=80, name="web")
    assert web.tcp.endpoints == (Endpoint("10.1.0.80", 1080),)
    api = snapshot.destinations[Endpoint("10.96.0.11", 8080)]
    assert (api.protocol, api.tcp) == (ChainProtocol.HTTP, None)
    db = snapshot.destinations[Endpoint("10.96.0.12", 5432)]
    assert db.protocol is ChainProtocol.TCP and db.tcp is not None
    assert db.tcp.connect_timeout == 1.0  # the service's policy, from its Cluster
    secure = snapshot.destinations[Endpoint("fd00::13", 443)]
    assert secure.protocol is ChainProtocol.TLS


def test_a_services_names_are_tls_server_names_on_its_port() -> None:
    snapshot = build_snapshot(mesh_resources(), "v1")
    for name in ("secure.shop", "secure.shop.svc", "secure.shop.svc.cluster.local"):
        assert snapshot.server_names[(name, 443)].name == "secure"
    assert ("db.shop", 5432) not in snapshot.server_names  # only for tls ports


def test_a_headless_services_pods_are_destinations_kept_as_they_are() -> None:
    db = MeshService(
        "db", port=5432, protocol=Protocol.TCP, headless=True,
        endpoints=(MeshEndpoint("10.1.0.7", 5432), MeshEndpoint("10.1.0.8", 5432)),
    )  # fmt: skip
    snapshot = build_snapshot(translate(Mesh(services=(db,))), "v1")
    for pod in ("10.1.0.7", "10.1.0.8"):
        chain = snapshot.destinations[Endpoint(pod, 5432)]
        assert chain.protocol is ChainProtocol.TCP
        assert chain.tcp is not None and chain.tcp.original_destination


def test_unknown_destinations_pass_through_under_allow_any_and_close_under_registry_only() -> None:
    allow = build_snapshot(mesh_resources("allow_any"), "v1").tcp_default
    assert allow is not None and allow.original_destination and allow.name == "passthrough"
    assert build_snapshot(mesh_resources("registry_only"), "v1").tcp_default is None


def test_declared_protocols_reach_the_inbound_side_by_endpoint() -> None:
    inbound = build_snapshot(mesh_resources(), "v1").inbound_protocols
    assert inbound[Endpoint("10.1.0.182", 6432)] is ChainProtocol.TCP  # db's pod
    assert inbound[Endpoint("10.1.0.80", 9080)] is ChainProtocol.HTTP  # api's pod
    assert inbound[Endpoint("10.1.0.193", 1443)] is ChainProtocol.TLS  # secure's pod
    assert Endpoint("10.1.0.80", 1080) not in inbound  # web: detected


def test_tcp_proxy_idle_timeout_is_read_and_absent_means_the_sidecars_setting() -> None:
    resources = mesh_resources()
    chain = _chain_named(resources, "|tcp", "db")
    proxy = _tcp_proxy(chain)
    proxy.idle_timeout.seconds = 30
    chain.filters[0].typed_config.Pack(proxy)
    target = build_snapshot(resources, "v1").destinations[Endpoint("10.96.0.12", 5432)].tcp
    assert target is not None and target.idle_timeout == 30.0
    web = build_snapshot(resources, "v1").destinations[Endpoint("10.96.0.10", 80)].tcp
    assert web is not None and web.idle_timeout is None


def _listener(resources: Resources) -> Any:
    return resources[LISTENER_TYPE]["outbound"]


def _chain_named(resources: Resources, suffix: str, service: str = "db") -> Any:
    """A service's tcp_proxy chain, or (suffix "|http") the HTTP chain of its port."""
    for chain in _listener(resources).filter_chains:
        if chain.name.startswith(f"{service}.") and chain.name.endswith(suffix):
            return chain
    ports = {"web": 80, "api": 8080}
    for chain in _listener(resources).filter_chains:
        if suffix == "|http" and chain.name.endswith(f"|{ports.get(service)}"):
            return chain
    raise AssertionError(f"no chain {service}...{suffix}")


def _tcp_proxy(chain: Any) -> Any:
    proxy = tcp_proxy_pb2.TcpProxy()
    assert chain.filters[0].typed_config.type_url == TCP_PROXY_TYPE
    chain.filters[0].typed_config.Unpack(proxy)
    return proxy


def _wide_prefix(resources: Resources) -> None:
    _chain_named(resources, "|tcp").filter_chain_match.prefix_ranges[0].prefix_len.value = 16


def _source_ports(resources: Resources) -> None:
    _chain_named(resources, "|tcp").filter_chain_match.source_ports.append(5000)


def _h2c(resources: Resources) -> None:
    _chain_named(resources, "|http", "web").filter_chain_match.application_protocols.append("h2c")


def _two_http_configs(resources: Resources) -> None:
    chain = _chain_named(resources, "|http", "web")
    hcm = hcm_pb2.HttpConnectionManager()
    chain.filters[0].typed_config.Unpack(hcm)
    hcm.stat_prefix = "other"
    chain.filters[0].typed_config.Pack(hcm)


def _no_http_chain(resources: Resources) -> None:
    chains = _listener(resources).filter_chains
    http = [i for i, chain in enumerate(chains) if chain.name == "http"]
    del chains[http[0]]


def _default_to_a_service(resources: Resources) -> None:
    default = _listener(resources).default_filter_chain
    proxy = _tcp_proxy(default)
    proxy.cluster = SHOP.format(port=5432, name="db")
    default.filters[0].typed_config.Pack(proxy)


def _missing_tcp_cluster(resources: Resources) -> None:
    chain = _chain_named(resources, "|tcp")
    proxy = _tcp_proxy(chain)
    proxy.cluster = "outbound|1||gone.shop.svc.cluster.local"
    chain.filters[0].typed_config.Pack(proxy)


def _http_and_tcp_declared(resources: Resources) -> None:
    # db's address also gets an HTTP-without-detection chain: which one would apply?
    listener = _listener(resources)
    http = _chain_named(resources, "|http", "api")
    extra = listener.filter_chains.add()
    extra.CopyFrom(http)
    extra.filter_chain_match.CopyFrom(_chain_named(resources, "|tcp").filter_chain_match)


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (_wide_prefix, r"prefix_ranges\[0\]\.prefix_len: only single addresses \(/32\)"),
        (_source_ports, r"filter_chain_match\.source_ports: is not supported"),
        (_h2c, r"application_protocols: only http/1\.0, http/1\.1 are supported"),
        (_two_http_configs, r"every chain's HttpConnectionManager must be the same config"),
        (_no_http_chain, r"exactly one HttpConnectionManager chain without a destination"),
        (_default_to_a_service, r"default_filter_chain: must pass TCP to an ORIGINAL_DST"),
        (_missing_tcp_cluster, r'Cluster "outbound\|1\|\|gone.shop.svc.cluster.local": missing'),
        (_http_and_tcp_declared, r"10\.96\.0\.12:5432 is matched by http and tcp chains"),
    ],
)
def test_chains_the_sidecar_cannot_apply_are_refused_naming_the_field(
    breaker: Callable[[Resources], None], expected: str
) -> None:
    resources = mesh_resources()
    breaker(resources)
    with pytest.raises(ConfigError, match=expected):
        build_snapshot(resources, "v1")


@pytest.mark.parametrize(("protocol", "http2"), [("grpc", True), ("http2", True), ("http", False)])
def test_grpc_and_http2_services_reach_their_endpoints_over_http2(
    protocol: str, http2: bool
) -> None:
    """`protocol: grpc|http2` travels as the Cluster's http2_protocol_options and comes back as
    ServiceConfig.http2; its addresses are HTTP chains (the first bytes pick HTTP/1.1 or 2)."""
    doc = {
        "services": [
            {
                "name": "echo",
                "port": 50051,
                "protocol": protocol,
                "addresses": ["10.96.0.20"],
                "endpoints": ["10.1.0.20:50051"],
            }
        ]
    }
    snapshot = build_snapshot(translate(parse_mesh(doc, "t")), "v1")
    (service,) = snapshot.services.values()
    assert service.http2 is http2
    chain = snapshot.destinations[Endpoint("10.96.0.20", 50051)]
    assert chain.protocol is ChainProtocol.HTTP
