"""Mesh model -> xDS v3 resources: the one translation (docs/architecture.md, "How policy travels").

Policy is written in the standard xDS fields so that our sidecars, Envoy and gRPC's proxyless
clients read the same resources. Naming scheme (Istio-like):

- Cluster and ClusterLoadAssignment per service and port:
  ``outbound|{port}||{name}.{namespace}.svc.cluster.local`` (type EDS over ADS; the EDS
  service_name is the cluster name). A headless service's cluster is ORIGINAL_DST (requests keep
  the destination the caller chose, with the service's policy; no ClusterLoadAssignment). An
  ExternalName service is an EDS cluster whose one endpoint is the external host name.
- Listener ``outbound`` (0.0.0.0:15001; listener filters original_dst, tls_inspector and
  http_inspector), whose filter chains say what an intercepted connection is, by its original
  destination (see "Filter chains" below), and RouteConfiguration ``outbound``: one virtual
  host per service and port, named
  ``{name}.{namespace}.svc.cluster.local:{port}``, whose domains are the names that reach it (see
  `service_domains`), then a catch-all virtual host ``*``:
  - allow_any: virtual host ``allow_any`` routes to cluster ``PassthroughCluster`` (ORIGINAL_DST);
  - registry_only: virtual host ``block_all`` answers with a direct_response 502, body "NR"
    (Istio's block_all).
- For gRPC proxyless clients dialing ``xds:///{target}``: Listeners named
  ``{name}.{namespace}.svc.cluster.local:{port}`` (and without the port where a port-less name
  reaches the service), plus ``{name}`` and ``{name}:{port}`` for clients in the service's own
  namespace; each is an api_listener HTTP connection manager whose RDS names the service's own
  RouteConfiguration ``{name}.{namespace}.svc.cluster.local:{port}`` (its one virtual host).

Names resolve as Kubernetes DNS does (docs/architecture.md, "Names"):
``name.ns``, ``name.ns.svc``, ``name.ns.svc.cluster.local`` and the service's virtual addresses
(a ClusterIP) reach it from any namespace; the bare ``name`` only from its own namespace. Each
spelling is listed with ``:port``; without a port it means port 80, except that a name (not an
address) of a service with a single port answers without one too. A headless service adds the
per-pod names (``{hostname}.{name}.{namespace}...``) and pod IPs of its endpoints.

Where the bare name matters, the RouteConfiguration differs by the caller's namespace, so
`translate_namespaces` gives one set of resources per namespace that has services (and one for
every other namespace); their Clusters and ClusterLoadAssignments are the very same messages,
so their versions are equal in every set, and the names (``outbound``) are the same everywhere,
as Envoy and gRPC expect. A domain two services would both claim (a pod behind two headless
services, a virtual address listed twice) goes to the first in (namespace, name, port) order.

Filter chains of the ``outbound`` listener (Envoy's matching: destination port, then address,
then server name and transport protocol, then application protocol), per service and port with
virtual addresses (a headless service: its pods' IPs and ports), each address and port claimed
by the first service in (namespace, name, port) order:

- ``protocol`` absent: HTTP/1.x to the addresses and port (application_protocols http/1.0,
  http/1.1) takes the HTTP connection manager (RDS ``outbound``), and a chain matching them
  without application_protocols passes anything else to the service's cluster (``tcp_proxy``);
- ``http``: the HTTP connection manager for every connection to them; ``tcp``: ``tcp_proxy``
  for every connection; ``tls``: ``tcp_proxy`` for TLS connections (transport_protocol tls), and
  a chain matching the port and the service's names as TLS server names (SNI), for clients that
  reach it through an address the mesh does not know.

The HTTP connection manager chains are one per port and kind (``http1|80``: HTTP/1.x to any of
the addresses on port 80 of the undeclared services; ``http|8080``: declared http), since they
all route alike; the ``tcp_proxy`` chains are one per service (each names its cluster).

Then one chain for HTTP/1.x to any other destination (the HTTP connection manager: routes by
Host, the catch-all virtual host decides the rest), and the ``default_filter_chain`` for
anything else: ``tcp_proxy`` to ``PassthroughCluster`` (allow_any) or to ``BlackHoleCluster``
(registry_only: a STATIC cluster without endpoints, so the connection is closed).

Each Cluster carries the service's effective policy and where each value came from (service,
namespace, mesh, built-in) in ``metadata.filter_metadata["outrigger.dev"]``:
``{"service": "payments.shop", "policy": {"timeout": {"value": "2s", "origin": "service"}, ...}}``.

Encodings:

- Timeouts: route ``timeout`` is always set (0s = disabled, since Envoy's default is 15s); with a
  timeout, ``max_stream_duration.max_stream_duration`` and ``grpc_timeout_header_max`` carry it too
  (gRPC ignores route ``timeout``).
- Retries: ``retry_policy`` with ``retry_on`` (our conditions, ``retriable-status-codes`` when
  codes are given, plus the gRPC condition ``unavailable`` when a condition maps to it, because gRPC
  retries only on gRPC status codes), ``num_retries``, ``per_try_timeout``, ``retry_back_off``,
  ``retriable_status_codes``. The idempotency rule (non_idempotent false) is
  ``retriable_request_headers`` = one exact ``:method`` matcher per IDEMPOTENT_METHODS plus a
  ``present_match`` on ``idempotency-key`` (Envoy retries when any matcher matches). With
  non_idempotent true the list is empty (every method retries). The budget is the cluster's
  ``circuit_breakers.thresholds[0].retry_budget``; without one, ``max_retries`` is 2^32-1 (as
  Istio does) so Envoy's default of 3 concurrent retries does not apply.
- Load balancing: round_robin is ``lb_policy`` ROUND_ROBIN (the default). least_request and
  random are the ``load_balancing_policy`` list [LeastRequest | Random, RoundRobin]: a client
  takes the first policy it supports (gRFC A52), so gRPC (which rejects the LEAST_REQUEST and
  RANDOM ``lb_policy`` enums and has no random policy) falls back to round_robin.
- Circuit breaker: ``circuit_breakers`` (max_requests, max_pending_requests) always;
  ``outlier_detection`` only with consecutive_failures: consecutive_5xx and
  consecutive_gateway_failure = consecutive_failures, enforcing both at 100, base_ejection_time =
  open_for, max_ejection_percent, interval 10s, and enforcing_success_rate 0 (Envoy would
  otherwise also eject on success rate).
- Idle timeout of pooled upstream connections: ``typed_extension_protocol_options``
  HttpProtocolOptions ``common_http_protocol_options.idle_timeout`` = 60s.
- Upstream protocol: the same HttpProtocolOptions' ``explicit_http_config``:
  ``http2_protocol_options`` for a service declared ``http2`` or ``grpc`` (h2c), else
  ``http_protocol_options`` (HTTP/1.1).
- Tracing: the outbound HCM's ``tracing.random_sampling`` = sampling x 100 (a percentage).

Output is deterministic: the same mesh gives byte-identical resources and the same version.

`translate_update` is the same translation given the previous one: when only the endpoints of
services changed (pods started, stopped, became ready: most changes in a cluster), it reuses
every Listener, RouteConfiguration and Cluster message and builds only the changed
ClusterLoadAssignments. Its output equals `translate_namespaces`' message for message, so the
versions do not depend on which path built them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    protocol_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.http_inspector.v3 import http_inspector_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from mesh.http import IDEMPOTENT_METHODS
from mesh.model import Mesh, MeshService, Protocol, Retries
from mesh.policy import effective_values
from mesh.xds import (
    ALLOW_ANY_VHOST,
    BLACKHOLE_CLUSTER,
    BLOCK_ALL_VHOST,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HCM_FILTER,
    HTTP1_PROTOCOLS,
    HTTP_INSPECTOR_FILTER,
    HTTP_PROTOCOL_OPTIONS,
    LISTENER_TYPE,
    NO_ROUTE_BODY,
    NO_ROUTE_STATUS,
    ORIGINAL_DST_FILTER,
    OUTBOUND,
    OUTBOUND_PORT,
    PASSTHROUGH_CLUSTER,
    POLICY_METADATA,
    ROUTE_TYPE,
    ROUTER_FILTER,
    TCP_PROXY_FILTER,
    TLS_INSPECTOR_FILTER,
    TLS_TRANSPORT,
    UPSTREAM_IDLE_TIMEOUT,
    Message,
    Resources,
)

OUTLIER_INTERVAL: Final = 10.0  # Envoy's default sweep interval

# The idempotency rule as retriable_request_headers: a request whose method is one of
# IDEMPOTENT_METHODS, or that carries an Idempotency-Key header, may be retried.
IDEMPOTENCY_KEY_HEADER: Final = "idempotency-key"

# gRPC clients retry only on gRPC status names; these of our conditions map to UNAVAILABLE.
_GRPC_UNAVAILABLE_CONDITIONS: Final = frozenset(
    {"connect-failure", "reset", "gateway-error", "5xx"}
)
_GRPC_UNAVAILABLE_CODES: Final = frozenset({502, 503, 504})
_MAX_UINT32: Final = 2**32 - 1


def cluster_name(service: MeshService) -> str:
    return f"outbound|{service.port}||{service.fqdn}"


def virtual_host_name(service: MeshService) -> str:
    return f"{service.fqdn}:{service.port}"


def _portless(service: MeshService) -> bool:
    """Whether a name without ":port" reaches this service: port 80, or its only port."""
    return service.port == 80 or service.sole_port


def _with_ports(names: Iterable[str], ports: Iterable[int], portless: bool) -> list[str]:
    out: list[str] = []
    for name in names:
        if portless:
            out.append(name)
        out.extend(f"{name}:{port}" for port in ports)
    return out


def _address_domains(addresses: Iterable[str], ports: Iterable[int]) -> list[str]:
    """IP authorities: "10.0.0.1" (port 80 only) and "10.0.0.1:8080"; IPv6 in brackets."""
    out: list[str] = []
    for address in addresses:
        host = f"[{address}]" if ipaddress.ip_address(address).version == 6 else address
        for port in ports:
            if port == 80:
                out.append(host)
            out.append(f"{host}:{port}")
    return out


def service_domains(service: MeshService, caller_namespace: str | None) -> list[str]:
    """Every authority that reaches `service` from a caller in `caller_namespace` (None: from
    a namespace other than the service's), per the module docstring's DNS rules."""
    name, ns = service.name, service.namespace
    names = [f"{name}.{ns}", f"{name}.{ns}.svc", service.fqdn]
    own = caller_namespace == ns
    if own:
        names.insert(0, name)
    ports = [service.port]
    domains = _with_ports(names, ports, _portless(service))
    domains += _address_domains(service.addresses, ports)
    if service.headless:
        for endpoint in service.endpoints:
            pod_ports = sorted({service.port, endpoint.port})
            if endpoint.hostname:
                pod = f"{endpoint.hostname}.{name}"
                pod_names = [f"{pod}.{ns}", f"{pod}.{ns}.svc", f"{pod}.{ns}.svc.cluster.local"]
                if own:
                    pod_names.insert(0, pod)
                domains += _with_ports(pod_names, pod_ports, _portless(service))
            try:
                domains += _address_domains([endpoint.host], pod_ports)
            except ValueError:  # a host name, not a pod IP
                continue
    return list(dict.fromkeys(domains))


def grpc_listener_names(service: MeshService, caller_namespace: str | None) -> list[str]:
    """LDS names gRPC clients in `caller_namespace` ask for when dialing xds:///target."""
    names = [service.fqdn]
    if caller_namespace == service.namespace:
        names.insert(0, service.name)
    return _with_ports(names, [service.port], _portless(service))


# -- small builders ----------------------------------------------------------------------------


def _duration(seconds: float) -> Any:
    value = duration_pb2.Duration()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


def _pack(message: Message) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def _ads() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.ApiVersion.V3,
    )


def _hcm(stat_prefix: str, route_config_name: str, sampling: float | None) -> Any:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_config_name),
        http_filters=[
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_pack(router_pb2.Router()))
        ],
    )
    if sampling is not None:
        hcm.tracing.random_sampling.value = round(sampling * 100.0, 9)
    return hcm


# -- routes ------------------------------------------------------------------------------------


def retry_on_tokens(retries: Retries) -> list[str]:
    """The retry_on tokens for a policy: ours, retriable-status-codes, then gRPC's."""
    tokens = list(retries.retry_on)
    if retries.status_codes:
        tokens.append("retriable-status-codes")
    if "unavailable" not in tokens and (
        _GRPC_UNAVAILABLE_CONDITIONS.intersection(retries.retry_on)
        or _GRPC_UNAVAILABLE_CODES.intersection(retries.status_codes)
    ):
        tokens.append("unavailable")
    return tokens


def idempotent_request_headers() -> list[Any]:
    """retriable_request_headers for non_idempotent false (see the module docstring)."""
    matchers = [
        route_components_pb2.HeaderMatcher(
            name=":method", string_match=string_pb2.StringMatcher(exact=method)
        )
        for method in IDEMPOTENT_METHODS
    ]
    matchers.append(
        route_components_pb2.HeaderMatcher(name=IDEMPOTENCY_KEY_HEADER, present_match=True)
    )
    return matchers


def _retry_policy(retries: Retries) -> Any:
    policy = route_components_pb2.RetryPolicy(
        retry_on=",".join(retry_on_tokens(retries)),
        num_retries=wrappers_pb2.UInt32Value(value=retries.attempts),
        retriable_status_codes=list(retries.status_codes),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_duration(retries.backoff.base),
            max_interval=_duration(retries.backoff.max),
        ),
    )
    if retries.per_try_timeout is not None:
        policy.per_try_timeout.CopyFrom(_duration(retries.per_try_timeout))
    if not retries.non_idempotent:
        policy.retriable_request_headers.extend(idempotent_request_headers())
    return policy


def _route(service: MeshService) -> Any:
    policy = service.policy
    action = route_components_pb2.RouteAction(
        cluster=cluster_name(service),
        timeout=_duration(policy.timeout or 0.0),  # 0s disables Envoy's 15s default
    )
    if policy.timeout is not None:
        action.max_stream_duration.max_stream_duration.CopyFrom(_duration(policy.timeout))
        action.max_stream_duration.grpc_timeout_header_max.CopyFrom(_duration(policy.timeout))
    if policy.retries is not None and policy.retries.attempts > 0:
        action.retry_policy.CopyFrom(_retry_policy(policy.retries))
    return route_components_pb2.Route(
        name="default", match=route_components_pb2.RouteMatch(prefix="/"), route=action
    )


def _virtual_host(service: MeshService, domains: list[str], route: Any) -> Any:
    return route_components_pb2.VirtualHost(
        name=virtual_host_name(service), domains=domains, routes=[route]
    )


def _catch_all(mesh: Mesh) -> Any:
    match = route_components_pb2.RouteMatch(prefix="/")
    if mesh.outbound_policy == "allow_any":
        route = route_components_pb2.Route(
            name=ALLOW_ANY_VHOST,
            match=match,
            route=route_components_pb2.RouteAction(
                cluster=PASSTHROUGH_CLUSTER, timeout=_duration(0.0)
            ),
        )
        return route_components_pb2.VirtualHost(name=ALLOW_ANY_VHOST, domains=["*"], routes=[route])
    route = route_components_pb2.Route(
        name=BLOCK_ALL_VHOST,
        match=match,
        direct_response=route_components_pb2.DirectResponseAction(
            status=NO_ROUTE_STATUS, body=base_pb2.DataSource(inline_string=NO_ROUTE_BODY)
        ),
    )
    return route_components_pb2.VirtualHost(name=BLOCK_ALL_VHOST, domains=["*"], routes=[route])


# -- clusters and endpoints --------------------------------------------------------------------


def _load_balancing_policy(name: str) -> Any:
    first: Message = (
        least_request_pb2.LeastRequest() if name == "least_request" else random_pb2.Random()
    )
    policies = [
        (f"envoy.load_balancing_policies.{name}", first),
        ("envoy.load_balancing_policies.round_robin", round_robin_pb2.RoundRobin()),
    ]
    return cluster_pb2.LoadBalancingPolicy(
        policies=[
            cluster_pb2.LoadBalancingPolicy.Policy(
                typed_extension_config=extension_pb2.TypedExtensionConfig(
                    name=ext_name, typed_config=_pack(config)
                )
            )
            for ext_name, config in policies
        ]
    )


def policy_metadata(service: MeshService) -> Any:
    """The Cluster's `filter_metadata["outrigger.dev"]`: the service and, per policy key, its
    effective value (annotation spelling) and origin."""
    values = effective_values(service.policy)
    metadata = struct_pb2.Struct()
    metadata.update(
        {
            "service": f"{service.name}.{service.namespace}",
            "policy": {
                key: {"value": values[key], "origin": origin} for key, origin in service.origins
            },
        }
    )
    return metadata


def _cluster(service: MeshService) -> Any:
    policy = service.policy
    name = cluster_name(service)
    cluster = cluster_pb2.Cluster(
        name=name,
        connect_timeout=_duration(policy.connect_timeout),
        lb_policy=cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
    )
    cluster.metadata.filter_metadata[POLICY_METADATA].CopyFrom(policy_metadata(service))
    if service.headless:
        # The caller picked the pod: keep its destination (no balancing, no endpoints).
        cluster.type = cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST
        cluster.lb_policy = cluster_pb2.Cluster.LbPolicy.CLUSTER_PROVIDED
    else:
        cluster.type = cluster_pb2.Cluster.DiscoveryType.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(_ads())
        cluster.eds_cluster_config.service_name = name
    if policy.load_balancer != "round_robin" and not service.headless:
        cluster.load_balancing_policy.CopyFrom(_load_balancing_policy(policy.load_balancer))

    breaker = policy.circuit_breaker
    thresholds = circuit_breaker_pb2.CircuitBreakers.Thresholds(
        priority=base_pb2.RoutingPriority.DEFAULT,
        max_requests=wrappers_pb2.UInt32Value(value=breaker.max_requests),
        max_pending_requests=wrappers_pb2.UInt32Value(value=breaker.max_pending),
    )
    budget = policy.retries.budget if policy.retries is not None else None
    if budget is not None:
        thresholds.retry_budget.budget_percent.value = budget.percent
        thresholds.retry_budget.min_retry_concurrency.value = budget.min_concurrency
    else:
        thresholds.max_retries.value = _MAX_UINT32
    cluster.circuit_breakers.thresholds.append(thresholds)

    if breaker.consecutive_failures is not None and not service.headless:
        n = breaker.consecutive_failures
        cluster.outlier_detection.CopyFrom(
            outlier_detection_pb2.OutlierDetection(
                consecutive_5xx=wrappers_pb2.UInt32Value(value=n),
                enforcing_consecutive_5xx=wrappers_pb2.UInt32Value(value=100),
                consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=n),
                enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
                enforcing_success_rate=wrappers_pb2.UInt32Value(value=0),
                interval=_duration(OUTLIER_INTERVAL),
                base_ejection_time=_duration(breaker.open_for),
                max_ejection_percent=wrappers_pb2.UInt32Value(value=breaker.max_ejection_percent),
            )
        )

    options = http_protocol_options_pb2.HttpProtocolOptions(
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            idle_timeout=_duration(UPSTREAM_IDLE_TIMEOUT)
        ),
    )
    explicit = options.explicit_http_config
    if service.protocol is not None and service.protocol.http2:
        explicit.http2_protocol_options.SetInParent()  # h2c to the endpoints
    else:
        explicit.http_protocol_options.SetInParent()
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_pack(options))
    return cluster


def _passthrough_cluster() -> Any:
    return cluster_pb2.Cluster(
        name=PASSTHROUGH_CLUSTER,
        type=cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.LbPolicy.CLUSTER_PROVIDED,
        connect_timeout=_duration(1.0),
    )


def _blackhole_cluster() -> Any:
    """Istio's BlackHoleCluster: no endpoints, so what is sent to it is closed."""
    cluster = cluster_pb2.Cluster(
        name=BLACKHOLE_CLUSTER,
        type=cluster_pb2.Cluster.DiscoveryType.STATIC,
        connect_timeout=_duration(1.0),
    )
    cluster.load_assignment.cluster_name = BLACKHOLE_CLUSTER
    return cluster


def _load_assignment(service: MeshService) -> Any:
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(
                        address=endpoint.host, port_value=endpoint.port
                    )
                )
            )
        )
        for endpoint in service.endpoints
    ]
    # gRPC NACKs a locality without `locality` and ignores one without a weight.
    locality = endpoint_components_pb2.LocalityLbEndpoints(
        lb_endpoints=lb_endpoints, load_balancing_weight=wrappers_pb2.UInt32Value(value=1)
    )
    locality.locality.SetInParent()
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster_name(service), endpoints=[locality]
    )


# -- listeners ---------------------------------------------------------------------------------


def service_destinations(service: MeshService) -> list[tuple[int, list[str]]]:
    """(port, addresses) where an intercepted connection reaches the service: its virtual
    addresses on its port; a headless service's pods' IPs on their ports."""
    if not service.headless:
        return [(service.port, list(service.addresses))] if service.addresses else []
    by_port: dict[int, list[str]] = {}
    for endpoint in service.endpoints:
        try:
            address = str(ipaddress.ip_address(endpoint.host))
        except ValueError:  # a host name, not a pod IP
            continue
        by_port.setdefault(endpoint.port, []).append(address)
    return sorted(by_port.items())


def _chain_match(port: int | None = None, addresses: Iterable[str] = (), **fields: Any) -> Any:
    match = listener_components_pb2.FilterChainMatch(**fields)
    if port is not None:
        match.destination_port.value = port
    for address in addresses:
        length = 32 if ipaddress.ip_address(address).version == 4 else 128
        match.prefix_ranges.add(address_prefix=address).prefix_len.value = length
    return match


def _tcp_proxy(cluster: str) -> Any:
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=cluster, cluster=cluster)
    return listener_components_pb2.Filter(name=TCP_PROXY_FILTER, typed_config=_pack(proxy))


def _chain(name: str, match: Any, network_filter: Any) -> Any:
    return listener_components_pb2.FilterChain(
        name=name, filter_chain_match=match, filters=[network_filter]
    )


@dataclass(slots=True)
class _Chains:
    """The outbound listener's chains as they are collected, service by service."""

    tcp: list[Any] = field(default_factory=list)  # per service: tcp_proxy to its cluster
    # (port, "http1" | "http") -> addresses: one HTTP connection manager chain per port, since
    # they all route alike (RDS "outbound"): a chain per service would repeat it a thousand times
    http: dict[tuple[int, str], list[str]] = field(default_factory=dict)
    claimed: set[tuple[str, int]] = field(default_factory=set)  # (address, port)
    names: set[tuple[str, int]] = field(default_factory=set)  # (TLS server name, port)

    def add(self, service: MeshService) -> None:
        """The service's chains (see the module docstring); addresses and TLS server names
        another service claimed first are left out."""
        tcp = _tcp_proxy(cluster_name(service))
        prefix = virtual_host_name(service)
        for port, addresses in service_destinations(service):
            free = [a for a in addresses if (a, port) not in self.claimed]
            self.claimed.update((a, port) for a in free)
            if not free:
                continue
            if service.protocol is not None and service.protocol.http:
                self.http.setdefault((port, "http"), []).extend(free)
            elif service.protocol is Protocol.TCP:
                self.tcp.append(_chain(f"{prefix}|tcp", _chain_match(port, free), tcp))
            elif service.protocol is Protocol.TLS:
                match = _chain_match(port, free, transport_protocol=TLS_TRANSPORT)
                self.tcp.append(_chain(f"{prefix}|tls", match, tcp))
            else:  # detected: HTTP/1.x to the routes, anything else to the service as TCP
                self.http.setdefault((port, "http1"), []).extend(free)
                self.tcp.append(_chain(f"{prefix}|tcp", _chain_match(port, free), tcp))
        if service.protocol is Protocol.TLS and not service.headless:
            # The service's DNS names as TLS server names: a client that reached it through an
            # address the mesh does not know is still known by the name it asked for.
            qualified = f"{service.name}.{service.namespace}"
            server_names = [
                name
                for name in (qualified, f"{qualified}.svc", service.fqdn)
                if (name, service.port) not in self.names
            ]
            self.names.update((name, service.port) for name in server_names)
            if server_names:
                match = _chain_match(
                    service.port, server_names=server_names, transport_protocol=TLS_TRANSPORT
                )
                self.tcp.append(_chain(f"{prefix}|sni", match, tcp))

    def chains(self, http: Any) -> list[Any]:
        """The TCP chains, the HTTP chains per port, then HTTP/1.x to any other destination."""
        out = list(self.tcp)
        for (port, kind), addresses in sorted(self.http.items()):
            protocols = HTTP1_PROTOCOLS if kind == "http1" else ()
            match = _chain_match(port, addresses, application_protocols=protocols)
            out.append(_chain(f"{kind}|{port}", match, http))
        out.append(_chain("http", _chain_match(application_protocols=HTTP1_PROTOCOLS), http))
        return out


def _listener_filter(name: str, config: Message) -> Any:
    return listener_components_pb2.ListenerFilter(name=name, typed_config=_pack(config))


def _outbound_listener(mesh: Mesh, services: list[MeshService]) -> Any:
    hcm = _hcm(OUTBOUND, OUTBOUND, mesh.tracing.sampling)
    http = listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_pack(hcm))
    collected = _Chains()
    for service in services:
        collected.add(service)
    allow_any = mesh.outbound_policy == "allow_any"
    default = listener_components_pb2.FilterChain(
        name=ALLOW_ANY_VHOST if allow_any else BLOCK_ALL_VHOST,
        filters=[_tcp_proxy(PASSTHROUGH_CLUSTER if allow_any else BLACKHOLE_CLUSTER)],
    )
    return listener_pb2.Listener(
        name=OUTBOUND,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=OUTBOUND_PORT)
        ),
        listener_filters=[
            _listener_filter(ORIGINAL_DST_FILTER, original_dst_pb2.OriginalDst()),
            _listener_filter(TLS_INSPECTOR_FILTER, tls_inspector_pb2.TlsInspector()),
            _listener_filter(HTTP_INSPECTOR_FILTER, http_inspector_pb2.HttpInspector()),
        ],
        filter_chains=collected.chains(http),
        default_filter_chain=default,
    )


def _grpc_listener(name: str, service: MeshService) -> Any:
    route_config = virtual_host_name(service)
    hcm = _hcm(route_config, route_config, None)
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(hcm))
    )


# -- entry points ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Translated:
    """One service and port: what every namespace sees, and what only its own namespace sees."""

    service: MeshService
    route: Any
    global_domains: list[str]  # reach it from any namespace
    own_domains: list[str]  # reach it from its own namespace (the bare names added)


def _claim(claimed: set[str], domains: list[str]) -> list[str]:
    """The domains not claimed by an earlier service; claims them."""
    free = [d for d in domains if d not in claimed]
    claimed.update(free)
    return free


def _sorted_services(mesh: Mesh) -> list[MeshService]:
    return sorted(mesh.services, key=lambda s: (s.namespace, s.name, s.port))


def translate_namespaces(mesh: Mesh) -> tuple[Resources, dict[str, Resources]]:
    """The resources for sidecars in each namespace that has services, and for any other
    namespace: (others, {namespace: resources}). Every set holds the same Cluster and
    ClusterLoadAssignment messages; the RouteConfigurations and gRPC listeners differ."""
    services = _sorted_services(mesh)
    clusters: dict[str, Message] = {}
    endpoints: dict[str, Message] = {}
    translated: list[_Translated] = []
    claimed: set[str] = set()
    for service in services:
        everywhere = _claim(claimed, service_domains(service, None))
        translated.append(_Translated(service, _route(service), everywhere, []))
    # Bare names next, so that none hides a qualified one; they are claimed per namespace (a
    # bare name is only ever seen from its own namespace).
    claimed_in: dict[str, set[str]] = {}
    for item in translated:
        ns = item.service.namespace
        own = [d for d in service_domains(item.service, ns) if d not in claimed]
        item.own_domains.extend(_claim(claimed_in.setdefault(ns, set()), own))
    for item in translated:
        name = cluster_name(item.service)
        clusters[name] = _cluster(item.service)
        if not item.service.headless:
            endpoints[name] = _load_assignment(item.service)
    if mesh.outbound_policy == "allow_any":
        clusters[PASSTHROUGH_CLUSTER] = _passthrough_cluster()
    else:
        clusters[BLACKHOLE_CLUSTER] = _blackhole_cluster()
    clusters = dict(sorted(clusters.items()))
    endpoints = dict(sorted(endpoints.items()))
    outbound = _outbound_listener(mesh, services)
    catch_all = _catch_all(mesh)
    service_routes = {
        virtual_host_name(t.service): route_pb2.RouteConfiguration(
            name=virtual_host_name(t.service),
            virtual_hosts=[_virtual_host(t.service, t.own_domains + t.global_domains, t.route)],
        )
        for t in translated
    }
    global_hosts = [_virtual_host(t.service, t.global_domains, t.route) for t in translated]
    global_listeners = {
        name: _grpc_listener(name, t.service)
        for t in translated
        for name in grpc_listener_names(t.service, None)
    }

    def for_namespace(namespace: str | None) -> Resources:
        listeners: dict[str, Message] = {OUTBOUND: outbound, **global_listeners}
        hosts = list(global_hosts)
        for i, t in enumerate(translated):
            if t.service.namespace != namespace:
                continue
            hosts[i] = _virtual_host(t.service, t.own_domains + t.global_domains, t.route)
            for name in grpc_listener_names(t.service, namespace):
                listeners.setdefault(name, _grpc_listener(name, t.service))
        routes: dict[str, Message] = {
            **service_routes,
            OUTBOUND: route_pb2.RouteConfiguration(
                name=OUTBOUND, virtual_hosts=[*hosts, catch_all]
            ),
        }
        return {
            LISTENER_TYPE: dict(sorted(listeners.items())),
            ROUTE_TYPE: dict(sorted(routes.items())),
            CLUSTER_TYPE: clusters,
            ENDPOINT_TYPE: endpoints,
        }

    namespaces = sorted({s.namespace for s in services})
    return for_namespace(None), {ns: for_namespace(ns) for ns in namespaces}


@dataclass(frozen=True, slots=True)
class Translation:
    """A mesh and what `translate_namespaces` makes of it; `translate_update` reuses it.

    Nothing here is ever changed in place: a caller that adds to a set of resources (the control
    plane's lingering clusters) copies the set first. `translate_update` only carries the
    previous resources over, so a caller may keep them in another form than messages (the
    control plane keeps their encodings: `control_plane/cache.py::settled`)."""

    mesh: Mesh
    default: Resources
    by_namespace: Mapping[str, Resources]
    endpoints_only: bool = False  # built from the previous translation: only EDS changed


def _endpoint_changes(old: Mesh, new: Mesh) -> list[MeshService] | None:
    """The services of `new` whose endpoints alone differ from `old`'s, when nothing else
    differs (the same services in the same order, the same mesh-wide settings, no headless
    service changed: their endpoints are route domains); None otherwise."""
    if len(old.services) != len(new.services):
        return None
    if dataclasses.replace(old, services=()) != dataclasses.replace(new, services=()):
        return None
    changed = []
    for before, after in zip(old.services, new.services, strict=True):
        if before is after or before == after:
            continue
        if before.headless or after.headless:
            return None
        if dataclasses.replace(before, endpoints=()) != dataclasses.replace(after, endpoints=()):
            return None
        changed.append(after)
    return changed


def translate_update(mesh: Mesh, previous: Translation | None = None) -> Translation:
    """`translate_namespaces(mesh)`, built from `previous` when only endpoints changed (see the
    module docstring); equal, message for message, to a full translation either way."""
    changed = _endpoint_changes(previous.mesh, mesh) if previous is not None else None
    if previous is None or changed is None:
        default, by_namespace = translate_namespaces(mesh)
        return Translation(mesh, default, by_namespace)
    endpoints = dict(previous.default[ENDPOINT_TYPE])
    for service in changed:
        endpoints[cluster_name(service)] = _load_assignment(service)

    def with_endpoints(resources: Resources) -> Resources:
        return {**resources, ENDPOINT_TYPE: endpoints}  # one dict, shared by every set

    return Translation(
        mesh,
        with_endpoints(previous.default),
        {ns: with_endpoints(r) for ns, r in previous.by_namespace.items()},
        endpoints_only=True,
    )


def translate(mesh: Mesh, namespace: str = "default") -> Resources:
    """The xDS resources a sidecar in `namespace` is sent: {type URL: {name: message}}."""
    others, by_namespace = translate_namespaces(mesh)
    return by_namespace.get(namespace, others)
