"""The admin listener (127.0.0.1:15000 by default), served by the same hardened HTTP server.

`/ready`, `/live`, `/stats/prometheus`, `/config_dump`, `/clusters`, `POST /drain`: one page
each, as Envoy's admin has one handler per page, and each page is given only what it reads (the
readiness reason, the metrics registry, the applied snapshot, the service registry and the
connection pools, the drain callback). `Admin` maps paths to pages and answers 404 and 405.

The pod's health port (`--health`, `/healthz/ready`) and metrics port (`--metrics`,
`/stats/prometheus`) are `Admin`s too, each with its one page, so that the pod IP exposes only
those and never the admin port's `/drain` or `/config_dump`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from sidecar.config import Endpoint, Snapshot
from sidecar.exchange import Reply, Request, Response
from sidecar.policy.stack import ServiceRegistry, ServiceState
from sidecar.protocol.events import RequestHead
from sidecar.transport.body import BytesBody
from sidecar.transport.h2upstream import H2Pool
from sidecar.transport.server import REASONS, Decision
from sidecar.transport.upstream import EndpointPool

Rendered = tuple[int, bytes, bytes]  # status, content type, body


def _text(status: int, text: str) -> Rendered:
    return status, b"text/plain; charset=utf-8", text.encode()


def _json(doc: Any) -> Rendered:
    return 200, b"application/json", json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


class Page(Protocol):
    @property
    def method(self) -> bytes: ...  # GET (which also answers HEAD) or POST

    def render(self) -> Rendered: ...


class Ready:
    """`/ready`: 200, or 503 with the reason (listeners not up, no config yet, draining)."""

    method = b"GET"

    def __init__(self, not_ready_reason: Callable[[], str]) -> None:
        self.not_ready_reason = not_ready_reason

    def render(self) -> Rendered:
        problem = self.not_ready_reason()
        if problem:
            return _text(503, f"not ready: {problem}\n")
        return _text(200, "ready\n")


class Live:
    """`/live`: 200 while the process serves at all."""

    method = b"GET"

    def render(self) -> Rendered:
        return _text(200, "live\n")


class Prometheus:
    """`/stats/prometheus`: the registry in Prometheus' text format."""

    method = b"GET"

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def render(self) -> Rendered:
        return 200, CONTENT_TYPE_LATEST.encode(), generate_latest(self.registry)


class ConfigDump:
    """`/config_dump`: who this sidecar is, where its config comes from, and the config applied
    (version, outbound policy, sampling, each service with its effective policy and where each
    value came from, the xDS resources it was built from)."""

    method = b"GET"

    def __init__(
        self,
        node: Mapping[str, str],
        source: str,
        snapshot: Callable[[], Snapshot | None],
        listeners: Mapping[str, tuple[str, int]],
        trace_sampling: float | None = None,
    ) -> None:
        self.node = node  # id, service, namespace
        self.source = source  # the mesh file, the control plane, or the embedded default
        self.snapshot = snapshot
        self.listeners = listeners  # bound addresses, by listener name
        self.trace_sampling = trace_sampling  # --trace-sampling: overrides the snapshot's

    def render(self) -> Rendered:
        return _json(self.document())

    def document(self) -> dict[str, Any]:
        snapshot = self.snapshot()
        sampling: dict[str, Any] = {
            "value": snapshot.trace_sampling if snapshot else None,
            "from": "xDS (HttpConnectionManager tracing.random_sampling)",
        }
        if self.trace_sampling is not None:
            sampling = {
                "value": self.trace_sampling,
                "from": "--trace-sampling",
                "xds_value": snapshot.trace_sampling if snapshot else None,
            }
        return {
            "node": dict(self.node),
            "source": self.source,
            "version": snapshot.version if snapshot else None,
            "outbound_policy": snapshot.outbound_policy.value if snapshot else None,
            "trace_sampling": sampling,
            "listeners": {k: f"{h}:{p}" for k, (h, p) in self.listeners.items()},
            "services": _services(snapshot) if snapshot else {},
            "resources": snapshot.resources if snapshot else {},
        }


def _services(snapshot: Snapshot) -> dict[str, Any]:
    """Per cluster: the service, how requests reach it, and its effective policy with the origin
    of each value (from the Cluster's outrigger.dev metadata)."""
    return {
        cluster: {
            "service": f"{cfg.name}.{cfg.namespace}" if cfg.namespace else cfg.name,
            "port": cfg.port,
            "endpoints": (
                "original destination"
                if cfg.original_destination
                else [str(e) for e in cfg.endpoints]
            ),
            "policy": {
                key: {"value": value, "from": origin} for key, value, origin in cfg.policy_origins
            },
        }
        for cluster, cfg in sorted(snapshot.services.items())
    }


class Clusters:
    """`/clusters`: each service of the applied config, its balancer, its counters, and per
    endpoint the load, the breaker and the pooled connections."""

    method = b"GET"

    def __init__(
        self,
        snapshot: Callable[[], Snapshot | None],
        services: ServiceRegistry,
        pools: Mapping[Endpoint, EndpointPool],
        h2_pools: Mapping[Endpoint, H2Pool] | None = None,
    ) -> None:
        self.snapshot = snapshot
        self.services = services
        self.pools = pools
        self.h2_pools: Mapping[Endpoint, H2Pool] = h2_pools if h2_pools is not None else {}

    def render(self) -> Rendered:
        return _json(self.document())

    def document(self) -> dict[str, Any]:
        snapshot = self.snapshot()
        out: dict[str, Any] = {}
        if snapshot is None:
            return out
        for cluster, cfg in sorted(snapshot.services.items()):
            state = self.services.get(cfg.name)
            out[cfg.name] = {
                "cluster": cluster,
                "lb": cfg.lb.value,
                "endpoints": [self._endpoint(endpoint, state) for endpoint in cfg.endpoints],
                "stats": _stats(state),
            }
        return out

    def _endpoint(self, endpoint: Endpoint, state: ServiceState | None) -> dict[str, Any]:
        breaker = state.breakers.breaker(endpoint) if state else None
        pool = self.pools.get(endpoint)
        h2_pool = self.h2_pools.get(endpoint)
        h2_connections = h2_pool.connections if h2_pool is not None else []
        return {
            "address": str(endpoint),
            "active_requests": state.active(endpoint) if state else 0,
            "breaker": breaker.state if breaker is not None else "none",
            "ejected": bool(state and state.breakers.is_ejected(endpoint)),
            "ejections": breaker.trips if breaker is not None else 0,
            "idle_connections": len(pool.idle) if pool else 0,
            "busy_connections": len(pool.in_use) if pool else 0,
            # HTTP/2 services' multiplexed connections, and the streams open on them
            "http2_connections": len(h2_connections),
            "http2_streams": sum(len(conn.streams) for conn in h2_connections),
        }


def _stats(state: ServiceState | None) -> dict[str, int]:
    if state is None:
        return {}
    stats = state.stats
    return {name: getattr(stats, name) for name in stats.__slots__}


class Drain:
    """`POST /drain`: start a graceful drain, as SIGTERM does."""

    method = b"POST"

    def __init__(self, drain: Callable[[str], None]) -> None:
        self.drain = drain

    def render(self) -> Rendered:
        self.drain("POST /drain")
        return _text(200, "draining\n")


class Admin:
    """The admin listener's one handler: a path picks its page."""

    def __init__(self, pages: Mapping[bytes, Page]) -> None:
        self.pages = pages

    def dispatch(self, head: RequestHead) -> Decision:
        return Decision(self.handle, None, "admin")

    def handle(self, req: Request, reply: Reply) -> None:
        path = req.path.split(b"?", 1)[0]
        page = self.pages.get(path)
        if page is None:
            status, ctype, body = _text(
                404, "not found; try " + ", ".join(p.decode() for p in self.pages) + "\n"
            )
        elif req.method != page.method and not (page.method == b"GET" and req.method == b"HEAD"):
            status, ctype, body = _text(405, f"{path.decode()} takes {page.method.decode()}\n")
        else:
            status, ctype, body = page.render()
        reply(
            Response(
                status,
                REASONS.get(status, b""),
                [(b"content-type", ctype)],
                BytesBody(body),
                content_length=len(body),
            )
        )
