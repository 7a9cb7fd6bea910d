"""Sans-IO reader of a TLS ClientHello: the server name (SNI) and the ALPN protocols.

The sidecar never terminates TLS it passes through; it only reads the first flight to label,
log and (under registry_only) decide the connection. `parse_client_hello` takes the bytes read
so far and returns one of:

- `NEED_MORE`: consistent so far; call again with more bytes. A ClientHello may be split over
  several TLS records (RFC 8446 §5.1) and each record over several reads.
- `NotTls(reason)`: these bytes are not a well-formed ClientHello; pass the connection through
  as plain TCP. Every rule the reader checks (record type and version, record sizes, the
  handshake type, every length against what contains it, duplicate extensions, one host name,
  a DNS host name, non-empty ALPN names) ends here, never in an exception.
- `ClientHello(server_name, alpn)`: the hello was read whole; bytes after it are ignored.

Rules taken from RFC 8446 (§4.1.2, §4.2, §5.1), RFC 6066 §3 (server_name: one host_name, ASCII,
no trailing dot) and RFC 7301 (ALPN: non-empty protocol names). The reader holds nothing: call
it again with the longer buffer (a ClientHello is small: at most `MAX_HELLO` bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

HANDSHAKE: Final = 22  # TLS record content type
CLIENT_HELLO: Final = 1  # handshake message type
EXT_SERVER_NAME: Final = 0
EXT_ALPN: Final = 16
HOST_NAME: Final = 0  # server_name name_type
MAX_RECORD: Final = 2**14  # TLSPlaintext.length bound
MAX_HELLO: Final = 64 * 1024  # a larger ClientHello is not one we read
_HOST_CHARS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower-case host name; None when the client sent none
    alpn: tuple[str, ...]  # as offered, in the client's order


@dataclass(frozen=True, slots=True)
class NotTls:
    reason: str


class NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE: Final = NeedMore()

Result = ClientHello | NeedMore | NotTls


def sniff(data: bytes) -> bool | None:
    """Whether the first bytes open a TLS handshake record holding a ClientHello; None: too few.

    Only the record header and the handshake type: enough to decide the connection is TLS.
    """
    if not data:
        return None
    if data[0] != HANDSHAKE:
        return False
    if len(data) >= 2 and data[1] != 3:
        return False
    if len(data) >= 3 and data[2] > 4:
        return False
    if len(data) >= 6:
        return data[5] == CLIENT_HELLO and int.from_bytes(data[3:5], "big") > 0
    return None


def parse_client_hello(data: bytes, max_hello: int = MAX_HELLO) -> Result:
    """Read the ClientHello at the start of `data` (see the module's docstring)."""
    message = _handshake_message(data, max_hello)
    if not isinstance(message, bytes):
        return message
    try:
        return _client_hello(message)
    except _Malformed as exc:
        return NotTls(str(exc))


def _handshake_message(data: bytes, max_hello: int) -> bytes | NeedMore | NotTls:
    """The whole ClientHello message (its 4-byte header included), from as many records."""
    message = bytearray()
    need: int | None = None  # the message's size, once its header is in
    pos = 0
    while True:
        header = data[pos : pos + 5]
        if header[:1] and header[0] != HANDSHAKE:
            if pos == 0:
                return NotTls("not a TLS handshake record")
            return NotTls("another record type before the ClientHello's end")
        if (len(header) >= 2 and header[1] != 3) or (len(header) >= 3 and header[2] > 4):
            return NotTls(f"record version 0x{header[1:3].hex()} is not TLS")
        if len(header) < 5:
            return NEED_MORE
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > MAX_RECORD:
            return NotTls(f"a handshake record of {length} bytes")
        fragment = data[pos + 5 : pos + 5 + length]
        message += fragment
        if message and message[0] != CLIENT_HELLO:
            return NotTls(f"handshake type {message[0]} is not a ClientHello")
        if need is None and len(message) >= 4:
            need = 4 + int.from_bytes(message[1:4], "big")
            if need > max_hello:
                return NotTls(f"a ClientHello of {need} bytes is more than {max_hello}")
        if need is not None and len(message) >= need:
            return bytes(message[:need])  # what follows it is not ours to read
        if len(fragment) < length:
            return NEED_MORE
        pos += 5 + length


class _Malformed(Exception):
    pass


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise _Malformed(f"{what}: {n} bytes announced, {len(self.data) - self.pos} left")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def number(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        return _Reader(self.take(self.number(length_size, what), what))

    def rest(self) -> bytes:
        return self.take(self.left, "rest")

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def _client_hello(message: bytes) -> ClientHello:
    body = _Reader(message[4:])
    if body.take(2, "legacy_version")[0] != 3:
        raise _Malformed("legacy_version is not TLS")
    body.take(32, "random")
    if body.vector(1, "legacy_session_id").left > 32:
        raise _Malformed("legacy_session_id is longer than 32 bytes")
    suites = body.vector(2, "cipher_suites").left
    if suites < 2 or suites % 2:
        raise _Malformed(f"cipher_suites of {suites} bytes")
    if body.vector(1, "legacy_compression_methods").left < 1:
        raise _Malformed("no compression method")
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    if body.left:
        extensions = body.vector(2, "extensions")
        seen: set[int] = set()
        while extensions.left:
            kind = extensions.number(2, "extension type")
            data = extensions.vector(2, f"extension {kind}")
            if kind in seen:
                raise _Malformed(f"extension {kind} twice")
            seen.add(kind)
            if kind == EXT_SERVER_NAME:
                server_name = _server_name(data)
            elif kind == EXT_ALPN:
                alpn = _alpn(data)
    if body.left:
        raise _Malformed(f"{body.left} bytes after the extensions")
    return ClientHello(server_name, alpn)


def _server_name(ext: _Reader) -> str:
    names = ext.vector(2, "server_name_list")
    if ext.left or not names.left:
        raise _Malformed("server_name list length does not match its extension")
    host: str | None = None
    while names.left:
        name_type = names.number(1, "name_type")
        name = names.vector(2, "host_name").rest()
        if name_type != HOST_NAME:
            continue  # no other type is defined; a future one is not ours to read
        if host is not None:
            raise _Malformed("more than one host_name")
        host = _host_name(name)
    if host is None:
        raise _Malformed("server_name without a host_name")
    return host


def _host_name(name: bytes) -> str:
    lowered = name.lower()
    if not 0 < len(name) <= 255 or lowered.translate(None, bytes(_HOST_CHARS)):
        raise _Malformed("host_name is not a DNS host name")
    if lowered.startswith(b".") or lowered.endswith(b".") or b".." in lowered:
        raise _Malformed("host_name has an empty label")
    return lowered.decode("ascii")


def _alpn(ext: _Reader) -> tuple[str, ...]:
    names = ext.vector(2, "protocol_name_list")
    if ext.left or not names.left:
        raise _Malformed("ALPN list length does not match its extension")
    protocols: list[str] = []
    while names.left:
        name = names.vector(1, "protocol name").rest()
        if not name:
            raise _Malformed("an empty ALPN protocol name")
        protocols.append(name.decode("ascii", "backslashreplace"))
    return tuple(protocols)
