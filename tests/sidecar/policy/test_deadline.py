"""The shared deadline timer: fires at (or a tick after) its time, never before; a cancelled
timer never fires; timers sharing the wheel fire each for its own callback."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.policy.deadline import TICK, call_at


async def test_a_timer_fires_at_its_time_and_not_before() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    fired: list[float] = []
    timer = call_at(start + 1.0, lambda: fired.append(loop.time()))
    await asyncio.sleep(0.999)
    assert fired == [] and timer.pending
    await asyncio.sleep(10)
    assert len(fired) == 1
    assert 1.0 <= fired[0] - start <= 1.0 + 2 * TICK
    assert not timer.pending


async def test_a_cancelled_timer_never_fires_and_later_sleeps_are_untouched() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timer = call_at(loop.time() + 1.0, lambda: fired.append("fired"))
    await asyncio.sleep(0.5)
    timer.cancel()
    timer.cancel()  # twice: harmless
    await asyncio.sleep(2.0)
    assert fired == [] and not timer.pending


async def test_the_earlier_of_two_timers_fires_first_and_the_later_one_still_fires() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    fired: list[tuple[str, float]] = []
    call_at(start + 5.0, lambda: fired.append(("later", loop.time() - start)))
    call_at(start + 1.0, lambda: fired.append(("earlier", loop.time() - start)))
    await asyncio.sleep(10)
    assert [name for name, _ in fired] == ["earlier", "later"]
    assert fired[0][1] == pytest.approx(1.0, abs=2 * TICK)
    assert fired[1][1] == pytest.approx(5.0, abs=2 * TICK)


async def test_a_failing_callback_does_not_cost_the_others_in_its_tick_theirs() -> None:
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _, context: errors.append(context["exception"]))
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    when = loop.time() + 0.1
    call_at(when, boom)
    call_at(when, lambda: fired.append("other"))
    await asyncio.sleep(1)
    assert fired == ["other"]
    assert [str(e) for e in errors] == ["boom"]


async def test_many_timers_each_fire_for_their_own_callback() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    fired: list[tuple[float, float]] = []
    for limit in (0.3, 0.1, 0.2, 0.1):
        call_at(start + limit, lambda limit=limit: fired.append((limit, loop.time() - start)))
    await asyncio.sleep(1)
    assert sorted(limit for limit, _ in fired) == [0.1, 0.1, 0.2, 0.3]
    for limit, at in fired:
        assert at == pytest.approx(limit, abs=2 * TICK)


async def test_a_timer_cancelling_another_of_its_tick_while_firing_keeps_it_from_firing() -> None:
    # What a total timeout does when it fires: the request it ends disarms the per-try timer,
    # which may sit in the very bucket being fired.
    loop = asyncio.get_running_loop()
    errors: list[object] = []
    loop.set_exception_handler(lambda _, context: errors.append(context.get("exception")))
    fired: list[str] = []
    when = loop.time() + 0.1
    timers = [call_at(when, lambda i=i: fired.append(f"t{i}")) for i in range(3)]

    def cancel_the_others() -> None:
        fired.append("canceller")
        for timer in timers:
            timer.cancel()

    call_at(when, cancel_the_others)
    await asyncio.sleep(0.5)
    assert errors == []
    assert "canceller" in fired
    # Set order decides which ran before the canceller; none runs after it.
    assert fired[-1] == "canceller"
    assert not any(timer.pending for timer in timers)
