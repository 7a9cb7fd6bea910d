"""TLS first flights for tests: real ones from Python's ssl module, and built ones."""

from __future__ import annotations

import functools
import ssl

import pytest


@functools.cache
def real_client_hello(server_name: str | None, alpn: tuple[str, ...] = ()) -> bytes:
    """The first flight of a real TLS client (Python's ssl module), as it goes on the wire."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    if server_name is None:
        context.check_hostname = False
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def records(message: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    """`message` (a handshake message) split over TLS records of the given sizes, then the rest."""
    out = bytearray()
    pos = 0
    for size in [*sizes, len(message)]:
        chunk = message[pos : pos + max(size, 1)]
        if not chunk:
            break
        out += b"\x16" + version + len(chunk).to_bytes(2, "big") + chunk
        pos += len(chunk)
    return bytes(out)


def handshake_of(flight: bytes) -> bytes:
    """The handshake message carried by a single-record first flight."""
    assert flight[0] == 0x16
    length = int.from_bytes(flight[3:5], "big")
    return flight[5 : 5 + length]


def vector(length_size: int, data: bytes) -> bytes:
    return len(data).to_bytes(length_size, "big") + data


def built_hello(
    server_name: bytes | None, alpn: list[bytes], extra: tuple[bytes, ...] = ()
) -> bytes:
    """A ClientHello handshake message, field by field (RFC 8446 §4.1.2)."""
    extensions = b""
    if server_name is not None:
        names = b"\x00" + vector(2, server_name)
        extensions += b"\x00\x00" + vector(2, vector(2, names))
    if alpn:
        extensions += b"\x00\x10" + vector(2, vector(2, b"".join(vector(1, p) for p in alpn)))
    extensions += b"".join(extra)
    body = (
        b"\x03\x03"
        + bytes(32)
        + vector(1, bytes(32))
        + vector(2, b"\x13\x01\x13\x02")
        + vector(1, b"\x00")
        + vector(2, extensions)
    )
    return b"\x01" + len(body).to_bytes(3, "big") + body
