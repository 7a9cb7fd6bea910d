"""The downstream protocol driven byte by byte: bytes in with `data_received`, bytes out asserted.

No sockets: the client is a `FakeTransport`; behind the protocol is either a scripted handler or
the real forwarder whose upstream connections are fake transports too.
"""

from __future__ import annotations

import asyncio
import re
from typing import cast

from sidecar.exchange import Reply, Request, Response
from sidecar.transport.body import EMPTY_BODY, BodyStream
from sidecar.transport.server import (
    DownstreamProtocol,
    RequestCycle,
    ServerSettings,
    _Cycle,
    _request_id,
)
from tests.sidecar.transport.fake import WAIT, FakeTransport, settle, until
from tests.sidecar.transport.harness import (
    ENDPOINT,
    Proxy,
    Scripted,
    answering,
    downstream,
    ok,
    proxy,
)


def get(path: bytes) -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: payments\r\n\r\n" % path


def reply(body: bytes, *, close: bool = False) -> bytes:
    """What the client reads for `ok(body)`."""
    connection = b"connection: close\r\n" if close else b""
    return b"HTTP/1.1 200 OK\r\n%bcontent-length: %d\r\n\r\n%b" % (connection, len(body), body)


async def in_flight(
    settings: ServerSettings | None = None,
) -> tuple[Scripted, DownstreamProtocol, FakeTransport]:
    """A connection whose one request waits for the test's answer."""
    handler = Scripted()
    protocol, client = downstream(handler, settings)
    client.peer_sends(get(b"/slow"))
    await handler.request(0)
    return handler, protocol, client


async def read_body(request: Request) -> bytes:
    async with asyncio.timeout(WAIT):
        return b"".join([data async for data in request.body.chunks()])


# --- pipelining ---------------------------------------------------------------------------


async def test_a_pipelined_request_waits_for_the_response_before_it_with_reading_paused() -> None:
    handler = Scripted()
    _, client = downstream(handler)

    client.peer_sends(get(b"/one") + get(b"/two"))
    first = await handler.request(0)
    await settle()
    assert first.path == b"/one"
    assert len(handler.requests) == 1  # the second waits its turn
    assert not client.reading
    client.peer_sends(get(b"/three"))  # stays in the socket while reading is paused
    await settle()
    assert client.waiting == get(b"/three")

    handler.answer(0, ok(b"one"))
    second = await handler.request(1)
    assert second.path == b"/two"
    await settle()  # the response is written at the end of the loop's round (outbox.py)
    assert client.take() == reply(b"one")
    handler.answer(1, ok(b"two"))
    third = await handler.request(2)
    assert third.path == b"/three"
    handler.answer(2, ok(b"three"))
    await until(lambda: client.written.endswith(reply(b"three")))
    assert client.take() == reply(b"two") + reply(b"three")
    assert client.reading
    assert not client.closed


async def test_pipelined_responses_keep_request_order_whatever_order_they_are_ready_in() -> None:
    async def slow_first(request: Request) -> Response:
        if request.path == b"/one":
            await asyncio.sleep(0.01)
        return ok(request.path)

    _, client = downstream(answering(slow_first))
    client.peer_sends(get(b"/one") + get(b"/two"))
    await until(lambda: len(client.written) >= len(reply(b"/one") + reply(b"/two")))
    assert client.written == reply(b"/one") + reply(b"/two")


async def test_a_bad_request_pipelined_after_a_good_one_gets_400_after_the_first_response() -> None:
    handler = Scripted()
    _, client = downstream(handler)

    client.peer_sends(get(b"/one") + b"GET /two HTTP/1.1\r\nHost: payments\r\nBad_Name: x\r\n\r\n")
    await handler.request(0)
    await settle()
    assert client.written == b""  # the 400 does not jump ahead of the first response

    handler.answer(0, ok(b"one"))
    await until(lambda: client.lost)
    written = client.written
    assert written.startswith(reply(b"one") + b"HTTP/1.1 400 Bad Request\r\n")
    assert b"x-outrigger-flags: DPE\r\nconnection: close\r\n" in written
    assert len(handler.requests) == 1  # nothing after the bad request is parsed or forwarded


async def test_a_refused_request_is_reported_like_any_other_with_400_dpe() -> None:
    reported: list[tuple[object, int, str]] = []
    _, client = downstream(
        Scripted(),
        completed=lambda head, decision, status, flags, start, request, *_: reported.append(
            (head, status, flags)
        ),
    )
    client.peer_sends(b"GET / HTTP/1.1\r\nHost: payments\r\nBad_Name: x\r\n\r\n")
    await until(lambda: client.lost)
    assert client.written.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert reported == [(None, 400, "DPE")]  # no head: the parser refused it


async def test_a_pipelined_request_whose_body_is_still_coming_is_read_to_its_end() -> None:
    handler = Scripted()
    _, client = downstream(handler)

    client.peer_sends(
        get(b"/one") + b"POST /two HTTP/1.1\r\nHost: payments\r\nContent-Length: 10\r\n\r\nhello"
    )
    await handler.request(0)
    handler.answer(0, ok(b"one"))
    second = await handler.request(1)
    client.peer_sends(b"world")  # the rest of the second request's body

    assert await read_body(second) == b"helloworld"
    handler.answer(1, ok(b"two"))
    await until(lambda: client.written.endswith(reply(b"two")))
    assert client.reading


# --- 100-continue -------------------------------------------------------------------------

EXPECT_CONTINUE = (
    b"POST /upload HTTP/1.1\r\nHost: payments\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


async def test_100_continue_is_sent_when_the_body_is_first_read_and_not_before() -> None:
    handler = Scripted()
    _, client = downstream(handler)

    client.peer_sends(EXPECT_CONTINUE)
    request = await handler.request(0)
    await settle()
    assert client.written == b""  # nobody asked for the body yet

    body = asyncio.get_running_loop().create_task(read_body(request))
    await until(lambda: client.written)
    assert client.take() == CONTINUE
    client.peer_sends(b"hello")
    assert await asyncio.wait_for(body, WAIT) == b"hello"
    handler.answer(0, ok(b"stored"))
    await until(lambda: client.fresh)
    assert client.take() == reply(b"stored")  # one 100, then the final response


async def test_a_final_response_before_the_body_is_read_means_no_100_continue() -> None:
    handler = Scripted()
    _, client = downstream(handler)

    client.peer_sends(EXPECT_CONTINUE)
    request = await handler.request(0)
    body = BodyStream(None, lambda: None, lambda: None)
    handler.answer(0, Response(200, b"OK", [], body))
    body.feed(b"early")
    await until(lambda: client.written)

    request.body.chunks()  # a late reader (a pump still running) asks for the body now
    body.finish()
    await until(lambda: client.lost)
    assert CONTINUE not in client.written
    assert client.written == (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5\r\nearly\r\n0\r\n\r\n"
    )  # the body the client was told to hold back is never read: the connection closes


# --- HTTP/1.0 ------------------------------------------------------------------------------


async def test_an_http10_client_gets_its_response_and_the_connection_closes() -> None:
    _, client = downstream(lambda request, reply: reply(ok(b"hi")))

    client.peer_sends(b"GET / HTTP/1.0\r\n\r\n")
    await until(lambda: client.lost)
    assert client.written == b"HTTP/1.0 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi"
    assert not client.aborted


async def test_an_http10_client_gets_a_body_of_unknown_length_delimited_by_the_close() -> None:
    body = BodyStream(None, lambda: None, lambda: None)
    _, client = downstream(lambda request, reply: reply(Response(200, b"OK", [], body)))

    client.peer_sends(b"GET / HTTP/1.0\r\n\r\n")
    body.feed(b"part one, ")
    await until(lambda: client.written)
    body.feed(b"part two")
    body.finish()
    await until(lambda: client.lost)
    assert client.written == b"HTTP/1.0 200 OK\r\nconnection: close\r\n\r\npart one, part two"
    assert not client.aborted


async def test_a_client_that_half_closes_after_its_request_still_gets_the_response() -> None:
    handler = Scripted()
    _, client = downstream(handler)
    client.peer_sends(get(b"/"))
    client.peer_closes()  # done sending, still reading
    await handler.request(0)
    assert not client.closed

    handler.answer(0, ok(b"hi"))
    await until(lambda: client.lost)
    assert client.written == reply(b"hi", close=True)
    assert not client.aborted


# --- phase time limits (check_timeouts with a chosen `now`) ----------------------------------

LIMITS = ServerSettings(header_timeout=10, idle_timeout=60, body_timeout=30, send_timeout=20)


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_an_idle_keep_alive_connection_closes_after_the_idle_timeout_and_not_before() -> None:
    protocol, client = downstream(lambda request, reply: reply(ok(b"hi")), LIMITS)
    before = now()  # idle from when the response is written, a little later
    client.peer_sends(get(b"/"))
    await until(lambda: client.written)

    protocol.check_timeouts(before + 59)
    assert not client.closed
    protocol.check_timeouts(now() + 61)
    assert client.closed and not client.aborted
    assert client.written == reply(b"hi")  # closed quietly: no response to nothing


async def test_a_head_not_finished_within_the_header_timeout_gets_408_and_the_close() -> None:
    handler = Scripted()
    protocol, client = downstream(handler, LIMITS)
    protocol.check_timeouts(now() + 30)  # idle, not slow: the head's clock starts at its first byte
    assert not client.closed

    before = now()
    client.peer_sends(b"GET / HTTP/1.1\r\nHost: pay")
    protocol.check_timeouts(before + 9)
    assert client.written == b""
    protocol.check_timeouts(now() + 11)
    assert client.written.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert client.written.endswith(b"\r\n\r\nrequest headers not received in time\n")
    assert client.closed
    assert handler.requests == []


async def test_a_head_timeout_is_reported_as_a_408_dpe() -> None:
    reported: list[tuple[int, str]] = []
    protocol, client = downstream(
        Scripted(),
        LIMITS,
        completed=lambda head, decision, status, flags, start, request, *_: reported.append(
            (status, flags)
        ),
    )
    client.peer_sends(b"GET / HTTP/1.1\r\nHost: pay")
    protocol.check_timeouts(now() + 11)
    assert reported == [(408, "DPE")]


async def test_a_body_that_stops_arriving_gets_408_and_its_request_fails() -> None:
    async def upload(request: Request) -> Response:
        return ok(await read_body(request))

    protocol, client = downstream(answering(upload), LIMITS)
    before = now()
    client.peer_sends(b"POST / HTTP/1.1\r\nHost: payments\r\nContent-Length: 10\r\n\r\nhello")
    await settle()
    protocol.check_timeouts(before + 29)
    assert client.written == b""

    protocol.check_timeouts(now() + 31)
    await until(lambda: client.lost)
    assert client.written.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert b"x-outrigger-flags: DPE\r\nconnection: close\r\n" in client.written
    assert client.written.endswith(b"request body stopped arriving\n")


async def test_a_request_waiting_for_its_response_is_not_cut_by_the_phase_limits() -> None:
    handler, protocol, client = await in_flight(LIMITS)

    protocol.check_timeouts(now() + 3600)  # the total timeout is the policy's, not the server's
    handler.answer(0, ok(b"late"))
    await until(lambda: client.written)
    assert client.written == reply(b"late")
    assert not client.closed


async def test_a_client_that_stops_reading_is_cut_off_after_the_send_timeout() -> None:
    body = BodyStream(None, lambda: None, lambda: None)
    protocol, client = downstream(
        lambda request, reply: reply(Response(200, b"OK", [], body)), LIMITS
    )
    client.peer_sends(get(b"/big"))
    body.feed(b"x" * 1000)
    await until(lambda: client.written)

    before = now()
    client.peer_stops_reading()
    body.feed(b"y" * 1000)
    protocol.check_timeouts(before + 19)
    assert not client.closed
    protocol.check_timeouts(now() + 21)
    assert client.aborted  # its buffered bytes are dropped, not flushed to a peer who won't read


# --- tunnels (Upgrade) -------------------------------------------------------------------------

UPGRADE = (
    b"GET /chat HTTP/1.1\r\nHost: payments\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
)
SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"


async def tunnel(p: Proxy) -> FakeTransport:
    """An upgrade request answered 101: the client and the returned upstream are tunnelled."""
    p.client.peer_sends(UPGRADE)
    upstream = await p.upstream(0)
    upstream.peer_sends(SWITCHING)
    await until(lambda: p.client.written)
    assert p.client.take() == SWITCHED
    return upstream


async def test_an_upgrade_becomes_a_tunnel_after_the_101_and_carries_bytes_both_ways() -> None:
    p = proxy()
    p.client.peer_sends(UPGRADE + b"early")  # the client speaks first, before any answer
    upstream = await p.upstream(0)
    assert upstream.written == (
        b"GET /chat HTTP/1.1\r\nhost: payments\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n"
    )  # the early bytes wait for the 101 (docs/hardening.md rule 7)
    upstream.peer_sends(SWITCHING + b"hello")

    await until(lambda: upstream.written.endswith(b"early"))
    assert p.client.written == SWITCHED + b"hello"
    p.client.take()
    p.client.peer_sends(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: raw bytes
    assert upstream.written.endswith(b"earlyGET / HTTP/1.1\r\n\r\n")
    upstream.peer_sends(b"pong")
    assert p.client.take() == b"pong"
    assert not p.upstreams.pool(ENDPOINT).idle  # a tunnel is never pooled


async def test_a_refused_upgrade_is_an_ordinary_response_and_nothing_after_it_is_forwarded() -> (
    None
):
    p = proxy()
    p.client.peer_sends(UPGRADE + b"early")
    upstream = await p.upstream(0)
    upstream.peer_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno")

    await until(lambda: p.client.lost)
    assert (
        p.client.written == b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nno"
    )
    assert b"early" not in upstream.written


async def test_a_client_that_stops_reading_pauses_the_upstream_side_of_a_tunnel() -> None:
    p = proxy()
    upstream = await tunnel(p)

    p.client.peer_stops_reading()
    assert not upstream.reading
    upstream.peer_sends(b"held")
    await settle()
    assert p.client.fresh == b""
    p.client.peer_reads()
    await until(lambda: p.client.fresh)
    assert upstream.reading
    assert p.client.take() == b"held"


async def test_an_upstream_that_stops_reading_pauses_the_client_side_of_a_tunnel() -> None:
    p = proxy()
    upstream = await tunnel(p)

    upstream.peer_stops_reading()
    assert not p.client.reading
    p.client.peer_sends(b"held")
    await settle()
    assert not upstream.written.endswith(b"held")
    upstream.peer_reads()
    await until(lambda: upstream.written.endswith(b"held"))
    assert p.client.reading


async def test_a_client_reset_in_a_tunnel_aborts_the_upstream() -> None:
    p = proxy()
    upstream = await tunnel(p)
    p.client.peer_resets()
    assert upstream.aborted
    await until(lambda: upstream.lost)


async def test_an_upstream_reset_in_a_tunnel_ends_the_client_connection() -> None:
    p = proxy()
    upstream = await tunnel(p)
    upstream.peer_resets()
    await until(lambda: p.client.lost)
    assert p.protocol not in p.protocol.state.connections


async def test_a_client_half_close_in_a_tunnel_reaches_the_upstream_which_may_still_answer() -> (
    None
):
    p = proxy()
    upstream = await tunnel(p)

    p.client.peer_sends(b"last words")
    p.client.peer_closes()
    assert upstream.eof_written and not upstream.closed
    upstream.peer_sends(b"the answer")
    assert p.client.take() == b"the answer"
    upstream.peer_closes()  # both ways done: both connections close, flushing what they hold

    await until(lambda: p.client.lost and upstream.lost)
    assert not p.client.aborted and not upstream.aborted
    assert upstream.written.endswith(b"last words")
    assert p.protocol not in p.protocol.state.connections


async def test_an_upstream_half_close_in_a_tunnel_reaches_the_client_which_may_still_send() -> None:
    p = proxy()
    upstream = await tunnel(p)

    upstream.peer_sends(b"bye")
    upstream.peer_closes()
    assert p.client.take() == b"bye"
    assert p.client.eof_written and not p.client.closed
    p.client.peer_sends(b"one more thing")
    assert upstream.written.endswith(b"one more thing")
    p.client.peer_closes()

    await until(lambda: p.client.lost and upstream.lost)
    assert not p.client.aborted and not upstream.aborted
    assert p.protocol not in p.protocol.state.connections


async def test_an_upstream_end_closes_a_tunnelled_client_that_cannot_half_close() -> None:
    p = proxy(can_write_eof=False)  # a TLS client, say
    upstream = await tunnel(p)

    upstream.peer_sends(b"bye")
    upstream.peer_closes()
    await until(lambda: p.client.lost and upstream.lost)
    assert p.client.take() == b"bye"
    assert not p.client.aborted and not upstream.aborted


async def test_a_tunnel_idle_past_the_stream_idle_timeout_is_closed_both_ways() -> None:
    p = proxy(ServerSettings(stream_idle_timeout=300))
    upstream = await tunnel(p)
    p.client.peer_sends(b"ping")
    upstream.peer_sends(b"pong")
    last = now()  # the last byte either way

    p.protocol.check_timeouts(last + 299)
    assert not p.client.closed and not upstream.closed
    p.protocol.check_timeouts(now() + 301)
    assert p.client.aborted and upstream.aborted
    await until(lambda: p.client.lost and upstream.lost)
    assert p.protocol not in p.protocol.state.connections


# --- graceful drain ---------------------------------------------------------------------------


async def test_a_drain_closes_an_idle_connection_at_once() -> None:
    protocol, client = downstream(lambda request, reply: reply(ok(b"hi")))
    client.peer_sends(get(b"/"))
    await until(lambda: client.written)

    assert await asyncio.wait_for(protocol.state.drain(WAIT), WAIT)
    assert client.closed and not client.aborted


async def test_a_drain_lets_a_request_in_flight_finish_then_closes_its_connection() -> None:
    handler, protocol, client = await in_flight()

    draining = asyncio.get_running_loop().create_task(protocol.state.drain(WAIT))
    await settle()
    assert not client.closed
    handler.answer(0, ok(b"done"))
    assert await asyncio.wait_for(draining, WAIT)
    assert client.written == reply(b"done", close=True)
    assert client.lost and not client.aborted


async def test_a_connection_that_does_not_finish_within_the_drain_timeout_is_aborted() -> None:
    _, protocol, client = await in_flight()

    assert not await asyncio.wait_for(protocol.state.drain(0.01), WAIT)
    assert client.aborted


# --- a client gone mid-response ---------------------------------------------------------------

STREAM_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_client_gone_mid_response_closes_the_upstream_connection_at_once() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/events"))
    upstream = await p.upstream(0)
    upstream.peer_sends(STREAM_HEAD + b"5\r\nfirst\r\n")  # a stream that may never end
    await until(lambda: p.client.written)

    p.client.peer_resets()
    await until(lambda: upstream.aborted)  # not read on into the void
    assert p.outcomes == [(200, "DC")]


async def streaming_to_a_client_not_reading(p: Proxy) -> FakeTransport:
    """A response streaming from the returned upstream to a client that stopped reading."""
    p.client.peer_sends(get(b"/events"))
    upstream = await p.upstream(0)
    upstream.peer_sends(STREAM_HEAD + b"5\r\nfirst\r\n")
    await until(lambda: p.client.written)
    p.client.peer_stops_reading()
    upstream.peer_sends(b"4\r\nmore\r\n")
    await until(lambda: p.client.written.endswith(b"more\r\n"))
    return upstream


async def test_a_client_cut_off_by_the_send_timeout_closes_the_upstream_connection_at_once() -> (
    None
):
    p = proxy(LIMITS)
    upstream = await streaming_to_a_client_not_reading(p)

    p.protocol.check_timeouts(now() + 21)
    assert p.client.aborted
    await until(lambda: upstream.lost)  # aborted, not left open and busy until the 300 s sweep
    assert upstream.aborted
    assert p.upstreams.pool(ENDPOINT).in_use == set()
    assert p.outcomes == [(200, "DC")]


async def test_a_client_gone_while_not_reading_closes_the_upstream_connection_at_once() -> None:
    p = proxy()
    upstream = await streaming_to_a_client_not_reading(p)

    p.client.peer_resets()
    await until(lambda: upstream.aborted)
    assert p.outcomes == [(200, "DC")]


async def test_the_request_and_its_cycle_are_the_ones_their_constructors_would_make() -> None:
    # The request path builds the Request and its _Cycle without their __init__ (a cost per
    # request): every slot must still be there, with the values __init__ would give.
    handed: list[tuple[Request, Reply]] = []
    protocol, client = downstream(lambda request, reply: handed.append((request, reply)))
    client.peer_sends(b"GET /x?y HTTP/1.0\r\nHost: payments\r\nAccept: */*\r\n\r\n")
    await until(lambda: bool(handed))

    ((request, reply),) = handed
    made = Request(
        b"GET", b"/x?y", b"payments", [(b"accept", b"*/*")], EMPTY_BODY, b"1.0", None, None, None
    )
    unset = object()  # `timeouts` is left unset by both (sidecar/exchange.py says why)
    for slot in Request.__slots__:
        assert getattr(request, slot, unset) == getattr(made, slot, unset), slot
    cycle = cast(_Cycle, getattr(reply, "__self__"))  # noqa: B009 (a bound method's instance)
    assert cycle is protocol.cycle and cycle.request is request
    fresh = _Cycle(protocol, cycle.head, cycle.decision, request, cycle.start)
    fresh.started = True  # handed over, as the request path marks it
    for slot in RequestCycle.__slots__:
        assert getattr(cycle, slot) == getattr(fresh, slot), slot


def test_request_ids_are_distinct_32_hex_digits_across_batches() -> None:
    ids = [_request_id() for _ in range(600)]  # over two refills of the 256-id batch
    assert len(set(ids)) == 600
    assert all(re.fullmatch(rb"[0-9a-f]{32}", value) for value in ids)
