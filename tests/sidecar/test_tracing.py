"""Tracing end to end: client -> sidecar(s) -> app on loopback, spans exported with OTLP gRPC to
a real collector in this process (the demo's receiver: a grpc.aio server implementing the
collector's TraceService, `outrigger.demo.traces`).

Every wait is bounded. Spans are made when a request ends and exported by the batch worker
(schedule delay 20 ms here), so tests wait for the collector to hold the spans they expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from mesh.model import parse_mesh
from outrigger.demo.traces import CLIENT, INTERNAL, SERVER, SpanRecord, TraceReceiver, receive
from sidecar.app import Sidecar
from sidecar.exchange import Request
from sidecar.telemetry import propagation
from sidecar.telemetry.tracing import Tracing, TracingSettings, otlp_endpoint, resource
from sidecar.transport.body import EMPTY_BODY
from sidecar.xds.interpret import snapshot_from_mesh
from tests.sidecar.grpc_fixtures import channel as grpc_channel
from tests.sidecar.grpc_fixtures import echo_server
from tests.sidecar.proxy_fixtures import SidecarProcess, mesh_doc
from tests.sidecar.resilience_fixtures import sidecar_settings

pytestmark = pytest.mark.timeout(30)

WAIT = 5.0

# --- the collector ------------------------------------------------------------------------------


class Collector:
    """The demo's OTLP receiver (outrigger.demo.traces), with the waits these tests use."""

    def __init__(self, receiver: TraceReceiver) -> None:
        self.receiver = receiver

    @property
    def spans(self) -> list[SpanRecord]:
        return self.receiver.store.spans()

    async def wait_for(self, count: int) -> list[SpanRecord]:
        if not await self.receiver.until(lambda: len(self.spans) >= count, WAIT):
            raise TimeoutError(f"{len(self.spans)} spans arrived within {WAIT}s, not {count}")
        return self.spans


@contextlib.asynccontextmanager
async def collector() -> AsyncIterator[tuple[Collector, str]]:
    async with receive() as (receiver, endpoint):
        yield Collector(receiver), endpoint


# --- the app / upstream -------------------------------------------------------------------------

Script = Callable[[int], str]  # request number (0-based) -> "ok", "503" or "stall"


@dataclass
class App:
    script: Script = lambda n: "ok"
    requests: list[dict[bytes, bytes]] = field(default_factory=list)
    server: asyncio.AbstractServer | None = None
    address: str = ""
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                headers: dict[bytes, bytes] = {}
                for line in raw.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name:
                        headers[name.strip().lower()] = value.strip()
                number = len(self.requests)
                self.requests.append(headers)
                action = self.script(number)
                if action == "stall":
                    await asyncio.sleep(WAIT)
                    return
                status = b"503 Service Unavailable" if action == "503" else b"200 OK"
                writer.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # a closed test app: nothing to report
        finally:
            self.tasks.discard(task)
            self.writers.discard(writer)
            writer.close()


@contextlib.asynccontextmanager
async def app(script: Script = lambda n: "ok") -> AsyncIterator[App]:
    a = App(script)
    a.server = await asyncio.start_server(a._serve, "127.0.0.1", 0)
    a.address = f"127.0.0.1:{a.server.sockets[0].getsockname()[1]}"
    try:
        yield a
    finally:
        a.server.close()
        for writer in list(a.writers):
            writer.transport.abort()
        for task in list(a.tasks):
            task.cancel()
        if a.tasks:
            await asyncio.wait(list(a.tasks), timeout=WAIT)


# --- sidecars -----------------------------------------------------------------------------------


def mesh(
    services: dict[str, list[str]] | None = None,
    sampling: float = 1.0,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "tracing": {"sampling": sampling},
        "services": [
            {"name": name, "endpoints": endpoints, **({"policy": policy} if policy else {})}
            for name, endpoints in (services or {}).items()
        ],
    }


@contextlib.asynccontextmanager
async def sidecar(
    service: str,
    doc: dict[str, Any],
    endpoint: str | None,
    app_address: str = "127.0.0.1:1",
    **tracing: Any,
) -> AsyncIterator[Sidecar]:
    sc = Sidecar(sidecar_settings(service, app_address))
    if endpoint is not None:
        tracing.setdefault("schedule_delay_millis", 20)
        sc.enable_tracing(Tracing(TracingSettings(service, endpoint, **tracing)))
    sc.apply(snapshot_from_mesh(parse_mesh(doc, "t")))
    async with asyncio.timeout(WAIT):
        await sc.start()
    try:
        yield sc
    finally:
        async with asyncio.timeout(WAIT):
            await sc.drain()
        for pool in sc.upstreams.pools.values():
            for conn in [*pool.in_use, *pool.idle]:
                conn.abort()
        await asyncio.sleep(0)


def address(sc: Sidecar, listener: str) -> str:
    host, port = sc.addresses[listener]
    return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=WAIT, trust_env=False) as c:
        yield c


def refused() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def traceparent_ids(value: bytes) -> tuple[str, str, str]:
    _, trace_id, span_id, flags = value.decode().split("-")
    return trace_id, span_id, flags


# --- tests --------------------------------------------------------------------------------------


async def test_two_sidecar_chain_makes_one_trace_with_client_and_server_spans() -> None:
    async with (
        collector() as (spans, endpoint),
        app() as backend,
        sidecar("reviews", mesh(), endpoint, backend.address) as b,
    ):
        b_inbound = "{}:{}".format(*b.addresses["inbound"])
        async with (
            sidecar("frontend", mesh({"reviews": [b_inbound]}), endpoint) as a,
            client() as c,
        ):
            resp = await c.get(address(a, "outbound") + "/books/1?x=1", headers={"host": "reviews"})
            assert resp.status_code == 200
            found = await spans.wait_for(2)
    assert len(found) == 2
    by_kind = {s.kind: s for s in found}
    client_span, server_span = by_kind[CLIENT], by_kind[SERVER]
    assert client_span.trace_id == server_span.trace_id
    assert client_span.parent == ""  # the request came without context: a new trace
    assert server_span.parent == client_span.span_id
    assert client_span.resource["service.name"] == "frontend"
    assert server_span.resource["service.name"] == "reviews"
    assert client_span.name == "GET reviews"
    assert client_span.attributes["http.request.method"] == "GET"
    assert client_span.attributes["url.path"] == "/books/1"
    assert client_span.attributes["server.address"] == "reviews"
    assert client_span.attributes["http.response.status_code"] == 200
    assert client_span.attributes["outrigger.service"] == "reviews"
    assert client_span.attributes["outrigger.retry.attempts"] == 1
    assert "error.type" not in client_span.attributes
    assert server_span.attributes["outrigger.service"] == "reviews"
    assert server_span.attributes["http.response.status_code"] == 200
    # The app sees the SERVER span as its parent, in both formats.
    seen = backend.requests[0]
    trace_id, span_id, flags = traceparent_ids(seen[b"traceparent"])
    assert (trace_id, span_id) == (server_span.trace_id, server_span.span_id)
    assert int(flags, 16) & 1
    assert seen[b"x-b3-traceid"].decode() == trace_id
    assert seen[b"x-b3-spanid"].decode() == span_id
    assert seen[b"x-b3-sampled"] == b"1"


async def test_retried_request_has_a_span_per_attempt_with_events() -> None:
    policy = {
        "retries": {
            "attempts": 2,
            "per_try_timeout": "300ms",
            "retry_on": ["gateway-error"],
            "backoff": {"base": "5ms", "max": "10ms"},
        }
    }
    script = {0: "stall", 1: "503"}
    async with (
        collector() as (spans, endpoint),
        app(lambda n: script.get(n, "ok")) as up,
        sidecar("frontend", mesh({"reviews": [up.address]}, policy=policy), endpoint) as a,
        client() as c,
    ):
        resp = await c.get(address(a, "outbound") + "/", headers={"host": "reviews"})
        assert resp.status_code == 200
        found = await spans.wait_for(4)
    (client_span,) = [s for s in found if s.kind == CLIENT]
    attempts = sorted(
        (s for s in found if s.kind == INTERNAL), key=lambda s: s.attributes["outrigger.attempt"]
    )
    assert client_span.attributes["outrigger.retry.attempts"] == 3
    assert [s.parent for s in attempts] == [client_span.span_id] * 3
    assert [s.attributes["outrigger.outcome"] for s in attempts] == [
        "timeout",
        "gateway-error",
        "success",
    ]
    host, port = up.address.split(":")
    for span in attempts:
        assert span.attributes["server.address"] == host
        assert span.attributes["server.port"] == int(port)
    assert [name for name, _ in attempts[0].events] == ["outrigger.timeout"]
    assert attempts[1].attributes["http.response.status_code"] == 503
    assert attempts[2].attributes["http.response.status_code"] == 200
    # Each attempt carried its own span as the parent upstream.
    upstream_parents = [traceparent_ids(r[b"traceparent"])[1] for r in up.requests]
    assert upstream_parents == [s.span_id for s in attempts]


async def test_breaker_ejection_is_an_event_on_the_attempt_span() -> None:
    policy = {
        "retries": {
            "attempts": 1,
            "retry_on": ["gateway-error"],
            "backoff": {"base": "5ms", "max": "10ms"},
        },
        "circuit_breaker": {"consecutive_failures": 1, "max_ejection_percent": 100},
    }
    async with (
        collector() as (spans, endpoint),
        app(lambda n: "503") as bad,
        app() as good,
        sidecar(
            "frontend", mesh({"reviews": [bad.address, good.address]}, policy=policy), endpoint
        ) as a,
        client() as c,
    ):
        resp = await c.get(address(a, "outbound") + "/", headers={"host": "reviews"})
        assert resp.status_code == 200
        found = await spans.wait_for(3)
    attempts = sorted(
        (s for s in found if s.kind == INTERNAL), key=lambda s: s.attributes["outrigger.attempt"]
    )
    assert len(attempts) == 2
    events = dict(attempts[0].events)
    assert "outrigger.breaker.ejected" in events
    assert events["outrigger.breaker.ejected"]["server.port"] == int(bad.address.split(":")[1])


async def test_overflow_is_a_local_error_with_an_event() -> None:
    policy = {"circuit_breaker": {"max_requests": 1}}

    async with (
        collector() as (spans, endpoint),
        app(lambda n: "stall" if n == 0 else "ok") as up,
        sidecar("frontend", mesh({"reviews": [up.address]}, policy=policy), endpoint) as a,
        client() as c,
    ):
        url = address(a, "outbound") + "/"
        first = asyncio.ensure_future(c.get(url, headers={"host": "reviews"}))
        async with asyncio.timeout(WAIT):
            while not up.requests:
                await asyncio.sleep(0.01)
        resp = await c.get(url, headers={"host": "reviews"})
        assert resp.status_code == 503
        assert resp.headers["x-outrigger-flags"] == "UO"
        found = await spans.wait_for(1)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
            await first
    (span,) = [s for s in found if s.attributes.get("outrigger.response_flags") == "UO"]
    assert span.attributes["error.type"] == "UO"
    assert span.attributes["http.response.status_code"] == 503
    assert span.status == 2  # STATUS_CODE_ERROR
    assert [name for name, _ in span.events] == ["outrigger.overflow"]


@pytest.mark.parametrize("form", ["single", "multi"])
async def test_b3_context_joins_the_trace(form: str) -> None:
    trace_id = f"{random.getrandbits(128):032x}"
    parent = f"{random.getrandbits(64):016x}"
    if form == "single":
        headers = {"b3": f"{trace_id}-{parent}-1"}
    else:
        headers = {"x-b3-traceid": trace_id, "x-b3-spanid": parent, "x-b3-sampled": "1"}
    async with (
        collector() as (spans, endpoint),
        app() as up,
        sidecar("frontend", mesh({"reviews": [up.address]}, sampling=0.0), endpoint) as a,
        client() as c,
    ):
        resp = await c.get(address(a, "outbound") + "/", headers={"host": "reviews", **headers})
        assert resp.status_code == 200
        (span,) = await spans.wait_for(1)
    assert span.trace_id == trace_id
    assert span.parent == parent
    seen = up.requests[0]
    assert traceparent_ids(seen[b"traceparent"])[:2] == (trace_id, span.span_id)
    assert seen[b"x-b3-traceid"].decode() == trace_id
    assert seen[b"x-b3-spanid"].decode() == span.span_id
    if form == "single":
        assert seen[b"b3"].decode() == f"{trace_id}-{span.span_id}-1"
    else:
        assert b"b3" not in seen


async def test_w3c_context_joins_the_trace_and_keeps_tracestate() -> None:
    trace_id = f"{random.getrandbits(128):032x}"
    parent = f"{random.getrandbits(64):016x}"
    async with (
        collector() as (spans, endpoint),
        app() as up,
        sidecar("frontend", mesh({"reviews": [up.address]}, sampling=0.0), endpoint) as a,
        client() as c,
    ):
        await c.get(
            address(a, "outbound") + "/",
            headers={
                "host": "reviews",
                "traceparent": f"00-{trace_id}-{parent}-01",
                "tracestate": "vendor=abc",
            },
        )
        (span,) = await spans.wait_for(1)
    assert (span.trace_id, span.parent) == (trace_id, parent)
    assert up.requests[0][b"tracestate"] == b"vendor=abc"


async def test_unsampled_requests_make_no_spans_and_say_so_downstream() -> None:
    unsampled = f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-00"
    async with (
        collector() as (spans, endpoint),
        app() as up,
        sidecar("frontend", mesh({"reviews": [up.address]}, sampling=0.0), endpoint) as a,
        client() as c,
    ):
        for _ in range(5):
            resp = await c.get(address(a, "outbound") + "/", headers={"host": "reviews"})
            assert resp.status_code == 200
        await c.get(
            address(a, "outbound") + "/", headers={"host": "reviews", "traceparent": unsampled}
        )
        assert a.tracing is not None
        assert await asyncio.to_thread(a.tracing.force_flush, WAIT)
    assert spans.spans == []
    for seen in up.requests[:5]:
        assert traceparent_ids(seen[b"traceparent"])[2] == "02"  # not sampled
        assert seen[b"x-b3-sampled"] == b"0"
    assert up.requests[5][b"traceparent"] == unsampled.encode()  # passed through untouched


async def test_malformed_context_is_replaced_not_forwarded() -> None:
    async with (
        collector() as (spans, endpoint),
        app() as up,
        sidecar("frontend", mesh({"reviews": [up.address]}), endpoint) as a,
        client() as c,
    ):
        await c.get(
            address(a, "outbound") + "/",
            headers={"host": "reviews", "traceparent": "00-zz-bad", "x-b3-spanid": "nothex"},
        )
        (span,) = await spans.wait_for(1)
    seen = up.requests[0]
    assert span.parent == ""
    assert traceparent_ids(seen[b"traceparent"])[:2] == (span.trace_id, span.span_id)
    assert seen[b"x-b3-spanid"].decode() == span.span_id


async def test_collector_down_leaves_requests_alone_and_counts_dropped_spans() -> None:
    down = "http://" + refused()
    async with (
        app() as up,
        sidecar(
            "frontend",
            mesh({"reviews": [up.address]}),
            down,
            max_queue_size=2,
            max_export_batch_size=2,
            export_timeout=3.0,
        ) as a,
        client() as c,
    ):
        assert a.tracing is not None
        for _ in range(10):
            resp = await c.get(address(a, "outbound") + "/", headers={"host": "reviews"})
            assert resp.status_code == 200
        # All ten were served while the first export was still failing (it retries for ~1 s).
        assert a.tracing.drops["export_failed"] == 0
        assert a.tracing.drops["queue_full"] > 0
        async with asyncio.timeout(WAIT):
            while a.tracing.drops["export_failed"] == 0:
                await asyncio.sleep(0.05)
        metrics = (await c.get(address(a, "admin") + "/stats/prometheus")).text
    assert 'outrigger_spans_dropped_total{reason="queue_full"}' in metrics
    assert 'outrigger_spans_dropped_total{reason="export_failed"}' in metrics


async def test_otlp_endpoint_flag_turns_tracing_on() -> None:
    async with collector() as (spans, endpoint), app() as up:
        sc = Sidecar(sidecar_settings("frontend", otlp_endpoint=endpoint))
        assert sc.tracing is not None
        sc.apply(snapshot_from_mesh(parse_mesh(mesh({"reviews": [up.address]}), "t")))
        assert sc.tracing.sampling == 1.0
        async with asyncio.timeout(WAIT):
            await sc.start()
        try:
            async with client() as c:
                await c.get(address(sc, "outbound") + "/", headers={"host": "reviews"})
            await asyncio.to_thread(sc.tracing.force_flush, WAIT)
            (span,) = await spans.wait_for(1)
            assert span.kind == CLIENT
        finally:
            async with asyncio.timeout(WAIT):
                await sc.drain()


def test_tracing_is_off_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    sc = Sidecar(sidecar_settings("frontend"))
    assert sc.tracing is None
    sc.apply(snapshot_from_mesh(parse_mesh(mesh({"reviews": ["127.0.0.1:1"]}), "t")))
    assert sc.active is not None
    (handler,) = sc.active.handlers.values()
    layer = getattr(handler, "__self__", handler)  # layers are handed on as bound methods
    assert type(layer).__name__ == "Balancer"  # no tracing layer at all: zero cost
    assert otlp_endpoint(None, None, {}) is None
    assert otlp_endpoint(None, "http://mesh:4317", {}) == "http://mesh:4317"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"}
    assert otlp_endpoint(None, "http://mesh:4317", env) == "http://env:4317"
    assert otlp_endpoint("http://flag:4317", "http://mesh:4317", env) == "http://flag:4317"
    assert otlp_endpoint("http://flag:4317", None, {"OTEL_SDK_DISABLED": "true"}) is None


def test_resource_names_the_service_and_pod_and_env_wins() -> None:
    res = resource("frontend", {"POD_NAME": "frontend-7d9", "POD_NAMESPACE": "shop"}).attributes
    assert res["service.name"] == "frontend"
    assert res["k8s.pod.name"] == "frontend-7d9"
    assert res["k8s.namespace.name"] == "shop"


def test_otlp_endpoint_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="otlp_endpoint"):
        sidecar_settings("frontend", otlp_endpoint="collector 4317")


# --- propagation and sampling units -------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.0, 1.0])
def test_new_trace_headers_match_the_propagators(ratio: float) -> None:
    """The span layer writes a new trace's context itself, sampled or not: the same bytes as
    the propagators, fresh valid ids on every request."""
    tracing = Tracing(
        TracingSettings("frontend", "http://127.0.0.1:4317", sampling=ratio),
        exporter=InMemorySpanExporter(),
    )
    seen: list[list[tuple[bytes, bytes]]] = []
    layer = tracing.client(lambda req, reply: seen.append(req.headers), "reviews")
    for _ in range(600):  # more than one batch of ids
        layer(Request(b"GET", b"/", b"reviews", [(b"host", b"reviews")], EMPTY_BODY), print)
    flags = TraceFlags(TraceFlags.RANDOM_TRACE_ID | (TraceFlags.SAMPLED if ratio else 0))
    ids = set()
    for headers in seen:
        version, trace, span, written = dict(headers)[b"traceparent"].split(b"-")
        trace_id, span_id = int(trace, 16), int(span, 16)
        assert version == b"00" and int(written, 16) == flags and trace_id and span_id
        context = SpanContext(trace_id, span_id, False, flags)
        assert sorted(headers) == sorted(propagation.inject([(b"host", b"reviews")], context))
        ids.add(trace_id)
    assert len(ids) == len(seen)


def test_fast_inject_writes_what_the_propagators_write() -> None:
    incoming = [(b"host", b"reviews"), (b"traceparent", b"00-zz-bad"), (b"x-b3-sampled", b"0")]
    for flags in (0, 1, 2, 3, 0x81):
        for state in (TraceState(), TraceState([("vendor", "abc")])):
            for b3_single in (False, True):
                context = SpanContext(
                    random.getrandbits(128) or 1,
                    random.getrandbits(64) or 1,
                    False,
                    TraceFlags(flags),
                    state,
                )
                fast = propagation.inject(incoming, context, b3_single=b3_single)
                slow = propagation.inject_with_propagators(incoming, context, b3_single=b3_single)
                assert fast == slow


def test_fast_traceparent_check_agrees_with_the_propagator() -> None:
    values = [
        b"00-%032x-%016x-%02x" % (random.getrandbits(128), random.getrandbits(64), flags)
        for flags in (0, 1, 2, 3)
    ]
    values += [b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-00", b"00-abc-def-00", b"ff-" + b"1" * 51]
    for value in values:
        incoming = propagation.extract({"traceparent": value.decode()})
        slow = incoming.parent is not None and not incoming.parent.trace_flags.sampled
        assert propagation.unsampled_traceparent(value) == slow, value


def _new_traces(ratio: float, count: int) -> list[tuple[int, bytes]]:
    """(trace id, traceparent flags) of `count` new traces through a client span layer."""
    tracing = Tracing(
        TracingSettings("frontend", "http://127.0.0.1:4317", sampling=ratio),
        exporter=InMemorySpanExporter(),
    )
    seen: list[bytes] = []
    layer = tracing.client(
        lambda req, reply: seen.append(dict(req.headers)[b"traceparent"]), "reviews"
    )
    for _ in range(count):
        layer(Request(b"GET", b"/", b"reviews", [(b"host", b"reviews")], EMPTY_BODY), print)
    return [(int(value.split(b"-")[1], 16), value.split(b"-")[3]) for value in seen]


def test_new_trace_decision_is_parent_based_trace_id_ratio() -> None:
    for ratio in (0.25, 0.0, 1.0):
        sdk = ParentBased(TraceIdRatioBased(ratio))
        for trace_id, flags in _new_traces(ratio, 2000):
            decision = sdk.should_sample(None, trace_id, "x").decision
            assert (flags == b"03") == (decision is Decision.RECORD_AND_SAMPLE), (ratio, trace_id)
            assert flags in (b"02", b"03")
    sampled = sum(flags == b"03" for _, flags in _new_traces(0.25, 2000))
    assert 300 < sampled < 700  # 500 expected; the odds of missing are below 1e-20
    parent = SpanContext(1, 2, True, TraceFlags(TraceFlags.SAMPLED))
    context = set_span_in_context(NonRecordingSpan(parent))
    sdk = ParentBased(TraceIdRatioBased(0.25))
    assert sdk.should_sample(context, 1, "x").decision is Decision.RECORD_AND_SAMPLE


# --- the exporter process -----------------------------------------------------------------------


def _state(pid: int) -> str | None:
    """The process's state letter (`Z`: exited, not reaped), or None once it is reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


async def _until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_exporter_is_a_child_process_that_flushes_and_is_reaped_at_shutdown() -> None:
    async with (
        collector() as (spans, endpoint),
        app() as up,
        # Batches go out only when full or at shutdown: the spans below leave at shutdown.
        sidecar(
            "frontend", mesh({"reviews": [up.address]}), endpoint, schedule_delay_millis=60_000
        ) as a,
        client() as c,
    ):
        tracing = a.tracing
        assert tracing is not None
        for _ in range(3):
            resp = await c.get(address(a, "outbound") + "/", headers={"host": "reviews"})
            assert resp.status_code == 200
        await _until(lambda: tracing.exporter_pid is not None)
        pid = tracing.exporter_pid
        assert pid is not None and pid != os.getpid()
        # Between fork and exec the child's cmdline reads empty for a moment.
        cmdline = Path(f"/proc/{pid}/cmdline")
        await _until(lambda: b"sidecar.telemetry.exporter" in cmdline.read_bytes())
        assert spans.spans == []
        assert await tracing.shutdown(WAIT)
        assert len(spans.spans) == 3  # exported before the exporter exited
        assert _state(pid) is None  # and reaped: no zombie
        assert sum(tracing.drops.values()) == 0


async def test_killed_exporter_is_counted_reaped_and_restarted() -> None:
    async with (
        collector() as (spans, endpoint),
        app() as up,
        sidecar("frontend", mesh({"reviews": [up.address]}), endpoint) as a,
        client() as c,
    ):
        tracing = a.tracing
        assert tracing is not None
        url = address(a, "outbound") + "/"
        assert (await c.get(url, headers={"host": "reviews"})).status_code == 200
        await spans.wait_for(1)
        first = tracing.exporter_pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await _until(lambda: tracing.exporter_pid is None)  # the sidecar saw its socket close
        # Requests are served as before; until the restart (after a backoff) their spans are
        # dropped and counted.
        async with asyncio.timeout(WAIT):
            while tracing.drops["exporter_down"] == 0:
                assert (await c.get(url, headers={"host": "reviews"})).status_code == 200
                await asyncio.sleep(0.01)
        await _until(lambda: _state(first) is None)  # reaped: no zombie
        exported = len(spans.spans)
        async with asyncio.timeout(WAIT):
            while tracing.exporter_pid in (None, first):
                assert (await c.get(url, headers={"host": "reviews"})).status_code == 200
                await asyncio.sleep(0.05)
        await spans.wait_for(exported + 1)  # the new exporter exports
        assert tracing.exporter_restarts == 1
        metrics = (await c.get(address(a, "admin") + "/stats/prometheus")).text
    assert 'outrigger_spans_dropped_total{reason="exporter_down"}' in metrics


async def test_stalled_exporter_and_dead_collector_leave_requests_alone() -> None:
    down = "http://" + refused()
    async with (
        app() as up,
        sidecar(
            "frontend",
            mesh({"reviews": [up.address]}),
            down,
            max_queue_size=100_000,  # big enough for the socket to fill first
            max_export_batch_size=16,
            export_timeout=3.0,
        ) as a,
        client() as c,
    ):
        tracing = a.tracing
        assert tracing is not None
        url = address(a, "outbound") + "/"
        assert (await c.get(url, headers={"host": "reviews"})).status_code == 200
        await _until(lambda: tracing.exporter_pid is not None)
        pid = tracing.exporter_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # an exporter that reads nothing: its socket fills up
        long_path = url + "x" * 6000  # ~6 KB per record
        for _ in range(100):
            resp = await c.get(long_path, headers={"host": "reviews"})
            assert resp.status_code == 200
        await _until(lambda: tracing.drops["exporter_busy"] > 0)
        metrics = (await c.get(address(a, "admin") + "/stats/prometheus")).text
        assert 'outrigger_spans_dropped_total{reason="exporter_busy"}' in metrics
        # Shutdown cannot flush a stopped exporter: it is killed at the deadline, and reaped.
        assert not await tracing.shutdown(0.5)
        assert _state(pid) is None


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
async def test_sidecar_process_exit_leaves_no_exporter_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop: signal.Signals
) -> None:
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # read by the sidecar process
    async with collector() as (spans, endpoint), app() as up:
        doc = mesh_doc({"reviews": [up.address]})
        doc["tracing"] = {"sampling": 1.0, "otlp_endpoint": endpoint}
        proc = await SidecarProcess.spawn(tmp_path, doc, drain_timeout="2s")
        try:
            async with httpx.AsyncClient(proxy=proc.url(), timeout=WAIT) as c:
                resp = await c.get("http://reviews/")
                assert resp.status_code == 200
                await spans.wait_for(1)
            (exporter,) = _children(proc.pid)
            proc.proc.send_signal(stop)
            await proc.wait(WAIT)
        finally:
            await proc.stop()
    if stop == signal.SIGTERM:
        assert _state(exporter) is None  # the sidecar waited for it before exiting
    else:  # orphaned: it sees end of file and exits on its own (then init reaps it)
        await _until(lambda: _state(exporter) in (None, "Z"), 2 * WAIT)


async def test_grpc_calls_get_rpc_attributes_on_both_sides() -> None:
    """OpenTelemetry's RPC conventions on the CLIENT and SERVER spans of a gRPC call through
    two sidecars (HTTP/2 both hops), with the call's grpc-status: from the trailers after the
    answer, a trailers-only error's, and one in the trailers after the headers."""
    async with (
        collector() as (spans, endpoint),
        echo_server() as server,
        sidecar("echo", mesh(), endpoint, server.address) as b,
    ):
        b_inbound = "{}:{}".format(*b.addresses["inbound"])
        doc = {
            "tracing": {"sampling": 1.0},
            "services": [
                {"name": "echo", "port": 50051, "protocol": "grpc", "endpoints": [b_inbound]}
            ],
        }
        async with sidecar("frontend", doc, endpoint) as a:
            target = "{}:{}".format(*a.addresses["outbound"])
            async with grpc_channel(target, "echo:50051") as ch:
                assert await ch.unary_unary("/test.Echo/Unary")(b"ab", timeout=5) == b"ba"
                server.fail_next.append(grpc.StatusCode.PERMISSION_DENIED)
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/test.Echo/Unary")(b"ab", timeout=5)
                server.fail_next.append(grpc.StatusCode.UNAVAILABLE)
                with pytest.raises(grpc.aio.AioRpcError):
                    await ch.unary_unary("/test.Echo/HeadersFirst")(b"ab", timeout=5)
            found = await spans.wait_for(6)
    for span in found:
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == "test.Echo"
    methods = sorted(str(s.attributes["rpc.method"]) for s in found)
    assert methods == ["HeadersFirst"] * 2 + ["Unary"] * 4
    codes = sorted(int(str(s.attributes.get("rpc.grpc.status_code"))) for s in found)
    assert codes == [0, 0, 7, 7, 14, 14]
