"""The sidecar's runtime configuration: what it builds from a snapshot of xDS resources.

Every value here comes from a standard xDS field (see the README's table of honoured fields);
`sidecar.xds.interpret.build_snapshot` is the only constructor used outside tests. Objects are
frozen and shared by every request that started on the same snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

from mesh.address import split_host_port
from mesh.policy import Backoff, CircuitBreaker, RetryBudget  # the mesh policy's: one of each


class LbPolicy(StrEnum):
    ROUND_ROBIN = "round_robin"
    LEAST_REQUEST = "least_request"
    RANDOM = "random"


class OutboundPolicy(StrEnum):
    ALLOW_ANY = "allow_any"
    REGISTRY_ONLY = "registry_only"


class Endpoint(NamedTuple):
    """An upstream's host and port. A named tuple rather than a frozen dataclass: the pools (and
    the breaker's and balancer's tables) look endpoints up on every request, and a tuple hashes
    in C where a dataclass runs a Python `__hash__` (issue 18, plain-row profile)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def authority_endpoint(authority: bytes) -> Endpoint | None:
    """host[:port] of an authority the codec validated (port 80 when absent); None: no host."""
    host, port = split_host_port(authority.decode("ascii")) or ("", None)
    if not host:
        return None
    return Endpoint(host, 80 if port is None else port)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # retries after the first try
    retry_on: frozenset[str]  # connect-failure, reset, gateway-error, 5xx, retriable-4xx
    retriable_status: frozenset[int]  # explicit codes, e.g. {503}
    per_try_timeout: float | None = None
    backoff: Backoff = field(default_factory=Backoff)
    budget: RetryBudget | None = None
    non_idempotent: bool = False  # retry POST/PATCH without an Idempotency-Key


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    namespace: str
    port: int
    cluster: str  # xDS cluster name
    endpoints: tuple[Endpoint, ...]
    timeout: float | None = None  # total, bounds every attempt
    connect_timeout: float = 1.0
    idle_timeout: float = 60.0  # pooled upstream connections
    retry: RetryPolicy | None = None
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    lb: LbPolicy = LbPolicy.ROUND_ROBIN
    # An ORIGINAL_DST cluster (a headless service): each request goes to the destination the
    # caller chose (its authority), with this policy, no balancing and no endpoint list.
    original_destination: bool = False
    # The upstream speaks HTTP/2 (h2c): the Cluster's HTTP/2 protocol options (`protocol:
    # http2|grpc`); requests go out on multiplexed connections (sidecar/transport/h2upstream.py).
    http2: bool = False
    # From the Cluster's metadata: (policy key, effective value, origin), for /config_dump.
    policy_origins: tuple[tuple[str, str, str], ...] = ()


class ChainProtocol(StrEnum):
    """How an intercepted connection to a destination is read (from the listener's chains)."""

    DETECT = "detect"  # the first bytes decide: HTTP/1.x takes the routes, the rest is TCP
    HTTP = "http"  # always HTTP (a declared http port)
    TCP = "tcp"  # always passed through, nothing read first (a declared tcp port)
    TLS = "tls"  # passed through once its ClientHello is read (the SNI); not TLS: the default


@dataclass(frozen=True, slots=True)
class TcpTarget:
    """Where a passed-through connection goes: a tcp_proxy's Cluster."""

    name: str  # the service, for metrics and logs ("passthrough" for PassthroughCluster)
    cluster: str
    endpoints: tuple[Endpoint, ...]  # round robin, one connect attempt
    connect_timeout: float = 5.0
    # ORIGINAL_DST (passthrough, a headless service): the connection's own destination
    original_destination: bool = False
    idle_timeout: float | None = None  # tcp_proxy idle_timeout; None: --tcp-idle-timeout; 0: off


@dataclass(frozen=True, slots=True)
class Chain:
    """What the outbound listener does with a connection to one destination address and port."""

    protocol: ChainProtocol
    tcp: TcpTarget | None  # where what is not HTTP goes; None: the listener's default


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: str
    services: dict[str, ServiceConfig]  # by cluster name
    # authority (lowercase ASCII bytes, with and without ":port") -> service
    routes: dict[bytes, ServiceConfig]
    outbound_policy: OutboundPolicy = OutboundPolicy.ALLOW_ANY
    trace_sampling: float = 0.01  # fraction 0..1
    # the xDS resources it was built from, as JSON-able dicts, for /config_dump
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Intercepted connections, by original destination: virtual addresses (a ClusterIP) and a
    # headless service's pods. Destinations not listed: first bytes decide, then `tcp_default`.
    destinations: dict[Endpoint, Chain] = field(default_factory=dict)
    # (TLS server name, port) -> target, for TLS to a destination not listed above
    server_names: dict[tuple[str, int], TcpTarget] = field(default_factory=dict)
    # Anything else that is not HTTP: passed through to its original destination (allow_any),
    # or None: closed and counted (registry_only, flag NR).
    tcp_default: TcpTarget | None = None
    # A service's endpoint -> its declared protocol, for the inbound listener of the pod behind it
    inbound_protocols: dict[Endpoint, ChainProtocol] = field(default_factory=dict)

    def route(self, authority: bytes) -> ServiceConfig | None:
        return self.routes.get(authority)


class ConfigError(Exception):
    """A snapshot the sidecar cannot apply; the message names the resource and field."""
