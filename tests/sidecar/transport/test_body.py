"""Bodies in flight: flow control, replay for retries, failure and discard."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.exchange import BodyNotReplayable
from sidecar.transport.body import BodyReset, BodyStream
from tests.sidecar.transport.fake import WAIT


class Producer:
    """The connection feeding a body: is its reading paused?"""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pause(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        self.paused = False


def stream(producer: Producer, length: int | None = None, **options: int) -> BodyStream:
    return BodyStream(length, producer.pause, producer.resume, **options)


async def chunks(body: BodyStream) -> list[bytes]:
    async with asyncio.timeout(WAIT):
        return [data async for data in body.chunks()]


async def test_a_body_pauses_its_producer_above_high_water_and_resumes_at_low_water() -> None:
    producer = Producer()
    body = stream(producer, high_water=100, low_water=40)

    body.feed(b"a" * 60)
    body.feed(b"b" * 60)
    assert producer.paused
    assert await body.read() == b"a" * 60 + b"b" * 60
    assert not producer.paused

    body.feed(b"c" * 101)
    assert producer.paused
    body.feed(b"d")
    assert producer.pauses == 2  # one pause per crossing, not per feed


async def test_a_finished_body_releases_its_paused_producer_before_it_is_read() -> None:
    producer = Producer()
    body = stream(producer, 150, high_water=100, low_water=40)
    body.feed(b"x" * 150)
    assert producer.paused
    body.finish()
    assert not producer.paused  # its connection may carry the next exchange meanwhile
    assert await body.read() == b"x" * 150
    assert producer.pauses == 1


async def test_a_reader_taking_chunks_resumes_the_producer_once_little_is_left_unread() -> None:
    producer = Producer()
    body = stream(producer, 300, high_water=100, low_water=40)
    for _ in range(3):
        body.feed(b"x" * 50)  # 150 unread
    assert producer.paused
    reader = body.chunks()
    await anext(reader)  # 100 unread
    assert producer.paused
    await anext(reader)  # 50 unread
    assert producer.paused
    await anext(reader)  # 0 unread
    assert not producer.paused


async def test_a_body_within_the_keep_limit_gives_a_retry_the_same_bytes() -> None:
    body = stream(Producer(), 6, keep_limit=10)
    body.feed(b"abc")
    body.feed(b"def")
    body.finish()

    assert body.replayable
    assert await chunks(body) == [b"abc", b"def"]
    assert await chunks(body) == [b"abc", b"def"]


async def test_a_chunked_body_is_kept_until_it_outgrows_the_keep_limit() -> None:
    body = stream(Producer(), None, keep_limit=5)
    body.feed(b"abc")
    assert body.replayable
    body.feed(b"def")
    assert not body.replayable


async def test_a_body_beyond_the_keep_limit_streams_once_and_refuses_a_second_read() -> None:
    body = stream(Producer(), 6, keep_limit=5)
    body.feed(b"abcdef")
    body.finish()

    assert not body.replayable
    assert await chunks(body) == [b"abcdef"]
    with pytest.raises(BodyNotReplayable):
        body.chunks()


async def test_the_first_read_is_announced_once_for_100_continue() -> None:
    reads: list[str] = []
    body = BodyStream(
        3, lambda: None, lambda: None, keep_limit=10, on_first_read=lambda: reads.append("read")
    )
    body.feed(b"abc")
    body.finish()
    assert reads == []
    await chunks(body)
    await chunks(body)
    assert reads == ["read"]


async def test_a_reader_gets_the_bytes_fed_before_a_failure_then_body_reset() -> None:
    body = stream(Producer(), 10)
    body.feed(b"hello")
    body.fail(BodyReset("client closed the connection"))

    reader = body.chunks()
    assert await anext(reader) == b"hello"
    with pytest.raises(BodyReset, match="client closed the connection"):
        await anext(reader)


async def test_a_waiting_reader_is_woken_by_a_failure() -> None:
    body = stream(Producer(), 10)
    waiting = asyncio.get_running_loop().create_task(body.read())
    await asyncio.sleep(0)
    body.fail(BodyReset("upstream connection lost"))
    with pytest.raises(BodyReset):
        await asyncio.wait_for(waiting, WAIT)


async def test_discarding_an_unfinished_body_closes_its_connection_once() -> None:
    closed: list[str] = []
    body = BodyStream(10, lambda: None, lambda: None, on_discard=lambda: closed.append("abort"))
    body.feed(b"part")
    body.discard()
    body.discard()
    assert closed == ["abort"]


async def test_discarding_a_finished_body_leaves_its_connection_alone() -> None:
    # Its connection was already pooled and may be serving another request.
    closed: list[str] = []
    body = BodyStream(4, lambda: None, lambda: None, on_discard=lambda: closed.append("abort"))
    body.feed(b"done")
    body.finish()
    body.discard()
    assert closed == []


@pytest.mark.parametrize("end", ["finish", "fail", "discard"])
async def test_done_callbacks_run_once_however_the_body_ends(end: str) -> None:
    body = stream(Producer(), 4)
    done: list[str] = []
    body.when_done(lambda: done.append("early"))
    if end == "finish":
        body.finish()
    elif end == "fail":
        body.fail(BodyReset("gone"))
    else:
        body.discard()
    body.finish()
    body.when_done(lambda: done.append("late"))
    assert done == ["early", "late"]
