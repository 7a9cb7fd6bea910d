"""Per-endpoint gauges on /stats/prometheus, end to end: client -> in-process sidecar -> upstreams.

`outrigger_endpoint_breaker_state` (0 closed, 1 open, 2 half-open) and
`outrigger_endpoint_active_requests`, labelled by destination and endpoint. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.sidecar.resilience_fixtures import (
    WAIT,
    Proxy,
    Respond,
    Stall,
    always,
    mesh,
    running_sidecar,
    upstreams,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

UNAVAILABLE = Respond(503, b"unavailable")


async def gauge(proxy: Proxy, name: str, endpoint: str, destination: str = "payments") -> float:
    text = await proxy.prometheus()
    labels = f'destination="{destination}",endpoint="{endpoint}"'
    match = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    assert match is not None, f"{name}{{{labels}}} not exported"
    return float(match.group(1))


async def test_breaker_state_and_active_requests_per_endpoint() -> None:
    def flaky(n: int) -> Respond | Stall:
        return UNAVAILABLE if n < 2 else Stall()  # two failures trip it; the probe hangs

    breaker = {"consecutive_failures": 2, "open_for": "200ms", "max_ejection_percent": 50}
    async with (
        upstreams(flaky, always(Respond())) as [bad, good],
        running_sidecar(mesh([bad.address, good.address], {"circuit_breaker": breaker})) as proxy,
    ):
        state, active = "outrigger_endpoint_breaker_state", "outrigger_endpoint_active_requests"
        assert await gauge(proxy, state, bad.address) == 0
        assert await gauge(proxy, active, bad.address) == 0

        # Round robin: requests 1 and 3 fail on `bad`, which ejects it.
        statuses = [(await proxy.request()).status_code for _ in range(4)]
        assert statuses == [503, 200, 503, 200]
        assert await gauge(proxy, state, bad.address) == 1
        assert await gauge(proxy, state, good.address) == 0

        # Time served: the next request to `bad` is the probe, which stalls there (half-open).
        await asyncio.sleep(0.25)
        probes = [asyncio.create_task(proxy.request(timeout=WAIT)) for _ in range(2)]
        await wait_for(lambda: bad.active == 1)
        assert await gauge(proxy, state, bad.address) == 2
        assert await gauge(proxy, active, bad.address) == 1
        assert await gauge(proxy, active, good.address) == 0
        bad.release.set()
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*probes)
        assert [r.status_code for r in results] == [200, 200]
        assert await gauge(proxy, state, bad.address) == 0  # the probe succeeded: closed
        assert await gauge(proxy, active, bad.address) == 0
