"""Routing: which handler serves a request head, against the snapshot applied last.

- Outbound: the authority (lowercase, with and without `:port`) picks a service's stack; the
  decision is made once per snapshot (`Active.routes`), so a request pays one dict lookup. An
  authority no service claims passes through to the host it names (Istio's ALLOW_ANY, port 80
  when none is given), unless the mesh says `registry_only` (502 NR), the authority names no
  host, or it names one of this sidecar's own listeners (a loop; 502 NR).
- Inbound: every request goes to the local app.

`Router.apply` builds every service's stack for a snapshot before swapping the result in whole,
so a request sees the old snapshot or the new one, never a mix; the services' `ServiceState`
(breakers, counts) carries over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.config import ConfigError, Endpoint, OutboundPolicy, Snapshot, authority_endpoint
from sidecar.exchange import EndpointHandler, Handler, Reply, Request
from sidecar.flags import Flag, ProxyError
from sidecar.policy.stack import ServiceRegistry, build_service_stack
from sidecar.protocol.events import RequestHead
from sidecar.transport.server import Decision

if TYPE_CHECKING:
    from sidecar.telemetry.tracing import Tracing


@dataclass(frozen=True, slots=True)
class Active:
    """A snapshot and the stacks built from it; swapped whole, so requests see one or the other."""

    snapshot: Snapshot
    handlers: dict[str, Handler]  # by cluster name
    routes: dict[bytes, Decision]  # by authority: the routing decision, made once per config


class Router:
    """The outbound and inbound dispatch of one sidecar (the listeners call them per request)."""

    def __init__(
        self,
        services: ServiceRegistry,
        forward: EndpointHandler,
        app: Endpoint,
        service: str,
        tracing: Tracing | None = None,
    ) -> None:
        self.services = services
        self.forward = forward  # the innermost handler: the connection pools
        self.app = app  # the local app, where inbound requests go
        self.service = service  # the service this sidecar fronts (its inbound spans' name)
        self.tracing = tracing
        self.active: Active | None = None
        self.own: set[Endpoint] = set()  # this sidecar's listeners: passing through is a loop
        self._inbound = self._inbound_decision()

    def trace(self, tracing: Tracing) -> None:
        """Trace from now on (before `apply`: the stacks are built there)."""
        self.tracing = tracing
        self._inbound = self._inbound_decision()

    def apply(self, snapshot: Snapshot) -> None:
        """Build every service's stack, then swap them in at once (raises ConfigError)."""
        handlers: dict[str, Handler] = {}
        for cluster, cfg in snapshot.services.items():
            try:
                handlers[cluster] = build_service_stack(
                    cfg, self.services.state(cfg.name), self.forward, tracing=self.tracing
                )
            except ValueError as exc:
                raise ConfigError(f"Cluster {cluster}: {exc}") from exc
        routes = {
            authority: Decision(handlers[service.cluster], service, service.name)
            for authority, service in snapshot.routes.items()
        }
        self.active = Active(snapshot, handlers, routes)
        self.services.retain(cfg.name for cfg in snapshot.services.values())

    def snapshot(self) -> Snapshot | None:
        """The snapshot applied last, if any."""
        return self.active.snapshot if self.active is not None else None

    def outbound(self, head: RequestHead) -> Decision:
        active = self.active
        if active is None:
            raise ProxyError(Flag.NO_ROUTE, "no config applied yet", status=503)
        decision = active.routes.get(head.authority)
        if decision is not None:
            return decision
        authority = head.authority.decode("ascii", "replace")
        if active.snapshot.outbound_policy is OutboundPolicy.REGISTRY_ONLY:
            raise ProxyError(
                Flag.NO_ROUTE, f"{authority!r} is not a service in the mesh (registry_only)"
            )
        endpoint = authority_endpoint(head.authority)
        if endpoint is None:
            raise ProxyError(Flag.NO_ROUTE, "the request names no host to pass through to")
        if endpoint in self.own:
            raise ProxyError(Flag.NO_ROUTE, f"{authority} is this sidecar: refusing to loop")
        forward = self.forward
        tracing = self.tracing
        if tracing is not None:
            forward = tracing.attempt(forward)

        def passthrough(req: Request, reply: Reply) -> None:
            req.tried.append(endpoint)  # no balancer here: count the one attempt for the log
            req.attempts += 1
            forward(req, endpoint, reply)

        if tracing is not None:
            return Decision(tracing.client(passthrough, "passthrough"), None, "passthrough")
        return Decision(passthrough, None, "passthrough")

    def inbound(self, head: RequestHead) -> Decision:
        return self._inbound

    def _inbound_decision(self) -> Decision:
        to_app: Handler = self._to_app
        if self.tracing is not None:
            to_app = self.tracing.inbound(to_app, self.service)
        return Decision(to_app, None, "inbound")

    def _to_app(self, req: Request, reply: Reply) -> None:
        req.tried.append(self.app)  # as in passthrough: one attempt, for the log
        req.attempts += 1
        self.forward(req, self.app, reply)
