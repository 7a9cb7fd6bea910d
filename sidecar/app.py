"""`outrigger sidecar`: the composition root. It wires the pieces and runs their lifecycle.

What each piece does lives in its own module: settings (`settings`), routing and snapshot
application (`routing`), the admin pages (`admin`), the metrics (`metrics`), the access log
(`telemetry.access_log`), where connections enter (`transport.listener`: the original
destination, then HTTP or TCP), the HTTP connections (`transport.server`), the pools
(`transport.upstream`), the xDS client (`xds.client`). Here: build them from the settings, apply
a snapshot and keep the books on it, start the listeners (the admin port, and in a pod the health
and metrics ports, each a page or two), sweep, drain.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mesh.address import join_host_port
from mesh.model import Mesh, MeshError, load_mesh, parse_mesh
from sidecar import admin
from sidecar.config import ConfigError, Endpoint, Snapshot
from sidecar.exchange import Request
from sidecar.gc_pause import GcPauses
from sidecar.loop_lag import LoopLag
from sidecar.metrics import BUCKETS, Metrics, Series
from sidecar.policy.breaker import BreakerEvent
from sidecar.policy.stack import ServiceRegistry
from sidecar.protocol import implementation as codec
from sidecar.protocol.events import RequestHead
from sidecar.routing import Active, Router
from sidecar.settings import SettingsError, SidecarSettings
from sidecar.telemetry import otlp_endpoint
from sidecar.telemetry.access_log import AccessLog
from sidecar.transport.listener import (
    Listener,
    ListenerSettings,
    OriginalDestination,
    addresses_to_bind,
    kernel_destination,
)
from sidecar.transport.server import (
    Completed,
    Decision,
    DownstreamProtocol,
    ServerSettings,
    ServerState,
)
from sidecar.transport.sniffer import SniffSettings
from sidecar.transport.tcp import TcpRecord
from sidecar.transport.upstream import Upstreams
from sidecar.xds.interpret import snapshot_from_mesh

if TYPE_CHECKING:
    from sidecar.telemetry.tracing import Tracing
    from sidecar.xds.client import XdsClient

log = logging.getLogger("outrigger.sidecar")

# Net new container objects between two young collections once the sidecar is settled (CPython:
# 700). With 256 connections in flight, the requests' own objects alone crossed 700 again and
# again: ~250 young collections a second that found nothing to free (every request's objects die
# by refcount; measured under wrk, none freed an object in 15 one-second windows of steady load),
# ~1.5% of the CPU and a pause every 4 ms. 10,000 is above what 256 requests in flight hold: no
# collection at all in 5 s runs at 256 connections, while garbage in cycles still waits for at
# most 10,000 new objects.
YOUNG_COLLECTION_THRESHOLD = 10_000


class Sidecar:
    def __init__(
        self,
        settings: SidecarSettings,
        server: ServerSettings | None = None,
        *,
        destination_of: OriginalDestination = kernel_destination,
    ) -> None:
        self.settings = settings
        self.server_settings = server or ServerSettings(
            stream_idle_timeout=settings.stream_idle_timeout
        )
        # How a connection's original destination is read: the kernel's SO_ORIGINAL_DST (tests
        # without iptables give a stand-in).
        self.destination_of = destination_of
        self.services = ServiceRegistry(on_event=self._policy_event)
        self.upstreams = Upstreams(
            services=self.services, stream_idle_timeout=self.server_settings.stream_idle_timeout
        )
        self.router = Router(
            self.services,
            self.upstreams.forward,
            Endpoint(*settings.app),
            settings.service,
            forward_h2=self.upstreams.forward_h2,
        )
        self.outbound_state = ServerState(self.server_settings)
        self.inbound_state = ServerState(self.server_settings)
        self.admin_state = ServerState(self.server_settings)
        self.loop_lag = LoopLag()
        self.gc_pauses = GcPauses()
        self.metrics = Metrics(
            settings.service,
            listeners={"outbound": self.outbound_state, "inbound": self.inbound_state},
            services=self.services,
            snapshot=self.router.snapshot,
            spans_dropped=self._spans_dropped,
            loop_lag=self.loop_lag,
            gc_pauses=self.gc_pauses,
        )
        self.access_log = AccessLog()
        self.addresses: dict[str, tuple[str, int]] = {}  # bound listeners, by name
        self.config_dump = admin.ConfigDump(
            {"id": settings.node_id, "service": settings.service, "namespace": settings.namespace},
            str(settings.mesh or settings.control_plane or "embedded default"),
            self.router.snapshot,
            self.addresses,
            settings.trace_sampling,
        )
        self.clusters = admin.Clusters(
            self.router.snapshot, self.services, self.upstreams.pools, self.upstreams.h2_pools
        )
        self.admin = admin.Admin(
            {
                b"/ready": admin.Ready(self.not_ready_reason),
                b"/live": admin.Live(),
                b"/stats/prometheus": admin.Prometheus(self.metrics.registry()),
                b"/config_dump": self.config_dump,
                b"/clusters": self.clusters,
                b"/drain": admin.Drain(self.request_drain),
            }
        )
        # The pod IP's two ports: one page each (the admin port stays on loopback).
        self.health = admin.Admin({b"/healthz/ready": admin.Ready(self.health_reason)})
        self.metrics_page = admin.Admin(
            {b"/stats/prometheus": admin.Prometheus(self.metrics.registry())}
        )
        self.xds: XdsClient | None = None  # managed mode: the control plane's client
        if settings.control_plane is not None:
            from sidecar.xds.client import XdsClient

            self.xds = XdsClient(
                settings.control_plane,
                node_id=settings.node_id,
                service=settings.service,
                namespace=settings.namespace,
                apply=self.apply,
                snapshot_cache=settings.snapshot_cache,
            )
        self.listening = False
        self.draining = False
        # A config from the control plane, the snapshot cache or --mesh was applied (the
        # embedded default does not count for /healthz/ready).
        self.configured = False
        self._servers: dict[str, list[asyncio.AbstractServer]] = {}  # by listener name
        self.listeners: dict[str, Listener] = {}  # outbound, inbound: where connections enter
        self._drain_requested: asyncio.Event | None = None
        self._settle_pending = False  # run() sets it: freeze the start-up heap once ready
        endpoint = otlp_endpoint(settings.otlp_endpoint, None)
        if endpoint is not None:
            self.trace_to(endpoint)

    # --- configuration -------------------------------------------------------------------

    @property
    def tracing(self) -> Tracing | None:
        """None: no tracing layer is built at all."""
        return self.router.tracing

    @property
    def active(self) -> Active | None:
        return self.router.active

    def trace_to(self, endpoint: str) -> None:
        """Turn tracing on, exporting OTLP to `endpoint` (imports the SDK only now)."""
        from sidecar.telemetry.tracing import Tracing, TracingSettings

        self.enable_tracing(Tracing(TracingSettings(self.settings.service, endpoint)))

    def enable_tracing(self, tracing: Tracing) -> None:
        """Trace from now on (before `apply` and `start`: the layers are built there)."""
        self.router.trace(tracing)
        snapshot = self.router.snapshot()
        if snapshot is not None or self.settings.trace_sampling is not None:
            tracing.set_sampling(self._sampling(snapshot))

    def _sampling(self, snapshot: Snapshot | None) -> float:
        """--trace-sampling when given, else the snapshot's (xDS) value."""
        if self.settings.trace_sampling is not None:
            return self.settings.trace_sampling
        return snapshot.trace_sampling if snapshot is not None else 0.01

    def _spans_dropped(self) -> dict[str, int]:
        tracing = self.router.tracing
        return tracing.drops if tracing is not None else {}

    def _policy_event(self, event: BreakerEvent) -> None:
        tracing = self.router.tracing
        if tracing is not None:
            tracing.on_breaker_event(event)

    def apply(self, snapshot: Snapshot, *, embedded: bool = False) -> None:
        """Build every service's stack, then swap them in at once (raises ConfigError).

        `embedded`: the embedded default, which serves but does not make the pod ready."""
        try:
            self.router.apply(snapshot)
        except ConfigError:
            self.metrics.config_rejected += 1
            raise
        if not embedded:
            self.configured = True
        self.metrics.config_version = snapshot.version
        self.metrics.config_applied += 1
        if self.tracing is not None:
            self.tracing.set_sampling(self._sampling(snapshot))
        log.info(
            "applied config version %s (%d services)", snapshot.version, len(snapshot.services)
        )
        self._settle_heap()

    def not_ready_reason(self) -> str:
        if self.draining:
            return "draining"
        if not self.listening:
            return "listeners not up yet"
        if self.router.active is None:
            return (
                f"no config yet (waiting for the control plane at {self.settings.control_plane}; "
                f"initial fetch timeout {self.settings.initial_fetch_timeout:g}s)"
            )
        return ""

    def health_reason(self) -> str:
        """/healthz/ready: as /ready, and only once a real config is applied."""
        problem = self.not_ready_reason()
        if problem or self.configured:
            return problem
        source = self.settings.control_plane or self.settings.mesh
        return (
            f"serving the embedded default only; no config from {source} yet"
            if source
            else "serving the embedded default only (give --control-plane or --mesh)"
        )

    # --- bookkeeping ---------------------------------------------------------------------

    def _completed(self, direction: str) -> Completed:
        """What a listener calls as each request cycle or HTTP/2 stream ends: metrics (with the
        gRPC status of a gRPC call), and the access log."""
        table = self.metrics.direction(direction)
        loop = asyncio.get_running_loop()
        access_log = self.access_log.record if self.settings.access_log else None

        def completed(
            head: RequestHead | None,
            decision: Decision | None,
            status: int,
            flags: str,
            start: float,
            request: Request | None,
            grpc_status: int | None,
        ) -> None:
            duration = loop.time() - start
            destination = decision.name if decision is not None else "-"
            series = table.get(destination)
            if series is None:
                series = table[destination] = Series()
            # Series.add, inline (a call less per request)
            by_flags = series.requests.get(status)
            if by_flags is None:
                by_flags = series.requests[status] = {}
            by_flags[flags] = by_flags.get(flags, 0) + 1
            series.counts[bisect_left(BUCKETS, duration)] += 1
            series.total += duration
            if grpc_status is not None and head is not None:  # an HTTP/2 stream's gRPC call
                series.add_grpc(head.path, grpc_status)
            if access_log is not None:
                access_log(
                    direction, head, destination, status, flags, duration, request, grpc_status
                )

        return completed

    async def _initial_fetch_deadline(self) -> None:
        """Managed mode: no config within initial_fetch_timeout -> serve the embedded default.

        The pod must not stay unready because the control plane is down at start (Envoy's
        initial_fetch_timeout); a config that arrives later replaces the default as usual.
        """
        timeout = self.settings.initial_fetch_timeout
        if timeout <= 0:
            return
        await asyncio.sleep(timeout)
        if self.router.active is None:
            log.warning(
                "no config from the control plane at %s within %gs: serving the embedded "
                "default (allow_any passthrough, no services) until it answers",
                self.settings.control_plane,
                timeout,
            )
            self.apply(snapshot_from_mesh(embedded_mesh(), self.settings.namespace), embedded=True)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.upstreams.sweep()
            self.access_log.flush()

    # --- lifecycle -----------------------------------------------------------------------

    def request_drain(self, reason: str) -> None:
        log.info("drain requested (%s)", reason)
        if self._drain_requested is not None:
            self._drain_requested.set()

    async def start(self) -> None:
        self._drain_requested = asyncio.Event()
        books = TcpBooks(self.metrics, self.access_log if self.settings.access_log else None)
        sniff = SniffSettings(detect_timeout=self.settings.detect_timeout)
        router = self.router
        traffic = (
            ("outbound", self.settings.outbound, self.outbound_state, router.outbound),
            ("inbound", self.settings.inbound, self.inbound_state, router.inbound),
        )
        h2_routes = {"outbound": router.outbound_h2, "inbound": router.inbound_h2}
        for name, (host, port), state, route in traffic:
            listener = Listener(
                ListenerSettings(name, sniff, self.settings.tcp_idle_timeout),
                state,
                route,
                self.router.snapshot,
                self.router.is_own,
                completed=self._completed(name),
                observer=books,
                destination_of=self.destination_of,
                h2_route=h2_routes[name],
            )
            self.listeners[name] = listener
            await self._listen(name, addresses_to_bind(host, port), port, listener)
            state.start()
        local = [("admin", self.settings.admin, self.admin.dispatch)]
        if self.settings.health is not None:
            local.append(("health", self.settings.health, self.health.dispatch))
        if self.settings.metrics is not None:
            local.append(("metrics", self.settings.metrics, self.metrics_page.dispatch))
        for name, (host, port), dispatch in local:

            def pages(dispatch: Any = dispatch) -> DownstreamProtocol:
                return DownstreamProtocol(self.admin_state, dispatch, None, request_ids=False)

            await self._listen(name, [host], port, pages)
        self.admin_state.start()
        self.loop_lag.start()
        self.gc_pauses.start()
        self.listening = True
        print(
            "outrigger sidecar listening "
            + " ".join(f"{k}={h}:{p}" for k, (h, p) in self.addresses.items()),
            flush=True,
        )
        # A sidecar on the pure-Python fallback codec is ~2x slower: say which one runs.
        log.info("HTTP/1.1 codec: %s (%s)", codec.NAME, codec.VARIABLE)
        self._settle_heap()

    async def _listen(
        self, name: str, hosts: list[str], port: int, factory: Callable[[], asyncio.Protocol]
    ) -> None:
        """Bind `hosts[0]` (its address is the listener's), then the others on the same port
        (the IPv6 twin of a redirect target: where the pod has no IPv6, it is skipped)."""
        loop = asyncio.get_running_loop()
        for i, host in enumerate(hosts):
            try:
                server = await loop.create_server(
                    factory, host, port, reuse_address=True, backlog=1024
                )
            except OSError as exc:
                if i == 0:
                    raise
                log.info("%s listener: not on %s (%s)", name, join_host_port(host, port), exc)
                continue
            self._servers.setdefault(name, []).append(server)
            address = server.sockets[0].getsockname()
            self.router.own.add(Endpoint(address[0], address[1]))
            if i == 0:
                self.addresses[name] = (address[0], address[1])
                port = address[1]

    def _settle_heap(self) -> None:
        """Once listening with a config (in `run` only), take start-up objects out of the GC.

        Modules, protobuf descriptors and the config (~35k objects) live as long as the process,
        yet every full collection walked them all: measured under wrk at 256 connections, ten
        full collections in 20 s stalled the loop ~14 ms each. After `gc.freeze()` they take
        ~2 ms and p99 fell from 31 to 24-26 ms (+2% req/s). Refcounting still frees frozen
        objects; only a reference cycle among them would never be collected.

        Then the young generation's threshold goes from 700 to `YOUNG_COLLECTION_THRESHOLD`
        (docs/architecture.md, "Garbage collection").
        """
        if not self._settle_pending or not self.listening or self.router.active is None:
            return
        self._settle_pending = False
        gc.collect()
        gc.freeze()
        gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, *gc.get_threshold()[1:])
        log.debug("froze %d start-up objects out of the cyclic GC", gc.get_freeze_count())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_drain, sig.name)
        self._settle_pending = True
        await self.start()
        tasks = [loop.create_task(self._housekeeping())]
        if self.xds is not None:
            tasks.append(loop.create_task(self.xds.run()))
            tasks.append(loop.create_task(self._initial_fetch_deadline()))
        assert self._drain_requested is not None
        await self._drain_requested.wait()
        clean = await self.drain()
        for task in tasks:
            task.cancel()
        self.access_log.flush()
        return 0 if clean else 1

    async def drain(self) -> bool:
        """Stop accepting, let in-flight requests and connections finish (bounded), close the
        rest; the admin, health and metrics ports last."""
        self.draining = True
        for name in ("outbound", "inbound"):
            for server in self._servers.get(name, []):
                server.close()
        timeout = self.settings.drain_timeout
        results = await asyncio.gather(
            self.outbound_state.drain(timeout),
            self.inbound_state.drain(timeout),
            *(listener.drain(timeout) for listener in self.listeners.values()),
        )
        self.upstreams.close_idle()
        for name, servers in self._servers.items():
            if name not in ("outbound", "inbound"):
                for server in servers:
                    server.close()
        await self.admin_state.drain(1.0)
        for state in (self.outbound_state, self.inbound_state, self.admin_state):
            state.stop()
        self.loop_lag.stop()
        self.gc_pauses.stop()
        if self.tracing is not None:
            await self.tracing.shutdown(min(5.0, self.settings.drain_timeout))
        log.info("drained%s", "" if all(results) else " (timeout: some requests were cut)")
        return all(results)


class TcpBooks:
    """The passed-through connections' books: metrics always, the access log when it is on."""

    __slots__ = ("access_log", "metrics")

    def __init__(self, metrics: Metrics, access_log: AccessLog | None) -> None:
        self.metrics = metrics
        self.access_log = access_log

    def tcp_opened(self, record: TcpRecord) -> None:
        self.metrics.tcp_opened(record)

    def tcp_closed(self, record: TcpRecord) -> None:
        self.metrics.tcp_closed(record)
        if self.access_log is not None:
            self.access_log.tcp(record)


def embedded_mesh() -> Mesh:
    """The default with neither --mesh nor --control-plane: no services, allow_any."""
    return parse_mesh({"services": []}, "<embedded default>")


def run_sidecar(args: argparse.Namespace) -> int:
    try:
        settings = SidecarSettings.from_args(args)
    except SettingsError as exc:
        print(f"outrigger sidecar: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        sidecar = Sidecar(settings)
        if sidecar.xds is not None:
            cached = sidecar.xds.load_cached()
            if cached is not None:
                try:
                    sidecar.apply(cached)
                    log.info("started from the cached snapshot %s", cached.version)
                except ConfigError as exc:
                    # A stale cache must not keep the pod down: wait for the control plane.
                    log.warning("ignoring the cached snapshot %s: %s", cached.version, exc)
        else:
            mesh = load_mesh(settings.mesh) if settings.mesh else embedded_mesh()
            endpoint = otlp_endpoint(None, mesh.tracing.otlp_endpoint)
            if sidecar.tracing is None and endpoint is not None:
                sidecar.trace_to(endpoint)
            embedded = settings.mesh is None
            sidecar.apply(snapshot_from_mesh(mesh, settings.namespace), embedded=embedded)
    except (SettingsError, MeshError, ConfigError) as exc:
        print(f"outrigger sidecar: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio still works
        return asyncio.run(sidecar.run())
    return uvloop.run(sidecar.run())
