"""Fast-path writes held to the end of the loop's round (sidecar/transport/outbox.py): each
connection's bytes in order, one write per message, nothing written after an abort, and a
close only after what was held."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from sidecar.transport.outbox import Outbox, outbox, release_held
from tests.sidecar.transport.fake import settle, until
from tests.sidecar.transport.harness import Scripted, downstream, ok, proxy


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET %b HTTP/1.1\r\nHost: payments\r\n%b\r\n" % (path, extra)


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (len(body), body)


async def test_whole_responses_of_one_round_are_written_together_at_its_end() -> None:
    handler = Scripted()
    _, first = downstream(handler)
    _, second = downstream(handler)
    first.peer_sends(get(b"/one"))
    second.peer_sends(get(b"/two"))
    await handler.request(1)
    handler.answer(0, ok(b"one"))
    handler.answer(1, ok(b"two"))
    assert first.writes == second.writes == []  # held: the round is not over
    await settle()
    assert first.writes == [answer(b"one")]
    assert second.writes == [answer(b"two")]


async def test_one_flush_per_round_however_many_connections_hold_a_write() -> None:
    assert outbox(asyncio.get_running_loop()) is outbox(asyncio.get_running_loop())  # per loop
    scheduled: list[Callable[[], None]] = []

    class Loop:
        def call_soon(self, callback: Callable[[], None]) -> None:
            scheduled.append(callback)

    box = Outbox(cast(asyncio.AbstractEventLoop, Loop()))
    flushed: list[str] = []

    class Transport:
        def write(self, data: bytes) -> None:
            flushed.append(data.decode())

    class Holder:
        def __init__(self, name: str, closed: bool = False) -> None:
            self.held: bytes | None = name.encode()
            self.closed = closed
            self.transport: asyncio.Transport | None = cast(asyncio.Transport, Transport())

        release_held = release_held  # the connections' own method

    holders = [Holder("a"), Holder("b"), Holder("gone", closed=True), Holder("c")]
    for holder in holders:
        box.hold(holder)
    assert scheduled == [box.flush]
    scheduled.pop()()
    assert flushed == ["a", "b", "c"]  # a closed connection's bytes are dropped
    assert box.held == [] and all(holder.held is None for holder in holders)
    box.hold(Holder("d"))  # a new round schedules its own flush
    assert scheduled == [box.flush]
    scheduled.pop()()
    assert flushed == ["a", "b", "c", "d"]


async def test_a_response_held_on_a_connection_then_closed_is_written_before_the_close() -> None:
    handler = Scripted()
    _, client = downstream(handler)
    client.peer_sends(get(b"/last", b"Connection: close\r\n"))
    await handler.request(0)
    handler.answer(0, ok(b"bye"))
    # the cycle closed the connection at once; the held response went out first
    assert client.writes == [
        b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 3\r\n\r\nbye"
    ]
    assert client.closed and not client.aborted
    await settle()
    assert len(client.writes) == 1  # the outbox's flush found nothing more to write


async def test_a_response_held_when_the_client_is_cut_off_is_dropped() -> None:
    handler = Scripted()
    protocol, client = downstream(handler)
    client.peer_sends(get(b"/one"))
    await handler.request(0)
    handler.answer(0, ok(b"one"))
    protocol.abort()
    await settle()
    assert client.writes == []
    assert protocol.held is None


async def test_a_request_head_is_held_to_the_end_of_the_round_then_one_write() -> None:
    p = proxy()
    p.client.peer_sends(get(b"/first"))
    upstream = await p.upstream(0)  # a new connection: its head went out when it opened
    upstream.take()
    upstream.peer_sends(answer(b"first"))
    await until(lambda: p.client.fresh)
    p.client.take()
    box = outbox(asyncio.get_running_loop())
    p.client.peer_sends(get(b"/second"))  # on the pooled connection, within this call
    assert not upstream.fresh  # held, not written yet
    assert len(box.held) == 1
    await settle()
    assert upstream.take().startswith(b"GET /second HTTP/1.1\r\n")
    assert len(upstream.writes) == 2  # one write per request head
