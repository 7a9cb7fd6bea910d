"""The sidecar's xDS client: one ADS stream (state of the world) to the control plane.

It subscribes to every Listener and Cluster (wildcard), to the RouteConfigurations its own
listeners' HTTP connection managers name (listeners with filter chains; api_listeners are for
proxyless gRPC clients), and to the ClusterLoadAssignments of the EDS clusters. Responses are
held as pending until the set is complete (every route configuration and assignment it asked
for has been answered); then `sidecar.xds.interpret.build_snapshot` builds one Snapshot from the
accepted resources overlaid with the pending ones, and `apply` installs it atomically.

- Success: every pending type is ACKed with its version, and the resources are written to
  `snapshot_cache` (atomically) for the next start.
- ConfigError from build_snapshot or apply: every pending type is NACKed (the last good version
  and a google.rpc.Status naming the problem) and the previous snapshot stays.

A named resource (RDS, EDS) asked for is awaited until a response carries it: a response to a
named type that lacks one may be a push that crossed the request (the server ignores a request
whose nonce is stale), so the client says its names again with the new nonce. A resource still
not sent after `does_not_exist_timeout` is taken as absent (gRPC's does-not-exist timer) and the
set is committed, or NACKed if it is not consistent without it.

The stream is reopened after any failure with capped full-jitter backoff
(`uniform(0, min(backoff_max, backoff_base * 2**attempt))`); a reopened stream resubscribes
with the versions it holds, and the server answers with the current state (resync).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from mesh.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    MESSAGE_TYPES,
    ROUTE_TYPE,
    WILDCARD_TYPES,
    Message,
    ResourceError,
    Resources,
    decode,
    eds_name_of,
    resource_name,
    route_names_of,
)
from sidecar.config import ConfigError, Snapshot

log = logging.getLogger("outrigger.sidecar.xds.client")

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
USER_AGENT = "outrigger"
_EOF: Any = getattr(grpc.aio, "EOF")  # noqa: B009 (not in grpc-stubs)

NAMED_TYPES = (ROUTE_TYPE, ENDPOINT_TYPE)

# Keepalive finds a dead control plane on an idle stream (the server permits these pings).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
DOES_NOT_EXIST_TIMEOUT = 15.0  # gRPC's xDS client uses 15 s too


def route_names(listeners: Iterable[Any]) -> set[str]:
    """RDS names named by the HTTP connection managers in the listeners' filter chains (the
    api_listeners are for proxyless gRPC clients)."""
    return {name for listener in listeners for name in route_names_of(listener, api_listener=False)}


def eds_names(clusters: Iterable[Any]) -> set[str]:
    """ClusterLoadAssignment names the EDS clusters need."""
    return {name for name in map(eds_name_of, clusters) if name is not None}


def snapshot_version(type_versions: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for type_url in sorted(type_versions):
        h.update(f"{type_url}={type_versions[type_url]}\n".encode())
    return h.hexdigest()[:16]


def _build(resources: Resources, version: str) -> Snapshot:
    from sidecar.xds.interpret import build_snapshot

    return build_snapshot(resources, version)


@dataclass(slots=True)
class _TypeState:
    """One type on the current stream."""

    names: frozenset[str] | None = None  # None: wildcard
    nonce: str = ""  # of the last response received
    awaiting: bool = True  # subscribed, not answered yet
    missing: frozenset[str] = frozenset()  # named: asked for, in no response since
    missing_since: float = 0.0  # loop time the oldest missing name was asked for
    pending: dict[str, Message] | None = None
    pending_version: str = ""


@dataclass(slots=True)
class _Stream:
    types: dict[str, _TypeState] = field(default_factory=dict)
    got_response: bool = False


class XdsClient:
    def __init__(
        self,
        address: str,
        *,
        node_id: str,
        service: str,
        namespace: str,
        apply: Callable[[Snapshot], None],
        snapshot_cache: Path | None = None,
        backoff_base: float = 0.25,
        backoff_max: float = 10.0,
        does_not_exist_timeout: float = DOES_NOT_EXIST_TIMEOUT,
    ) -> None:
        self.address = address
        self.node = base_pb2.Node(id=node_id, cluster=service, user_agent_name=USER_AGENT)
        self.node.metadata.update({"service": service, "namespace": namespace})
        self.apply = apply
        self.snapshot_cache = snapshot_cache
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.does_not_exist_timeout = does_not_exist_timeout
        self.ready = asyncio.Event()
        self.snapshot: Snapshot | None = None
        self.last_error = ""  # the last ConfigError NACKed
        self.connected = False
        self._accepted: Resources = {t: {} for t in MESSAGE_TYPES}
        self._versions: dict[str, str] = {}  # type url -> version accepted

    # -- the cache file -----------------------------------------------------------------

    def load_cached(self) -> Snapshot | None:
        """The last good snapshot from `snapshot_cache`, or None (missing or unusable)."""
        loaded = self._read_cache()
        return loaded[0] if loaded is not None else None

    def _read_cache(self) -> tuple[Snapshot, Resources, dict[str, str]] | None:
        if self.snapshot_cache is None:
            return None
        try:
            doc = json.loads(self.snapshot_cache.read_text())
            versions = {str(k): str(v) for k, v in doc["type_versions"].items()}
            resources: Resources = {t: {} for t in MESSAGE_TYPES}
            for type_url, entries in doc["resources"].items():
                for encoded in entries.values():
                    message = MESSAGE_TYPES[type_url]()
                    message.ParseFromString(base64.b64decode(encoded))
                    resources[type_url][resource_name(type_url, message)] = message
            return _build(resources, str(doc["version"])), resources, versions
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, DecodeError, ConfigError) as exc:
            log.warning("snapshot cache %s unusable: %s", self.snapshot_cache, exc)
            return None

    def _write_cache(self, version: str) -> None:
        if self.snapshot_cache is None:
            return
        doc = {
            "version": version,
            "type_versions": self._versions,
            "resources": {
                t: {n: base64.b64encode(m.SerializeToString()).decode() for n, m in res.items()}
                for t, res in self._accepted.items()
            },
        }
        path = self.snapshot_cache
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(doc, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                os.unlink(tmp)
                raise
        except OSError as exc:
            log.warning("cannot write snapshot cache %s: %s", path, exc)

    # -- the stream -----------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe, apply, ACK/NACK; reconnect with backoff. Runs until cancelled."""
        if self.snapshot is None:
            loaded = await asyncio.to_thread(self._read_cache)
            if loaded is not None:
                snapshot, resources, versions = loaded
                try:
                    self.apply(snapshot)
                except ConfigError as exc:  # e.g. written by another version: not fatal
                    log.warning("snapshot cache %s unusable: %s", self.snapshot_cache, exc)
                else:
                    self.snapshot = snapshot
                    self._accepted, self._versions = resources, versions
                    self.ready.set()
                    log.info("applied cached snapshot %s", snapshot.version)
        attempt = 0
        while True:
            stream = _Stream()
            try:
                await self._run_stream(stream)
                log.warning("control plane %s closed the xDS stream", self.address)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "xDS stream to %s failed: %s %s", self.address, exc.code().name, exc.details()
                )
            except asyncio.InvalidStateError:  # a write raced the end of the call
                log.warning("xDS stream to %s ended while writing", self.address)
            finally:
                self.connected = False
            if stream.got_response:
                attempt = 0
            delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))
            attempt += 1
            await asyncio.sleep(delay)

    async def _run_stream(self, stream: _Stream) -> None:
        async with grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS) as channel:
            # grpc-stubs predates grpc.aio's streaming call objects: typed as Any here.
            method: Any = channel.stream_stream(
                ADS_METHOD,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            call = method()
            first = True
            for type_url in WILDCARD_TYPES:
                stream.types[type_url] = _TypeState(names=None)
            for type_url in NAMED_TYPES:
                if self._accepted[type_url]:  # resubscribe what we hold
                    stream.types[type_url] = _TypeState(names=frozenset(self._accepted[type_url]))
            for type_url, ts in stream.types.items():
                request = self._request(type_url, ts)
                if first:
                    request.node.CopyFrom(self.node)
                    first = False
                await call.write(request)
            self.connected = True
            read: asyncio.Future[Any] | None = None
            try:
                while True:
                    if read is None:
                        read = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait({read}, timeout=self._missing_timeout(stream))
                    if not done:  # a named resource was never sent: take it as absent
                        for request in await self._expire_missing(stream):
                            await call.write(request)
                        continue
                    response, read = read.result(), None
                    if response is _EOF:
                        return
                    stream.got_response = True
                    for request in await self._on_response(stream, response):
                        await call.write(request)
            finally:
                if read is not None and not read.cancel() and not read.cancelled():
                    read.exception()  # retrieved: not logged as "never retrieved"

    def _request(
        self, type_url: str, ts: _TypeState, error: str | None = None, version: str | None = None
    ) -> Any:
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=version if version is not None else self._versions.get(type_url, ""),
            response_nonce=ts.nonce,
            resource_names=sorted(ts.names) if ts.names is not None else [],
        )
        if error is not None:
            request.error_detail.CopyFrom(
                status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=error)
            )
        return request

    def _view(self, stream: _Stream, type_url: str) -> dict[str, Message]:
        ts = stream.types.get(type_url)
        if ts is not None and ts.pending is not None:
            return ts.pending
        return self._accepted[type_url]

    async def _on_response(self, stream: _Stream, response: Any) -> list[Any]:
        type_url = cast(str, response.type_url)
        ts = stream.types.get(type_url)
        if ts is None or type_url not in MESSAGE_TYPES:
            log.warning("ignoring a response for unsubscribed type %s", type_url)
            return []
        ts.nonce = response.nonce
        ts.awaiting = False
        try:
            decoded = self._decode(type_url, response.resources)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.warning("NACK %s version %s: %s", type_url, response.version_info, exc)
            return [self._request(type_url, ts, error=str(exc))]
        if ts.names is not None:  # named subscription: keep what was not re-sent
            ts.missing = ts.missing - decoded.keys()
            merged = {n: m for n, m in self._view(stream, type_url).items() if n in ts.names}
            merged.update((n, m) for n, m in decoded.items() if n in ts.names)
            decoded = merged
        ts.pending = decoded
        ts.pending_version = response.version_info
        requests = self._resubscribe(stream)
        if ts.missing and not any(r.type_url == type_url for r in requests):
            # Maybe a push that crossed our request for them: ask again with this nonce.
            ts.awaiting = True
            requests.append(self._request(type_url, ts))
        if any(t.awaiting for t in stream.types.values()):
            return requests  # ACK once the set is complete
        return requests + await self._commit(stream)

    def _decode(self, type_url: str, resources: Iterable[Any]) -> dict[str, Message]:
        try:
            return decode(type_url, resources)
        except ResourceError as exc:
            raise ConfigError(str(exc)) from None

    def _resubscribe(self, stream: _Stream) -> list[Any]:
        """Follow the listeners to their routes and the clusters to their endpoints."""
        wanted = {
            ROUTE_TYPE: route_names(self._view(stream, LISTENER_TYPE).values()),
            ENDPOINT_TYPE: eds_names(self._view(stream, CLUSTER_TYPE).values()),
        }
        requests = []
        for type_url, names in wanted.items():
            ts = stream.types.get(type_url)
            if ts is None:
                if not names:
                    continue
                ts = stream.types[type_url] = _TypeState(names=frozenset())
            elif ts.names == frozenset(names):
                continue
            added = frozenset(names) - (ts.names or frozenset())
            if added and not ts.missing:
                ts.missing_since = asyncio.get_running_loop().time()
            ts.missing = (ts.missing | added) & names
            ts.names = frozenset(names)
            ts.awaiting = True
            requests.append(self._request(type_url, ts))
        return requests

    def _missing_timeout(self, stream: _Stream) -> float | None:
        """Seconds until the oldest missing named resource is taken as absent (None: none)."""
        since = [ts.missing_since for ts in stream.types.values() if ts.missing]
        if not since:
            return None
        now = asyncio.get_running_loop().time()
        return max(0.0, min(since) + self.does_not_exist_timeout - now)

    async def _expire_missing(self, stream: _Stream) -> list[Any]:
        now = asyncio.get_running_loop().time()
        for type_url, ts in stream.types.items():
            if ts.missing and now - ts.missing_since >= self.does_not_exist_timeout:
                log.warning("control plane %s did not send %s %s within %gs: taken as absent",
                            self.address, type_url, sorted(ts.missing),
                            self.does_not_exist_timeout)  # fmt: skip
                ts.missing = frozenset()
                ts.awaiting = False
        if any(t.awaiting for t in stream.types.values()):
            return []
        return await self._commit(stream)

    async def _commit(self, stream: _Stream) -> list[Any]:
        pending = {t: ts for t, ts in stream.types.items() if ts.pending is not None}
        if not pending:
            return []
        resources: Resources = {t: dict(self._view(stream, t)) for t in MESSAGE_TYPES}
        versions = dict(self._versions)
        versions.update((t, ts.pending_version) for t, ts in pending.items())
        version = snapshot_version(versions)
        try:
            if self.snapshot is None or self.snapshot.version != version:
                snapshot = _build(resources, version)
                self.apply(snapshot)
                self.snapshot = snapshot
                log.info("applied snapshot %s", version)
        except ConfigError as exc:
            self.last_error = str(exc)
            log.warning("NACK version %s: %s", version, exc)
            requests = [self._request(t, ts, error=str(exc)) for t, ts in pending.items()]
            for ts in pending.values():
                ts.pending = None
            return requests
        requests = []
        for type_url, ts in pending.items():
            self._accepted[type_url] = cast(dict[str, Message], ts.pending)
            self._versions[type_url] = ts.pending_version
            ts.pending = None
            requests.append(self._request(type_url, ts))
        await asyncio.to_thread(self._write_cache, version)
        self.ready.set()
        return requests
