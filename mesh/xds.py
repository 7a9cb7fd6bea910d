"""The xDS vocabulary both sides share: type URLs, resource names, and the helpers that read them.

go-control-plane keeps every type URL and naming helper in one file that its server and its
clients import; this is that file for Outrigger. The control plane builds resources with these
names (`mesh.translate`), the sidecar reads them back (`sidecar.xds`), and neither spells a type
URL or a well-known resource name anywhere else.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any, Final, TypeAlias, cast

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

Message: TypeAlias = Any  # a protobuf message (xDS protos carry no type stubs)
Resources: TypeAlias = dict[str, dict[str, Message]]  # type URL -> resource name -> message

LISTENER_TYPE: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RESOURCE_TYPES: Final = (LISTENER_TYPE, ROUTE_TYPE, CLUSTER_TYPE, ENDPOINT_TYPE)
# Types whose empty resource_names subscribe to everything (the spec's wildcard types).
WILDCARD_TYPES: Final = (LISTENER_TYPE, CLUSTER_TYPE)
HCM_TYPE: Final = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TCP_PROXY_TYPE: Final = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
RESOURCE_WRAPPER_TYPE: Final = "type.googleapis.com/envoy.service.discovery.v3.Resource"

TYPE_NAMES: Final[dict[str, str]] = {
    LISTENER_TYPE: "Listener",
    ROUTE_TYPE: "RouteConfiguration",
    CLUSTER_TYPE: "Cluster",
    ENDPOINT_TYPE: "ClusterLoadAssignment",
}
MESSAGE_TYPES: Final[dict[str, Any]] = {
    LISTENER_TYPE: listener_pb2.Listener,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
    CLUSTER_TYPE: cluster_pb2.Cluster,
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
}

# Well-known resource and filter names.
OUTBOUND: Final = "outbound"  # the sidecars' Listener and RouteConfiguration
OUTBOUND_PORT: Final = 15001
PASSTHROUGH_CLUSTER: Final = "PassthroughCluster"
BLACKHOLE_CLUSTER: Final = "BlackHoleCluster"  # no endpoints: registry_only's TCP default
ALLOW_ANY_VHOST: Final = "allow_any"
BLOCK_ALL_VHOST: Final = "block_all"
NO_ROUTE_STATUS: Final = 502
NO_ROUTE_BODY: Final = "NR"
HCM_FILTER: Final = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER: Final = "envoy.filters.network.tcp_proxy"
# The outbound listener's filters that let Envoy match filter chains on what the sidecar reads
# itself: the original destination, the TLS server name and HTTP/1.x.
ORIGINAL_DST_FILTER: Final = "envoy.filters.listener.original_dst"
TLS_INSPECTOR_FILTER: Final = "envoy.filters.listener.tls_inspector"
HTTP_INSPECTOR_FILTER: Final = "envoy.filters.listener.http_inspector"
HTTP1_PROTOCOLS: Final = ("http/1.0", "http/1.1")  # http_inspector's application_protocols
TLS_TRANSPORT: Final = "tls"  # tls_inspector's transport_protocol
ROUTER_FILTER: Final = "envoy.filters.http.router"
HTTP_PROTOCOL_OPTIONS: Final = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
POLICY_METADATA: Final = "outrigger.dev"  # Cluster filter_metadata key: policy and origins
UPSTREAM_IDLE_TIMEOUT: Final = 60.0  # seconds; sidecar.config.ServiceConfig.idle_timeout's default


class ResourceError(ValueError):
    """A resource that cannot be decoded or is given twice; the message names it."""


def short_type(type_url: str) -> str:
    """`type.googleapis.com/envoy.config.listener.v3.Listener` -> `Listener` (metric labels)."""
    return type_url.rsplit(".", 1)[-1]


def resource_name(type_url: str, message: Message) -> str:
    """The xDS name of a resource (ClusterLoadAssignment is named by its cluster_name)."""
    return str(message.cluster_name if type_url == ENDPOINT_TYPE else message.name)


def hcm_of(listener: Message, *, api_listener: bool = True) -> Message | None:
    """The HttpConnectionManager of a listener: its api_listener (unless api_listener=False:
    those are for proxyless gRPC clients, not sidecars) or its first HCM filter."""
    candidates: list[Any] = []
    if api_listener and listener.HasField("api_listener"):
        candidates.append(listener.api_listener.api_listener)
    for chain in listener.filter_chains:
        candidates.extend(f.typed_config for f in chain.filters if f.HasField("typed_config"))
    for typed in candidates:
        if typed.type_url == HCM_TYPE:
            hcm = hcm_pb2.HttpConnectionManager()
            typed.Unpack(hcm)
            return hcm
    return None


def route_names_of(listener: Message, *, api_listener: bool = True) -> list[str]:
    """The RDS route configuration names a listener's HCM refers to."""
    hcm = hcm_of(listener, api_listener=api_listener)
    if hcm is None or not hcm.HasField("rds"):
        return []
    return [cast(str, hcm.rds.route_config_name)]


def tcp_proxies_of(listener: Message) -> list[Message]:
    """The TcpProxy configs of a listener's filter chains, its default chain's included."""
    chains = [*listener.filter_chains]
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    found: list[Message] = []
    for chain in chains:
        for item in chain.filters:
            if item.typed_config.type_url == TCP_PROXY_TYPE:
                proxy = tcp_proxy_pb2.TcpProxy()
                item.typed_config.Unpack(proxy)
                found.append(proxy)
    return found


def eds_name_of(cluster: Message) -> str | None:
    """The ClusterLoadAssignment name an EDS cluster needs (None: not an EDS cluster)."""
    if cluster.type != cluster_pb2.Cluster.EDS:
        return None
    service_name = cast(str, cluster.eds_cluster_config.service_name)
    return service_name or cast(str, cluster.name)


def resources_version(resources: Resources) -> str:
    """A short hash of the resources' deterministic serialization (same resources, same version)."""
    digest = hashlib.sha256()
    for type_url in sorted(resources):
        for name in sorted(resources[type_url]):
            body: bytes = resources[type_url][name].SerializeToString(deterministic=True)
            for part in (type_url.encode(), name.encode(), body):
                digest.update(len(part).to_bytes(8, "big"))
                digest.update(part)
    return digest.hexdigest()[:16]


def decode(type_url: str, packed: Iterable[Any]) -> dict[str, Message]:
    """The resources of one DiscoveryResponse, by name (ResourceError names what is wrong)."""
    message_type = MESSAGE_TYPES.get(type_url)
    if message_type is None:
        raise ResourceError(f"{type_url}: resource type not supported")
    out: dict[str, Message] = {}
    for item in packed:
        if item.type_url == RESOURCE_WRAPPER_TYPE:
            wrapper = discovery_pb2.Resource()
            if not item.Unpack(wrapper):
                raise ResourceError(f"{RESOURCE_WRAPPER_TYPE}: unreadable")
            item = wrapper.resource
        if item.type_url != type_url:
            raise ResourceError(f"a {type_url} response carries a {item.type_url}")
        message = message_type()
        try:
            message.ParseFromString(item.value)
        except Exception as exc:  # protobuf DecodeError
            raise ResourceError(f"{TYPE_NAMES[type_url]}: cannot decode: {exc}") from None
        name = resource_name(type_url, message)
        if name in out:
            raise ResourceError(f'{TYPE_NAMES[type_url]} "{name}": sent twice in one response')
        out[name] = message
    return out


def resources_from_any(packed: Iterable[Any]) -> Resources:
    """Unpack Any messages of mixed types (possibly wrapped in a discovery Resource)."""
    by_type: dict[str, list[Any]] = {}
    for item in packed:
        type_url = item.type_url
        if type_url == RESOURCE_WRAPPER_TYPE:
            wrapper = discovery_pb2.Resource()
            if not item.Unpack(wrapper):
                raise ResourceError(f"{RESOURCE_WRAPPER_TYPE}: unreadable")
            type_url = wrapper.resource.type_url
        by_type.setdefault(type_url, []).append(item)
    return {type_url: decode(type_url, items) for type_url, items in by_type.items()}


def pack_resources(resources: Resources) -> list[Any]:
    """The resources as Any messages, in a deterministic order (inverse of resources_from_any)."""
    packed: list[Any] = []
    for type_url in sorted(resources):
        for name in sorted(resources[type_url]):
            item = any_pb2.Any()
            item.Pack(resources[type_url][name], deterministic=True)
            packed.append(item)
    return packed
