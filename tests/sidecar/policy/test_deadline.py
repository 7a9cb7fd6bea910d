"""The shared deadline timer: fires at (or a tick after) the deadline, never before, and only
turns its own cancellation into TimeoutError."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.policy.deadline import TICK, deadline_at


async def test_deadline_fires_at_its_time_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(TimeoutError), deadline_at(start + 1.0) as expiry:
        await asyncio.sleep(10)
    assert expiry.expired
    assert 1.0 <= loop.time() - start <= 1.0 + 2 * TICK


async def test_work_that_finishes_in_time_is_not_cut_and_later_sleeps_are_untouched() -> None:
    loop = asyncio.get_running_loop()
    with deadline_at(loop.time() + 1.0) as expiry:
        await asyncio.sleep(0.5)
    assert not expiry.expired
    await asyncio.sleep(2.0)  # the disarmed deadline must not cancel us now
    assert not expiry.expired


async def test_the_earlier_of_two_nested_deadlines_fires_and_the_outer_one_sees_it() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    inner_expiry = None
    with pytest.raises(TimeoutError), deadline_at(start + 1.0) as outer:
        try:
            with deadline_at(start + 5.0) as inner_expiry:
                await asyncio.sleep(10)
        except TimeoutError:
            pytest.fail("the inner deadline must not claim the outer one's timeout")
    assert outer.expired
    assert inner_expiry is not None and not inner_expiry.expired
    assert loop.time() - start < 2.0


async def test_an_outside_cancel_stays_a_cancel() -> None:
    loop = asyncio.get_running_loop()

    async def body() -> None:
        with deadline_at(loop.time() + 5.0):
            await asyncio.sleep(10)

    task = asyncio.create_task(body())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_many_deadlines_each_fire_for_their_own_task() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    fired: list[float] = []

    async def wait(limit: float) -> None:
        try:
            with deadline_at(start + limit):
                await asyncio.sleep(100)
        except TimeoutError:
            fired.append(loop.time() - start)

    await asyncio.gather(*(wait(limit) for limit in (0.3, 0.1, 0.2, 0.1)))
    assert sorted(fired) == pytest.approx([0.1, 0.1, 0.2, 0.3], abs=2 * TICK)
