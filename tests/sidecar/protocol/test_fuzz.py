"""Fuzz the request parser: splits never change the result, mutations never crash it, and
every smuggling-style input in corpus/ is rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.protocol import Data, Reject, RequestEvent, RequestParser

# Every test here runs on the compiled codec and on the pure-Python reference (conftest.py).
pytestmark = pytest.mark.usefixtures("implementation")

CORPUS = sorted((Path(__file__).parent / "corpus").glob("*.http"))

VALID = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET http://payments:80/x?y HTTP/1.1\r\nHost: payments\r\nAccept: */*\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nX-Id: 1\r\n\r\nhello",
    b"PUT /p HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;a=b\r\nabc\r\n1\r\nd\r\n0\r\nTrailer: t\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a:1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nz",
]

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def run(chunks: list[bytes]) -> tuple[list[RequestEvent], bytes]:
    """Events with Data merged (splits legitimately change Data boundaries), plus upgrade rest."""
    parser = RequestParser()
    events: list[RequestEvent] = []
    for piece in chunks:
        events += parser.feed(piece)
    events += parser.feed_eof()
    merged: list[RequestEvent] = []
    for event in events:
        if isinstance(event, Data) and merged and isinstance(merged[-1], Data):
            merged[-1] = Data(merged[-1].data + event.data)
        else:
            merged.append(event)
    return merged, parser.take_upgrade_rest()


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@FUZZ
@given(
    messages=st.lists(st.sampled_from(VALID[:4] + VALID[5:6]), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_random_splits_of_valid_requests_give_identical_events(
    messages: list[bytes], cuts: list[int]
) -> None:
    data = b"".join(messages)
    whole = run([data])
    assert not any(isinstance(e, Reject) for e in whole[0])
    assert run(split(data, cuts)) == whole


@FUZZ
@given(cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8))
def test_random_splits_keep_upgrade_rest_bytes(cuts: list[int]) -> None:
    data = VALID[4] + b"\x00\xffmore"
    events, rest = run(split(data, cuts))
    assert rest == b"RAW\x00\xffmore"
    assert len(events) == 2


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "dup"]))
        at = draw(st.integers(min_value=0, max_value=max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] = draw(st.sampled_from(b"\x00\t\n\r :;,_-+0Aa\x7f\x80\xff"))
        elif op == "insert":
            data[at:at] = draw(st.sampled_from([b"\r\n", b" ", b"\t", b"0", b"\n", b",chunked"]))
        elif op == "delete" and data:
            del data[at]
        elif data:
            end = draw(st.integers(min_value=at, max_value=len(data)))
            data[at:at] = data[at:end]
    return bytes(data)


@FUZZ
@given(data=mutated(), cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=6))
def test_random_mutations_never_raise(data: bytes, cuts: list[int]) -> None:
    events, _ = run(split(data, cuts))
    rejects = [i for i, e in enumerate(events) if isinstance(e, Reject)]
    assert rejects in ([], [len(events) - 1])  # a Reject is always last, and only once
    for event in events:
        if isinstance(event, Reject):
            assert event.status in (400, 405, 414, 417, 431, 501)


def test_corpus_is_present() -> None:
    assert len(CORPUS) >= 40


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_smuggling_corpus_is_rejected(path: Path) -> None:
    data = path.read_bytes()
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        events, rest = run(chunks)
        assert events and isinstance(events[-1], Reject), (path.name, events)
        assert rest == b""
