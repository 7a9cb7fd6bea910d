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
- `Timeouts`, built instead of both when both are configured: one layer with the two deadlines
  and the two entries (above and below the retry layer), one per-request object armed once,
  with the same errors, flags and counters as the two.

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


class Timeouts(_Bounded):
    """Both timeouts in one layer, as Envoy's router owns a route's `timeout` and its
    `per_try_timeout`: built when both are configured, in place of `TotalTimeout` and
    `PerTryTimeout`. It has two entries, `__call__` outside the retry layer (the request's
    deadline) and `attempt` inside it (each attempt's), and one per-request object, `_Both`,
    that the first hands the second on the request (`Request.timeouts`).

    That object is armed on the wheel once, at the earlier of the two deadlines, by `attempt`
    (the total alone is armed by nothing: the attempt's deadline is the earlier one in the
    common config, and the object re-arms itself at the total when an attempt's deadline
    passes with no attempt running, so the total still bounds a backoff). What this saves per
    request against the two layers: an object and its bound method, a wheel check, a clock
    read, and a set insert and discard.

    With a single timeout configured, the single layers are built: one deadline needs no
    hand-over.

    `__call__` opens as `TotalTimeout.__call__` does, written again on purpose (see
    `PerTryTimeout`): a method shared by two layer classes sees both at the same slot reads,
    which CPython 3.11 cannot specialize.
    """

    __slots__ = ("_attempt_inner", "_per_try")

    def __init__(
        self, total: float, per_try: float, inner: Handler, clock: Clock, stats: ServiceStats
    ) -> None:
        super().__init__(total, inner, clock, stats)
        self._per_try = per_try
        self._attempt_inner = inner  # `attempt`'s inner handler (the balancer)

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
        call = _Both()
        call._layer = self
        call._req = req
        call._reply = reply
        call._attempt_reply = None
        call.total = deadline
        # On the loop's clock, like asyncio.timeout, on the shared wheel.
        call.total_at = deadline if self._on_loop else wheel.time() + deadline - now
        call.at = math.inf  # not armed yet: `attempt` arms it
        call.bucket = _UNARMED
        req.timeouts = call
        inner = self._inner
        inner(req, call.__call__)

    def attempt(self, req: Request, reply: Reply) -> None:
        """One attempt (below the retry layer): bounded by the earlier of its own deadline and
        the request's."""
        call = req.timeouts
        assert isinstance(call, _Both)  # `__call__` set it; it clears it when answering
        wheel = self._wheel  # `__call__` checked it for this request, on this loop
        assert wheel is not None
        clock = wheel.time if self._on_loop else self._clock  # read, then called: see stack.py
        deadline = clock() + self._per_try
        total = call.total
        if total <= deadline:
            # The total fires first: the attempt keeps the request's deadline.
            deadline = total
            at = call.total_at
        elif self._on_loop:
            at = deadline
        else:
            time = wheel.time
            at = time() + self._per_try
        req.deadline = deadline
        call._attempt_reply = reply
        if at != call.at:
            call.bucket.discard(call)
            call.at = at
            if self._fresh_start < at <= self._fresh_end and self._fresh_epoch == wheel.epoch:
                bucket = self._fresh
            else:
                bucket = self._renew(wheel, at)
            bucket.add(call)
            call.bucket = bucket
        inner = self._attempt_inner
        inner(req, call.attempt_done)

    def _rearm(self, call: _Both) -> None:
        """Arm `call` at the request's deadline: an attempt's passed with none running."""
        wheel = self._wheel
        assert wheel is not None
        call.at = call.total_at
        bucket = wheel.bucket(call.total_at)[0]
        bucket.add(call)
        call.bucket = bucket


_UNARMED: set[Deadline] = set()  # the bucket of a `_Both` not armed yet (discarding: no-op)


class _Both(_Timed):
    """One request through `Timeouts`: `__call__` is the request's reply, `attempt_done` the
    reply of the attempt running now. It stays armed at an attempt's deadline after the
    attempt answered (the request's reply disarms it): on a good answer the request ends
    right after, and on a retry the next attempt moves it.

    Every attempt answers through the one `attempt_done`, each result is passed on at most
    once and a result with no attempt waiting for it is discarded. In the defensive path
    where a per-try timeout finds nothing waiting (the forwarders always hold their waits
    interruptibly) and answers the attempt itself, a retry that follows takes whichever
    result comes first, its own or the abandoned attempt's late one: both answer the same
    replayable request, and the other is discarded."""

    __slots__ = ("_attempt_reply", "at", "total", "total_at")

    _layer: Timeouts
    _attempt_reply: Reply | None
    total: float  # the request's deadline (the layer's clock)
    total_at: float  # the same on the loop's clock
    at: float  # the loop time it is armed for; inf before the first attempt

    def __call__(self, result: Result) -> None:
        reply = self._reply
        if reply is None:
            self._late(result)
            return
        self._reply = None
        self.bucket.discard(self)  # disarm (`Wheel.disarm`, without the call)
        # No cycle left for the garbage collector (it and the request hold each other): a
        # collection every few hundred requests cost ~3k instructions a request (layers.py).
        self._req.timeouts = None
        reply(result)

    def attempt_done(self, result: Result) -> None:
        reply = self._attempt_reply
        if reply is None:
            self._late(result)  # the attempt's timeout answered it already
            return
        self._attempt_reply = None
        self._req.deadline = self.total  # the request's deadline again
        reply(result)

    def expire(self) -> None:
        if self._reply is None:
            return
        layer = self._layer
        if self.at >= self.total_at:
            layer._stats.timeouts += 1
            error = UpstreamTimeoutError(f"request timeout of {layer._timeout:g}s exceeded")
            if not self._req.interrupt(error, end=True):
                self(error)
            return
        if self._attempt_reply is not None:
            layer._stats.per_try_timeouts += 1
            error = UpstreamTimeoutError(f"per-try timeout of {layer._per_try:g}s exceeded")
            if not self._req.interrupt(error):
                self.attempt_done(error)
        if self._reply is not None and self._attempt_reply is None:
            layer._rearm(self)  # between attempts (or none started yet): the request's
