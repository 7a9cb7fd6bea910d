"""Response flags: two or three letters that name what went wrong, as Envoy spells them.

Every locally generated error carries one. The same letters appear in the `x-outrigger-flags`
response header, the plain-text body, the access log, the span and the metrics.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Flag(StrEnum):
    UPSTREAM_CONNECT_FAILURE = "UF"
    UPSTREAM_OVERFLOW = "UO"
    UPSTREAM_TIMEOUT = "UT"
    RETRIES_EXHAUSTED = "URX"
    NO_HEALTHY_UPSTREAM = "UH"
    UPSTREAM_RESET = "UC"
    NO_ROUTE = "NR"
    DOWNSTREAM_DISCONNECT = "DC"
    UPSTREAM_PROTOCOL_ERROR = "UPE"
    DOWNSTREAM_PROTOCOL_ERROR = "DPE"
    # An HTTP/2 stream, a tunnel or a passed-through TCP connection idle past its timeout
    STREAM_IDLE_TIMEOUT = "SI"


# The status a locally generated response carries for each flag.
STATUS_FOR_FLAG: dict[Flag, int] = {
    Flag.UPSTREAM_CONNECT_FAILURE: 503,
    Flag.UPSTREAM_OVERFLOW: 503,
    Flag.UPSTREAM_TIMEOUT: 504,
    Flag.RETRIES_EXHAUSTED: 503,
    Flag.NO_HEALTHY_UPSTREAM: 503,
    Flag.UPSTREAM_RESET: 503,
    Flag.NO_ROUTE: 502,
    Flag.DOWNSTREAM_DISCONNECT: 499,
    Flag.UPSTREAM_PROTOCOL_ERROR: 502,
    Flag.DOWNSTREAM_PROTOCOL_ERROR: 400,
    Flag.STREAM_IDLE_TIMEOUT: 408,
}


class ProxyError(Exception):
    """Base of every error the request path turns into a local response.

    Each policy module subclasses it (through `PolicyError`) with its own error type; the server
    is the one place that turns a ProxyError into a response (status from the flag unless given,
    body naming the flag).
    """

    def __init__(self, flag: Flag, detail: str, status: int | None = None) -> None:
        super().__init__(f"{flag.value}: {detail}")
        self.flag = flag
        self.detail = detail
        self.status = STATUS_FOR_FLAG[flag] if status is None else status


class PolicyError(ProxyError):
    """A policy module's error: its flag is its class's `FLAG`, so it is raised with the detail
    alone (`BalancerError("service has no endpoints")`)."""

    FLAG: ClassVar[Flag]

    def __init__(self, detail: str) -> None:
        super().__init__(self.FLAG, detail)
