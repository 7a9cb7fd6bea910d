"""The access log end to end: client -> in-process sidecar (--access-log) -> upstreams on loopback.

Lines are taken from the sidecar's buffer (what `_housekeeping` flushes once a second) and, in
one test, from stdout after `AccessLog.flush`. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.model import parse_mesh
from sidecar.app import Sidecar
from sidecar.telemetry import trace_id
from sidecar.telemetry.tracing import Tracing, TracingSettings
from sidecar.xds.interpret import snapshot_from_mesh
from tests.sidecar.resilience_fixtures import (
    WAIT,
    Proxy,
    Respond,
    always,
    mesh,
    refused_address,
    sidecar_settings,
    upstreams,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

FIELDS = {
    "time",
    "direction",
    "method",
    "authority",
    "path",
    "status",
    "flags",
    "duration_ms",
    "destination",
    "upstream",
    "attempts",
    "trace_id",
}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SAMPLED_PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@contextlib.asynccontextmanager
async def logging_sidecar(doc: dict[str, Any], *, tracing: bool = False) -> AsyncIterator[Proxy]:
    sidecar = Sidecar(dataclasses.replace(sidecar_settings(), access_log=True))
    if tracing:  # spans go to memory: this test is about the log line, not the export
        settings = TracingSettings("frontend", "http://127.0.0.1:1", schedule_delay_millis=20)
        sidecar.enable_tracing(Tracing(settings, exporter=InMemorySpanExporter()))
    sidecar.apply(snapshot_from_mesh(parse_mesh(doc, "test")))
    async with asyncio.timeout(WAIT):
        await sidecar.start()
    proxy = Proxy(sidecar)
    try:
        yield proxy
    finally:
        async with asyncio.timeout(WAIT):
            await proxy.client.aclose()
            await proxy.admin.aclose()
        async with asyncio.timeout(WAIT):
            await sidecar.drain()


async def lines(proxy: Proxy, count: int) -> list[dict[str, Any]]:
    """The first `count` access-log lines (a line is written when the response has been sent)."""
    buffered = proxy.sidecar.access_log.lines
    await wait_for(lambda: len(buffered) >= count)
    return [json.loads(line) for line in buffered[:count]]


async def test_retried_request_logs_its_attempts_upstream_and_trace_id() -> None:
    policy = {"retries": {"attempts": 1, "retry_on": ["connect-failure"]}}
    async with (
        upstreams(always(Respond())) as [good],
        logging_sidecar(mesh([refused_address(), good.address], policy), tracing=True) as proxy,
    ):
        for _ in range(4):
            resp = await proxy.request(
                "GET", "/orders?x=1", headers={"traceparent": SAMPLED_PARENT}
            )
            assert resp.status_code == 200
        logged = await lines(proxy, 4)
        for line, seen in zip(logged, good.requests, strict=True):
            assert set(line) == FIELDS
            assert line["direction"] == "outbound"
            assert line["method"] == "GET"
            assert line["authority"] == "payments"
            assert line["path"] == "/orders?x=1"
            assert line["status"] == 200
            assert line["destination"] == "payments"
            assert line["upstream"] == good.address  # the endpoint that answered
            assert line["attempts"] in (1, 2)
            # The sampled caller's trace continues: the id the upstream saw is the one logged.
            assert line["trace_id"] == TRACE_ID
            assert seen.headers["traceparent"].split("-")[1] == TRACE_ID
        retried = [line for line in logged if line["attempts"] == 2]
        assert retried, "round robin sends at least one request to the refused endpoint first"
        assert all(line["flags"] == "-" for line in logged)


async def test_retries_exhausted_logs_the_last_endpoint_tried() -> None:
    first, second = refused_address(), refused_address()
    policy = {"retries": {"attempts": 1, "retry_on": ["connect-failure"]}}
    async with logging_sidecar(mesh([first, second], policy)) as proxy:
        resp = await proxy.request()
        assert resp.status_code == 503
        [line] = await lines(proxy, 1)
        assert line["flags"] == "URX"
        assert line["attempts"] == 2
        assert line["upstream"] in (first, second)
        assert line["trace_id"] == "-"  # tracing off and the caller sent no context


async def test_tracing_on_logs_the_new_trace_it_started() -> None:
    async with (
        upstreams(always(Respond())) as [up],
        logging_sidecar(mesh([up.address]), tracing=True) as proxy,
    ):
        assert (await proxy.request()).status_code == 200
        [line] = await lines(proxy, 1)
        [seen] = up.requests
        # Sampled or not, the sidecar wrote a context for the upstream; the log names its trace.
        assert re.fullmatch("[0-9a-f]{32}", line["trace_id"])
        assert seen.headers["traceparent"].split("-")[1] == line["trace_id"]
        assert line["attempts"] == 1
        assert line["upstream"] == up.address


async def test_local_error_logs_no_upstream(capsys: pytest.CaptureFixture[str]) -> None:
    doc = {**mesh(["127.0.0.1:1"]), "outbound_policy": "registry_only"}
    async with logging_sidecar(doc) as proxy:
        resp = await proxy.request(service="unknown.example")
        assert resp.status_code == 502
        await lines(proxy, 1)
        capsys.readouterr()
        proxy.sidecar.access_log.flush()
        [text] = capsys.readouterr().out.splitlines()
        line = json.loads(text)
        assert line["flags"] == "NR"
        assert line["destination"] == "-"
        assert (line["upstream"], line["attempts"], line["trace_id"]) == ("-", 0, "-")
        assert proxy.sidecar.access_log.lines == []


async def test_a_refused_request_is_logged_and_counted_as_400_dpe() -> None:
    async with upstreams(always(Respond())) as [up], logging_sidecar(mesh([up.address])) as proxy:
        host, port = proxy.sidecar.addresses["outbound"]
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET / HTTP/1.1\r\nHost: payments\r\nBad_Name: x\r\n\r\n")
            answer = await reader.read()  # the sidecar closes after the refusal
            writer.close()
        assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        [line] = await lines(proxy, 1)
        assert set(line) == FIELDS
        assert (line["status"], line["flags"], line["destination"]) == (400, "DPE", "-")
        assert (line["method"], line["authority"], line["path"]) == ("-", "-", "-")
        text = await proxy.prometheus()
        assert (
            'outrigger_requests_total{code="400",destination="-",direction="outbound",'
            'flags="DPE",source="frontend"} 1.0'
        ) in text
        assert up.requests == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (SAMPLED_PARENT.encode(), TRACE_ID),
        (f"00-{TRACE_ID}-00f067aa0ba902b7-00".encode(), TRACE_ID),
        (f"01-{TRACE_ID}-00f067aa0ba902b7-01-future".encode(), TRACE_ID),
        (f"ff-{TRACE_ID}-00f067aa0ba902b7-01".encode(), "-"),
        (b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01", "-"),
        (f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01".encode(), "-"),
        (b"garbage", "-"),
    ],
)
def test_trace_id_is_read_from_a_valid_traceparent_only(value: bytes, expected: str) -> None:
    assert trace_id([(b"x-request-id", b"1"), (b"traceparent", value)]) == expected
    assert trace_id([(b"x-request-id", b"1")]) == "-"
