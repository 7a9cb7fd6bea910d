"""The Router with an intercepted connection's original destination: Host first, then the
destination's `ip:port`, then passthrough to the destination (allow_any) or 502 NR."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mesh.model import parse_mesh
from sidecar.config import Endpoint
from sidecar.exchange import Reply, Request, Response
from sidecar.flags import ProxyError
from sidecar.policy.stack import ServiceRegistry
from sidecar.protocol.events import RequestHead
from sidecar.routing import Router, is_local_address
from sidecar.transport.body import EMPTY_BODY, BytesBody
from sidecar.xds.interpret import snapshot_from_mesh

APP = Endpoint("127.0.0.1", 8080)


def head(authority: bytes) -> RequestHead:
    return RequestHead(b"GET", b"/", authority, b"1.1", [], True, None, False, False, None, False)


class Forwarded:
    """The innermost handler: records where each request was sent."""

    def __init__(self) -> None:
        self.to: list[Endpoint] = []

    def __call__(self, req: Request, endpoint: Endpoint, reply: Reply) -> None:
        self.to.append(endpoint)
        reply(Response(200, b"OK", [], BytesBody(b""), endpoint, content_length=0))


def router(outbound_policy: str = "allow_any") -> tuple[Router, Forwarded]:
    doc: dict[str, Any] = {
        "outbound_policy": outbound_policy,
        "services": [
            {"name": "web", "addresses": ["10.96.0.10"], "endpoints": ["10.1.0.5:8080"]},
            {"name": "db", "port": 5432, "addresses": ["fd00::12"], "endpoints": []},
        ],
    }
    forwarded = Forwarded()
    routing = Router(ServiceRegistry(), forwarded, APP, "client")
    routing.apply(snapshot_from_mesh(parse_mesh(doc, "m.yaml")))
    routing.own.update({Endpoint("127.0.0.1", 15001), Endpoint("0.0.0.0", 15006)})
    return routing, forwarded


def send(decision: Any, authority: bytes = b"x", destination: Endpoint | None = None) -> None:
    """Run a request through the decision's handler; it must answer at once (no I/O here)."""
    answers: list[object] = []
    request = Request(b"GET", b"/", authority, [], EMPTY_BODY, destination=destination)
    decision.handler(request, answers.append)
    assert len(answers) == 1 and isinstance(answers[0], Response), answers


def test_the_host_wins_over_the_destination() -> None:
    routing, _ = router()
    decision = routing.outbound(head(b"web"), Endpoint("fd00::12", 5432))
    assert decision.name == "web"


def test_a_destination_that_is_a_virtual_address_picks_its_service() -> None:
    routing, _ = router()
    assert routing.outbound(head(b"example.test"), Endpoint("10.96.0.10", 80)).name == "web"
    assert routing.outbound(head(b"example.test"), Endpoint("fd00::12", 5432)).name == "db"
    # on another port the address is not the service
    other = routing.outbound(head(b"example.test"), Endpoint("10.96.0.10", 81))
    assert other.name == "passthrough"


def test_passthrough_goes_to_the_original_destination_not_to_the_host() -> None:
    routing, forwarded = router()
    send(routing.outbound(head(b"example.test"), Endpoint("192.0.2.7", 8443)))
    send(routing.outbound(head(b"example.test:9000")))  # explicit proxy: the Host
    assert forwarded.to == [Endpoint("192.0.2.7", 8443), Endpoint("example.test", 9000)]


def test_registry_only_refuses_an_unknown_destination_naming_it() -> None:
    routing, _ = router("registry_only")
    assert routing.outbound(head(b"x"), Endpoint("10.96.0.10", 80)).name == "web"
    with pytest.raises(ProxyError) as refused:
        routing.outbound(head(b"example.test"), Endpoint("192.0.2.7", 80))
    assert refused.value.flag.value == "NR"
    assert "'example.test' (to 192.0.2.7:80) is not a service" in refused.value.detail


def test_a_destination_that_is_the_sidecar_itself_is_refused() -> None:
    routing, _ = router()
    for own in (Endpoint("127.0.0.1", 15001), Endpoint("127.0.0.1", 15006)):
        with pytest.raises(ProxyError, match="is this sidecar: refusing to loop"):
            routing.outbound(head(b"example.test"), own)
    # a wildcard listener's port on another machine's address is not a loop
    assert routing.outbound(head(b"x"), Endpoint("192.0.2.7", 15006)).name == "passthrough"


def test_inbound_goes_to_the_original_destination_else_to_the_app() -> None:
    routing, forwarded = router()
    send(routing.inbound(head(b"web"), Endpoint("10.1.0.5", 8080)))
    send(routing.inbound(head(b"web")))
    assert forwarded.to == [Endpoint("10.1.0.5", 8080), APP]
    with pytest.raises(ProxyError, match="refusing to loop"):
        routing.inbound(head(b"web"), Endpoint("127.0.0.1", 15006))


def test_local_addresses_are_the_ones_a_socket_can_bind() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("::1")
    assert not is_local_address("192.0.2.7")  # TEST-NET-1: never configured here
    assert not is_local_address("example.test")


def test_a_headless_services_request_goes_to_the_pod_the_caller_connected_to() -> None:
    doc = {"services": [{"name": "db", "endpoints": ["10.1.0.7:80", "10.1.0.8:80"]}]}
    mesh = parse_mesh(doc, "m.yaml")
    headless = dataclasses.replace(mesh.services[0], headless=True)
    forwarded = Forwarded()
    routing = Router(ServiceRegistry(), forwarded, APP, "client")
    routing.apply(snapshot_from_mesh(dataclasses.replace(mesh, services=(headless,))))
    pod = Endpoint("10.1.0.8", 80)
    decision = routing.outbound(head(b"db"), pod)
    assert decision.name == "db"
    # the authority names the service; the connection went to a pod: that pod it is
    send(decision, b"db", destination=pod)
    send(decision, b"10.1.0.7")
    assert forwarded.to == [pod, Endpoint("10.1.0.7", 80)]
