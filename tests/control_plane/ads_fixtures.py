"""Hand-built xDS resources and a raw ADS test client for protocol tests.

The protocol tests drive the server with exact DiscoveryRequests, so they build small resource
sets here instead of going through the mesh translation (tested end to end elsewhere).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, wrappers_pb2
from google.protobuf.message import Message
from google.rpc import status_pb2

from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009


def _any(message: Message) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _hcm(route_name: str) -> Any:
    router = hcm_pb2.HttpFilter(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=route_name,
        rds=hcm_pb2.Rds(
            route_config_name=route_name,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource()
            ),
        ),
        http_filters=[router],
    )


def outbound_listener(route_name: str = "outbound", port: int = 15001) -> Any:
    address = address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )
    hcm_filter = listener_components_pb2.Filter(
        name="envoy.filters.network.http_connection_manager", typed_config=_any(_hcm(route_name))
    )
    return listener_pb2.Listener(
        name="outbound",
        address=address,
        filter_chains=[listener_components_pb2.FilterChain(filters=[hcm_filter])],
    )


def api_listener(service: str) -> Any:
    listener = listener_pb2.Listener(name=service)
    listener.api_listener.api_listener.Pack(_hcm(service))
    return listener


def route_config(name: str, hosts: Mapping[str, str]) -> Any:
    """`hosts`: domain -> cluster."""
    return route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=domain,
                domains=[domain],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"),
                        route=route_components_pb2.RouteAction(cluster=cluster),
                    )
                ],
            )
            for domain, cluster in hosts.items()
        ],
    )


def eds_cluster(name: str, lb: int = cluster_pb2.Cluster.ROUND_ROBIN) -> Any:
    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS, lb_policy=lb)
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    cluster.connect_timeout.FromMilliseconds(1000)
    return cluster


def assignment(name: str, endpoints: Iterable[tuple[str, int]]) -> Any:
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=host, port_value=port)
                )
            )
        )
        for host, port in endpoints
    ]
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            # gRPC needs `locality` present and drops one without a weight.
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(),
                lb_endpoints=lb_endpoints,
                load_balancing_weight=wrappers_pb2.UInt32Value(value=1),
            )
        ],
    )


def mesh_resources(services: Mapping[str, Sequence[tuple[str, int]]]) -> dict[str, dict[str, Any]]:
    """The resource scheme of the translation, for `services` (name -> endpoints)."""
    listeners = {"outbound": outbound_listener()}
    routes = {"outbound": route_config("outbound", {s: s for s in services})}
    for service in services:
        listeners[service] = api_listener(service)
        routes[service] = route_config(service, {service: service})
    return {
        LISTENER_TYPE: listeners,
        ROUTE_TYPE: routes,
        CLUSTER_TYPE: {s: eds_cluster(s) for s in services},
        ENDPOINT_TYPE: {s: assignment(s, eps) for s, eps in services.items()},
    }


class AdsTestClient:
    """One raw ADS stream: exact requests out, responses in, every wait bounded."""

    def __init__(
        self,
        address: str,
        node_id: str = "test-node",
        service: str = "web",
        namespace: str = "default",
    ) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        method: Any = self.channel.stream_stream(
            ADS_METHOD,
            request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
        )
        self.call = method()
        self.node = base_pb2.Node(id=node_id, cluster=service, user_agent_name="test")
        self.node.metadata.update({"service": service, "namespace": namespace})
        self._sent_node = False

    async def send(
        self,
        type_url: str,
        names: Sequence[str] = (),
        *,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
        with_node: bool | None = None,
    ) -> None:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            response_nonce=nonce,
            version_info=version,
        )
        if with_node if with_node is not None else not self._sent_node:
            request.node.CopyFrom(self.node)
            self._sent_node = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        async with asyncio.timeout(2):
            await self.call.write(request)

    async def ack(self, response: Any) -> None:
        await self.send(
            response.type_url,
            self.names_of(response) if response.type_url in (ROUTE_TYPE, ENDPOINT_TYPE) else (),
            nonce=response.nonce,
            version=response.version_info,
        )

    async def recv(self, timeout: float = 3.0) -> Any:
        async with asyncio.timeout(timeout):
            response = await self.call.read()
        assert response is not _EOF, "the server closed the stream"
        return response

    @staticmethod
    def names_of(response: Any) -> list[str]:
        names = []
        for packed in response.resources:
            if packed.type_url == ENDPOINT_TYPE:
                message: Any = endpoint_pb2.ClusterLoadAssignment()
            elif packed.type_url == ROUTE_TYPE:
                message = route_pb2.RouteConfiguration()
            elif packed.type_url == CLUSTER_TYPE:
                message = cluster_pb2.Cluster()
            else:
                message = listener_pb2.Listener()
            packed.Unpack(message)
            names.append(message.cluster_name if packed.type_url == ENDPOINT_TYPE else message.name)
        return sorted(names)

    async def close(self) -> None:
        self.call.cancel()
        async with asyncio.timeout(2):
            await self.channel.close(None)
