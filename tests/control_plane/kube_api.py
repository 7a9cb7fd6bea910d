"""A strict fake of the Kubernetes API server: real HTTP on 127.0.0.1, the list/watch protocol.

No real API server can run here, so the control plane's Kubernetes source is tested with its real
client library (kubernetes_asyncio) against this server, which speaks the wire protocol of the
Kubernetes API reference ("API Concepts": efficient detection of changes, watch bookmarks,
410 Gone, chunked lists) for the resources the source uses:

- `GET /api/v1/services`, `/api/v1/namespaces/{ns}/services`,
  `/apis/discovery.k8s.io/v1/endpointslices`, `/apis/discovery.k8s.io/v1/namespaces/{ns}/
  endpointslices`, `/api/v1/namespaces` (`fieldSelector=metadata.name=X` only): a List (items
  without kind/apiVersion, as the API returns them; `limit`/`continue` pages), or with
  `watch=true` a chunked stream of `{"type": ..., "object": ...}` lines: ADDED, MODIFIED,
  DELETED, BOOKMARK (with `allowWatchBookmarks`), ERROR (a Status).
- `POST /apis/events.k8s.io/v1/namespaces/{ns}/events`: an Event, validated, stored.
- `GET`, `PUT` and `PATCH` of one named Secret (`/api/v1/namespaces/{ns}/secrets/{name}`) or
  webhook configuration (`/apis/admissionregistration.k8s.io/v1/{mutating,validating}
  webhookconfigurations/{name}`), what `webhook.certificates: self` uses. Optimistic
  concurrency as the API server has it: a PUT or a PATCH carrying a `metadata.resourceVersion`
  other than the stored one gets 409 Conflict. PATCH is a strategic merge (webhooks merge by
  `name`) or a JSON merge patch. These kinds are never listed or watched (RBAC grants them by
  name only), and there is no create: the chart makes them.
- `labelSelector=kubernetes.io/service-name=NAME` on EndpointSlice lists (`outrigger status`
  finds the control plane's replicas so).

Objects get what the API server adds (uid, resourceVersion, creationTimestamp, a Service's
defaults and ClusterIP, a Namespace's finalizers and status) and every stored object is checked
with kubernetes-validate's strict schema, so fixtures are shaped as the API returns them.

resourceVersion is one counter for everything (etcd's revision). Each collection keeps its event
history back to its compaction point; `compact()` drops it: a watch from an older version gets
an ERROR event with a 410 Expired Status (HTTP 200, as the watch cache answers) and ends.

Strict: a request the real client should never make is recorded in `mistakes` (and answered as
the API would: 404, 400, 410), and the `kube_api` fixture fails the test if any was made: an
unknown path or query parameter, a watch without a resourceVersion or without bookmarks, a
resourceVersion the server never issued, a watch again from an expired version without listing
first, a malformed Event, a missing bearer token (when the server has one), an update without a
resourceVersion (it would overwrite blindly what another writer put there), a Secret whose data
is not base64, a patch that leaves an object the schema refuses.

`access()` names what each recorded request needs from RBAC (the API server's RequestInfo):
(group, resource, verb, namespace, name), for comparing with the chart's rules.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import ipaddress
import itertools
import json
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
from aiohttp import web

K8S_VERSION = "1.37.0"
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_LIST_PARAMS = frozenset(
    {
        "limit",
        "continue",
        "resourceVersion",
        "resourceVersionMatch",
        "fieldSelector",
        "labelSelector",
        "timeoutSeconds",
        "watch",
        "allowWatchBookmarks",
        "pretty",
        "sendInitialEvents",
    }
)


@dataclass(frozen=True)
class Resource:
    group_version: str  # "v1", "discovery.k8s.io/v1"
    plural: str
    kind: str
    namespaced: bool

    @property
    def prefix(self) -> str:
        return "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"


SERVICES = Resource("v1", "services", "Service", True)
SLICES = Resource("discovery.k8s.io/v1", "endpointslices", "EndpointSlice", True)
NAMESPACES = Resource("v1", "namespaces", "Namespace", False)
RESOURCES = {r.kind: r for r in (SERVICES, SLICES, NAMESPACES)}  # listed and watched
SECRETS = Resource("v1", "secrets", "Secret", True)
MUTATING = Resource(
    "admissionregistration.k8s.io/v1",
    "mutatingwebhookconfigurations",
    "MutatingWebhookConfiguration",
    False,
)
VALIDATING = Resource(
    "admissionregistration.k8s.io/v1",
    "validatingwebhookconfigurations",
    "ValidatingWebhookConfiguration",
    False,
)
NAMED = {r.kind: r for r in (SECRETS, MUTATING, VALIDATING)}  # read, updated, patched by name
KINDS = {**RESOURCES, **NAMED}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
# Lists whose items merge by a key under a strategic merge patch (the Go types' patchMergeKey).
MERGE_KEYS = {"webhooks": "name"}
MERGE_PATCHES = ("application/strategic-merge-patch+json", "application/merge-patch+json")


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def conflict(resource: Resource, name: str) -> dict[str, Any]:
    body = status(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
    )
    body["details"] = {"name": name, "kind": resource.plural}
    return body


@dataclass(eq=False)
class _Watch:
    resource: Resource
    namespace: str | None
    name: str | None  # fieldSelector metadata.name
    service: str | None = None  # labelSelector kubernetes.io/service-name=
    queue: asyncio.Queue[tuple[str, dict[str, Any]] | None] = field(default_factory=asyncio.Queue)

    def wants(self, obj: dict[str, Any]) -> bool:
        meta = obj["metadata"]
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.service is not None and (
            (meta.get("labels") or {}).get(SERVICE_NAME_LABEL) != self.service
        ):
            return False
        return self.name is None or meta["name"] == self.name


@dataclass(frozen=True)
class Access:
    """What a request needs from RBAC, as the API server's RequestInfo names it."""

    group: str
    resource: str
    verb: str
    namespace: str = ""  # "" for cluster-scoped objects and requests across all namespaces
    name: str = ""  # "" for collections (or the name a list's fieldSelector pins)


_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def access(method: str, path: str, query: dict[str, str]) -> Access:
    """The RBAC attributes of a resource request (k8s.io/apiserver's RequestInfoFactory)."""
    parts = path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    elif parts[0] == "apis":
        group, rest = parts[1], parts[3:]
    else:
        raise ValueError(f"not a resource request: {path}")
    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace = rest[1]
        if len(rest) > 2:
            rest = rest[2:]
    resource, name = rest[0], rest[1] if len(rest) > 1 else ""
    if resource == "namespaces":
        namespace = ""  # a Namespace is cluster-scoped
    if method == "GET" and not name:
        verb = "watch" if query.get("watch") in _TRUE else "list"
        selector = query.get("fieldSelector", "")
        if selector.startswith("metadata.name=") and "," not in selector:
            name = selector.removeprefix("metadata.name=")
    else:
        verb = "get" if method == "GET" else _VERBS[method]
    return Access(group, resource, verb, namespace, name)


class FakeKubeApi:
    def __init__(
        self,
        *,
        bookmark_interval: float = 0.3,
        max_watch: float = 30.0,
        token: str | None = None,
    ) -> None:
        self.bookmark_interval = bookmark_interval
        self.token = token  # when set, every request must carry "Authorization: Bearer TOKEN"
        self.max_watch = max_watch  # upper bound on a watch's life, whatever timeoutSeconds says
        self.revision = 1000
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {k: {} for k in KINDS}
        self.history: dict[str, list[tuple[int, str, dict[str, Any]]]] = {k: [] for k in KINDS}
        self.compacted: dict[str, int] = dict.fromkeys(RESOURCES, 0)
        self.mistakes: list[str] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []  # (method, path, query)
        self.events: list[dict[str, Any]] = []  # Events POSTed
        self.port = 0
        self._held: dict[str, asyncio.Barrier] = {}  # kind -> GETs answered together
        self._must_relist: set[tuple[str, str | None]] = set()
        self._watches: set[_Watch] = set()
        self._pages: dict[str, list[dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None
        self._cluster_ips = (f"10.96.{i // 250}.{i % 250 + 1}" for i in itertools.count(10))

    # -- server -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        """Close the port and every connection (watches end mid-stream)."""
        for watch in list(self._watches):
            watch.queue.put_nowait(None)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def restart(self, *, keep_history: bool = True) -> None:
        """Stop, then serve the same objects on the same port. Without `keep_history`, as a
        real API server's new watch cache: only versions from now on can be watched from."""
        await self.stop()
        if not keep_history:
            self.compact()
        await self.start()

    def compact(self) -> None:
        """Forget the event history: watching from any version issued so far answers 410."""
        for kind in RESOURCES:
            self.history[kind].clear()
            self.compacted[kind] = self.revision

    def end_watches(self) -> None:
        """End every open watch cleanly (as the server does at timeoutSeconds)."""
        for watch in list(self._watches):
            watch.queue.put_nowait(None)

    def hold_reads(self, kind: str, parties: int = 2) -> None:
        """Answer the next `parties` GETs of a `kind` object together, once all have arrived
        (within 5 s): replicas that start at once read the same version, as in a real race."""
        self._held[kind] = asyncio.Barrier(parties)

    def accesses(self) -> list[Access]:
        """What every request so far needed from RBAC, in order."""
        return [access(method, path, query) for method, path, query in self.requests]

    def requests_to(self, path: str, *, watch: bool | None = None) -> list[dict[str, str]]:
        return [
            q
            for _, p, q in self.requests
            if p == path and (watch is None or (q.get("watch") in _TRUE) == watch)
        ]

    # -- objects ------------------------------------------------------------------------------

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        resource = KINDS[obj["kind"]]
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        key = (meta.get("namespace", ""), meta["name"])
        assert key not in self.objects[resource.kind], f"{resource.kind} {key} exists"
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        _DEFAULTS[resource.kind](self, obj)
        return self._store("ADDED", resource, key, obj)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        resource = KINDS[obj["kind"]]
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        old = self.objects[resource.kind][key]
        for kept in ("uid", "creationTimestamp"):
            meta[kept] = old["metadata"][kept]
        _DEFAULTS[resource.kind](self, obj)
        return self._store("MODIFIED", resource, key, obj)

    def edit(self, kind: str, namespace: str, name: str, change: Callable[[Any], None]) -> Any:
        """Update an object by changing a copy of what is stored."""
        obj = copy.deepcopy(self.objects[kind][(namespace, name)])
        change(obj)
        return self.update(obj)

    def delete(self, kind: str, namespace: str, name: str) -> None:
        resource = RESOURCES[kind]
        obj = self.objects[kind].pop((namespace, name))
        self.revision += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.revision)
        self._emit("DELETED", resource, obj)

    def get(self, kind: str, namespace: str, name: str) -> Any:
        return self.objects[kind][(namespace, name)]

    def _store(
        self, event: str, resource: Resource, key: tuple[str, str], obj: dict[str, Any]
    ) -> dict[str, Any]:
        self.revision += 1
        obj["metadata"]["resourceVersion"] = str(self.revision)
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        self.objects[resource.kind][key] = obj
        self._emit(event, resource, obj)
        return obj

    def _emit(self, event: str, resource: Resource, obj: dict[str, Any]) -> None:
        self.history[resource.kind].append((self.revision, event, obj))
        for watch in list(self._watches):
            if watch.resource is resource and watch.wants(obj):
                watch.queue.put_nowait((event, obj))

    # -- HTTP ---------------------------------------------------------------------------------

    def _mistake(self, request: web.Request, what: str) -> None:
        self.mistakes.append(f"{request.method} {request.path_qs}: {what}")

    def _reply(self, code: int, reason: str, message: str) -> web.Response:
        return web.json_response(status(code, reason, message), status=code)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        self.requests.append((request.method, request.path, query))
        authorization = request.headers.get("Authorization")
        if self.token is not None and authorization != f"Bearer {self.token}":
            self._mistake(request, "no or the wrong bearer token")
            return self._reply(401, "Unauthorized", "Unauthorized")
        parts = request.path.strip("/").split("/")
        if request.method == "POST":
            return await self._post_event(request, parts)
        named = self._route_named(parts)
        if named is not None:
            return await self._named(request, *named)
        if request.method != "GET":
            self._mistake(request, f"{request.method} of a collection or an unknown object")
            return self._reply(405, "MethodNotAllowed", "method not allowed")
        found = self._route(parts)
        if found is None:
            self._mistake(request, "no such collection")
            return self._reply(404, "NotFound", f"the server could not find {request.path}")
        resource, namespace = found
        unknown = set(query) - _LIST_PARAMS
        if unknown:
            self._mistake(request, f"unknown query parameters {sorted(unknown)}")
            return self._reply(400, "BadRequest", f"unknown parameters {sorted(unknown)}")
        name = None
        selector = query.get("fieldSelector")
        if selector is not None:
            if resource is not NAMESPACES or not selector.startswith("metadata.name="):
                self._mistake(request, f"fieldSelector {selector!r} is not used by the source")
                return self._reply(400, "BadRequest", "unsupported field selector")
            name = selector.removeprefix("metadata.name=")
        service = None
        labels = query.get("labelSelector")
        if labels is not None:
            if resource is not SLICES or not labels.startswith(f"{SERVICE_NAME_LABEL}="):
                self._mistake(request, f"labelSelector {labels!r} is not used by Outrigger")
                return self._reply(400, "BadRequest", "unsupported label selector")
            service = labels.removeprefix(f"{SERVICE_NAME_LABEL}=")
        watch = query.get("watch", "false")
        if watch not in _TRUE | _FALSE:
            self._mistake(request, f"watch={watch!r} is not a boolean")
            return self._reply(400, "BadRequest", "bad watch")
        if watch in _TRUE:
            if service is not None:
                self._mistake(request, "a watch with a labelSelector is not used by Outrigger")
            return await self._watch(request, resource, namespace, name, query)
        return self._list(request, resource, namespace, name, query, service)

    def _route(self, parts: list[str]) -> tuple[Resource, str | None] | None:
        for resource in RESOURCES.values():
            prefix = resource.prefix.strip("/").split("/")
            if parts[: len(prefix)] != prefix:
                continue
            rest = parts[len(prefix) :]
            if rest == [resource.plural]:
                return resource, None
            namespaced = resource.namespaced and len(rest) == 3 and rest[0] == "namespaces"
            if namespaced and rest[2] == resource.plural:
                return resource, rest[1]
        return None

    def _route_named(self, parts: list[str]) -> tuple[Resource, str, str] | None:
        """(resource, namespace, name) of a Secret or webhook configuration path."""
        for resource in NAMED.values():
            prefix = resource.prefix.strip("/").split("/")
            if parts[: len(prefix)] != prefix:
                continue
            rest = parts[len(prefix) :]
            namespaced = len(rest) == 4 and rest[0] == "namespaces" and rest[2] == resource.plural
            if resource.namespaced and namespaced:
                return resource, rest[1], rest[3]
            if not resource.namespaced and len(rest) == 2 and rest[0] == resource.plural:
                return resource, "", rest[1]
        return None

    def _matching(
        self,
        resource: Resource,
        namespace: str | None,
        name: str | None,
        service: str | None = None,
    ) -> list[dict[str, Any]]:
        probe = _Watch(resource, namespace, name, service)
        objects = self.objects[resource.kind]
        return [objects[k] for k in sorted(objects) if probe.wants(objects[k])]

    def _list(
        self,
        request: web.Request,
        resource: Resource,
        namespace: str | None,
        name: str | None,
        query: dict[str, str],
        service: str | None,
    ) -> web.Response:
        if query.get("resourceVersion", "") not in ("", "0"):
            self._mistake(request, "a list from a past resourceVersion is not used by the source")
        for flag in ("allowWatchBookmarks", "timeoutSeconds"):
            if flag in query:
                self._mistake(request, f"{flag} on a list (it is a watch parameter)")
        self._must_relist.discard((resource.kind, namespace))
        token = query.get("continue")
        if token is not None:
            if token not in self._pages:
                self._mistake(request, "a continue token this server never issued")
                return self._reply(410, "Expired", "the continue token is not valid")
            items, version = self._pages.pop(token), token.split(":")[0]
        else:
            items = [_without_type(o) for o in self._matching(resource, namespace, name, service)]
            version = str(self.revision)
        limit = int(query.get("limit", "0") or 0)
        meta: dict[str, Any] = {"resourceVersion": version}
        if limit and len(items) > limit:
            rest = items[limit:]
            items = items[:limit]
            token = f"{version}:{base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()}"
            self._pages[token] = rest
            meta["continue"] = token
            meta["remainingItemCount"] = len(rest)
        return web.json_response(
            {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.group_version,
                "metadata": meta,
                "items": items,
            }
        )

    async def _watch(
        self,
        request: web.Request,
        resource: Resource,
        namespace: str | None,
        name: str | None,
        query: dict[str, str],
    ) -> web.StreamResponse:
        version = query.get("resourceVersion", "")
        if not version or version == "0":
            self._mistake(request, "a watch must start from a list's resourceVersion")
            return self._reply(400, "BadRequest", "resourceVersion required")
        if query.get("allowWatchBookmarks") not in _TRUE:
            self._mistake(request, "a watch without allowWatchBookmarks=true")
        if not version.isdigit() or int(version) > self.revision:
            self._mistake(request, f"resourceVersion {version} was never issued")
            return self._reply(400, "BadRequest", "unknown resourceVersion")
        scope = (resource.kind, namespace)
        if scope in self._must_relist:
            self._mistake(request, "watched again from an expired resourceVersion without a list")
        since = int(version)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event: str, obj: dict[str, Any]) -> None:
            await response.write(json.dumps({"type": event, "object": obj}).encode() + b"\n")

        if since < self.compacted[resource.kind]:
            self._must_relist.add(scope)
            message = f"too old resource version: {since} ({self.compacted[resource.kind]})"
            await send("ERROR", status(410, "Expired", message))
            return response
        probe = _Watch(resource, namespace, name)
        self._watches.add(probe)
        try:
            for rv, event, obj in self.history[resource.kind]:
                if rv > since and probe.wants(obj):
                    await send(event, obj)
            timeout = min(float(query.get("timeoutSeconds", self.max_watch)), self.max_watch)
            bookmarks = query.get("allowWatchBookmarks") in _TRUE
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (left := deadline - loop.time()) > 0:
                try:
                    async with asyncio.timeout(min(left, self.bookmark_interval)):
                        item = await probe.queue.get()
                except TimeoutError:
                    if bookmarks and loop.time() < deadline:
                        await send("BOOKMARK", _bookmark(resource, self.revision))
                    continue
                if item is None:
                    break
                await send(*item)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._watches.discard(probe)
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
        return response

    async def _named(
        self, request: web.Request, resource: Resource, namespace: str, name: str
    ) -> web.Response:
        """GET, PUT (update) or PATCH of one Secret or webhook configuration."""
        if request.query:
            self._mistake(request, f"query parameters {sorted(request.query)} are not used")
        stored = self.objects[resource.kind].get((namespace, name))
        if request.method not in ("GET", "PUT", "PATCH"):
            self._mistake(request, f"{request.method} of a {resource.kind}: only get/update/patch")
            return self._reply(405, "MethodNotAllowed", "method not allowed")
        if stored is None:
            return self._reply(404, "NotFound", f'{resource.plural} "{name}" not found')
        if request.method == "PATCH" and request.content_type not in MERGE_PATCHES:
            kind = request.content_type
            self._mistake(request, f"a patch of type {kind} (the fake applies merge patches only)")
            return self._reply(415, "UnsupportedMediaType", f"unsupported {kind}")
        if request.method == "GET":
            barrier = self._held.get(resource.kind)
            if barrier is not None:
                with contextlib.suppress(TimeoutError, asyncio.BrokenBarrierError):
                    async with asyncio.timeout(5):
                        if await barrier.wait() == 0:
                            del self._held[resource.kind]
                stored = self.objects[resource.kind][(namespace, name)]
            return web.json_response(stored)
        try:
            body = await request.json(loads=json.loads)
        except ValueError:
            self._mistake(request, "a body that is not JSON")
            return self._reply(400, "BadRequest", "not JSON")
        if not isinstance(body, dict):
            self._mistake(request, "a body that is not a JSON object")
            return self._reply(400, "BadRequest", "not a JSON object")
        version = (body.get("metadata") or {}).get("resourceVersion")
        if request.method == "PUT":
            if version is None:
                self._mistake(
                    request,
                    "an update without metadata.resourceVersion (overwrites blindly what "
                    "another writer put there)",
                )
            wanted = copy.deepcopy(body)
        else:
            strategic = request.content_type == "application/strategic-merge-patch+json"
            wanted = _merge(stored, body, strategic=strategic)
        if version is not None and version != stored["metadata"]["resourceVersion"]:
            return web.json_response(conflict(resource, name), status=409)
        problems = _named_problems(resource, namespace, name, stored, wanted)
        if not problems:
            wanted["metadata"].pop("managedFields", None)
            for kept in ("uid", "creationTimestamp"):
                wanted["metadata"][kept] = stored["metadata"][kept]
            try:
                updated = self._store("MODIFIED", resource, (namespace, name), wanted)
                return web.json_response(updated)
            except kubernetes_validate.ValidationError as exc:
                problems = [f"not a valid {resource.kind}: {exc.message}"]
        for problem in problems:
            self._mistake(request, problem)
        return self._reply(422, "Invalid", "; ".join(problems))

    async def _post_event(self, request: web.Request, parts: list[str]) -> web.Response:
        if (
            len(parts) != 6
            or parts[:5] != ["apis", "events.k8s.io", "v1", "namespaces", parts[4]]
            or parts[5] != "events"
        ):
            self._mistake(request, "POST is only for events.k8s.io/v1 Events")
            return self._reply(404, "NotFound", "not found")
        namespace = parts[4]
        try:
            body = await request.json()
        except ValueError:
            self._mistake(request, "an Event that is not JSON")
            return self._reply(400, "BadRequest", "not JSON")
        problems = _event_problems(body, namespace)
        event = copy.deepcopy(body)
        meta = event.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        if "name" not in meta:
            meta["name"] = meta.get("generateName", "event.") + uuid.uuid4().hex[:10]
        meta.pop("generateName", None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        self.revision += 1
        meta["resourceVersion"] = str(self.revision)
        try:
            kubernetes_validate.validate(event, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"not a valid events.k8s.io/v1 Event: {exc.message}")
        if problems:
            for problem in problems:
                self._mistake(request, problem)
            return self._reply(422, "Invalid", "; ".join(problems))
        self.events.append(event)
        return web.json_response(event, status=201)


def _without_type(obj: dict[str, Any]) -> dict[str, Any]:
    """A list item as the API returns it: no kind, no apiVersion."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _bookmark(resource: Resource, revision: int) -> dict[str, Any]:
    return {
        "kind": resource.kind,
        "apiVersion": resource.group_version,
        "metadata": {"resourceVersion": str(revision)},
    }


def _event_problems(body: Any, namespace: str) -> list[str]:
    if not isinstance(body, dict):
        return ["an Event must be a JSON object"]
    problems = []
    if (body.get("apiVersion"), body.get("kind")) != ("events.k8s.io/v1", "Event"):
        problems.append("apiVersion/kind must be events.k8s.io/v1 Event")
    if (body.get("metadata") or {}).get("namespace", namespace) != namespace:
        problems.append("metadata.namespace differs from the path's namespace")
    for required in ("eventTime", "reportingController", "reportingInstance", "action", "reason"):
        if not body.get(required):
            problems.append(f"{required} is required on a new Event")
    regarding = body.get("regarding") or {}
    if not regarding.get("kind") or not regarding.get("name"):
        problems.append("regarding must name the object (kind, name)")
    return problems


def _merge(target: Any, patch: Any, *, strategic: bool) -> Any:
    """RFC 7386 JSON merge patch; `strategic` also merges the lists in MERGE_KEYS by their key
    (Kubernetes' strategic merge patch, for the fields this fake serves)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif strategic and key in MERGE_KEYS and isinstance(value, list):
            merge_key = MERGE_KEYS[key]
            items = copy.deepcopy(result.get(key) or [])
            for item in value:
                at = [i for i, old in enumerate(items) if old.get(merge_key) == item[merge_key]]
                if at:
                    items[at[0]] = _merge(items[at[0]], item, strategic=True)
                else:
                    items.append(copy.deepcopy(item))
            result[key] = items
        else:
            result[key] = _merge(result.get(key), value, strategic=strategic)
    return result


def _named_problems(
    resource: Resource, namespace: str, name: str, stored: dict[str, Any], wanted: dict[str, Any]
) -> list[str]:
    problems = []
    if (wanted.get("apiVersion"), wanted.get("kind")) != (resource.group_version, resource.kind):
        problems.append(f"apiVersion/kind must be {resource.group_version} {resource.kind}")
    meta = wanted.get("metadata") or {}
    if meta.get("name") != name or meta.get("namespace", "") != namespace:
        problems.append("metadata.name/namespace differ from the path's")
    if resource is SECRETS:
        if wanted.get("type", "Opaque") != stored.get("type", "Opaque"):
            problems.append("a Secret's type is immutable")
        for key, value in (wanted.get("data") or {}).items():
            try:
                base64.b64decode(value, validate=True)
            except (ValueError, TypeError):
                problems.append(f"data[{key!r}] is not base64")
    return problems


# -- what the API server fills in (defaulting and allocation) ---------------------------------


def _service_defaults(api: FakeKubeApi, obj: dict[str, Any]) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports", []):
        port.setdefault("protocol", "TCP")
        if spec["type"] != "ExternalName":
            port.setdefault("targetPort", port["port"])
    if spec["type"] != "ExternalName":
        if "clusterIP" not in spec:
            spec["clusterIP"] = next(api._cluster_ips)
        if spec["clusterIP"] != "None":
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            version = ipaddress.ip_address(spec["clusterIP"]).version
            spec.setdefault("ipFamilies", [f"IPv{version}"])
        else:
            spec.setdefault("clusterIPs", ["None"])
            spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    obj.setdefault("status", {"loadBalancer": {}})


def _slice_defaults(api: FakeKubeApi, obj: dict[str, Any]) -> None:
    for port in obj.get("ports") or []:
        port.setdefault("protocol", "TCP")


def _namespace_defaults(api: FakeKubeApi, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
    obj.setdefault("spec", {"finalizers": ["kubernetes"]})
    obj.setdefault("status", {"phase": "Active"})


def _secret_defaults(api: FakeKubeApi, obj: dict[str, Any]) -> None:
    obj.setdefault("type", "Opaque")


def _no_defaults(api: FakeKubeApi, obj: dict[str, Any]) -> None:
    pass


_DEFAULTS: dict[str, Callable[[FakeKubeApi, dict[str, Any]], None]] = {
    "Service": _service_defaults,
    "EndpointSlice": _slice_defaults,
    "Namespace": _namespace_defaults,
    "Secret": _secret_defaults,
    "MutatingWebhookConfiguration": _no_defaults,
    "ValidatingWebhookConfiguration": _no_defaults,
}


# -- fixtures for objects ----------------------------------------------------------------------


def namespace(name: str, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def service(
    name: str,
    ns: str,
    ports: list[dict[str, Any]] | None = None,
    *,
    annotations: dict[str, str] | None = None,
    selector: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if annotations:
        meta["annotations"] = annotations
    body: dict[str, Any] = {"ports": ports if ports is not None else [{"name": "http", "port": 80}]}
    if selector is not None:
        body["selector"] = selector
    body.update(spec)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def endpoint_slice(
    name: str,
    ns: str,
    service_name: str,
    addresses: list[str],
    port: int,
    *,
    port_name: str = "http",
    ready: bool = True,
    terminating: bool | None = None,
    serving: bool | None = None,
    hostnames: list[str] | None = None,
) -> dict[str, Any]:
    """An EndpointSlice as the EndpointSlice controller writes it (or a hand-made one)."""
    endpoints = []
    for i, address in enumerate(addresses):
        conditions: dict[str, Any] = {"ready": ready}
        if serving is not None:
            conditions["serving"] = serving
        if terminating is not None:
            conditions["terminating"] = terminating
        endpoint: dict[str, Any] = {"addresses": [address], "conditions": conditions}
        if hostnames:
            endpoint["hostname"] = hostnames[i]
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv6" if ":" in (addresses[0] if addresses else "") else "IPv4",
        "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    }


def write_kubeconfig(path: Path, api: FakeKubeApi) -> Path:
    """A kubeconfig for `api` (with its bearer token, if it has one), as kubectl writes them."""
    user = f"{{token: {api.token}}}" if api.token is not None else "{}"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
        f"clusters:\n- name: fake\n  cluster: {{server: '{api.url}'}}\n"
        f"users:\n- name: fake\n  user: {user}\n"
        "contexts:\n- name: fake\n  context: {cluster: fake, user: fake}\n"
    )
    return path


async def until(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `check` until it returns something true (returned), or fail naming `what`."""
    try:
        async with asyncio.timeout(timeout):
            while not (found := check()):
                await asyncio.sleep(0.02)
            return found
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def running_api(**kwargs: Any) -> AsyncIterator[FakeKubeApi]:
    """A started fake API; fails the test if the client made a mistake."""
    api = FakeKubeApi(**kwargs)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()
    assert api.mistakes == [], "the client made mistakes:\n" + "\n".join(api.mistakes)
