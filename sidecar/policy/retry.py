"""Retries: which failures to try again, how long to wait, and when not to.

Driven by tenacity's primitives: an `AsyncRetrying` built once per config version holds the stop
rule (`stop_after_attempt(attempts + 1)`) and the wait rule (`wait_random_exponential`: full
jitter, the n-th retry waits uniformly in [0, min(max, base * 2**(n-1))]); each request that needs
a retry gets one `RetryCallState` to feed them. The loop is ours because the decisions between
attempts (Retry-After, deadline, budget, discarding the response) are not tenacity's to make.

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
`retriable-4xx` (409); `retriable-status-codes` (the explicit codes, which always apply).
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
from sidecar.exchange import Handler, Request, Response
from sidecar.flags import Flag, ProxyError
from sidecar.policy.classifier import Kind, Outcome, classify
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
}

_RETRY_AFTER_STATUSES = frozenset({429, 503})


class RetryError(ProxyError):
    """Attempts ran out on an error: 503 URX."""

    def __init__(self, detail: str) -> None:
        super().__init__(Flag.RETRIES_EXHAUSTED, detail)


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
    __slots__ = ("_clock", "_config", "_inner", "_load", "_sleep", "_stats", "_wall")

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
    ) -> None:
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

    async def __call__(self, req: Request) -> Response:
        config = self._config
        load = self._load
        state: RetryCallState | None = None
        holding = False  # this request holds one of the budget's retries in flight
        try:
            while True:
                result: Response | ProxyError
                try:
                    result = await self._inner(req)
                except ProxyError as error:
                    result = error
                if holding:
                    holding = False
                    load.retries_active -= 1
                outcome = classify(result)
                if outcome.success or not config.covers(outcome):
                    return _give_back(result)
                if not self._may_repeat(req, outcome):
                    return _give_back(result)
                if state is None:
                    state = RetryCallState(config.retrying, None, (), {})
                if config.exhausted(state):
                    self._stats.retries_exhausted += 1
                    if isinstance(result, Response):
                        result.flags.append(Flag.RETRIES_EXHAUSTED)
                        return result
                    raise RetryError(
                        f"{state.attempt_number} attempts failed, last: {result}"
                    ) from result
                delay: float | None = None
                if isinstance(result, Response):
                    delay = self._retry_after(req, result)
                    if delay is not None and delay < 0:
                        return result  # Retry-After does not fit before the deadline
                if delay is None:
                    delay = config.backoff(state)
                if not self._budget_allows():
                    self._stats.budget_exhausted += 1
                    return _give_back(result)
                if isinstance(result, Response):
                    result.discard()
                else:
                    req.flags.append(result.flag)
                holding = True
                load.retries_active += 1
                self._stats.retries += 1
                state.prepare_for_next_attempt()
                if delay > 0:
                    await self._sleep(delay)
        finally:
            if holding:
                load.retries_active -= 1


def _give_back(result: Response | ProxyError) -> Response:
    """The attempt's own result, unchanged: its response, or its error raised again."""
    if isinstance(result, Response):
        return result
    raise result
