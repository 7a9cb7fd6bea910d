"""What the demo reads from its helper processes (the load generator's interval lines, the trace
receiver's lines) and from /proc (CPU by role), each on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from outrigger.demo.load import LoadFeed
from outrigger.demo.traces import TraceFeed, TraceStore, span_json
from outrigger.demo.usage import CpuMeter, between
from tests.outrigger.test_demo import retried_trace


def interval(outcomes: list[list[object]], lags: list[list[float]]) -> str:
    return json.dumps({"interval": {"outcomes": outcomes, "lags": lags}})


def test_load_windows_are_cut_by_when_requests_were_due() -> None:
    feed = LoadFeed()
    feed.feed('{"started": {"url": "http://127.0.0.1:1/", "connections": 16}}')
    feed.feed("not json: ignored")
    feed.feed(
        interval(
            [[10.0, 0.004, 200, ""], [10.5, 0.002, 200, ""], [11.0, 0.05, 504, ""]],
            [[10.0, 0.0001], [11.0, 0.03]],
        )
    )
    feed.feed(interval([[11.5, 5.0, 0, "timeout"]], [[11.5, 0.0002]]))
    assert feed.started
    first = feed.window(10.0, 11.0)
    assert (first.requests, first.ok, first.success) == (2, 2, 100.0)
    assert first.p50 == pytest.approx(0.002) and first.p99 == pytest.approx(0.004)
    assert first.lag_p99 == 0.0001
    rest = feed.window(11.0)
    assert rest.statuses == {504: 1, 0: 1} and rest.success == 0.0
    assert rest.p50 == pytest.approx(0.05)  # the answered one: a timeout has no latency to rank
    both = feed.windows([(10.0, 10.1), (11.4, 12.0)])
    assert both.requests == 2 and both.statuses == {200: 1, 0: 1}
    assert feed.window(20.0).p50 is None


def test_the_trace_feed_rebuilds_the_receivers_trace() -> None:
    store = TraceStore()
    for span in retried_trace():
        store.add(span)
    trace = store.retried()
    assert trace is not None
    feed = TraceFeed()
    spans = [span_json(s) for s in trace.spans]
    feed.feed(json.dumps({"trace": {"trace_id": trace.trace_id, "spans": spans}}))
    feed.feed(json.dumps({"stats": {"received": 6, "dropped": 0}}))
    assert feed.trace is not None and feed.trace.complete
    assert feed.trace.retried() == trace.retried()
    assert feed.received == 6
    assert store.kept_changes == 5  # the root came before anything said "retried"


SPIN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"


def test_cpu_of_a_watched_process_counts_its_children_even_after_they_end() -> None:
    meter = CpuMeter()
    meter.watch(os.getpid(), "demo", "view")
    parent = subprocess.Popen(
        ["sh", "-c", f'{sys.executable} -c "$SPIN"; sleep 30'],
        env={**os.environ, "SPIN": SPIN},
    )
    try:
        meter.watch(parent.pid, "apps", "app x")
        first = meter.sample()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # find the spinning child while it runs
            sample = meter.sample(rescan_every=0.0)
            if meter.children:
                break
            time.sleep(0.01)
        assert list(meter.children.values()) == [parent.pid]
        (spinner,) = meter.children
        while spinner in meter.children and time.monotonic() < deadline:  # until it ended
            sample = meter.sample(rescan_every=0.0)
            time.sleep(0.05)
        assert spinner not in meter.children
        assert sample.roles["apps"] - first.roles["apps"] >= 0.25  # its 0.3 s, /proc's 0.01 s
        usage = between(first, sample, meter.cores)
        assert usage is not None and usage.roles["apps"] > 0
        assert usage.machine is None or usage.machine >= usage.roles["apps"] - 1.0
    finally:
        parent.kill()
        parent.wait(5)


def test_usage_is_measured_between_samples_at_least_apart() -> None:
    meter = CpuMeter()
    meter.watch(os.getpid(), "demo", "view")
    meter.sample()
    meter.sample()
    assert meter.usage(least=0.5) is None  # two samples at once: no share to speak of
    t = time.process_time()
    while time.process_time() - t < 0.3:  # this process works for 0.3 s of CPU
        pass
    time.sleep(0.2)
    meter.sample()
    usage = meter.usage(window=None, least=0.5)
    assert usage is not None and usage.seconds >= 0.5
    assert usage.roles["demo"] > 0 and usage.parts["view"] == usage.roles["demo"]


@pytest.mark.parametrize("line", ["", "{", '{"other": 1}'])
def test_feeds_ignore_lines_they_do_not_know(line: str) -> None:
    load, traces = LoadFeed(), TraceFeed()
    load.feed(line)
    traces.feed(line)
    assert not load.outcomes and traces.trace is None
