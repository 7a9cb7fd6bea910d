"""Retries: which failures to try again, how long to wait, and when not to.

Driven by tenacity's primitives: an `AsyncRetrying` built once per config version holds the stop
rule (`stop_after_attempt(attempts + 1)`) and the wait rule (`wait_random_exponential`: full
jitter, the n-th retry waits uniformly in [0, min(max, base * 2**(n-1))]); each request that needs
a retry gets one `RetryCallState` to feed them. Both are plain synchronous calls, so they fit the
callback design as they are (a request whose first attempt succeeds never makes a
`RetryCallState`). The loop is ours because the decisions between attempts (Retry-After,
deadline, budget, discarding the response) are not tenacity's to make: each attempt's result
comes back to `_RetryCall`, which returns it or starts the next attempt, after a backoff slept in
a task (the one wait here; the first attempt starts without one). A request the total timeout or
the client's departure ended (`Request.ended`) is never tried again.

An attempt's result is retried when all of these hold:

- the classifier's outcome matches `retry_on` (tokens below) or, for an upstream response, an
  explicit status code;
- the body can be replayed (`req.body.replayable`);
- the request is idempotent (GET, HEAD, OPTIONS, PUT, DELETE, TRACE), or has an
  `idempotency-key` header, or the policy says `non_idempotent`, or the attempt failed to connect
  (nothing reached the upstream);
- attempts remain; otherwise a response gets `URX` appended to its flags and is returned, an
  error becomes `RetryError` (503 URX);
- a `Retry-After` (seconds or HTTP-date) on a 503/429 fits before the deadline (or under
  `max_retry_after` when there is none); otherwise the response is returned as is;
- the retry budget (Envoy semantics) has room: retries in flight for the service stay below
  `max(min_concurrency, percent% of active + pending attempts)`; otherwise the result is returned
  as is and `budget_exhausted` counted.

A retried response is discarded (its connection dropped); a retried error's flag is appended to
`req.flags`. The balancer reads `req.tried` to prefer an endpoint not yet tried.

retry_on tokens (Envoy's meanings): `connect-failure` (UF); `reset` (UF, UC, timeout);
`gateway-error` (502/503/504, UF, UC, timeout); `5xx` (any 5xx, UF, UC, timeout, UPE);
`retriable-4xx` (409); `retriable-status-codes` (the explicit codes, which always apply);
`cancelled`, `deadline-exceeded`, `internal`, `resource-exhausted`, `unavailable` (the gRPC
status of an answer from an HTTP/2 service that came before any message, whatever the method:
trailers-only, or trailers after a head the forwarder held; nothing of the response has been
forwarded then).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_random_exponential

from mesh.http import IDEMPOTENT_METHODS_BYTES
from mesh.policy import RetryBudget
from sidecar.config import RetryPolicy
from sidecar.exchange import Handler, Reply, Request, Response, Result
from sidecar.flags import Flag, PolicyError, ProxyError
from sidecar.policy.classifier import GRPC_KINDS, SUCCESS_BELOW, Kind, Outcome, classify
from sidecar.policy.clock import Clock, Sleep
from sidecar.policy.concurrency import ServiceLoad
from sidecar.policy.stats import ServiceStats

_NO_RESPONSE = frozenset({Kind.CONNECT_FAILURE, Kind.RESET, Kind.TIMEOUT})

RETRY_ON_TOKENS: dict[str, frozenset[Kind]] = {
    "connect-failure": frozenset({Kind.CONNECT_FAILURE}),
    "reset": _NO_RESPONSE,
    "gateway-error": _NO_RESPONSE | {Kind.GATEWAY_ERROR},
    "5xx": _NO_RESPONSE | {Kind.GATEWAY_ERROR, Kind.SERVER_ERROR, Kind.PROTOCOL_ERROR},
    "retriable-4xx": frozenset({Kind.RETRIABLE_4XX}),
    "retriable-status-codes": frozenset(),
    # gRPC statuses that came before any message (HTTP/2 services: classify_grpc)
    "cancelled": frozenset({Kind.GRPC_CANCELLED}),
    "deadline-exceeded": frozenset({Kind.GRPC_DEADLINE_EXCEEDED}),
    "internal": frozenset({Kind.GRPC_INTERNAL}),
    "resource-exhausted": frozenset({Kind.GRPC_RESOURCE_EXHAUSTED}),
    "unavailable": frozenset({Kind.GRPC_UNAVAILABLE}),
}

_RETRY_AFTER_STATUSES = frozenset({429, 503})


class RetryError(PolicyError):
    """Attempts ran out on an error: 503 URX."""

    FLAG = Flag.RETRIES_EXHAUSTED


@dataclass(frozen=True, slots=True)
class RetryConfig:
    attempts: int  # retries after the first try
    kinds: frozenset[Kind]  # outcome kinds retry_on covers
    statuses: frozenset[int]  # explicit upstream statuses
    budget: RetryBudget | None
    non_idempotent: bool
    # A Retry-After longer than this is not waited for when the request has no deadline.
    max_retry_after: float
    retrying: AsyncRetrying = field(compare=False, repr=False)  # stop + wait rules

    @classmethod
    def from_policy(cls, policy: RetryPolicy, *, max_retry_after: float = 10.0) -> RetryConfig:
        if policy.attempts < 0:
            raise ValueError(f"retry attempts must be >= 0, got {policy.attempts}")
        kinds: set[Kind] = set()
        for token in policy.retry_on:
            if token not in RETRY_ON_TOKENS:
                allowed = ", ".join(sorted(RETRY_ON_TOKENS))
                raise ValueError(f"retry_on: unknown token {token!r}; allowed: {allowed}")
            kinds |= RETRY_ON_TOKENS[token]
        backoff = policy.backoff
        if not 0 < backoff.base <= backoff.max:
            raise ValueError(f"backoff needs 0 < base <= max, got {backoff.base}, {backoff.max}")
        budget = policy.budget
        if budget is not None and (budget.percent < 0 or budget.min_concurrency < 0):
            raise ValueError(f"retry budget must not be negative, got {budget}")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(policy.attempts + 1),
            wait=wait_random_exponential(multiplier=backoff.base, max=backoff.max),
        )
        return cls(
            attempts=policy.attempts,
            kinds=frozenset(kinds),
            statuses=policy.retriable_status,
            budget=budget,
            non_idempotent=policy.non_idempotent,
            max_retry_after=max_retry_after,
            retrying=retrying,
        )

    def covers(self, outcome: Outcome) -> bool:
        """Whether retry_on (tokens or explicit codes) asks to retry this outcome."""
        if outcome.kind in self.kinds:
            return True
        return outcome.flag is None and outcome.status in self.statuses

    def backoff(self, state: RetryCallState) -> float:
        """The wait before the next attempt, after `state.attempt_number` attempts."""
        return float(self.retrying.wait(state))

    def exhausted(self, state: RetryCallState) -> bool:
        return bool(self.retrying.stop(state))


def parse_retry_after(value: bytes | None, wall_now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date); None if invalid."""
    if value is None:
        return None
    text = value.strip().decode("latin-1")
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" or no zone: HTTP-dates are GMT
        return None
    return max(0.0, when.timestamp() - wall_now)


class Retry:
    __slots__ = (
        "_classify",
        "_clock",
        "_config",
        "_first",
        "_inner",
        "_load",
        "_sleep",
        "_stats",
        "_wall",
    )

    def __init__(
        self,
        config: RetryConfig,
        inner: Handler,
        load: ServiceLoad,
        stats: ServiceStats,
        clock: Clock,
        *,
        sleep: Sleep = asyncio.sleep,
        wall: Callable[[], float] = time.time,
        classifier: Callable[[Result], Outcome] = classify,
    ) -> None:
        self._classify = classifier  # classify_grpc for an HTTP/2 service
        # The first attempt's reply: with the plain classifier, a good answer is known by its
        # status, without the call.
        self._first: type[_FirstTry] = _FirstTryByStatus if classifier is classify else _FirstTry
        self._config = config
        self._inner = inner
        self._load = load
        self._stats = stats
        self._clock = clock
        self._sleep = sleep
        self._wall = wall  # for Retry-After HTTP-dates

    def _may_repeat(self, req: Request, outcome: Outcome) -> bool:
        if not req.body.replayable:
            return False
        if outcome.kind is Kind.CONNECT_FAILURE or self._config.non_idempotent:
            return True
        if outcome.kind in GRPC_KINDS:
            return True  # the gRPC conditions are asked for by name, whatever the method
        return req.method in IDEMPOTENT_METHODS_BYTES or req.header(b"idempotency-key") is not None

    def _retry_after(self, req: Request, resp: Response) -> float | None:
        """Retry-After as the wait, or -1.0 when it does not fit (do not retry)."""
        if resp.status not in _RETRY_AFTER_STATUSES:
            return None
        delay = parse_retry_after(resp.header(b"retry-after"), self._wall())
        if delay is None:
            return None
        if req.deadline is not None:
            limit = req.deadline - self._clock()
        else:
            limit = self._config.max_retry_after
        return delay if delay <= limit else -1.0

    def _budget_allows(self) -> bool:
        budget = self._config.budget
        if budget is None:
            return True
        load = self._load
        allowed = max(budget.min_concurrency, budget.percent / 100.0 * (load.active + load.pending))
        return load.retries_active < allowed

    def __call__(self, req: Request, reply: Reply) -> None:
        make, inner = self._first, self._inner  # read, then called: see stack.py
        first = make()
        first._layer = self
        first._req = req
        first._reply = reply
        inner(req, first.__call__)


class _FirstTry:
    """The first attempt's reply: most succeed and only pass on, so the `_RetryCall` that
    decides and holds a retry's state is made only for a result that may need one.

    No `__init__`: the layer sets the slots itself (a class with a Python `__init__` is called
    through a second run of the interpreter loop, ~600 instructions per request)."""

    __slots__ = ("_layer", "_reply", "_req")

    _layer: Retry
    _req: Request
    _reply: Reply

    def __call__(self, result: Result) -> None:
        if self._layer._classify(result).success:
            self._reply(result)
        else:
            _RetryCall(self._layer, self._req, self._reply)(result)


class _FirstTryByStatus(_FirstTry):
    """`_FirstTry` for the plain classifier: a response below SUCCESS_BELOW is a success
    (`classify`'s own rule), passed on with no call."""

    __slots__ = ()

    def __call__(self, result: Result) -> None:
        if isinstance(result, Response) and result.status < SUCCESS_BELOW:
            reply = self._reply  # read, then called: see stack.py
            reply(result)
        else:
            _RetryCall(self._layer, self._req, self._reply)(result)


class _RetryCall:
    """One request through the retry layer: it is the reply of every attempt."""

    __slots__ = ("_layer", "_reply", "_req", "_sleeping", "_state", "holding")

    def __init__(self, layer: Retry, req: Request, reply: Reply) -> None:
        self._layer = layer
        self._req = req
        self._reply = reply
        self._state: RetryCallState | None = None
        self._sleeping: asyncio.Task[None] | None = None
        self.holding = False  # this request holds one of the budget's retries in flight

    def __call__(self, result: Result) -> None:
        layer = self._layer
        if self.holding:
            self.holding = False
            layer._load.retries_active -= 1
        outcome = layer._classify(result)
        if outcome.success:  # the usual answer: nothing to decide
            self._reply(result)
            return
        decision = self._decide(result, outcome)
        if not isinstance(decision, float):
            self._reply(decision)
            return
        delay = decision
        if isinstance(result, Response):
            result.discard()
        else:
            self._req.flags.append(result.flag)
        self.holding = True
        layer._load.retries_active += 1
        layer._stats.retries += 1
        assert self._state is not None
        self._state.prepare_for_next_attempt()
        if delay > 0:
            self._sleeping = asyncio.ensure_future(layer._sleep(delay))
            self._sleeping.add_done_callback(self._slept)
            self._req.on_interrupt = self._interrupted
        else:
            layer._inner(self._req, self)

    def _decide(self, result: Result, outcome: Outcome) -> float | Result:
        """The wait before trying again, or what to reply: the attempt's own result, flagged
        URX when attempts ran out on a response, or a RetryError when they ran out on an
        error."""
        layer, req = self._layer, self._req
        config = layer._config
        if req.ended:
            return result  # the total timeout fired or the client left
        if not config.covers(outcome):
            return result
        if not layer._may_repeat(req, outcome):
            return result
        state = self._state
        if state is None:
            state = self._state = RetryCallState(config.retrying, None, (), {})
        if config.exhausted(state):
            layer._stats.retries_exhausted += 1
            if isinstance(result, Response):
                result.flags.append(Flag.RETRIES_EXHAUSTED)
                return result
            error = RetryError(f"{state.attempt_number} attempts failed, last: {result}")
            error.__cause__ = result
            return error
        delay: float | None = None
        if isinstance(result, Response):
            delay = layer._retry_after(req, result)
            if delay is not None and delay < 0:
                return result  # Retry-After does not fit before the deadline
        if delay is None:
            delay = config.backoff(state)
        if not layer._budget_allows():
            layer._stats.budget_exhausted += 1
            return result
        return float(delay)

    def _slept(self, task: asyncio.Task[None]) -> None:
        if self._sleeping is not task:
            return  # interrupted meanwhile: answered already
        self._sleeping = None
        self._req.on_interrupt = None
        if task.cancelled():
            return
        failure = task.exception()
        if failure is not None:  # the injected sleep failed: say so, never hang
            self._stop(ProxyError(Flag.UPSTREAM_PROTOCOL_ERROR, f"backoff failed: {failure!r}"))
            return
        self._layer._inner(self._req, self)

    def _interrupted(self, error: ProxyError) -> None:
        sleeping, self._sleeping = self._sleeping, None
        if sleeping is not None:
            sleeping.cancel()
        self._stop(error)

    def _stop(self, error: ProxyError) -> None:
        if self.holding:
            self.holding = False
            self._layer._load.retries_active -= 1
        self._reply(error)
