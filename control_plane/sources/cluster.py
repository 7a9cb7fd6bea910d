"""The cluster as the control plane holds it, and the mesh it makes (no I/O: plain data in).

Only what the mesh needs is kept from each object, in small frozen records, so memory follows
what the cluster holds and an update that changes nothing the mesh reads (a status, managed
fields, a label) compares equal and causes no rebuild at all:

- Service (v1): name, namespace, uid, `outrigger.dev/` annotations, type, ClusterIPs, ports,
  externalName.
- EndpointSlice (discovery.k8s.io/v1): its Service (label `kubernetes.io/service-name`),
  address type, ports, and per endpoint the first address (the only one with defined meaning),
  the ready/serving/terminating conditions and the hostname.
- Namespace (v1): name, uid, `outrigger.dev/` annotations.

`cluster_mesh` turns them into a `mesh.model.Mesh`, per Service and TCP port one `MeshService`:

- Policy from `mesh.annotations.resolve` (Service > Namespace > the mesh file's `defaults:` >
  built-in); each invalid value becomes a `SourceProblem` on its object, naming the value used
  instead. A Namespace's problems are reported once, on the Namespace.
- Endpoints from every EndpointSlice of the Service: the slice port whose name is the Service
  port's name gives the port number (the target port, resolved by whoever wrote the slice);
  endpoints that are ready (a missing condition means ready), and only when no endpoint of the
  port is ready, those that are serving and terminating (as kube-proxy does). Duplicates across
  slices count once; endpoints are sorted, so the same cluster state gives the same mesh.
- A port's protocol is declared by its `appProtocol`, else by its name as Istio reads it
  (`<protocol>[-<suffix>]`): http -> http; tcp, mysql, mongo, redis -> tcp; tls, https -> tls
  (`declared_protocol`). Anything else (grpc, http2, h2c, a name without a known prefix) is left
  undeclared: intercepted connections are then detected from their first bytes.
- ClusterIPs become the service's virtual addresses; `clusterIP: None` is headless (per-pod
  names and pod IPs reach the pod itself, see `mesh.translate`); an ExternalName Service routes
  to its external host, on each of its ports (port 80 when it lists none).
- Services from the mesh file are added unless the cluster has a Service of the same name and
  namespace: the cluster's wins and the conflict is reported.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from control_plane.sources import ObjectRef, SourceProblem, Update
from mesh.annotations import CALLS, PREFIX, Problem, parse_calls, resolve
from mesh.model import Mesh, MeshEndpoint, MeshService, Protocol

SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
Kind = Literal["Service", "EndpointSlice", "Namespace"]
Annotations = tuple[tuple[str, str], ...]  # outrigger.dev/ annotations, sorted


# Port appProtocol values and name prefixes that declare a protocol (Istio's table, as far as
# the sidecar speaks it).
DECLARED_PROTOCOLS: Final[dict[str, Protocol]] = {
    "http": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "h2c": Protocol.HTTP2,
    "kubernetes.io/h2c": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
    "kubernetes.io/ws": Protocol.HTTP,  # a WebSocket starts as an HTTP/1.1 request
    "tcp": Protocol.TCP,
    "mysql": Protocol.TCP,
    "mongo": Protocol.TCP,
    "redis": Protocol.TCP,
    "tls": Protocol.TLS,
    "https": Protocol.TLS,
    "kubernetes.io/wss": Protocol.TLS,
}


@dataclass(frozen=True, slots=True)
class Port:
    name: str  # "" when unnamed
    port: int | None  # None: a slice port without a number
    protocol: str = "TCP"
    app_protocol: str = ""  # the Service port's appProtocol; "" when unset


def declared_protocol(port: Port) -> Protocol | None:
    """The protocol a Service port declares: its appProtocol, else its name's prefix."""
    by_app = DECLARED_PROTOCOLS.get(port.app_protocol.lower())
    if by_app is not None:
        return by_app
    return DECLARED_PROTOCOLS.get(port.name.split("-", 1)[0].lower())


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    namespace: str
    name: str
    uid: str
    annotations: Annotations
    type: str  # ClusterIP | NodePort | LoadBalancer | ExternalName
    cluster_ips: tuple[str, ...]  # canonical IPs; () when headless or ExternalName
    headless: bool
    external_name: str
    ports: tuple[Port, ...]

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Service", self.name, self.namespace, self.uid)


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    address: str
    ready: bool
    serving: bool
    terminating: bool
    hostname: str


@dataclass(frozen=True, slots=True)
class SliceRecord:
    namespace: str
    name: str
    service: str  # the kubernetes.io/service-name label; "" when absent
    address_type: str  # IPv4 | IPv6 | FQDN
    ports: tuple[Port, ...]
    endpoints: tuple[SliceEndpoint, ...]


@dataclass(frozen=True, slots=True)
class NamespaceRecord:
    name: str
    uid: str
    annotations: Annotations

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("Namespace", self.name, "", self.uid)


Record = ServiceRecord | SliceRecord | NamespaceRecord


# -- API objects (JSON, as the API returns them) -> records -----------------------------------


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _ours(meta: Mapping[str, Any]) -> Annotations:
    annotations = meta.get("annotations") or {}
    return tuple(
        sorted(
            (str(k), str(v))
            for k, v in annotations.items()
            if isinstance(k, str) and k.startswith(PREFIX)
        )
    )


def _ip(text: object) -> str | None:
    try:
        return str(ipaddress.ip_address(text)) if isinstance(text, str) else None
    except ValueError:
        return None


def _ports(items: object, port_key: str) -> tuple[Port, ...]:
    ports = []
    for item in items if isinstance(items, list) else []:
        number = item.get(port_key)
        ports.append(
            Port(
                name=str(item.get("name") or ""),
                port=number if isinstance(number, int) else None,
                protocol=str(item.get("protocol") or "TCP"),
                app_protocol=str(item.get("appProtocol") or ""),
            )
        )
    return tuple(ports)


def service_record(obj: Mapping[str, Any]) -> ServiceRecord:
    meta = _meta(obj)
    spec = obj.get("spec") or {}
    cluster_ip = spec.get("clusterIP") or ""
    ips = spec.get("clusterIPs") or ([cluster_ip] if cluster_ip else [])
    addresses = tuple(ip for ip in map(_ip, ips) if ip is not None)
    kind = str(spec.get("type") or "ClusterIP")
    return ServiceRecord(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        uid=str(meta.get("uid") or ""),
        annotations=_ours(meta),
        type=kind,
        cluster_ips=addresses,
        headless=cluster_ip == "None",
        external_name=str(spec.get("externalName") or "") if kind == "ExternalName" else "",
        ports=_ports(spec.get("ports"), "port"),
    )


def _condition(conditions: Mapping[str, Any], key: str, missing: bool) -> bool:
    value = conditions.get(key)
    return missing if value is None else bool(value)


def slice_record(obj: Mapping[str, Any]) -> SliceRecord:
    meta = _meta(obj)
    endpoints = []
    for item in obj.get("endpoints") or []:
        addresses = item.get("addresses") or []
        if not addresses:
            continue
        conditions = item.get("conditions") or {}
        endpoints.append(
            SliceEndpoint(
                address=str(addresses[0]),
                ready=_condition(conditions, "ready", True),
                serving=_condition(conditions, "serving", True),
                terminating=_condition(conditions, "terminating", False),
                hostname=str(item.get("hostname") or ""),
            )
        )
    labels = meta.get("labels") or {}
    return SliceRecord(
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        service=str(labels.get(SERVICE_NAME_LABEL) or ""),
        address_type=str(obj.get("addressType") or ""),
        ports=_ports(obj.get("ports"), "port"),
        endpoints=tuple(endpoints),
    )


def namespace_record(obj: Mapping[str, Any]) -> NamespaceRecord:
    meta = _meta(obj)
    return NamespaceRecord(
        name=str(meta.get("name") or ""), uid=str(meta.get("uid") or ""), annotations=_ours(meta)
    )


RECORDS: Final[dict[Kind, Callable[[Mapping[str, Any]], Record]]] = {
    "Service": service_record,
    "EndpointSlice": slice_record,
    "Namespace": namespace_record,
}


# -- the store ---------------------------------------------------------------------------------


def _key(record: Record) -> tuple[str, str]:
    if isinstance(record, NamespaceRecord):
        return ("", record.name)
    return (record.namespace, record.name)


class ClusterState:
    """The records of every object the source watches, by kind and (namespace, name)."""

    def __init__(self) -> None:
        self.objects: dict[Kind, dict[tuple[str, str], Record]] = {
            "Service": {},
            "EndpointSlice": {},
            "Namespace": {},
        }
        self._slices_of: dict[tuple[str, str], set[str]] = {}  # (ns, service) -> slice names
        self._memo: dict[Any, tuple[list[MeshService], list[SourceProblem]]] = {}

    def put(self, kind: Kind, obj: Mapping[str, Any]) -> bool:
        """Add or replace an object; True when the mesh may change."""
        return self._put(kind, RECORDS[kind](obj))

    def _put(self, kind: Kind, record: Record) -> bool:
        objects = self.objects[kind]
        key = _key(record)
        old = objects.get(key)
        if old == record:
            return False
        if isinstance(old, SliceRecord):
            self._unindex(old)
        objects[key] = record
        if isinstance(record, SliceRecord):
            self._slices_of.setdefault((record.namespace, record.service), set()).add(record.name)
        return True

    def delete(self, kind: Kind, obj: Mapping[str, Any]) -> bool:
        return self._delete(kind, _key(RECORDS[kind](obj)))

    def _delete(self, kind: Kind, key: tuple[str, str]) -> bool:
        old = self.objects[kind].pop(key, None)
        if isinstance(old, SliceRecord):
            self._unindex(old)
        return old is not None

    def _unindex(self, record: SliceRecord) -> None:
        names = self._slices_of.get((record.namespace, record.service))
        if names is not None:
            names.discard(record.name)
            if not names:
                del self._slices_of[(record.namespace, record.service)]

    def replace(
        self, kind: Kind, items: Iterable[Mapping[str, Any]], namespace: str | None = None
    ) -> bool:
        """A fresh list: exactly `items` remain of `kind` (within `namespace`, or the named
        Namespace when listing one by name; None: all). True when anything changed."""
        records = [RECORDS[kind](obj) for obj in items]
        keep = {_key(r) for r in records}
        changed = False
        for key in list(self.objects[kind]):
            in_scope = namespace is None or (
                key == ("", namespace) if kind == "Namespace" else key[0] == namespace
            )
            if in_scope and key not in keep:
                changed = self._delete(kind, key) or changed
        for record in records:
            changed = self._put(kind, record) or changed
        return changed

    def slices_of(self, namespace: str, service: str) -> list[SliceRecord]:
        names = sorted(self._slices_of.get((namespace, service), ()))
        slices = self.objects["EndpointSlice"]
        found = [slices[(namespace, name)] for name in names]
        return [s for s in found if isinstance(s, SliceRecord)]

    def services(self) -> list[ServiceRecord]:
        found = [self.objects["Service"][k] for k in sorted(self.objects["Service"])]
        return [s for s in found if isinstance(s, ServiceRecord)]

    def namespace(self, name: str) -> NamespaceRecord | None:
        found = self.objects["Namespace"].get(("", name))
        return found if isinstance(found, NamespaceRecord) else None

    def sizes(self) -> dict[str, int]:
        return {kind: len(objects) for kind, objects in self.objects.items()}


# -- records -> mesh ---------------------------------------------------------------------------


def endpoints_for(port: Port, slices: Iterable[SliceRecord]) -> tuple[MeshEndpoint, ...]:
    """The endpoints of one Service port (see the module docstring for the rules)."""
    ready: set[MeshEndpoint] = set()
    fallback: set[MeshEndpoint] = set()
    for slice_ in slices:
        if slice_.address_type not in ("IPv4", "IPv6"):
            continue
        number = next(
            (
                p.port
                for p in slice_.ports
                if p.name == port.name and p.protocol == port.protocol and p.port is not None
            ),
            None,
        )
        if number is None:
            continue
        for endpoint in slice_.endpoints:
            address = _ip(endpoint.address)
            if address is None:
                continue
            found = MeshEndpoint(address, number, hostname=endpoint.hostname or None)
            if endpoint.ready:
                ready.add(found)
            elif endpoint.serving and endpoint.terminating:
                fallback.add(found)
    chosen = ready or fallback
    return tuple(sorted(chosen, key=lambda e: (e.host, e.port, e.hostname or "")))


def _problem(ref: ObjectRef, problem: Problem) -> SourceProblem:
    return SourceProblem(
        reason="InvalidPolicy",
        message=problem.describe(),
        regarding=ref,
        key=problem.key,
        value=problem.value,
    )


def _service_entries(
    svc: ServiceRecord,
    namespace_annotations: Annotations,
    slices: list[SliceRecord],
    base: Mesh,
) -> tuple[list[MeshService], list[SourceProblem]]:
    annotations = dict(svc.annotations)
    resolved = resolve(annotations, dict(namespace_annotations), base.defaults)
    problems = [_problem(svc.ref, p) for p in resolved.problems if p.level == "service"]
    calls: tuple[str, ...] = ()
    if CALLS in annotations:
        calls, _ = parse_calls(annotations[CALLS])  # a bad list is among resolved.problems
    tcp = [p for p in svc.ports if p.protocol == "TCP" and p.port is not None]
    entries: list[tuple[int, Port, tuple[MeshEndpoint, ...]]] = []
    if svc.type == "ExternalName":
        for port in tcp or [Port("", 80)]:
            assert port.port is not None
            endpoint = MeshEndpoint(svc.external_name.lower(), port.port)
            entries.append((port.port, port, (endpoint,)))
    else:
        for port in tcp:
            assert port.port is not None
            entries.append((port.port, port, endpoints_for(port, slices)))
    services = [
        MeshService(
            name=svc.name,
            namespace=svc.namespace,
            port=number,
            endpoints=endpoints,
            policy=resolved.policy,
            addresses=svc.cluster_ips,
            calls=calls,
            sole_port=len(entries) == 1,
            headless=svc.headless,
            protocol=declared_protocol(port),
            origins=resolved.origins,
        )
        for number, port, endpoints in entries
    ]
    return services, problems


def cluster_mesh(state: ClusterState, base: Mesh) -> Update:
    """The mesh of the cluster's Services, with `base` (the mesh file) for the mesh-wide
    settings and the services the cluster lacks; the problems found on the way."""
    defaults_key = tuple(sorted(base.defaults.items()))
    services: list[MeshService] = []
    problems: list[SourceProblem] = []
    memo: dict[Any, tuple[list[MeshService], list[SourceProblem]]] = {}
    seen_namespaces: set[str] = set()
    in_cluster: set[tuple[str, str]] = set()
    for svc in state.services():
        ns = state.namespace(svc.namespace)
        ns_annotations = ns.annotations if ns is not None else ()
        if ns is not None and ns.name not in seen_namespaces:
            seen_namespaces.add(ns.name)
            resolved = resolve({}, dict(ns.annotations), base.defaults)
            problems += [_problem(ns.ref, p) for p in resolved.problems]
        slices = state.slices_of(svc.namespace, svc.name)
        key = (svc, ns_annotations, tuple(slices), defaults_key)
        built = state._memo.get(key)
        if built is None:
            built = _service_entries(svc, ns_annotations, slices, base)
        memo[key] = built
        services += built[0]
        problems += built[1]
        in_cluster.add((svc.name, svc.namespace))
    state._memo = memo  # only what this state still uses
    for service in base.services:
        if (service.name, service.namespace) in in_cluster:
            problems.append(
                SourceProblem(
                    reason="ServiceConflict",
                    message=(
                        f"{base.source}: service {service.name!r} in namespace "
                        f"{service.namespace!r} is also a Service in the cluster: the cluster's "
                        "is used, the mesh file's ignored (rename or remove one)"
                    ),
                    regarding=ObjectRef("Service", service.name, service.namespace),
                )
            )
            continue
        services.append(service)
    mesh = Mesh(
        services=tuple(services),
        outbound_policy=base.outbound_policy,
        tracing=base.tracing,
        source=f"kubernetes + {base.source}",
        defaults=base.defaults,
    )
    return Update(mesh, tuple(problems))
