import pytest

from mesh.policy import CircuitBreaker
from sidecar.policy.balancer import Balancer
from sidecar.policy.breaker import Breaker
from sidecar.policy.retry import Retry
from sidecar.policy.stack import ServiceRegistry, ServiceState, build_service_stack
from sidecar.policy.timeout import PerTryTimeout, Timeouts, TotalTimeout
from tests.sidecar.policy.fakes import EP, FakeUpstream, service


def layer(handler: object) -> object:
    """The layer object behind a handler (the stack hands layers on as bound methods)."""
    return getattr(handler, "__self__", handler)


def chain(handler: object) -> list[type]:
    layers = []
    while handler is not None and not isinstance(layer(handler), FakeUpstream):
        # `Timeouts` is entered twice: `__call__` (inner: `_inner`), `attempt` (`_attempt_inner`)
        inner = "_attempt_inner" if getattr(handler, "__name__", "") == "attempt" else "_inner"
        handler = layer(handler)
        layers.append(type(handler))
        handler = getattr(handler, inner, None)
    return layers


def test_without_policy_the_stack_is_only_the_balancer_over_the_forwarder() -> None:
    upstream = FakeUpstream()
    handler = build_service_stack(service(), ServiceState("svc"), upstream)
    assert chain(handler) == [Balancer]
    assert layer(layer(handler)._inner) is upstream  # type: ignore[attr-defined]


def test_zero_retry_attempts_build_no_retry_layer() -> None:
    handler = build_service_stack(service(attempts=0), ServiceState("svc"), FakeUpstream())
    assert chain(handler) == [Balancer]


def test_full_policy_composes_layers_outer_to_inner() -> None:
    cfg = service(timeout=2.0, attempts=2, per_try_timeout=0.5, consecutive_failures=5)
    handler = build_service_stack(cfg, ServiceState("svc"), FakeUpstream())
    # One timeout layer owns both deadlines: entered above the retries and per attempt below.
    assert chain(handler) == [Timeouts, Retry, Timeouts, Balancer, Breaker]


def test_a_single_timeout_builds_its_own_layer() -> None:
    total = build_service_stack(service(timeout=2.0, attempts=2), ServiceState("a"), FakeUpstream())
    assert chain(total) == [TotalTimeout, Retry, Balancer]
    per_try = service(attempts=2, per_try_timeout=0.5)
    assert chain(build_service_stack(per_try, ServiceState("b"), FakeUpstream())) == [
        Retry,
        PerTryTimeout,
        Balancer,
    ]


def test_invalid_policy_values_are_refused_naming_the_setting() -> None:
    cfg = service(consecutive_failures=0)
    with pytest.raises(ValueError, match="consecutive_failures"):
        build_service_stack(cfg, ServiceState("svc"), FakeUpstream())
    with pytest.raises(ValueError, match="timeout"):
        build_service_stack(service(timeout=0.0), ServiceState("svc"), FakeUpstream())


def test_registry_keeps_one_state_per_service() -> None:
    registry = ServiceRegistry()
    state = registry.state("payments")
    assert registry.state("payments") is state
    assert registry.get("orders") is None
    registry.state("orders")
    registry.retain(["orders"])
    assert registry.get("payments") is None
    assert [s.name for s in registry] == ["orders"]


def test_turning_the_breaker_off_forgets_breakers() -> None:
    state = ServiceState("svc")
    build_service_stack(service(consecutive_failures=1), state, FakeUpstream())
    assert state.breakers.breaker(EP[0]) is not None
    cfg = service()
    assert cfg.breaker == CircuitBreaker(max_ejection_percent=100)
    build_service_stack(cfg, state, FakeUpstream())
    assert state.breakers.breaker(EP[0]) is None
