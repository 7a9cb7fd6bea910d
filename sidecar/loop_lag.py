"""How late the event loop runs: the longest stall since each reader last looked.

A timer fires every `PERIOD` seconds and measures how late it ran (the time between when it was
due and when the loop got to it). Anything that holds the loop (a long callback, a collection,
closing many connections at once) makes it late by about as long as it held the loop, to within
one period: a stall shorter than the period may fall between two ticks and go unseen, a longer
one never does. Nothing is measured per request; the cost is one timer callback per period
(50 a second, a few µs each).

With the lag, each tick notes the CPU time the loop's thread used since the tick before
(`getrusage(RUSAGE_THREAD)`), i.e. over the period plus the lag: when the sidecar held the loop
itself (a long callback, a collection) that CPU is about the lag or more; when it is well below
the lag, the machine was not running the process (another process on its core, a CPU limit's
throttling). Of that CPU, the part spent in the kernel for the thread (system time: page faults,
memory compaction, large socket operations) and the page faults that had to read from disk
(major faults: code or files the kernel had paged out) say whether a busy stall was our Python or
the kernel working for us.

Each reader keeps its own maximum and resets it when it reads, so two scrapers (the admin port
and the pod's metrics port) do not reset each other: `/stats/prometheus` shows
`outrigger_event_loop_lag_max_seconds`, the longest lag since the previous scrape of that page,
`outrigger_event_loop_lag_max_cpu_seconds`, the thread's CPU time from the tick before to the
late one (the period plus the lag), `..._system_cpu_seconds`, the kernel's part of it, and
`..._major_faults`.
`tests/bench/run.py` reads it before and after each load run and prints it per run.
"""

from __future__ import annotations

import asyncio
import resource
from typing import NamedTuple

PERIOD = 0.02  # seconds between ticks


class Lag(NamedTuple):
    """The longest lag (s) and, over the period that ended with it, the CPU time the loop's
    thread used (s), the kernel's part of that (s) and its page faults that read from disk."""

    longest: float = 0.0
    cpu: float = 0.0
    system_cpu: float = 0.0
    major_faults: int = 0


NO_LAG = Lag()


class LagReader:
    """One reader's longest lag since it last read (`Lag`)."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = NO_LAG

    def take(self) -> Lag:
        """The longest lag since the previous `take`, and start over."""
        seen, self.seen = self.seen, NO_LAG
        return seen


def _thread_usage() -> tuple[float, float, int]:
    """(CPU s, system CPU s, major faults) of the calling thread so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime, usage.ru_majflt


class LoopLag:
    """The periodic timer; `reader()` hands out a maximum of one's own."""

    def __init__(self, period: float = PERIOD) -> None:
        if not period > 0:
            raise ValueError(f"loop lag period must be above 0 s, got {period}")
        self.period = period
        self.readers: list[LagReader] = []
        self.ticks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._usage = (0.0, 0.0, 0)  # the thread's `_thread_usage` at the previous tick
        self._handle: asyncio.TimerHandle | None = None

    def reader(self) -> LagReader:
        reader = LagReader()
        self.readers.append(reader)
        return reader

    def start(self) -> None:
        """Start ticking on the running loop (idempotent)."""
        if self._handle is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time() + self.period
        self._usage = _thread_usage()
        self._handle = self._loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        lag = now - self._due
        usage = _thread_usage()
        before, self._usage = self._usage, usage
        self.ticks += 1
        for reader in self.readers:
            if lag > reader.seen.longest:
                reader.seen = Lag(
                    lag, usage[0] - before[0], usage[1] - before[1], usage[2] - before[2]
                )
        # The next tick is due a period after this one ran: a stall is counted once, not again
        # for every period it covered.
        self._due = now + self.period
        self._handle = loop.call_at(self._due, self._tick)
