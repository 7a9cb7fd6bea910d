"""RequestParser: bytes in, events out. One test per docs/hardening.md rule the codec enforces."""

from __future__ import annotations

import pytest

from sidecar.protocol import (
    Data,
    EndOfMessage,
    Limits,
    Reject,
    RequestEvent,
    RequestHead,
    RequestParser,
)

# Every test here runs on the compiled codec and on the pure-Python reference (conftest.py).
pytestmark = pytest.mark.usefixtures("implementation")

GET = b"GET /x?y=1 HTTP/1.1\r\nHost: Payments:8080\r\nAccept: */*\r\nX-Trace: t1\r\n\r\n"


def feed(data: bytes, limits: Limits = Limits()) -> list[RequestEvent]:  # noqa: B008
    parser = RequestParser(limits)
    return parser.feed(data) + parser.feed_eof()


def reject(data: bytes, limits: Limits = Limits()) -> Reject:  # noqa: B008
    events = feed(data, limits)
    last = events[-1]
    assert isinstance(last, Reject), events
    return last


def head(data: bytes) -> RequestHead:
    events = RequestParser().feed(data)
    assert isinstance(events[0], RequestHead), events
    return events[0]


def req(*lines: bytes, body: bytes = b"", first: bytes = b"POST /p HTTP/1.1") -> bytes:
    return b"\r\n".join((first, *lines)) + b"\r\n\r\n" + body


# --- the basics -------------------------------------------------------------------------------


def test_simple_get_gives_head_and_end_of_message() -> None:
    events = feed(GET)
    assert events == [
        RequestHead(
            method=b"GET",
            path=b"/x?y=1",
            authority=b"payments:8080",
            version=b"1.1",
            headers=[(b"accept", b"*/*"), (b"x-trace", b"t1")],
            keep_alive=True,
            content_length=None,
            chunked=False,
            expect_continue=False,
            upgrade=None,
            absolute_form=False,
        ),
        EndOfMessage(),
    ]


def test_header_names_are_lower_cased_and_values_kept_as_sent() -> None:
    h = head(b"GET / HTTP/1.1\r\nHOST: a\r\nX-MiXed: VaLue  \r\n\r\n")
    assert h.headers == [(b"x-mixed", b"VaLue")]


def test_content_length_body_is_emitted_as_data() -> None:
    events = feed(req(b"Host: a", b"Content-Length: 5", body=b"hello"))
    assert events[1:] == [Data(b"hello"), EndOfMessage()]
    assert isinstance(events[0], RequestHead)
    assert events[0].content_length == 5
    assert not events[0].chunked


def test_pipelined_requests_in_one_feed_give_all_events_in_order() -> None:
    data = GET + req(b"Host: a", b"Content-Length: 3", body=b"abc") + GET
    events = feed(data)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "RequestHead",
        "EndOfMessage",
        "RequestHead",
        "Data",
        "EndOfMessage",
        "RequestHead",
        "EndOfMessage",
    ]


def test_request_split_byte_by_byte_gives_the_same_events() -> None:
    data = GET + req(
        b"Host: a", b"Transfer-Encoding: chunked", body=b"3;x=1\r\nabc\r\n0\r\nT: v\r\n\r\n"
    )
    whole = feed(data)
    parser = RequestParser()
    pieces: list[RequestEvent] = []
    for i in range(len(data)):
        pieces += parser.feed(data[i : i + 1])
    pieces += parser.feed_eof()
    body = b"".join(e.data for e in pieces if isinstance(e, Data))
    assert body == b"abc"
    assert [e for e in pieces if not isinstance(e, Data)] == [
        e for e in whole if not isinstance(e, Data)
    ]


def test_chunked_body_with_extensions_and_trailers_is_decoded() -> None:
    body = (
        b'4;name=val;q="a b"\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n'
        b"0\r\nExpires: x\r\n\r\n"
    )
    events = feed(req(b"Host: a", b"Transfer-Encoding: chunked", body=body))
    assert isinstance(events[0], RequestHead)
    assert events[0].chunked and events[0].content_length is None
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"Wikipedia in\r\n\r\nchunks."
    assert events[-1] == EndOfMessage()


def test_leading_empty_lines_before_a_request_are_ignored() -> None:
    assert isinstance(feed(b"\r\n\r\n" + GET)[0], RequestHead)


def test_eof_between_requests_is_clean_and_eof_mid_request_is_rejected() -> None:
    parser = RequestParser()
    parser.feed(GET)
    assert parser.feed_eof() == []
    parser = RequestParser()
    assert parser.feed(GET[:10]) == []
    assert parser.feed_eof() == [Reject(400, "connection closed in the middle of a request")]


def test_eof_in_the_middle_of_a_body_is_rejected() -> None:
    assert reject(req(b"Host: a", b"Content-Length: 5", body=b"he")).status == 400


# --- rule 1: bytes, not text ------------------------------------------------------------------


def test_non_ascii_digits_in_content_length_are_rejected() -> None:
    assert reject(req(b"Host: a", "Content-Length: ٣".encode())).status == 400


def test_lower_case_method_is_rejected() -> None:
    assert reject(b"get / HTTP/1.1\r\nHost: a\r\n\r\n").status == 400


def test_unknown_http_version_is_rejected() -> None:
    for version in (b"HTTP/2.0", b"HTTP/1.2", b"HTTP/0.9", b"http/1.1"):
        assert reject(b"GET / " + version + b"\r\nHost: a\r\n\r\n").status == 400


def test_request_line_with_two_spaces_is_rejected() -> None:
    assert reject(b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n").status == 400


# --- rule 2: one framing or none --------------------------------------------------------------


def test_content_length_with_transfer_encoding_is_rejected() -> None:
    r = reject(
        req(b"Host: a", b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n")
    )
    assert r.status == 400


def test_transfer_encoding_before_content_length_is_rejected() -> None:
    r = reject(
        req(b"Host: a", b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n")
    )
    assert r.status == 400


def test_duplicate_content_length_that_disagrees_is_rejected() -> None:
    r = reject(req(b"Host: a", b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"))
    assert r.status == 400


@pytest.mark.parametrize(
    "value", [b"+5", b"-5", b"5,5", b"0x5", b"5.0", b"", b"1" * 20, b"5 5", b"1_0"]
)
def test_content_length_must_be_plain_digits(value: bytes) -> None:
    assert reject(req(b"Host: a", b"Content-Length: " + value, body=b"hello")).status == 400


def test_unknown_transfer_coding_is_501() -> None:
    assert reject(req(b"Host: a", b"Transfer-Encoding: gzip")).status == 501
    assert reject(req(b"Host: a", b"Transfer-Encoding: gzip, chunked")).status == 501


def test_chunked_not_last_is_rejected() -> None:
    assert reject(req(b"Host: a", b"Transfer-Encoding: chunked, gzip")).status == 400


def test_chunked_twice_is_rejected() -> None:
    assert reject(req(b"Host: a", b"Transfer-Encoding: chunked, chunked")).status == 400
    assert (
        reject(req(b"Host: a", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")).status
        == 400
    )


def test_transfer_encoding_on_http_1_0_is_rejected() -> None:
    data = req(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n", first=b"POST / HTTP/1.0")
    assert reject(data).status == 400


def test_transfer_encoding_value_is_case_insensitive() -> None:
    events = feed(req(b"Host: a", b"Transfer-Encoding: Chunked", body=b"0\r\n\r\n"))
    assert isinstance(events[0], RequestHead) and events[0].chunked


@pytest.mark.parametrize(
    "body",
    [
        b"5 \r\nhello\r\n0\r\n\r\n",  # space after size
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",  # bad terminator
        b"5\nhello\n0\n\n",  # bare LF
        b"5\r\nhello\n0\r\n\r\n",
        b"\r\n5\r\nhello\r\n0\r\n\r\n",  # empty size
        b"11111111111111111\r\n",  # 17 hex digits
        b"5;\r\nhello\r\n0\r\n\r\n",  # empty extension
        b"5; a=b\r\nhello\r\n0\r\n\r\n",  # whitespace in extension
        b"0\r\nBad Trailer: x\r\n\r\n",
        b"0\r\nX: a\x01b\r\n\r\n",
    ],
)
def test_malformed_chunked_framing_is_rejected(body: bytes) -> None:
    assert reject(req(b"Host: a", b"Transfer-Encoding: chunked", body=body)).status == 400


def test_chunk_extension_bytes_are_bounded_per_message() -> None:
    ext = b";e=" + b"x" * 100
    body = (b"1" + ext + b"\r\na\r\n") * 3 + b"0\r\n\r\n"
    limits = Limits(max_chunk_ext_bytes=250)
    r = reject(req(b"Host: a", b"Transfer-Encoding: chunked", body=body), limits)
    assert r == Reject(400, "too many chunk-extension bytes")
    events = feed(
        req(b"Host: a", b"Transfer-Encoding: chunked", body=body), Limits(max_chunk_ext_bytes=400)
    )
    assert events[-1] == EndOfMessage()


def test_an_unfinished_chunk_size_line_cannot_grow_without_bound() -> None:
    parser = RequestParser(Limits(max_chunk_ext_bytes=64))
    assert parser.feed(req(b"Host: a", b"Transfer-Encoding: chunked"))[-1] != Reject
    events = parser.feed(b"5;a=" + b"b" * 200)
    assert events and isinstance(events[-1], Reject) and events[-1].status == 400


# --- rule 3: names and values -----------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"X_Forwarded_For: 1.2.3.4",  # underscore
        b"X : a",  # whitespace before colon
        b"X\t: a",
        b": a",  # empty name
        b"X\x01Y: a",
        b"X: a\x00b",  # NUL
        b"X: a\x7fb",
        b"X: a\x1bb",
        b"X: a\rb",  # bare CR
        b"X: a\nb",  # bare LF
        b"X: a\r\n b",  # obs-fold
        b"X: a\r\n\tb",
    ],
)
def test_bad_header_names_and_values_are_rejected(line: bytes) -> None:
    assert reject(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n").status == 400


def test_bare_lf_line_endings_are_rejected() -> None:
    assert reject(b"GET / HTTP/1.1\nHost: a\n\n").status == 400


def test_obs_text_in_values_is_kept() -> None:
    assert head(b"GET / HTTP/1.1\r\nHost: a\r\nX: caf\xc3\xa9\r\n\r\n").headers == [
        (b"x", b"caf\xc3\xa9")
    ]


def test_missing_host_on_http_1_1_is_rejected() -> None:
    assert reject(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n") == Reject(400, "missing Host header")


def test_duplicate_host_is_rejected() -> None:
    assert reject(b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n").status == 400


@pytest.mark.parametrize(
    "host", [b"", b"a b", b"user@a", b"a:", b"a:123456", b"a:8o", b"a/b", b"[zz]", b"a\xc3\xa9"]
)
def test_invalid_host_is_rejected(host: bytes) -> None:
    assert reject(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n").status == 400


def test_http_1_0_without_host_has_empty_authority() -> None:
    h = head(b"GET / HTTP/1.0\r\n\r\n")
    assert h.authority == b"" and h.version == b"1.0"


# --- rule 4: limits with the right status -----------------------------------------------------


def test_request_line_over_limit_is_414() -> None:
    limits = Limits(max_request_line=100)
    assert reject(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", limits).status == 414


def test_request_line_over_limit_is_414_before_the_head_is_complete() -> None:
    parser = RequestParser(Limits(max_request_line=100))
    events = parser.feed(b"GET /" + b"a" * 200)
    assert events == [Reject(414, "request line too long")]


def test_header_section_over_limit_is_431() -> None:
    limits = Limits(max_header_bytes=200)
    data = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 300 + b"\r\n\r\n"
    assert reject(data, limits).status == 431


def test_header_section_dripping_in_is_cut_off_at_the_limit() -> None:
    parser = RequestParser(Limits(max_header_bytes=1000))
    parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX: ")
    events: list[RequestEvent] = []
    for _ in range(200):
        events += parser.feed(b"vvvvvvvvvv")
    assert events == [Reject(431, "request header section too large")]


def test_too_many_headers_is_431() -> None:
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(11))
    data = b"GET / HTTP/1.1\r\nHost: a\r\n" + lines + b"\r\n"
    assert reject(data, Limits(max_headers=10)).status == 431
    assert isinstance(feed(data, Limits(max_headers=12))[0], RequestHead)


# --- rule 6: after an error, stop -------------------------------------------------------------


def test_after_a_reject_nothing_more_is_parsed() -> None:
    parser = RequestParser()
    events = parser.feed(GET + b"GET / HTTP/1.1\r\nX_Y: 1\r\nHost: a\r\n\r\n" + GET)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage, Reject]
    assert parser.feed(GET) == []
    assert parser.feed_eof() == []


# --- rule 7: hop-by-hop, upgrade, CONNECT -----------------------------------------------------


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    h = head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n"
        b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nX-Secret: s\r\nX-Kept: k\r\n\r\n"
    )
    assert h.headers == [(b"x-kept", b"k")]
    assert h.keep_alive


@pytest.mark.parametrize("value", [b"close", b"keep-alive"])
def test_proxy_connection_is_removed_without_ending_the_connection(value: bytes) -> None:
    data = b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Connection: " + value + b"\r\n\r\n" + GET
    events = RequestParser().feed(data)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage, RequestHead, EndOfMessage]
    assert isinstance(events[0], RequestHead) and events[0].headers == []


def test_connection_close_turns_keep_alive_off_and_ends_parsing() -> None:
    parser = RequestParser()
    events = parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n" + GET)
    assert len(events) == 2 and isinstance(events[0], RequestHead)
    assert not events[0].keep_alive


def test_websocket_upgrade_keeps_the_rest_raw() -> None:
    parser = RequestParser()
    data = (
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: k\r\n\r\nRAW\x00\x01"
    )
    events = parser.feed(data)
    assert len(events) == 2 and events[1] == EndOfMessage()
    assert isinstance(events[0], RequestHead)
    assert events[0].upgrade == b"websocket"
    assert events[0].headers == [(b"sec-websocket-key", b"k")]
    assert parser.feed(b"GET / HTTP/1.1\r\n\r\n") == []
    assert parser.take_upgrade_rest() == b"RAW\x00\x01GET / HTTP/1.1\r\n\r\n"
    assert parser.take_upgrade_rest() == b""


def test_h2c_upgrade_is_not_tunnelled() -> None:
    parser = RequestParser()
    data = (
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
    )
    events = parser.feed(data + GET)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage, RequestHead, EndOfMessage]
    assert isinstance(events[0], RequestHead)
    assert events[0].upgrade is None and events[0].headers == []


def test_upgrade_without_connection_upgrade_is_ignored() -> None:
    h = head(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert h.upgrade is None


def test_upgrade_on_a_post_with_body_is_not_tunnelled() -> None:
    parser = RequestParser()
    events = parser.feed(
        req(
            b"Host: a",
            b"Connection: upgrade",
            b"Upgrade: websocket",
            b"Content-Length: 2",
            body=b"ab",
        )
        + GET
    )
    assert [type(e) for e in events] == [RequestHead, Data, EndOfMessage, RequestHead, EndOfMessage]


def test_connect_is_refused_with_405() -> None:
    assert reject(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n") == Reject(
        405, "CONNECT is not supported"
    )


def test_expect_100_continue_sets_the_flag_and_is_removed() -> None:
    h = head(req(b"Host: a", b"Expect: 100-Continue", b"Content-Length: 3"))
    assert h.expect_continue and h.headers == []


def test_other_expectations_are_417() -> None:
    assert reject(req(b"Host: a", b"Expect: something", b"Content-Length: 3")).status == 417


# --- rule 10: HTTP/1.0 clients ----------------------------------------------------------------


def test_http_1_0_is_never_keep_alive() -> None:
    h = head(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n")
    assert not h.keep_alive


# --- rule 11: one authority -------------------------------------------------------------------


def test_absolute_form_decides_the_authority_and_path_becomes_origin_form() -> None:
    h = head(b"GET http://Payments:9000/a/b?c=d HTTP/1.1\r\nHost: other\r\n\r\n")
    assert (h.authority, h.path, h.absolute_form) == (b"payments:9000", b"/a/b?c=d", True)


def test_absolute_form_with_empty_path_becomes_slash() -> None:
    assert head(b"GET http://payments HTTP/1.1\r\nHost: payments\r\n\r\n").path == b"/"
    assert head(b"GET http://payments?q HTTP/1.1\r\nHost: payments\r\n\r\n").path == b"/?q"


def test_absolute_form_with_malformed_host_header_is_still_rejected() -> None:
    assert reject(b"GET http://payments/ HTTP/1.1\r\nHost: a b\r\n\r\n").status == 400


@pytest.mark.parametrize(
    "target", [b"https://payments/x", b"ftp://payments/x", b"http://user@payments/x", b"http:///x"]
)
def test_absolute_form_other_than_plain_http_is_rejected(target: bytes) -> None:
    assert reject(b"GET " + target + b" HTTP/1.1\r\nHost: payments\r\n\r\n").status == 400


def test_fragment_in_target_is_rejected() -> None:
    assert reject(b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n").status == 400


def test_asterisk_form_is_only_for_options() -> None:
    assert head(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").path == b"*"
    assert reject(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n").status == 400
