"""Sans-IO HTTP/1.1 response parser for one exchange (docs/hardening.md rules 2, 3, 6, 7, 9).

One `ResponseParser` reads the upstream's answer to one request: any number of interim (1xx)
responses, then the final one. Heads are cut at the first CRLFCRLF and validated by llhttp, like
requests; bodies are framed here. Anything the upstream gets wrong is `Reject(502, ...)` and the
connection is not reusable. Bytes after a complete response (including after a bodiless 204/304/HEAD
response) are never returned as data: they only make `reusable` False.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

import httptools

from . import implementation
from .events import Data, EndOfMessage, Reject, ResponseEvent, ResponseHead
from .limits import Limits
from .request import (
    CRLFCRLF,
    K_EXPECT,
    K_HOST,
    SPECIAL,
    V10,
    V11,
    ChunkedDecoder,
    ChunkError,
    HeadError,
    Http1Parser,
    bare_lf_first,
    read_framing,
)

__all__ = ["PyResponseParser", "ResponseParser"]

# Host and Expect are end-to-end on a response; the rest of the request table applies.
_SPECIAL: Final = {name: kind for name, kind in SPECIAL.items() if kind not in (K_HOST, K_EXPECT)}

_STATUS_LINE: Final = re.compile(
    rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: ([\t \x21-\x7e\x80-\xff]*))?\r\n"
)
_CONNECTION_OPTIONS: Final = frozenset((b"close", b"keep-alive", b"upgrade"))

_HEAD: Final = 0
_BODY: Final = 1  # Content-Length body
_CHUNKED: Final = 2
_UNTIL_EOF: Final = 3  # close-delimited body
_DONE: Final = 4
_UPGRADED: Final = 5
_DEAD: Final = 6


class ResponseParser(Http1Parser[ResponseEvent]):
    """Parses the upstream's bytes for one request into ResponseHead / Data / EndOfMessage."""

    __slots__ = ("_extra", "_head_request", "_keep_alive", "_seen")

    _LLHTTP = httptools.HttpResponseParser
    _KINDS = _SPECIAL
    _REFUSE = 502
    _WHAT = "response"
    _UNDERSCORE = "underscore in response header name"
    _LATE_CHECKS = False

    def __init__(self, request_method: bytes, limits: Limits = Limits()) -> None:  # noqa: B008
        self._limits = limits
        self._buf = bytearray()
        self._rest = bytearray()
        self._headers = []
        self._special = []
        self._head_done = False
        self._message_done = False
        self._ll = httptools.HttpResponseParser(self)
        self._ll_clean = True
        self.reset(request_method)

    def reset(self, request_method: bytes) -> None:
        """Ready for the response to the next request on the same connection.

        Reusing the parser (and its llhttp parser, when the last message left it clean) saves
        creating both per request on a keep-alive connection."""
        self._head_request = request_method == b"HEAD"
        self._state = _HEAD
        self._remaining = 0
        self._chunked = None
        self._keep_alive = False
        self._extra = False  # bytes arrived after the response ended
        self._seen = False  # any byte at all arrived
        if self._buf:
            self._buf.clear()
        if self._rest:
            self._rest.clear()

    # public API
    @property
    def reusable(self) -> bool:
        """The upstream connection may carry another request: the response ended cleanly,
        its framing allowed keep-alive, and nothing followed it."""
        return self._state == _DONE and self._keep_alive and not self._extra

    def feed(self, data: bytes) -> list[ResponseEvent]:
        state = self._state
        if state >= _DONE:
            if state == _UPGRADED:
                self._rest += data
            elif state == _DONE and data:
                self._extra = True
            return []
        if not data:
            return []
        self._seen = True
        if self._buf:
            pending = self._buf
            scan = max(0, len(pending) - 3)
            pending += data
            if state == _HEAD and pending.find(CRLFCRLF, scan) < 0:
                if len(pending) > self._limits.max_response_header_bytes:
                    return [self._die("response head too large")]
                return []
        return self._parse(data, [])

    def feed_eof(self) -> list[ResponseEvent]:
        state = self._state
        if state == _UNTIL_EOF:
            self._state = _DONE
            return [EndOfMessage()]
        if state >= _DONE:
            return []
        if not self._seen:
            return [self._die("upstream closed the connection before responding")]
        return [self._die("upstream closed the connection in the middle of a response")]

    # internals
    def _die(self, error: HeadError | ChunkError | str) -> Reject:
        self._state = _DEAD
        self._buf = bytearray()
        return Reject(502, str(error))

    def _stash(self, buf: bytes, pos: int, wait: bytes | None) -> None:
        self._buf[:] = memoryview(buf)[pos:]

    def _run(self, buf: bytes, events: list[ResponseEvent]) -> None:
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == _HEAD:
                stop = buf.find(CRLFCRLF, pos)
                if stop < 0:
                    if end - pos > self._limits.max_response_header_bytes:
                        raise HeadError(502, "response head too large")
                    if bare_lf_first(buf, pos):
                        raise HeadError(502, "bare LF in response head")
                    self._stash(buf, pos, CRLFCRLF)
                    return
                stop += 4
                if stop - pos > self._limits.max_response_header_bytes:
                    raise HeadError(502, "response head too large")
                head = self._parse_head(buf[pos:stop])
                events.append(head)
                pos = stop
                if head.status < 200:
                    events.append(EndOfMessage())
                    if head.upgrade is not None:
                        self._state = _UPGRADED
                        self._keep_alive = False
                        self._rest[:] = memoryview(buf)[pos:]
                        return
                elif not head.has_body:
                    self._end(events)
                elif head.chunked:
                    self._chunked = ChunkedDecoder(self._limits)
                    self._state = _CHUNKED
                elif head.content_length is not None:
                    self._remaining = head.content_length
                    self._state = _BODY
                    if not head.content_length:
                        self._end(events)
                else:
                    self._state = _UNTIL_EOF
            elif state == _BODY:
                pos = self._take_body(buf, pos, events)
            elif state == _CHUNKED:
                pos = self._take_chunks(buf, pos, events)
                if pos < 0:
                    return
            elif state == _UNTIL_EOF:
                events.append(Data(buf if pos == 0 else buf[pos:]))
                return
            else:  # _DONE: whatever follows a complete response poisons the connection
                self._extra = True
                return

    def _end(self, events: list[ResponseEvent]) -> None:
        events.append(EndOfMessage())
        self._state = _DONE

    def _parse_head(self, head: bytes) -> ResponseHead:
        m = _STATUS_LINE.match(head)
        if m is None:
            raise HeadError(502, "malformed status line")
        minor, code, reason = m.groups()
        version = V11 if minor == b"1" else V10
        status = int(code)  # safe: three ASCII digits
        if reason is None:
            reason = b""

        headers, special, ll_done, _ = self._read_fields(head)
        try:
            _, _, content_length, te, connection, upgrade, _, last_for_llhttp = read_framing(
                special, version
            )
        except HeadError as exc:  # of Content-Length: Host and Expect are not in _SPECIAL
            raise HeadError(502, f"upstream sent {exc.reason}") from None

        chunked = False
        if te is not None:
            if version == V10:
                raise HeadError(502, "upstream sent Transfer-Encoding on HTTP/1.0")
            if content_length is not None:
                raise HeadError(502, "upstream sent both Content-Length and Transfer-Encoding")
            if te != [b"chunked"]:
                raise HeadError(502, "upstream sent an unsupported Transfer-Encoding")
            chunked = True

        keep_alive = version == V11
        if connection:
            if b"close" in connection:
                keep_alive = False
            elif b"keep-alive" in connection:
                keep_alive = True
            named = {t for t in connection if t not in _CONNECTION_OPTIONS}
            if named:
                headers = [h for h in headers if h[0] not in named]

        if status < 200:
            if status == 101:
                if upgrade is None:
                    raise HeadError(502, "101 response without Upgrade")
            else:
                upgrade = None
            has_body = False
            content_length = None
            chunked = False
            keep_alive = keep_alive and status != 101
        else:
            upgrade = None
            has_body = not (self._head_request or status == 204 or status == 304)
            if has_body and not chunked and content_length is None:
                keep_alive = False  # close-delimited
        self._keep_alive = keep_alive
        self._ll_clean = ll_done and not last_for_llhttp  # see RequestParser._parse_head
        return ResponseHead(
            status,
            reason,
            version,
            headers,
            keep_alive,
            None if chunked else content_length,
            chunked,
            has_body,
            upgrade,
        )


# The compiled twin takes the public name when it is built (implementation.py); see request.py.
PyResponseParser: Final = ResponseParser
if not TYPE_CHECKING and implementation.NATIVE is not None:
    ResponseParser = implementation.NATIVE.ResponseParser
