"""The Kubernetes API as the control plane's source: Services, EndpointSlices and Namespaces.

`outrigger control-plane --kubernetes [--kubeconfig PATH] [--namespaces a,b] [--debounce 100ms]
[--mesh FILE]`. One `Reflector` per collection (per namespace with `--namespaces`: Namespaces
are then watched by name) keeps a `ClusterState`; `cluster.cluster_mesh` turns it into the mesh.

- The first update waits until every collection has been listed once (`SYNC_TIMEOUT`), so
  sidecars are never sent half a cluster.
- Changes are debounced: an update is built once the watches have been quiet for `debounce`
  (100 ms), or `max_delay` (10 x debounce) after the first change of a burst at the latest, so a
  rollout of 50 pods is a few pushes, not 50 (Istio's PILOT_DEBOUNCE_AFTER / _MAX). An object
  update that changes nothing the mesh reads causes no update at all.
- The update depends only on the cluster's objects (never on event order, times or
  resourceVersions), so two replicas watching one API compute the same snapshot versions, and an
  endpoint change leaves the Listener, RouteConfiguration and Cluster versions as they were: only
  EDS is pushed.
- `--mesh FILE` is the mesh-wide configuration (`defaults:`, `outbound_policy`, `tracing`) and may
  add services the cluster lacks; it is watched too. A file edit that does not validate is
  refused (logged, counted) and the last good file stays.
- Problems (invalid annotations, a name in both the file and the cluster) travel with each
  update; invalid annotations are also posted as Events (`events.EventRecorder`).

The client is kubernetes_asyncio: asyncio-native, generated from the API's OpenAPI spec, so
every list/watch parameter (allowWatchBookmarks, resourceVersion, limit/continue, timeouts) is
there by its API name, with the official client's kubeconfig and in-cluster loading.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

from kubernetes_asyncio import client as kube_client
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.config.config_exception import ConfigException

from control_plane.sources import Publish, SourceError, Update
from control_plane.sources.cluster import ClusterState, Kind, cluster_mesh
from control_plane.sources.events import EventRecorder
from control_plane.sources.file import read_mesh
from control_plane.sources.reflector import Backoff, Reflector
from control_plane.tasks import cancel_all
from control_plane.watch import FileWatcher
from mesh.model import Mesh

log = logging.getLogger("outrigger.control_plane.kubernetes")

SYNC_TIMEOUT: Final = 60.0


async def load_configuration(kubeconfig: Path | None) -> Any:
    """The API client configuration: from `kubeconfig` when given, else in-cluster (the pod's
    service account), else the default kubeconfig (KUBECONFIG or ~/.kube/config)."""
    configuration = kube_client.Configuration()
    try:
        if kubeconfig is not None:
            await kube_config.load_kube_config(
                config_file=str(kubeconfig), client_configuration=configuration
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            kube_config.load_incluster_config(client_configuration=configuration)
        else:
            await kube_config.load_kube_config(client_configuration=configuration)
    except (ConfigException, OSError, ValueError) as exc:
        where = kubeconfig or "the in-cluster service account or the default kubeconfig"
        raise SourceError(
            f"cannot load the Kubernetes client configuration ({where}): {exc}"
        ) from None
    return configuration


class KubernetesSource:
    def __init__(
        self,
        configuration: Any,
        *,
        namespaces: tuple[str, ...] = (),
        debounce: float = 0.1,
        max_delay: float | None = None,
        mesh_path: Path | None = None,
        instance: str | None = None,
        backoff: tuple[float, float] = (0.25, 30.0),
        watch_timeout: tuple[int, int] = (300, 600),
        sync_timeout: float = SYNC_TIMEOUT,
        on_restart: Callable[[str], None] | None = None,
    ) -> None:
        self.description = f"Kubernetes API {configuration.host}"
        self.namespaces = namespaces
        self.debounce = debounce
        self.max_delay = max_delay if max_delay is not None else 10 * debounce
        self.mesh_path = mesh_path
        self.sync_timeout = sync_timeout
        self.state = ClusterState()
        self.base = Mesh(source="no mesh file")
        self._api = kube_client.ApiClient(configuration)
        core = kube_client.CoreV1Api(self._api)
        discovery = kube_client.DiscoveryV1Api(self._api)
        self.events = EventRecorder(
            kube_client.EventsV1Api(self._api), instance or socket.gethostname()
        )
        self.file_error: SourceError | None = None  # a refused mesh file edit, not yet published
        self._changed = asyncio.Event()
        self._problems: Update | None = None  # the latest update, for the Event recorder
        self._problems_changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._file_watcher = (
            FileWatcher(mesh_path, self._file_changed, debounce=debounce)
            if mesh_path is not None
            else None
        )
        self.reflectors: list[Reflector] = []

        def add(
            kind: Kind, name: str, call: Any, params: Mapping[str, Any], scope: str | None
        ) -> None:
            self.reflectors.append(
                Reflector(
                    name,
                    call,
                    lambda items: self._listed(kind, items, scope),
                    lambda event, obj: self._event(kind, event, obj),
                    params=params,
                    backoff=Backoff(*backoff),
                    watch_timeout=watch_timeout,
                    on_restart=on_restart,
                )
            )

        if namespaces:
            for ns in namespaces:
                add("Service", f"services in {ns}", core.list_namespaced_service,
                    {"namespace": ns}, ns)  # fmt: skip
                add("EndpointSlice", f"endpointslices in {ns}",
                    discovery.list_namespaced_endpoint_slice, {"namespace": ns}, ns)  # fmt: skip
                add("Namespace", f"namespace {ns}", core.list_namespace,
                    {"field_selector": f"metadata.name={ns}"}, ns)  # fmt: skip
        else:
            add("Service", "services", core.list_service_for_all_namespaces, {}, None)
            add("EndpointSlice", "endpointslices",
                discovery.list_endpoint_slice_for_all_namespaces, {}, None)  # fmt: skip
            add("Namespace", "namespaces", core.list_namespace, {}, None)

    # -- the store -----------------------------------------------------------------------------

    def _listed(self, kind: Kind, items: list[Mapping[str, Any]], scope: str | None) -> None:
        if self.state.replace(kind, items, scope):
            self._changed.set()

    def _event(self, kind: Kind, event: str, obj: Mapping[str, Any]) -> None:
        changed = self.state.delete(kind, obj) if event == "DELETED" else self.state.put(kind, obj)
        if changed:
            self._changed.set()

    async def _file_changed(self) -> None:
        try:
            self.base = read_mesh(self.mesh_path) if self.mesh_path is not None else self.base
        except SourceError as exc:
            self.file_error = exc
            log.error("%s refused: %s (still using the last good one)", self.mesh_path, exc)
            self._changed.set()  # the control plane counts the refusal
            return
        self.file_error = None
        self._changed.set()

    # -- Source ---------------------------------------------------------------------------------

    async def first(self) -> Update:
        if self.mesh_path is not None:
            self.base = read_mesh(self.mesh_path)
        for reflector in self.reflectors:
            self._tasks.append(asyncio.create_task(reflector.run(), name=reflector.name))
        if self._file_watcher is not None:
            self._tasks.append(asyncio.create_task(self._file_watcher.run()))
        try:
            async with asyncio.timeout(self.sync_timeout):
                for reflector in self.reflectors:
                    await reflector.synced.wait()
        except TimeoutError:
            stuck = [r for r in self.reflectors if not r.synced.is_set()]
            raise SourceError(
                f"{self.description}: could not list "
                + ", ".join(f"{r.name} ({r.stats.last_error or 'no answer'})" for r in stuck)
                + f" within {self.sync_timeout:g}s"
            ) from None
        self._changed.clear()
        update = cluster_mesh(self.state, self.base)
        log.info("%s: listed %s", self.description, self.state.sizes())
        self._tasks.append(asyncio.create_task(self._post_events(), name="events"))
        self._note(update)
        return update

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            burst_start = loop.time()
            while True:  # debounce: quiet for `debounce`, or `max_delay` after the first change
                self._changed.clear()
                remaining = min(self.debounce, burst_start + self.max_delay - loop.time())
                if remaining <= 0:
                    break
                try:
                    async with asyncio.timeout(remaining):
                        await self._changed.wait()
                except TimeoutError:
                    break
            self._changed.clear()
            if self.file_error is not None:
                await publish(self.file_error)
                self.file_error = None
            update = cluster_mesh(self.state, self.base)
            await publish(update)
            self._note(update)

    def _note(self, update: Update) -> None:
        self._problems = update
        self._problems_changed.set()

    async def _post_events(self) -> None:
        """Post Events for the latest problems, apart from publishing (the API may be slow)."""
        while True:
            await self._problems_changed.wait()
            self._problems_changed.clear()
            if self._problems is not None:
                problems = self._problems.problems
                await self.events.record(p for p in problems if p.reason == "InvalidPolicy")

    async def close(self) -> None:
        await cancel_all(self._tasks)
        await self._api.close()
