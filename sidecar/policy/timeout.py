"""Timeouts: the total request timeout and the per-attempt timeout.

- `TotalTimeout` sets `Request.deadline` (the earlier of its own and one already set) and arms
  its per-request reply on the deadline wheel (`deadline.running_wheel`). When it fires, the
  request is interrupted and ended (`Request.interrupt(..., end=True)`): whatever it waits for
  (an attempt, a backoff, a connect) stops and replies with the timeout's error, which every
  layer below sees on its way back (the forwarder closes its upstream connection, the breaker
  records a timeout, the retry layer starts nothing more), and the client gets 504 flag UT.
- `PerTryTimeout` sits inside the retry layer and bounds one attempt; the attempt's deadline is
  visible to the forwarder as `Request.deadline` for the duration of the attempt. A fired
  per-try timeout interrupts the attempt with an `UpstreamTimeoutError`, which the classifier
  calls a timeout, so retry may try again.

Only the response head is bounded here (the timer is cancelled when the result passes on the way
back); the deadline stays on the request for the server, which bounds the body with it. No layer
is built when no timeout is configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.config import ServiceConfig
from sidecar.exchange import Handler, Reply, Request, Response, Result
from sidecar.flags import Flag, PolicyError
from sidecar.policy.clock import Clock, loop_time
from sidecar.policy.deadline import TICK, Deadline, Wheel, running_wheel
from sidecar.policy.stats import ServiceStats


class UpstreamTimeoutError(PolicyError):  # named for its flag: TimeoutError is the builtin
    """The request or the attempt ran out of time: 504 UT."""

    FLAG = Flag.UPSTREAM_TIMEOUT


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    total: float | None  # seconds for the whole exchange, every retry included
    per_try: float | None  # seconds for one attempt

    @classmethod
    def from_service(cls, cfg: ServiceConfig) -> TimeoutConfig:
        per_try = cfg.retry.per_try_timeout if cfg.retry is not None else None
        for name, value in (("timeout", cfg.timeout), ("per_try_timeout", per_try)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        return cls(cfg.timeout, per_try)


class _Bounded:
    """A layer that bounds its inner handler by `timeout` seconds.

    It keeps the running loop's wheel (checked with the loop's C `is_running`, not
    `asyncio.get_running_loop`, which makes a getpid system call) and the wheel's bucket its
    latest deadline went to: with a fixed timeout on the loop's clock, deadlines only grow, so
    most requests land in the same bucket as the one before (`Wheel.bucket`: until the wheel
    fires next, which may drop it)."""

    __slots__ = (
        "_clock",
        "_fresh",
        "_fresh_end",
        "_fresh_epoch",
        "_fresh_start",
        "_inner",
        "_on_loop",
        "_stats",
        "_timeout",
        "_wheel",
    )

    def __init__(self, timeout: float, inner: Handler, clock: Clock, stats: ServiceStats) -> None:
        self._timeout = timeout
        self._inner = inner
        self._clock = clock
        self._on_loop = clock is loop_time  # deadlines are on the loop's clock already
        self._stats = stats
        self._wheel: Wheel | None = None  # the running loop's, kept: no lookup per request
        self._fresh: set[Deadline] = set()  # the bucket for deadlines in (start, end]
        self._fresh_start = self._fresh_end = math.inf
        self._fresh_epoch = -1  # the wheel's epoch when it was handed out

    def _running_wheel(self) -> Wheel:
        """The running loop's wheel, kept (a layer outlives a loop only in tests)."""
        wheel = self._wheel = running_wheel()
        self._fresh_start = self._fresh_end = math.inf
        return wheel

    def _renew(self, wheel: Wheel, when: float) -> set[Deadline]:
        """The bucket for a deadline at `when` (loop time) outside the fresh one; it is the fresh
        one from now on."""
        bucket, end = wheel.bucket(when)
        self._fresh = bucket
        self._fresh_start = end - TICK
        self._fresh_end = end
        self._fresh_epoch = wheel.epoch
        return bucket


class _Timed(Deadline):
    """One bounded call: the reply the layer gave the layer below, armed on the wheel itself.

    On expiry it interrupts what the request waits for, and the interrupted wait replies with
    the timeout's error through the layers below. If nothing was waiting (a layer below that
    does not hold its wait interruptibly), it replies itself and drops what comes later, so the
    deadline bounds the request whatever the layers below do. The error is made only when the
    deadline fires: most requests never need it.

    Each subclass has its own `__call__` (the reply on the way back): one shared by both would
    see two classes at the same attribute reads, which CPython cannot specialize. No
    `__init__`: the layer sets the slots itself (a class with a Python `__init__` is called
    through a second run of the interpreter loop, ~600 instructions per request and timeout).
    """

    __slots__ = ("_layer", "_reply", "_req")

    _layer: _Bounded
    _req: Request
    _reply: Reply | None

    def __call__(self, result: Result) -> None:
        raise NotImplementedError

    def _late(self, result: Result) -> None:
        if isinstance(result, Response):
            result.discard()  # too late: the deadline was answered already

    def expire(self) -> None:
        if self._reply is None:
            return
        error = self._fired()
        if not self._req.interrupt(error, end=self._ends_request):
            self(error)

    _ends_request = True

    def _fired(self) -> UpstreamTimeoutError:
        raise NotImplementedError


class TotalTimeout(_Bounded):
    __slots__ = ()

    def __call__(self, req: Request, reply: Reply) -> None:
        wheel = self._wheel
        if wheel is None or not wheel.loop.is_running():
            wheel = self._running_wheel()
        clock = wheel.time if self._on_loop else self._clock  # read, then called: see stack.py
        now = clock()
        deadline = now + self._timeout
        outer = req.deadline
        if outer is not None and outer < deadline:
            deadline = outer
        req.deadline = deadline
        if deadline <= now:
            self._stats.timeouts += 1
            reply(UpstreamTimeoutError("deadline passed before the request started"))
            return
        call = _Total()
        call._layer = self
        call._req = req
        call._reply = reply
        # On the loop's clock, like asyncio.timeout, on the shared wheel.
        if not self._on_loop:
            time = wheel.time
            deadline = time() + deadline - now
        if self._fresh_start < deadline <= self._fresh_end and self._fresh_epoch == wheel.epoch:
            bucket = self._fresh
        else:
            bucket = self._renew(wheel, deadline)
        bucket.add(call)
        call.bucket = bucket
        inner = self._inner
        inner(req, call.__call__)


class _Total(_Timed):
    __slots__ = ()

    def __call__(self, result: Result) -> None:
        reply = self._reply
        if reply is None:
            self._late(result)
            return
        self._reply = None
        self.bucket.discard(self)  # disarm (`Wheel.disarm`, without the call)
        reply(result)

    def _fired(self) -> UpstreamTimeoutError:
        self._layer._stats.timeouts += 1
        return UpstreamTimeoutError(f"request timeout of {self._layer._timeout:g}s exceeded")


class PerTryTimeout(_Bounded):
    """The arming at the end of `__call__` is TotalTimeout's, written twice on purpose: one
    method shared by both layer classes sees two classes at the same slot reads and stores,
    which CPython 3.11 cannot specialize (measured: +2.2k instructions per request with both
    layers in a stack, tests/bench/layers.py)."""

    __slots__ = ()

    def __call__(self, req: Request, reply: Reply) -> None:
        outer = req.deadline
        wheel = self._wheel
        if wheel is None or not wheel.loop.is_running():
            wheel = self._running_wheel()
        clock = wheel.time if self._on_loop else self._clock  # read, then called: see stack.py
        deadline = clock() + self._timeout
        inner = self._inner
        if outer is not None and outer <= deadline:
            # The total timeout fires first; a second timer would only cost.
            inner(req, reply)
            return
        call = _PerTry()
        call._layer = self
        call._req = req
        call._reply = reply
        call.outer = outer
        req.deadline = deadline
        if not self._on_loop:
            time = wheel.time
            deadline = time() + self._timeout
        if self._fresh_start < deadline <= self._fresh_end and self._fresh_epoch == wheel.epoch:
            bucket = self._fresh
        else:
            bucket = self._renew(wheel, deadline)
        bucket.add(call)
        call.bucket = bucket
        inner(req, call.__call__)


class _PerTry(_Timed):
    __slots__ = ("outer",)

    _ends_request = False  # only the attempt: the retry layer may try again

    outer: float | None  # the request's deadline around this attempt, restored after it

    def __call__(self, result: Result) -> None:
        reply = self._reply
        if reply is None:
            self._late(result)
            return
        self._reply = None
        self.bucket.discard(self)  # disarm (`Wheel.disarm`, without the call)
        self._req.deadline = self.outer  # the deadline around the attempt again
        reply(result)

    def _fired(self) -> UpstreamTimeoutError:
        self._layer._stats.per_try_timeouts += 1
        return UpstreamTimeoutError(f"per-try timeout of {self._layer._timeout:g}s exceeded")
