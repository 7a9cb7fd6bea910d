"""Per-endpoint circuit breakers (outlier ejection), one pybreaker `CircuitBreaker` per endpoint.

- An endpoint trips after `consecutive_failures` consecutive failures as the classifier defines
  them (5xx from the upstream, connect failure, reset, timeout, bad framing); any other upstream
  answer resets the count; local decisions (overflow, ...) are neutral.
- A tripped endpoint is ejected: the balancer skips it (`BreakerRegistry.is_ejected`) for
  `open_for * consecutive trips`, capped at `max_open_for` (Envoy's growing ejection time).
- Then it is half-open: exactly one real request probes it while the others keep skipping it.
  A successful probe closes the breaker (and resets the trip count); a failed one opens it again
  for longer. A probe that ends without a verdict (cancelled by the client) frees the slot.
- A trip that would eject more than `max_ejection_percent` of the service's endpoints
  (half-open ones count as ejected) does not happen: the endpoint stays in and the refusal is
  counted (`ejections_suppressed`) and reported to the event hook. Its failure is not recorded,
  so the next failure asks again.

pybreaker and time: pybreaker stamps `opened_at = datetime.now(UTC)` in `CircuitBreaker.open()`
and compares `datetime.now(UTC) < opened_at + reset_timeout` in the open state's `before_call`;
neither takes a clock. Its storage is pluggable, though, and both reads go through it, so
`_ClockStorage` ignores the wall-clock stamp, remembers our clock's time instead, and hands
pybreaker back `now - elapsed-on-our-clock`, which makes pybreaker's own comparison an
elapsed-on-our-clock comparison. The registry decides ejection from the same stamp, moves an
expired breaker to half-open itself when it admits the probe, and records outcomes into pybreaker
only when closed or for the probe, so pybreaker's state machine (counting, tripping, half-open,
closing) stays the single source of state and no wall-clock timer ever decides anything.
pybreaker's API is synchronous (`call(func)`); outcomes are recorded when the attempt's result
comes back through the layer (its reply), with a synchronous `call` of a function that returns
or raises. An attempt interrupted by a deadline comes back as a timeout error and counts as one;
one interrupted because the client left comes back as a local error: no verdict.

Events (`BreakerEvent`) name the request whose attempt caused them, so tracing can put them on
that request's span.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum

import pybreaker

from mesh.policy import CircuitBreaker
from sidecar.config import Endpoint
from sidecar.exchange import EndpointHandler, Reply, Request, Response, Result
from sidecar.flags import Flag, PolicyError
from sidecar.policy.classifier import (
    FAILURE_FROM,
    GrpcBody,
    Kind,
    Outcome,
    classify,
    classify_grpc,
    grpc_end_outcome,
)
from sidecar.policy.clock import Clock
from sidecar.policy.stats import ServiceStats


class BreakerError(PolicyError):
    """The endpoint was ejected between the balancer's pick and the call: 503 UH."""

    FLAG = Flag.NO_HEALTHY_UPSTREAM


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    consecutive_failures: int
    open_for: float  # first ejection; the n-th consecutive one lasts n times as long
    max_ejection_percent: int
    max_open_for: float = 300.0

    @classmethod
    def from_policy(cls, policy: CircuitBreaker) -> BreakerConfig | None:
        if policy.consecutive_failures is None:
            return None
        if policy.consecutive_failures < 1:
            raise ValueError(
                f"consecutive_failures must be at least 1, got {policy.consecutive_failures}"
            )
        if policy.open_for <= 0:
            raise ValueError(f"open_for must be positive, got {policy.open_for!r}")
        if not 0 <= policy.max_ejection_percent <= 100:
            raise ValueError(
                f"max_ejection_percent must be 0..100, got {policy.max_ejection_percent}"
            )
        return cls(
            policy.consecutive_failures,
            policy.open_for,
            policy.max_ejection_percent,
            max(300.0, policy.open_for),
        )


class BreakerEventKind(Enum):
    EJECTED = "ejected"  # tripped: closed -> open, or a failed probe: half-open -> open
    HALF_OPEN = "half_open"  # the probe is on its way
    CLOSED = "closed"  # the probe succeeded: back in rotation
    EJECTION_SUPPRESSED = "ejection_suppressed"  # a trip refused by max_ejection_percent


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    kind: BreakerEventKind
    endpoint: Endpoint
    at: float  # clock time
    open_for: float | None = None  # for EJECTED: how long it stays out
    consecutive_trips: int = 0
    # The request whose attempt caused it (None when not known), for its trace.
    request: Request | None = field(default=None, compare=False, repr=False)


EventHook = Callable[[BreakerEvent], None]


class _ClockStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage with the open timer on our clock (see the module docstring)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self._clock = clock
        self.opened_at_clock: float | None = None

    @property
    def opened_at(self) -> datetime | None:
        if self.opened_at_clock is None:
            return None
        elapsed = self._clock() - self.opened_at_clock
        return datetime.now(UTC) - timedelta(seconds=elapsed)

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:  # pybreaker passes datetime.now(UTC)
        self.opened_at_clock = self._clock()


class _RecordedFailure(Exception):
    """Raised inside pybreaker's `call` to record one failed attempt."""


def _succeed() -> None:
    return None


def _fail() -> None:
    raise _RecordedFailure


class EndpointBreaker(pybreaker.CircuitBreakerListener):
    """One endpoint's pybreaker breaker plus what pybreaker does not keep: trips and the probe."""

    def __init__(
        self, endpoint: Endpoint, config: BreakerConfig, registry: BreakerRegistry
    ) -> None:
        self.endpoint = endpoint
        self.config = config
        self.trips = 0  # consecutive trips without a successful probe in between
        self.probing = False  # the half-open probe is in flight
        self._registry = registry
        self.storage = _ClockStorage(registry.clock)
        self.cb = pybreaker.CircuitBreaker(
            fail_max=config.consecutive_failures,
            reset_timeout=config.open_for,
            state_storage=self.storage,
            listeners=[self],
            name=str(endpoint),
        )

    def configure(self, config: BreakerConfig) -> None:
        self.config = config
        self.cb.fail_max = config.consecutive_failures

    @property
    def state(self) -> str:
        return self.cb.current_state

    def open_until(self) -> float:
        opened = self.storage.opened_at_clock
        return (opened if opened is not None else 0.0) + self.cb.reset_timeout

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        registry = self._registry
        name = new_state.name
        if name == pybreaker.STATE_CLOSED:
            registry.unclosed.discard(self.endpoint)
        else:
            registry.unclosed.add(self.endpoint)
        if name == pybreaker.STATE_OPEN:
            self.trips += 1
            self.probing = False
            open_for = min(self.config.open_for * self.trips, self.config.max_open_for)
            cb.reset_timeout = open_for
            registry.stats.ejections += 1
            registry.emit(BreakerEventKind.EJECTED, self.endpoint, open_for, self.trips)
        elif name == pybreaker.STATE_HALF_OPEN:
            registry.emit(BreakerEventKind.HALF_OPEN, self.endpoint, None, self.trips)
        elif name == pybreaker.STATE_CLOSED:
            self.trips = 0
            self.probing = False
            registry.emit(BreakerEventKind.CLOSED, self.endpoint, None, 0)


class BreakerRegistry:
    """The breakers of one service's endpoints; survives config pushes (held by ServiceState)."""

    def __init__(
        self, clock: Clock, stats: ServiceStats, on_event: EventHook | None = None
    ) -> None:
        self.clock = clock
        self.stats = stats
        self.on_event = on_event
        self.config: BreakerConfig | None = None
        self._breakers: dict[Endpoint, EndpointBreaker] = {}
        self._endpoint_count = 0
        # Endpoints whose breaker is not closed. Empty, the usual case, every question below is
        # answered without asking pybreaker (its state goes through a storage object).
        self.unclosed: set[Endpoint] = set()
        # Endpoints that recorded a failure since their last reset: a superset of those whose
        # breaker counts failures now. Empty, the usual case, a good answer is recorded without
        # even finding its breaker (an Endpoint's hash is a Python call).
        self.counting: set[Endpoint] = set()
        # The request being admitted or recorded right now: events name it (pybreaker's
        # listener, which emits them, is called in the middle of `admit` and `record`).
        self.cause: Request | None = None

    def configure(self, config: BreakerConfig | None, endpoints: Iterable[Endpoint]) -> None:
        """Apply a pushed config: breakers of removed endpoints (or all, when off) go."""
        self.config = config
        wanted = set(endpoints)
        self._endpoint_count = len(wanted)
        if config is None:
            self._breakers.clear()
            self.unclosed.clear()
            self.counting.clear()
            return
        for endpoint in list(self._breakers):
            if endpoint not in wanted:
                del self._breakers[endpoint]
                self.unclosed.discard(endpoint)
                self.counting.discard(endpoint)
        for endpoint in wanted:
            breaker = self._breakers.get(endpoint)
            if breaker is None:
                self._breakers[endpoint] = EndpointBreaker(endpoint, config, self)
            else:
                breaker.configure(config)

    def emit(
        self,
        kind: BreakerEventKind,
        endpoint: Endpoint,
        open_for: float | None,
        trips: int,
    ) -> None:
        if self.on_event is not None:
            event = BreakerEvent(kind, endpoint, self.clock(), open_for, trips, self.cause)
            self.on_event(event)

    def breaker(self, endpoint: Endpoint) -> EndpointBreaker | None:
        return self._breakers.get(endpoint)

    def is_ejected(self, endpoint: Endpoint) -> bool:
        """Whether the balancer must skip the endpoint now."""
        if not self.unclosed:
            return False
        breaker = self._breakers.get(endpoint)
        if breaker is None:
            return False
        state = breaker.state
        if state == pybreaker.STATE_CLOSED:
            return False
        if state == pybreaker.STATE_OPEN and self.clock() < breaker.open_until():
            return True
        # Open with its time served, or half-open: available to exactly one probe.
        return breaker.probing

    def ejected_count(self) -> int:
        return len(self.unclosed)

    def admit(self, endpoint: Endpoint, cause: Request | None = None) -> bool:
        """Let an attempt through to the endpoint; True when it is the half-open probe."""
        if not self.unclosed:
            return False
        breaker = self._breakers.get(endpoint)
        if breaker is None or breaker.state == pybreaker.STATE_CLOSED:
            return False
        if self.is_ejected(endpoint):
            raise BreakerError(f"endpoint {endpoint} is ejected")
        if breaker.state == pybreaker.STATE_OPEN:
            self.cause = cause
            try:
                breaker.cb.half_open()
            finally:
                self.cause = None
        breaker.probing = True
        return True

    def record(
        self, endpoint: Endpoint, outcome: Outcome, probe: bool, cause: Request | None = None
    ) -> None:
        """Feed an attempt's outcome to the endpoint's breaker (`cause`: its request)."""
        if not probe and not self.unclosed and not outcome.breaker_failure:
            # The usual case: every breaker closed and a good answer. Only a run of failures
            # in progress needs resetting.
            if not self.counting or outcome.kind is Kind.LOCAL:
                return
            breaker = self._breakers.get(endpoint)
            if breaker is None:
                return
            if breaker.cb.fail_counter:
                breaker.cb.call(_succeed)
            self.counting.discard(endpoint)
            return
        breaker = self._breakers.get(endpoint)
        if breaker is None:
            return
        self.cause = cause
        try:
            self._record(breaker, endpoint, outcome, probe)
        finally:
            self.cause = None

    def _record(
        self, breaker: EndpointBreaker, endpoint: Endpoint, outcome: Outcome, probe: bool
    ) -> None:
        state = breaker.state if self.unclosed else pybreaker.STATE_CLOSED
        if probe:
            if state != pybreaker.STATE_HALF_OPEN:
                return  # the breaker was reconfigured or reset meanwhile
            if outcome.kind is Kind.LOCAL:
                breaker.probing = False  # no verdict: the next request probes
                return
        elif state != pybreaker.STATE_CLOSED:
            return  # a request that started before the trip: the probe decides, not it
        cb = breaker.cb
        if outcome.breaker_failure:
            if (
                state == pybreaker.STATE_CLOSED
                and cb.fail_counter + 1 >= cb.fail_max
                and not self._may_eject_one_more()
            ):
                self.stats.ejections_suppressed += 1
                self.emit(BreakerEventKind.EJECTION_SUPPRESSED, endpoint, None, breaker.trips)
                return
            self.counting.add(endpoint)
            with contextlib.suppress(_RecordedFailure, pybreaker.CircuitBreakerError):
                cb.call(_fail)  # raises by design: that is how pybreaker records a failure
        elif outcome.kind is not Kind.LOCAL and (probe or cb.fail_counter):
            cb.call(_succeed)

    def _may_eject_one_more(self) -> bool:
        config = self.config
        if config is None or self._endpoint_count == 0:
            return False
        ejected = self.ejected_count()
        # Envoy: "defaults to 10% but will eject at least one host regardless of the value".
        return (
            ejected == 0
            or (ejected + 1) * 100 <= config.max_ejection_percent * self._endpoint_count
        )


class Breaker:
    """The layer: admits an attempt past the endpoint's breaker and, on the way back, records
    its outcome."""

    __slots__ = ("_clock", "_inner", "_outcome", "_registry")

    def __init__(
        self, registry: BreakerRegistry, inner: EndpointHandler, clock: Clock, *, grpc: bool = False
    ) -> None:
        self._outcome = _GrpcOutcome if grpc else _Outcome  # an HTTP/2 service's reads grpc-status
        self._registry = registry
        self._inner = inner
        self._clock = clock

    def __call__(self, req: Request, endpoint: Endpoint, reply: Reply) -> None:
        registry = self._registry
        probe = False
        if registry.unclosed:  # every breaker closed, the usual case: nothing to admit
            try:
                probe = registry.admit(endpoint, req)
            except BreakerError as error:
                reply(error)
                return
        make, inner = self._outcome, self._inner  # read, then called: see stack.py
        outcome = make()
        outcome._registry = registry
        outcome._endpoint = endpoint
        outcome._probe = probe
        outcome._req = req
        outcome._reply = reply
        inner(req, endpoint, outcome.__call__)


class _Outcome:
    """An attempt's reply through the breaker: records the result for the endpoint.

    No `__init__`: the layer sets the slots itself (a class with a Python `__init__` is called
    through a second run of the interpreter loop, ~600 instructions per attempt)."""

    __slots__ = ("_endpoint", "_probe", "_registry", "_reply", "_req")

    _registry: BreakerRegistry
    _endpoint: Endpoint
    _probe: bool
    _req: Request
    _reply: Reply

    def __call__(self, result: Result) -> None:
        registry = self._registry
        # `record`'s own first test, without classifying the usual good answer: a response
        # below FAILURE_FROM is no breaker failure, and with no probe, no breaker open and no
        # failure run to reset it changes nothing.
        if (
            self._probe
            or registry.unclosed
            or registry.counting
            or not isinstance(result, Response)
            or result.status >= FAILURE_FROM
        ):
            registry.record(self._endpoint, classify(result), self._probe, self._req)
        reply = self._reply  # read, then called: see stack.py
        reply(result)


class _GrpcOutcome(_Outcome):
    """`_Outcome` for an HTTP/2 service: UNAVAILABLE or INTERNAL is a failure, whether it comes
    before any message (a trailers-only answer, or trailers after a held head: known now) or in
    the trailers after messages: then the outcome is recorded when the body ends (a stream
    reset after the head counts as a reset). A half-open probe is decided by its head, so one
    long stream does not keep its endpoint out while it lasts."""

    __slots__ = ("_body",)

    _body: GrpcBody  # the response whose end decides (set when the head passed)

    def __call__(self, result: Result) -> None:
        outcome = classify_grpc(result)
        if outcome.success and not self._probe and isinstance(result, Response):
            body = result.body
            if result.has_body and isinstance(body, GrpcBody) and not body.finished:
                self._body = body
                body.when_done(self._ended)
                self._reply(result)
                return
        self._registry.record(self._endpoint, outcome, self._probe, self._req)
        self._reply(result)

    def _ended(self) -> None:
        body = self._body
        outcome = grpc_end_outcome(body.grpc_status, body.finished, body.failed)
        self._registry.record(self._endpoint, outcome, False, self._req)
