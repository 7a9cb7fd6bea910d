"""The one response classifier: retries, breakers and metrics agree on what a failure is.

`classify` takes what an attempt produced (a `Response` or a `ProxyError`) and returns an
`Outcome`: its kind (what retry_on tokens match), the status the client would see, and whether an
endpoint breaker counts it as a failure (5xx from the upstream, connect failure, reset, timeout,
bad upstream framing). Local decisions (overflow, no healthy endpoint, exhausted retries) are
neither success nor failure for a breaker: they say nothing about the endpoint.

Outcomes are interned (one object per status or flag), so classifying allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from sidecar.exchange import Response
from sidecar.flags import Flag, ProxyError
from sidecar.protocol.grpc import (
    GRPC_CANCELLED,
    GRPC_DEADLINE_EXCEEDED,
    GRPC_INTERNAL,
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNAVAILABLE,
    grpc_status_of,
)


class Kind(Enum):
    SUCCESS = "success"  # 1xx/2xx/3xx
    CLIENT_ERROR = "client-error"  # 4xx other than 409: the request's fault, not the endpoint's
    RETRIABLE_4XX = "retriable-4xx"  # 409 Conflict
    GATEWAY_ERROR = "gateway-error"  # 502, 503, 504 from the upstream
    SERVER_ERROR = "5xx"  # any other 5xx from the upstream
    CONNECT_FAILURE = "connect-failure"  # UF: nothing reached the upstream
    RESET = "reset"  # UC: reset before the response head
    TIMEOUT = "timeout"  # UT: the attempt (or the request) ran out of time
    PROTOCOL_ERROR = "protocol-error"  # UPE: the upstream sent bad framing
    LOCAL = "local"  # a local decision (UO, UH, URX, ...): says nothing about the endpoint
    # gRPC statuses that came before any message (HTTP/2 services only, `classify_grpc`)
    GRPC_CANCELLED = "cancelled"
    GRPC_DEADLINE_EXCEEDED = "deadline-exceeded"
    GRPC_INTERNAL = "internal"
    GRPC_RESOURCE_EXHAUSTED = "resource-exhausted"
    GRPC_UNAVAILABLE = "unavailable"
    GRPC_ERROR = "grpc-error"  # any other non-OK status: the call's own outcome


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    status: int  # the status the client sees (the upstream's, or the flag's)
    breaker_failure: bool  # counts towards an endpoint breaker's consecutive failures
    flag: Flag | None = None  # set for errors
    # kind is SUCCESS: a field, not a property (outcomes are interned; a property is a Python
    # call on every read, and retries and tracing read it per attempt)
    success: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "success", self.kind is Kind.SUCCESS)


_GATEWAY_STATUSES = frozenset({502, 503, 504})

_ERROR_KINDS: dict[Flag, Kind] = {
    Flag.UPSTREAM_CONNECT_FAILURE: Kind.CONNECT_FAILURE,
    Flag.UPSTREAM_RESET: Kind.RESET,
    Flag.UPSTREAM_TIMEOUT: Kind.TIMEOUT,
    Flag.UPSTREAM_PROTOCOL_ERROR: Kind.PROTOCOL_ERROR,
}

_ENDPOINT_FAILURES = frozenset(
    {Kind.CONNECT_FAILURE, Kind.RESET, Kind.TIMEOUT, Kind.PROTOCOL_ERROR}
)


# What `classify` says of an upstream response, by its status alone, for the layers that skip
# the call on their common path (a good answer): below SUCCESS_BELOW it is a success, and from
# FAILURE_FROM on an endpoint breaker's failure. An HTTP/2 service's gRPC answers are the
# exception (`classify_grpc`: a 200 may carry a failing grpc-status).
SUCCESS_BELOW = 400
FAILURE_FROM = 500


def _status_outcome(status: int) -> Outcome:
    if status < SUCCESS_BELOW:
        return Outcome(Kind.SUCCESS, status, breaker_failure=False)
    if status == 409:
        return Outcome(Kind.RETRIABLE_4XX, status, breaker_failure=False)
    if status < FAILURE_FROM:
        return Outcome(Kind.CLIENT_ERROR, status, breaker_failure=False)
    if status in _GATEWAY_STATUSES:
        return Outcome(Kind.GATEWAY_ERROR, status, breaker_failure=True)
    return Outcome(Kind.SERVER_ERROR, status, breaker_failure=True)


_BY_STATUS: dict[int, Outcome] = {status: _status_outcome(status) for status in range(100, 600)}

_BY_FLAG: dict[tuple[Flag, int], Outcome] = {}


def _error_outcome(flag: Flag, status: int) -> Outcome:
    kind = _ERROR_KINDS.get(flag, Kind.LOCAL)
    return Outcome(kind, status, breaker_failure=kind in _ENDPOINT_FAILURES, flag=flag)


# An attempt cut short by its deadline (the outcome of the timeouts' UpstreamTimeoutError).
TIMEOUT = _BY_FLAG[(Flag.UPSTREAM_TIMEOUT, 504)] = _error_outcome(Flag.UPSTREAM_TIMEOUT, 504)


GRPC_KINDS = frozenset(
    {
        Kind.GRPC_CANCELLED,
        Kind.GRPC_DEADLINE_EXCEEDED,
        Kind.GRPC_INTERNAL,
        Kind.GRPC_RESOURCE_EXHAUSTED,
        Kind.GRPC_UNAVAILABLE,
    }
)

_GRPC_KIND_BY_CODE = {
    GRPC_CANCELLED: Kind.GRPC_CANCELLED,
    GRPC_DEADLINE_EXCEEDED: Kind.GRPC_DEADLINE_EXCEEDED,
    GRPC_INTERNAL: Kind.GRPC_INTERNAL,
    GRPC_RESOURCE_EXHAUSTED: Kind.GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNAVAILABLE: Kind.GRPC_UNAVAILABLE,
}

# UNAVAILABLE and INTERNAL say the endpoint is in trouble (Istio's and gRPC's outlier view);
# the rest are the call's own outcome.
_GRPC_ENDPOINT_FAILURES = frozenset({GRPC_UNAVAILABLE, GRPC_INTERNAL})

_BY_GRPC_CODE: dict[int, Outcome] = {
    code: Outcome(
        _GRPC_KIND_BY_CODE.get(code, Kind.GRPC_ERROR),
        200,
        breaker_failure=code in _GRPC_ENDPOINT_FAILURES,
    )
    for code in range(1, 17)
}


def classify_grpc(result: Response | ProxyError) -> Outcome:
    """`classify` for an HTTP/2 service: a gRPC answer whose status is known before any
    message was forwarded is classified by that status: a trailers-only answer (grpc-status
    in the head, no body), or a head held until its trailers came with no message between
    (the body's `grpc_status`, sidecar/transport/h2upstream.py). A status in trailers after
    messages is not known here: those were on their way, nothing may be retried by then (the
    breaker reads it when the body ends: `grpc_end_outcome`)."""
    if isinstance(result, Response) and result.status == 200:
        if result.has_body:
            code = getattr(result.body, "grpc_status", None)
        else:
            code = grpc_status_of(result.headers)
        if code:
            outcome = _BY_GRPC_CODE.get(code)
            if outcome is not None:
                return outcome
    return classify(result)


@runtime_checkable
class GrpcBody(Protocol):
    """A response body from an HTTP/2 upstream (sidecar/transport/h2upstream.py::H2Body): the
    grpc-status of its trailers once they came, and how it ended."""

    grpc_status: int | None

    @property
    def finished(self) -> bool: ...

    @property
    def failed(self) -> bool: ...

    def when_done(self, callback: Callable[[], None]) -> None: ...


# How a gRPC response body that did not end whole ended: reset by the upstream after its head,
# or discarded (the client left: no verdict).
_RESET_AFTER_HEAD = Outcome(Kind.RESET, 200, breaker_failure=True, flag=Flag.UPSTREAM_RESET)
_DISCARDED = _error_outcome(Flag.DOWNSTREAM_DISCONNECT, 499)


def grpc_end_outcome(grpc_status: int | None, finished: bool, failed: bool) -> Outcome:
    """What a gRPC response's end says about its endpoint: the grpc-status of its trailers
    once the body ended whole, a reset when it failed, no verdict when it was discarded."""
    if finished:
        outcome = _BY_GRPC_CODE.get(grpc_status) if grpc_status else None
        return outcome if outcome is not None else _BY_STATUS[200]
    return _RESET_AFTER_HEAD if failed else _DISCARDED


def classify(result: Response | ProxyError) -> Outcome:
    """What an attempt's result means for retries, breakers and metrics."""
    if isinstance(result, Response):
        outcome = _BY_STATUS.get(result.status)
        # Statuses outside 100..599 are rejected by the codec; classify them anyway.
        return outcome if outcome is not None else _status_outcome(result.status)
    key = (result.flag, result.status)
    outcome = _BY_FLAG.get(key)
    if outcome is None:
        outcome = _BY_FLAG[key] = _error_outcome(result.flag, result.status)
    return outcome
