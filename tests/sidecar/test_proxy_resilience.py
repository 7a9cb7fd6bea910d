"""Resilience end to end: client -> real sidecar -> real upstream servers on loopback.

Each test drives a scripted upstream (fail, stall, reset mid-body, refuse, recover) through an
in-process `Sidecar` built from a mesh document, and checks what the client, the upstreams and the
admin port see. Times are small real durations; assertions are bounds with wide margins.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.sidecar.resilience_fixtures import (
    WAIT,
    Drop,
    Proxy,
    ResetMidBody,
    Respond,
    Stall,
    Stopwatch,
    Upstream,
    always,
    first,
    flags,
    mesh,
    refused_address,
    running_sidecar,
    upstreams,
    wait_for,
)

pytestmark = pytest.mark.timeout(30)

UNAVAILABLE = Respond(503, b"unavailable")


def retries(attempts: int, **extra: Any) -> dict[str, Any]:
    """A retries block with a short backoff."""
    return {"attempts": attempts, "backoff": {"base": "5ms", "max": "20ms"}, **extra}


# --- idempotency ------------------------------------------------------------------------------


async def test_post_is_not_retried_on_503_without_idempotency_key() -> None:
    policy = {"retries": retries(2, retry_on=["gateway-error"])}
    async with (
        upstreams(first(1, UNAVAILABLE)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        resp = await proxy.request("POST", "/orders", content=b"order-1")
        assert resp.status_code == 503
        assert up.count == 1
        assert [seen.method for seen in up.requests] == ["POST"]
        assert await proxy.metric("outrigger_retries_total") == 0


async def test_get_is_retried_on_503() -> None:
    """The control for the POST test: the same policy retries an idempotent request."""
    policy = {"retries": retries(2, retry_on=["gateway-error"])}
    async with (
        upstreams(first(1, UNAVAILABLE)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        resp = await proxy.request("GET", "/orders")
        assert resp.status_code == 200
        assert up.count == 2
        assert await proxy.metric("outrigger_retries_total") == 1


async def test_post_with_idempotency_key_is_retried_on_503() -> None:
    policy = {"retries": retries(2, retry_on=["gateway-error"])}
    async with (
        upstreams(first(1, UNAVAILABLE)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        resp = await proxy.request(
            "POST", "/orders", content=b"order-1", headers={"idempotency-key": "k-1"}
        )
        assert resp.status_code == 200
        assert up.count == 2
        # The retry carries the same body and key.
        assert [seen.body for seen in up.requests] == [b"order-1", b"order-1"]
        assert {seen.headers.get("idempotency-key") for seen in up.requests} == {"k-1"}


async def test_post_is_retried_on_connect_failure_without_idempotency_key() -> None:
    """Nothing reached the refused endpoint, so even a POST may go to the other one."""
    policy = {"retries": retries(1, retry_on=["connect-failure"])}
    async with (
        upstreams(always(Respond())) as [up],
        running_sidecar(mesh([refused_address(), up.address], policy)) as proxy,
    ):
        for i in range(4):
            resp = await proxy.request("POST", "/orders", content=f"order-{i}".encode())
            assert resp.status_code == 200, resp.text
        assert up.count == 4


# --- connect failures, stalls, resets -----------------------------------------------------------


async def test_connect_failure_is_retried_on_the_other_endpoint() -> None:
    policy = {"retries": retries(1, retry_on=["connect-failure"])}
    async with (
        upstreams(always(Respond())) as [up],
        running_sidecar(mesh([refused_address(), up.address], policy)) as proxy,
    ):
        statuses = [(await proxy.request()).status_code for _ in range(6)]
        assert statuses == [200] * 6
        assert up.count == 6
        # Every request that met the refused port first was retried once (round robin counts
        # the retry's pick too, as Envoy's does, so that can be every request).
        assert 3 <= await proxy.metric("outrigger_retries_total") <= 6


async def test_connect_failure_without_retries_is_503_uf() -> None:
    """The control: with no retry policy the refused endpoint's requests fail with UF."""
    async with (
        upstreams(always(Respond())) as [up],
        running_sidecar(mesh([refused_address(), up.address])) as proxy,
    ):
        results = [await proxy.request() for _ in range(4)]
        assert sorted(r.status_code for r in results) == [200, 200, 503, 503]
        assert {flags(r) for r in results if r.status_code == 503} == {"UF"}


async def test_retries_exhausted_on_connect_failures_is_503_urx() -> None:
    policy = {"retries": retries(2, retry_on=["connect-failure"])}
    async with running_sidecar(mesh([refused_address(), refused_address()], policy)) as proxy:
        resp = await proxy.request()
        assert resp.status_code == 503
        assert flags(resp) == "URX"
        assert "URX" in resp.text
        assert await proxy.metric("outrigger_retries_total") == 2
        assert await proxy.metric("outrigger_retries_exhausted_total") == 1


async def test_per_try_timeout_on_a_stalling_endpoint_is_retried_on_the_healthy_one() -> None:
    policy = {"retries": retries(1, retry_on=["reset"], per_try_timeout="100ms")}
    async with (
        upstreams(always(Stall()), always(Respond(body=b"healthy"))) as [
            stuck,
            healthy,
        ],
        running_sidecar(mesh([stuck.address, healthy.address], policy)) as proxy,
    ):
        for _ in range(4):
            watch = Stopwatch()
            resp = await proxy.request(timeout=2.0)
            assert resp.status_code == 200
            assert resp.content == b"healthy"
            assert watch.elapsed < 1.0
        assert stuck.count >= 1
        assert healthy.count == 4
        # Every attempt cut by the per-try timeout closed its connection to the stalled endpoint.
        await wait_for(lambda: len(stuck.closed_by_peer) == stuck.count)
        assert await proxy.metric("outrigger_per_try_timeouts_total") == stuck.count


async def test_reset_before_the_response_is_retried() -> None:
    policy = {"retries": retries(1, retry_on=["reset"])}
    async with (
        upstreams(first(1, Drop())) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        resp = await proxy.request()
        assert resp.status_code == 200
        assert up.count == 2


async def test_a_retry_never_follows_bytes_sent_to_the_client() -> None:
    """A reset mid-body after the head and some bytes went out: the client sees a truncated
    response, and the request is not tried again (its bytes cannot be taken back)."""
    policy = {"retries": retries(2, retry_on=["reset", "5xx"])}
    async with (
        upstreams(first(1, ResetMidBody())) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        received = b""
        with pytest.raises(httpx.HTTPError):
            async with asyncio.timeout(WAIT):
                req = proxy.client.build_request("GET", "/", headers={"host": "payments"})
                resp = await proxy.client.send(req, stream=True)
                assert resp.status_code == 200
                try:
                    async for data in resp.aiter_raw():
                        received += data
                finally:
                    await resp.aclose()
        assert received == b"partial-body"
        await asyncio.sleep(0.2)  # a retry, if any, would reach the upstream by now
        assert up.count == 1
        assert await proxy.metric("outrigger_retries_total") == 0


# --- timeouts ---------------------------------------------------------------------------------


async def test_total_timeout_bounds_retries_and_backoff() -> None:
    """attempts 20 x per_try 150ms (+ backoff) would take >= 3s; the total timeout of 300ms
    answers 504 UT well before that."""
    stall = retries(20, retry_on=["reset"], per_try_timeout="150ms")
    stall["backoff"] = {"base": "50ms", "max": "100ms"}
    async with (
        upstreams(always(Stall())) as [up],
        running_sidecar(mesh([up.address], {"timeout": "300ms", "retries": stall})) as proxy,
    ):
        watch = Stopwatch()
        resp = await proxy.request(timeout=3.0)
        assert resp.status_code == 504
        assert flags(resp) == "UT"
        assert watch.elapsed < 1.5
        assert 1 <= up.count <= 3  # at most 300ms / 150ms attempts started
        assert await proxy.metric("outrigger_timeouts_total") == 1


async def test_without_total_timeout_the_same_retries_take_longer() -> None:
    """The control for the total-timeout test: the request is still going after 1.5s."""
    stall = retries(20, retry_on=["reset"], per_try_timeout="150ms")
    stall["backoff"] = {"base": "50ms", "max": "100ms"}
    async with (
        upstreams(always(Stall())) as [up],
        running_sidecar(mesh([up.address], {"retries": stall})) as proxy,
    ):
        with pytest.raises(TimeoutError):
            await proxy.request(timeout=1.5)
        assert up.count >= 5


async def test_timed_out_connection_is_closed_not_pooled() -> None:
    """504 UT; the upstream sees that request's connection closed, and the next request gets a
    fresh connection and its own answer."""
    async with (
        upstreams(first(1, Stall(then=Respond(body=b"stale")), Respond(body=b"fresh"))) as [up],
        running_sidecar(mesh([up.address], {"timeout": "200ms"})) as proxy,
    ):
        resp = await proxy.request(timeout=2.0)
        assert resp.status_code == 504
        assert flags(resp) == "UT"
        assert "UT" in resp.text
        await wait_for(lambda: 0 in up.closed_by_peer, timeout=2.0)
        up.release.set()
        resp = await proxy.request(timeout=2.0)
        assert resp.status_code == 200
        assert resp.content == b"fresh"
        assert up.connections == 2
        assert up.requests[1].connection == 1


async def test_retry_after_is_honoured() -> None:
    policy = {"retries": retries(1, retry_on=["503"])}
    later = Respond(503, b"later", headers=(("retry-after", "1"),))
    async with (
        upstreams(first(1, later)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        watch = Stopwatch()
        resp = await proxy.request(timeout=4.0)
        assert resp.status_code == 200
        assert up.count == 2
        assert watch.elapsed >= 0.9  # the backoff alone would be <= 20ms


async def test_retry_after_beyond_the_deadline_returns_the_503_at_once() -> None:
    policy = {"timeout": "1s", "retries": retries(1, retry_on=["503"])}
    later = Respond(503, b"later", headers=(("retry-after", "5"),))
    async with (
        upstreams(first(1, later)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        watch = Stopwatch()
        resp = await proxy.request(timeout=4.0)
        assert resp.status_code == 503
        assert resp.content == b"later"
        assert resp.headers["retry-after"] == "5"
        assert watch.elapsed < 0.8
        assert up.count == 1


# --- circuit breaking and overflow ------------------------------------------------------------


def _endpoint(clusters: dict[str, Any], address: str) -> dict[str, Any]:
    entries: list[dict[str, Any]] = clusters["payments"]["endpoints"]
    [entry] = [e for e in entries if e["address"] == address]
    return entry


async def test_ejected_endpoint_gets_no_traffic_until_its_probe_succeeds() -> None:
    healthy_again = False

    def flaky(_n: int) -> Respond:
        return Respond(body=b"flaky") if healthy_again else UNAVAILABLE

    breaker = {"consecutive_failures": 2, "open_for": "300ms", "max_ejection_percent": 50}
    async with (
        upstreams(flaky, always(Respond(body=b"steady"))) as [bad, good],
        running_sidecar(mesh([bad.address, good.address], {"circuit_breaker": breaker})) as proxy,
    ):
        # Round robin: the 1st and 3rd requests fail on `bad`, which trips its breaker.
        results = [await proxy.request() for _ in range(4)]
        assert [r.status_code for r in results] == [503, 200, 503, 200]
        assert bad.count == 2
        clusters = await proxy.clusters()
        assert _endpoint(clusters, bad.address)["ejected"] is True
        assert _endpoint(clusters, bad.address)["ejections"] == 1
        assert _endpoint(clusters, good.address)["ejected"] is False
        assert await proxy.metric("outrigger_ejections_total") == 1
        assert await proxy.metric("outrigger_endpoints_ejected") == 1

        # While ejected (300ms): no traffic at all.
        for _ in range(10):
            assert (await proxy.request()).content == b"steady"
        assert bad.count == 2

        # Time served, still broken: exactly one probe, which fails; ejected again (600ms).
        await asyncio.sleep(0.35)
        results = [await proxy.request() for _ in range(6)]
        assert bad.count == 3
        assert sorted(r.status_code for r in results) == [200] * 5 + [503]
        assert await proxy.metric("outrigger_ejections_total") == 2
        for _ in range(6):
            assert (await proxy.request()).content == b"steady"
        assert bad.count == 3

        # Recovered: after the second ejection the probe succeeds and traffic comes back.
        healthy_again = True
        await asyncio.sleep(0.65)
        results = [await proxy.request() for _ in range(6)]
        assert all(r.status_code == 200 for r in results)
        assert bad.count > 3 + 1  # the probe, then its round-robin share
        clusters = await proxy.clusters()
        assert _endpoint(clusters, bad.address)["ejected"] is False
        assert _endpoint(clusters, bad.address)["breaker"] == "closed"


async def test_all_endpoints_ejected_is_503_uh() -> None:
    breaker = {"consecutive_failures": 1, "open_for": "10s", "max_ejection_percent": 100}
    async with (
        upstreams(always(UNAVAILABLE), always(UNAVAILABLE)) as [a, b],
        running_sidecar(mesh([a.address, b.address], {"circuit_breaker": breaker})) as proxy,
    ):
        assert [(await proxy.request()).status_code for _ in range(2)] == [503, 503]
        resp = await proxy.request()
        assert resp.status_code == 503
        assert flags(resp) == "UH"
        assert a.count + b.count == 2
        clusters = await proxy.clusters()
        assert all(e["ejected"] for e in clusters["payments"]["endpoints"])


async def test_overflow_answers_at_once() -> None:
    breaker = {"max_requests": 2}
    async with (
        upstreams(always(Stall())) as [up],
        running_sidecar(mesh([up.address], {"circuit_breaker": breaker})) as proxy,
    ):
        held = [asyncio.ensure_future(proxy.request()) for _ in range(2)]
        try:
            await wait_for(lambda: up.active == 2)
            watch = Stopwatch()
            resp = await proxy.request(timeout=1.0)
            assert resp.status_code == 503
            assert flags(resp) == "UO"
            assert watch.elapsed < 0.5
            assert up.count == 2
            clusters = await proxy.clusters()
            assert _endpoint(clusters, up.address)["active_requests"] == 2
            assert await proxy.metric("outrigger_overflows_total") == 1
            up.release.set()
            async with asyncio.timeout(WAIT):
                answers = await asyncio.gather(*held)
            assert [r.status_code for r in answers] == [200, 200]
        finally:
            for task in held:
                task.cancel()
        # The slots are free again.
        assert (await proxy.request()).status_code == 200


# --- load balancing ---------------------------------------------------------------------------


async def test_least_request_sends_new_requests_to_the_less_busy_endpoint() -> None:
    async with (
        upstreams(always(Stall()), always(Respond(body=b"quick"))) as [
            slow,
            quick,
        ],
        running_sidecar(
            mesh([slow.address, quick.address], {"load_balancer": "least_request"})
        ) as proxy,
    ):
        held: list[asyncio.Future[httpx.Response]] = []
        try:
            # Until one request is stuck on the slow endpoint.
            while slow.active == 0:
                held.append(asyncio.ensure_future(proxy.request()))
                await asyncio.sleep(0.02)
                assert len(held) < 50
            stuck = slow.count
            for _ in range(20):
                assert (await proxy.request()).content == b"quick"
            assert slow.count == stuck
        finally:
            slow.release.set()
            for task in held:
                task.cancel()
            await asyncio.gather(*held, return_exceptions=True)


async def test_round_robin_keeps_sending_to_the_busy_endpoint() -> None:
    """The control for least_request: round robin ignores load."""
    async with (
        upstreams(always(Stall()), always(Respond(body=b"quick"))) as [
            slow,
            quick,
        ],
        running_sidecar(mesh([slow.address, quick.address])) as proxy,
    ):
        held = [asyncio.ensure_future(proxy.request()) for _ in range(4)]
        try:
            await wait_for(lambda: slow.active == 2 and quick.count == 2)
        finally:
            slow.release.set()
            await asyncio.gather(*held, return_exceptions=True)


# --- the retry budget across a chain of sidecars ----------------------------------------------


@contextlib.asynccontextmanager
async def relay_app(downstream: Proxy) -> AsyncIterator[Upstream]:
    """A tiny app that answers each request by calling `backend` through sidecar B."""

    class Relay(Upstream):
        async def _act(self, action: Any, reader: Any, writer: Any, conn: int) -> bool:
            try:
                resp = await downstream.request(service="backend", timeout=WAIT)
                status, body = resp.status_code, resp.content
            except (httpx.HTTPError, TimeoutError):
                status, body = 502, b"relay failed"
            return await super()._act(Respond(status, body), reader, writer, conn)

    relay = await Relay(always(Respond()), "relay").start()
    try:
        yield relay
    finally:
        await relay.stop()


async def _chain_load(budget: dict[str, Any] | None, clients: int) -> tuple[int, list[int]]:
    """`clients` concurrent requests through sidecar A -> relay -> sidecar B -> failing backend.

    Returns the requests the backend saw and the statuses the clients got.
    """
    hop = retries(2, retry_on=["gateway-error"])
    hop["backoff"] = {"base": "20ms", "max": "40ms"}
    if budget is not None:
        hop["budget"] = budget
    failing = Respond(503, b"down", delay=0.05)
    async with (
        upstreams(always(failing)) as [backend],
        running_sidecar(
            mesh([backend.address], {"retries": hop}, name="backend"), service="relay"
        ) as b_side,
        relay_app(b_side) as relay,
        running_sidecar(
            mesh([relay.address], {"retries": hop}, name="relay"), service="frontend"
        ) as a_side,
    ):
        async with asyncio.timeout(20):
            answers = await asyncio.gather(
                *(a_side.request(service="relay", timeout=15) for _ in range(clients))
            )
        return backend.count, [r.status_code for r in answers]


async def test_retry_budget_bounds_load_multiplication_across_hops() -> None:
    clients = 40
    unbounded, statuses = await _chain_load(None, clients)
    assert set(statuses) == {503}
    # attempts=2 at each of two hops: every client request becomes 3 x 3 backend requests.
    assert unbounded == clients * 9

    bounded, statuses = await _chain_load({"percent": 20, "min_concurrency": 2}, clients)
    assert set(statuses) == {503}
    assert clients <= bounded < unbounded / 2
    print(f"backend requests for {clients} clients: {unbounded} unbounded, {bounded} budgeted")


async def test_discarding_a_retried_response_leaves_pooled_connections_alone() -> None:
    """A retried 503 that arrived whole has already handed its connection back to the pool;
    dropping it must not close that connection under the request now using it (a POST there
    would fail after the upstream took it)."""

    class ByPath(Upstream):
        async def _act(self, action: Any, reader: Any, writer: Any, conn: int) -> bool:
            seen = self.requests[-1]
            answer = UNAVAILABLE if seen.path == "/flaky" else Respond(body=b"created")
            return await super()._act(answer, reader, writer, conn)

    policy = {"retries": retries(2, retry_on=["gateway-error"])}
    up = await ByPath(always(Respond())).start()
    try:
        async with running_sidecar(mesh([up.address], policy)) as proxy:
            for _ in range(5):
                calls = [proxy.request("GET", "/flaky") for _ in range(20)]
                calls += [proxy.request("POST", "/orders", content=b"o") for _ in range(20)]
                async with asyncio.timeout(WAIT):
                    answers = await asyncio.gather(*calls)
                assert [r.status_code for r in answers[20:]] == [200] * 20
            posts = [seen for seen in up.requests if seen.method == "POST"]
            gets = [seen for seen in up.requests if seen.method == "GET"]
            assert len(posts) == 100
            assert len(gets) == 100 * 3
    finally:
        await up.stop()


async def test_total_timeout_cuts_a_response_body_that_stalls() -> None:
    """The total timeout covers the whole response (Envoy's route timeout): an upstream that
    sends its head and part of the body, then stalls, is cut when the deadline passes."""

    class StallMidBody(Upstream):
        async def _act(self, action: Any, reader: Any, writer: Any, conn: int) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\nfirst-part")
            await writer.drain()
            return await super()._act(Stall(), reader, writer, conn)

    up = await StallMidBody(always(Respond())).start()
    try:
        async with running_sidecar(mesh([up.address], {"timeout": "300ms"})) as proxy:
            watch = Stopwatch()
            received = b""
            with pytest.raises(httpx.HTTPError):
                async with asyncio.timeout(3.0):
                    req = proxy.client.build_request("GET", "/", headers={"host": "payments"})
                    resp = await proxy.client.send(req, stream=True)
                    try:
                        async for data in resp.aiter_raw():
                            received += data
                    finally:
                        await resp.aclose()
            assert watch.elapsed < 1.5
            assert received == b"first-part"
            await wait_for(lambda: 0 in up.closed_by_peer, timeout=2.0)
            # Counted as a 200 cut short with flag UT.
            text = await proxy.prometheus()
            [line] = [x for x in text.splitlines() if x.startswith("outrigger_requests_total{")]
            assert 'code="200"' in line and 'flags="UT"' in line and line.endswith(" 1.0")
    finally:
        await up.stop()


async def test_after_ejection_exactly_one_probe_goes_to_the_endpoint() -> None:
    """Concurrent requests when the ejection ends: one probe, the rest go elsewhere."""
    breaker = {"consecutive_failures": 2, "open_for": "200ms", "max_ejection_percent": 50}
    probe = Stall(then=Respond(body=b"probed"))
    async with (
        upstreams(first(2, UNAVAILABLE, probe), always(Respond(body=b"steady"))) as [
            bad,
            good,
        ],
        running_sidecar(mesh([bad.address, good.address], {"circuit_breaker": breaker})) as proxy,
    ):
        for _ in range(4):
            await proxy.request()
        assert bad.count == 2
        await asyncio.sleep(0.25)
        calls = [asyncio.ensure_future(proxy.request()) for _ in range(10)]
        try:
            await wait_for(lambda: bad.active == 1 and good.count == 2 + 9)
            assert bad.count == 3
            bad.release.set()
            async with asyncio.timeout(WAIT):
                answers = await asyncio.gather(*calls)
        finally:
            for call in calls:
                call.cancel()
        assert sorted(r.content for r in answers) == [b"probed"] + [b"steady"] * 9
        clusters = await proxy.clusters()
        assert _endpoint(clusters, bad.address)["breaker"] == "closed"


async def test_attempts_cut_by_the_per_try_timeout_eject_the_stalling_endpoint() -> None:
    policy = {
        "retries": retries(1, retry_on=["reset"], per_try_timeout="100ms"),
        "circuit_breaker": {
            "consecutive_failures": 2,
            "open_for": "10s",
            "max_ejection_percent": 50,
        },
    }
    async with (
        upstreams(always(Stall()), always(Respond(body=b"healthy"))) as [
            stuck,
            healthy,
        ],
        running_sidecar(mesh([stuck.address, healthy.address], policy)) as proxy,
    ):
        for _ in range(8):
            assert (await proxy.request(timeout=2.0)).content == b"healthy"
        assert stuck.count == 2
        clusters = await proxy.clusters()
        assert _endpoint(clusters, stuck.address)["ejected"] is True
        # Ejected: the next requests go straight to the healthy endpoint, no per-try wait.
        watch = Stopwatch()
        for _ in range(5):
            assert (await proxy.request(timeout=2.0)).content == b"healthy"
        assert watch.elapsed < 0.4
        assert stuck.count == 2


async def test_a_body_larger_than_the_retry_buffer_is_not_retried() -> None:
    """Bodies up to the retry buffer (64 KiB) are kept and sent again; a larger one streams
    once, so its request is answered with the upstream's 503 instead of a retry."""
    policy = {"retries": retries(2, retry_on=["gateway-error"])}
    key = {"idempotency-key": "k-2"}
    small, large = b"s" * 1000, b"L" * (200 * 1024)
    async with (
        upstreams(first(1, UNAVAILABLE)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        resp = await proxy.request("PUT", "/doc", content=small, headers=key)
        assert resp.status_code == 200
        assert [seen.body for seen in up.requests] == [small, small]
    async with (
        upstreams(first(1, UNAVAILABLE)) as [up],
        running_sidecar(mesh([up.address], policy)) as proxy,
    ):
        resp = await proxy.request("PUT", "/doc", content=large, headers=key)
        assert resp.status_code == 503
        assert [seen.body for seen in up.requests] == [large]
