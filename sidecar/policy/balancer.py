"""The load balancer: the bridge from `Handler` (per request) to `EndpointHandler` (per attempt).

For each attempt it admits the attempt against the service's `max_requests`, picks an endpoint
(synchronously), records it in `Request.tried`, and counts it active (per endpoint and per
service) until the response body has been received whole or is discarded, or the attempt fails:
the attempt's reply (`_Attempt`) releases the counts on the way back.

Picking: endpoints the breaker registry calls ejected are skipped; among the rest, endpoints not in
`Request.tried` are preferred, so a retry goes elsewhere when it can. Policies:

- round_robin: the next endpoint in order after the previous pick;
- random: uniform;
- least_request: Envoy's power of two choices: two distinct random candidates, the one with fewer
  active requests wins (the first on a tie).

No endpoint left: 503 flag UH.

`OriginalDestination` is the bridge for a headless service: no balancing, each attempt goes to
the destination the caller chose (the request's authority), admitted and counted the same way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from sidecar.config import Endpoint, LbPolicy, ServiceConfig, authority_endpoint
from sidecar.exchange import EndpointHandler, Reply, Request, Result
from sidecar.flags import Flag, PolicyError, ProxyError
from sidecar.policy.concurrency import ServiceLoad
from sidecar.transport.body import BytesBody


class BalancerError(PolicyError):
    """No endpoint can take the request: 503 UH."""

    FLAG = Flag.NO_HEALTHY_UPSTREAM


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    policy: LbPolicy
    endpoints: tuple[Endpoint, ...]

    @classmethod
    def from_service(cls, cfg: ServiceConfig) -> BalancerConfig:
        return cls(cfg.lb, cfg.endpoints)


class EndpointLoad:
    """Active attempts on one endpoint; survives config pushes (held by `ServiceState`)."""

    __slots__ = ("active", "endpoint")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.active = 0


class _Attempt:
    """One attempt's reply: it releases the attempt's active counts exactly once, when the
    attempt failed or its response body is done.

    No `__init__`: the balancer sets the slots itself (a class with a Python `__init__` is
    called through a second run of the interpreter loop, ~600 instructions per attempt)."""

    __slots__ = ("_endpoint", "_load", "_reply", "_service")

    _endpoint: Endpoint
    _load: EndpointLoad | None  # None for an original destination (no per-endpoint count)
    _service: ServiceLoad | None  # None once released
    _reply: Reply

    def __call__(self, result: Result) -> None:
        if isinstance(result, ProxyError):
            self.release()
        else:
            body = result.body
            if type(body) is BytesBody:
                # A body that came whole is done: released now (`release`, inline).
                service = self._service
                if service is not None:
                    self._service = None
                    load = self._load
                    if load is not None:
                        load.active -= 1
                    service.active -= 1
            else:
                body.when_done(self.release)
            if result.endpoint is None:
                result.endpoint = self._endpoint
        reply = self._reply  # read, then called: see sidecar/policy/stack.py
        reply(result)

    def release(self) -> None:
        service = self._service
        if service is not None:
            self._service = None
            if self._load is not None:
                self._load.active -= 1
            service.active -= 1  # the count `ServiceLoad.admit` raised


class Ejections(Protocol):
    """What the balancer asks the breakers (`sidecar.policy.breaker.BreakerRegistry`)."""

    # Endpoints whose breaker is not closed; empty (the usual case), none is ejected and the
    # balancer asks nothing more.
    unclosed: set[Endpoint]

    def is_ejected(self, endpoint: Endpoint) -> bool: ...


class Balancer:
    __slots__ = (
        "_ejections",
        "_inner",
        "_loads",
        "_next",
        "_policy",
        "_random",
        "_rng",
        "_service",
        "_traced",
    )

    def __init__(
        self,
        config: BalancerConfig,
        loads: Sequence[EndpointLoad],
        service: ServiceLoad,
        inner: EndpointHandler,
        *,
        ejections: Ejections | None = None,
        rng: random.Random | None = None,
        traced: EndpointHandler | None = None,
    ) -> None:
        """`traced`: what a request carrying a trace (`Request.trace`, a sampled one) goes to
        instead of `inner`: the tracing attempt layer over the same `inner`. Unsampled
        requests skip that layer's call."""
        if [load.endpoint for load in loads] != list(config.endpoints):
            raise ValueError("loads must follow config.endpoints, in order")
        self._policy = config.policy
        self._loads = tuple(loads)
        self._service = service
        self._inner = inner
        self._traced = traced or inner
        self._ejections = ejections
        self._rng = rng if rng is not None else random.Random()
        # random() is C; randrange() is Python and two of them cost least_request ~1 µs a pick.
        self._random = self._rng.random if isinstance(self._rng, random.Random) else None
        self._next = 0  # round robin position

    def __call__(self, req: Request, reply: Reply) -> None:
        service = self._service
        loads = self._loads
        ejections = self._ejections
        try:
            if req.tried or not loads or (ejections is not None and ejections.unclosed):
                load = self._pick(req)
            elif len(loads) == 1:  # one endpoint, and it is in: nothing to choose
                load = loads[0]
            else:  # the usual case, a first attempt with every endpoint in: just choose
                load = self._choose(loads, len(loads))
            if service.active < service.max_requests:
                service.active += 1  # `ServiceLoad.admit`'s count, without its call
            else:
                service.admit()  # refuses (503 UO), counted there
        except ProxyError as error:
            reply(error)
            return
        load.active += 1
        endpoint = load.endpoint
        req.tried.append(endpoint)
        req.attempts += 1
        inner = self._inner if req.trace is None else self._traced
        attempt = _Attempt()
        attempt._endpoint = endpoint
        attempt._load = load
        attempt._service = service
        attempt._reply = reply
        inner(req, endpoint, attempt.__call__)

    def _pick(self, req: Request) -> EndpointLoad:
        loads = self._loads
        if not loads:
            raise BalancerError("service has no endpoints")
        ejections = self._ejections
        ejected = ejections.is_ejected if ejections is not None else None
        if not req.tried:
            # A first attempt: no candidate lists unless the choice is ejected.
            load = self._choose(loads, len(loads))
            if ejected is None or not ejected(load.endpoint):
                return load
        tried = req.tried
        usable = [load for load in loads if ejected is None or not ejected(load.endpoint)]
        if not usable:
            raise BalancerError(f"all {len(loads)} endpoints are ejected")
        fresh = [load for load in usable if load.endpoint not in tried] if tried else usable
        pool = fresh or usable
        if self._policy is LbPolicy.ROUND_ROBIN:
            return self._round_robin(pool)
        return self._choose(pool, len(pool))

    def _choose(self, pool: Sequence[EndpointLoad], n: int) -> EndpointLoad:
        policy = self._policy
        if n == 1:
            load = pool[0]
        elif policy is LbPolicy.ROUND_ROBIN:
            load = pool[self._next % n]
            self._next = (self._next + 1) % n
        elif policy is LbPolicy.RANDOM:
            load = pool[self._below(n)]
        else:
            first = self._below(n)
            second = self._below(n - 1)
            if second >= first:
                second += 1
            a, b = pool[first], pool[second]
            load = b if b.active < a.active else a
        return load

    def _below(self, n: int) -> int:
        """A uniform random index in [0, n)."""
        uniform = self._random
        if uniform is not None:
            return int(uniform() * n)
        return self._rng.randrange(n)

    def _round_robin(self, pool: Sequence[EndpointLoad]) -> EndpointLoad:
        # The first endpoint of the pool at or after the round-robin position, so that skipping
        # an ejected or tried endpoint does not shift the rotation of the others.
        loads = self._loads
        n = len(loads)
        start = self._next % n
        members = {id(load) for load in pool}
        for offset in range(n):
            index = (start + offset) % n
            if id(loads[index]) in members:
                self._next = (index + 1) % n
                return loads[index]
        raise AssertionError("round-robin pool is not a subset of the endpoints")


class OriginalDestination:
    """Each attempt to the request's own destination (its original destination when it was
    intercepted, else its authority), counted like a pick."""

    __slots__ = ("_inner", "_service", "_traced")

    def __init__(
        self, service: ServiceLoad, inner: EndpointHandler, traced: EndpointHandler | None = None
    ) -> None:
        self._service = service
        self._inner = inner
        self._traced = traced or inner  # for a request with a trace (see Balancer)

    def __call__(self, req: Request, reply: Reply) -> None:
        # The pod the caller connected to (intercepted), else the one its authority names.
        endpoint = req.destination or authority_endpoint(req.authority)
        service = self._service
        try:
            if endpoint is None:
                raise BalancerError("the request names no destination")
            service.admit()
        except ProxyError as error:
            reply(error)
            return
        req.tried.append(endpoint)
        req.attempts += 1
        inner = self._inner if req.trace is None else self._traced
        attempt = _Attempt()
        attempt._endpoint = endpoint
        attempt._load = None
        attempt._service = service
        attempt._reply = reply
        inner(req, endpoint, attempt.__call__)
