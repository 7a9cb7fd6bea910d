"""Timers for request deadlines, on one shared loop timer (a timer wheel).

`loop.call_at` + `cancel` costs ~3 µs on uvloop (measured), and a request with a total and a
per-try timeout and a bounded response body paid it three times, about a seventh of its CPU.
Here every timer lands in a bucket of `TICK` seconds and one loop timer serves the earliest
bucket; arming is a set insert and cancelling a set discard. Timers fire up to one tick late,
never early.

    timer = call_at(when, callback)  # `when` on the running loop's clock
    ...
    timer.cancel()  # before it fired: it never will

A hot path arms its own per-request object instead (a `Deadline`, with `running_wheel().arm`):
one object per request and timeout, not two, and disarms it with `deadline.bucket.discard(
deadline)` in its own frame (the bucket it was put in; discarding from a bucket that fired
already is harmless).

A timer is a plain callback, not a task cancellation: the policy layers run as callbacks (see
`sidecar/exchange.py`), and the callback decides what the deadline interrupts.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import weakref
from collections.abc import Callable

TICK = 0.005  # seconds: timeouts are configured in milliseconds; 5 ms late is fine
_TICKS_PER_SECOND = 1 / TICK


class Deadline:
    """What the wheel holds: `expire()` is called once, at the time it was armed for or up to a
    tick later, unless it was disarmed first. The timeout layers' per-request objects are
    deadlines themselves (no separate timer object per request)."""

    __slots__ = ("bucket",)

    # The wheel's bucket it was armed in (set when armed): disarming is `bucket.discard(self)`,
    # no lookup. After the bucket fired it is no longer the wheel's, and discarding is a no-op.
    bucket: set[Deadline]

    def expire(self) -> None:
        raise NotImplementedError


class Timer(Deadline):
    """One armed callback (`call_at`)."""

    __slots__ = ("_callback", "_wheel", "when")

    def __init__(self, wheel: Wheel, when: float, callback: Callable[[], None]) -> None:
        self._wheel = wheel
        self.when = when
        self._callback: Callable[[], None] | None = callback

    @property
    def pending(self) -> bool:
        """Armed and neither fired nor cancelled."""
        return self._callback is not None

    def cancel(self) -> None:
        if self._callback is not None:
            self._callback = None
            self._wheel.disarm(self)

    def expire(self) -> None:
        callback = self._callback
        if callback is not None:
            self._callback = None
            callback()


class Wheel:
    """Buckets of deadlines by tick, and one loop timer for the earliest bucket."""

    __slots__ = ("_buckets", "_handle", "_handle_tick", "_ticks", "epoch", "loop", "time")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop  # a layer that keeps a wheel checks it is the running loop's
        self._buckets: dict[int, set[Deadline]] = {}
        self._ticks: list[int] = []  # heap of bucket ticks (one entry per bucket)
        self._handle: asyncio.TimerHandle | None = None
        self._handle_tick = -1
        self.time = loop.time  # the loop's clock, called directly (no Python frame)
        self.epoch = 0  # how many times it fired: buckets handed out before may be gone

    def arm(self, deadline: Deadline, when: float) -> None:
        """`deadline.expire()` at `when` (the loop's time) or up to a tick later, never before."""
        bucket = self.bucket(when)[0]
        bucket.add(deadline)
        deadline.bucket = bucket

    def bucket(self, when: float) -> tuple[set[Deadline], float]:
        """The bucket for deadlines at `when`, and the loop time it fires at: it takes every
        deadline in (that time - TICK, that time]. A layer whose deadlines only grow (a fixed
        timeout on the loop's clock) keeps the bucket and adds to it while its deadlines fall
        in that range and `epoch` has not moved (the wheel has not fired since, so it has not
        dropped the bucket for being empty): no tick to work out or look up per request
        (sidecar/policy/timeout.py)."""
        tick = math.ceil(when * _TICKS_PER_SECOND)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = set()
            heapq.heappush(self._ticks, tick)
            if self._handle is None or tick < self._handle_tick:
                self._schedule(tick)
        return bucket, tick * TICK

    @staticmethod
    def disarm(deadline: Deadline) -> None:
        deadline.bucket.discard(deadline)  # an empty bucket is dropped when the wheel fires

    def _schedule(self, tick: int) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle_tick = tick
        self._handle = self.loop.call_at(tick * TICK, self._run)

    def _run(self) -> None:
        self._handle = None
        now_tick = math.floor(self.loop.time() * _TICKS_PER_SECOND)
        ticks = self._ticks
        while ticks and ticks[0] <= now_tick:
            # A copy: an expiring deadline may disarm others (or itself) from this bucket; a
            # disarmed one's expire() does nothing.
            for deadline in tuple(self._buckets.pop(heapq.heappop(ticks), ())):
                try:
                    deadline.expire()
                except Exception as exc:  # one failing callback must not cost the others theirs
                    self.loop.call_exception_handler(
                        {"message": "deadline callback failed", "exception": exc}
                    )
        # Skip buckets that emptied out, then wait for the next one. A layer that keeps a
        # bucket (`bucket`) sees from `epoch` that it may have been dropped.
        self.epoch += 1
        while ticks and not self._buckets.get(ticks[0]):
            self._buckets.pop(heapq.heappop(ticks), None)
        if ticks:
            self._schedule(ticks[0])


_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Wheel] = weakref.WeakKeyDictionary()
_last_wheel: Wheel | None = None  # the wheel of the loop that asked last: skips the weak dict


def running_wheel() -> Wheel:
    """The running loop's wheel."""
    global _last_wheel
    loop = asyncio.get_running_loop()
    wheel = _last_wheel
    if wheel is None or wheel.loop is not loop:
        wheel = _wheels.get(loop)
        if wheel is None:
            wheel = _wheels[loop] = Wheel(loop)
        _last_wheel = wheel
    return wheel


def call_at(when: float, callback: Callable[[], None]) -> Timer:
    """Call `callback` at `when` (the running loop's time), or up to a tick later."""
    wheel = running_wheel()
    timer = Timer(wheel, when, callback)
    wheel.arm(timer, when)
    return timer
