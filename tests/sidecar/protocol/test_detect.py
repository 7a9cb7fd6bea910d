from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.protocol.detect import PREFACE, Detected, detect
from tests.sidecar.protocol.tls_hellos import real_client_hello

HTTP1_STARTS = [
    b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n",
    b"POST /orders?id=1 HTTP/1.0\r\n",
    b"GET http://payments/x HTTP/1.1\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"CONNECT payments:443 HTTP/1.1\r\n",
    b"PRI * HTTP/1.1\r\n",  # not the HTTP/2 preface: the codec decides
    b"get /lower HTTP/1.1\r\n",  # the codec refuses it, which is the point: L7 sees it
    b"GET /\x80\xff HTTP/1.1\r\n",  # likewise for a target byte llhttp refuses
]

# First bytes of clients of other protocols: never HTTP/1.x.
OTHER_STARTS = [
    b"*1\r\n$4\r\nPING\r\n",  # Redis (RESP)
    b"PING\r\n",  # Redis inline
    b"GET key\r\n",  # Redis inline, a verb HTTP also has
    b"get foo\r\n",  # memcached
    b"EHLO client.example\r\n",  # SMTP, had the client spoken first
    b"SSH-2.0-OpenSSH_9.6p1 Debian-3\r\n",
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",  # PostgreSQL SSLRequest
    b"\x00\x00\x00\x2c\x00\x03\x00\x00user\x00app\x00",  # PostgreSQL startup
    b"GET / HTTP/2.0\r\n",
    b"GET / HTTPS/1.1\r\n",
    b"GET  / HTTP/1.1\r\n",  # no target
    b"\x16\x03\x01\x00\x30\x02",  # a TLS ServerHello first: not a client
]


@pytest.mark.parametrize("start", HTTP1_STARTS)
def test_an_http1_request_line_is_http1_once_the_version_shows(start: bytes) -> None:
    decisive = start.index(b" HTTP/1.") + len(b" HTTP/1.") + 1
    assert detect(start[:decisive]) is Detected.HTTP1
    for end in range(decisive):
        assert detect(start[:end]) is None, start[:end]


@pytest.mark.parametrize("start", OTHER_STARTS)
def test_other_protocols_are_tcp(start: bytes) -> None:
    assert detect(start) is Detected.TCP


def test_the_http2_preface_is_http2_and_its_prefixes_wait() -> None:
    assert detect(PREFACE + b"\x00\x00\x12\x04") is Detected.HTTP2
    assert all(detect(PREFACE[:end]) is None for end in range(len(PREFACE)))


def test_a_tls_client_hello_is_tls_from_its_sixth_byte() -> None:
    hello = real_client_hello("api.example.com", ("h2",))
    assert detect(hello[:6]) is Detected.TLS
    assert detect(hello) is Detected.TLS
    assert [detect(hello[:end]) for end in range(6)] == [None] * 6


def test_a_request_line_longer_than_the_limit_goes_to_the_codec() -> None:
    start = b"GET /" + b"a" * 9000
    assert detect(start[:8000]) is None
    assert detect(start) is Detected.HTTP1  # the codec answers 414


STARTS = st.sampled_from([*HTTP1_STARTS, *OTHER_STARTS, PREFACE, b""])


@given(STARTS, st.binary(max_size=40), st.integers(0, 80))
def test_a_decision_never_changes_as_more_bytes_arrive(start: bytes, tail: bytes, cut: int) -> None:
    data = start + tail
    early = detect(data[:cut])
    if early is not None:
        assert detect(data) is early


@given(st.one_of(st.binary(), STARTS), st.binary(min_size=150, max_size=300))
def test_detection_never_waits_for_more_than_a_request_line(start: bytes, tail: bytes) -> None:
    assert detect(start + tail, max_request_line=100) is not None
    target = tail.translate(None, b" \r\n") + b"x" * 150  # a long target, still consistent
    assert detect(b"GET /" + target, max_request_line=100) is Detected.HTTP1


@given(st.binary(max_size=200))
def test_any_bytes_give_an_answer_or_none(data: bytes) -> None:
    assert detect(data) in (*Detected, None)
