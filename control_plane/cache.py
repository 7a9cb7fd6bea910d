"""The snapshot cache: immutable, versioned, consistent sets of xDS resources (go-control-plane).

A `XdsSnapshot` is built once per configuration change by `make_snapshot`, which refuses an
inconsistent set (a route to a missing cluster, an EDS cluster without a ClusterLoadAssignment,
a listener naming a missing route configuration) with a `SnapshotError`. Building it serializes
every resource exactly once: each resource is kept as an `Encoded`, the bytes of one `resources`
entry of a DiscoveryResponse (field 2, an `Any`) with its content hash and the names it refers
to, so the ADS transport answers any number of streams by joining bytes, never by
re-serializing messages. A snapshot keeps no message: at 1,000 services the messages of every
namespace's resources took ~50 MiB, their bytes a tenth of that (`TypeResources.decoded` reads
them back, for tests and tools).

Versions are content hashes: a type's version changes exactly when one of its resources does,
so a stream is pushed only the types whose content changed, and two control planes given the
same configuration compute the same versions.

RouteConfigurations depend on the sidecar's namespace (the bare service name reaches only its
own namespace's service), so the cache holds one snapshot per namespace that has services and a
default for every other node; a stream is served the snapshot of the namespace its node's
metadata names. `make_snapshots` encodes a type's resources once when every namespace shares
them (the Clusters and ClusterLoadAssignments), so their versions are identical everywhere.

Resources given to `make_snapshots` may be messages or `Encoded` ones: an `Encoded` is used as it
is. Once served, the control plane swaps the translation's messages for the snapshots' encodings
(`settled`), so the next translation (`mesh.translate.translate_update` reuses every unchanged
resource) is encoded only where it is new. `make_snapshots`, given the snapshots being replaced,
records per type which resources changed since (`TypeResources.changed`): the ADS server sends a
stream that ACKed the previous version only those, where the protocol allows it
(RouteConfigurations and ClusterLoadAssignments).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from mesh.translate import Translation
from mesh.xds import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    Resources,
    eds_name_of,
    resources_from_any,
    route_names_of,
    tcp_proxies_of,
)

# Make-before-break order for pushes (the xDS spec's ADS ordering): clusters and their
# endpoints before the listeners and routes that point at them.
PUSH_ORDER: tuple[str, ...] = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
SELECTIONS_KEPT = 64  # distinct named subscriptions remembered per type and snapshot


class SnapshotError(Exception):
    """A set of resources that is not consistent; the message names the resource."""


Refs = tuple[tuple[str, str], ...]  # (where in the message, the name it refers to)
Parts = tuple[bytes, ...]  # pieces of a DiscoveryResponse's `resources`, to join


@dataclass(frozen=True, slots=True)
class Encoded:
    """One resource as a snapshot keeps it: serialized once, the message not kept."""

    field: bytes  # the DiscoveryResponse `resources` entry (an Any holding the resource)
    digest: str  # content hash of its name and serialization
    refs: Refs  # the names it refers to (route configurations, clusters, assignments)


@dataclass(frozen=True, slots=True)
class TypeResources:
    """One type's resources in a snapshot, serialized once."""

    version: str
    resources: Mapping[str, Encoded]
    # History, not content (equality ignores it): the version `changed` is counted from ("":
    # none), and the names added or changed since.
    previous_version: str = field(default="", compare=False)
    changed: frozenset[str] = field(default=frozenset(), compare=False)
    # names -> select()'s answer: every stream with the same subscription shares one
    _selected: dict[frozenset[str], tuple[Parts, str]] = field(
        default_factory=dict, compare=False, repr=False
    )
    _fields: list[Parts] = field(default_factory=list, compare=False, repr=False)

    @property
    def fields(self) -> Parts:
        """Every resource's field bytes, in name order: the wildcard answer, joined by the
        transport per response and never kept joined (each namespace's Listeners would be a
        copy: 21 x 0.7 MB at 1,000 services)."""
        if not self._fields:
            self._fields.append(tuple(e.field for e in self.resources.values()))
        return self._fields[0]

    def select(self, names: frozenset[str] | None) -> tuple[Parts, str]:
        """The resources field bytes for a subscription (None: wildcard), in parts to join,
        and its content key.

        Names the snapshot does not have are left out (the client's does-not-exist timer
        decides); the key changes exactly when the selected content does.
        """
        if names is None:
            return self.fields, self.version
        found = self._selected.get(names)
        if found is None:
            present = [self.resources[n] for n in sorted(names) if n in self.resources]
            key = _hash(e.digest.encode() for e in present)
            found = ((b"".join(e.field for e in present),), key)
            if len(self._selected) >= SELECTIONS_KEPT:
                self._selected.clear()
            self._selected[names] = found
        return found

    def changes(self, names: frozenset[str]) -> Parts:
        """The resources field bytes of the subscribed names changed since previous_version."""
        return tuple(self.resources[n].field for n in sorted(self.changed.intersection(names)))

    def decoded(self) -> dict[str, Message]:
        """The resources as messages, decoded from their bytes (for tests and tools)."""
        packed = discovery_pb2.DiscoveryResponse.FromString(
            b"".join(e.field for e in self.resources.values())
        ).resources
        return {n: m for found in resources_from_any(packed).values() for n, m in found.items()}


class References:
    """What each message refers to (route configurations, clusters, assignments), worked out
    once per message object in a build (every namespace's set shares most of them) and kept
    in its `Encoded` after. Equal references are one object: every namespace's `outbound`
    RouteConfiguration names every cluster (21 x 1,000 pairs at 1,000 services)."""

    def __init__(self) -> None:
        self._found: dict[int, tuple[Message, Refs]] = {}  # id -> (message kept alive, refs)
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

    def of(self, type_url: str, item: Message | Encoded) -> Refs:
        if isinstance(item, Encoded):
            return item.refs
        extract = _EXTRACT_REFS.get(type_url)
        if extract is None:
            return ()
        hit = self._found.get(id(item))
        if hit is None or hit[0] is not item:
            refs = tuple(self._pairs.setdefault(pair, pair) for pair in extract(item))
            hit = self._found[id(item)] = (item, refs)
        return hit[1]


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
    items: Mapping[str, Message | Encoded],
    references: References,
    by_message: dict[int, Encoded] | None = None,
    previous: TypeResources | None = None,
) -> TypeResources:
    """Serialize every message once; an `Encoded` is kept as it is, and `by_message` (by the
    id of a message alive for the whole call) reuses the encoding of a message several sets
    share. `previous` is the type in the snapshot this one replaces: the history."""
    if previous is not None and _same_resources(previous.resources, items):
        return dataclasses.replace(previous, previous_version=previous.version, changed=frozenset())
    encoded: dict[str, Encoded] = {}
    for name in sorted(items):
        item = items[name]
        if isinstance(item, Encoded):
            encoded[name] = item
            continue
        done = by_message.get(id(item)) if by_message is not None else None
        if done is None:
            payload = item.SerializeToString(deterministic=True)
            wrapped = any_pb2.Any(type_url=type_url, value=payload)
            field = discovery_pb2.DiscoveryResponse(resources=[wrapped]).SerializeToString()
            refs = references.of(type_url, item)
            done = Encoded(cast(bytes, field), _hash([name.encode(), payload]), refs)
            if by_message is not None:
                by_message[id(item)] = done
        encoded[name] = done
    version = _hash(f"{n}={e.digest}".encode() for n, e in encoded.items())
    changed: frozenset[str] = frozenset()
    if previous is not None:
        old = previous.resources
        changed = frozenset(
            n for n, e in encoded.items() if n not in old or old[n].digest != e.digest
        )
    return TypeResources(
        version=version,
        resources=encoded,
        previous_version=previous.version if previous is not None else "",
        changed=changed,
    )


def _same_resources(old: Mapping[str, Encoded], new: Mapping[str, Message | Encoded]) -> bool:
    return len(old) == len(new) and all(old.get(name) is e for name, e in new.items())


def _listener_refs(listener: Any) -> Refs:
    """("", route configuration) for each HCM, ("tcp", cluster) for each tcp_proxy chain."""
    routes = tuple(("", name) for name in route_names_of(listener))
    return routes + tuple(("tcp", p.cluster) for p in tcp_proxies_of(listener) if p.cluster)


def _route_refs(config: Any) -> Refs:
    refs = []
    for vhost in config.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            action = route.route
            if action.cluster:
                refs.append((vhost.name, action.cluster))
            refs += [(vhost.name, w.name) for w in action.weighted_clusters.clusters]
    return tuple(refs)


def _cluster_refs(cluster: Any) -> Refs:
    eds_name = eds_name_of(cluster)
    return (("", eds_name),) if eds_name is not None else ()


_EXTRACT_REFS: dict[str, Callable[[Any], Refs]] = {
    LISTENER_TYPE: _listener_refs,
    ROUTE_TYPE: _route_refs,
    CLUSTER_TYPE: _cluster_refs,
}
_EMPTY = _encode_type("", {}, References())


def check_consistency(resources: Resources, references: References | None = None) -> None:
    """Raise SnapshotError unless every reference between the resources resolves."""
    refs = references if references is not None else References()
    listeners = resources.get(LISTENER_TYPE, {})
    routes = resources.get(ROUTE_TYPE, {})
    clusters = resources.get(CLUSTER_TYPE, {})
    endpoints = resources.get(ENDPOINT_TYPE, {})
    for name, listener in listeners.items():
        if not isinstance(listener, listener_pb2.Listener | Encoded):
            raise SnapshotError(f"listener {name!r} is a {type(listener).__name__}")
        for kind, target in refs.of(LISTENER_TYPE, listener):
            if kind == "tcp" and target not in clusters:
                raise SnapshotError(f"listener {name!r} passes TCP to missing cluster {target!r}")
            if kind != "tcp" and target not in routes:
                raise SnapshotError(
                    f"listener {name!r} refers to missing route configuration {target!r}"
                )
    for type_url, items, targets, missing in (
        (
            ROUTE_TYPE,
            routes,
            clusters,
            "route configuration {name!r} virtual host {via!r} routes to missing cluster {to!r}",
        ),
        (
            CLUSTER_TYPE,
            clusters,
            endpoints,
            "EDS cluster {name!r} has no ClusterLoadAssignment {to!r}",
        ),
    ):
        for name, item in items.items():
            for via, to in refs.of(type_url, item):
                if to not in targets:
                    raise SnapshotError(missing.format(name=name, via=via, to=to))


def make_snapshot(
    resources: Resources,
    version: str | None = None,
    *,
    check: bool = True,
    previous: XdsSnapshot | None = None,
    _encoded: dict[int, TypeResources] | None = None,
    _by_message: dict[int, Encoded] | None = None,
    _references: References | None = None,
) -> XdsSnapshot:
    """Check `resources` (messages, or `Encoded` ones: unless `check` is False, for tests
    injecting bad config) and encode them; `previous` is the snapshot this one replaces.

    `version` defaults to a hash of every type's version.
    """
    references = _references if _references is not None else References()
    if check:
        check_consistency(resources, references)
    memo = _encoded if _encoded is not None else {}

    def encode(type_url: str, items: Mapping[str, Message | Encoded]) -> TypeResources:
        found = memo.get(id(items))
        if found is None:
            before = previous.types.get(type_url) if previous is not None else None
            found = _encode_type(type_url, items, references, _by_message, before)
            memo[id(items)] = found
        return found

    types = {t: encode(t, resources.get(t, {})) for t in PUSH_ORDER}
    for type_url, items in resources.items():
        if type_url not in types:
            types[type_url] = encode(type_url, items)
    if version is None:
        version = _hash(f"{t}={r.version}".encode() for t, r in sorted(types.items()))
    return XdsSnapshot(version=version, types=types)


def make_snapshots(
    default: Resources,
    by_namespace: Mapping[str, Resources],
    previous: tuple[XdsSnapshot | None, Mapping[str, XdsSnapshot]] = (None, {}),
) -> tuple[XdsSnapshot, dict[str, XdsSnapshot]]:
    """Snapshots for `mesh.translate.translate_namespaces`'s output (or `settled`'s, built
    on); a type dict or a message shared by several namespaces (the same object) is encoded
    once. `previous` (default, by namespace) are the snapshots being replaced."""
    memo: dict[int, TypeResources] = {}
    by_message: dict[int, Encoded] = {}  # the messages stay alive: ids are stable
    references = References()
    old_default, old_by_namespace = previous

    def make(resources: Resources, before: XdsSnapshot | None) -> XdsSnapshot:
        return make_snapshot(
            resources,
            previous=before,
            _encoded=memo,
            _by_message=by_message,
            _references=references,
        )

    snapshot = make(default, old_default)
    snapshots = {
        ns: make(r, old_by_namespace.get(ns, old_default)) for ns, r in sorted(by_namespace.items())
    }
    return snapshot, snapshots


def settled(
    translation: Translation, default: XdsSnapshot, by_namespace: Mapping[str, XdsSnapshot]
) -> Translation:
    """`translation` with every message replaced by its `Encoded` in the snapshots made of it
    (`make_snapshots`): what the control plane keeps between updates. No message stays alive,
    the next `translate_update` reuses the encodings, and a type dict shared by several
    namespaces stays shared."""
    swapped: dict[int, dict[str, Message | Encoded]] = {}

    def swap(resources: Resources, snapshot: XdsSnapshot) -> Resources:
        out: Resources = {}
        for type_url, items in resources.items():
            found = swapped.get(id(items))
            if found is None:
                encoded = snapshot.of(type_url).resources
                found = swapped[id(items)] = {name: encoded[name] for name in items}
            out[type_url] = found
        return out

    return dataclasses.replace(
        translation,
        default=swap(translation.default, default),
        by_namespace={ns: swap(r, by_namespace[ns]) for ns, r in translation.by_namespace.items()},
    )


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
        # cluster name -> (until, the cluster, its assignment's name and assignment, if any)
        self._held: dict[str, tuple[float, Encoded, tuple[str, Encoded] | None]] = {}

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
            old_endpoints = previous.of(ENDPOINT_TYPE).resources
            for name, cluster in previous.of(CLUSTER_TYPE).resources.items():
                if name not in clusters and name not in self._held:
                    eds = [ref for _, ref in cluster.refs if ref in old_endpoints]
                    assignment = (eds[0], old_endpoints[eds[0]]) if eds else None
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
                merged_endpoints[assignment[0]] = assignment[1]
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

    def current(self) -> tuple[XdsSnapshot | None, dict[str, XdsSnapshot]]:
        """The snapshots served: the default and the namespaces' own (`make_snapshots`'
        `previous`)."""
        return self._default, dict(self._by_namespace)

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
