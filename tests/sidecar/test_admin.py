"""The admin pages, each built from only what it reads (no sidecar, no sockets)."""

from __future__ import annotations

import json

from mesh.model import parse_mesh
from sidecar import admin
from sidecar.config import Endpoint, Snapshot
from sidecar.exchange import Request, Response, Result
from sidecar.policy.stack import ServiceRegistry
from sidecar.transport.body import EMPTY_BODY
from sidecar.xds.interpret import snapshot_from_mesh


async def call(pages: dict[bytes, admin.Page], method: bytes, path: bytes) -> tuple[int, str]:
    replies: list[Result] = []
    request = Request(method, path, b"127.0.0.1:15000", [], EMPTY_BODY)
    admin.Admin(pages).handle(request, replies.append)
    [resp] = replies  # answered at once, exactly once
    assert isinstance(resp, Response)
    return resp.status, (await resp.body.read()).decode()


def payments_snapshot() -> Snapshot:
    doc = {"services": [{"name": "payments", "endpoints": ["127.0.0.1:9001"]}]}
    return snapshot_from_mesh(parse_mesh(doc, "test"))


async def test_an_unknown_path_is_404_naming_the_pages() -> None:
    status, text = await call({b"/live": admin.Live()}, b"GET", b"/nope")
    assert status == 404
    assert "/live" in text


async def test_drain_takes_post_and_says_why_it_was_asked() -> None:
    reasons: list[str] = []
    pages: dict[bytes, admin.Page] = {b"/drain": admin.Drain(reasons.append)}
    assert await call(pages, b"GET", b"/drain") == (405, "/drain takes POST\n")
    assert reasons == []
    assert await call(pages, b"POST", b"/drain") == (200, "draining\n")
    assert reasons == ["POST /drain"]


async def test_ready_answers_head_and_names_what_it_waits_for() -> None:
    pages: dict[bytes, admin.Page] = {b"/ready": admin.Ready(lambda: "listeners not up yet")}
    status, text = await call(pages, b"HEAD", b"/ready?verbose")
    assert status == 503
    assert text == "not ready: listeners not up yet\n"


async def test_config_dump_and_clusters_follow_the_applied_snapshot() -> None:
    applied: list[Snapshot] = []

    def snapshot() -> Snapshot | None:
        return applied[-1] if applied else None

    pages: dict[bytes, admin.Page] = {
        b"/config_dump": admin.ConfigDump(
            {"id": "n1", "service": "frontend", "namespace": "default"},
            "mesh.yaml",
            snapshot,
            {"outbound": ("127.0.0.1", 15001)},
        ),
        b"/clusters": admin.Clusters(snapshot, ServiceRegistry(), {}),
    }
    dump = json.loads((await call(pages, b"GET", b"/config_dump"))[1])
    assert dump["version"] is None
    assert json.loads((await call(pages, b"GET", b"/clusters"))[1]) == {}

    applied.append(payments_snapshot())
    dump = json.loads((await call(pages, b"GET", b"/config_dump"))[1])
    assert dump["version"] == applied[0].version
    assert dump["listeners"] == {"outbound": "127.0.0.1:15001"}
    [endpoint] = json.loads((await call(pages, b"GET", b"/clusters"))[1])["payments"]["endpoints"]
    # No request yet: no service state, no breaker, no pooled connection.
    assert endpoint == {
        "address": str(Endpoint("127.0.0.1", 9001)),
        "active_requests": 0,
        "breaker": "none",
        "ejected": False,
        "ejections": 0,
        "idle_connections": 0,
        "busy_connections": 0,
        "http2_connections": 0,
        "http2_streams": 0,
    }
