"""The snapshot cache: immutable, versioned, consistent sets of xDS resources (go-control-plane).

A `XdsSnapshot` is built once per configuration change by `make_snapshot`, which refuses an
inconsistent set (a route to a missing cluster, an EDS cluster without a ClusterLoadAssignment,
a listener naming a missing route configuration) with a `SnapshotError`. Building it serializes
every resource exactly once: each resource is kept as the bytes of one `resources` entry of a
DiscoveryResponse (field 2, an `Any`), so the ADS transport answers any number of streams by
joining bytes, never by re-serializing messages.

Versions are content hashes: a type's version changes exactly when one of its resources does,
so a stream is pushed only the types whose content changed, and two control planes given the
same configuration compute the same versions.

RouteConfigurations depend on the sidecar's namespace (the bare service name reaches only its
own namespace's service), so the cache holds one snapshot per namespace that has services and a
default for every other node; a stream is served the snapshot of the namespace its node's
metadata names. `make_snapshots` encodes a type's resources once when every namespace shares
them (the Clusters and ClusterLoadAssignments), so their versions are identical everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mesh.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Resources,
    eds_name_of,
    resource_name,
    route_names_of,
    tcp_proxies_of,
)

# Make-before-break order for pushes (the xDS spec's ADS ordering): clusters and their
# endpoints before the listeners and routes that point at them.
PUSH_ORDER: tuple[str, ...] = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)


class SnapshotError(Exception):
    """A set of resources that is not consistent; the message names the resource."""


@dataclass(frozen=True, slots=True)
class TypeResources:
    """One type's resources in a snapshot, serialized once."""

    version: str
    messages: Mapping[str, Message]
    encoded: Mapping[str, bytes]  # name -> DiscoveryResponse `resources` field bytes
    digests: Mapping[str, str]  # name -> content hash
    all_encoded: bytes  # every resource, in name order: the wildcard answer

    def select(self, names: frozenset[str] | None) -> tuple[bytes, tuple[str, ...]]:
        """The resources field bytes for a subscription (None: wildcard) and its content key.

        Names the snapshot does not have are left out (the client's does-not-exist timer
        decides); the key changes exactly when the selected content does.
        """
        if names is None:
            return self.all_encoded, (self.version,)
        present = sorted(n for n in names if n in self.encoded)
        return (
            b"".join(self.encoded[n] for n in present),
            tuple(f"{n}={self.digests[n]}" for n in present),
        )


@dataclass(frozen=True, slots=True)
class XdsSnapshot:
    """An immutable, consistent set of resources of every type, with per-type versions."""

    version: str
    types: Mapping[str, TypeResources]

    def of(self, type_url: str) -> TypeResources:
        found = self.types.get(type_url)
        return found if found is not None else _EMPTY


def _hash(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.hexdigest()[:16]


def _encode_type(
    type_url: str,
    messages: Mapping[str, Message],
    by_message: dict[int, tuple[bytes, str]] | None = None,
) -> TypeResources:
    """Serialize every resource once; `by_message` (by the id of a message alive for the whole
    call) reuses the bytes of a message several sets share."""
    encoded: dict[str, bytes] = {}
    digests: dict[str, str] = {}
    for name in sorted(messages):
        message = messages[name]
        done = by_message.get(id(message)) if by_message is not None else None
        if done is None:
            payload = message.SerializeToString(deterministic=True)
            wrapped = any_pb2.Any(type_url=type_url, value=payload)
            field = discovery_pb2.DiscoveryResponse(resources=[wrapped]).SerializeToString()
            done = (cast(bytes, field), _hash([name.encode(), payload]))
            if by_message is not None:
                by_message[id(message)] = done
        encoded[name], digests[name] = done
    version = _hash(f"{n}={d}".encode() for n, d in digests.items())
    return TypeResources(
        version=version,
        messages=dict(messages),
        encoded=encoded,
        digests=digests,
        all_encoded=b"".join(encoded.values()),
    )


_EMPTY = _encode_type("", {})


def check_consistency(resources: Resources) -> None:
    """Raise SnapshotError unless every reference between the resources resolves."""
    listeners = resources.get(LISTENER_TYPE, {})
    routes = resources.get(ROUTE_TYPE, {})
    clusters = resources.get(CLUSTER_TYPE, {})
    endpoints = resources.get(ENDPOINT_TYPE, {})
    for name, listener in listeners.items():
        if not isinstance(listener, listener_pb2.Listener):
            raise SnapshotError(f"listener {name!r} is a {type(listener).__name__}")
        for route_name in route_names_of(listener):
            if route_name not in routes:
                raise SnapshotError(
                    f"listener {name!r} refers to missing route configuration {route_name!r}"
                )
        for proxy in tcp_proxies_of(listener):
            if proxy.cluster and proxy.cluster not in clusters:
                raise SnapshotError(
                    f"listener {name!r} passes TCP to missing cluster {proxy.cluster!r}"
                )
    for name, config in routes.items():
        for vhost in cast(Any, config).virtual_hosts:
            for route in vhost.routes:
                if not route.HasField("route"):
                    continue
                action = route.route
                targets = [action.cluster] if action.cluster else []
                targets += [w.name for w in action.weighted_clusters.clusters]
                for target in targets:
                    if target not in clusters:
                        raise SnapshotError(
                            f"route configuration {name!r} virtual host {vhost.name!r} "
                            f"routes to missing cluster {target!r}"
                        )
    for name, cluster in clusters.items():
        eds_name = eds_name_of(cluster)
        if eds_name is not None and eds_name not in endpoints:
            raise SnapshotError(f"EDS cluster {name!r} has no ClusterLoadAssignment {eds_name!r}")


def make_snapshot(
    resources: Resources,
    version: str | None = None,
    *,
    check: bool = True,
    _encoded: dict[int, TypeResources] | None = None,
    _by_message: dict[int, tuple[bytes, str]] | None = None,
) -> XdsSnapshot:
    """Check `resources` (unless `check` is False: tests injecting bad config) and encode them.

    `version` defaults to a hash of every type's version.
    """
    if check:
        check_consistency(resources)
    memo = _encoded if _encoded is not None else {}

    def encode(type_url: str, messages: Mapping[str, Message]) -> TypeResources:
        found = memo.get(id(messages))
        if found is None:
            found = memo[id(messages)] = _encode_type(type_url, messages, _by_message)
        return found

    types = {t: encode(t, resources.get(t, {})) for t in PUSH_ORDER}
    for type_url, messages in resources.items():
        if type_url not in types:
            types[type_url] = encode(type_url, messages)
    if version is None:
        version = _hash(f"{t}={r.version}".encode() for t, r in sorted(types.items()))
    return XdsSnapshot(version=version, types=types)


def make_snapshots(
    default: Resources, by_namespace: Mapping[str, Resources]
) -> tuple[XdsSnapshot, dict[str, XdsSnapshot]]:
    """Snapshots for `mesh.translate.translate_namespaces`'s output; a type dict shared by
    several namespaces (the same object) is encoded once."""
    memo: dict[int, TypeResources] = {}
    by_message: dict[int, tuple[bytes, str]] = {}  # the messages stay alive: ids are stable
    snapshot = make_snapshot(default, _encoded=memo, _by_message=by_message)
    snapshots = {
        ns: make_snapshot(r, _encoded=memo, _by_message=by_message)
        for ns, r in sorted(by_namespace.items())
    }
    return snapshot, snapshots


class Lingering:
    """Removed Clusters (and their ClusterLoadAssignments) stay served, unreferenced, for `grace`
    seconds after the routes stop using them.

    A push sends CDS before RDS (make before break, for additions); for a removal that order
    would leave a client, between the two responses, with routes to a cluster it no longer has
    (our sidecar NACKs that; Envoy answers 503 NC). The xDS spec's answer is to remove stale
    clusters only once nothing refers to them: the first snapshot without the service keeps its
    cluster, a later one (after `grace`) drops it. The lingering entries depend on the previous
    snapshot, so two replicas may differ for `grace` seconds after a removal, never after.
    """

    def __init__(self, grace: float = 2.0) -> None:
        self.grace = grace
        self._held: dict[str, tuple[float, Message, Message | None]] = {}  # name -> (until, ...)

    def hold(
        self,
        previous: XdsSnapshot | None,
        default: Resources,
        by_namespace: Mapping[str, Resources],
        now: float,
    ) -> float | None:
        """Add the clusters `previous` had and the new resources lack to every set (in place,
        one shared dict per type); returns when the earliest of them expires (None: none)."""
        clusters = default.get(CLUSTER_TYPE, {})
        if previous is not None:
            old_clusters = previous.of(CLUSTER_TYPE).messages
            old_endpoints = previous.of(ENDPOINT_TYPE).messages
            for name, cluster in old_clusters.items():
                if name not in clusters and name not in self._held:
                    eds = eds_name_of(cluster)
                    assignment = old_endpoints.get(eds) if eds is not None else None
                    self._held[name] = (now + self.grace, cluster, assignment)
        self._held = {
            name: held
            for name, held in self._held.items()
            if held[0] > now and name not in clusters
        }
        if not self._held:
            return None
        merged_clusters = dict(clusters)
        merged_endpoints = dict(default.get(ENDPOINT_TYPE, {}))
        for name, (_, cluster, assignment) in self._held.items():
            merged_clusters[name] = cluster
            if assignment is not None:
                merged_endpoints[resource_name(ENDPOINT_TYPE, assignment)] = assignment
        merged_clusters = dict(sorted(merged_clusters.items()))
        merged_endpoints = dict(sorted(merged_endpoints.items()))
        for resources in (default, *by_namespace.values()):
            resources[CLUSTER_TYPE] = merged_clusters
            resources[ENDPOINT_TYPE] = merged_endpoints
        return min(until for until, _, _ in self._held.values())


Watcher = Callable[[], None]


class SnapshotCache:
    """The snapshots to serve; watchers are called (synchronously) whenever they change."""

    def __init__(self) -> None:
        self._default: XdsSnapshot | None = None
        self._by_namespace: dict[str, XdsSnapshot] = {}
        self._watchers: set[Watcher] = set()

    def set_snapshot(
        self, snapshot: XdsSnapshot, by_namespace: Mapping[str, XdsSnapshot] | None = None
    ) -> bool:
        """Publish `snapshot` for every node, or the namespace's own where `by_namespace` has
        one. False when nothing changed."""
        namespaces = dict(by_namespace or {})
        unchanged = (
            self._default is not None
            and self._default.version == snapshot.version
            and {ns: s.version for ns, s in self._by_namespace.items()}
            == {ns: s.version for ns, s in namespaces.items()}
        )
        if unchanged:
            return False
        self._default = snapshot
        self._by_namespace = namespaces
        for watcher in list(self._watchers):
            watcher()
        return True

    def get(self, namespace: str = "") -> XdsSnapshot | None:
        """The snapshot for a node in `namespace` ("" or unknown: the default)."""
        return self._by_namespace.get(namespace, self._default)

    @property
    def versions(self) -> dict[str, str]:
        """The snapshot version per namespace ("" for the default)."""
        out = {ns: s.version for ns, s in sorted(self._by_namespace.items())}
        if self._default is not None:
            out[""] = self._default.version
        return out

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call `watcher` on every change; returns the function that stops it."""
        self._watchers.add(watcher)
        return lambda: self._watchers.discard(watcher)
