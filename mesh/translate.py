"""Mesh model -> xDS v3 resources: the one translation (ARCHITECTURE.md, "How policy travels").

Policy is written in the standard xDS fields so that our sidecars, Envoy and gRPC's proxyless
clients read the same resources. Naming scheme (Istio-like):

- Cluster and ClusterLoadAssignment per service:
  ``outbound|{port}||{name}.{namespace}.svc.cluster.local`` (type EDS over ADS; the EDS
  service_name is the cluster name).
- Listener ``outbound`` (0.0.0.0:15001, one HTTP connection manager with RDS ``outbound``) and
  RouteConfiguration ``outbound``: one virtual host per service, named
  ``{name}.{namespace}.svc.cluster.local:{port}``, whose domains are every spelling of the service
  (see `service_domains`), then a catch-all virtual host ``*``:
  - allow_any: virtual host ``allow_any`` routes to cluster ``PassthroughCluster`` (ORIGINAL_DST);
  - registry_only: virtual host ``block_all`` answers with a direct_response 502, body "NR"
    (Istio's block_all).
- For gRPC proxyless clients dialing ``xds:///{name}`` or ``xds:///{name}:{port}``: Listeners
  ``{name}`` and ``{name}:{port}`` with an api_listener HTTP connection manager whose RDS names
  RouteConfiguration ``{name}`` (one virtual host for the service).

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
- Tracing: the outbound HCM's ``tracing.random_sampling`` = sampling x 100 (a percentage).

Output is deterministic: the same mesh gives byte-identical resources and the same version.
"""

from __future__ import annotations

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
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from mesh.http import IDEMPOTENT_METHODS
from mesh.model import Mesh, MeshService, Retries
from mesh.xds import (
    ALLOW_ANY_VHOST,
    BLOCK_ALL_VHOST,
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HCM_FILTER,
    HTTP_PROTOCOL_OPTIONS,
    LISTENER_TYPE,
    NO_ROUTE_BODY,
    NO_ROUTE_STATUS,
    OUTBOUND,
    OUTBOUND_PORT,
    PASSTHROUGH_CLUSTER,
    ROUTE_TYPE,
    ROUTER_FILTER,
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
    return f"outbound|{service.port}||{service.name}.{service.namespace}.svc.cluster.local"


def virtual_host_name(service: MeshService) -> str:
    return f"{service.name}.{service.namespace}.svc.cluster.local:{service.port}"


def service_domains(service: MeshService) -> list[str]:
    """Every authority that reaches the service, each with and without ":port".

    Names are unique in a mesh, so the bare names route whatever the port (Istio also lists the
    port-less names in a port's virtual host).
    """
    fqdn = f"{service.name}.{service.namespace}.svc.cluster.local"
    names = [
        service.name,
        f"{service.name}.{service.namespace}",
        f"{service.name}.{service.namespace}.svc",
        fqdn,
    ]
    return [domain for name in names for domain in (name, f"{name}:{service.port}")]


def grpc_listener_names(service: MeshService) -> list[str]:
    """LDS names gRPC clients ask for when dialing xds:///name or xds:///name:port."""
    return [service.name, f"{service.name}:{service.port}"]


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
    if _GRPC_UNAVAILABLE_CONDITIONS.intersection(retries.retry_on) or (
        _GRPC_UNAVAILABLE_CODES.intersection(retries.status_codes)
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


def _virtual_host(service: MeshService) -> Any:
    return route_components_pb2.VirtualHost(
        name=virtual_host_name(service), domains=service_domains(service), routes=[_route(service)]
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


def _cluster(service: MeshService) -> Any:
    policy = service.policy
    name = cluster_name(service)
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.DiscoveryType.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=_ads(), service_name=name
        ),
        connect_timeout=_duration(policy.connect_timeout),
        lb_policy=cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
    )
    if policy.load_balancer != "round_robin":
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

    if breaker.consecutive_failures is not None:
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
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
    )
    cluster.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS].CopyFrom(_pack(options))
    return cluster


def _passthrough_cluster() -> Any:
    return cluster_pb2.Cluster(
        name=PASSTHROUGH_CLUSTER,
        type=cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.LbPolicy.CLUSTER_PROVIDED,
        connect_timeout=_duration(1.0),
    )


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


def _outbound_listener(mesh: Mesh) -> Any:
    hcm = _hcm(OUTBOUND, OUTBOUND, mesh.tracing.sampling)
    return listener_pb2.Listener(
        name=OUTBOUND,
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=OUTBOUND_PORT)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[listener_components_pb2.Filter(name=HCM_FILTER, typed_config=_pack(hcm))]
            )
        ],
    )


def _grpc_listener(name: str, service: MeshService) -> Any:
    hcm = _hcm(service.name, service.name, None)
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=_pack(hcm))
    )


# -- entry points ------------------------------------------------------------------------------


def translate(mesh: Mesh) -> Resources:
    """The xDS resources for a mesh: {type URL: {resource name: message}}, sorted by name."""
    listeners: dict[str, Message] = {OUTBOUND: _outbound_listener(mesh)}
    routes: dict[str, Message] = {}
    clusters: dict[str, Message] = {}
    endpoints: dict[str, Message] = {}
    services = sorted(mesh.services, key=lambda s: s.name)
    for service in services:
        for name in grpc_listener_names(service):
            listeners[name] = _grpc_listener(name, service)
        routes[service.name] = route_pb2.RouteConfiguration(
            name=service.name, virtual_hosts=[_virtual_host(service)]
        )
        clusters[cluster_name(service)] = _cluster(service)
        endpoints[cluster_name(service)] = _load_assignment(service)
    routes[OUTBOUND] = route_pb2.RouteConfiguration(
        name=OUTBOUND,
        virtual_hosts=[*(_virtual_host(s) for s in services), _catch_all(mesh)],
    )
    if mesh.outbound_policy == "allow_any":
        clusters[PASSTHROUGH_CLUSTER] = _passthrough_cluster()
    return {
        LISTENER_TYPE: dict(sorted(listeners.items())),
        ROUTE_TYPE: dict(sorted(routes.items())),
        CLUSTER_TYPE: dict(sorted(clusters.items())),
        ENDPOINT_TYPE: dict(sorted(endpoints.items())),
    }
