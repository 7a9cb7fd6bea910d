"""ResponseParser: upstream bytes in, events out (docs/hardening.md rules 2, 3, 6, 7, 9)."""

from __future__ import annotations

import pytest

from sidecar.protocol import (
    Data,
    EndOfMessage,
    Limits,
    Reject,
    ResponseEvent,
    ResponseHead,
    ResponseParser,
)

# Every test here runs on the compiled codec and on the pure-Python reference (conftest.py).
pytestmark = pytest.mark.usefixtures("implementation")

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"


def parse(data: bytes, method: bytes = b"GET") -> tuple[list[ResponseEvent], ResponseParser]:
    parser = ResponseParser(method)
    return parser.feed(data), parser


def test_content_length_response_is_reusable() -> None:
    events, parser = parse(OK)
    assert events == [
        ResponseHead(
            status=200,
            reason=b"OK",
            version=b"1.1",
            headers=[(b"content-type", b"text/plain")],
            keep_alive=True,
            content_length=5,
            chunked=False,
            has_body=True,
            upgrade=None,
        ),
        Data(b"hello"),
        EndOfMessage(),
    ]
    assert parser.reusable


def test_response_is_not_reusable_until_complete() -> None:
    parser = ResponseParser(b"GET")
    parser.feed(OK[:-2])
    assert not parser.reusable
    parser.feed(OK[-2:])
    assert parser.reusable


def test_chunked_response_split_byte_by_byte() -> None:
    data = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
    )
    parser = ResponseParser(b"GET")
    events: list[ResponseEvent] = []
    for i in range(len(data)):
        events += parser.feed(data[i : i + 1])
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"abcde"
    assert events[-1] == EndOfMessage()
    assert parser.reusable


def test_close_delimited_body_ends_at_eof_and_is_not_reusable() -> None:
    events, parser = parse(b"HTTP/1.1 200 OK\r\n\r\nsome")
    events += parser.feed(b" body")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive
    assert parser.feed_eof() == [EndOfMessage()]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"some body"
    assert not parser.reusable


def test_eof_mid_response_is_502() -> None:
    parser = ResponseParser(b"GET")
    parser.feed(OK[:-1])
    [event] = parser.feed_eof()
    assert isinstance(event, Reject) and event.status == 502
    assert not parser.reusable


def test_eof_before_any_response_is_502() -> None:
    parser = ResponseParser(b"GET")
    [event] = parser.feed_eof()
    assert isinstance(event, Reject) and event.status == 502


def test_100_continue_then_final_response() -> None:
    events, parser = parse(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
    assert isinstance(events[0], ResponseHead)
    assert (events[0].status, events[0].has_body) == (100, False)
    assert events[1] == EndOfMessage()
    assert isinstance(events[2], ResponseHead) and events[2].status == 200
    assert events[3:] == [Data(b"hello"), EndOfMessage()]
    assert parser.reusable


@pytest.mark.parametrize(
    "interim",
    [b"HTTP/1.1 100 Continue\r\nConnection: close\r\n\r\n", b"HTTP/1.0 100 Continue\r\n\r\n"],
)
def test_an_interim_response_that_says_close_does_not_refuse_the_final_one(interim: bytes) -> None:
    events, parser = parse(interim + OK)
    assert [type(e) for e in events] == [
        ResponseHead,
        EndOfMessage,
        ResponseHead,
        Data,
        EndOfMessage,
    ]
    assert parser.reusable


def test_a_reset_parser_reads_the_next_response_whatever_the_last_one_was() -> None:
    parser = ResponseParser(b"GET")
    refused = parser.feed(b"HTTP/1.1 204 No Content\r\nConnection: close\r\nX_A: 1\r\n\r\n")
    assert isinstance(refused[-1], Reject) and refused[-1].status == 502
    parser.reset(b"GET")
    assert [type(e) for e in parser.feed(OK)] == [ResponseHead, Data, EndOfMessage]
    assert parser.reusable


def test_101_switching_protocols_keeps_the_rest_raw() -> None:
    data = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x05hello"
    )
    events, parser = parse(data)
    assert len(events) == 2 and events[1] == EndOfMessage()
    assert isinstance(events[0], ResponseHead) and events[0].upgrade == b"websocket"
    assert parser.feed(b"more") == []
    assert parser.take_upgrade_rest() == b"\x81\x05hellomore"
    assert not parser.reusable


def test_101_without_upgrade_header_is_502() -> None:
    events, _ = parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    assert isinstance(events[-1], Reject) and events[-1].status == 502


@pytest.mark.parametrize(
    ("method", "status"),
    [(b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified")],
)
def test_bodiless_response_with_extra_bytes_is_not_reusable(method: bytes, status: bytes) -> None:
    events, parser = parse(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\nhello", method)
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    assert isinstance(events[0], ResponseHead) and not events[0].has_body
    assert not parser.reusable


@pytest.mark.parametrize(
    ("method", "status"),
    [(b"HEAD", b"200 OK"), (b"GET", b"204 No Content"), (b"GET", b"304 Not Modified")],
)
def test_bodiless_response_alone_is_reusable(method: bytes, status: bytes) -> None:
    events, parser = parse(b"HTTP/1.1 " + status + b"\r\nContent-Length: 5\r\n\r\n", method)
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage]
    assert parser.reusable
    assert parser.feed(b"x") == []
    assert not parser.reusable


def test_head_response_keeps_the_declared_length() -> None:
    events, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", b"HEAD")
    assert isinstance(events[0], ResponseHead) and events[0].content_length == 1234


def test_bytes_after_a_complete_response_are_not_data() -> None:
    events, parser = parse(OK + b"HTTP/1.1 200 OK\r\n\r\n")
    assert [type(e) for e in events] == [ResponseHead, Data, EndOfMessage]
    assert not parser.reusable


def test_connection_close_response_is_not_reusable() -> None:
    events, parser = parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(events[0], ResponseHead) and not events[0].keep_alive
    assert not parser.reusable


def test_http_1_0_response_without_keep_alive_is_not_reusable() -> None:
    _, parser = parse(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert not parser.reusable
    _, parser = parse(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n")
    assert parser.reusable


def test_hop_by_hop_response_headers_are_removed() -> None:
    events, _ = parse(
        b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nKeep-Alive: timeout=5\r\n"
        b"X-Internal: 1\r\nServer: s\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(events[0], ResponseHead) and events[0].headers == [(b"server", b"s")]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZ\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
        b"HTTP/1.1 200 OK\r\nX_Y: 1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
        b"HTTP/1.1 200 O\x01K\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    ],
)
def test_upstream_framing_or_syntax_errors_are_502(head: bytes) -> None:
    events, parser = parse(head)
    assert isinstance(events[-1], Reject) and events[-1].status == 502, events
    assert not parser.reusable
    assert parser.feed(OK) == []


def test_response_head_over_limit_is_502() -> None:
    parser = ResponseParser(b"GET", Limits(max_response_header_bytes=100))
    events = parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 50)
    assert events == []
    events = parser.feed(b"a" * 60)
    assert events == [Reject(502, "response head too large")]
