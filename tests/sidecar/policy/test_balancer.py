import random
from collections import Counter

from sidecar.config import LbPolicy
from sidecar.exchange import Response
from sidecar.flags import Flag
from sidecar.policy.balancer import BalancerError
from sidecar.policy.stack import ServiceState, build_service_stack
from tests.sidecar.policy.fakes import (
    EP,
    Fail,
    FakeUpstream,
    call,
    drain,
    outcome_of,
    request,
    service,
)


async def test_round_robin_distributes_evenly() -> None:
    upstream = FakeUpstream()
    handler = build_service_stack(service(EP), ServiceState("svc"), upstream)
    for _ in range(300):
        await drain(await call(handler, request()))
    assert Counter(upstream.endpoints_called()) == {EP[0]: 100, EP[1]: 100, EP[2]: 100}
    assert upstream.endpoints_called()[:4] == [EP[0], EP[1], EP[2], EP[0]]


async def test_random_reaches_every_endpoint() -> None:
    upstream = FakeUpstream()
    cfg = service(EP, lb=LbPolicy.RANDOM)
    handler = build_service_stack(cfg, ServiceState("svc"), upstream, rng=random.Random(7))
    for _ in range(300):
        await drain(await call(handler, request()))
    counts = Counter(upstream.endpoints_called())
    assert set(counts) == set(EP) and min(counts.values()) > 50


async def test_least_request_prefers_the_less_busy_endpoint() -> None:
    upstream = FakeUpstream()
    state = ServiceState("svc")
    cfg = service(EP[:2], lb=LbPolicy.LEAST_REQUEST)
    handler = build_service_stack(cfg, state, upstream, rng=random.Random(3))
    busy = await call(handler, request())  # body unread: its endpoint stays busy
    assert busy.endpoint is not None
    for _ in range(20):
        await drain(await call(handler, request()))
    other = EP[1] if busy.endpoint == EP[0] else EP[0]
    assert upstream.endpoints_called()[1:] == [other] * 20
    assert state.active(busy.endpoint) == 1


async def test_active_count_is_released_on_completion_discard_and_error() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Fail(Flag.UPSTREAM_RESET))
    state = ServiceState("svc")
    handler = build_service_stack(service(EP[:1]), state, upstream)
    err = await outcome_of(handler, request())
    assert not isinstance(err, Response)
    assert state.load.active == 0 and state.active(EP[0]) == 0
    resp = await call(handler, request())
    assert state.load.active == 1 and state.active(EP[0]) == 1
    resp.discard()
    resp.discard()  # twice: released once
    assert state.load.active == 0 and state.active(EP[0]) == 0
    resp = await call(handler, request())
    assert await drain(resp) == b"x"
    assert state.load.active == 0


async def test_the_chosen_endpoint_is_recorded_in_tried_and_on_the_response() -> None:
    upstream = FakeUpstream()
    handler = build_service_stack(service(), ServiceState("svc"), upstream)
    req = request()
    resp = await call(handler, req)
    assert req.tried == [EP[0]] and req.attempts == 1
    assert resp.endpoint == EP[0]


async def test_service_without_endpoints_answers_uh() -> None:
    handler = build_service_stack(service([]), ServiceState("svc"), FakeUpstream())
    err = await outcome_of(handler, request())
    assert isinstance(err, BalancerError)
    assert (err.flag, err.status) == (Flag.NO_HEALTHY_UPSTREAM, 503)
