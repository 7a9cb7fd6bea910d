"""HTTP/2 hardening (docs/hardening.md rules 12-17), with frames written by hand: each bad
connection is refused (GOAWAY), closed, counted in `outrigger_h2_refused_total{reason}`, and
the sidecar goes on serving."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import hpack
import httpx
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from sidecar.app import Sidecar
from tests.sidecar.proxy_fixtures import WAIT, ok, running_sidecar, serve, upstream, url

pytestmark = pytest.mark.timeout(30)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
PROTOCOL_ERROR = 0x1
ENHANCE_YOUR_CALM = 0xB


def request(path: bytes = b"/", method: bytes = b"GET") -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":path", path), (b":authority", b"up")]


class RawClient:
    """An HTTP/2 client that writes whatever frames a test gives it (no h2 state machine)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()

    def headers(
        self,
        stream_id: int,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> bytes:
        frame = HeadersFrame(stream_id)
        frame.data = self.encoder.encode(headers)
        if end_headers:
            frame.flags.add("END_HEADERS")
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame.serialize()

    def send(self, *parts: bytes) -> None:
        self.writer.write(b"".join(parts))

    async def goaway(self) -> int | None:
        """Read to the end of the connection; the error code of the GOAWAY it ended with (None:
        closed without one). Fails if the sidecar keeps the connection open."""
        data = b""
        async with asyncio.timeout(WAIT):
            while chunk := await self.reader.read(65536):
                data += chunk
        code = None
        while len(data) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(data[:9]))
            frame.parse_body(memoryview(data[9 : 9 + length]))
            if isinstance(frame, GoAwayFrame):
                code = frame.error_code
            data = data[9 + length :]
        return code


@contextlib.asynccontextmanager
async def raw(sidecar: Sidecar, *, preface: bool = True) -> AsyncIterator[RawClient]:
    host, port = sidecar.addresses["outbound"]
    reader, writer = await asyncio.open_connection(host, port)
    client = RawClient(reader, writer)
    if preface:
        settings = SettingsFrame(0)
        ack = SettingsFrame(0, flags=["ACK"])
        client.send(PREFACE, settings.serialize(), ack.serialize())
    try:
        yield client
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def h2_sidecar() -> AsyncIterator[tuple[Sidecar, list[bytes]]]:
    """A sidecar routing `up` to an HTTP/1.1 upstream that records what reached it."""
    seen: list[bytes] = []

    def answer(req: object) -> bytes:
        seen.append(getattr(req, "raw_head", b""))
        return ok()

    async with upstream(serve(answer)) as up:
        mesh = {"services": [{"name": "up", "port": 80, "endpoints": [up.address]}]}
        async with running_sidecar(mesh) as sidecar:
            yield sidecar, seen


def refused(sidecar: Sidecar, reason: str) -> int:
    return sidecar.outbound_state.h2_refused.get(reason, 0)


async def still_serves(sidecar: Sidecar) -> None:
    async with httpx.AsyncClient(timeout=WAIT) as client:
        resp = await client.get(url(sidecar, path="/after"), headers={"host": "up"})
    assert resp.status_code == 200


async def test_a_good_request_passes() -> None:
    """The raw client itself is right: a plain request is answered, the connection stays."""
    async with h2_sidecar() as (sidecar, seen), raw(sidecar) as client:
        client.send(client.headers(1, request()))
        async with asyncio.timeout(WAIT):
            data = await client.reader.read(65536)
        assert data  # SETTINGS, HEADERS...
        assert not client.reader.at_eof()
        for _ in range(50):
            if seen:
                break
            await asyncio.sleep(0.05)
        assert len(seen) == 1


@pytest.mark.parametrize(
    ("name", "headers"),
    [
        ("missing :path", [h for h in request() if h[0] != b":path"]),
        ("unknown pseudo header", [*request(), (b":foo", b"x")]),
        ("pseudo header after a field", [request()[0], (b"x-a", b"1"), *request()[1:]]),
        ("upper-case name", [*request(), (b"X-A", b"1")]),
        ("connection", [*request(), (b"connection", b"keep-alive")]),
        ("transfer-encoding", [*request(), (b"transfer-encoding", b"chunked")]),
        ("te other than trailers", [*request(), (b"te", b"gzip")]),
        ("CR LF in a value", [*request(), (b"x-a", b"a\r\nx-injected: 1")]),
        ("LF in a value", [*request(), (b"x-a", b"a\nb")]),
        ("NUL in a value", [*request(), (b"x-a", b"a\x00b")]),
        (":authority and Host disagree", [*request(), (b"host", b"other")]),
    ],
)
async def test_bad_header_blocks_are_refused_and_never_forwarded(
    name: str, headers: list[tuple[bytes, bytes]]
) -> None:
    async with h2_sidecar() as (sidecar, seen):
        async with raw(sidecar) as client:
            client.send(client.headers(1, headers))
            assert await client.goaway() == PROTOCOL_ERROR, name
        assert refused(sidecar, "protocol") == 1
        assert seen == []  # nothing reached the HTTP/1.1 upstream
        await still_serves(sidecar)


async def test_content_length_must_match_the_data() -> None:
    async with h2_sidecar() as (sidecar, seen):
        async with raw(sidecar) as client:
            data = DataFrame(1, data=b"x" * 10, flags=["END_STREAM"])
            head = [*request(method=b"POST"), (b"content-length", b"5")]
            client.send(client.headers(1, head, end_stream=False), data.serialize())
            assert await client.goaway() == PROTOCOL_ERROR
        assert refused(sidecar, "protocol") == 1
        assert seen == []  # no HTTP/1.1 upstream saw a body that disagrees with its length
        await still_serves(sidecar)


async def test_an_invalid_preface_is_refused() -> None:
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar, preface=False) as client:
            # The preface, then a DATA frame where the SETTINGS frame must be.
            client.send(PREFACE, DataFrame(1, data=b"x").serialize())
            assert await client.goaway() == PROTOCOL_ERROR
        assert refused(sidecar, "protocol") == 1
        await still_serves(sidecar)


async def test_a_header_list_over_the_limit_is_refused() -> None:
    async with h2_sidecar() as (sidecar, seen):
        async with raw(sidecar) as client:
            block = client.encoder.encode([*request(), (b"x-big", b"a" * 100_000)])
            frames = [HeadersFrame(1, data=block[:16384], flags=["END_STREAM"])]
            rest = block[16384:]
            while rest:
                last = len(rest) <= 16384
                frames.append(
                    ContinuationFrame(1, data=rest[:16384], flags=["END_HEADERS"] if last else [])
                )
                rest = rest[16384:]
            client.send(*(f.serialize() for f in frames))
            assert await client.goaway() == ENHANCE_YOUR_CALM
        assert refused(sidecar, "headers") == 1
        assert seen == []
        await still_serves(sidecar)


async def test_an_hpack_bomb_is_refused() -> None:
    """A few bytes that decode to far more than the header-list limit: one 4 KB field in the
    dynamic table, then referenced 100 times (1 byte each)."""
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar) as client:
            big = (b"x-big", b"a" * 4000)
            first = client.headers(1, [*request(), big])
            bomb = client.headers(3, [*request(), *[big] * 100])
            assert len(bomb) < 400
            client.send(first, bomb)
            assert await client.goaway() == ENHANCE_YOUR_CALM
        assert refused(sidecar, "headers") == 1
        await still_serves(sidecar)


async def test_a_continuation_flood_is_refused() -> None:
    """CVE-2024-27316: HEADERS without END_HEADERS, then CONTINUATION frames that never end."""
    async with h2_sidecar() as (sidecar, seen):
        async with raw(sidecar) as client:
            head = client.headers(1, request(), end_headers=False)
            flood = ContinuationFrame(1, data=b"\x40\x01a\x01b").serialize()  # literal a: b
            client.send(head, flood * 1000)
            assert await client.goaway() == PROTOCOL_ERROR
        assert refused(sidecar, "continuation") == 1
        assert seen == []
        await still_serves(sidecar)


async def test_too_many_concurrent_streams_close_the_connection() -> None:
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar) as client:
            # Streams with a body still to come: they stay open (each waits for its upstream).
            post = request(method=b"POST")
            client.send(*(client.headers(2 * i + 1, post, end_stream=False) for i in range(129)))
            assert await client.goaway() == PROTOCOL_ERROR
        assert refused(sidecar, "streams") == 1
        await still_serves(sidecar)


async def test_rapid_reset_closes_the_connection() -> None:
    """CVE-2023-44487: streams opened and reset at once, faster than the reset budget."""
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar) as client:
            frames = []
            for i in range(400):
                sid = 2 * i + 1
                frames.append(client.headers(sid, request(method=b"POST"), end_stream=False))
                frames.append(RstStreamFrame(sid, error_code=0x8).serialize())  # CANCEL
            client.send(*frames)
            assert await client.goaway() == ENHANCE_YOUR_CALM
        assert refused(sidecar, "rapid_reset") == 1
        await still_serves(sidecar)


@pytest.mark.parametrize(
    ("reason", "frame"),
    [
        ("ping_flood", PingFrame(0, opaque_data=b"12345678").serialize()),
        ("settings_flood", SettingsFrame(0).serialize()),
    ],
)
async def test_control_frame_floods_close_the_connection(reason: str, frame: bytes) -> None:
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar) as client:
            client.send(frame * 5000)
            assert await client.goaway() == ENHANCE_YOUR_CALM
        assert refused(sidecar, "control_flood") == 1
        await still_serves(sidecar)


async def test_empty_data_frames_flood_closes_the_connection() -> None:
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar) as client:
            head = client.headers(1, request(method=b"POST"), end_stream=False)
            client.send(head, DataFrame(1, data=b"").serialize() * 1000)
            assert await client.goaway() == ENHANCE_YOUR_CALM
        assert refused(sidecar, "empty_frames") == 1
        await still_serves(sidecar)


async def test_refusals_are_in_the_metrics() -> None:
    async with h2_sidecar() as (sidecar, _):
        async with raw(sidecar) as client:
            client.send(PingFrame(0, opaque_data=b"12345678").serialize() * 5000)
            await client.goaway()
        async with httpx.AsyncClient(timeout=WAIT) as http:
            page = (await http.get(url(sidecar, "admin", "/stats/prometheus"))).text
    assert 'outrigger_h2_refused_total{listener="outbound",reason="control_flood"} 1.0' in page
