"""Opening a connection to an endpoint, HTTP/1.1 or HTTP/2: bounded, and its failure a ProxyError.

Both pools (`upstream.py::EndpointPool`, `h2upstream.py::H2Pool`) connect through here, so a
connect that fails or times out reads the same for either protocol (flag UF).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sidecar.config import Endpoint
from sidecar.flags import Flag, ProxyError

P = TypeVar("P", bound=asyncio.BaseProtocol)


class UpstreamError(ProxyError):
    """Connecting to, or exchanging with, an upstream endpoint failed."""


async def connect_within(
    connect: Callable[[Callable[[], P], str, int], Awaitable[tuple[asyncio.BaseTransport, P]]],
    factory: Callable[[], P],
    endpoint: Endpoint,
    timeout: float,
) -> P:
    """The protocol of a new connection to `endpoint`; UpstreamError (UF) when it cannot be
    opened within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            _, protocol = await connect(factory, endpoint.host, endpoint.port)
    except TimeoutError:
        raise UpstreamError(
            Flag.UPSTREAM_CONNECT_FAILURE, f"connect to {endpoint} timed out after {timeout:g}s"
        ) from None
    except OSError as exc:
        raise UpstreamError(
            Flag.UPSTREAM_CONNECT_FAILURE, f"connect to {endpoint} failed: {exc.strerror}"
        ) from None
    return protocol
