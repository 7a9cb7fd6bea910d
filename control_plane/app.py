"""`outrigger control-plane`: a source (the mesh file, or the Kubernetes API), the snapshot
cache, ADS/CSDS/health over gRPC on the xDS port, `/metrics`, `/debug/syncz`,
`/debug/problemz`, `/ready`, `/live` on the HTTP port, and with `--webhook` the admission
webhooks over HTTPS (`/inject`, with the current mesh's `injection:` section; `/validate`, the
policy annotations of Services and Namespaces), their certificate read from files
(`--webhook-cert`, `--webhook-key`) or made and kept by the control plane itself
(`--webhook-secret`: see `control_plane.webhooks.keeper`).

`ControlPlane` assembles the pieces and is what tests start in process; `run_control_plane` is
the command. Each update from the source is translated (one set of resources per namespace, see
`mesh.translate`), checked and published as snapshots; an update that fails any of those steps is
logged with the reason, counted, and the last good snapshots keep being served. Problems the
source worked around (invalid annotations) are logged when they appear and when they are fixed,
counted in `outrigger_invalid_annotations_current` and `outrigger_invalid_annotations_total`
(seen), and shown by `/debug/problemz` and `outrigger status`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.status.v3 import csds_pb2_grpc
from google.protobuf import struct_pb2
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from control_plane.cache import (
    Lingering,
    SnapshotCache,
    SnapshotError,
    XdsSnapshot,
    make_snapshots,
    settled,
)
from control_plane.heap import HeapTrimmer
from control_plane.metrics import CONTENT_TYPE, ControlPlaneMetrics
from control_plane.server import (
    ADS_SERVICE,
    DEFAULT_MAX_STREAMS,
    AdsServer,
    CsdsServer,
    server_options,
    syncz,
    version_summary,
)
from control_plane.sources import Source, SourceError, SourceProblem, Update
from control_plane.sources.file import FileSource
from control_plane.status import PROBLEMS_METHOD, PROBLEMS_SERVICE
from control_plane.tasks import cancel_all
from control_plane.webhooks import inject, validate

if TYPE_CHECKING:  # keeper imports the Kubernetes client (~60 MiB): only when it is used
    from control_plane.webhooks.authority import TlsMaterial
    from control_plane.webhooks.keeper import CertificateKeeper, SelfCertificates
from control_plane.webhooks.server import WebhookError, WebhookServer
from mesh.address import join_host_port, split_host_port
from mesh.http import reason_phrase
from mesh.injection import Injection
from mesh.model import parse_call
from mesh.policy import parse_duration
from mesh.translate import Translation, translate_update

log = logging.getLogger("outrigger.control_plane")

HTTP_READ_TIMEOUT = 5.0
HTTP_MAX_HEAD = 16 * 1024


class ControlPlaneError(Exception):
    """The control plane cannot start (bad address, unusable first mesh)."""


class UsageError(ControlPlaneError):
    """The flags do not describe a control plane that can run (exit status 2)."""


def split_address(address: str) -> tuple[str, int]:
    """`127.0.0.1:15010`, `[::1]:15010`, `:15010` (all interfaces) -> (host, port)."""
    host, port = split_host_port(address) or ("", None)
    if port is None:
        raise ControlPlaneError(f"address {address!r} is not HOST:PORT")
    return host or "0.0.0.0", port


class ControlPlane:
    def __init__(
        self,
        mesh_path: Path | None = None,
        *,
        source: Source | None = None,
        poll_interval: float = 0.1,
        debounce: float = 0.2,
        instance: str | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        self.mesh_path = mesh_path
        # Which replica this is, in /debug/syncz: the pod's name (POD_NAME, else the hostname).
        self.instance = instance or os.environ.get("POD_NAME") or socket.gethostname()
        if source is None and mesh_path is not None:
            source = FileSource(mesh_path, poll_interval=poll_interval, debounce=debounce)
        self.source = source
        self.cache = SnapshotCache()
        self.metrics = ControlPlaneMetrics()
        self.heap = HeapTrimmer()
        self.ads = AdsServer(self.cache, self.metrics, max_streams, self.heap)
        self.health = health_aio.HealthServicer()
        self.xds_port = 0
        self.http_port = 0
        self.last_error = ""
        self.problems: tuple[SourceProblem, ...] = ()
        self.lingering = Lingering()
        self._last_update: Update | None = None
        self._translation: Translation | None = None  # of the snapshots served
        self._expiry: asyncio.TimerHandle | None = None
        self._publishing = asyncio.Lock()
        # The last good mesh's injection: section and traces endpoint, for /inject.
        self.injection = Injection()
        self.otlp_endpoint: str | None = None
        self.webhooks: WebhookServer | None = None
        self.keeper: CertificateKeeper | None = None  # certificates=self
        self._grpc: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def publish(self, update: Update | SourceError) -> bool:
        """Translate, check and serve an update. False (and logged) if refused."""
        async with self._publishing:
            return await self._publish(update)

    async def _publish(self, update: Update | SourceError) -> bool:
        what = self.source.description if self.source is not None else "update"
        try:
            if isinstance(update, SourceError):
                raise update
            # Translation and encoding hold the GIL but not the loop: streams keep flowing.
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            translation, default, by_namespace, expires = await asyncio.to_thread(
                _snapshots, update, self._translation, self.cache, self.lingering, loop.time()
            )
            built = time.perf_counter() - started
        except (SourceError, SnapshotError) as exc:
            current = self.cache.get("")
            self.last_error = str(exc)
            self.metrics.invalid_config_reloads.inc()
            log.error(
                "%s refused: %s (still serving version %s)",
                what,
                exc,
                current.version if current else "none",
            )
            return False
        self.last_error = ""
        self._last_update = update
        self._translation = translation
        kind = "endpoints" if translation.endpoints_only else "full"
        self.metrics.snapshot_build.labels(kind).observe(built)
        self.injection, self.otlp_endpoint = (
            update.mesh.injection,
            update.mesh.tracing.otlp_endpoint,
        )
        self._schedule_expiry(expires)
        self._note_problems(update.problems)
        self.heap.poke()  # the build's garbage, and the push it starts
        if self.cache.set_snapshot(default, by_namespace):
            self.metrics.config_reloads.inc()
            log.info(
                "serving version %s %s (%d namespaces with their own routes; %s build %.3fs)",
                default.version,
                dict(version_summary(default)),
                len(by_namespace),
                kind,
                built,
            )
        return True

    def _schedule_expiry(self, when: float | None) -> None:
        """Publish the last update again once lingering clusters expire (see cache.Lingering)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if when is None:
            return
        loop = asyncio.get_running_loop()

        def expire() -> None:
            self._expiry = None
            if self._last_update is not None:
                self._tasks.append(loop.create_task(self.publish(self._last_update)))

        self._expiry = loop.call_at(when + 0.01, expire)

    def _note_problems(self, problems: tuple[SourceProblem, ...]) -> None:
        before = set(self.problems)
        now = set(problems)
        for problem in sorted(now - before, key=lambda p: (p.where, p.key)):
            self.metrics.invalid_annotations_seen.inc()
            log.warning("%s: %s: %s", problem.reason, problem.where, problem.message)
        for problem in sorted(before - now, key=lambda p: (p.where, p.key)):
            log.info("fixed: %s: %s", problem.where, problem.key or problem.message)
        self.problems = tuple(sorted(now, key=lambda p: (p.where, p.key, p.message)))
        counts: dict[str, int] = {}
        for problem in self.problems:
            kind = problem.regarding.kind if problem.regarding is not None else "MeshFile"
            counts[kind] = counts.get(kind, 0) + 1
        for kind in ("Service", "Namespace", "MeshFile"):
            self.metrics.invalid_annotations.labels(kind).set(counts.get(kind, 0))

    async def start(
        self,
        xds: str = "127.0.0.1:0",
        http: str | None = "127.0.0.1:0",
        *,
        webhook: str | None = None,
        webhook_cert: Path | None = None,
        webhook_key: Path | None = None,
        certificates: CertificateKeeper | None = None,
    ) -> None:
        """Take the source's first state (it must be usable), bind the ports, follow it.

        With `certificates` (which `stop` then closes), the webhooks serve the pair it keeps."""
        self.keeper = certificates
        if self.source is not None:
            try:
                first = await self.source.first()
            except SourceError as exc:
                raise ControlPlaneError(str(exc)) from None
            if not await self.publish(first):
                raise ControlPlaneError(f"{self.source.description}: {self.last_error}")
        server = grpc.aio.server(options=server_options(self.ads.max_streams))
        server.add_generic_rpc_handlers((self.ads.handler(),))
        csds_pb2_grpc.add_ClientStatusDiscoveryServiceServicer_to_server(
            CsdsServer(self.ads), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        server.add_generic_rpc_handlers((self._problems_handler(),))
        host, port = split_address(xds)
        bound = server.add_insecure_port(join_host_port(host, port))
        if bound == 0:
            raise ControlPlaneError(f"cannot bind xDS address {xds}")
        self.xds_port = bound
        await server.start()
        self._grpc = server
        serving = health_pb2.HealthCheckResponse.SERVING
        await self.health.set("", serving)
        await self.health.set(ADS_SERVICE, serving)
        if http is not None:
            host, port = split_address(http)
            try:
                self._http = await asyncio.start_server(self._serve_http, host, port)
            except OSError as exc:
                raise ControlPlaneError(f"cannot bind HTTP address {http}: {exc}") from exc
            self.http_port = self._http.sockets[0].getsockname()[1]
        if webhook is not None:
            try:
                await self._start_webhooks(webhook, webhook_cert, webhook_key)
            except WebhookError as exc:
                raise ControlPlaneError(str(exc)) from exc
        if self.source is not None:
            self._tasks.append(asyncio.create_task(self.source.run(self.publish)))

    async def _start_webhooks(self, address: str, cert: Path | None, key: Path | None) -> None:
        keeper = self.keeper
        if keeper is None and (cert is None or key is None):
            raise ControlPlaneError(
                "--webhook needs --webhook-cert and --webhook-key, or --webhook-secret"
            )
        server = WebhookServer(
            cert if keeper is None else None,
            key if keeper is None else None,
            registry=self.metrics.registry,
        )
        self.webhooks = server
        server.add(
            "/inject", lambda request: inject.admit(request, self.injection, self.otlp_endpoint)
        )
        server.add("/validate", validate.admit)
        if keeper is not None:
            from control_plane.webhooks.keeper import KeeperError

            def use(material: TlsMaterial) -> None:
                try:
                    server.use_certificate(material.cert, material.key)
                except WebhookError as exc:
                    raise KeeperError(str(exc)) from None

            keeper.on_material = use
            try:
                await keeper.settle()
            except KeeperError as exc:
                raise ControlPlaneError(f"webhook certificates (--webhook-secret): {exc}") from None
            self._tasks.append(asyncio.create_task(keeper.run(), name="webhook certificates"))
        await server.start(*split_address(address))

    async def stop(self, grace: float = 1.0) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self.heap.close()
        await cancel_all(self._tasks)
        if self.source is not None:
            await self.source.close()
        if self.webhooks is not None:
            await self.webhooks.stop()
            self.webhooks = None
        if self.keeper is not None:
            await self.keeper.close()
            self.keeper = None
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None
        if self._grpc is not None:
            await self.health.enter_graceful_shutdown()
            await self._grpc.stop(grace)
            self._grpc = None

    def _problems_handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        """`outrigger status` asks this for the current problems (a Struct, JSON-shaped)."""

        async def problems(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            body = struct_pb2.Struct()
            body.update({"problems": [p.as_json() for p in self.problems]})
            return body

        method = grpc.unary_unary_rpc_method_handler(
            problems,
            request_deserializer=lambda data: data,
            response_serializer=lambda message: message.SerializeToString(),
        )
        return grpc.method_handlers_generic_handler(PROBLEMS_SERVICE, {PROBLEMS_METHOD: method})

    @property
    def ready(self) -> bool:
        return self._grpc is not None and self.cache.get("") is not None

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HTTP_READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > HTTP_MAX_HEAD:
                raise ValueError("head too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = self._http_route(method, target.split("?", 1)[0])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        try:
            writer.write(
                f"HTTP/1.1 {status} {reason_phrase(status)}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            async with asyncio.timeout(HTTP_READ_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    def _http_route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET only\n"
        if path == "/metrics":
            return 200, CONTENT_TYPE, self.metrics.render()
        if path == "/debug/syncz":
            body = json.dumps(syncz(self.ads, self.instance), indent=1).encode()
            return 200, "application/json", body
        if path == "/debug/problemz":
            body = json.dumps([p.as_json() for p in self.problems], indent=1).encode()
            return 200, "application/json", body
        if path == "/live":  # the process answers: the liveness probe's question, no more
            return 200, "text/plain", b"live\n"
        if path == "/ready":
            if self.ready:
                return 200, "text/plain", b"ready\n"
            return 503, "text/plain", b"not ready\n"
        return 404, "text/plain", b"not found\n"


async def _configuration(args: argparse.Namespace) -> Any:
    """The Kubernetes client configuration, when a flag needs the API (else None)."""
    if not (args.kubernetes or args.webhook_secret):
        return None
    from control_plane.sources.kubernetes import load_configuration

    try:
        return await load_configuration(Path(args.kubeconfig) if args.kubeconfig else None)
    except SourceError as exc:
        raise UsageError(str(exc)) from None


def _source(args: argparse.Namespace, configuration: Any) -> Source:
    """The source the flags name (raises UsageError for a bad flag or configuration)."""
    mesh = Path(args.mesh) if args.mesh else None
    if not args.kubernetes:
        if mesh is None:
            raise UsageError("--mesh FILE is required (or --kubernetes)")
        return FileSource(mesh)
    from control_plane.sources.kubernetes import KubernetesSource

    debounce = parse_duration(args.debounce)
    if debounce is None or debounce <= 0:
        raise UsageError(f"--debounce: expected a duration like 100ms or 1s, got {args.debounce!r}")
    namespaces = tuple(n.strip() for n in (args.namespaces or "").split(",") if n.strip())
    for namespace in namespaces:
        if parse_call(namespace) != namespace or "." in namespace:
            raise UsageError(
                f"--namespaces: {namespace!r} is not a namespace name (a DNS label, e.g. shop)"
            )
    return KubernetesSource(configuration, namespaces=namespaces, debounce=debounce, mesh_path=mesh)


def _self_certificates(args: argparse.Namespace) -> SelfCertificates | None:
    """What --webhook-secret and its companions describe (UsageError when they do not fit)."""
    files = args.webhook_cert or args.webhook_key
    if not args.webhook_secret:
        if args.webhook and not (args.webhook_cert and args.webhook_key):
            raise UsageError(
                "--webhook needs --webhook-cert and --webhook-key (PEM files), or "
                "--webhook-secret (the control plane makes and keeps its own)"
            )
        return None
    if files:
        raise UsageError("--webhook-secret and --webhook-cert/--webhook-key exclude each other")
    if not args.webhook:
        raise UsageError("--webhook-secret needs --webhook ADDRESS (where the webhooks listen)")
    if not args.webhook_dns_name:
        raise UsageError(
            "--webhook-secret needs --webhook-dns-name, the name the API server calls "
            "(the Service's <name>.<namespace>.svc)"
        )
    namespace = os.environ.get("POD_NAMESPACE", "")
    if not namespace:
        raise UsageError(
            "--webhook-secret: the Secret's namespace comes from the POD_NAMESPACE environment "
            "variable (the chart sets it from the pod's metadata.namespace); set it"
        )
    from control_plane.webhooks.keeper import SelfCertificates

    return SelfCertificates(
        namespace=namespace,
        secret=args.webhook_secret,
        dns_name=args.webhook_dns_name,
        mutating=args.mutating_webhook_configuration,
        validating=args.validating_webhook_configuration,
    )


async def start_from_args(args: argparse.Namespace) -> ControlPlane:
    """The control plane the command line describes, started. Raises UsageError for flags
    that do not fit, ControlPlaneError when it cannot start."""
    own = _self_certificates(args)
    if args.max_streams < 1:
        raise UsageError("--max-streams must be 1 or more")
    configuration = await _configuration(args)
    open_files_limit(args.max_streams)
    plane = ControlPlane(
        Path(args.mesh) if args.mesh else None,
        source=_source(args, configuration),
        max_streams=args.max_streams,
    )
    keeper = None
    if own is not None:
        from control_plane.webhooks.keeper import CertificateKeeper

        keeper = CertificateKeeper(configuration, own, registry=plane.metrics.registry)
    try:
        await plane.start(
            args.xds,
            args.http,
            webhook=args.webhook,
            webhook_cert=Path(args.webhook_cert) if args.webhook_cert else None,
            webhook_key=Path(args.webhook_key) if args.webhook_key else None,
            certificates=keeper,
        )
    except ControlPlaneError:
        await plane.stop(0)
        raise
    return plane


async def _main(args: argparse.Namespace) -> int:
    try:
        plane = await start_from_args(args)
    except ControlPlaneError as exc:
        print(f"outrigger control-plane: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    host = split_address(args.xds)[0]
    http_host = split_address(args.http)[0]
    print(
        f"outrigger control-plane: xDS (ADS, CSDS, health) on {host}:{plane.xds_port}, "
        f"HTTP on {http_host}:{plane.http_port}"
        + (
            f", webhooks (HTTPS) on {split_address(args.webhook)[0]}:{plane.webhooks.port}"
            if plane.webhooks is not None
            else ""
        ),
        flush=True,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("stopping")
    await plane.stop(1.0)
    return 0


def run_control_plane(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return asyncio.run(_main(args))


FILES_BESIDE_STREAMS = 256  # descriptors the process needs besides one per sidecar connection


def open_files_limit(max_streams: int) -> int:
    """Raise the soft limit on open files to the hard one (each sidecar is a connection, a file
    descriptor); warn when even that is short of `max_streams`. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, target, exc)
    needed = max_streams + FILES_BESIDE_STREAMS
    if soft < needed:
        log.warning(
            "the open files limit is %d, short of the %d that --max-streams %d needs (one "
            "descriptor per sidecar): raise it (ulimit -n, LimitNOFILE, the container runtime's "
            "nofile) or lower --max-streams; past it connections fail with no xDS refusal",
            soft, needed, max_streams,
        )  # fmt: skip
    return soft


def _snapshots(
    update: Update,
    translation: Translation | None,
    cache: SnapshotCache,
    lingering: Lingering,
    now: float,
) -> tuple[Translation, XdsSnapshot, dict[str, XdsSnapshot], float | None]:
    """Translate (from the previous translation: see `mesh.translate.translate_update`), add
    the lingering clusters and encode; the translation kept is `settled`: encodings, not
    messages, which the next update reuses."""
    translation = translate_update(update.mesh, translation)
    default = dict(translation.default)  # copies: lingering adds to them
    by_namespace = {ns: dict(r) for ns, r in translation.by_namespace.items()}
    previous = cache.current()
    expires = lingering.hold(previous[0], default, by_namespace, now)
    snapshot, snapshots = make_snapshots(default, by_namespace, previous)
    return settled(translation, snapshot, snapshots), snapshot, snapshots, expires
