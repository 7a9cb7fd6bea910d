"""What `outrigger analyze` sees: services from manifests and a mesh file, each with the policy
the control plane would give it, the services it calls, and how many endpoints it has.

Manifests (multi-document YAML or JSON; `List` objects are walked item by item):

- Namespace: its `outrigger.dev/` annotations are defaults for its Services.
- Service: one service per Service (its ports do not matter here). Policy as the control plane
  resolves it (`mesh.annotations.resolve`: Service > Namespace > the mesh file's `defaults:` >
  built-in, an invalid value falling back for its key only), with the same problem messages.
  An object without `metadata.namespace` is taken to be in `default` (kubectl would use the
  context's namespace).
- Workloads (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, ReplicationController, Job,
  CronJob): `outrigger.dev/calls` on the workload or its pod template adds calls to every Service
  of the namespace whose selector matches the template's labels. A workload no Service selects is
  a caller only (the top of its chains: a CronJob, a load generator).
- Endpoints, for the breaker check, as counted here: an ExternalName Service has one (its host);
  a Service with a selector has the replicas of the workloads it selects (`spec.replicas`,
  default 1; a HorizontalPodAutoscaler that targets the workload gives `minReplicas`, default 1;
  a Pod is one); unknown when it selects a DaemonSet, Job or CronJob, or nothing in the inputs.
  A Service without a selector has the addresses of its EndpointSlices (label
  `kubernetes.io/service-name`, endpoints not marked unready) or of its Endpoints object.
- Anything else is read and ignored.

A mesh file (`--mesh`) gives the `defaults:` under every Service's policy, and its own services
(policy as the file resolves it, `calls:`, `endpoints:`). A service in both is the manifests'
(as the control plane does), reported as `ServiceConflict`.

Problems with the inputs become findings here (InvalidInput, InvalidMeshFile, InvalidAnnotation,
UnknownCallee, ServiceConflict, MisplacedAnnotation); the policy checks are `outrigger.analyze`'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, TextIO

import yaml

from mesh.annotations import (
    CALLS,
    POLICY_KEYS,
    PREFIX,
    Problem,
    check,
    closest_key,
    is_known,
    parse_calls,
    read_annotations,
    resolve,
)
from mesh.injection import POD_TEMPLATES
from mesh.model import Mesh, MeshError, load_mesh
from mesh.policy import BY_KEY, Origin, Policy, PolicyValues
from outrigger.findings import Finding, ObjectRef, finding

Json = dict[str, Any]
SUFFIXES: Final = (".yaml", ".yml", ".json")
SERVICE_NAME_LABEL: Final = "kubernetes.io/service-name"
SCALED: Final = frozenset({"Deployment", "StatefulSet", "ReplicaSet", "ReplicationController"})
STDIN: Final = "<stdin>"


@dataclass(frozen=True, slots=True)
class Call:
    target: str  # as written: "payments" (the caller's namespace) or "payments.shop"
    by: ObjectRef  # the object whose annotation (or mesh entry) says so

    def key(self, namespace: str) -> tuple[str, str]:
        """(namespace, name) of the service called from `namespace`."""
        name, _, explicit = self.target.partition(".")
        return (explicit or namespace, name)


@dataclass(frozen=True, slots=True)
class Endpoints:
    count: int
    why: str  # how it was counted, e.g. "Deployment shop/payments has replicas: 1"


@dataclass(slots=True)
class Service:
    name: str
    namespace: str
    ref: ObjectRef  # the Service, or the mesh file's entry
    policy: Policy
    origins: Mapping[str, Origin]  # setting key -> where its value came from
    calls: list[Call] = field(default_factory=list)
    endpoints: Endpoints | None = None  # None: not known from the inputs
    mesh_source: str | None = None  # the mesh file, for a service it defines
    defaults_source: str | None = None  # the mesh file whose defaults: apply

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def where(self, key: str) -> str:
        """Where to change setting `key` for this service, e.g.
        "outrigger.dev/retry-attempts on Service shop/orders"."""
        setting = BY_KEY[key]
        origin = self.origins.get(key, "built-in")
        if origin == "namespace":
            return f"{PREFIX}{key} on Namespace {self.namespace}"
        if origin == "mesh" and self.defaults_source is not None:
            return f"defaults.{setting.mesh_path} in {self.defaults_source}"
        return self.own(key)

    def own(self, key: str) -> str:
        """Where to set `key` for this service alone (over its namespace's and the mesh's)."""
        if self.mesh_source is not None:
            path = BY_KEY[key].mesh_path
            return f'policy.{path} of service "{self.name}" in {self.mesh_source}'
        return f"{PREFIX}{key} on {self.ref}"

    def shared(self, key: str) -> bool:
        """Whether `key`'s value comes from a level other services share."""
        return self.origins.get(key, "built-in") in ("namespace", "mesh")


@dataclass(slots=True)
class Caller:
    """A workload no Service selects: it calls, nothing calls it."""

    ref: ObjectRef
    calls: list[Call]

    @property
    def namespace(self) -> str:
        return self.ref.namespace


@dataclass(slots=True)
class Topology:
    services: dict[tuple[str, str], Service] = field(default_factory=dict)
    callers: list[Caller] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)  # files read, in order
    objects: int = 0  # Kubernetes objects read


# -- reading files --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Document:
    obj: Json
    source: str  # "file:line"


def _file_ref(name: str) -> ObjectRef:
    return ObjectRef("File", name, source=name)


def _bad_input(where: str, problem: str, fix: str) -> Finding:
    """An InvalidInput finding about a file (or "file:line")."""
    return finding("InvalidInput", _file_ref(where), f"{where}: {problem}", fix)


def _files(paths: Sequence[str], found: list[Finding]) -> Iterator[Path | None]:
    """Each file to read (None: stdin), directories expanded (not recursively, as kubectl)."""
    for text in paths:
        if text == "-":
            yield None
            continue
        path = Path(text)
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
            if not inside:
                found.append(
                    _bad_input(text, f"no {', '.join(SUFFIXES)} files in this directory",
                               "name a directory of manifests, a file, or - for stdin")
                )  # fmt: skip
            yield from inside
        else:
            yield path


# libyaml when PyYAML has it: reading is most of analyze's time, and libyaml is several times
# faster (and refuses nesting deeper than 1,000 levels itself).
_Loader: Final = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _documents(text: str) -> list[tuple[object, int]]:
    """(document, first line) of each document. Raises yaml.YAMLError."""
    loader = _Loader(text)
    out: list[tuple[object, int]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                out.append((loader.construct_document(node), node.start_mark.line + 1))
    finally:
        loader.dispose()
    return out


def _objects(doc: object, source: str, found: list[Finding]) -> Iterator[Document]:
    if doc is None:
        return
    if not isinstance(doc, dict):
        found.append(
            _bad_input(source, f"a {type(doc).__name__}, not a Kubernetes object",
                       "each YAML document must be one object with apiVersion, kind and metadata")
        )  # fmt: skip
        return
    kind = doc.get("kind")
    items = doc.get("items")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(items, list):
        for item in items:
            yield from _objects(item, source, found)
        return
    if not isinstance(kind, str) or not isinstance(doc.get("apiVersion"), str):
        looks_like_mesh = "services" in doc or "defaults" in doc
        found.append(
            _bad_input(
                source,
                "not a Kubernetes object (apiVersion and kind are required)"
                + ("; it looks like a mesh file" if looks_like_mesh else ""),
                "pass a mesh file with --mesh" if looks_like_mesh
                else "give the object its apiVersion and kind, or leave it out of -f",
            )
        )  # fmt: skip
        return
    yield Document(doc, source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """ "expected <block end>, but found '-' at line 4, column 3 (while parsing ...)"."""
    if not isinstance(exc, yaml.MarkedYAMLError) or exc.problem_mark is None:
        return " ".join(str(exc).split())
    mark = exc.problem_mark
    where = f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return where + (f" ({exc.context})" if exc.context else "")


def read_documents(paths: Sequence[str], stdin: TextIO) -> tuple[list[Document], list[str],
                                                                 list[Finding]]:  # fmt: skip
    """Every Kubernetes object in `paths` (files, directories, "-"), the files read, and the
    problems (a file that cannot be read or parsed is reported and skipped whole)."""
    found: list[Finding] = []
    documents: list[Document] = []
    names: list[str] = []
    for path in _files(paths, found):
        name = STDIN if path is None else str(path)
        try:
            text = stdin.read() if path is None else path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            found.append(
                _bad_input(name, f"cannot read it: {reason}",
                           "name an existing, readable UTF-8 file or directory")
            )  # fmt: skip
            continue
        names.append(name)
        try:
            parsed = _documents(text)
        except (yaml.YAMLError, RecursionError) as exc:
            detail = _yaml_problem(exc) if isinstance(exc, yaml.YAMLError) else "nested too deep"
            found.append(
                _bad_input(name, f"not valid YAML, nothing in it was analyzed: {detail}",
                           "fix the YAML at the line the message names")
            )  # fmt: skip
            continue
        for doc, line in parsed:
            documents.extend(_objects(doc, f"{name}:{line}", found))
    return documents, names, found


# -- objects -------------------------------------------------------------------------------


def _metadata(obj: Json) -> Json:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _ref(doc: Document, cluster_scoped: bool = False) -> ObjectRef:
    meta = _metadata(doc.obj)
    name = meta.get("name") or meta.get("generateName") or "(unnamed)"
    namespace = "" if cluster_scoped else str(meta.get("namespace") or "default")
    return ObjectRef(str(doc.obj["kind"]), str(name), namespace, doc.source)


def _fix_for(problem: Problem) -> str:
    """The one-line fix for an annotation problem from mesh.annotations."""
    key = problem.key
    if key == "metadata.annotations":
        return "write metadata.annotations as a mapping of strings"
    if "must be a string" in problem.message:
        return f'quote the value: {key}: "{problem.value}"'
    if key == CALLS:
        return f'write {CALLS} as a comma-separated list of services, e.g. "orders,payments.shop"'
    if not is_known(key):
        close = closest_key(key)
        return f"rename it to {close}" if close else "remove it (see the README's annotation table)"
    setting = BY_KEY[key.removeprefix(PREFIX)]
    if setting.key in ("retry-backoff-base", "retry-backoff-max") and "backoff" in problem.message:
        return "make retry-backoff-max at least retry-backoff-base (the max defaults to 10 x base)"
    return f'set {key} to {setting.form}, e.g. "{setting.example}"'


def _annotation_finding(ref: ObjectRef, problem: Problem) -> Finding:
    return finding("InvalidAnnotation", ref, problem.describe(), _fix_for(problem))


@dataclass(slots=True)
class _Workload:
    ref: ObjectRef
    labels: dict[str, str]
    calls: list[Call]
    replicas: int | None  # None: not a fixed number (DaemonSet, Job, CronJob)


def _labels(meta: Json) -> dict[str, str]:
    labels = meta.get("labels")
    if not isinstance(labels, dict):
        return {}
    return {str(k): str(v) for k, v in labels.items()}


def _calls_of(ref: ObjectRef, annotations: Mapping[str, str]) -> tuple[list[Call], Problem | None]:
    if CALLS not in annotations:
        return [], None
    names, problem = parse_calls(annotations[CALLS])
    return [Call(name, ref) for name in names], problem


def _replicas(obj: Json) -> int | None:
    spec = obj.get("spec")
    value = spec.get("replicas", 1) if isinstance(spec, dict) else 1
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Builder:
    def __init__(self, defaults: PolicyValues, defaults_source: str | None) -> None:
        self.defaults = defaults
        self.defaults_source = defaults_source
        self.topology = Topology()
        self.namespaces: dict[str, dict[str, str]] = {}
        self.selectors: dict[tuple[str, str], dict[str, str]] = {}
        self.external: set[tuple[str, str]] = set()
        self.workloads: list[_Workload] = []
        self.autoscaled: dict[tuple[str, str, str], tuple[int, ObjectRef]] = {}
        self.addresses: dict[tuple[str, str], tuple[set[str], ObjectRef]] = {}

    def report(self, item: Finding) -> None:
        self.topology.findings.append(item)

    def annotations(self, ref: ObjectRef, obj: Json) -> dict[str, str]:
        found, problems = read_annotations(_metadata(obj))
        for problem in problems:
            self.report(_annotation_finding(ref, problem))
        return found

    def namespace(self, doc: Document) -> None:
        ref = _ref(doc, cluster_scoped=True)
        annotations = self.annotations(ref, doc.obj)
        self.namespaces[ref.name] = annotations
        for problem in resolve({}, annotations, self.defaults).problems:
            self.report(_annotation_finding(ref, problem))

    def service(self, doc: Document) -> None:
        ref = _ref(doc)
        annotations = self.annotations(ref, doc.obj)
        resolved = resolve(annotations, self.namespaces.get(ref.namespace, {}), self.defaults)
        for problem in resolved.problems:
            if problem.level == "service":
                self.report(_annotation_finding(ref, problem))
        calls, _ = _calls_of(ref, annotations)  # a bad list is among the problems
        service = Service(
            name=ref.name,
            namespace=ref.namespace,
            ref=ref,
            policy=resolved.policy,
            origins=dict(resolved.origins),
            calls=calls,
            defaults_source=self.defaults_source,
        )
        self.topology.services[service.key] = service
        spec = doc.obj.get("spec")
        spec = spec if isinstance(spec, dict) else {}
        selector = spec.get("selector")
        if spec.get("type") == "ExternalName":
            self.external.add(service.key)
        elif isinstance(selector, dict) and selector:
            self.selectors[service.key] = {str(k): str(v) for k, v in selector.items()}

    def workload(self, doc: Document) -> None:
        ref = _ref(doc)
        template: object = doc.obj
        for part in POD_TEMPLATES[ref.kind]:
            template = template.get(part) if isinstance(template, dict) else None
        template = template if isinstance(template, dict) else {}
        calls: list[Call] = []
        for obj in (doc.obj, template) if template is not doc.obj else (doc.obj,):
            annotations = self.annotations(ref, obj)
            for problem in check(annotations):  # a bad calls list, an unknown key
                if problem.key not in POLICY_KEYS:
                    self.report(_annotation_finding(ref, problem))
            more, _ = _calls_of(ref, annotations)
            calls += [c for c in more if c not in calls]
            for key in sorted(k for k in annotations if k in POLICY_KEYS):
                self.report(
                    finding("MisplacedAnnotation", ref,
                            f"{key} on {ref.kind} {ref.namespace}/{ref.name} does nothing: policy "
                            "is read from Services and Namespaces",
                            f"move {key} to the Service that selects these pods (or its "
                            "Namespace)")
                )  # fmt: skip
        replicas = 1 if ref.kind == "Pod" else _replicas(doc.obj) if ref.kind in SCALED else None
        self.workloads.append(_Workload(ref, _labels(_metadata(template)), calls, replicas))

    def autoscaler(self, doc: Document) -> None:
        ref = _ref(doc)
        spec = doc.obj.get("spec")
        if not isinstance(spec, dict) or not isinstance(spec.get("scaleTargetRef"), dict):
            return
        target = spec["scaleTargetRef"]
        minimum = spec.get("minReplicas", 1)
        if isinstance(minimum, int) and not isinstance(minimum, bool):
            key = (ref.namespace, str(target.get("kind")), str(target.get("name")))
            self.autoscaled[key] = (minimum, ref)

    def endpoint_slice(self, doc: Document) -> None:
        ref = _ref(doc)
        owner = _labels(_metadata(doc.obj)).get(SERVICE_NAME_LABEL)
        endpoints = doc.obj.get("endpoints")
        if owner is None or not isinstance(endpoints, list):
            return
        addresses, _ = self.addresses.setdefault((ref.namespace, owner), (set(), ref))
        for endpoint in endpoints:
            if not isinstance(endpoint, dict):
                continue
            conditions = endpoint.get("conditions")
            if isinstance(conditions, dict) and conditions.get("ready") is False:
                continue
            for address in endpoint.get("addresses") or []:
                addresses.add(str(address))

    def endpoints_object(self, doc: Document) -> None:
        ref = _ref(doc)
        addresses, _ = self.addresses.setdefault((ref.namespace, ref.name), (set(), ref))
        for subset in doc.obj.get("subsets") or []:
            if isinstance(subset, dict):
                for address in subset.get("addresses") or []:
                    if isinstance(address, dict):
                        addresses.add(str(address.get("ip")))

    # -- after every object is read ---------------------------------------------------------

    def _pods(self, workload: _Workload) -> tuple[int | None, str]:
        ref = workload.ref
        scaler = self.autoscaled.get((ref.namespace, ref.kind, ref.name))
        if scaler is not None:
            minimum, hpa = scaler
            return minimum, f"{hpa} scales {ref} down to minReplicas: {minimum}"
        if workload.replicas is None:
            return None, ""
        if ref.kind == "Pod":
            return 1, f"{ref} is a single pod"
        return workload.replicas, f"{ref} has replicas: {workload.replicas}"

    def link_workloads(self) -> None:
        counts: dict[tuple[str, str], list[tuple[int | None, str]]] = {}
        for workload in self.workloads:
            selected = [
                key
                for key, selector in self.selectors.items()
                if key[0] == workload.ref.namespace
                and all(workload.labels.get(k) == v for k, v in selector.items())
            ]
            for key in selected:
                service = self.topology.services[key]
                service.calls += [c for c in workload.calls if c not in service.calls]
                counts.setdefault(key, []).append(self._pods(workload))
            if not selected and workload.calls:
                self.topology.callers.append(Caller(workload.ref, workload.calls))
        for key, service in self.topology.services.items():
            if key in self.external:
                service.endpoints = Endpoints(1, f"{service.ref} is an ExternalName: one host")
            elif key in counts:
                pods = counts[key]
                if all(n is not None for n, _ in pods):
                    total = sum(n for n, _ in pods if n is not None)
                    service.endpoints = Endpoints(total, "; ".join(why for _, why in pods))
            elif key not in self.selectors and key in self.addresses:
                addresses, owner = self.addresses[key]
                service.endpoints = Endpoints(
                    len(addresses), f"{owner} lists {len(addresses)} ready address(es)"
                )

    def add_mesh(self, mesh: Mesh) -> None:
        for entry in mesh.services:
            ref = ObjectRef("MeshService", entry.name, entry.namespace, mesh.source)
            key = (entry.namespace, entry.name)
            existing = self.topology.services.get(key)
            if existing is not None:
                self.report(
                    finding("ServiceConflict", (existing.ref, ref),
                            f'{mesh.source}: service "{entry.name}" in namespace '
                            f"{entry.namespace} is also {existing.ref}: the Service is used, the "
                            "mesh file's entry ignored",
                            "rename or remove one of them")
                )  # fmt: skip
                continue
            count = len(entry.endpoints)
            shown = ", ".join(str(e) for e in entry.endpoints[:3]) + (", ..." if count > 3 else "")
            self.topology.services[key] = Service(
                name=entry.name,
                namespace=entry.namespace,
                ref=ref,
                policy=entry.policy,
                origins=dict(entry.origins),
                calls=[Call(target, ref) for target in entry.calls],
                endpoints=Endpoints(count, f"{mesh.source} lists {count} endpoint(s): {shown}"),
                mesh_source=mesh.source,
                defaults_source=mesh.source,
            )

    def check_calls(self) -> None:
        services = self.topology.services
        callers: list[tuple[str, list[Call]]] = [(s.namespace, s.calls) for s in services.values()]
        callers += [(c.namespace, c.calls) for c in self.topology.callers]
        for namespace, calls in callers:
            for call in calls:
                target_ns, target = call.key(namespace)
                if (target_ns, target) not in services:
                    self.report(
                        finding("UnknownCallee", call.by,
                                f'{call.by} calls "{call.target}" ({target}.{target_ns}), which '
                                "is not among the inputs: chains through it are not followed",
                                "add its Service to -f (or its entry to --mesh), or correct the "
                                "name")
                    )  # fmt: skip


def build(documents: Sequence[Document], mesh_path: str | None) -> Topology:
    """The topology of the documents (see `read_documents`) and the mesh file, if any."""
    mesh: Mesh | None = None
    mesh_findings: list[Finding] = []
    if mesh_path is not None:
        try:
            mesh = load_mesh(mesh_path)
        except MeshError as exc:
            mesh_findings.append(
                finding("InvalidMeshFile", _file_ref(mesh_path), str(exc),
                        "correct the field the message names (the README's Mesh file section "
                        "lists every key)")
            )  # fmt: skip
    defaults: PolicyValues = mesh.defaults if mesh is not None else MappingProxyType({})
    builder = _Builder(defaults, mesh.source if mesh is not None else None)
    builder.topology.findings += mesh_findings
    builder.topology.objects = len(documents)
    by_kind: dict[str, list[Document]] = {}
    for doc in documents:
        by_kind.setdefault(str(doc.obj["kind"]), []).append(doc)
    # Namespaces first: their annotations are under their Services'.
    for doc in by_kind.get("Namespace", []):
        builder.namespace(doc)
    for doc in by_kind.get("Service", []):
        builder.service(doc)
    for kind in POD_TEMPLATES:
        for doc in by_kind.get(kind, []):
            builder.workload(doc)
    for doc in by_kind.get("HorizontalPodAutoscaler", []):
        builder.autoscaler(doc)
    for doc in by_kind.get("EndpointSlice", []):
        builder.endpoint_slice(doc)
    for doc in by_kind.get("Endpoints", []):
        builder.endpoints_object(doc)
    builder.link_workloads()
    if mesh is not None:
        builder.add_mesh(mesh)
    builder.check_calls()
    return builder.topology
