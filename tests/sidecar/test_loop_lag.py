"""The event loop's longest stall: measured by a periodic timer, read (and reset) per page."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest
from prometheus_client import generate_latest

from sidecar.loop_lag import Lag, LoopLag
from sidecar.metrics import Metrics

STALL = 0.15
PERIOD = 0.02


async def test_a_stall_shows_as_lag_once_and_each_reader_keeps_its_own() -> None:
    lag = LoopLag(PERIOD)
    first, second = lag.reader(), lag.reader()
    lag.start()
    try:
        await asyncio.sleep(3 * PERIOD)
        first.take()
        second.take()
        time.sleep(STALL)  # holds the loop, as a long callback would
        await asyncio.sleep(3 * PERIOD)  # the timer runs late once, then on time again
        seen, cpu, _, _ = lag_seen = first.take()
        # late by the stall less the part of a period that was left when it began
        assert STALL - PERIOD - 0.005 <= seen < STALL + 0.5
        assert cpu < STALL / 2  # time.sleep held the loop without running: not the loop's CPU
        assert first.take() == (0.0, 0.0, 0.0, 0)  # read: starts over
        assert second.take() == lag_seen  # the other reader's maximum was not reset
        await asyncio.sleep(5 * PERIOD)
        assert lag.ticks >= 5
        assert first.take()[0] < seen  # no stall since: only the timer's own jitter
    finally:
        lag.stop()


async def stall_of_cpu(work: Callable[[], object]) -> Lag:
    """Hold the loop with `work`, repeated until it has used STALL of the thread's CPU; the lag
    the timer saw."""
    lag = LoopLag(PERIOD)
    reader = lag.reader()
    lag.start()
    try:
        await asyncio.sleep(3 * PERIOD)
        reader.take()
        end = time.thread_time() + STALL
        while time.thread_time() < end:  # a long callback: the loop's own CPU
            work()
        await asyncio.sleep(3 * PERIOD)
        seen = reader.take()
        assert seen.longest >= STALL - PERIOD - 0.005
        return seen
    finally:
        lag.stop()


async def test_a_busy_stall_is_told_apart_from_one_off_the_cpu() -> None:
    # Python work between clock reads (each read is a system call)
    seen = await stall_of_cpu(lambda: sum(range(10_000)))
    assert seen.cpu >= STALL
    assert seen.system_cpu < STALL / 2  # a Python loop: the thread's own, not the kernel's


async def test_a_stall_in_the_kernel_shows_as_system_cpu() -> None:
    with open("/dev/zero", "rb", buffering=0) as zero:
        seen = await stall_of_cpu(lambda: zero.read(1 << 20))  # the kernel fills 1 MiB for us
    assert seen.system_cpu >= STALL / 2
    # The system part of the total, both differences of float sums: equal when the stall was
    # all kernel work, then they may differ in the last bits.
    assert seen.cpu >= seen.system_cpu - 1e-9


async def test_stop_ends_the_ticks() -> None:
    lag = LoopLag(PERIOD)
    lag.start()
    await asyncio.sleep(3 * PERIOD)
    lag.stop()
    ticks = lag.ticks
    await asyncio.sleep(3 * PERIOD)
    assert lag.ticks == ticks


def test_a_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="above 0"):
        LoopLag(0)


async def test_each_metrics_page_reports_its_own_longest_stall() -> None:
    lag = LoopLag(PERIOD)
    metrics = Metrics("frontend", loop_lag=lag)
    admin, pod = metrics.registry(), metrics.registry()
    lag.start()
    try:
        await asyncio.sleep(2 * PERIOD)
        generate_latest(admin)
        generate_latest(pod)
        time.sleep(STALL)
        await asyncio.sleep(2 * PERIOD)

        def value(text: bytes, name: str = "outrigger_event_loop_lag_max_seconds") -> float:
            [line] = [x for x in text.decode().splitlines() if x.startswith(name + " ")]
            return float(line.split()[1])

        text = generate_latest(admin)
        first = value(text)
        assert first >= STALL - PERIOD - 0.005
        assert 0 <= value(text, "outrigger_event_loop_lag_max_cpu_seconds") < STALL / 2
        assert 0 <= value(text, "outrigger_event_loop_lag_max_system_cpu_seconds") < STALL / 2
        assert value(text, "outrigger_event_loop_lag_max_major_faults") >= 0
        assert value(generate_latest(admin)) < first  # the scrape reset this page's maximum
        assert value(generate_latest(pod)) == first  # and not the other page's
    finally:
        lag.stop()


def test_without_a_monitor_there_is_no_gauge() -> None:
    text = generate_latest(Metrics("frontend").registry()).decode()
    assert "outrigger_event_loop_lag_max_seconds" not in text
