import asyncio

import pytest

from mesh.policy import Backoff
from sidecar.config import ServiceConfig
from sidecar.exchange import Response
from sidecar.flags import Flag
from sidecar.policy.deadline import TICK, call_at
from sidecar.policy.stack import ServiceState, build_service_stack
from sidecar.policy.timeout import UpstreamTimeoutError
from tests.sidecar.policy.fakes import EP, FakeUpstream, Hang, Reply, outcome_of, request, service


def stack(cfg: ServiceConfig, upstream: FakeUpstream) -> tuple[object, ServiceState]:
    state = ServiceState(cfg.name)
    return build_service_stack(cfg, state, upstream), state


async def test_no_timeout_configured_leaves_the_deadline_unset() -> None:
    upstream = FakeUpstream()
    handler, _ = stack(service(), upstream)
    await outcome_of(handler, request())
    assert upstream.calls[0].deadline is None


async def test_total_timeout_sets_the_deadline_the_forwarder_sees() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    handler, _ = stack(service(timeout=2.0), upstream)
    start = loop.time()
    await outcome_of(handler, request())
    assert upstream.calls[0].deadline == pytest.approx(start + 2.0)


async def test_an_earlier_deadline_already_on_the_request_is_kept() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    handler, _ = stack(service(timeout=2.0), upstream)
    req = request()
    req.deadline = loop.time() + 0.5
    await outcome_of(handler, req)
    assert upstream.calls[0].deadline == req.deadline


async def test_total_timeout_answers_504_ut_and_cancels_the_attempt() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream(default=Hang())
    handler, state = stack(service(timeout=1.0), upstream)
    start = loop.time()
    err = await outcome_of(handler, request())
    assert isinstance(err, UpstreamTimeoutError)
    assert (err.flag, err.status) == (Flag.UPSTREAM_TIMEOUT, 504)
    assert loop.time() - start == pytest.approx(1.0)
    assert upstream.calls[0].cancelled
    assert state.stats.timeouts == 1
    assert state.load.active == 0


async def test_total_timeout_holds_across_retries_and_backoff() -> None:
    # Each attempt takes 0.3s and backoff up to 0.2s: five retries would need ~2.5s.
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream(default=Reply(503, delay=0.3))
    cfg = service(timeout=1.0, attempts=5, backoff=Backoff(base=0.2, max=0.2))
    handler, state = stack(cfg, upstream)
    start = loop.time()
    err = await outcome_of(handler, request())
    assert isinstance(err, UpstreamTimeoutError) and err.status == 504
    assert loop.time() - start == pytest.approx(1.0)
    assert 2 <= len(upstream.calls) < 6
    assert state.load.retries_active == 0 and state.load.active == 0


async def test_per_try_timeout_makes_an_attempt_retryable() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    upstream.script(EP[0], Hang())
    cfg = service(attempts=2, per_try_timeout=0.5, timeout=5.0)
    handler, state = stack(cfg, upstream)
    start = loop.time()
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 200
    first, second = upstream.calls
    assert first.cancelled
    assert first.deadline == pytest.approx(start + 0.5)  # the attempt's deadline, not the total
    assert second.started - start >= 0.5
    assert state.stats.per_try_timeouts == 1


async def test_per_try_timeout_is_not_retried_when_retry_on_excludes_timeouts() -> None:
    upstream = FakeUpstream(default=Hang())
    cfg = service(attempts=2, per_try_timeout=0.5, retry_on=["connect-failure"])
    handler, _ = stack(cfg, upstream)
    err = await outcome_of(handler, request())
    assert isinstance(err, UpstreamTimeoutError) and err.status == 504
    assert len(upstream.calls) == 1


async def test_post_is_not_retried_after_a_per_try_timeout() -> None:
    upstream = FakeUpstream(default=Hang())
    handler, _ = stack(service(attempts=2, per_try_timeout=0.5), upstream)
    err = await outcome_of(handler, request(b"POST"))
    assert isinstance(err, UpstreamTimeoutError)
    assert len(upstream.calls) == 1


async def test_per_try_timeout_restores_the_total_deadline_between_attempts() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    upstream.script(EP[0], Hang())
    handler, _ = stack(service(attempts=1, per_try_timeout=0.5, timeout=5.0), upstream)
    req = request()
    start = loop.time()
    await outcome_of(handler, req)
    assert req.deadline == pytest.approx(start + 5.0)


async def test_a_timeout_fires_when_the_requests_before_it_in_its_tick_were_answered() -> None:
    # The layer keeps adding to the wheel's bucket of its last deadline. Here every request
    # before the last was answered at once, so that bucket is empty when an earlier tick of
    # the wheel fires; the last request, which hangs, is added to it after that and must
    # still get its 504.
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    handler, state = stack(service(timeout=1.0), upstream)
    await asyncio.sleep(0.997)
    await outcome_of(handler, request())  # answered: the fresh bucket is empty again
    fired: list[float] = []
    call_at(loop.time() + 0.002, lambda: fired.append(loop.time()))  # an earlier tick
    await asyncio.sleep(0.003)
    assert fired, "the earlier tick fired"
    upstream.default = Hang()
    start = loop.time()
    err = await asyncio.wait_for(outcome_of(handler, request()), 5.0)
    assert isinstance(err, UpstreamTimeoutError)
    assert loop.time() - start == pytest.approx(1.0, abs=2 * TICK)
    assert state.stats.timeouts == 1


async def test_with_a_per_try_timeout_the_total_still_bounds_the_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One layer owns both deadlines and arms only the attempt's while one runs. Every backoff
    # here is its longest, 0.5s: attempts at 0 and 0.7 end at their per-try timeouts (0.2 and
    # 0.9) and the request's deadline (1.0) falls in the second backoff.
    monkeypatch.setattr("random.uniform", lambda low, high: high)
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream(default=Hang())
    backoff = Backoff(base=0.5, max=0.5)
    cfg = service(timeout=1.0, attempts=5, per_try_timeout=0.2, backoff=backoff)
    handler, state = stack(cfg, upstream)
    start = loop.time()
    req = request()
    err = await asyncio.wait_for(outcome_of(handler, req), 5.0)
    assert isinstance(err, UpstreamTimeoutError) and "request timeout" in str(err)
    assert loop.time() - start == pytest.approx(1.0, abs=2 * TICK)
    assert [call.started - start for call in upstream.calls] == pytest.approx([0, 0.7], abs=TICK)
    assert state.stats.timeouts == 1 and state.stats.per_try_timeouts == 2
    assert req.deadline == pytest.approx(start + 1.0)
    assert state.load.retries_active == 0 and state.load.active == 0


async def test_with_both_timeouts_the_total_interrupts_an_attempt() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream(default=Hang())
    handler, state = stack(service(timeout=0.3, attempts=2, per_try_timeout=1.0), upstream)
    start = loop.time()
    err = await asyncio.wait_for(outcome_of(handler, request()), 5.0)
    assert isinstance(err, UpstreamTimeoutError) and "request timeout" in str(err)
    assert loop.time() - start == pytest.approx(0.3, abs=2 * TICK)
    assert upstream.calls[0].deadline == pytest.approx(start + 0.3)
    assert len(upstream.calls) == 1 and state.stats.per_try_timeouts == 0
