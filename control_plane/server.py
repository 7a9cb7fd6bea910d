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
  clusters and endpoints before listeners and routes. LDS and CDS responses carry every
  resource; an RDS or EDS response need only carry the resources that changed (the xDS spec:
  a client keeps the named resources a response leaves out), so a stream that ACKed the version
  the change is counted from is sent just those: an endpoint change is one ClusterLoadAssignment
  per stream, not all of them. Any other stream gets its whole subscription.

Responses are assembled from the snapshot's pre-serialized resource bytes (see cache.py), so the
method is registered with a bytes-passthrough response serializer.

Requests and ended streams poke the `HeapTrimmer`, which gives the memory a burst of them
freed back to the operating system once they stop (see heap.py).

At most `max_streams` streams are served at once: the first request of one more is answered
with RESOURCE_EXHAUSTED and a message naming the limit, a refusal every xDS client (our
sidecar, Envoy, gRPC) backs off from and retries, perhaps on another replica. `server_options`
are the gRPC server settings that go with it (docs/architecture.md, "Control plane scale").
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
from control_plane.heap import HeapTrimmer
from control_plane.metrics import ControlPlaneMetrics
from mesh.xds import WILDCARD_TYPES, short_type

log = logging.getLogger("outrigger.control_plane.ads")

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
CONTROL_PLANE_ID = "outrigger"
NAME_SETS_KEPT = 1024
DEFAULT_MAX_STREAMS = 5000
REFUSAL_LOG_INTERVAL = 10.0  # seconds between two warnings about refused streams
REFUSAL_SETTLE_QUIET = 0.25  # a refused client has sent its requests once it is this quiet
REFUSAL_SETTLE_MAX = 2.0
BACKLOG_PER_STREAM = 4  # new calls grpc-core may queue, per stream allowed (a storm's worth)


def server_options(max_streams: int) -> list[tuple[str, int]]:
    """gRPC server settings for `max_streams` sidecars.

    - grpc-core queues new calls the application has not taken yet and, past 1,000 of them,
      drops them at random (all past 3,000): a reconnect storm (a replica restarted) then fails
      streams with a bare INTERNAL on the client. The queue may hold four times the streams
      allowed (the sidecars of this replica and of others that went away), so they wait their
      turn (the event loop takes thousands a second) and the limit that refuses is ours, with
      a message.
    - Keepalive both ways: sidecars ping every 30 s (allowed from 10 s), and the server pings
      idle connections every 60 s so the stream of a node that vanished without a FIN is freed
      in about 80 s instead of the kernel's two hours.
    """
    backlog = max(BACKLOG_PER_STREAM * max_streams, 1000)
    return [
        ("grpc.server.max_pending_requests", backlog),
        ("grpc.server.max_pending_requests_hard_limit", backlog),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


@dataclass(slots=True)
class TypeState:
    """One type on one stream."""

    names: frozenset[str] | None = None  # None: wildcard
    nonce_sent: str = ""
    version_sent: str = ""
    sent_key: str | None = None  # content key of what the client holds once it has it all
    basis: str = ""  # the type version whose content (for `names`) that is
    acked: bool = False  # the last response was ACKed (not NACKed, not unanswered)
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
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 (untyped in grpc's stubs)


def _is_nack(request: Any) -> bool:
    return bool(request.HasField("error_detail"))


class AdsServer:
    """StreamAggregatedResources over the snapshot cache; knows every open stream."""

    def __init__(
        self,
        cache: SnapshotCache,
        metrics: ControlPlaneMetrics,
        max_streams: int = DEFAULT_MAX_STREAMS,
        heap: HeapTrimmer | None = None,
    ) -> None:
        self.cache = cache
        self.metrics = metrics
        self.max_streams = max_streams
        self.heap = heap if heap is not None else HeapTrimmer()
        self.admitted = 0  # streams whose first request was accepted
        self._last_refusal_log = -REFUSAL_LOG_INTERVAL
        self.streams: dict[int, StreamState] = {}
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._name_sets: dict[frozenset[str], frozenset[str]] = {}

    def _intern(self, names: frozenset[str]) -> frozenset[str]:
        """One shared object per distinct subscription: thousands of sidecars naming the same
        resources hold one set, and the snapshots' selection memo finds it by identity."""
        found = self._name_sets.get(names)
        if found is None:
            if len(self._name_sets) >= NAME_SETS_KEPT:
                self._name_sets.clear()
            found = self._name_sets[names] = names
        return found

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
    ) -> None:
        """One ADS stream. Responses go out with `context.write`, and nothing of a request, a
        response or a snapshot is kept between two of them: an idle stream holds only its
        state (an async generator handler would keep its last response, often megabytes)."""
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
            # context.read(), not `request_iterator`: grpc.aio's iterator (and an `async for`
            # variable) keeps the last request alive while it waits for the next, and a
            # sidecar's EDS ACK names every cluster it uses (~80 KiB of protobuf at 1,000).
            try:
                while (request := await context.read()) is not _EOF:
                    queue.put_nowait(request)
                    request = None
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
                if isinstance(item, _Changed):
                    changed_pending = False
                    await self._push(stream, context)
                    continue
                if stream.node is None and self.admitted >= self.max_streams:
                    await self._refuse(item, stream.peer, queue, context)
                response = await self._on_request(stream, item, context)
                item = None
                self.heap.poke()
                if response is not None:
                    await context.write(response)
                    response = None
        finally:
            reader.cancel()
            unwatch()
            if stream.node is not None:
                self.admitted -= 1
                log.info("stream %d: node %s disconnected", stream.stream_id, stream.node_id)
            del self.streams[stream.stream_id]
            self.metrics.connected_proxies.dec()
            self.heap.poke()

    async def _push(
        self, stream: StreamState, context: grpc.aio.ServicerContext[Any, bytes]
    ) -> None:
        """The snapshot changed: send each subscribed type whose content changed, in order."""
        snapshot = self.cache.get(stream.namespace) if stream.node is not None else None
        if snapshot is None:
            return
        for type_url in PUSH_ORDER + tuple(t for t in stream.types if t not in PUSH_ORDER):
            ts = stream.types.get(type_url)
            if ts is not None:
                response = self._respond_if_changed(stream, type_url, ts, snapshot)
                if response is not None:
                    await context.write(response)

    async def _on_request(
        self, stream: StreamState, request: Any, context: grpc.aio.ServicerContext[Any, bytes]
    ) -> bytes | None:
        if stream.node is None:
            if not request.HasField("node") or not request.node.id:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, "the first request must carry node.id"
                )
            self.admitted += 1
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
            names = self._intern(frozenset(names_list))
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

    async def _refuse(
        self,
        request: Any,
        peer: str,
        queue: asyncio.Queue[Any],
        context: grpc.aio.ServicerContext[Any, bytes],
    ) -> None:
        """RESOURCE_EXHAUSTED, once the client has sent what it sends before it reads: a
        status that ends the call while the client still writes reaches it as a bare INTERNAL
        (grpc.aio), not as this refusal."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REFUSAL_SETTLE_MAX
        while loop.time() < deadline:
            try:
                async with asyncio.timeout(REFUSAL_SETTLE_QUIET):
                    item = await queue.get()
            except TimeoutError:
                break
            if isinstance(item, _Ended | BaseException):
                break
        node_id = request.node.id if request.HasField("node") else "?"
        self.metrics.refused_streams.inc()
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL:
            self._last_refusal_log = now
            log.warning(
                "refusing xDS streams (node %s from %s and others): %d streams served, the "
                "most --max-streams allows; outrigger_xds_refused_streams_total counts them",
                node_id, peer, self.admitted,
            )  # fmt: skip
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"this control plane serves {self.max_streams} xDS streams already (--max-streams); "
            "retry with backoff, or connect to another replica",
        )

    def _record_ack_or_nack(
        self, stream: StreamState, type_url: str, ts: TypeState, req: Any
    ) -> None:
        label = short_type(type_url)
        ts.last_update = time.time()
        if _is_nack(req):
            ts.last_nack = cast(str, req.error_detail.message) or f"code {req.error_detail.code}"
            ts.nacked_version = ts.version_sent
            ts.sent_at = None
            ts.acked = False
            self.metrics.nacks.labels(label).inc()
            log.warning("node %s NACKed %s version %s: %s", stream.node_id, label,
                        ts.version_sent, ts.last_nack)  # fmt: skip
            return
        ts.version_acked = cast(str, req.version_info)
        ts.acked = True
        if ts.sent_at is not None:
            self.metrics.push_latency.labels(label).observe(time.monotonic() - ts.sent_at)
            ts.sent_at = None

    def _respond_if_changed(
        self, stream: StreamState, type_url: str, ts: TypeState, snapshot: XdsSnapshot
    ) -> bytes | None:
        resources = snapshot.of(type_url)
        _, key = resources.select(ts.names)
        if key == ts.sent_key:
            ts.basis = resources.version  # nothing it holds changed
            return None
        only_changes = (
            ts.names is not None
            and ts.acked
            and resources.previous_version != ""
            and ts.basis == resources.previous_version
        )
        return self._respond(stream, type_url, ts, snapshot, only_changes=only_changes)

    def _respond(
        self,
        stream: StreamState,
        type_url: str,
        ts: TypeState,
        snapshot: XdsSnapshot,
        *,
        only_changes: bool = False,
    ) -> bytes:
        resources = snapshot.of(type_url)
        parts, key = resources.select(ts.names)
        if only_changes and ts.names is not None:
            parts = resources.changes(ts.names)
        nonce = str(next(self._nonces))
        head = discovery_pb2.DiscoveryResponse(
            version_info=resources.version, type_url=type_url, nonce=nonce
        ).SerializeToString()
        ts.nonce_sent = nonce
        ts.version_sent = resources.version
        ts.sent_key = key
        ts.basis = resources.version
        ts.acked = False
        ts.sent_at = time.monotonic()
        self.metrics.pushes.labels(short_type(type_url)).inc()
        return b"".join((cast(bytes, head), *parts))


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
