"""The compiled codec against the pure-Python reference: the same bytes in, the same events out.

The compiled parsers take a fast path only for heads they can judge alone and hand every other
head to the reference, so what they refuse, and with which status and reason, cannot drift from
it unless the fast path accepts something the reference refuses or reads it differently. These
tests look for exactly that: heads built from the fields and values that decide framing, routing
and keep-alive (valid and not), random mutations and splits of them, and every single-byte change
of typical heads. The serializers must write the same bytes or raise the same error.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.protocol import Limits
from tests.sidecar.protocol.implementations import PYTHON, Codec, native
from tests.sidecar.protocol.test_fuzz import split

# OUTRIGGER_DIFFERENTIAL_EXAMPLES=20000 for a long local run.
EXAMPLES = int(os.environ.get("OUTRIGGER_DIFFERENTIAL_EXAMPLES", "300"))
DIFFERENTIAL = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
SMALL = Limits(
    max_request_line=40,
    max_header_bytes=90,
    max_headers=4,
    max_chunk_ext_bytes=12,
    max_response_header_bytes=120,
)


@pytest.fixture(scope="module")
def compiled() -> Codec:
    return native()


# --- what the peer sends -------------------------------------------------------------------------

# Bytes that sit at a class boundary somewhere in a head: controls, separators, "_", DEL, obs-text.
_ODD = b'\x00\x01\t\x0b\x0c\x7f\x80\xff _-:;,="\\#?/*@%[].'
_TEXT = st.binary(max_size=6) | st.text("aZ09-.:/?=&~!" + _ODD.decode("latin-1"), max_size=8).map(
    lambda s: s.encode("latin-1")
)

_METHODS = b"GET HEAD POST PUT DELETE PATCH OPTIONS TRACE CONNECT PROPFIND M-SEARCH PURGE QUERY PRI"
_METHODS += b" get GeT FOO G_T"
_TARGETS = b"/|/x?y=1|//a|/a#f|/%41?b?c|*|http://payments:8080/x?y|HTTP://A/|http://a|http://a?q"
_TARGETS += b"|https://a/|http://u@a/|http://a b/|a|"
_VERSIONS = b"HTTP/1.1|HTTP/1.0|HTTP/1.2|HTTP/2.0|http/1.1|HTTP/1.1 "
# Values of the fields that decide framing, routing and keep-alive, "|"-separated: valid ones,
# and the ones each rule refuses.
_REQUEST_FIELDS = {
    name: values.split(b"|")
    for name, values in {
        b"Host": b"a|Payments:8080|a:|a:123456|[::1]:80|a b||x_y|%41",
        b"Content-Length": b"0|5|05| 5 |-1|1e3|+5|" + b"9" * 19 + b"|" + b"9" * 20 + b"||5, 5",
        b"Transfer-Encoding": b"chunked|Chunked| chunked |gzip, chunked|chunked, gzip|identity||,"
        b"|chunked,",
        b"Connection": b"close|keep-alive|Upgrade|upgrade, close|x-a|, ,|close, x-a|close;"
        b"|Keep-Alive, CLOSE",
        b"Upgrade": b"websocket|h2c|websocket, h2c|",
        b"Expect": b"100-continue|100-Continue|foo|",
        b"Keep-Alive": b"timeout=5",
        b"TE": b"trailers",
        b"Proxy-Connection": b"close|upgrade",
        b"X-A": b"1|v| spaced value\t|\x80\xff|",
        b"Accept": b"*/*",
    }.items()
}
_NAMES = [*_REQUEST_FIELDS, b"host", b"CONTENT-LENGTH", b"X_A", b"X A", b"", b"X-A ", b" X-A"]
_SEPARATORS = [b": ", b":", b":\t", b" : ", b":  "]
_BODIES = [
    b"",
    b"hello",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"3;a=b\r\nabc\r\n0\r\nT: t\r\n\r\n",
    b'1;q="x\\"y"\r\nz\r\n0\r\n\r\n',
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\nx",
    b"1\r\nab\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\r\n",
]


@st.composite
def _field(draw: st.DrawFn, pool: dict[bytes, list[bytes]]) -> bytes:
    name = draw(st.sampled_from(_NAMES))
    values = pool.get(name, [])
    value = draw(st.sampled_from(values) | _TEXT) if values else draw(_TEXT)
    return name + draw(st.sampled_from(_SEPARATORS)) + value


@st.composite
def _head_lines(draw: st.DrawFn, first: bytes, pool: dict[bytes, list[bytes]]) -> bytes:
    lines = [first, *draw(st.lists(_field(pool), max_size=7))]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@st.composite
def _mutate(draw: st.DrawFn, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(buf)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "insert":
            buf[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"\t", b",", b"_"]))
        elif at < len(buf):
            if op == "flip":
                buf[at] = draw(st.sampled_from(_ODD + b"\r\nA0"))
            else:
                del buf[at]
    return bytes(buf)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    line = b" ".join(
        (
            draw(st.sampled_from([*_METHODS.split(), b""])),
            draw(st.sampled_from(_TARGETS.split(b"|")) | _TEXT.map(lambda t: b"/" + t)),
            draw(st.sampled_from(_VERSIONS.split(b"|"))),
        )
    )
    message = draw(_head_lines(line, _REQUEST_FIELDS)) + draw(st.sampled_from(_BODIES))
    return draw(_mutate(message))


_STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 200 ",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 204 No Content",
    b"HTTP/1.1 304 Not Modified",
    b"HTTP/1.1 404 Not\tFound \x80",
    b"HTTP/1.1 999 X",
    b"HTTP/1.1 100 Continue",
    b"HTTP/1.1 101 Switching Protocols",
    b"HTTP/1.1 103 Early Hints",
    b"HTTP/1.1 099 X",
    b"HTTP/1.1 20 OK",
    b"HTTP/1.1  200 OK",
    b"HTTP/1.2 200 OK",
    b"http/1.1 200 OK",
]
_RESPONSE_FIELDS = {
    name: values
    for name, values in _REQUEST_FIELDS.items()
    if name not in (b"Host", b"Expect", b"Upgrade")
} | {b"Upgrade": [b"websocket", b"h2,h2c"], b"Host": [b"a"], b"Expect": [b"x"]}


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    line = draw(st.sampled_from(_STATUS_LINES) | _TEXT.map(lambda t: b"HTTP/1.1 200 " + t))
    head = draw(_head_lines(line, _RESPONSE_FIELDS))
    message = head + draw(st.sampled_from(_BODIES))
    if draw(st.booleans()):  # an interim response first
        message = b"HTTP/1.1 100 Continue\r\n\r\n" + message
    return draw(_mutate(message))


# --- running both ------------------------------------------------------------------------------


def run_request(codec: Codec, chunks: list[bytes], limits: Limits) -> tuple[Any, ...]:
    parser = codec.RequestParser(limits)
    per_feed = [parser.feed(piece) for piece in chunks]
    eof = parser.feed_eof()
    return per_feed, eof, parser.take_upgrade_rest(), parser.feed(b"more"), parser.feed_eof()


def run_response(
    codec: Codec, chunks: list[bytes], method: bytes, limits: Limits
) -> tuple[Any, ...]:
    parser = codec.ResponseParser(method, limits)
    per_feed = []
    reusable = []
    for piece in chunks:
        per_feed.append(parser.feed(piece))
        reusable.append(parser.reusable)
    eof = parser.feed_eof()
    outcome = (per_feed, reusable, eof, parser.reusable, parser.take_upgrade_rest())
    parser.reset(b"GET")  # the same parser, reused for a second exchange
    again = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return (*outcome, again, parser.reusable)


def assert_same_requests(compiled: Codec, data: bytes, cuts: list[int], limits: Limits) -> None:
    chunks = split(data, cuts)
    assert run_request(compiled, chunks, limits) == run_request(PYTHON, chunks, limits), data


def assert_same_responses(
    compiled: Codec, data: bytes, cuts: list[int], method: bytes, limits: Limits
) -> None:
    chunks = split(data, cuts)
    expected = run_response(PYTHON, chunks, method, limits)
    assert run_response(compiled, chunks, method, limits) == expected, data


_CUTS = st.lists(st.integers(min_value=0, max_value=400), max_size=4)
_LIMITS = st.sampled_from([Limits(), SMALL])


@DIFFERENTIAL
@given(data=requests(), cuts=_CUTS, limits=_LIMITS)
def test_requests_give_the_reference_events(
    compiled: Codec, data: bytes, cuts: list[int], limits: Limits
) -> None:
    assert_same_requests(compiled, data, [], limits)
    assert_same_requests(compiled, data, cuts, limits)


@DIFFERENTIAL
@given(
    data=responses(),
    cuts=_CUTS,
    method=st.sampled_from([b"GET", b"HEAD", b"POST"]),
    limits=_LIMITS,
)
def test_responses_give_the_reference_events(
    compiled: Codec, data: bytes, cuts: list[int], method: bytes, limits: Limits
) -> None:
    assert_same_responses(compiled, data, [], method, limits)
    assert_same_responses(compiled, data, cuts, method, limits)


@settings(DIFFERENTIAL, max_examples=max(50, EXAMPLES // 6))  # each example is several
@given(
    data=st.lists(requests(), min_size=2, max_size=4).map(b"".join),
    cuts=_CUTS,
    limits=_LIMITS,
)
def test_pipelined_requests_give_the_reference_events(
    compiled: Codec, data: bytes, cuts: list[int], limits: Limits
) -> None:
    assert_same_requests(compiled, data, cuts, limits)


@DIFFERENTIAL
@given(data=st.binary(max_size=200), cuts=_CUTS)
def test_random_bytes_give_the_reference_events(
    compiled: Codec, data: bytes, cuts: list[int]
) -> None:
    assert_same_requests(compiled, data, cuts, Limits())
    assert_same_responses(compiled, data, cuts, b"GET", Limits())


TYPICAL_REQUESTS = [
    b"GET /x?y=1 HTTP/1.1\r\nHost: payments:8080\r\nAccept: */*\r\nX-Trace: t1\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    b"PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
    b"3;a=b\r\nabc\r\n0\r\nT: t\r\n\r\n",
    b"OPTIONS * HTTP/1.0\r\nKeep-Alive: 1\r\nTE: trailers\r\n\r\n",
    # values of 8 bytes and more: the fast path reads them a word at a time (every byte of
    # every word replaced by each of the 256, HTAB, DEL, controls and obs-text among them)
    b"GET / HTTP/1.1\r\nHost: upstream\r\nUser-Agent: Python-urllib/3.11 \x80\r\n\r\n",
]
TYPICAL_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
    b"3;a=b\r\nabc\r\n0\r\nT: t\r\n\r\n",
    b"HTTP/1.0 404 Not Found\r\nConnection: close\r\n\r\nbody",
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 05 Dec 2026 14:02:00 GMT\r\n"
    b"Content-Length: 2\r\n\r\nok",
]


# The names the compiled codec hands out as shared objects (native.pyx `_NAMES`), as peers
# spell them and in other cases; their neighbours of the same length stay ordinary fields.
_COMMON_NAMES = [
    b"Date", b"ETag", b"Vary", b"Accept", b"Server", b"User-Agent", b"traceparent",
    b"Content-Type", b"X-Request-Id", b"Accept-Ranges", b"Cache-Control", b"Last-Modified",
    b"Accept-Encoding", b"Accept-Language", b"DATE", b"content-TYPE", b"Dates", b"Etag2",
    b"X-Request-Ix", b"Accept-Encodinh",
]  # fmt: skip


@pytest.mark.parametrize("name", _COMMON_NAMES, ids=[n.decode() for n in _COMMON_NAMES])
def test_common_field_names_give_the_reference_events(compiled: Codec, name: bytes) -> None:
    field = name + b": v1\r\n" + name + b": v2\r\n"
    request = b"GET / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n"
    response = b"HTTP/1.1 200 OK\r\n" + field + b"Content-Length: 0\r\n\r\n"
    assert_same_requests(compiled, request, [], Limits())
    assert_same_responses(compiled, response, [], b"GET", Limits())


@pytest.mark.parametrize("template", TYPICAL_REQUESTS, ids=range(len(TYPICAL_REQUESTS)))
def test_every_single_byte_change_of_a_typical_request_gives_the_reference_events(
    compiled: Codec, template: bytes
) -> None:
    for at in range(len(template)):
        for byte in range(256):
            changed = template[:at] + bytes((byte,)) + template[at + 1 :]
            assert_same_requests(compiled, changed, [], Limits())
        assert_same_requests(compiled, template[:at] + template[at + 1 :], [], Limits())


@pytest.mark.parametrize("template", TYPICAL_RESPONSES, ids=range(len(TYPICAL_RESPONSES)))
def test_every_single_byte_change_of_a_typical_response_gives_the_reference_events(
    compiled: Codec, template: bytes
) -> None:
    for at in range(len(template)):
        for byte in range(256):
            changed = template[:at] + bytes((byte,)) + template[at + 1 :]
            assert_same_responses(compiled, changed, [], b"GET", Limits())
        assert_same_responses(compiled, template[:at] + template[at + 1 :], [], b"GET", Limits())


# --- the serializers ---------------------------------------------------------------------------


def _outcome(write: Any, *args: Any, **kwargs: Any) -> tuple[str, object]:
    try:
        return "wrote", write(*args, **kwargs)
    except (ValueError, TypeError) as exc:
        return type(exc).__name__, str(exc)


_PART = st.sampled_from([b"GET", b"x-a", b"/p?q=1", b"payments:80", b"*", b"OK", b""]) | _TEXT
_FIELDS = st.lists(st.tuples(_PART, _PART), max_size=4)
_LENGTH = st.none() | st.integers(min_value=-2, max_value=2**64) | st.sampled_from([True, 1.0])


@DIFFERENTIAL
@given(
    method=_PART,
    path=_PART,
    authority=_PART,
    headers=_FIELDS,
    content_length=_LENGTH,
    chunked=st.booleans(),
    parsed=st.booleans(),
)
def test_request_heads_are_written_or_refused_as_the_reference_does(
    compiled: Codec,
    method: bytes,
    path: bytes,
    authority: bytes,
    headers: list[tuple[bytes, bytes]],
    content_length: int | None,
    chunked: bool,
    parsed: bool,
) -> None:
    args = (method, path, authority, headers)
    options = {"content_length": content_length, "chunked": chunked, "parsed": parsed}
    expected = _outcome(PYTHON.request_head, *args, **options)
    assert _outcome(compiled.request_head, *args, **options) == expected


@DIFFERENTIAL
@given(
    status=st.integers(min_value=0, max_value=1200) | st.sampled_from([200, 204, 101]),
    reason=_PART,
    headers=_FIELDS,
    version=st.sampled_from([b"1.1", b"1.0", b"2", "1.1"]),
    content_length=_LENGTH,
    chunked=st.booleans(),
    close=st.booleans(),
    parsed=st.booleans(),
)
def test_response_heads_are_written_or_refused_as_the_reference_does(
    compiled: Codec,
    status: int,
    reason: bytes,
    headers: list[tuple[bytes, bytes]],
    version: bytes,
    content_length: int | None,
    chunked: bool,
    close: bool,
    parsed: bool,
) -> None:
    options = {
        "version": version,
        "content_length": content_length,
        "chunked": chunked,
        "close": close,
        "parsed": parsed,
    }
    expected = _outcome(PYTHON.response_head, status, reason, headers, **options)
    assert _outcome(compiled.response_head, status, reason, headers, **options) == expected


@DIFFERENTIAL
@given(data=st.binary(max_size=70_000) | st.sampled_from([bytearray(b"ab"), memoryview(b"c")]))
def test_chunks_are_written_as_the_reference_does(compiled: Codec, data: bytes) -> None:
    assert compiled.chunk(data) == PYTHON.chunk(data)
