"""Serializers write the parsed model back out, validating every name and value (rule 3)."""

from __future__ import annotations

import pytest

from sidecar.protocol import (
    LAST_CHUNK,
    RequestHead,
    RequestParser,
    chunk,
    informational,
    request_head,
    response_head,
)

# Every test here runs on the compiled codec and on the pure-Python reference (conftest.py).
pytestmark = pytest.mark.usefixtures("implementation")


def test_request_head_writes_host_first_and_framing_last() -> None:
    out = request_head(
        b"POST", b"/p?q", b"payments:80", [(b"accept", b"*/*")], content_length=3, chunked=False
    )
    assert out == (
        b"POST /p?q HTTP/1.1\r\nhost: payments:80\r\naccept: */*\r\ncontent-length: 3\r\n\r\n"
    )


def test_request_head_chunked_and_bodiless() -> None:
    chunked = request_head(b"PUT", b"/", b"a", [], content_length=None, chunked=True)
    assert chunked == b"PUT / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
    assert request_head(b"GET", b"/", b"a", [], content_length=None, chunked=False) == (
        b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    )


def test_parsed_absolute_form_request_is_written_in_origin_form() -> None:
    [head, _] = RequestParser().feed(b"GET http://payments/x HTTP/1.1\r\nHost: evil\r\n\r\n")
    assert isinstance(head, RequestHead)
    out = request_head(
        head.method, head.path, head.authority, head.headers, content_length=None, chunked=False
    )
    assert out == b"GET /x HTTP/1.1\r\nhost: payments\r\n\r\n"


@pytest.mark.parametrize(
    "header",
    [
        (b"x-id", b"a\r\nx-injected: 1"),
        (b"x-id", b"a\nb"),
        (b"x-id", b"a\x00"),
        (b"x-id", b" leading"),
        (b"x-id", b"trailing\t"),
        (b"x id", b"v"),
        (b"x_id", b"v"),
        (b"", b"v"),
        (b"x:id", b"v"),
    ],
)
def test_invalid_generated_headers_raise_naming_the_header(header: tuple[bytes, bytes]) -> None:
    headers = [(b"accept", b"*/*"), header]
    with pytest.raises(ValueError, match="header"):
        request_head(b"GET", b"/", b"a", headers, content_length=None, chunked=False)
    with pytest.raises(ValueError, match="header"):
        response_head(200, b"OK", headers, content_length=0, chunked=False, close=False)


def test_the_error_names_the_bad_header() -> None:
    with pytest.raises(ValueError, match="x-request-id"):
        request_head(
            b"GET", b"/", b"a", [(b"x-request-id", b"a\rb")], content_length=None, chunked=False
        )


def test_empty_values_and_inner_whitespace_are_allowed() -> None:
    out = response_head(
        200,
        b"OK",
        [(b"a", b""), (b"b", b"x \t y")],
        content_length=None,
        chunked=False,
        close=False,
    )
    assert out == b"HTTP/1.1 200 OK\r\na: \r\nb: x \t y\r\n\r\n"


@pytest.mark.parametrize(
    ("method", "path", "authority"),
    [
        (b"G ET", b"/", b"a"),
        (b"GET", b"/a b", b"a"),
        (b"GET", b"x", b"a"),
        (b"GET", b"/", b"a\r\n"),
    ],
)
def test_invalid_request_line_parts_raise(method: bytes, path: bytes, authority: bytes) -> None:
    with pytest.raises(ValueError):
        request_head(method, path, authority, [], content_length=None, chunked=False)


def test_response_head_close_and_framing() -> None:
    out = response_head(
        503, b"Service Unavailable", [(b"x", b"1")], content_length=2, chunked=False, close=True
    )
    assert out == (
        b"HTTP/1.1 503 Service Unavailable\r\nx: 1\r\n"
        b"connection: close\r\ncontent-length: 2\r\n\r\n"
    )
    out = response_head(
        200, b"OK", [], version=b"1.0", content_length=None, chunked=False, close=True
    )
    assert out == b"HTTP/1.0 200 OK\r\nconnection: close\r\n\r\n"


def test_response_head_refuses_impossible_framing() -> None:
    with pytest.raises(ValueError):
        response_head(200, b"OK", [], content_length=1, chunked=True, close=False)
    with pytest.raises(ValueError):
        response_head(200, b"OK", [], version=b"1.0", content_length=None, chunked=True, close=True)
    with pytest.raises(ValueError):
        response_head(200, b"O\r\nK", [], content_length=None, chunked=False, close=False)
    with pytest.raises(ValueError):
        response_head(42, b"OK", [], content_length=None, chunked=False, close=False)


def test_chunks_round_trip_through_the_parser() -> None:
    body = chunk(b"hello") + chunk(b"") + chunk(b"x" * 300) + LAST_CHUNK
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    head = request_head(b"POST", b"/", b"a", [], content_length=None, chunked=True)
    events = RequestParser().feed(head + body)
    data = b"".join(getattr(e, "data", b"") for e in events)
    assert data == b"hello" + b"x" * 300


def test_informational() -> None:
    assert informational(100, b"Continue") == b"HTTP/1.1 100 Continue\r\n\r\n"
    with pytest.raises(ValueError):
        informational(200, b"OK")
    with pytest.raises(ValueError):
        informational(101, b"Switching Protocols")
