"""The forwarder and its pools driven byte by byte: the test plays the client and the upstream.

A `Proxy` is the real `DownstreamProtocol` in front of the real `Upstreams`; each upstream
connection is a `FakeTransport` opened by a `FakeConnector`, so the test reads what the sidecar
wrote upstream and answers with exact bytes.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.config import ServiceConfig
from sidecar.exchange import Request, Response, Result
from sidecar.transport.body import EMPTY_BODY, BytesBody
from sidecar.transport.upstream import Upstreams
from tests.sidecar.transport.fake import FakeConnector, FakeTransport, settle, until
from tests.sidecar.transport.harness import ENDPOINT, Proxy, proxy


def get(path: bytes, method: bytes = b"GET") -> bytes:
    return b"%b %b HTTP/1.1\r\nHost: payments\r\n\r\n" % (method, path)


def answer(body: bytes) -> bytes:
    """An upstream's 200 (also what the client reads: the sidecar writes the same bytes)."""
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


def sent_upstream(path: bytes, method: bytes = b"GET") -> bytes:
    return b"%b %b HTTP/1.1\r\nhost: payments\r\n\r\n" % (method, path)


def idle(p: Proxy) -> list[FakeTransport]:
    """The upstream connections in the pool, as their transports."""
    pool = p.upstreams.pool(ENDPOINT)
    return [t for t in p.connector.opened if t.protocol in pool.idle]


# --- a stale pooled connection ---------------------------------------------------------------


async def pooled_connection(p: Proxy) -> FakeTransport:
    """One exchange, so that its upstream connection waits in the pool."""
    p.client.peer_sends(get(b"/one"))
    upstream = await p.upstream(0)
    upstream.peer_sends(answer(b"one"))
    await until(lambda: p.client.written == answer(b"one"))
    assert idle(p) == [upstream]
    p.client.take()
    return upstream


async def test_a_get_on_a_pooled_connection_the_upstream_closed_goes_again_on_a_fresh_one() -> None:
    p = proxy()
    stale = await pooled_connection(p)

    p.client.peer_sends(get(b"/two"))
    await until(lambda: stale.written.endswith(sent_upstream(b"/two")))
    stale.peer_closes()  # closed before a byte of the answer: nothing was processed
    fresh = await p.upstream(1)
    assert fresh.written == sent_upstream(b"/two")
    fresh.peer_sends(answer(b"two"))

    await until(lambda: p.client.fresh)
    assert p.client.take() == answer(b"two")
    assert stale.closed
    assert idle(p) == [fresh]


async def test_a_post_on_a_pooled_connection_the_upstream_closed_is_not_sent_again() -> None:
    p = proxy()
    stale = await pooled_connection(p)

    p.client.peer_sends(b"POST /pay HTTP/1.1\r\nHost: payments\r\nContent-Length: 2\r\n\r\n42")
    await until(lambda: stale.written.endswith(b"\r\n\r\n42"))
    stale.peer_closes()

    await until(lambda: p.client.fresh)
    response = p.client.take()
    assert response.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"x-outrigger-flags: UC\r\n" in response
    await settle()
    assert len(p.connector.opened) == 1  # the upstream may have charged the card: not replayed


async def test_a_get_is_not_sent_again_once_the_upstream_began_answering() -> None:
    p = proxy()
    stale = await pooled_connection(p)

    p.client.peer_sends(get(b"/two"))
    await until(lambda: stale.written.endswith(sent_upstream(b"/two")))
    stale.peer_sends(b"HTTP/1.1 200 OK\r\n")
    stale.peer_closes()

    await until(lambda: p.client.fresh)
    assert b"x-outrigger-flags: UC\r\n" in p.client.take()
    await settle()
    assert len(p.connector.opened) == 1


async def test_a_pooled_connection_the_upstream_closed_while_idle_is_never_used_again() -> None:
    p = proxy()
    stale = await pooled_connection(p)
    stale.peer_closes()
    await until(lambda: stale.lost)
    assert idle(p) == []

    p.client.peer_sends(get(b"/two"))
    fresh = await p.upstream(1)
    fresh.peer_sends(answer(b"two"))
    await until(lambda: p.client.fresh)
    assert p.client.take() == answer(b"two")
    assert stale.written == sent_upstream(b"/one")


async def test_bytes_from_an_idle_pooled_connection_close_it() -> None:
    p = proxy()
    stale = await pooled_connection(p)
    stale.peer_sends(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")  # an answer to nothing
    assert stale.aborted
    await until(lambda: stale.lost)
    assert idle(p) == []


# --- what a request costs in writes and reads (issue 18: the floor forwarder's count) -------------


async def test_a_fast_exchange_on_a_pooled_connection_is_one_write_per_message_each_way() -> None:
    # A request without a body and an answer that arrives in one read: the request head is one
    # write upstream, the response (head and body) one write to the client, and neither side's
    # reading is paused or resumed (each would be an epoll_ctl).
    p = proxy()
    upstream = await pooled_connection(p)
    upstream.take()
    client_pauses, upstream_pauses = p.client.read_pauses, upstream.read_pauses
    for n in range(3):
        path = b"/%d" % n
        p.client.peer_sends(get(path))
        await until(lambda: upstream.fresh)
        assert upstream.writes[-1:] == [sent_upstream(path)]
        assert upstream.take() == sent_upstream(path)
        upstream.peer_sends(answer(b"body %d" % n))
        await until(lambda: p.client.fresh)
        assert p.client.writes[-1:] == [answer(b"body %d" % n)]
        assert p.client.take() == answer(b"body %d" % n)
    assert len(p.connector.opened) == 1
    assert (p.client.read_pauses, upstream.read_pauses) == (client_pauses, upstream_pauses)
    assert p.client.reading and upstream.reading
    assert p.outcomes == [(200, "")] * 4


async def test_a_post_whose_body_came_with_its_head_is_one_write_upstream() -> None:
    p = proxy()
    upstream = await pooled_connection(p)
    upstream.take()
    p.client.peer_sends(b"POST /pay HTTP/1.1\r\nHost: payments\r\nContent-Length: 5\r\n\r\nhello")
    await until(lambda: upstream.fresh)
    assert upstream.writes[-1:] == [
        b"POST /pay HTTP/1.1\r\nhost: payments\r\ncontent-length: 5\r\n\r\nhello"
    ]
    upstream.take()
    upstream.peer_sends(answer(b"paid"))
    await until(lambda: p.client.fresh)
    assert p.client.writes[-1:] == [answer(b"paid")]


# --- a connection reused from inside its own answer ---------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        answer(b"one"),  # head and body in one read: handed over whole
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n0\r\n\r\n",
    ],
    ids=["whole", "chunked"],
)
async def test_a_pipelined_request_goes_on_the_connection_that_just_answered(first: bytes) -> None:
    # The first answer is written to the client, and the second request sent upstream, from
    # inside the upstream connection's data_received: the connection must be back in the pool
    # (and its state reset) before anyone sees the first response.
    p = proxy()
    p.client.peer_sends(get(b"/one") + get(b"/two"))
    upstream = await p.upstream(0)
    upstream.peer_sends(first)

    await until(lambda: upstream.written.endswith(sent_upstream(b"/two")))
    assert upstream.written == sent_upstream(b"/one") + sent_upstream(b"/two")
    upstream.peer_sends(answer(b"two"))
    await until(lambda: p.client.written.endswith(answer(b"two")))
    assert p.client.written.count(b"HTTP/1.1 200 OK") == 2
    assert b"one" in p.client.written.partition(b"two")[0]
    assert len(p.connector.opened) == 1
    assert idle(p) == [upstream]
    assert p.outcomes == [(200, ""), (200, "")]


# --- bodiless responses (docs/hardening.md rule 9) ------------------------------------------------


@pytest.mark.parametrize(("status", "reason"), [(b"204", b"No Content"), (b"304", b"Not Modified")])
async def test_bytes_after_a_bodiless_response_are_not_forwarded_and_end_the_connection(
    status: bytes, reason: bytes
) -> None:
    p = proxy()
    p.client.peer_sends(get(b"/"))
    upstream = await p.upstream(0)
    upstream.peer_sends(b'HTTP/1.1 %b %b\r\nEtag: "1"\r\n\r\nsmuggled' % (status, reason))

    await until(lambda: p.client.written)
    await settle()
    assert p.client.written == b'HTTP/1.1 %b %b\r\netag: "1"\r\n\r\n' % (status, reason)
    assert upstream.aborted  # it said more than it should have: never reused
    assert not p.client.closed


async def test_a_head_response_forwards_its_content_length_but_not_a_body_sent_with_it() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/", method=b"HEAD"))
    upstream = await p.upstream(0)
    assert upstream.written == sent_upstream(b"/", method=b"HEAD")
    upstream.peer_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")

    await until(lambda: p.client.written)
    await settle()
    assert p.client.written == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    assert upstream.aborted


async def test_a_clean_head_response_leaves_the_upstream_connection_pooled() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/", method=b"HEAD"))
    upstream = await p.upstream(0)
    upstream.peer_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")

    await until(lambda: p.client.written)
    assert p.client.written == b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"
    assert idle(p) == [upstream]


# --- backpressure -------------------------------------------------------------------------------

KIB = 1024


def body_of(message: bytes) -> bytes:
    return message.partition(b"\r\n\r\n")[2]


async def test_a_client_that_stops_reading_pauses_the_upstream_until_it_reads_again() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/big"))
    upstream = await p.upstream(0)
    size = 1 * KIB + 100 * KIB + 300 * KIB + 10 * KIB
    upstream.peer_sends(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * KIB)
    await until(lambda: p.client.written.endswith(b"a" * KIB))

    p.client.peer_stops_reading()
    upstream.peer_sends(b"b" * 100 * KIB)  # written to the client, which does not take it
    await until(lambda: p.client.written.endswith(b"b"))
    upstream.peer_sends(b"c" * 300 * KIB)  # held by the sidecar: more than it may hold
    await settle()
    assert not upstream.reading
    assert b"c" not in body_of(p.client.written)
    upstream.peer_sends(b"d" * 10 * KIB)  # stays in the upstream's socket
    await settle()
    assert upstream.waiting == b"d" * 10 * KIB

    p.client.peer_reads()
    await until(lambda: upstream.reading)
    await until(lambda: p.client.written.endswith(b"d"))
    assert (
        body_of(p.client.written)
        == b"a" * KIB + b"b" * 100 * KIB + b"c" * 300 * KIB + b"d" * 10 * KIB
    )
    assert idle(p) == [upstream]


async def test_a_request_body_faster_than_the_upstream_pauses_the_client_until_it_reads() -> None:
    p = proxy()
    size = 100 * KIB + 2 * 300 * KIB + KIB
    p.client.peer_sends(
        b"PUT /blob HTTP/1.1\r\nHost: payments\r\nContent-Length: %d\r\n\r\n" % size
        + b"a" * 100 * KIB
    )
    upstream = await p.upstream(0)
    await until(lambda: upstream.written.endswith(b"a"))

    upstream.peer_stops_reading()
    p.client.peer_sends(b"b" * 300 * KIB)  # written upstream, which does not take it
    await until(lambda: upstream.written.endswith(b"b"))
    p.client.peer_sends(b"c" * 300 * KIB)  # held by the sidecar: more than it may hold
    await settle()
    assert not p.client.reading
    assert b"c" not in body_of(upstream.written)
    p.client.peer_sends(b"d" * KIB)  # stays in the client's socket
    await settle()
    assert p.client.waiting == b"d" * KIB

    upstream.peer_reads()
    await until(lambda: p.client.reading)
    await until(lambda: upstream.written.endswith(b"d"))
    assert body_of(upstream.written) == (
        b"a" * 100 * KIB + b"b" * 300 * KIB + b"c" * 300 * KIB + b"d" * KIB
    )
    upstream.peer_sends(answer(b"stored"))
    await until(lambda: p.client.written)
    assert p.client.written == answer(b"stored")
    assert idle(p) == [upstream]


# --- what makes a connection unsafe to reuse (docs/hardening.md rules 6 and 9) --------------------


async def test_a_response_with_conflicting_framing_is_502_upe_and_its_connection_closed() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/"))
    upstream = await p.upstream(0)
    upstream.peer_sends(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nabc"
    )

    await until(lambda: p.client.written)
    assert p.client.written.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"x-outrigger-flags: UPE\r\n" in p.client.written
    assert b"abc" not in p.client.written
    assert upstream.aborted


async def test_an_answer_before_the_whole_request_body_keeps_the_connection_out_of_the_pool() -> (
    None
):
    p = proxy()
    p.client.peer_sends(b"POST /up HTTP/1.1\r\nHost: payments\r\nContent-Length: 10\r\n\r\nhello")
    upstream = await p.upstream(0)
    await until(lambda: upstream.written.endswith(b"hello"))
    upstream.peer_sends(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")

    await until(lambda: p.client.lost)
    assert p.client.written == (
        b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    )  # the client is still sending a body nobody will read
    assert upstream.aborted  # it saw half a request: never reused
    assert idle(p) == []


async def test_a_refused_connect_is_503_uf() -> None:
    p = proxy()
    p.connector.refuse = ConnectionRefusedError(111, "Connection refused")
    p.client.peer_sends(get(b"/"))

    await until(lambda: p.client.written)
    assert p.client.written.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert p.client.written.endswith(b"UF: connect to 10.0.0.7:8080 failed: Connection refused\n")


# --- the pool's sweep (a chosen `now`) ----------------------------------------------------------


async def test_the_sweep_closes_a_pooled_connection_idle_past_the_idle_timeout() -> None:
    p = proxy()
    before = asyncio.get_running_loop().time()
    upstream = await pooled_connection(p)
    pool = p.upstreams.pool(ENDPOINT)

    pool.sweep(before + 59, stream_idle_timeout=300)  # 60 s without a service's own
    assert not upstream.closed
    pool.sweep(asyncio.get_running_loop().time() + 61, stream_idle_timeout=300)
    assert upstream.aborted
    await until(lambda: upstream.lost)
    assert idle(p) == []


def payments(idle_timeout: float) -> ServiceConfig:
    return ServiceConfig(
        "payments", "default", 80, "payments", (ENDPOINT,), idle_timeout=idle_timeout
    )


async def test_a_pooled_connection_closes_after_its_services_idle_timeout_from_xds() -> None:
    p = proxy(service=payments(idle_timeout=5.0))
    before = asyncio.get_running_loop().time()
    upstream = await pooled_connection(p)
    pool = p.upstreams.pool(ENDPOINT)

    pool.sweep(before + 4.9, stream_idle_timeout=300)
    assert not upstream.closed
    pool.sweep(asyncio.get_running_loop().time() + 5.1, stream_idle_timeout=300)
    assert upstream.aborted
    await until(lambda: upstream.lost)
    assert idle(p) == []


async def test_an_idle_timeout_of_zero_keeps_a_pooled_connection_as_envoy_does() -> None:
    p = proxy(service=payments(idle_timeout=0.0))
    upstream = await pooled_connection(p)
    p.upstreams.pool(ENDPOINT).sweep(asyncio.get_running_loop().time() + 86400, 300)
    assert not upstream.closed
    assert idle(p) == [upstream]


async def test_the_sweep_cuts_an_exchange_whose_upstream_went_silent() -> None:
    p = proxy()
    before = asyncio.get_running_loop().time()
    p.client.peer_sends(get(b"/"))
    upstream = await p.upstream(0)
    pool = p.upstreams.pool(ENDPOINT)

    pool.sweep(before + 299, stream_idle_timeout=300)
    assert not upstream.closed
    pool.sweep(asyncio.get_running_loop().time() + 301, stream_idle_timeout=300)
    assert upstream.aborted
    await until(lambda: p.client.written)
    assert p.client.written.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"x-outrigger-flags: UC\r\n" in p.client.written


async def test_a_pooled_connection_is_not_left_paused_by_the_body_it_carried_last() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/big"))
    upstream = await p.upstream(0)
    size = 2 * KIB + 300 * KIB
    upstream.peer_sends(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"a" * KIB)
    await until(lambda: p.client.written.endswith(b"a" * KIB))
    p.client.peer_stops_reading()
    upstream.peer_sends(b"b" * KIB)  # written to the client, which does not take it
    await until(lambda: p.client.written.endswith(b"b" * KIB))
    upstream.peer_sends(b"c" * 300 * KIB)  # the rest at once, more than the sidecar may hold
    await settle()
    assert idle(p) == [upstream]  # whole and clean: back in the pool

    other = p.another_client()
    other.peer_sends(get(b"/small"))
    await until(lambda: upstream.written.endswith(sent_upstream(b"/small")))
    upstream.peer_sends(answer(b"small"))
    await until(lambda: other.written)
    assert other.written == answer(b"small")  # not held up by the first client's reading


async def test_a_response_read_in_one_piece_is_the_one_its_constructor_would_make() -> None:
    # The one-read path builds the Response and its BytesBody without their __init__ (a cost
    # per request): every slot must still be there, with the values __init__ would give.
    connector = FakeConnector()
    upstreams = Upstreams(clock=asyncio.get_running_loop().time, connect=connector)
    results: list[Result] = []
    request = Request(b"GET", b"/x", b"payments", [], EMPTY_BODY)
    upstreams.forward(request, ENDPOINT, results.append)
    upstream = await connector.connection(0)
    await until(lambda: b"\r\n\r\n" in upstream.written)
    upstream.peer_sends(b"HTTP/1.1 201 Made\r\nserver: u\r\ncontent-length: 2\r\n\r\nok")
    await until(lambda: bool(results))

    (got,) = results
    assert isinstance(got, Response)
    made = Response(201, b"Made", [(b"server", b"u")], BytesBody(b"ok"), ENDPOINT, 2, True)
    for slot in Response.__slots__:
        if slot != "body":
            assert getattr(got, slot) == getattr(made, slot), slot
    assert type(got.body) is BytesBody
    assert (got.body.length, got.body.replayable, got.body.whole()) == (2, True, b"ok")
    assert (await got.body.read(), await got.body.read()) == (b"ok", b"")
