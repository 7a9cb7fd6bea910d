"""Timeouts: the total request timeout and the per-attempt timeout.

- `TotalTimeout` sets `Request.deadline` (the earlier of its own and one already set) and arms a
  timer (`deadline.call_at`) for it. When the timer fires, the request is interrupted and ended
  (`Request.interrupt(..., end=True)`): whatever it waits for (an attempt, a backoff, a connect)
  stops and replies with the timeout's error, which every layer below sees on its way back (the
  forwarder closes its upstream connection, the breaker records a timeout, the retry layer
  starts nothing more), and the client gets 504 flag UT.
- `PerTryTimeout` sits inside the retry layer and bounds one attempt; the attempt's deadline is
  visible to the forwarder as `Request.deadline` for the duration of the attempt. A fired
  per-try timeout interrupts the attempt with an `UpstreamTimeoutError`, which the classifier
  calls a timeout, so retry may try again.

Only the response head is bounded here (the timer is cancelled when the result passes on the way
back); the deadline stays on the request for the server, which bounds the body with it. No layer
is built when no timeout is configured.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sidecar.config import ServiceConfig
from sidecar.exchange import Handler, Reply, Request, Response, Result
from sidecar.flags import Flag, ProxyError
from sidecar.policy.clock import Clock
from sidecar.policy.deadline import Timer, call_at
from sidecar.policy.stats import ServiceStats


class UpstreamTimeoutError(ProxyError):  # named for its flag: TimeoutError is the builtin
    """The request or the attempt ran out of time: 504 UT."""

    def __init__(self, detail: str) -> None:
        super().__init__(Flag.UPSTREAM_TIMEOUT, detail)


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
    """A layer that bounds its inner handler by `timeout` seconds."""

    __slots__ = ("_clock", "_inner", "_stats", "_timeout")

    def __init__(self, timeout: float, inner: Handler, clock: Clock, stats: ServiceStats) -> None:
        self._timeout = timeout
        self._inner = inner
        self._clock = clock
        self._stats = stats


class _Timed:
    """One bounded call: the reply the layer gave the layer below, and the timer.

    On expiry it interrupts what the request waits for, and the interrupted wait replies with
    the timeout's error through the layers below. If nothing was waiting (a layer below that
    does not hold its wait interruptibly), it replies itself and drops what comes later, so the
    deadline bounds the request whatever the layers below do.
    """

    __slots__ = ("_error", "_outer", "_per_try", "_reply", "_req", "_stats", "answered", "timer")

    def __init__(
        self,
        req: Request,
        reply: Reply,
        error: UpstreamTimeoutError,
        stats: ServiceStats,
        *,
        per_try: bool,
    ) -> None:
        self._req = req
        self._reply = reply
        self._error = error  # what the timer interrupts with
        self._stats = stats
        self._per_try = per_try  # ends only the attempt; the total timeout ends the request
        self._outer = req.deadline  # restored after an attempt
        self.answered = False
        self.timer: Timer | None = None

    def expire(self) -> None:
        self.timer = None
        if not self.answered and not self._req.interrupt(self._error, end=not self._per_try):
            self(self._error)

    def __call__(self, result: Result) -> None:
        if self.answered:
            if isinstance(result, Response):
                result.discard()  # too late: the deadline was answered already
            return
        self.answered = True
        timer = self.timer
        if timer is not None:
            timer.cancel()
        if self._per_try:
            self._req.deadline = self._outer
        if result is self._error:
            if self._per_try:
                self._stats.per_try_timeouts += 1
            else:
                self._stats.timeouts += 1
        self._reply(result)


class TotalTimeout(_Bounded):
    __slots__ = ()

    def __call__(self, req: Request, reply: Reply) -> None:
        now = self._clock()
        deadline = now + self._timeout
        if req.deadline is not None and req.deadline < deadline:
            deadline = req.deadline
        req.deadline = deadline
        remaining = deadline - now
        if remaining <= 0:
            self._stats.timeouts += 1
            reply(UpstreamTimeoutError("deadline passed before the request started"))
            return
        error = UpstreamTimeoutError(f"request timeout of {self._timeout:g}s exceeded")
        call = _Timed(req, reply, error, self._stats, per_try=False)
        # Armed relative to the loop's clock, like asyncio.timeout, on the shared wheel.
        call.timer = call_at(asyncio.get_running_loop().time() + remaining, call.expire)
        self._inner(req, call)


class PerTryTimeout(_Bounded):
    __slots__ = ()

    def __call__(self, req: Request, reply: Reply) -> None:
        outer = req.deadline
        deadline = self._clock() + self._timeout
        if outer is not None and outer <= deadline:
            # The total timeout fires first; a second timer would only cost.
            self._inner(req, reply)
            return
        error = UpstreamTimeoutError(f"per-try timeout of {self._timeout:g}s exceeded")
        call = _Timed(req, reply, error, self._stats, per_try=True)
        req.deadline = deadline
        call.timer = call_at(asyncio.get_running_loop().time() + self._timeout, call.expire)
        self._inner(req, call)
