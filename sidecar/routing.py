"""Routing: which handler serves a request head, against the snapshot applied last.

- Outbound: the authority (lowercase, with and without `:port`) picks a service's stack; the
  decision is made once per snapshot (`Active.routes`), so a request pays one dict lookup. Else,
  on an intercepted connection, its original destination `ip:port` does: a service's virtual
  address (a ClusterIP), or a headless service's pod. Else the request passes through (Istio's
  ALLOW_ANY) to the original destination, or without one (explicit proxy) to the host the
  authority names (port 80 when none is given); unless the mesh says `registry_only` (502 NR),
  there is no host, or it is one of this sidecar's own listeners (a loop; 502 NR).
- Inbound: an intercepted request goes to its original destination (the pod's own IP and the
  app's port, so apps bound to the pod IP or to 0.0.0.0 both work); one made to the inbound
  listener directly goes to the local app (`--app`).

`Router.apply` builds every service's stack for a snapshot before swapping the result in whole,
so a request sees the old snapshot or the new one, never a mix; the services' `ServiceState`
(breakers, counts) carries over.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mesh.address import join_host_port
from sidecar.config import ConfigError, Endpoint, OutboundPolicy, Snapshot, authority_endpoint
from sidecar.exchange import EndpointHandler, Handler, Reply, Request
from sidecar.flags import Flag, ProxyError
from sidecar.policy.stack import ServiceRegistry, build_service_stack, check_service
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
        forward_h2: EndpointHandler | None = None,
    ) -> None:
        self.services = services
        self.forward = forward  # the innermost handler: the connection pools
        # HTTP/2 services' innermost handler (and what HTTP/2 requests pass through or go
        # inbound with); chosen when a stack is built, so HTTP/1.1 pays nothing per request.
        self.forward_h2 = forward_h2 or forward
        self.app = app  # the local app, where inbound requests go
        self.service = service  # the service this sidecar fronts (its inbound spans' name)
        self.tracing = tracing
        self.active: Active | None = None
        self.own: set[Endpoint] = set()  # this sidecar's listeners: passing through is a loop
        self._inbound = self._inbound_decision(app, forward)
        self._inbound_to: dict[Endpoint, Decision] = {}  # by original destination
        self._inbound_h2 = self._inbound_decision(app, self.forward_h2)
        self._inbound_to_h2: dict[Endpoint, Decision] = {}

    def trace(self, tracing: Tracing) -> None:
        """Trace from now on (before `apply`: the stacks are built there)."""
        self.tracing = tracing
        self._inbound = self._inbound_decision(self.app, self.forward)
        self._inbound_to.clear()
        self._inbound_h2 = self._inbound_decision(self.app, self.forward_h2)
        self._inbound_to_h2.clear()

    def is_own(self, endpoint: Endpoint) -> bool:
        """Whether `endpoint` is one of this sidecar's listeners (forwarding there loops): its
        bound address, or any local address on the port of a listener bound to 0.0.0.0 or ::."""
        if endpoint in self.own:
            return True
        return any(
            own.port == endpoint.port and own.host in ("0.0.0.0", "::") for own in self.own
        ) and is_local_address(endpoint.host)

    def apply(self, snapshot: Snapshot) -> None:
        """Check every service, build every stack, then swap them in at once (raises ConfigError,
        and then no service's limits or breakers have changed)."""
        for cluster, cfg in snapshot.services.items():
            try:
                check_service(cfg)
            except ValueError as exc:
                raise ConfigError(f"Cluster {cluster}: {exc}") from exc
        handlers: dict[str, Handler] = {}
        for cluster, cfg in snapshot.services.items():
            try:
                forward = self.forward_h2 if cfg.http2 else self.forward
                handlers[cluster] = build_service_stack(
                    cfg, self.services.state(cfg.name), forward, tracing=self.tracing
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

    def outbound(
        self,
        head: RequestHead,
        destination: Endpoint | None = None,
        forward: EndpointHandler | None = None,
    ) -> Decision:
        """The decision for a request; `destination`: its connection's original destination;
        `forward`: how a request no route takes passes through (default: `self.forward`)."""
        active = self.active
        if active is None:
            raise ProxyError(Flag.NO_ROUTE, "no config applied yet", status=503)
        decision = active.routes.get(head.authority)
        if decision is not None:
            return decision
        return self._unrouted(
            active, head, destination, self.forward if forward is None else forward
        )

    def outbound_h2(self, head: RequestHead, destination: Endpoint | None = None) -> Decision:
        """`outbound` for an HTTP/2 stream: the same routes (`:authority` as Host); what
        passes through goes on over HTTP/2."""
        return self.outbound(head, destination, self.forward_h2)

    def _unrouted(
        self,
        active: Active,
        head: RequestHead,
        destination: Endpoint | None,
        forward: EndpointHandler,
    ) -> Decision:
        if destination is not None:
            decision = active.routes.get(address_authority(destination))
            if decision is not None:
                return decision
        authority = head.authority.decode("ascii", "replace")
        if active.snapshot.outbound_policy is OutboundPolicy.REGISTRY_ONLY:
            to = f" (to {destination})" if destination is not None else ""
            raise ProxyError(
                Flag.NO_ROUTE, f"{authority!r}{to} is not a service in the mesh (registry_only)"
            )
        endpoint = destination or authority_endpoint(head.authority)
        if endpoint is None:
            raise ProxyError(Flag.NO_ROUTE, "the request names no host to pass through to")
        if self.is_own(endpoint):
            raise ProxyError(Flag.NO_ROUTE, f"{endpoint} is this sidecar: refusing to loop")
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

    def inbound(self, head: RequestHead, destination: Endpoint | None = None) -> Decision:
        """To `destination` (the original one, when intercepted), else to the local app."""
        if destination is None:
            return self._inbound
        return self._to(destination, self._inbound_to, self.forward)

    def inbound_h2(self, head: RequestHead, destination: Endpoint | None = None) -> Decision:
        """`inbound` for an HTTP/2 stream: to the app over HTTP/2, as its client spoke."""
        if destination is None:
            return self._inbound_h2
        return self._to(destination, self._inbound_to_h2, self.forward_h2)

    def _to(
        self, destination: Endpoint, made: dict[Endpoint, Decision], forward: EndpointHandler
    ) -> Decision:
        """The inbound decision to an original destination, made once (kept in `made`)."""
        decision = made.get(destination)
        if decision is None:
            if self.is_own(destination):
                raise ProxyError(Flag.NO_ROUTE, f"{destination} is this sidecar: refusing to loop")
            decision = made[destination] = self._inbound_decision(destination, forward)
        return decision

    def _inbound_decision(self, app: Endpoint, forward: EndpointHandler) -> Decision:

        def to_app(req: Request, reply: Reply) -> None:
            req.tried.append(app)  # as in passthrough: one attempt, for the log
            req.attempts += 1
            forward(req, app, reply)

        handler: Handler = to_app
        if self.tracing is not None:
            handler = self.tracing.inbound(handler, self.service)
        return Decision(handler, None, "inbound")


def address_authority(endpoint: Endpoint) -> bytes:
    """`ip:port` as a route's domain spells it (`[ip6]:port`)."""
    return join_host_port(endpoint.host, endpoint.port).encode("ascii")


def is_local_address(host: str) -> bool:
    """Whether `host` is an address of this machine (loopback, or one a socket can bind)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: not resolved here (the loop check is for addresses)
    if address.is_loopback or address.is_unspecified:
        return True
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:  # EADDRNOTAVAIL: not ours
            return False
    return True
