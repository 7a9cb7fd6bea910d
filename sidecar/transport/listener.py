"""Where every connection enters the sidecar: its original destination, then HTTP or TCP.

The outbound and inbound listeners hand each accepted connection to a `Listener`, which decides
what serves it before a byte is read:

- **Not redirected** (no original destination, or the listener's own address: a client that
  was told about the sidecar, HTTP_PROXY or the inbound port): the HTTP path, as always.
- **Redirected to this sidecar itself** (a loop): closed, flag NR.
- **Redirected**: the applied snapshot says how the destination is read (`Chain`, from the
  outbound listener's filter chains; inbound, the protocol declared for the pod's port):
  - declared `http`: the HTTP path at once;
  - declared `tcp`: passed through at once, nothing read (a server that speaks first never
    waits);
  - otherwise a `Sniffer` reads the first bytes within the detection window: HTTP/1.x takes the
    HTTP path (policies, routing by Host, else by the destination), anything else (a TLS
    ClientHello, the HTTP/2 preface, other bytes, silence) is passed through as TCP, bytes
    untouched (`TcpProxy`). A declared `tls` port is read to the end of its ClientHello (for the
    server name), then passed through; what is not TLS there takes the default below.
- **Where TCP goes** (outbound): the destination's service (round robin over its endpoints; a
  headless service or passthrough: the original destination itself), else the service a TLS
  server name (SNI) names on that port, else the default: passthrough to the original
  destination (allow_any), or closed and counted, flag NR (registry_only: an egress lock that
  `https://` cannot walk around). Inbound, TCP goes to the original destination: the app.

The HTTP path is entered the way asyncio hands a transport over: `set_protocol`, then the new
protocol's `connection_made`, then the bytes the sniffer read (`data_received`) and its EOF.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, cast

from mesh.address import join_host_port
from sidecar.config import ChainProtocol, Endpoint, Snapshot, TcpTarget
from sidecar.flags import Flag
from sidecar.interception.original_dst import original_destination
from sidecar.protocol.detect import PREFACE, Detected
from sidecar.protocol.events import RequestHead
from sidecar.protocol.tls import ClientHello
from sidecar.transport.h2server import H2DownstreamProtocol
from sidecar.transport.server import (
    Completed,
    Decision,
    Downstream,
    DownstreamProtocol,
    ServerState,
)
from sidecar.transport.sniffer import FirstBytes, Sniffer, SniffSettings
from sidecar.transport.tcp import TcpObserver, TcpProxy, TcpRecord, TcpSettings

log = logging.getLogger("outrigger.listener")

OUTBOUND = "outbound"
INBOUND = "inbound"


class Route(Protocol):
    """The router's dispatch for one direction (`Router.outbound`, `Router.inbound`)."""

    def __call__(self, head: RequestHead, destination: Endpoint | None = None) -> Decision: ...


DownstreamT = TypeVar("DownstreamT", bound=Downstream)

# How the connection's original destination is read (tests give a stand-in for the kernel's).
OriginalDestination = Callable[[asyncio.Transport], tuple[str, int] | None]


def kernel_destination(transport: asyncio.Transport) -> tuple[str, int] | None:
    """SO_ORIGINAL_DST of the transport's socket (uvloop's socket stand-in answers it too)."""
    return original_destination(transport.get_extra_info("socket"))


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    direction: str  # OUTBOUND | INBOUND
    sniff: SniffSettings = field(default_factory=SniffSettings)
    tcp_idle_timeout: float = 3600.0  # when the tcp_proxy names none (Envoy's default)
    request_ids: bool = True


class Listener:
    """One direction's connection entry (the protocol factory for `loop.create_server`)."""

    def __init__(
        self,
        settings: ListenerSettings,
        state: ServerState,
        route: Route,
        snapshot: Callable[[], Snapshot | None],
        is_own: Callable[[Endpoint], bool],
        *,
        completed: Completed | None = None,
        observer: TcpObserver | None = None,
        destination_of: OriginalDestination = kernel_destination,
        h2_route: Route | None = None,
    ) -> None:
        self.settings = settings
        self.state = state  # the HTTP connections' (time limits, drain)
        self.route = route
        # The dispatch for HTTP/2 streams (`Router.outbound_h2`/`inbound_h2`); None: no HTTP/2.
        self.h2_route = h2_route
        self.snapshot = snapshot
        self.is_own = is_own
        self.completed = completed
        self.observer = observer
        self.destination_of = destination_of
        self.tcp: set[TcpProxy] = set()  # passed-through connections open now
        self._next: dict[str, int] = {}  # round-robin position per cluster

    def __call__(self) -> asyncio.Protocol:
        return _Entry(self)

    # --- one connection --------------------------------------------------------------------

    def accepted(self, transport: asyncio.Transport) -> None:
        raw = self.destination_of(transport)
        if raw is None:
            self._http(transport, None, b"", ended=False)
            return
        destination = Endpoint(*raw)
        if self.is_own(destination):
            log.warning("refused a connection redirected to the sidecar itself (%s)", destination)
            self._refuse(transport, destination, "-", Flag.NO_ROUTE)
            return
        protocol = self._protocol(destination)
        if protocol is ChainProtocol.HTTP:
            self._http(transport, destination, b"", ended=False)
        elif protocol is ChainProtocol.TCP:
            self._tcp(transport, destination, "tcp", b"", ended=False, hello=None)
        else:

            def decided(first: FirstBytes) -> None:
                self._decided(first, destination, protocol)

            sniffer = Sniffer(decided, self.settings.sniff)
            transport.set_protocol(sniffer)
            sniffer.connection_made(transport)

    def _protocol(self, destination: Endpoint) -> ChainProtocol:
        snapshot = self.snapshot()
        if snapshot is None:
            return ChainProtocol.DETECT
        if self.settings.direction == INBOUND:
            return snapshot.inbound_protocols.get(destination, ChainProtocol.DETECT)
        chain = snapshot.destinations.get(destination)
        return chain.protocol if chain is not None else ChainProtocol.DETECT

    def _decided(self, first: FirstBytes, destination: Endpoint, protocol: ChainProtocol) -> None:
        if first.protocol is Detected.HTTP1 and protocol is ChainProtocol.DETECT:
            self._http(first.transport, destination, first.data, ended=first.ended)
            return
        if (
            first.protocol is Detected.HTTP2
            and protocol is ChainProtocol.DETECT
            and self.h2_route is not None
            and not first.ended
        ):
            self._h2(first.transport, destination, first.data)
            return
        self._tcp(
            first.transport,
            destination,
            first.protocol.value,
            first.data,
            ended=first.ended,
            hello=first.hello,
            tls_only=protocol is ChainProtocol.TLS,
        )

    def _downstream(
        self, kind: type[DownstreamT], route: Route, destination: Endpoint | None
    ) -> DownstreamT:
        """An HTTP/1.1 or HTTP/2 connection's protocol, dispatching with `route` (given the
        connection's original destination, when it has one)."""
        dispatch: Callable[[RequestHead], Decision] = route
        if destination is not None:

            def dispatch(head: RequestHead) -> Decision:
                return route(head, destination)

        return kind(
            self.state,
            dispatch,
            self.completed,
            request_ids=self.settings.request_ids,
            destination=destination,
        )

    def _http(
        self, transport: asyncio.Transport, destination: Endpoint | None, data: bytes, ended: bool
    ) -> None:
        protocol = self._downstream(DownstreamProtocol, self.route, destination)
        if not data and not ended and self.h2_route is not None:
            # The first bytes say which: the HTTP/2 preface, or HTTP/1.1 (the protocol is
            # registered now, so a silent client is timed out as an idle HTTP/1.1 one).
            transport.set_protocol(_Preface(self, protocol, transport, destination))
            protocol.connection_made(transport)
            return
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
        if ended and not protocol.eof_received():
            transport.close()

    def _h2(self, transport: asyncio.Transport, destination: Endpoint | None, data: bytes) -> None:
        assert self.h2_route is not None
        protocol = self._downstream(H2DownstreamProtocol, self.h2_route, destination)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)

    # --- TCP ------------------------------------------------------------------------------

    def _tcp(
        self,
        transport: asyncio.Transport,
        destination: Endpoint,
        detected: str,
        data: bytes,
        *,
        ended: bool,
        hello: ClientHello | None,
        tls_only: bool = False,
    ) -> None:
        server_name = (hello.server_name or "") if hello is not None else ""
        target: TcpTarget | None = None
        upstream, name = destination, INBOUND  # inbound: to the app, as it was going
        if self.settings.direction == OUTBOUND:
            target = self._target(destination, server_name, tls_only and hello is None)
            if target is None:
                self._refuse(transport, destination, "-", Flag.NO_ROUTE, detected, server_name)
                return
            picked = self._pick(target, destination)
            if picked is None:
                flag = Flag.NO_HEALTHY_UPSTREAM
                self._refuse(transport, destination, target.name, flag, detected, server_name)
                return
            upstream, name = picked, target.name
        settings = TcpSettings(idle_timeout=self.settings.tcp_idle_timeout)
        if target is not None:
            idle = target.idle_timeout
            settings = TcpSettings(
                connect_timeout=target.connect_timeout,
                idle_timeout=settings.idle_timeout if idle is None else idle,
            )
        proxy = TcpProxy(
            transport,
            (upstream.host, upstream.port),
            self._record(transport, upstream, name, detected, server_name),
            replay=data,
            client_ended=ended,
            settings=settings,
            observer=self.observer,
        )
        self.tcp.add(proxy)
        proxy.done.add_done_callback(lambda _: self.tcp.discard(proxy))
        proxy.start()

    def _target(self, destination: Endpoint, server_name: str, not_tls: bool) -> TcpTarget | None:
        """Where outbound TCP to `destination` goes; None: nowhere (closed, flag NR)."""
        snapshot = self.snapshot()
        if snapshot is None:
            return None  # no config yet: nothing is known to be allowed
        chain = snapshot.destinations.get(destination)
        if chain is not None and chain.tcp is not None and not not_tls:
            return chain.tcp
        if server_name:
            named = snapshot.server_names.get((server_name, destination.port))
            if named is not None:
                return named
        return snapshot.tcp_default

    def _pick(self, target: TcpTarget, destination: Endpoint) -> Endpoint | None:
        if target.original_destination:
            return destination
        endpoints = target.endpoints
        if not endpoints:
            return None
        position = self._next.get(target.cluster, 0)
        self._next[target.cluster] = position + 1
        return endpoints[position % len(endpoints)]

    def _refuse(
        self,
        transport: asyncio.Transport,
        destination: Endpoint,
        name: str,
        flag: Flag,
        detected: str = "tcp",
        server_name: str = "",
    ) -> None:
        """Close the connection, and count it and log it like a passed-through one."""
        record = self._record(transport, destination, name, detected, server_name)
        record.flags = flag.value
        if self.observer is not None:
            self.observer.tcp_opened(record)
            self.observer.tcp_closed(record)
        transport.close()

    def _record(
        self,
        transport: asyncio.Transport,
        upstream: Endpoint,
        name: str,
        detected: str,
        server_name: str,
    ) -> TcpRecord:
        peer = transport.get_extra_info("peername")
        return TcpRecord(
            direction=self.settings.direction,
            downstream=join_host_port(peer[0], peer[1]) if peer else "-",
            upstream=join_host_port(upstream.host, upstream.port),
            destination=name,
            protocol=detected,
            server_name=server_name,
        )

    # --- drain -----------------------------------------------------------------------------

    async def drain(self, timeout: float) -> bool:
        """Wait for the passed-through connections to end (bounded), then reset the rest."""
        if not self.tcp:
            return True
        pending = [proxy.done for proxy in self.tcp]
        _, still = await asyncio.wait(pending, timeout=timeout)
        if not still:
            return True
        log.warning("drain timeout: resetting %d TCP connection(s)", len(self.tcp))
        for proxy in list(self.tcp):
            proxy.abort()
        return False


class _Preface(asyncio.Protocol):
    """An HTTP connection's first bytes: the HTTP/2 client preface (RFC 9113 §3.4) moves it
    to `H2DownstreamProtocol`; anything else, at its first differing byte, goes on to the
    HTTP/1.1 protocol already made for it. Per connection, never per request."""

    __slots__ = ("buffer", "destination", "http1", "listener", "transport")

    def __init__(
        self,
        listener: Listener,
        http1: DownstreamProtocol,
        transport: asyncio.Transport,
        destination: Endpoint | None,
    ) -> None:
        self.listener = listener
        self.http1 = http1
        self.transport = transport
        self.destination = destination
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        size = min(len(buffer), len(PREFACE))
        if buffer[:size] != PREFACE[:size]:
            self._to_http1(buffer)
        elif size < len(PREFACE):
            self.buffer = buffer  # the preface so far
        else:
            self.listener.state.remove(self.http1)
            self.http1.closed = True
            self.listener._h2(self.transport, self.destination, buffer)

    def _to_http1(self, buffer: bytes) -> None:
        self.buffer = b""
        self.transport.set_protocol(self.http1)
        if buffer:
            self.http1.data_received(buffer)

    def eof_received(self) -> bool | None:
        self._to_http1(self.buffer)
        return self.http1.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.http1.connection_lost(exc)


class _Entry(asyncio.Protocol):
    """The protocol every accepted connection starts with; it hands the transport on at once."""

    __slots__ = ("listener",)

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.listener.accepted(cast(asyncio.Transport, transport))  # uvloop's is no subclass


def addresses_to_bind(host: str, port: int) -> list[str]:
    """The hosts a redirect target binds: 127.0.0.1 with ::1 (REDIRECT in OUTPUT delivers
    there), 0.0.0.0 with :: (REDIRECT in PREROUTING delivers to the pod IP of either family).
    Port 0 (tests, many sidecars on one host) binds the one host given."""
    twins = {"127.0.0.1": "::1", "0.0.0.0": "::"}
    if port == 0 or host not in twins:
        return [host]
    return [host, twins[host]]
