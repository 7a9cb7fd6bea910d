"""What a connection speaks, from its first bytes: HTTP/1.x, HTTP/2, TLS, or anything else.

After a redirect every connection the app makes or receives reaches the sidecar; only HTTP/1.x
goes through the L7 path, everything else is passed through as TCP. `detect` decides from the
bytes read so far, or returns None while they could still become more than one thing:

- `HTTP1`: a request line so far as `token SP target SP "HTTP/1." DIGIT` (the codec's framing,
  RFC 9112 §3). Whatever follows is the codec's to accept or refuse with a 4xx, so that a
  request an app might read as HTTP never bypasses the L7 checks. A line longer than the
  request-line limit with no contradiction yet is HTTP1 too (the codec answers 414).
- `HTTP2`: the client connection preface (RFC 9113 §3.4).
- `TLS`: a handshake record holding a ClientHello (`tls.sniff`).
- `TCP`: anything else, decided at the first byte that contradicts all three.

What `detect` cannot see is silence. Protocols where the server speaks first (MySQL, SMTP, ...)
send nothing until they hear from the server, so the caller waits at most a detection window
(`DETECT_TIMEOUT`, the sidecar's --detect-timeout) and then treats the connection as TCP.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Final

from .request import TOKEN
from .tls import sniff

PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DETECT_TIMEOUT: Final = 0.1  # seconds a client may stay silent before it is TCP
MAX_REQUEST_LINE: Final = 8192  # the codec's default request-line limit
MAX_METHOD: Final = 32  # no method HTTP servers know is half as long
_METHOD: Final = re.compile(TOKEN)
_TARGET: Final = re.compile(rb"[^ \r\n]*")
_VERSION: Final = b" HTTP/1."


class Detected(StrEnum):
    HTTP1 = "http/1.1"
    HTTP2 = "h2"
    TLS = "tls"
    TCP = "tcp"


def detect(data: bytes, max_request_line: int = MAX_REQUEST_LINE) -> Detected | None:
    """The protocol the first bytes show, or None while more bytes could change the answer."""
    if not data:
        return None
    if data[0] == 0x16:
        tls = sniff(data)
        return None if tls is None else Detected.TLS if tls else Detected.TCP
    if data.startswith(PREFACE):
        return Detected.HTTP2
    if PREFACE.startswith(data):
        return None
    return _request_line(data, max_request_line)


def _request_line(data: bytes, limit: int) -> Detected | None:
    space = data.find(b" ", 0, MAX_METHOD + 1)
    method = data[: MAX_METHOD + 1] if space < 0 else data[:space]
    if _METHOD.fullmatch(method) is None or len(method) > MAX_METHOD:
        return Detected.TCP
    if space < 0:
        return None
    end = _TARGET.match(data, space + 1)
    assert end is not None  # `*` always matches
    target_end = end.end()
    if target_end == len(data):
        return None if len(data) <= limit else Detected.HTTP1
    if target_end == space + 1:
        return Detected.TCP  # no target
    version = data[target_end : target_end + len(_VERSION) + 1]
    if not version.startswith(_VERSION[: len(version)]):
        return Detected.TCP
    if len(version) <= len(_VERSION):
        return None
    return Detected.HTTP1 if version[-1:].isdigit() else Detected.TCP
