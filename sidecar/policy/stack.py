"""The one place that composes a service's policy layers, and the state that outlives configs.

Outer to inner (the order in docs/architecture.md, "The walk of one request"):

    TotalTimeout -> Retry -> PerTryTimeout -> Balancer -> Breaker -> forward

With both timeouts configured, one layer owns both deadlines (`timeout.Timeouts`, entered as
`Timeouts -> Retry -> Timeouts.attempt -> Balancer`), one per-request object instead of two.

With tracing on, a client-span layer goes outside everything and an attempt layer right under
the Balancer: `[Trace] -> TotalTimeout -> ... -> Balancer -> [Attempt] -> Breaker -> forward`.

Layers that are not configured are not built: with no policy the stack is `Balancer -> forward`
(no tenacity object, no timer, no breaker), because plain forwarding has a near-nginx target.
`max_requests` is enforced inside the Balancer, which owns the per-attempt active count (see
`concurrency`); `max_pending` is enforced by the connection pool through `ServiceLoad.pending_slot`.

Every layer is a plain callable called with the request and a reply (`sidecar/exchange.py`): it
acts on the request on the way down and on the result on the way back, and starts a task only
when it must wait for something other than the network (the retry's backoff). A request keeps
the stack it started on to its end, however many pushes come meanwhile.

Layers (and the per-request replies they pass down) are handed on as bound `__call__`
methods, not the objects: Python calls an instance with `__call__` at about twice the cost of a
bound method (a slot lookup and an argument tuple each time), ~700 instructions a call. And a
callable kept in a slot is read into a local before it is called (`inner = self._inner;
inner(...)`): CPython 3.11 compiles `self._inner(...)` to a method lookup that it cannot
specialize for a slot, ~200 instructions each time, where the slot read is specialized.

A stack is built per config version and shared by every request that started on it; the
`ServiceState` passed in carries what must survive config pushes (breakers, active counts, the
retry budget's count, stats), so a push neither closes tripped breakers nor forgets load.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from sidecar.config import Endpoint, ServiceConfig
from sidecar.exchange import EndpointHandler, Handler
from sidecar.policy.balancer import Balancer, BalancerConfig, EndpointLoad, OriginalDestination
from sidecar.policy.breaker import Breaker, BreakerConfig, BreakerRegistry, EventHook
from sidecar.policy.classifier import classify, classify_grpc
from sidecar.policy.clock import Clock, Sleep, loop_time
from sidecar.policy.concurrency import ConcurrencyConfig, ServiceLoad
from sidecar.policy.retry import Retry, RetryConfig
from sidecar.policy.stats import ServiceStats
from sidecar.policy.timeout import PerTryTimeout, TimeoutConfig, Timeouts, TotalTimeout


class StackTracing(Protocol):
    """The tracing hooks a stack takes (`sidecar.telemetry.tracing.Tracing`); None: none built."""

    def client(self, inner: Handler, service: str) -> Handler: ...

    def attempt(self, inner: EndpointHandler) -> EndpointHandler: ...


class ServiceState:
    """What one service keeps across config pushes."""

    def __init__(
        self, name: str, clock: Clock = loop_time, on_event: EventHook | None = None
    ) -> None:
        self.name = name
        self.stats = ServiceStats()
        self.load = ServiceLoad(self.stats)  # active / pending / retries in flight, limits
        self.breakers = BreakerRegistry(clock, self.stats, on_event)
        self._endpoints: dict[Endpoint, EndpointLoad] = {}

    def endpoint_loads(self, endpoints: Iterable[Endpoint]) -> tuple[EndpointLoad, ...]:
        """The load cells for these endpoints, in order; cells of other endpoints are dropped
        (attempts still in flight on them hold their cell and release it normally)."""
        wanted = tuple(endpoints)
        cells = tuple(self._endpoints.get(ep) or EndpointLoad(ep) for ep in wanted)
        self._endpoints = {cell.endpoint: cell for cell in cells}
        return cells

    def active(self, endpoint: Endpoint) -> int:
        cell = self._endpoints.get(endpoint)
        return cell.active if cell is not None else 0


class ServiceRegistry:
    """Every service's `ServiceState`, by service name (the server, pool and admin share it)."""

    def __init__(self, clock: Clock = loop_time, on_event: EventHook | None = None) -> None:
        self._clock = clock
        self._on_event = on_event
        self._states: dict[str, ServiceState] = {}

    def state(self, name: str) -> ServiceState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = ServiceState(name, self._clock, self._on_event)
        return state

    def get(self, name: str) -> ServiceState | None:
        return self._states.get(name)

    def retain(self, names: Iterable[str]) -> None:
        """Forget services that left the config."""
        keep = set(names)
        for name in [name for name in self._states if name not in keep]:
            del self._states[name]

    def __iter__(self) -> Iterator[ServiceState]:
        return iter(list(self._states.values()))


def check_service(cfg: ServiceConfig) -> None:
    """Raise ValueError naming the setting when a policy value cannot be applied, touching no
    state: a snapshot is checked whole before any service's limits or breakers change."""
    TimeoutConfig.from_service(cfg)
    if cfg.retry is not None:
        RetryConfig.from_policy(cfg.retry)
    BreakerConfig.from_policy(cfg.breaker)
    ConcurrencyConfig.from_service(cfg)
    BalancerConfig.from_service(cfg)


def build_service_stack(
    cfg: ServiceConfig,
    state: ServiceState,
    forward: EndpointHandler,
    clock: Clock = loop_time,
    *,
    rng: random.Random | None = None,
    sleep: Sleep = asyncio.sleep,
    wall: Callable[[], float] = time.time,
    tracing: StackTracing | None = None,
) -> Handler:
    """The policy stack for one service and config version, outer to inner as documented above.

    Raises ValueError naming the setting when a policy value cannot be applied.
    """
    timeouts = TimeoutConfig.from_service(cfg)
    retry = RetryConfig.from_policy(cfg.retry) if cfg.retry is not None else None
    breaker = BreakerConfig.from_policy(cfg.breaker)
    state.load.configure(ConcurrencyConfig.from_service(cfg))
    state.breakers.configure(breaker, cfg.endpoints)
    loads = state.endpoint_loads(cfg.endpoints)

    # The forwarder is last (Envoy's router): it owns the upstream connection.
    endpoint_handler = forward
    if breaker is not None:
        # Breaker right above the forwarder: it sees each attempt's own result for its endpoint.
        endpoint_handler = Breaker(state.breakers, endpoint_handler, clock, grpc=cfg.http2).__call__
    traced: EndpointHandler | None = None
    if tracing is not None:
        # Attempt spans right under the balancer: one call per attempt with its endpoint, the
        # breaker's refusal and events included; it writes the attempt's trace context upstream.
        # Only a sampled request (one carrying a trace) goes through it: the balancer skips it
        # for the others.
        traced = tracing.attempt(endpoint_handler)

    # Balancer: one pick per attempt, so a retry picks again; skips ejected endpoints; owns the
    # active counts (max_requests, least_request, retry budget) until the body is done. A headless
    # service's requests keep their own destination instead (same counts, nothing to pick).
    handler: Handler
    if cfg.original_destination:
        handler = OriginalDestination(state.load, endpoint_handler, traced).__call__
    else:
        handler = Balancer(
            BalancerConfig.from_service(cfg),
            loads,
            state.load,
            endpoint_handler,
            ejections=state.breakers if breaker is not None else None,
            rng=rng,
            traced=traced,
        ).__call__
    both: Timeouts | None = None
    if timeouts.per_try is not None and timeouts.total is not None:
        # Both timeouts: one layer owns both deadlines (Envoy's router: a route's timeout and
        # its per_try_timeout), entered above the retry layer and again per attempt below it.
        both = Timeouts(timeouts.total, timeouts.per_try, handler, clock, state.stats)
        handler = both.attempt
    elif timeouts.per_try is not None:
        # Per-try timeout inside retry: it bounds one attempt, and its timeout is retryable.
        handler = PerTryTimeout(timeouts.per_try, handler, clock, state.stats).__call__
    if retry is not None and retry.attempts > 0:
        # Retry above the balancer (each attempt re-picks) and below the total timeout (backoff
        # and every attempt count against the deadline).
        handler = Retry(
            retry,
            handler,
            state.load,
            state.stats,
            clock,
            sleep=sleep,
            wall=wall,
            classifier=classify_grpc if cfg.http2 else classify,
        ).__call__
    if both is not None:
        both._inner = handler  # the request's entry, above the retry layer
        handler = both.__call__
    elif timeouts.total is not None:
        # Total timeout outermost: it bounds everything beneath, retries and backoff included.
        handler = TotalTimeout(timeouts.total, handler, clock, state.stats).__call__
    if tracing is not None:
        # The client span outermost: it covers the timeouts, every retry and the backoff.
        handler = tracing.client(handler, cfg.name)
    return handler
