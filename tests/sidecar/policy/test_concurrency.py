import asyncio

import pytest

from sidecar.exchange import Response
from sidecar.flags import Flag
from sidecar.policy.concurrency import ConcurrencyConfig, ConcurrencyError, ServiceLoad
from sidecar.policy.stack import ServiceState, build_service_stack
from sidecar.policy.stats import ServiceStats
from tests.sidecar.policy.fakes import FakeUpstream, call, drain, outcome_of, request, service


async def test_overflow_answers_immediately_with_uo() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    state = ServiceState("svc")
    handler = build_service_stack(service(max_requests=2), state, upstream)
    held = [
        await call(handler, request()),
        await call(handler, request()),
    ]  # bodies unread: still active
    start = loop.time()
    err = await outcome_of(handler, request())
    assert isinstance(err, ConcurrencyError)
    assert (err.flag, err.status) == (Flag.UPSTREAM_OVERFLOW, 503)
    assert loop.time() == start
    assert len(upstream.calls) == 2
    assert state.stats.overflows == 1
    await drain(held[0])
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response)


async def test_overflow_is_not_retried() -> None:
    upstream = FakeUpstream()
    state = ServiceState("svc")
    cfg = service(max_requests=1, attempts=3, retry_on=["5xx", "reset", "connect-failure"])
    handler = build_service_stack(cfg, state, upstream)
    held = await call(handler, request())
    err = await outcome_of(handler, request())
    assert isinstance(err, ConcurrencyError)
    assert state.stats.retries == 0
    held.discard()
    assert state.load.active == 0


def test_pending_slots_are_bounded_and_released() -> None:
    stats = ServiceStats()
    load = ServiceLoad(stats, ConcurrencyConfig(max_requests=10, max_pending=1))
    with load.pending_slot():
        assert load.pending == 1
        with pytest.raises(ConcurrencyError), load.pending_slot():
            pass
        assert load.pending == 1
    assert load.pending == 0
    assert stats.overflows == 1
    with load.pending_slot():
        assert load.pending == 1


def test_a_config_push_changes_the_limits_of_the_live_load() -> None:
    state = ServiceState("svc")
    build_service_stack(service(max_requests=5, max_pending=7), state, FakeUpstream())
    assert (state.load.max_requests, state.load.max_pending) == (5, 7)
    build_service_stack(service(max_requests=50, max_pending=70), state, FakeUpstream())
    assert (state.load.max_requests, state.load.max_pending) == (50, 70)
