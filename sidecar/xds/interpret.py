"""xDS v3 resources -> the sidecar's runtime Snapshot: the sidecar's only interpretation of xDS.

`build_snapshot` walks Listener "outbound" -> its HTTP connection manager -> RouteConfiguration
(RDS, or inline) -> virtual hosts -> the route -> Cluster -> ClusterLoadAssignment and builds one
`ServiceConfig` per cluster. Anything it cannot apply faithfully raises `ConfigError` naming the
resource type, the resource name and the field; the xDS client NACKs with that message and keeps
the last good snapshot. Fields not listed in HONOURED_FIELDS are ignored (as gRPC does).

Defaults for absent fields are Envoy's, so the same resources mean the same thing to Envoy, gRPC
and this sidecar: absent route `timeout` is 15s, absent `num_retries` is 1, absent
`connect_timeout` is 5s, absent `outlier_detection.consecutive_5xx` is 5, and so on (see the
table). The exceptions are noted in the table.

Standalone mode uses `snapshot_from_mesh`: the control plane's translation, then this
interpretation, in process.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Final

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf.json_format import MessageToDict

from mesh.address import join_host_port
from mesh.http import IDEMPOTENT_METHODS
from mesh.model import Mesh
from mesh.policy import Backoff, CircuitBreaker, RetryBudget
from mesh.translate import idempotent_request_headers, translate
from mesh.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    HCM_TYPE,
    HTTP1_PROTOCOLS,
    HTTP_PROTOCOL_OPTIONS,
    LISTENER_TYPE,
    NO_ROUTE_STATUS,
    OUTBOUND,
    PASSTHROUGH_CLUSTER,
    POLICY_METADATA,
    ROUTE_TYPE,
    ROUTER_TYPE,
    TCP_PROXY_TYPE,
    TLS_TRANSPORT,
    TYPE_NAMES,
    UPSTREAM_IDLE_TIMEOUT,
    Message,
    Resources,
    resources_version,
)
from sidecar.config import (
    Chain,
    ChainProtocol,
    ConfigError,
    Endpoint,
    LbPolicy,
    OutboundPolicy,
    RetryPolicy,
    ServiceConfig,
    Snapshot,
    TcpTarget,
)

# resource, field, what the sidecar does with it. The README's table is made from this.
HONOURED_FIELDS: Final[tuple[tuple[str, str, str], ...]] = (
    (
        "Listener",
        "name",
        'only "outbound" is read; its address and listener_filters are ignored (ports come from '
        "flags; the sidecar reads the original destination and the first bytes itself)",
    ),
    (
        "Listener",
        "filter_chains[].filters",
        "one network filter per chain: an HttpConnectionManager (the same config in every chain) "
        "or a tcp_proxy",
    ),
    (
        "Listener",
        "filter_chains[].filter_chain_match",
        "destination_port with prefix_ranges (single addresses, /32 or /128): intercepted "
        "connections to those addresses; with application_protocols http/1.0, http/1.1 only "
        "when the first bytes are HTTP/1.x (the rest: a chain of the same addresses without "
        "them, else the default); transport_protocol tls: TLS only, its ClientHello read for the "
        "server name; server_names (exact) with destination_port and transport_protocol tls: TLS "
        "naming one of them, to an address no chain has. Exactly one HttpConnectionManager chain "
        "has no destination: HTTP/1.x to anywhere else. Other fields and combinations are refused",
    ),
    (
        "Listener",
        "default_filter_chain",
        "a tcp_proxy for every other connection: to an ORIGINAL_DST cluster (allow_any: passed "
        "through to its original destination) or to a cluster without endpoints (registry_only: "
        "closed and counted, flag NR); absent: closed",
    ),
    (
        "TcpProxy",
        "cluster",
        "where the connection goes: round robin over the Cluster's endpoints with one connect "
        "attempt bounded by its connect_timeout; ORIGINAL_DST: the connection's own destination",
    ),
    (
        "TcpProxy",
        "idle_timeout",
        "close when no byte moved either way for this long; 0 disables; absent: the sidecar's "
        "--tcp-idle-timeout (1h, Envoy's default)",
    ),
    ("HttpConnectionManager", "rds.route_config_name", "the RouteConfiguration to read"),
    ("HttpConnectionManager", "route_config", "an inline RouteConfiguration instead of RDS"),
    (
        "HttpConnectionManager",
        "http_filters",
        "must end with envoy.filters.http.router; any other filter must be is_optional",
    ),
    (
        "HttpConnectionManager",
        "tracing.random_sampling",
        "trace sampling percentage (absent: 100%; no `tracing`: 0%)",
    ),
    (
        "RouteConfiguration",
        "virtual_hosts[].domains",
        'authorities routed to the host, exact match, case-insensitive; "*" alone is the catch-all',
    ),
    (
        "RouteConfiguration",
        "virtual_hosts[].routes",
        'exactly one route per virtual host, matching prefix "/" (no header/query matchers)',
    ),
    ("Route", "route.cluster", "the Cluster to forward to (weighted_clusters not supported)"),
    (
        "Route",
        "direct_response",
        'on the "*" virtual host only, status 502: registry_only (unknown hosts get 502, flag NR)',
    ),
    (
        "Route",
        "route.cluster on the * virtual host",
        "an ORIGINAL_DST cluster: allow_any (unknown hosts pass through to the original host)",
    ),
    ("Route", "route.timeout", "total timeout bounding every attempt; 0 disables; absent: 15s"),
    ("Route", "route.retry_policy.num_retries", "retries after the first try (absent: 1)"),
    (
        "Route",
        "route.retry_policy.retry_on",
        "connect-failure, reset, gateway-error, 5xx, retriable-4xx, retriable-status-codes; "
        "the gRPC conditions unavailable, cancelled, deadline-exceeded, internal, "
        "resource-exhausted (a grpc-status that comes before any message, HTTP/2 clusters "
        "only); "
        "others are refused",
    ),
    (
        "Route",
        "route.retry_policy.retriable_status_codes",
        "status codes retried when retry_on has retriable-status-codes",
    ),
    ("Route", "route.retry_policy.per_try_timeout", "timeout of each attempt (absent or 0: none)"),
    (
        "Route",
        "route.retry_policy.retry_back_off",
        "base_interval (absent: 25ms) and max_interval (absent: 10 x base) of jittered backoff",
    ),
    (
        "Route",
        "route.retry_policy.retriable_request_headers",
        "empty: every method is retried; exactly the idempotency rule (`:method` exact GET, HEAD, "
        "OPTIONS, PUT, DELETE, TRACE, or `idempotency-key` present): POST/PATCH are retried "
        "only with an Idempotency-Key; any other matcher list is refused",
    ),
    (
        "Cluster",
        "type",
        "EDS (endpoints from the ClusterLoadAssignment named by eds_cluster_config.service_name, "
        "or the cluster name), STATIC (inline load_assignment), ORIGINAL_DST (on the * virtual "
        "host: passthrough; on a service's route: a headless service, each request to its own "
        "authority with the service's policy, no balancing)",
    ),
    (
        "Cluster",
        'metadata.filter_metadata["outrigger.dev"].policy',
        "each policy key's effective value and origin (service, namespace, mesh, built-in), "
        "shown per service in /config_dump; never changes behaviour",
    ),
    ("Cluster", "connect_timeout", "upstream TCP connect timeout (absent: 5s)"),
    (
        "Cluster",
        "load_balancing_policy",
        "the first of round_robin, least_request, random in the list (other policies skipped)",
    ),
    (
        "Cluster",
        "lb_policy",
        "ROUND_ROBIN, LEAST_REQUEST, RANDOM when load_balancing_policy is unset",
    ),
    (
        "Cluster",
        "circuit_breakers.thresholds[DEFAULT]",
        "max_requests, max_pending_requests (absent: 1024); retry_budget.budget_percent "
        "(absent: 20) and min_retry_concurrency (absent: 3); max_retries is not read",
    ),
    (
        "Cluster",
        "outlier_detection",
        "present: per-endpoint breaker tripping after consecutive_5xx (absent: 5) failures, "
        "enforcing_consecutive_5xx 0 disables it; base_ejection_time (absent: 30s) is how long "
        "it stays open; max_ejection_percent (absent: 10, at least one endpoint)",
    ),
    (
        "Cluster",
        "typed_extension_protocol_options[HttpProtocolOptions]"
        ".common_http_protocol_options.idle_timeout",
        "idle timeout of pooled upstream connections (absent: 60s, not Envoy's 1h); the "
        "deprecated Cluster.common_http_protocol_options is read too",
    ),
    (
        "Cluster",
        "typed_extension_protocol_options[HttpProtocolOptions]"
        ".explicit_http_config.http2_protocol_options",
        "present: requests go to the endpoints over HTTP/2 (h2c, prior knowledge), multiplexed; "
        "its settings are not read",
    ),
    (
        "ClusterLoadAssignment",
        "endpoints[].lb_endpoints[].endpoint.address.socket_address",
        "address and port_value of each endpoint of the lowest priority; UNHEALTHY, DRAINING "
        "and TIMEOUT endpoints are left out",
    ),
)

ENVOY_DEFAULT_ROUTE_TIMEOUT: Final = 15.0
ENVOY_DEFAULT_CONNECT_TIMEOUT: Final = 5.0
ENVOY_DEFAULT_CONSECUTIVE_5XX: Final = 5
ENVOY_DEFAULT_EJECTION_TIME: Final = 30.0
ENVOY_DEFAULT_MAX_EJECTION_PERCENT: Final = 10
ENVOY_DEFAULT_THRESHOLD: Final = 1024
_LB_TYPES: Final[dict[str, LbPolicy]] = {
    "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin": (
        LbPolicy.ROUND_ROBIN
    ),
    "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest": (
        LbPolicy.LEAST_REQUEST
    ),
    "type.googleapis.com/envoy.extensions.load_balancing_policies.random.v3.Random": (
        LbPolicy.RANDOM
    ),
}
_LB_ENUM: Final[dict[int, LbPolicy]] = {
    cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN: LbPolicy.ROUND_ROBIN,
    cluster_pb2.Cluster.LbPolicy.LEAST_REQUEST: LbPolicy.LEAST_REQUEST,
    cluster_pb2.Cluster.LbPolicy.RANDOM: LbPolicy.RANDOM,
}
_HTTP_RETRY_ON: Final = frozenset(
    {"connect-failure", "reset", "gateway-error", "5xx", "retriable-4xx"}
)
_GRPC_RETRY_ON: Final = frozenset(
    {"cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"}
)
_EXCLUDED_HEALTH: Final = frozenset(
    {
        health_check_pb2.HealthStatus.UNHEALTHY,
        health_check_pb2.HealthStatus.DRAINING,
        health_check_pb2.HealthStatus.TIMEOUT,
    }
)
_ISTIO_CLUSTER = re.compile(
    r"outbound\|(?P<port>[0-9]{1,5})\|[^|]*\|(?P<name>[^.|]+)\.(?P<namespace>[^.|]+)(?:\..*)?"
)


def _fail(kind: str, name: str, field: str, problem: str) -> ConfigError:
    return ConfigError(f'{kind} "{name}": {field}: {problem}')


def _seconds(duration: Any, kind: str, name: str, field: str) -> float:
    seconds, nanos = int(duration.seconds), int(duration.nanos)
    if seconds < 0 or nanos < 0 or nanos > 999_999_999:
        raise _fail(kind, name, field, f"must be a non-negative duration, got {seconds}s {nanos}ns")
    return seconds + nanos / 1e9


def _lookup(resources: Resources, type_url: str, name: str, by: str) -> Message:
    found = resources.get(type_url, {}).get(name)
    if found is None:
        raise ConfigError(f'{TYPE_NAMES[type_url]} "{name}": missing (referenced by {by})')
    return found


# -- listener and HTTP connection manager ------------------------------------------------------


def _outbound_listener(resources: Resources) -> Any:
    return _lookup(resources, LISTENER_TYPE, OUTBOUND, "the sidecar's outbound listener")


def _network_filter(chain: Any, field: str) -> Any:
    """The chain's one network filter, unpacked: an HttpConnectionManager or a TcpProxy."""
    if len(chain.filters) != 1:
        raise _fail(
            "Listener",
            OUTBOUND,
            f"{field}.filters",
            "must be exactly one filter: envoy.filters.network.http_connection_manager or "
            "envoy.filters.network.tcp_proxy",
        )
    typed = chain.filters[0].typed_config
    config: Any
    if typed.type_url == HCM_TYPE:
        config = hcm_pb2.HttpConnectionManager()
    elif typed.type_url == TCP_PROXY_TYPE:
        config = tcp_proxy_pb2.TcpProxy()
    else:
        raise _fail(
            "Listener",
            OUTBOUND,
            f"{field}.filters[0].typed_config",
            f"{typed.type_url} is not supported (HttpConnectionManager or TcpProxy)",
        )
    if not typed.Unpack(config):
        raise _fail("Listener", OUTBOUND, f"{field}.filters[0].typed_config", "unreadable")
    return config


def _check_hcm(hcm: Any, field: str) -> None:
    filters = list(hcm.http_filters)
    field = f"{field}.filters[0].http_filters"
    if not filters or filters[-1].typed_config.type_url != ROUTER_TYPE:
        raise _fail("Listener", OUTBOUND, field, "must end with envoy.filters.http.router")
    for i, http_filter in enumerate(filters[:-1]):
        if not http_filter.is_optional and not http_filter.disabled:
            raise _fail(
                "Listener",
                OUTBOUND,
                f"{field}[{i}]",
                f"filter {http_filter.name!r} is not supported (mark it is_optional to skip it)",
            )


@dataclass(frozen=True, slots=True)
class _Match:
    """A filter_chain_match in the shapes the sidecar reads (HONOURED_FIELDS)."""

    port: int | None
    addresses: tuple[str, ...]
    server_names: tuple[str, ...]
    tls: bool  # transport_protocol tls
    http1: bool  # application_protocols http/1.0, http/1.1


def _chain_match(chain: Any, field: str) -> _Match:
    match = chain.filter_chain_match
    field = f"{field}.filter_chain_match"
    unsupported = [
        name
        for name in ("direct_source_prefix_ranges", "source_prefix_ranges", "source_ports")
        if len(getattr(match, name))
    ]
    if match.address_suffix:
        unsupported.append("address_suffix")
    if match.HasField("suffix_len"):
        unsupported.append("suffix_len")
    if unsupported:
        raise _fail("Listener", OUTBOUND, f"{field}.{unsupported[0]}", "is not supported")
    if match.source_type:
        raise _fail("Listener", OUTBOUND, f"{field}.source_type", "is not supported")
    addresses: list[str] = []
    for i, cidr in enumerate(match.prefix_ranges):
        try:
            address = ipaddress.ip_address(cidr.address_prefix)
        except ValueError:
            raise _fail(
                "Listener",
                OUTBOUND,
                f"{field}.prefix_ranges[{i}].address_prefix",
                f"{cidr.address_prefix!r} is not an IP address",
            ) from None
        full = 32 if address.version == 4 else 128
        if cidr.prefix_len.value != full:
            raise _fail(
                "Listener",
                OUTBOUND,
                f"{field}.prefix_ranges[{i}].prefix_len",
                f"only single addresses (/{full}) are supported, got /{cidr.prefix_len.value}",
            )
        addresses.append(str(address))
    if match.transport_protocol not in ("", TLS_TRANSPORT):
        raise _fail(
            "Listener",
            OUTBOUND,
            f"{field}.transport_protocol",
            f"only {TLS_TRANSPORT!r} is supported, got {match.transport_protocol!r}",
        )
    protocols = set(match.application_protocols)
    if not protocols <= set(HTTP1_PROTOCOLS):
        raise _fail(
            "Listener",
            OUTBOUND,
            f"{field}.application_protocols",
            f"only {', '.join(HTTP1_PROTOCOLS)} are supported, got {sorted(protocols)}",
        )
    names = []
    for i, name in enumerate(match.server_names):
        lowered = name.lower()
        if not lowered or "*" in lowered or not lowered.isascii():
            raise _fail(
                "Listener",
                OUTBOUND,
                f"{field}.server_names[{i}]",
                f"{name!r}: only exact ASCII host names are supported",
            )
        names.append(lowered)
    return _Match(
        port=int(match.destination_port.value) if match.HasField("destination_port") else None,
        addresses=tuple(addresses),
        server_names=tuple(names),
        tls=match.transport_protocol == TLS_TRANSPORT,
        http1=bool(protocols),
    )


def _shape(match: _Match, is_hcm: bool) -> str | None:
    """Which of the chains the sidecar reads this is (None: another, refused):
    "http-any" HTTP/1.x to any destination; "http1" HTTP/1.x to these addresses; "http" any
    bytes to them, as HTTP; "tcp" / "tls" anything / TLS to them, passed through; "sni" TLS
    naming one of these server names."""
    destination = match.port is not None and bool(match.addresses) and not match.server_names
    if match.port is None and not (match.addresses or match.server_names or match.tls):
        return "http-any" if is_hcm else None
    if is_hcm:
        return ("http1" if match.http1 else "http") if destination and not match.tls else None
    if match.http1:
        return None
    if destination:
        return "tls" if match.tls else "tcp"
    if match.port is not None and match.server_names and match.tls and not match.addresses:
        return "sni"
    return None


@dataclass(slots=True)
class _Listener:
    """What the outbound listener's chains say, before the clusters are read."""

    hcm: Any  # the one HttpConnectionManager config
    by_destination: dict[Endpoint, dict[str, Any]]  # shape -> its config (TcpProxy or HCM)
    server_names: dict[tuple[str, int], Any]  # (name, port) -> TcpProxy
    default: Any | None  # the default chain's TcpProxy


def _read_listener(resources: Resources) -> _Listener:
    listener = _outbound_listener(resources)
    read = _Listener(None, {}, {}, None)
    generic = 0
    for i, chain in enumerate(listener.filter_chains):
        field = f"filter_chains[{i}]"
        config = _network_filter(chain, field)
        match = _chain_match(chain, field)
        is_hcm = isinstance(config, hcm_pb2.HttpConnectionManager)
        if is_hcm:
            if read.hcm is None:
                _check_hcm(config, field)
                read.hcm = config
            elif config.SerializeToString(deterministic=True) != read.hcm.SerializeToString(
                deterministic=True
            ):
                raise _fail(
                    "Listener",
                    OUTBOUND,
                    f"{field}.filters[0]",
                    "every chain's HttpConnectionManager must be the same config",
                )
        shape = _shape(match, is_hcm)
        if shape is None:
            raise _fail(
                "Listener",
                OUTBOUND,
                f"{field}.filter_chain_match",
                "this combination of fields is not supported (see the honoured fields: "
                "destination_port with prefix_ranges, application_protocols, transport_protocol "
                "tls, or server_names; a tcp_proxy for any destination is default_filter_chain)",
            )
        if shape == "http-any":
            generic += 1
        elif shape == "sni":
            assert match.port is not None
            for name in match.server_names:
                if (name, match.port) in read.server_names:
                    raise _fail(
                        "Listener",
                        OUTBOUND,
                        f"{field}.filter_chain_match.server_names",
                        f"{name}:{match.port} is matched by two chains",
                    )
                read.server_names[(name, match.port)] = config
        else:
            assert match.port is not None
            for address in match.addresses:
                found = read.by_destination.setdefault(Endpoint(address, match.port), {})
                if shape in found:
                    raise _fail(
                        "Listener",
                        OUTBOUND,
                        f"{field}.filter_chain_match",
                        f"{join_host_port(address, match.port)} is matched by two {shape} chains",
                    )
                found[shape] = config
    if read.hcm is None or generic != 1:
        raise _fail(
            "Listener",
            OUTBOUND,
            "filter_chains",
            "must hold exactly one HttpConnectionManager chain without a destination (HTTP/1.x "
            f"to anywhere else), got {generic}",
        )
    if listener.HasField("default_filter_chain"):
        config = _network_filter(listener.default_filter_chain, "default_filter_chain")
        if not isinstance(config, tcp_proxy_pb2.TcpProxy):
            raise _fail("Listener", OUTBOUND, "default_filter_chain", "must be a tcp_proxy")
        read.default = config
    return read


def _trace_sampling(hcm: Any) -> float:
    if not hcm.HasField("tracing"):
        return 0.0
    if not hcm.tracing.HasField("random_sampling"):
        return 1.0  # Envoy's default: 100%
    percent = float(hcm.tracing.random_sampling.value)
    if not 0.0 <= percent <= 100.0:
        raise _fail(
            "Listener",
            OUTBOUND,
            "filter_chains[0].filters[0].tracing.random_sampling",
            f"must be a percentage 0-100, got {percent}",
        )
    return percent / 100.0


def _route_configuration(resources: Resources, hcm: Any) -> Any:
    which = hcm.WhichOneof("route_specifier")
    if which == "route_config":
        return hcm.route_config
    if which == "rds":
        name = hcm.rds.route_config_name
        return _lookup(resources, ROUTE_TYPE, name, f'Listener "{OUTBOUND}" rds.route_config_name')
    raise _fail(
        "Listener",
        OUTBOUND,
        "filter_chains[0].filters[0].route_specifier",
        "must be rds or route_config",
    )


# -- routes ------------------------------------------------------------------------------------


def _retry_policy(
    policy: Any, budget: RetryBudget | None, where: tuple[str, str, str]
) -> RetryPolicy | None:
    kind, name, prefix = where
    field = f"{prefix}.retry_policy"
    conditions: set[str] = set()
    codes: frozenset[int] = frozenset()
    tokens = [t.strip() for t in policy.retry_on.split(",") if t.strip()]
    for token in tokens:
        if token in _HTTP_RETRY_ON or token in _GRPC_RETRY_ON:
            conditions.add(token)
        elif token == "retriable-status-codes":
            codes = frozenset(int(code) for code in policy.retriable_status_codes)
        else:
            supported = ", ".join(
                sorted(_HTTP_RETRY_ON | _GRPC_RETRY_ON | {"retriable-status-codes"})
            )
            raise _fail(
                kind,
                name,
                f"{field}.retry_on",
                f"{token!r} is not supported (supported: {supported})",
            )
    for code in codes:
        if not 100 <= code <= 599:
            raise _fail(
                kind, name, f"{field}.retriable_status_codes", f"{code} is not an HTTP status"
            )
    if len(policy.retriable_headers):
        raise _fail(kind, name, f"{field}.retriable_headers", "is not supported")
    if policy.HasField("rate_limited_retry_back_off"):
        raise _fail(kind, name, f"{field}.rate_limited_retry_back_off", "is not supported")
    attempts = int(policy.num_retries.value) if policy.HasField("num_retries") else 1
    if attempts == 0 or not (conditions or codes):
        return None
    per_try = None
    if policy.HasField("per_try_timeout"):
        per_try = _seconds(policy.per_try_timeout, kind, name, f"{field}.per_try_timeout") or None
    backoff = Backoff()
    if policy.HasField("retry_back_off"):
        back_off = policy.retry_back_off
        base = _seconds(back_off.base_interval, kind, name, f"{field}.retry_back_off.base_interval")
        if base <= 0:
            raise _fail(kind, name, f"{field}.retry_back_off.base_interval", "must be > 0")
        top = 10 * base
        if back_off.HasField("max_interval"):
            top = _seconds(
                back_off.max_interval, kind, name, f"{field}.retry_back_off.max_interval"
            )
        if top < base:
            raise _fail(
                kind, name, f"{field}.retry_back_off.max_interval", "must be >= base_interval"
            )
        backoff = Backoff(base=base, max=top)
    return RetryPolicy(
        attempts=attempts,
        retry_on=frozenset(conditions),
        retriable_status=codes,
        per_try_timeout=per_try,
        backoff=backoff,
        budget=budget,
        non_idempotent=_non_idempotent(policy, kind, name, field),
    )


def _non_idempotent(policy: Any, kind: str, name: str, field: str) -> bool:
    given = [m.SerializeToString(deterministic=True) for m in policy.retriable_request_headers]
    if not given:
        return True
    rule = [m.SerializeToString(deterministic=True) for m in idempotent_request_headers()]
    if sorted(given) == sorted(rule):
        return False
    raise _fail(
        kind,
        name,
        f"{field}.retriable_request_headers",
        f"only the idempotency rule is supported (`:method` exact {', '.join(IDEMPOTENT_METHODS)}, "
        "and `idempotency-key` present) or an empty list",
    )


def _only_route(config_name: str, index: int, vhost: Any) -> tuple[Any, str]:
    field = f"virtual_hosts[{index}].routes"
    if len(vhost.routes) != 1:
        raise _fail(
            "RouteConfiguration",
            config_name,
            field,
            f'must hold exactly one route (prefix "/"), got {len(vhost.routes)}',
        )
    route = vhost.routes[0]
    match = route.match
    if (
        match.WhichOneof("path_specifier") != "prefix"
        or match.prefix not in ("", "/")
        or len(match.headers)
        or len(match.query_parameters)
    ):
        raise _fail(
            "RouteConfiguration",
            config_name,
            f"{field}[0].match",
            'only prefix "/" without header or query matchers is supported',
        )
    return route, f"{field}[0]"


# -- clusters ----------------------------------------------------------------------------------


def _lb_policy(cluster: Any) -> LbPolicy:
    if cluster.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST:
        return LbPolicy.ROUND_ROBIN  # nothing to balance: CLUSTER_PROVIDED is the norm here
    if cluster.HasField("load_balancing_policy"):
        for policy in cluster.load_balancing_policy.policies:
            found = _LB_TYPES.get(policy.typed_extension_config.typed_config.type_url)
            if found is not None:
                return found
        raise _fail(
            "Cluster",
            cluster.name,
            "load_balancing_policy.policies",
            "none of round_robin, least_request, random is in the list",
        )
    lb = _LB_ENUM.get(cluster.lb_policy)
    if lb is None:
        enum_name = cluster_pb2.Cluster.LbPolicy.Name(cluster.lb_policy)
        raise _fail(
            "Cluster",
            cluster.name,
            "lb_policy",
            f"{enum_name} is not supported (ROUND_ROBIN, LEAST_REQUEST, RANDOM)",
        )
    return lb


def _http_options(cluster: Any) -> Any:
    """The Cluster's HttpProtocolOptions extension, or None."""
    packed = cluster.typed_extension_protocol_options.get(HTTP_PROTOCOL_OPTIONS)
    if packed is None:
        return None
    options = http_protocol_options_pb2.HttpProtocolOptions()
    if not packed.Unpack(options):
        field = f"typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS}]"
        raise _fail("Cluster", cluster.name, field, "is not an HttpProtocolOptions")
    return options


def _http2(cluster: Any) -> bool:
    """The endpoints speak HTTP/2: explicit_http_config.http2_protocol_options is set."""
    options = _http_options(cluster)
    return options is not None and options.explicit_http_config.HasField("http2_protocol_options")


def _idle_timeout(cluster: Any) -> float:
    options = _http_options(cluster)
    if options is not None:
        field = f"typed_extension_protocol_options[{HTTP_PROTOCOL_OPTIONS}]"
        common = options.common_http_protocol_options
        if common.HasField("idle_timeout"):
            return _seconds(
                common.idle_timeout,
                "Cluster",
                cluster.name,
                f"{field}.common_http_protocol_options.idle_timeout",
            )
    if cluster.common_http_protocol_options.HasField("idle_timeout"):
        return _seconds(
            cluster.common_http_protocol_options.idle_timeout,
            "Cluster",
            cluster.name,
            "common_http_protocol_options.idle_timeout",
        )
    return UPSTREAM_IDLE_TIMEOUT


def _thresholds(cluster: Any) -> tuple[int, int, RetryBudget | None]:
    for thresholds in cluster.circuit_breakers.thresholds:
        if thresholds.priority != base_pb2.RoutingPriority.DEFAULT:
            continue
        max_requests = ENVOY_DEFAULT_THRESHOLD
        if thresholds.HasField("max_requests"):
            max_requests = int(thresholds.max_requests.value)
        max_pending = ENVOY_DEFAULT_THRESHOLD
        if thresholds.HasField("max_pending_requests"):
            max_pending = int(thresholds.max_pending_requests.value)
        budget = None
        if thresholds.HasField("retry_budget"):
            raw = thresholds.retry_budget
            defaults = RetryBudget()
            percent = defaults.percent
            if raw.HasField("budget_percent"):
                percent = float(raw.budget_percent.value)
            if not 0.0 <= percent <= 100.0:
                raise _fail(
                    "Cluster",
                    cluster.name,
                    "circuit_breakers.thresholds.retry_budget.budget_percent",
                    f"must be 0-100, got {percent}",
                )
            concurrency = defaults.min_concurrency
            if raw.HasField("min_retry_concurrency"):
                concurrency = int(raw.min_retry_concurrency.value)
            budget = RetryBudget(percent=percent, min_concurrency=concurrency)
        return max_requests, max_pending, budget
    return ENVOY_DEFAULT_THRESHOLD, ENVOY_DEFAULT_THRESHOLD, None


def _breaker(cluster: Any) -> CircuitBreaker:
    max_requests, max_pending, _ = _thresholds(cluster)
    if not cluster.HasField("outlier_detection"):
        return CircuitBreaker(max_requests=max_requests, max_pending=max_pending)
    od = cluster.outlier_detection
    consecutive: int | None = ENVOY_DEFAULT_CONSECUTIVE_5XX
    if od.HasField("consecutive_5xx"):
        consecutive = int(od.consecutive_5xx.value)
    if consecutive == 0 or (
        od.HasField("enforcing_consecutive_5xx") and od.enforcing_consecutive_5xx.value == 0
    ):
        consecutive = None
    open_for = ENVOY_DEFAULT_EJECTION_TIME
    if od.HasField("base_ejection_time"):
        open_for = _seconds(
            od.base_ejection_time, "Cluster", cluster.name, "outlier_detection.base_ejection_time"
        )
    ejection = ENVOY_DEFAULT_MAX_EJECTION_PERCENT
    if od.HasField("max_ejection_percent"):
        ejection = int(od.max_ejection_percent.value)
    if ejection > 100:
        raise _fail(
            "Cluster",
            cluster.name,
            "outlier_detection.max_ejection_percent",
            f"must be 0-100, got {ejection}",
        )
    return CircuitBreaker(
        consecutive_failures=consecutive,
        open_for=open_for,
        max_ejection_percent=ejection,
        max_requests=max_requests,
        max_pending=max_pending,
    )


def _policy_origins(cluster: Any) -> tuple[tuple[str, str, str], ...]:
    """(key, value, origin) from the Cluster's outrigger.dev metadata; () when absent."""
    metadata = cluster.metadata.filter_metadata.get(POLICY_METADATA)
    if metadata is None or "policy" not in metadata.fields:
        return ()
    policy = metadata.fields["policy"].struct_value.fields
    out = []
    for key, entry in sorted(policy.items()):
        fields = entry.struct_value.fields
        value = fields["value"].string_value if "value" in fields else ""
        origin = fields["origin"].string_value if "origin" in fields else ""
        out.append((key, value, origin))
    return tuple(out)


def _endpoints(resources: Resources, cluster: Any) -> tuple[Endpoint, ...]:
    kind_name = cluster_pb2.Cluster.DiscoveryType.Name(cluster.type)
    if cluster.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST:
        return ()  # a headless service: each request keeps its own destination
    if cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS:
        service_name = cluster.eds_cluster_config.service_name or cluster.name
        assignment = _lookup(resources, ENDPOINT_TYPE, service_name, f'Cluster "{cluster.name}"')
        kind, name = "ClusterLoadAssignment", service_name
    elif cluster.type == cluster_pb2.Cluster.DiscoveryType.STATIC:
        assignment = cluster.load_assignment
        kind, name = "Cluster", cluster.name
    else:
        raise _fail(
            "Cluster",
            cluster.name,
            "type",
            f"{kind_name} is not supported for a service (EDS, STATIC or ORIGINAL_DST)",
        )
    localities = list(assignment.endpoints)
    if not localities:
        return ()
    lowest = min(int(locality.priority) for locality in localities)
    found: list[Endpoint] = []
    for i, locality in enumerate(localities):
        if locality.priority != lowest:
            continue
        for j, lb_endpoint in enumerate(locality.lb_endpoints):
            if lb_endpoint.health_status in _EXCLUDED_HEALTH:
                continue
            field = f"endpoints[{i}].lb_endpoints[{j}].endpoint.address.socket_address"
            if kind == "Cluster":
                field = f"load_assignment.{field}"
            socket = lb_endpoint.endpoint.address.socket_address
            if (
                not lb_endpoint.endpoint.address.HasField("socket_address")
                or not socket.address
                or socket.WhichOneof("port_specifier") != "port_value"
                or not 1 <= socket.port_value <= 65535
            ):
                raise _fail(kind, name, field, "needs an address and a port_value 1-65535")
            found.append(Endpoint(host=socket.address, port=int(socket.port_value)))
    return tuple(found)


def _connect_timeout(cluster: Any) -> float:
    if not cluster.HasField("connect_timeout"):
        return ENVOY_DEFAULT_CONNECT_TIMEOUT
    seconds = _seconds(cluster.connect_timeout, "Cluster", cluster.name, "connect_timeout")
    if seconds <= 0:
        raise _fail("Cluster", cluster.name, "connect_timeout", "must be > 0")
    return seconds


def _service(
    resources: Resources, cluster: Any, route_action: Any, where: tuple[str, str, str]
) -> ServiceConfig:
    kind, name, prefix = where
    timeout: float | None = ENVOY_DEFAULT_ROUTE_TIMEOUT
    if route_action.HasField("timeout"):
        timeout = _seconds(route_action.timeout, kind, name, f"{prefix}.timeout") or None
    connect_timeout = _connect_timeout(cluster)
    _, _, budget = _thresholds(cluster)
    retry = None
    if route_action.HasField("retry_policy"):
        retry = _retry_policy(route_action.retry_policy, budget, where)
    istio = _ISTIO_CLUSTER.fullmatch(cluster.name)
    return ServiceConfig(
        name=istio["name"] if istio else cluster.name,
        namespace=istio["namespace"] if istio else "",
        port=int(istio["port"]) if istio else 0,
        cluster=cluster.name,
        endpoints=_endpoints(resources, cluster),
        timeout=timeout,
        connect_timeout=connect_timeout,
        idle_timeout=_idle_timeout(cluster),
        http2=_http2(cluster),
        retry=retry,
        breaker=_breaker(cluster),
        lb=_lb_policy(cluster),
        original_destination=cluster.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST,
        policy_origins=_policy_origins(cluster),
    )


class _TcpTargets:
    """TcpTargets by tcp_proxy config, each Cluster read once."""

    def __init__(self, resources: Resources) -> None:
        self.resources = resources
        self.built: dict[bytes, TcpTarget] = {}

    def of(self, proxy: Any) -> TcpTarget:
        key = proxy.SerializeToString(deterministic=True)
        target = self.built.get(key)
        if target is None:
            target = self.built[key] = self._build(proxy)
        return target

    def _build(self, proxy: Any) -> TcpTarget:
        where = f"tcp_proxy {proxy.stat_prefix!r}"
        if proxy.WhichOneof("cluster_specifier") != "cluster":
            raise _fail(
                "Listener", OUTBOUND, f"{where}: cluster", "must name one cluster (no weighting)"
            )
        cluster = _lookup(
            self.resources, CLUSTER_TYPE, proxy.cluster, f'Listener "{OUTBOUND}" {where}'
        )
        idle = None
        if proxy.HasField("idle_timeout"):
            idle = _seconds(proxy.idle_timeout, "Listener", OUTBOUND, f"{where}: idle_timeout")
        istio = _ISTIO_CLUSTER.fullmatch(cluster.name)
        name = istio["name"] if istio else cluster.name
        if cluster.name == PASSTHROUGH_CLUSTER:
            name = "passthrough"
        return TcpTarget(
            name=name,
            cluster=cluster.name,
            endpoints=_endpoints(self.resources, cluster),
            connect_timeout=_connect_timeout(cluster),
            original_destination=cluster.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST,
            idle_timeout=idle,
        )


def _destination_chain(endpoint: Endpoint, found: dict[str, Any], targets: _TcpTargets) -> Chain:
    """One destination's chains as one decision (HONOURED_FIELDS lists the combinations)."""
    shapes = set(found)
    if shapes == {"http"}:
        return Chain(ChainProtocol.HTTP, None)
    if shapes == {"tcp"}:
        return Chain(ChainProtocol.TCP, targets.of(found["tcp"]))
    if shapes == {"tls"}:
        return Chain(ChainProtocol.TLS, targets.of(found["tls"]))
    if "http1" in shapes and shapes <= {"http1", "tcp"}:
        tcp = targets.of(found["tcp"]) if "tcp" in found else None
        return Chain(ChainProtocol.DETECT, tcp)
    raise _fail(
        "Listener",
        OUTBOUND,
        "filter_chains",
        f"{endpoint} is matched by {' and '.join(sorted(shapes))} chains, which the sidecar "
        "cannot combine (HTTP/1.x with or without TCP, or one of HTTP, TCP, TLS alone)",
    )


def _tcp_default(proxy: Any | None, targets: _TcpTargets) -> TcpTarget | None:
    """The default chain: passthrough (an ORIGINAL_DST cluster), or None: closed."""
    if proxy is None:
        return None  # Envoy closes a connection no chain matches
    target = targets.of(proxy)
    if target.original_destination:
        return target
    if not target.endpoints:
        return None  # BlackHoleCluster: registry_only
    raise _fail(
        "Listener",
        OUTBOUND,
        "default_filter_chain",
        f"must pass TCP to an ORIGINAL_DST cluster (allow_any) or to a cluster without endpoints "
        f'(registry_only), not to "{target.cluster}"',
    )


def _inbound_protocols(
    destinations: dict[Endpoint, Chain], routes: dict[bytes, ServiceConfig]
) -> dict[Endpoint, ChainProtocol]:
    """Each endpoint of a service with a declared protocol -> that protocol (first one wins)."""
    found: dict[Endpoint, ChainProtocol] = {}
    for destination, chain in destinations.items():
        if chain.protocol is ChainProtocol.DETECT:
            continue
        endpoints: tuple[Endpoint, ...] = ()
        if chain.tcp is not None:
            endpoints = chain.tcp.endpoints
        else:
            service = routes.get(str(destination).encode("ascii"))
            endpoints = service.endpoints if service is not None else ()
        for endpoint in endpoints:
            found.setdefault(endpoint, chain.protocol)
    return found


def _catch_all(resources: Resources, route: Any, config_name: str, field: str) -> OutboundPolicy:
    action = route.WhichOneof("action")
    if action == "direct_response":
        if route.direct_response.status != NO_ROUTE_STATUS:
            raise _fail(
                "RouteConfiguration",
                config_name,
                f"{field}.direct_response.status",
                f"only {NO_ROUTE_STATUS} (registry_only) is supported, "
                f"got {route.direct_response.status}",
            )
        return OutboundPolicy.REGISTRY_ONLY
    if action == "route" and route.route.WhichOneof("cluster_specifier") == "cluster":
        by = f'RouteConfiguration "{config_name}" {field}.route.cluster'
        cluster = _lookup(resources, CLUSTER_TYPE, route.route.cluster, by)
        if cluster.type == cluster_pb2.Cluster.DiscoveryType.ORIGINAL_DST:
            return OutboundPolicy.ALLOW_ANY
    raise _fail(
        "RouteConfiguration",
        config_name,
        field,
        'the "*" virtual host must route to an ORIGINAL_DST cluster (allow_any) '
        "or answer with direct_response 502 (registry_only)",
    )


# -- entry points ------------------------------------------------------------------------------


def _dump(resources: Resources) -> dict[str, dict[str, Any]]:
    dump: dict[str, dict[str, Any]] = {}
    for type_url in sorted(resources):
        dump[type_url] = {}
        for name in sorted(resources[type_url]):
            try:
                dump[type_url][name] = MessageToDict(
                    resources[type_url][name], preserving_proto_field_name=True
                )
            except TypeError as exc:  # an Any of a type this process does not know
                dump[type_url][name] = {"error": str(exc)}
    return dump


def build_snapshot(resources: Resources, version: str) -> Snapshot:
    """Interpret a complete set of xDS resources. Raises ConfigError naming what it can't apply."""
    listener = _read_listener(resources)
    hcm = listener.hcm
    sampling = _trace_sampling(hcm)
    config = _route_configuration(resources, hcm)
    config_name = config.name or OUTBOUND
    services: dict[str, ServiceConfig] = {}
    routes: dict[bytes, ServiceConfig] = {}
    # Envoy answers an unmatched host with 404 NR: the nearest meaning is registry_only.
    outbound_policy = OutboundPolicy.REGISTRY_ONLY
    seen_domains: set[str] = set()
    for i, vhost in enumerate(config.virtual_hosts):
        route, field = _only_route(config_name, i, vhost)
        domains = [d.lower() for d in vhost.domains]
        for domain in domains:
            if domain in seen_domains:
                raise _fail(
                    "RouteConfiguration",
                    config_name,
                    f"virtual_hosts[{i}].domains",
                    f"{domain!r} is in more than one virtual host",
                )
            seen_domains.add(domain)
        if "*" in domains:
            if len(domains) != 1:
                raise _fail(
                    "RouteConfiguration",
                    config_name,
                    f"virtual_hosts[{i}].domains",
                    'the catch-all "*" must be the virtual host\'s only domain',
                )
            outbound_policy = _catch_all(resources, route, config_name, field)
            continue
        for domain in domains:
            if "*" in domain or not domain.isascii():
                raise _fail(
                    "RouteConfiguration",
                    config_name,
                    f"virtual_hosts[{i}].domains",
                    f'{domain!r}: wildcards other than "*" alone are not supported',
                )
        if route.WhichOneof("action") != "route" or (
            route.route.WhichOneof("cluster_specifier") != "cluster"
        ):
            raise _fail(
                "RouteConfiguration",
                config_name,
                f"{field}.route.cluster",
                "a service's route must forward to one cluster",
            )
        by = f'RouteConfiguration "{config_name}" {field}.route.cluster'
        cluster = _lookup(resources, CLUSTER_TYPE, route.route.cluster, by)
        service = _service(
            resources, cluster, route.route, ("RouteConfiguration", config_name, f"{field}.route")
        )
        previous = services.get(cluster.name)
        if previous is not None and previous != service:
            raise _fail(
                "RouteConfiguration",
                config_name,
                f"{field}.route",
                f'routes to cluster "{cluster.name}" with a policy that differs from an earlier '
                "virtual host's",
            )
        services[cluster.name] = service
        for domain in domains:
            routes[domain.encode("ascii")] = service
    targets = _TcpTargets(resources)
    destinations = {
        endpoint: _destination_chain(endpoint, found, targets)
        for endpoint, found in listener.by_destination.items()
    }
    return Snapshot(
        version=version,
        services=services,
        routes=routes,
        outbound_policy=outbound_policy,
        trace_sampling=sampling,
        resources=_dump(resources),
        destinations=destinations,
        server_names={key: targets.of(proxy) for key, proxy in listener.server_names.items()},
        tcp_default=_tcp_default(listener.default, targets),
        inbound_protocols=_inbound_protocols(destinations, routes),
    )


def snapshot_from_mesh(mesh: Mesh, namespace: str = "default") -> Snapshot:
    """Standalone mode: one translation (for a sidecar in `namespace`), one interpretation."""
    resources = translate(mesh, namespace)
    return build_snapshot(resources, resources_version(resources))
