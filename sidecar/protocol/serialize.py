"""Writes HTTP/1.1 heads and chunks from the parsed model (docs/hardening.md rules 2, 3 and 11).

Requests go upstream rebuilt, never as the client's raw bytes: always HTTP/1.1, origin-form,
`host` first, then the headers, then exactly one framing header. Every name and value is
validated before it is written, since some of them are generated or copied by the sidecar;
a bad one raises `ValueError` naming the header.

Hot path: one precompiled fullmatch per name and per value (measured faster here than joined
translate()/search passes), then one bytes join for the whole head.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from . import implementation
from .events import Headers
from .request import valid_host

__all__ = [
    "LAST_CHUNK",
    "chunk",
    "informational",
    "py_chunk",
    "py_request_head",
    "py_response_head",
    "request_head",
    "response_head",
]

LAST_CHUNK: Final = b"0\r\n\r\n"

_TCHARS: Final = rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+"  # RFC 9110 tokens minus "_" (rule 3)
_NAME: Final = re.compile(_TCHARS)
_VALUE: Final = re.compile(
    rb"(?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*[\x21-\x7e\x80-\xff])?)?"
)
_METHOD_OK: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # methods may contain "_"
_PATH: Final = re.compile(rb"/[\x21-\x7e]*|\*")
_REASON: Final = re.compile(rb"[\t \x21-\x7e\x80-\xff]*")


def _check_headers(headers: Headers) -> None:
    """Every name a token (no "_"), every value free of CTLs and of whitespace at its ends."""
    for name, value in headers:
        if _NAME.fullmatch(name) is None:
            raise ValueError(f"invalid header name {name.decode('latin-1')!r}")
        if _VALUE.fullmatch(value) is None:
            raise ValueError(f"invalid value for header {name.decode('latin-1')!r}")


def request_head(
    method: bytes,
    path: bytes,
    authority: bytes,
    headers: Headers,
    *,
    content_length: int | None,
    chunked: bool,
    parsed: bool = False,
) -> bytes:
    """An HTTP/1.1 request head in origin-form with `host: authority` first.

    Framing: `content-length` when given, `transfer-encoding: chunked` when chunked, nothing
    otherwise. `headers` must not carry framing or hop-by-hop fields (the parser removed them).
    """
    if not parsed:
        if _METHOD_OK.fullmatch(method) is None:
            raise ValueError(f"invalid method {method!r}")
        if _PATH.fullmatch(path) is None:
            raise ValueError(f"invalid request path {path!r}")
        if not valid_host(authority):
            raise ValueError(f"invalid value for header 'host': {authority!r}")
        _check_headers(headers)
    parts = [method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(_framing(content_length, chunked))
    return b"".join(parts)


def response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    version: bytes = b"1.1",
    content_length: int | None,
    chunked: bool,
    close: bool,
    parsed: bool = False,
) -> bytes:
    """A response head for the client. Adds `connection: close` when `close`."""
    if not 100 <= status <= 999:
        raise ValueError(f"invalid status code {status!r}")
    if version != b"1.1" and version != b"1.0":
        raise ValueError(f"invalid HTTP version {version!r}")
    if chunked and version == b"1.0":
        raise ValueError("chunked framing cannot be sent to an HTTP/1.0 peer")
    if not parsed:
        if _REASON.fullmatch(reason) is None:
            raise ValueError(f"invalid reason phrase {reason!r}")
        _check_headers(headers)
    code = _STATUS_CODES.get(status)
    if code is None:
        code = _STATUS_CODES[status] = b" %d " % status  # at most 900 entries
    parts = [b"HTTP/", version, code, reason, b"\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    if close:
        parts.append(b"connection: close\r\n")
    parts.append(_framing(content_length, chunked))
    return b"".join(parts)


_STATUS_CODES: dict[int, bytes] = {}  # b" 200 ": formatting an int costs more than a lookup


def _framing(content_length: int | None, chunked: bool) -> bytes:
    if chunked:
        if content_length is not None:
            raise ValueError("both content-length and chunked framing requested")
        return b"transfer-encoding: chunked\r\n\r\n"
    if content_length is None:
        return b"\r\n"
    if content_length < 0:
        raise ValueError(f"invalid content-length {content_length!r}")
    return b"content-length: %d\r\n\r\n" % content_length


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; empty data gives b"" (an empty chunk would end the body)."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def informational(status: int, reason: bytes) -> bytes:
    """An interim response head such as `HTTP/1.1 100 Continue`."""
    if not 100 <= status <= 199 or status == 101:
        raise ValueError(f"not an interim status code: {status!r}")
    if _REASON.fullmatch(reason) is None:
        raise ValueError(f"invalid reason phrase {reason!r}")
    return b"HTTP/1.1 %d %b\r\n\r\n" % (status, reason)


# The compiled twins take the public names when they are built (implementation.py); these
# functions stay the reference, under their own names, and write whatever the twins leave to them.
py_request_head: Final = request_head
py_response_head: Final = response_head
py_chunk: Final = chunk
if not TYPE_CHECKING and implementation.NATIVE is not None:
    request_head = implementation.NATIVE.request_head
    response_head = implementation.NATIVE.response_head
    chunk = implementation.NATIVE.chunk
