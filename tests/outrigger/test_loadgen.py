"""The open-loop load generator: its arithmetic (percentiles, the schedule, giving up) on plain
numbers, then the client against real servers on 127.0.0.1: every request due is sent, answers
held back or a stalled generator loop show up in the latencies (counted from when each request was
due, not from when it went out), and failures are counted by cause."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from outrigger.loadgen import (
    CLOSED,
    CONNECT,
    TIMEOUT,
    Latency,
    LoadGenerator,
    LoopTimer,
    Outcome,
    Pacer,
    Recorder,
    Waiting,
    clock,
    make_timer,
    measure,
    outcome_from_json,
    percentile,
)

# --- arithmetic ---------------------------------------------------------------------------------


def test_percentile_is_the_nearest_rank() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.51) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    hundred = [float(v) for v in range(1, 101)]
    assert percentile(hundred, 0.99) == 99.0  # not 100: 99 of the 100 are at or below 99
    assert percentile(hundred, 0.999) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_percentile_refuses_no_values_and_a_fraction_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
    with pytest.raises(ValueError, match=r"within \[0, 1\]"):
        percentile([1.0], 99)


def test_latency_summarizes_unsorted_values() -> None:
    lat = Latency.of([0.004, 0.001, 0.003, 0.002])
    assert lat is not None
    assert (lat.count, lat.p50, lat.p99, lat.max) == (4, 0.002, 0.004, 0.004)
    assert lat.mean == pytest.approx(0.0025)
    assert lat.ms()["p50"] == 2.0 and lat.ms()["count"] == 4
    assert Latency.of([]) is None


def test_pacer_hands_out_each_due_time_once_at_a_fixed_rate() -> None:
    pacer = Pacer(rate=100.0, start=10.0)
    assert pacer.due(10.0) == [10.0]
    assert pacer.due(10.005) == []
    assert pacer.next_at() == pytest.approx(10.01)
    assert pacer.due(10.03) == pytest.approx([10.01, 10.02, 10.03])


def test_after_a_stall_the_pacer_hands_out_every_missed_request_with_its_own_due_time() -> None:
    pacer = Pacer(rate=100.0, start=0.0)
    pacer.due(0.0)
    missed = pacer.due(0.5)  # the caller's loop was stuck for half a second
    assert len(missed) == 50
    assert missed[0] == pytest.approx(0.01) and missed[-1] == pytest.approx(0.5)
    # timed from these, the first one missed counts the whole stall
    answered_at = 0.501
    assert answered_at - missed[0] == pytest.approx(0.491)


def test_pacer_stops_before_its_end() -> None:
    pacer = Pacer(rate=10.0, start=0.0, end=1.0)
    assert len(pacer.due(5.0)) == 10  # 0.0 .. 0.9; 1.0 is the end, not a request
    assert pacer.next_at() is None
    with pytest.raises(ValueError, match="rate must be above 0"):
        Pacer(rate=0.0, start=0.0)


def test_waiting_requests_are_given_up_timeout_after_they_were_due() -> None:
    waiting = Waiting(timeout=1.0)
    waiting.add([0.0, 0.5, 0.9])
    assert waiting.expired(1.2) == [0.0]
    assert len(waiting) == 2
    assert waiting.take() == 0.5
    assert waiting.expired(10.0) == [0.9]


def test_recorder_skips_the_warm_up_and_counts_by_status_and_cause() -> None:
    rec = Recorder(stream=True)
    rec.since = 10.0
    rec.outcome(Outcome(9.0, 9.0, 9.1, 200))  # warm-up
    rec.outcome(Outcome(10.0, 10.2, 10.25, 200))
    rec.outcome(Outcome(10.1, 10.1, 10.2, 503))
    rec.outcome(Outcome(10.2, math.nan, 15.2, 0, TIMEOUT))
    rec.lag(9.5, 0.5)  # warm-up
    rec.lag(10.0, 0.2)
    summary = rec.summary(seconds=1.0, cpu_seconds=0.1, timer="timerfd")
    assert (summary.requests, summary.answered) == (3, 2)
    assert summary.statuses == {"200": 1, "503": 1}
    assert summary.errors == {TIMEOUT: 1}
    assert summary.latency is not None and summary.latency.max == pytest.approx(0.25)
    assert summary.loop_lag is not None and summary.loop_lag.count == 1
    document = summary.to_json()
    assert document["latency_ms"]["max"] == 250.0 and document["rate"] == 3.0
    new, lags = rec.take()
    assert [o.status for o in new] == [200, 503, 0] and lags == [(10.0, 0.2)]
    assert rec.take() == ([], [])


def test_an_outcome_survives_the_interval_line_format() -> None:
    o = Outcome(12.5, 12.6, 12.75, 504, "")
    back = outcome_from_json(json.loads(json.dumps([o.intended, o.latency, o.status, o.error])))
    assert (back.intended, back.latency, back.status, back.ok) == (12.5, 0.25, 504, False)


# --- against real servers -----------------------------------------------------------------------

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


class Server(asyncio.Protocol):
    """Answers each request head with `answer`, or keeps the answers while `hold` is set."""

    def __init__(self, seen: Site) -> None:
        self.site = seen
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.site.connections += 1

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        for _ in range(data.count(b"\r\n\r\n")):
            self.site.requests += 1
            if self.site.silent:
                continue
            if self.site.held is not None:
                self.site.held.append(self.transport)
            else:
                self.transport.write(self.site.answer)
                if self.site.close_after:
                    self.transport.close()


class Site:
    def __init__(self, answer: bytes = OK, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.silent = False  # read requests, never answer
        self.held: list[asyncio.Transport] | None = None  # answers kept back
        self.connections = 0
        self.requests = 0
        self.url = ""

    def release(self) -> float:
        assert self.held is not None
        at = clock()
        held, self.held = self.held, None
        for transport in held:
            if not transport.is_closing():
                transport.write(self.answer)
        return at


@asynccontextmanager
async def serving(site: Site) -> AsyncIterator[Site]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Server(site), "127.0.0.1", 0)
    site.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        yield site
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), 5)


async def run(
    url: str,
    rate: float,
    duration: float,
    connections: int = 4,
    timeout: float = 5.0,
    during: Callable[[], None] | None = None,
    at: float = 0.0,
) -> tuple[list[Outcome], Recorder]:
    """Every outcome of a run; `during` is called `at` seconds into it, on the same loop."""
    rec = Recorder(stream=True)
    gen = LoadGenerator(url, rate, rec, connections, timeout)
    await gen.connect()
    if during is not None:
        asyncio.get_running_loop().call_later(at, during)
    await asyncio.wait_for(gen.send(duration), duration + timeout + 5)
    outcomes, _ = rec.take()
    return outcomes, rec


async def test_every_due_request_is_sent_over_keep_alive_connections_and_answered() -> None:
    async with serving(Site()) as site:
        outcomes, rec = await run(site.url, rate=200.0, duration=0.5, connections=4)
    assert len(outcomes) == 100 == site.requests  # the schedule, not the server, sets the count
    assert all(o.status == 200 for o in outcomes)
    assert site.connections == 4
    due = sorted(o.intended for o in outcomes)
    gaps = {round(b - a, 6) for a, b in itertools.pairwise(due)}
    assert gaps == {0.005}
    assert all(o.sent >= o.intended and o.done >= o.sent for o in outcomes)
    assert len(rec.lags) == 100  # one sample per request


async def test_answers_held_back_count_from_when_each_request_was_due() -> None:
    site = Site()
    site.held = []
    release: list[float] = []
    async with serving(site):
        # 2 connections, 100 req/s, answers held for the first 0.3 s: ~30 requests are due
        # meanwhile but only 2 can be on the wire; the rest wait for a connection
        outcomes, _ = await run(
            site.url,
            100.0,
            0.6,
            connections=2,
            during=lambda: release.append(site.release()),
            at=0.3,
        )
    assert len(outcomes) == 60 and all(o.status == 200 for o in outcomes)
    released = release[0]
    before = [o for o in outcomes if o.intended < released]
    assert len(before) >= 25
    for o in before:  # none could be answered before the release
        assert o.latency >= released - o.intended - 1e-6
    # most of them went out only after the release: timed from their send, as a closed-loop
    # client would, they would look fast; timed from when they were due, they do not
    late = [o for o in before if o.sent >= released]
    assert len(late) >= len(before) - 2
    assert max(o.latency for o in late) > 5 * max(o.done - o.sent for o in late)


async def test_a_stall_of_the_generators_own_loop_is_lag_and_latency() -> None:
    async with serving(Site()) as site:
        outcomes, rec = await run(
            site.url, 100.0, 0.6, during=lambda: time.sleep(0.2), at=0.2
        )  # blocks the loop both share: nothing is sent or read for 0.2 s
    assert len(outcomes) == 60
    # every request held up by the stall is a late timer, and late in its latency
    assert sum(1 for lag in rec.lags if lag >= 0.1) >= 8
    assert sum(1 for o in outcomes if o.latency >= 0.1) >= 8


async def test_requests_not_answered_in_time_are_given_up_and_their_connections_replaced() -> None:
    site = Site()
    site.silent = True
    async with serving(site):
        outcomes, rec = await run(site.url, 20.0, 0.5, connections=2, timeout=0.3)
    assert len(outcomes) == 10
    assert {o.error for o in outcomes} == {TIMEOUT} and not any(o.status for o in outcomes)
    assert all(o.latency >= 0.3 for o in outcomes)
    assert site.connections > 2  # a connection whose request was given up is not reused
    assert rec.summary(0.5, 0.0, "x").errors == {TIMEOUT: 10}


async def test_a_refused_connection_is_an_error_for_the_request_that_waited_for_it() -> None:
    async with serving(Site()) as site:
        url = site.url  # closed after this block: nothing listens there any more
    outcomes, _ = await run(url, 50.0, 0.2, connections=2)
    assert len(outcomes) == 10
    assert {o.error for o in outcomes} == {CONNECT}


async def test_a_server_that_closes_after_each_answer_gets_new_connections() -> None:
    close = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"
    async with serving(Site(close, close_after=True)) as site:
        outcomes, _ = await run(site.url, 50.0, 0.4, connections=2)
    assert [o.status for o in outcomes] == [200] * 20
    assert site.connections >= 20


async def test_a_body_ended_by_the_close_is_an_answer_and_a_cut_off_head_is_not() -> None:
    eof_body = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nbody until close"
    async with serving(Site(eof_body, close_after=True)) as site:
        outcomes, _ = await run(site.url, 20.0, 0.2, connections=1)
    assert [o.status for o in outcomes] == [200] * 4
    async with serving(Site(b"HTTP/1.1 200 OK\r\ncontent-", close_after=True)) as site:
        outcomes, _ = await run(site.url, 20.0, 0.2, connections=1)
    assert {o.error for o in outcomes} == {CLOSED}


async def test_an_answer_that_is_not_http_is_an_error_and_its_connection_replaced() -> None:
    async with serving(Site(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")) as site:
        outcomes, _ = await run(site.url, 20.0, 0.2, connections=1)
    assert {o.error for o in outcomes} == {CLOSED}
    assert site.connections == len(outcomes)  # each on a new connection


async def test_measure_summarizes_the_run_after_its_warm_up() -> None:
    async with serving(Site()) as site:
        summary = await measure(site.url, rate=100.0, duration=0.3, warmup=0.2, connections=2)
    assert summary.requests == 30 and summary.statuses == {"200": 30}
    assert summary.seconds == pytest.approx(0.3)
    assert summary.latency is not None and summary.latency.count == 30
    assert site.requests == 50


async def test_the_loop_timer_is_the_fallback_and_fires_too() -> None:
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    timer = LoopTimer(loop, fired.set)
    timer.arm(clock() + 0.01)
    await asyncio.wait_for(fired.wait(), 2)
    assert make_timer(loop, fired.set).name == "timerfd"  # Linux, where the tests run


def test_the_generator_refuses_what_it_cannot_send() -> None:
    with pytest.raises(ValueError, match="http://HOST"):
        LoadGenerator("https://example.org/", 10.0, Recorder())
    with pytest.raises(ValueError, match="connections must be at least 1"):
        LoadGenerator("http://127.0.0.1:1/", 10.0, Recorder(), connections=0)


def test_the_command_prints_interval_lines_the_warm_ups_end_then_the_summary() -> None:
    code = (
        "import asyncio\n"
        "async def main():\n"
        "    async def h(r, w):\n"
        "        while await r.readuntil(b'\\r\\n\\r\\n'):\n"
        "            w.write(b'HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok')\n"
        "    s = await asyncio.start_server(h, '127.0.0.1', 0)\n"
        "    print(s.sockets[0].getsockname()[1], flush=True)\n"
        "    await asyncio.sleep(30)\n"
        "asyncio.run(main())\n"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, stderr=subprocess.DEVNULL
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        argv = ["--rate", "50", "--duration", "0.5", "--connections", "2", "--interval", "0.2"]
        argv += ["--warmup", "0.2"]
        proc = subprocess.run(
            [sys.executable, "-m", "outrigger.loadgen", f"http://127.0.0.1:{port}/", *argv],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.kill()
        server.wait(5)
        if server.stdout is not None:
            server.stdout.close()
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert lines[0]["started"]["connections"] == 2
    # the warm-up's end is announced once, before the summary (a caller reads the server's CPU)
    [marker] = [i for i, line in enumerate(lines) if "recording" in line]
    assert 0 < marker < len(lines) - 1 and lines[marker]["recording"]["after_warmup"] == 0.2
    intervals = [line["interval"] for line in lines if "interval" in line]
    assert sum(len(i["outcomes"]) for i in intervals) == 25
    summary = lines[-1]["summary"]
    assert summary["requests"] == 25 and summary["statuses"] == {"200": 25}
    assert summary["latency_ms"]["p50"] > 0 and summary["timer"] == "timerfd"
    assert set(summary["loop_lag_ms"]) >= {"p50", "p99", "max"}


def test_the_command_names_a_bad_url() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "outrigger.loadgen", "ftp://x/", "--rate", "1", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "URL must be http://HOST" in proc.stderr
