"""The demo's app standalone, as k8s/examples runs it in a container: a real process that binds
`--listen` itself, answers, fails `--failure-rate` of its requests with 503, and calls its
`--downstream` with plain HTTP, passing the trace headers on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from outrigger.demo.service import TRACE_HEADERS, build_parser
from tests.e2e.mesh_processes import Processes, start_demo_app
from tests.sidecar.proxy_fixtures import Received, ok, serve, upstream


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path) as processes:
        yield processes


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
        yield client


async def statuses(http: httpx.AsyncClient, url: str, count: int) -> list[int]:
    return [(await http.get(url)).status_code for _ in range(count)]


async def test_it_binds_the_listen_address_itself_and_answers(
    procs: Processes, http: httpx.AsyncClient
) -> None:
    address = await start_demo_app(procs, "payments", "--listen", "127.0.0.1:0")
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0  # port 0: the one it bound, printed
    reply = await http.get(f"http://{address}/charge")
    assert (reply.status_code, reply.text) == (200, "payments: ok\n")
    assert reply.headers["x-demo-service"] == "payments"
    assert await statuses(http, f"http://{address}/", 50) == [200] * 50  # default: no failures
    health = await http.get(f"http://{address}/healthz")
    assert (health.status_code, health.text) == (200, "payments: ok\n")


async def test_a_failure_rate_answers_503_to_about_that_share_of_requests(
    procs: Processes, http: httpx.AsyncClient
) -> None:
    address = await start_demo_app(procs, "payments", "--failure-rate", "0.25")
    count = 400
    seen = await statuses(http, f"http://{address}/", count)
    assert set(seen) <= {200, 503}
    # Binomial(400, 0.25): mean 100, standard deviation 8.7; outside 60..140 is 4.6 of them.
    assert 60 <= seen.count(503) <= 140, seen.count(503)


async def test_a_failure_rate_of_one_fails_every_request_but_never_the_health_check(
    procs: Processes, http: httpx.AsyncClient
) -> None:
    address = await start_demo_app(procs, "payments-flaky", "--failure-rate", "1")
    failed = await http.get(f"http://{address}/")
    assert (failed.status_code, failed.text) == (503, "payments-flaky: failing on purpose\n")
    assert await statuses(http, f"http://{address}/", 50) == [503] * 50
    # The kubelet's probe passes: the replica stays in the Service, for the mesh to deal with.
    assert await statuses(http, f"http://{address}/healthz", 20) == [200] * 20


async def test_the_downstream_is_called_with_plain_http_and_the_trace_headers_passed_on(
    procs: Processes, http: httpx.AsyncClient
) -> None:
    seen: list[Received] = []

    def payments(req: Received) -> bytes:
        seen.append(req)
        return ok(b"payments: ok\n")

    async with upstream(serve(payments)) as downstream:
        address = await start_demo_app(
            procs, "orders", "--downstream", f"http://{downstream.address}/charge"
        )
        trace = {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=1",
            "x-b3-traceid": "0af7651916cd43dd8448eb211c80319c",
            "x-b3-spanid": "b7ad6b7169203331",
            "x-b3-sampled": "1",
            "x-request-id": "r-17",
        }
        reply = await http.get(f"http://{address}/order", headers={**trace, "x-not-forwarded": "1"})
        assert (reply.status_code, reply.text) == (200, "orders <- payments: ok\n")
        (req,) = seen
        assert (req.method, req.target) == (b"GET", b"/charge")  # origin form: no proxy
        assert req.header(b"host") == downstream.address.encode()
        for name, value in trace.items():
            assert name in TRACE_HEADERS
            assert req.header(name.encode()) == value.encode(), name
        assert req.header(b"x-not-forwarded") is None
        assert (await http.get(f"http://{address}/healthz")).status_code == 200
        assert len(seen) == 1  # the health check answers alone, without the downstream


async def test_a_failing_downstream_is_passed_on_and_a_failing_app_does_not_call_it(
    procs: Processes, http: httpx.AsyncClient
) -> None:
    payments = await start_demo_app(procs, "payments", "--failure-rate", "1")
    orders = await start_demo_app(procs, "orders", "--downstream", f"http://{payments}/")
    reply = await http.get(f"http://{orders}/")
    assert (reply.status_code, reply.text) == (503, "orders <- payments: failing on purpose\n")

    calls: list[Received] = []

    def record(req: Received) -> bytes:
        calls.append(req)
        return ok()

    async with upstream(serve(record)) as downstream:
        failing = await start_demo_app(
            procs, "frontend", "--downstream", f"http://{downstream.address}/",
            "--failure-rate", "1",
        )  # fmt: skip
        assert (await http.get(f"http://{failing}/")).status_code == 503
        assert calls == []


async def test_the_delay_holds_every_answer_and_the_switches_change_what_it_does(
    procs: Processes, http: httpx.AsyncClient
) -> None:
    address = await start_demo_app(procs, "payments", "--delay", "300ms")
    started = time.monotonic()
    assert (await http.get(f"http://{address}/")).status_code == 200
    assert time.monotonic() - started >= 0.3
    assert (await http.post(f"http://{address}/delay?ms=0")).status_code == 200

    switched = await http.post(f"http://{address}/fail?rate=1")
    assert (switched.status_code, switched.text) == (200, "payments failure_rate=1\n")
    assert await statuses(http, f"http://{address}/", 10) == [503] * 10
    assert (await http.post(f"http://{address}/fail?on=0")).status_code == 200
    assert await statuses(http, f"http://{address}/", 10) == [200] * 10
    refused = await http.post(f"http://{address}/fail?rate=2")
    assert refused.status_code == 400
    assert "rate must be a number from 0 to 1" in refused.text


async def test_requests_sent_together_on_one_connection_are_answered_in_order(
    procs: Processes,
) -> None:
    # A switch needs no waiting and is answered at once on its own, but behind a delayed GET on
    # the same connection it waits its turn (and then turns the delay off).
    address = await start_demo_app(procs, "payments", "--delay", "200ms")
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    switch = b"POST /delay?ms=0 HTTP/1.1\r\nhost: p\r\ncontent-length: 0\r\n\r\n"
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nhost: p\r\n\r\n" + switch)
        received = b""
        async with asyncio.timeout(5):
            while b"delay=0.0s\n" not in received or b"payments: ok\n" not in received:
                received += await reader.read(4096)
        assert received.index(b"payments: ok\n") < received.index(b"payments delay=0.0s\n")
        writer.write(b"GET /fast HTTP/1.1\r\nhost: p\r\n\r\n")
        started = time.monotonic()
        async with asyncio.timeout(5):
            alone = await reader.readuntil(b"payments: ok\n")
        assert alone.startswith(b"HTTP/1.1 200 OK\r\n") and time.monotonic() - started < 0.2
    finally:
        writer.close()


async def test_what_is_not_http_gets_a_400_and_the_connection_closed(procs: Processes) -> None:
    address = await start_demo_app(procs, "payments")
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        async with asyncio.timeout(5):
            received = await reader.read()  # to EOF: the app closed the connection
        assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert received.endswith(b"\r\n\r\nbad request\n")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", "8080"], "argument --listen: must be HOST:PORT, e.g. 0.0.0.0:8080"),
        (["--listen", ":1", "--failure-rate", "1.5"], "argument --failure-rate: must be a number "
         "from 0 to 1, e.g. 0.25, got '1.5'"),
        (["--listen", ":1", "--failure-rate", "nan"], "argument --failure-rate: must be a number"),
        (["--listen", ":1", "--delay", "soon"], "argument --delay: must be a duration such as "
         "100ms or 1.5s, got 'soon'"),
        ([], "one of the arguments --listen --fd is required"),
        (["--listen", ":1", "--fd", "3"], "argument --fd: not allowed with argument --listen"),
    ],
)  # fmt: skip
def test_a_bad_flag_is_refused_with_its_name_and_form(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--name", "payments", *flags])
    assert exited.value.code == 2
    assert message in capsys.readouterr().err
