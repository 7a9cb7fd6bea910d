"""Timeouts: the total request timeout and the per-attempt timeout.

- `TotalTimeout` sets `Request.deadline` (the earlier of its own and one already set) and bounds
  the whole inner call: every attempt, every backoff. When it fires the inner task is cancelled
  (the forwarder closes its upstream connection on cancellation) and the request fails with
  504 flag UT.
- `PerTryTimeout` sits inside the retry layer and bounds one attempt; the attempt's deadline is
  visible to the forwarder as `Request.deadline` for the duration of the attempt. A fired
  per-try timeout is an `UpstreamTimeoutError`, which the classifier calls a timeout, so retry
  may try again.

Only the response head is bounded here; the deadline stays on the request for whoever streams the
body. No layer is built when no timeout is configured.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sidecar.config import ServiceConfig
from sidecar.exchange import Handler, Request, Response
from sidecar.flags import Flag, ProxyError
from sidecar.policy.clock import Clock
from sidecar.policy.deadline import deadline_at
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


class TotalTimeout(_Bounded):
    __slots__ = ()

    async def __call__(self, req: Request) -> Response:
        now = self._clock()
        deadline = now + self._timeout
        if req.deadline is not None and req.deadline < deadline:
            deadline = req.deadline
        req.deadline = deadline
        remaining = deadline - now
        if remaining <= 0:
            self._stats.timeouts += 1
            raise UpstreamTimeoutError("deadline passed before the request started")
        # Armed relative to the loop's clock, like asyncio.timeout, for a fraction of its cost.
        cm = deadline_at(asyncio.get_running_loop().time() + remaining)
        try:
            with cm:
                return await self._inner(req)
        except TimeoutError:
            if not cm.expired:
                raise
            self._stats.timeouts += 1
            raise UpstreamTimeoutError(f"request timeout of {self._timeout:g}s exceeded") from None


class PerTryTimeout(_Bounded):
    __slots__ = ()

    async def __call__(self, req: Request) -> Response:
        outer = req.deadline
        deadline = self._clock() + self._timeout
        if outer is not None and outer <= deadline:
            # The total timeout fires first; a second timer would only cost.
            return await self._inner(req)
        req.deadline = deadline
        cm = deadline_at(asyncio.get_running_loop().time() + self._timeout)
        try:
            with cm:
                return await self._inner(req)
        except TimeoutError:
            if not cm.expired:
                raise
            self._stats.per_try_timeouts += 1
            raise UpstreamTimeoutError(f"per-try timeout of {self._timeout:g}s exceeded") from None
        finally:
            req.deadline = outer
