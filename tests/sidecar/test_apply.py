"""Router.apply: a snapshot is applied whole or not at all."""

from __future__ import annotations

import pytest

from mesh.policy import CircuitBreaker
from sidecar.config import (
    ConfigError,
    Endpoint,
    ServiceConfig,
    Snapshot,
)
from sidecar.exchange import Request, Response
from sidecar.policy.stack import ServiceRegistry
from sidecar.routing import Router


async def _never(req: Request, endpoint: Endpoint) -> Response:
    raise AssertionError("no request is forwarded in these tests")


def _service(name: str, breaker: CircuitBreaker) -> ServiceConfig:
    return ServiceConfig(
        name=name,
        namespace="default",
        port=80,
        cluster=f"outbound|80||{name}.default.svc.cluster.local",
        endpoints=(Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)),
        breaker=breaker,
    )


def _snapshot(version: str, *services: ServiceConfig) -> Snapshot:
    return Snapshot(
        version=version,
        services={s.cluster: s for s in services},
        routes={s.name.encode(): s for s in services},
    )


def test_a_refused_snapshot_changes_no_limit_of_the_one_still_serving() -> None:
    services = ServiceRegistry()
    router = Router(services, _never, Endpoint("127.0.0.1", 8080), "frontend")
    good = CircuitBreaker(consecutive_failures=5, max_requests=100, max_pending=100)
    router.apply(_snapshot("v1", _service("a", good), _service("b", good)))
    load, breakers = services.state("a").load, services.state("a").breakers
    before = (load.max_requests, load.max_pending, breakers.config)

    # "a" changes its limits, "b" cannot be applied: neither may take effect.
    tighter = CircuitBreaker(consecutive_failures=1, max_requests=1, max_pending=1)
    broken = CircuitBreaker(consecutive_failures=5, open_for=0.0)
    with pytest.raises(ConfigError, match="open_for must be positive"):
        router.apply(_snapshot("v2", _service("a", tighter), _service("b", broken)))

    assert router.snapshot() is not None and router.snapshot().version == "v1"
    assert (load.max_requests, load.max_pending, breakers.config) == before
