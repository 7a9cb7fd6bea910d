"""The ADS transport (state of the world) and CSDS, over grpc.aio.

The transport owns what the snapshot cache does not: per stream, the node (sent on the first
request only), and per type the subscription, the nonce and version sent, the version ACKed
and the last NACK. The rules, from the xDS protocol spec:

- A request whose `response_nonce` is not the last nonce sent for its type is stale: ignored.
- A request carrying the last nonce is an ACK, or a NACK when `error_detail` is set. Neither is
  answered with a resend; only a change of `resource_names` (or of the snapshot) is.
- A request with no nonce (a new subscription, or a reconnecting client) is answered with the
  current state.
- Empty `resource_names` (or "*") subscribes to everything only for LDS and CDS; for RDS and
  EDS only the named resources are sent.
- When the snapshot changes, each subscribed type whose selected content changed is pushed,
  clusters and endpoints before listeners and routes.

Responses are assembled from the snapshot's pre-serialized resource bytes (see cache.py), so the
method is registered with a bytes-passthrough response serializer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from google.protobuf import any_pb2, struct_pb2, timestamp_pb2

from control_plane.cache import PUSH_ORDER, SnapshotCache, XdsSnapshot
from control_plane.metrics import ControlPlaneMetrics
from mesh.xds import WILDCARD_TYPES, short_type

log = logging.getLogger("outrigger.control_plane.ads")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CONTROL_PLANE_ID = "outrigger"


@dataclass(slots=True)
class TypeState:
    """One type on one stream."""

    names: frozenset[str] | None = None  # None: wildcard
    nonce_sent: str = ""
    version_sent: str = ""
    sent_key: tuple[str, ...] | None = None  # content key of the last response
    sent_at: float | None = None  # monotonic; cleared when ACKed or NACKed
    version_acked: str = ""
    last_nack: str = ""
    nacked_version: str = ""
    last_update: float = 0.0  # wall clock of the last ACK/NACK


@dataclass(slots=True)
class StreamState:
    stream_id: int
    peer: str
    node: Any = None  # envoy.config.core.v3.Node, from the first request
    types: dict[str, TypeState] = field(default_factory=dict)
    connected_at: float = field(default_factory=time.time)

    @property
    def node_id(self) -> str:
        return cast(str, self.node.id) if self.node is not None else ""

    @property
    def namespace(self) -> str:
        """The namespace the node's metadata names ("": none): it picks the snapshot."""
        if self.node is None or "namespace" not in self.node.metadata.fields:
            return ""
        return cast(str, self.node.metadata.fields["namespace"].string_value)

    @property
    def service(self) -> str:
        if self.node is None:
            return ""
        fields = self.node.metadata.fields
        if "service" in fields:
            return cast(str, fields["service"].string_value)
        return cast(str, self.node.cluster)

    def as_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "service": self.service,
            "namespace": self.namespace,
            "peer": self.peer,
            "user_agent": self.node.user_agent_name if self.node is not None else "",
            "connected_at": self.connected_at,
            "types": {
                type_url: {
                    "resource_names": None if ts.names is None else sorted(ts.names),
                    "version_sent": ts.version_sent,
                    "version_acked": ts.version_acked,
                    "nonce": ts.nonce_sent,
                    "last_nack": ts.last_nack,
                    "nacked_version": ts.nacked_version,
                }
                for type_url, ts in sorted(self.types.items())
            },
        }


class _Changed:
    """Queue marker: the snapshot changed."""


class _Ended:
    """Queue marker: the client half-closed the stream."""


_CHANGED = _Changed()
_ENDED = _Ended()


def _is_nack(request: Any) -> bool:
    return bool(request.HasField("error_detail"))


class AdsServer:
    """StreamAggregatedResources over the snapshot cache; knows every open stream."""

    def __init__(self, cache: SnapshotCache, metrics: ControlPlaneMetrics) -> None:
        self.cache = cache
        self.metrics = metrics
        self.streams: dict[int, StreamState] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        method = grpc.stream_stream_rpc_method_handler(
            self.stream_aggregated_resources,
            request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
            response_serializer=bytes,
        )
        return grpc.method_handlers_generic_handler(
            ADS_SERVICE, {"StreamAggregatedResources": method}
        )

    async def stream_aggregated_resources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, bytes]
    ) -> AsyncIterator[bytes]:
        stream = StreamState(stream_id=next(self._ids), peer=context.peer())
        # DiscoveryRequest (untyped protobuf), _CHANGED, _ENDED or the exception that broke it
        queue: asyncio.Queue[Any] = asyncio.Queue()
        changed_pending = False

        def on_change() -> None:
            nonlocal changed_pending
            if not changed_pending:
                changed_pending = True
                queue.put_nowait(_CHANGED)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
                queue.put_nowait(_ENDED)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the stream broke: hand it to the handler loop
                queue.put_nowait(exc)

        reader = asyncio.create_task(read())
        unwatch = self.cache.watch(on_change)
        self.streams[stream.stream_id] = stream
        self.metrics.connected_proxies.inc()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Ended):
                    return
                if isinstance(item, BaseException):
                    log.debug("stream %d from %s broke: %s", stream.stream_id, stream.peer, item)
                    return
                snapshot = self.cache.get(stream.namespace) if stream.node is not None else None
                if isinstance(item, _Changed):
                    changed_pending = False
                    if snapshot is not None:
                        for type_url in PUSH_ORDER + tuple(
                            t for t in stream.types if t not in PUSH_ORDER
                        ):
                            ts = stream.types.get(type_url)
                            if ts is not None:
                                response = self._respond_if_changed(stream, type_url, ts, snapshot)
                                if response is not None:
                                    yield response
                    continue
                response = await self._on_request(stream, item, context)
                if response is not None:
                    yield response
        finally:
            reader.cancel()
            unwatch()
            if stream.node is not None:
                log.info("stream %d: node %s disconnected", stream.stream_id, stream.node_id)
            del self.streams[stream.stream_id]
            self.metrics.connected_proxies.dec()

    async def _on_request(
        self, stream: StreamState, request: Any, context: grpc.aio.ServicerContext[Any, bytes]
    ) -> bytes | None:
        if stream.node is None:
            if not request.HasField("node") or not request.node.id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id"
                )
            stream.node = base_pb2.Node()
            stream.node.CopyFrom(request.node)
            log.info("stream %d: node %s connected from %s", stream.stream_id,
                     stream.node_id, stream.peer)  # fmt: skip
        type_url = cast(str, request.type_url)
        if not type_url:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ADS requests need a type_url")
        names_list = list(request.resource_names)
        if "*" in names_list or (not names_list and type_url in WILDCARD_TYPES):
            names: frozenset[str] | None = None
        else:
            names = frozenset(names_list)
        ts = stream.types.get(type_url)
        nonce = cast(str, request.response_nonce)
        snapshot = self.cache.get(stream.namespace)
        if ts is None or not nonce:
            # A new subscription, or a client that reconnected: answer with the current state.
            ts = ts if ts is not None else TypeState()
            stream.types[type_url] = ts
            ts.names = names
            if not nonce and request.version_info and not ts.version_acked:
                ts.version_acked = cast(str, request.version_info)
            return self._respond(stream, type_url, ts, snapshot) if snapshot is not None else None
        if nonce != ts.nonce_sent:
            log.debug("stream %d: %s stale nonce %s (sent %s) ignored", stream.stream_id,
                      short_type(type_url), nonce, ts.nonce_sent)  # fmt: skip
            return None
        self._record_ack_or_nack(stream, type_url, ts, request)
        if names != ts.names:
            ts.names = names
            return self._respond(stream, type_url, ts, snapshot) if snapshot is not None else None
        return None

    def _record_ack_or_nack(
        self, stream: StreamState, type_url: str, ts: TypeState, req: Any
    ) -> None:
        label = short_type(type_url)
        ts.last_update = time.time()
        if _is_nack(req):
            ts.last_nack = cast(str, req.error_detail.message) or f"code {req.error_detail.code}"
            ts.nacked_version = ts.version_sent
            ts.sent_at = None
            self.metrics.nacks.labels(label).inc()
            log.warning("node %s NACKed %s version %s: %s", stream.node_id, label,
                        ts.version_sent, ts.last_nack)  # fmt: skip
            return
        ts.version_acked = cast(str, req.version_info)
        if ts.sent_at is not None:
            self.metrics.push_latency.labels(label).observe(time.monotonic() - ts.sent_at)
            ts.sent_at = None

    def _respond_if_changed(
        self, stream: StreamState, type_url: str, ts: TypeState, snapshot: XdsSnapshot
    ) -> bytes | None:
        _, key = snapshot.of(type_url).select(ts.names)
        if key == ts.sent_key:
            return None
        return self._respond(stream, type_url, ts, snapshot)

    def _respond(
        self, stream: StreamState, type_url: str, ts: TypeState, snapshot: XdsSnapshot
    ) -> bytes:
        resources = snapshot.of(type_url)
        body, key = resources.select(ts.names)
        nonce = str(next(self._nonces))
        head = discovery_pb2.DiscoveryResponse(
            version_info=resources.version, type_url=type_url, nonce=nonce
        ).SerializeToString()
        ts.nonce_sent = nonce
        ts.version_sent = resources.version
        ts.sent_key = key
        ts.sent_at = time.monotonic()
        self.metrics.pushes.labels(short_type(type_url)).inc()
        return cast(bytes, head) + body


class CsdsServer(csds_pb2_grpc.ClientStatusDiscoveryServiceServicer):  # type: ignore[misc]
    """FetchClientStatus: what each connected node was sent, ACKed and NACKed, per type.

    Each type is one GenericXdsConfig with an empty name: `version_info` is the version ACKed,
    `config_status` SYNCED (ACKed what was sent), STALE (sent, not ACKed yet), ERROR (NACKed),
    `error_state` the last NACK, and `xds_config` a Struct with `version_sent` and
    `resource_names` (absent for a wildcard subscription). Node matchers on `node_id`
    (exact or prefix) filter the nodes.
    """

    def __init__(self, ads: AdsServer) -> None:
        self.ads = ads

    async def FetchClientStatus(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        response = csds_pb2.ClientStatusResponse()
        for stream in list(self.ads.streams.values()):
            if stream.node is None or not _matches(stream, request.node_matchers):
                continue
            config = response.config.add()
            config.node.CopyFrom(stream.node)
            for type_url, ts in sorted(stream.types.items()):
                config.generic_xds_configs.append(_generic_config(type_url, ts))
        return response

    async def StreamClientStatus(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "use FetchClientStatus")


def _matches(stream: StreamState, matchers: Any) -> bool:
    for matcher in matchers:
        if not matcher.HasField("node_id"):
            continue
        m = matcher.node_id
        if m.HasField("exact") and stream.node_id != m.exact:
            return False
        if m.HasField("prefix") and not stream.node_id.startswith(m.prefix):
            return False
    return True


def _generic_config(type_url: str, ts: TypeState) -> Any:
    extra = struct_pb2.Struct()
    extra.update({"version_sent": ts.version_sent})
    if ts.names is not None:
        extra.update({"resource_names": sorted(ts.names)})
    packed = any_pb2.Any()
    packed.Pack(extra)
    config = csds_pb2.ClientConfig.GenericXdsConfig(
        type_url=type_url, version_info=ts.version_acked, xds_config=packed
    )
    if ts.last_update:
        config.last_updated.CopyFrom(_timestamp(ts.last_update))
    if ts.last_nack and ts.nacked_version == ts.version_sent:
        config.config_status = csds_pb2.ERROR
    elif ts.version_sent and ts.version_sent == ts.version_acked:
        config.config_status = csds_pb2.SYNCED
    elif ts.version_sent:
        config.config_status = csds_pb2.STALE
    else:
        config.config_status = csds_pb2.NOT_SENT
    if ts.last_nack:
        config.error_state.details = ts.last_nack
        config.error_state.version_info = ts.nacked_version
    return config


def _timestamp(seconds: float) -> Any:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def syncz(ads: AdsServer, instance: str) -> list[dict[str, Any]]:
    """The `/debug/syncz` body: every node connected to this replica (`instance`, its pod's
    name) and its per-type sync state. Other replicas hold the other nodes: `outrigger status`
    asks them all."""
    return [
        {**s.as_json(), "control_plane": instance}
        for s in ads.streams.values()
        if s.node is not None
    ]


def version_summary(snapshot: XdsSnapshot | None) -> Mapping[str, str]:
    if snapshot is None:
        return {}
    return {short_type(t): r.version for t, r in snapshot.types.items()}
