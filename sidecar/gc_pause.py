"""How long the cyclic garbage collector holds the event loop: every collection, timed.

CPython's collector runs inside whatever allocation crosses a generation's threshold, so a
collection is a stall of the event loop (and of every request on it) for as long as it walks its
generations. `gc.callbacks` calls us at the start and the stop of each one; we count collections
and their pause per generation (a histogram) and keep each reader's longest pause since it last
read, as `sidecar/loop_lag.py` does for the loop's lateness, with the CPU time the thread used in
it: a pause whose CPU is well below its length is the machine not running the sidecar in the
middle of a collection (measured here: 4 ms "collections" of 0.15 ms CPU), not the collector.
The cost is two callbacks of ~1 µs per collection, none per request.

`/stats/prometheus` shows `outrigger_gc_pause_seconds` (histogram by generation: the count of
collections and their summed pause), `outrigger_gc_pause_max_seconds` (the longest pause since
the previous scrape of that page), `outrigger_gc_pause_max_cpu_seconds` (the CPU in it) and
`outrigger_gc_collections_since_scrape` (collections since then, each scraper its own).
`tests/bench/run.py` prints them beside the loop stall, so a tail in a run says whether a
collection made it.
"""

from __future__ import annotations

import gc
import time
from bisect import bisect_left
from typing import Any

# Seconds. Young collections take tens of µs; a full one over a large heap, milliseconds.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
GENERATIONS = 3


class PauseReader:
    """One reader's longest collection pause (wall clock and the thread's CPU time in it, in
    seconds; its generation) and its count of collections since it last read."""

    __slots__ = ("collections", "cpu", "generation", "longest")

    def __init__(self) -> None:
        self.longest = 0.0
        self.cpu = 0.0
        self.generation = -1  # of the longest; -1: none since the last read
        self.collections = 0

    def take(self) -> tuple[float, float, int, int]:
        """(longest pause, its CPU, its generation, collections) since the previous `take`."""
        seen = (self.longest, self.cpu, self.generation, self.collections)
        self.longest = self.cpu = 0.0
        self.generation = -1
        self.collections = 0
        return seen


class GcPauses:
    """The `gc.callbacks` hook; `reader()` hands out a maximum of one's own."""

    def __init__(self) -> None:
        self.readers: list[PauseReader] = []
        # per generation: counts per bucket (the last past the largest bound) and summed pause
        self.counts = [[0] * (len(BUCKETS) + 1) for _ in range(GENERATIONS)]
        self.seconds = [0.0] * GENERATIONS
        self._started = self._started_cpu = 0.0
        self._installed = False

    def reader(self) -> PauseReader:
        reader = PauseReader()
        self.readers.append(reader)
        return reader

    def collections(self, generation: int) -> int:
        return sum(self.counts[generation])

    def start(self) -> None:
        """Time every collection from now on (idempotent)."""
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def stop(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_cpu = time.thread_time()
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        cpu = time.thread_time() - self._started_cpu
        generation: int = info["generation"]
        self.counts[generation][bisect_left(BUCKETS, pause)] += 1
        self.seconds[generation] += pause
        for reader in self.readers:
            reader.collections += 1
            if pause > reader.longest:
                reader.longest = pause
                reader.cpu = cpu
                reader.generation = generation
