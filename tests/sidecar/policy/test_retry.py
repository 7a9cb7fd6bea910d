import asyncio
import random
from email.utils import formatdate

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tenacity import RetryCallState

from mesh.policy import Backoff, RetryBudget
from sidecar.config import LbPolicy, RetryPolicy, ServiceConfig
from sidecar.exchange import Reply as Answer
from sidecar.exchange import Request, Response
from sidecar.flags import Flag, ProxyError
from sidecar.policy.retry import RetryConfig, RetryError, parse_retry_after
from sidecar.policy.stack import ServiceState, build_service_stack
from tests.sidecar.policy.fakes import (
    EP,
    Fail,
    FakeUpstream,
    FirstChoice,
    MemoryResponseBody,
    Reply,
    drain,
    outcome_of,
    request,
    service,
)

UF = Fail(Flag.UPSTREAM_CONNECT_FAILURE)
UC = Fail(Flag.UPSTREAM_RESET)


def stack(cfg: ServiceConfig, upstream: FakeUpstream, **kw: object) -> tuple[object, ServiceState]:
    state = ServiceState(cfg.name)
    return build_service_stack(cfg, state, upstream, **kw), state  # type: ignore[arg-type]


async def test_get_is_retried_on_503_and_gets_the_next_answer() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503))
    handler, state = stack(service(attempts=2), upstream)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 200
    assert len(upstream.calls) == 2
    assert upstream.bodies[0].discarded
    assert state.stats.retries == 1


async def test_post_is_not_retried_on_503() -> None:
    upstream = FakeUpstream(default=Reply(503))
    handler, state = stack(service(attempts=2), upstream)
    resp = await outcome_of(handler, request(b"POST"))
    assert isinstance(resp, Response) and resp.status == 503
    assert len(upstream.calls) == 1
    assert resp.flags == []
    assert state.stats.retries == 0


async def test_patch_is_not_retried_after_reset() -> None:
    upstream = FakeUpstream(default=UC)
    handler, _ = stack(service(attempts=2), upstream)
    err = await outcome_of(handler, request(b"PATCH"))
    assert isinstance(err, ProxyError) and err.flag is Flag.UPSTREAM_RESET
    assert len(upstream.calls) == 1


async def test_post_with_idempotency_key_is_retried_on_503() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503))
    handler, _ = stack(service(attempts=2), upstream)
    req = request(b"POST", [(b"idempotency-key", b"k-1")])
    resp = await outcome_of(handler, req)
    assert isinstance(resp, Response) and resp.status == 200
    assert len(upstream.calls) == 2


async def test_post_is_retried_when_the_policy_allows_non_idempotent_retries() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503))
    handler, _ = stack(service(attempts=2, non_idempotent=True), upstream)
    resp = await outcome_of(handler, request(b"POST"))
    assert isinstance(resp, Response) and resp.status == 200
    assert len(upstream.calls) == 2


async def test_post_is_retried_on_connect_failure_and_the_flag_is_recorded() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], UF)
    handler, _ = stack(service(attempts=2), upstream)
    req = request(b"POST")
    resp = await outcome_of(handler, req)
    assert isinstance(resp, Response) and resp.status == 200
    assert len(upstream.calls) == 2
    assert req.flags == [Flag.UPSTREAM_CONNECT_FAILURE]


async def test_non_replayable_body_is_not_retried_even_on_connect_failure() -> None:
    upstream = FakeUpstream(default=UF)
    handler, _ = stack(service(attempts=2), upstream)
    err = await outcome_of(handler, request(b"PUT", replayable=False, body=b"streamed"))
    assert isinstance(err, ProxyError) and err.flag is Flag.UPSTREAM_CONNECT_FAILURE
    assert len(upstream.calls) == 1


async def test_exhausted_attempts_on_an_error_raise_urx() -> None:
    upstream = FakeUpstream(default=UF)
    handler, state = stack(service(attempts=2), upstream)
    err = await outcome_of(handler, request())
    assert isinstance(err, RetryError)
    assert (err.flag, err.status) == (Flag.RETRIES_EXHAUSTED, 503)
    assert isinstance(err.__cause__, ProxyError)
    assert len(upstream.calls) == 3
    assert state.stats.retries_exhausted == 1


async def test_exhausted_attempts_on_a_status_return_it_flagged_urx() -> None:
    upstream = FakeUpstream(default=Reply(503))
    handler, state = stack(service(attempts=2), upstream)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 503
    assert resp.flags == [Flag.RETRIES_EXHAUSTED]
    assert len(upstream.calls) == 3
    discarded = [body.discarded for body in upstream.bodies]
    assert discarded == [True, True, False]
    assert state.load.active == 1  # the returned response still holds its attempt
    await drain(resp)
    assert state.load.active == 0


async def test_status_outside_retry_on_is_returned_unretried() -> None:
    upstream = FakeUpstream(default=Reply(500))
    handler, _ = stack(service(attempts=2, retry_on=["gateway-error"]), upstream)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 500
    assert len(upstream.calls) == 1


async def test_explicit_status_code_is_retried() -> None:
    upstream = FakeUpstream(default=Reply(500))
    handler, _ = stack(service(attempts=1, retry_on=[], statuses=[500]), upstream)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.flags == [Flag.RETRIES_EXHAUSTED]
    assert len(upstream.calls) == 2


async def test_409_is_retried_with_retriable_4xx() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(409))
    handler, _ = stack(service(attempts=1, retry_on=["retriable-4xx"]), upstream)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 200


async def test_retry_prefers_an_endpoint_not_tried() -> None:
    # The rng always picks the first candidate: without the preference the retry would go
    # back to EP[0].
    upstream = FakeUpstream()
    upstream.always(EP[0], Reply(503))
    cfg = service(attempts=2, lb=LbPolicy.RANDOM)
    handler, _ = stack(cfg, upstream, rng=FirstChoice())
    req = request()
    resp = await outcome_of(handler, req)
    assert isinstance(resp, Response) and resp.status == 200
    assert upstream.endpoints_called() == [EP[0], EP[1]]
    assert req.tried == [EP[0], EP[1]]
    assert req.attempts == 2


async def test_backoff_between_retries_is_full_jitter_within_the_exponential_cap() -> None:
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    upstream = FakeUpstream(default=Reply(503))
    cfg = service(attempts=6, backoff=Backoff(base=0.1, max=1.0))
    handler, _ = stack(cfg, upstream, sleep=sleep)
    await outcome_of(handler, request())
    assert len(sleeps) == 6
    for n, delay in enumerate(sleeps):
        assert 0 <= delay <= min(1.0, 0.1 * 2**n)


def retry_state(config: RetryConfig, attempts_done: int) -> RetryCallState:
    state = RetryCallState(config.retrying, None, (), {})
    state.attempt_number = attempts_done
    return state


@given(
    base=st.floats(0.001, 1.0),
    factor=st.floats(1.0, 100.0),
    n=st.integers(0, 40),
)
def test_backoff_is_bounded_by_zero_and_min_of_max_and_base_times_two_to_the_n(
    base: float, factor: float, n: int
) -> None:
    policy = RetryPolicy(
        attempts=3,
        retry_on=frozenset(["5xx"]),
        retriable_status=frozenset(),
        backoff=Backoff(base=base, max=base * factor),
    )
    config = RetryConfig.from_policy(policy)
    delay = config.backoff(retry_state(config, n + 1))
    assert 0 <= delay <= min(base * factor, base * 2**n) * (1 + 1e-9)


def test_backoff_is_jittered_across_the_whole_range() -> None:
    policy = RetryPolicy(3, frozenset(["5xx"]), frozenset(), backoff=Backoff(0.1, 10.0))
    config = RetryConfig.from_policy(policy)
    random.seed(1234)
    delays = [config.backoff(retry_state(config, 4)) for _ in range(400)]  # cap 0.8
    assert min(delays) < 0.1 and max(delays) > 0.7


async def test_retry_after_seconds_is_honoured_within_the_deadline() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503, ((b"retry-after", b"2"),)))
    handler, _ = stack(service(attempts=1, timeout=10.0), upstream)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 200
    first, second = upstream.calls
    assert second.started - first.started == pytest.approx(2.0)


async def test_retry_after_http_date_is_honoured() -> None:
    wall_now = 1_700_000_000.0
    upstream = FakeUpstream()
    date = formatdate(wall_now + 3, usegmt=True).encode()
    upstream.script(EP[0], Reply(503, ((b"retry-after", date),)))
    handler, _ = stack(service(attempts=1, timeout=10.0), upstream, wall=lambda: wall_now)
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 200
    first, second = upstream.calls
    assert second.started - first.started == pytest.approx(3.0)


async def test_retry_after_beyond_the_deadline_returns_the_response_without_retrying() -> None:
    loop = asyncio.get_running_loop()
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503, ((b"retry-after", b"5"),)))
    handler, _ = stack(service(attempts=2, timeout=1.0), upstream)
    start = loop.time()
    resp = await outcome_of(handler, request())
    assert isinstance(resp, Response) and resp.status == 503
    assert resp.flags == []
    assert len(upstream.calls) == 1
    assert loop.time() == start


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after(b"120", 0.0) == 120.0
    assert parse_retry_after(b"Thu, 01 Jan 1970 00:01:40 GMT", 40.0) == 60.0
    assert parse_retry_after(b"Thu, 01 Jan 1970 00:01:40 GMT", 500.0) == 0.0
    assert parse_retry_after(b"soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None


async def test_retry_budget_refuses_retries_beyond_min_concurrency() -> None:
    # Ten requests fail at the same moment; a budget of 2 retries in flight lets two of them
    # retry (twice each: a finished retry frees its place) and returns the others' 503 as is.
    upstream = FakeUpstream(default=Reply(503, delay=1.0))
    cfg = service(attempts=2, budget=RetryBudget(percent=0.0, min_concurrency=2))
    handler, state = stack(cfg, upstream)
    results = await asyncio.gather(*(outcome_of(handler, request()) for _ in range(10)))
    assert all(isinstance(r, Response) and r.status == 503 for r in results)
    assert len(upstream.calls) == 10 + 2 + 2
    assert state.stats.budget_exhausted == 8
    assert state.load.retries_active == 0


async def test_without_a_budget_every_request_retries() -> None:
    upstream = FakeUpstream(default=Reply(503, delay=1.0))
    handler, state = stack(service(attempts=2), upstream)
    await asyncio.gather(*(outcome_of(handler, request()) for _ in range(10)))
    assert len(upstream.calls) == 30
    assert state.stats.budget_exhausted == 0


async def test_budget_keeps_load_multiplication_bounded_across_three_hops() -> None:
    async def calls_per_request(budget: RetryBudget | None, clients: int) -> float:
        upstream = FakeUpstream(default=Reply(503, delay=0.01))
        handler: object = upstream
        states = []
        for hop in range(3):
            cfg = service(attempts=2, budget=budget, backoff=Backoff(0.001, 0.002))
            state = ServiceState(f"hop{hop}")
            states.append(state)
            forward = upstream if hop == 0 else proxy_to(handler)
            handler = build_service_stack(cfg, state, forward)
        results = await asyncio.gather(*(outcome_of(handler, request()) for _ in range(clients)))
        for result in results:
            assert isinstance(result, Response) and result.status == 503
            await drain(result)
        assert all(state.load.active == 0 for state in states)
        return len(upstream.calls) / clients

    # Every hop retries twice: 3 x 3 x 3 upstream calls per client request without a budget.
    # With 20% (and a floor of 3 retries in flight, which lets a lone request retry fully)
    # each hop adds about a fifth under load, so the product stays near 1.2**3.
    assert await calls_per_request(None, 200) == 27.0
    bounded = await calls_per_request(RetryBudget(percent=20.0, min_concurrency=3), 200)
    assert bounded < 3.0


def proxy_to(handler: object):  # type: ignore[no-untyped-def]
    """A forwarder that sends each attempt through the next hop's stack, as a sidecar would:
    the next hop's response is read whole before it is passed back."""

    def forward(req: Request, endpoint: object, reply: Answer) -> None:
        async def hop() -> None:
            result = await outcome_of(handler, request(req.method))
            if isinstance(result, ProxyError):
                reply(result)
                return
            body = MemoryResponseBody(await drain(result))
            reply(Response(result.status, result.reason, list(result.headers), body))

        task = asyncio.ensure_future(hop())
        hops.add(task)  # held until done (the loop keeps only weak references)
        task.add_done_callback(hops.discard)

    return forward


hops: set[asyncio.Future[None]] = set()


def test_unknown_retry_on_token_is_refused_by_name() -> None:
    policy = RetryPolicy(1, frozenset(["5xx", "on-tuesdays"]), frozenset())
    with pytest.raises(ValueError, match="on-tuesdays"):
        RetryConfig.from_policy(policy)
