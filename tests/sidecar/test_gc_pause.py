"""Every cyclic garbage collection is timed and shows on the metrics pages: a histogram by
generation, and each page's own longest pause (with its CPU) and count since its last scrape."""

from __future__ import annotations

import gc
import itertools

from prometheus_client import generate_latest

from sidecar.gc_pause import GcPauses
from sidecar.metrics import Metrics


def value(text: bytes, name: str) -> float:
    [line] = [x for x in text.decode().splitlines() if x.startswith(name + " ")]
    return float(line.rsplit(" ", 1)[1])


def test_a_collection_is_counted_by_generation_and_each_page_keeps_its_own_longest() -> None:
    pauses = GcPauses()
    metrics = Metrics("frontend", gc_pauses=pauses)
    admin, pod = metrics.registry(), metrics.registry()
    pauses.start()
    try:
        garbage = [[] for _ in range(50_000)]
        for a, b in itertools.pairwise(garbage):
            a.append(b)
            b.append(a)  # cycles: only the collector frees them
        del garbage, a, b
        generate_latest(admin)
        generate_latest(pod)
        full = pauses.collections(2)
        assert gc.collect() > 0  # a full collection; it has work to do
        assert pauses.collections(2) == full + 1
        text = generate_latest(admin)
        longest = value(text, "outrigger_gc_pause_max_seconds")
        assert longest > 0
        assert 0 <= value(text, "outrigger_gc_pause_max_cpu_seconds") <= longest + 0.001
        assert value(text, "outrigger_gc_collections_since_scrape") >= 1
        assert value(text, 'outrigger_gc_pause_seconds_count{generation="2"}') == full + 1
        assert value(text, 'outrigger_gc_pause_seconds_sum{generation="2"}') >= longest
        # read: this page starts over (no collection since), the other page still has it
        assert value(generate_latest(admin), "outrigger_gc_pause_max_seconds") < longest
        assert value(generate_latest(pod), "outrigger_gc_pause_max_seconds") >= longest
    finally:
        pauses.stop()


def test_stop_stops_the_timing() -> None:
    pauses = GcPauses()
    pauses.start()
    pauses.start()  # idempotent: one hook
    pauses.stop()
    before = [pauses.collections(g) for g in range(3)]
    gc.collect()
    assert [pauses.collections(g) for g in range(3)] == before


def test_without_a_monitor_there_is_no_gc_metric() -> None:
    text = generate_latest(Metrics("frontend").registry()).decode()
    assert "outrigger_gc_pause" not in text
