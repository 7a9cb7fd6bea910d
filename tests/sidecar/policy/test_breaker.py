import asyncio
from datetime import UTC, datetime

import pybreaker

from sidecar.config import Endpoint, ServiceConfig
from sidecar.exchange import Response
from sidecar.flags import Flag
from sidecar.policy.balancer import BalancerError
from sidecar.policy.breaker import (
    BreakerConfig,
    BreakerEvent,
    BreakerEventKind,
    BreakerRegistry,
)
from sidecar.policy.classifier import classify
from sidecar.policy.stack import ServiceState, build_service_stack
from sidecar.policy.stats import ServiceStats
from tests.sidecar.policy.fakes import (
    EP,
    Fail,
    FakeUpstream,
    Hang,
    MemoryResponseBody,
    Reply,
    call,
    drain,
    request,
    service,
)


class Harness:
    def __init__(self, cfg: ServiceConfig, upstream: FakeUpstream) -> None:
        self.events: list[BreakerEvent] = []
        self.state = ServiceState(cfg.name, on_event=self.events.append)
        self.upstream = upstream
        self.handler = build_service_stack(cfg, self.state, upstream)

    async def send(self, n: int = 1) -> list[Response | Exception]:
        results: list[Response | Exception] = []
        for _ in range(n):
            try:
                resp = await call(self.handler, request())
            except Exception as err:  # the ProxyError the server would turn into a response
                results.append(err)
                continue
            await drain(resp)
            results.append(resp)
        return results

    def calls_since(self, mark: int) -> list[Endpoint]:
        return self.upstream.endpoints_called()[mark:]

    def ejected(self) -> list[Endpoint]:
        return [ep for ep in EP if self.state.breakers.is_ejected(ep)]


def tripping(**kw: object) -> ServiceConfig:
    return service(consecutive_failures=3, open_for=10.0, **kw)  # type: ignore[arg-type]


async def test_endpoint_is_ejected_after_consecutive_failures() -> None:
    upstream = FakeUpstream()
    upstream.always(EP[0], Reply(503))
    h = Harness(tripping(), upstream)
    await h.send(5)  # round robin: EP0 fails on requests 1, 3, 5
    assert h.ejected() == [EP[0]]
    assert h.state.stats.ejections == 1
    assert [e.kind for e in h.events] == [BreakerEventKind.EJECTED]
    assert h.events[0].open_for == 10.0
    mark = len(upstream.calls)
    await h.send(6)
    assert h.calls_since(mark) == [EP[1]] * 6


async def test_a_success_in_between_resets_the_consecutive_count() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503), Reply(503), Reply(200), Reply(503), Reply(503))
    h = Harness(tripping(endpoints=EP[:1]), upstream)
    await h.send(5)
    assert h.ejected() == []


async def test_client_errors_do_not_count_as_endpoint_failures() -> None:
    upstream = FakeUpstream(default=Reply(404))
    h = Harness(tripping(endpoints=EP[:1]), upstream)
    await h.send(10)
    assert h.ejected() == []


async def test_connect_failures_and_timeouts_count_as_failures() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Fail(Flag.UPSTREAM_CONNECT_FAILURE), Hang(), Hang())
    h = Harness(tripping(endpoints=EP[:1], timeout=1.0), upstream)
    await h.send(3)
    assert h.ejected() == [EP[0]]


async def test_no_traffic_reaches_an_ejected_endpoint_until_open_for_passes() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503), Reply(503), Reply(503))
    h = Harness(tripping(), upstream)
    await h.send(5)
    assert h.ejected() == [EP[0]]
    await asyncio.sleep(9.9)
    mark = len(upstream.calls)
    await h.send(4)
    assert h.calls_since(mark) == [EP[1]] * 4
    await asyncio.sleep(0.2)
    mark = len(upstream.calls)
    await h.send(4)
    assert EP[0] in h.calls_since(mark)


async def test_half_open_lets_exactly_one_probe_through() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503), Reply(503), Reply(503), Reply(200, delay=1.0))
    h = Harness(tripping(), upstream)
    await h.send(5)
    await asyncio.sleep(10.0)
    mark = len(upstream.calls)
    await asyncio.gather(*(h.send() for _ in range(6)))
    assert h.calls_since(mark).count(EP[0]) == 1
    assert h.calls_since(mark).count(EP[1]) == 5


async def test_a_successful_probe_closes_the_breaker() -> None:
    upstream = FakeUpstream()
    upstream.script(EP[0], Reply(503), Reply(503), Reply(503))
    h = Harness(tripping(), upstream)
    await h.send(5)
    await asyncio.sleep(10.0)
    await h.send(2)
    assert h.ejected() == []
    kinds = [e.kind for e in h.events]
    assert kinds == [BreakerEventKind.EJECTED, BreakerEventKind.HALF_OPEN, BreakerEventKind.CLOSED]
    mark = len(upstream.calls)
    await h.send(4)
    assert sorted(h.calls_since(mark), key=str) == [EP[0], EP[0], EP[1], EP[1]]


async def test_open_time_grows_with_consecutive_trips() -> None:
    upstream = FakeUpstream()
    upstream.always(EP[0], Reply(503))
    h = Harness(tripping(), upstream)
    await h.send(5)
    await asyncio.sleep(10.0)
    await h.send(2)  # the probe fails: ejected again, for twice as long
    assert h.ejected() == [EP[0]]
    await asyncio.sleep(15.0)
    assert h.ejected() == [EP[0]]
    await asyncio.sleep(5.0)
    assert h.ejected() == []
    await h.send(2)  # third trip
    ejections = [e for e in h.events if e.kind is BreakerEventKind.EJECTED]
    assert [e.open_for for e in ejections] == [10.0, 20.0, 30.0]
    assert [e.consecutive_trips for e in ejections] == [1, 2, 3]
    assert h.state.stats.ejections == 3


async def test_max_ejection_percent_keeps_endpoints_in() -> None:
    endpoints = [Endpoint("10.0.1.1", 80), Endpoint("10.0.1.2", 80), Endpoint("10.0.1.3", 80)]
    endpoints.append(Endpoint("10.0.1.4", 80))
    upstream = FakeUpstream(default=Reply(503))
    cfg = service(endpoints, consecutive_failures=2, max_ejection_percent=50)
    h = Harness(cfg, upstream)
    await h.send(16)
    ejected = [ep for ep in endpoints if h.state.breakers.is_ejected(ep)]
    assert len(ejected) == 2
    assert h.state.stats.ejections == 2
    assert h.state.stats.ejections_suppressed >= 2
    assert BreakerEventKind.EJECTION_SUPPRESSED in {e.kind for e in h.events}


async def test_all_endpoints_ejected_answers_uh() -> None:
    upstream = FakeUpstream(default=Reply(503))
    h = Harness(tripping(max_ejection_percent=100), upstream)
    await h.send(6)
    assert h.ejected() == EP[:2]
    mark = len(upstream.calls)
    (err,) = await h.send()
    assert isinstance(err, BalancerError)
    assert (err.flag, err.status) == (Flag.NO_HEALTHY_UPSTREAM, 503)
    assert h.calls_since(mark) == []


async def test_tripped_breakers_survive_a_config_push() -> None:
    upstream = FakeUpstream()
    upstream.always(EP[0], Reply(503))
    h = Harness(tripping(), upstream)
    await h.send(5)
    h.handler = build_service_stack(tripping(timeout=3.0), h.state, upstream)
    assert h.ejected() == [EP[0]]


def response(status: int) -> Response:
    return Response(status, b"", [], MemoryResponseBody())


def test_breaker_open_timer_runs_on_the_injected_clock() -> None:
    now = [0.0]
    registry = BreakerRegistry(lambda: now[0], ServiceStats())
    registry.configure(BreakerConfig(1, open_for=30.0, max_ejection_percent=100), [EP[0]])
    registry.record(EP[0], classify(response(503)), probe=False)
    assert registry.is_ejected(EP[0])
    breaker = registry.breaker(EP[0])
    assert breaker is not None and breaker.state == pybreaker.STATE_OPEN
    # pybreaker's own wall-clock comparison agrees with the injected clock.
    opened_at = breaker.storage.opened_at
    assert opened_at is not None and (datetime.now(UTC) - opened_at).total_seconds() < 1.0
    now[0] = 29.9
    assert registry.is_ejected(EP[0])
    assert (datetime.now(UTC) - opened_at).total_seconds() < 1.0  # no wall time involved
    now[0] = 30.0
    assert not registry.is_ejected(EP[0])
    assert registry.admit(EP[0]) is True  # the probe
    assert breaker.state == pybreaker.STATE_HALF_OPEN
    assert registry.is_ejected(EP[0])  # while the probe is out
    registry.record(EP[0], classify(response(200)), probe=True)
    assert breaker.state == pybreaker.STATE_CLOSED
