"""End to end: routing, keep-alive and the admin listener, through a real in-process sidecar."""

from __future__ import annotations

import json

import httpx

from tests.sidecar.proxy_fixtures import (
    WAIT,
    Received,
    mesh_doc,
    ok,
    raw_client,
    running_sidecar,
    serve,
    upstream,
    url,
)


def echo_host(req: Received) -> bytes:
    return ok(b"host=" + (req.header(b"host") or b"-") + b" target=" + req.target)


async def test_outbound_routes_by_host_header() -> None:
    async with (
        upstream(serve(echo_host)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        response = await client.get(url(sidecar, path="/pay?x=1"), headers={"host": "payments"})
    assert response.status_code == 200
    assert response.text == "host=payments target=/pay?x=1"
    assert len(payments.requests) == 1


async def test_absolute_form_routes_via_explicit_proxy() -> None:
    async with (
        upstream(serve(echo_host)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.get("http://payments/pay?x=1")
    assert response.status_code == 200
    assert response.text == "host=payments target=/pay?x=1"


async def test_absolute_form_is_sent_upstream_in_origin_form_with_host_rewritten() -> None:
    async with (
        upstream(serve(echo_host)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        raw_client(sidecar.addresses["outbound"]) as client,
    ):
        await client.send(b"GET http://payments:80/a/b?c=d HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
        response = await client.response()
    assert response.status == 200
    seen = payments.requests[0]
    assert seen.raw_head.startswith(b"GET /a/b?c=d HTTP/1.1\r\n")
    assert [v for k, v in seen.headers if k == b"host"] == [b"payments:80"]


async def test_round_robin_alternates_between_two_endpoints() -> None:
    async with (
        upstream(serve(lambda req: ok(b"a"))) as first,
        upstream(serve(lambda req: ok(b"b"))) as second,
        running_sidecar(
            mesh_doc(
                {"payments": [first.address, second.address]},
                service_policy={"load_balancer": "round_robin"},
            )
        ) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        bodies = [(await client.get("http://payments/")).text for _ in range(10)]
    assert sorted(bodies) == ["a"] * 5 + ["b"] * 5
    assert all(bodies[i] != bodies[i + 1] for i in range(9)), bodies


async def test_unknown_host_passes_through_to_its_authority_with_allow_any() -> None:
    async with (
        upstream(serve(echo_host)) as local,
        running_sidecar(mesh_doc(policy="allow_any")) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.get(f"http://{local.address}/direct")
    assert response.status_code == 200
    assert response.text == f"host={local.address} target=/direct"


async def test_registry_only_refuses_unknown_host_with_502_nr() -> None:
    async with (
        upstream(serve(echo_host)) as local,
        running_sidecar(mesh_doc(policy="registry_only")) as sidecar,
        httpx.AsyncClient(proxy=url(sidecar), timeout=WAIT) as client,
    ):
        response = await client.get(f"http://{local.address}/direct")
    assert response.status_code == 502
    assert response.headers["x-outrigger-flags"] == "NR"
    assert response.text.startswith("NR")
    assert local.connections == 0


async def test_inbound_listener_forwards_to_the_app() -> None:
    async with (
        upstream(serve(echo_host)) as app,
        running_sidecar(app=app.address) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        response = await client.get(url(sidecar, "inbound", "/hello"))
    assert response.status_code == 200
    assert response.text.endswith("target=/hello")
    assert len(app.requests) == 1


async def test_many_requests_on_one_client_connection_reuse_one_upstream_connection() -> None:
    async with (
        upstream(serve(lambda req: ok(req.body or b"empty"))) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(
            proxy=url(sidecar), timeout=WAIT, limits=httpx.Limits(max_connections=1)
        ) as client,
    ):
        for i in range(20):
            if i % 2:
                response = await client.post("http://payments/", content=b"x" * i)
            else:
                response = await client.get("http://payments/")
            assert response.status_code == 200
    assert len(payments.requests) == 20
    assert payments.connections == 1
    assert sidecar.outbound_state.total_connections == 1


async def test_admin_ready_and_live() -> None:
    async with running_sidecar() as sidecar, httpx.AsyncClient(timeout=WAIT) as client:
        ready = await client.get(url(sidecar, "admin", "/ready"))
        live = await client.get(url(sidecar, "admin", "/live"))
    assert ready.status_code == 200
    assert live.status_code == 200


async def test_admin_prometheus_counts_requests() -> None:
    async with (
        upstream(serve(echo_host)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        await client.get(url(sidecar, path="/"), headers={"host": "payments"})
        metrics = await client.get(url(sidecar, "admin", "/stats/prometheus"))
    assert metrics.status_code == 200
    assert "outrigger_requests_total" in metrics.text
    assert "payments" in metrics.text


async def test_admin_config_dump_has_version_and_resources() -> None:
    async with (
        upstream(serve(echo_host)) as payments,
        running_sidecar(mesh_doc({"payments": [payments.address]})) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        dump = (await client.get(url(sidecar, "admin", "/config_dump"))).json()
        version = sidecar.active.snapshot.version if sidecar.active else None
    assert dump["version"] == version is not None
    assert any("Cluster" in type_url for type_url in dump["resources"])
    assert "payments" in json.dumps(dump["resources"])


async def test_admin_clusters_lists_endpoints() -> None:
    async with (
        upstream(serve(echo_host)) as first,
        upstream(serve(echo_host)) as second,
        running_sidecar(mesh_doc({"payments": [first.address, second.address]})) as sidecar,
        httpx.AsyncClient(timeout=WAIT) as client,
    ):
        clusters = (await client.get(url(sidecar, "admin", "/clusters"))).json()
    addresses = [e["address"] for e in clusters["payments"]["endpoints"]]
    assert addresses == [first.address, second.address]


async def test_admin_ready_is_503_while_draining() -> None:
    async with running_sidecar() as sidecar:
        sidecar.draining = True
        async with httpx.AsyncClient(timeout=WAIT) as client:
            ready = await client.get(url(sidecar, "admin", "/ready"))
        sidecar.draining = False
    assert ready.status_code == 503
    assert "draining" in ready.text
