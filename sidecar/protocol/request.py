"""Sans-IO HTTP/1.1 request parser: bytes in, events out (docs/hardening.md rules 1-4, 6, 7, 11).

How the work is split:

* This module finds the end of each head itself (the first CRLFCRLF; llhttp is strict about CRLF,
  so the two always agree, and if they ever disagreed the request is rejected). That gives exact
  414/431 limits and exact message boundaries for pipelining and upgrades.
* llhttp (through httptools) tokenizes and validates the head: method, target characters, header
  name tokens, value characters, CR/LF discipline, obs-fold, CL/TE conflicts. It only ever sees
  heads, never bodies.
* The checks llhttp does not make (Host, underscores, TE on HTTP/1.0, TE codings, Expect,
  absolute-form, hop-by-hop removal) run over the collected header list, on bytes.
* Bodies are framed here: Content-Length by counting, chunked by `ChunkedDecoder` (which also
  bounds chunk-extension bytes, something llhttp cannot report through httptools).

`ChunkedDecoder` and the byte tables are shared with `response.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeAlias, TypeVar

import httptools

from . import implementation
from .events import Data, EndOfMessage, Headers, Reject, RequestEvent, RequestHead, ResponseEvent
from .limits import Limits

__all__ = ["ChunkError", "ChunkedDecoder", "PyRequestParser", "RequestParser"]

# --- byte-level building blocks (shared with response.py) -------------------------------------

OWS: Final = b" \t"
_TCHAR: Final = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
TOKEN: Final = _TCHAR + b"+"
_QUOTED: Final = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
# A reg-name (with pct-encoding) or an IP literal, then an optional non-empty port. No userinfo.
HOST_RE: Final = re.compile(
    rb"(?:(?:[A-Za-z0-9._~!$&'()*+,;=\-]|%[0-9A-Fa-f]{2})+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_SIMPLE_HOST: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-:"


def valid_host(host: bytes) -> bool:
    """RFC 3986 host[:port] for Host and absolute-form; a translate() fast path, then the regex."""
    if host and not host.translate(None, _SIMPLE_HOST):
        colon = host.find(b":")
        if colon < 0:
            return True
        port = host[colon + 1 :]
        return colon > 0 and 0 < len(port) <= 5 and port.isdigit()
    return HOST_RE.fullmatch(host) is not None


def bare_lf_first(buf: bytes | bytearray, pos: int) -> bool:
    """The first LF of an unfinished head lacks its CR: no CRLFCRLF will ever end this head."""
    lf = buf.find(b"\n", pos)
    return lf >= 0 and (lf == pos or buf[lf - 1] != 0x0D)


# chunk-size [ chunk-ext ]: 1-16 hex digits, extensions without whitespace (llhttp strict mode).
_CHUNK_LINE: Final = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:;" + TOKEN + rb"(?:=(?:" + TOKEN + rb"|" + _QUOTED + rb"))?)*)"
)
_TRAILER_FIELD: Final = re.compile(
    rb"[!#$%&'*+\-.^`|~0-9A-Za-z]+:[ \t]*(?:[\x21-\x7e\x80-\xff](?:[\t \x21-\x7e\x80-\xff]*"
    rb"[\x21-\x7e\x80-\xff])?)?[ \t]*"
)
_REQUEST_LINE: Final = re.compile(b"(" + TOKEN + rb") ([^ \r\n]+) HTTP/1\.([01])\r\n")
_ABSOLUTE_FORM: Final = re.compile(rb"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)([^#]*)")

V10: Final = b"1.0"
V11: Final = b"1.1"

# Header names that never reach RequestHead.headers / ResponseHead.headers as-is.
K_HOST: Final = 1
K_CL: Final = 2
K_TE: Final = 3
K_CONNECTION: Final = 4
K_UPGRADE: Final = 5
K_EXPECT: Final = 6
K_DROP: Final = 7  # plain hop-by-hop: keep-alive, te
K_PROXY_CONNECTION: Final = 8  # hop-by-hop too, but llhttp reads it as Connection
SPECIAL: Final[dict[bytes, int]] = {
    b"host": K_HOST,
    b"content-length": K_CL,
    b"transfer-encoding": K_TE,
    b"connection": K_CONNECTION,
    b"upgrade": K_UPGRADE,
    b"expect": K_EXPECT,
    b"keep-alive": K_DROP,
    b"proxy-connection": K_PROXY_CONNECTION,
    b"te": K_DROP,
}


class ChunkError(Exception):
    """Malformed or over-limit chunked framing; the parser turns it into a Reject."""


class HeadError(Exception):
    """A head the parser refuses; carries the status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def list_tokens(value: bytes) -> list[bytes]:
    """Lower-cased, OWS-trimmed, non-empty elements of a comma-separated header value."""
    out = []
    for element in value.lower().split(b","):
        element = element.strip(OWS)
        if element:
            out.append(element)
    return out


def parse_content_length(value: bytes, previous: int | None) -> int:
    """`[0-9]{1,19}` only; a duplicate must agree with the earlier value."""
    if not (0 < len(value) <= 19 and value.isdigit()):  # bytes.isdigit is ASCII-only
        raise HeadError(400, "invalid Content-Length")
    length = int(value)  # safe: ASCII digits only, at most 19 of them
    if previous is not None and previous != length:
        raise HeadError(400, "conflicting Content-Length values")
    return length


_SIZE: Final = 0
_DATA: Final = 1
_DATA_CRLF: Final = 2
_TRAILER: Final = 3
_DONE: Final = 4


class ChunkedDecoder:
    """Decodes one chunked body (RFC 9112 §7.1) strictly; trailers are validated and dropped."""

    __slots__ = ("_ext_left", "_remaining", "_state", "_trailer_left")

    def __init__(self, limits: Limits) -> None:
        self._state = _SIZE
        self._remaining = 0
        self._ext_left = limits.max_chunk_ext_bytes
        self._trailer_left = limits.max_header_bytes

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def waits_for_line(self) -> bool:
        """True when nothing can happen until a CRLF arrives (used to skip rescans)."""
        return self._state == _SIZE or self._state == _TRAILER

    def step(self, buf: bytes, pos: int, emit: Callable[[Data], None]) -> int:
        """Decode from `buf[pos:]`, emitting Data events; return the first unconsumed offset."""
        end = len(buf)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - pos)
                emit(Data(buf[pos : pos + take]))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _DATA_CRLF
            elif state in (_SIZE, _TRAILER):  # a line: the chunk size, or a trailer field
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    self.check_partial_line(end - pos)
                    return pos
                if state == _SIZE:
                    m = _CHUNK_LINE.fullmatch(buf, pos, eol)
                    if m is None:
                        raise ChunkError("malformed chunk size line")
                    ext = m.end(2) - m.start(2)
                    if ext:
                        self._ext_left -= ext
                        if self._ext_left < 0:
                            raise ChunkError("too many chunk-extension bytes")
                    size = int(m.group(1), 16)  # safe: 1-16 ASCII hex digits
                    if size:
                        self._remaining = size
                        self._state = _DATA
                    else:
                        self._state = _TRAILER
                elif eol == pos:
                    self._state = _DONE
                    return pos + 2
                else:
                    if _TRAILER_FIELD.fullmatch(buf, pos, eol) is None:
                        raise ChunkError("malformed trailer field")
                    self._trailer_left -= eol + 2 - pos
                    if self._trailer_left < 0:
                        raise ChunkError("trailer section too large")
                pos = eol + 2
            elif state == _DATA_CRLF:
                if end - pos < 2:
                    if buf[pos] != 0x0D:
                        raise ChunkError("chunk data not followed by CRLF")
                    return pos
                if not buf.startswith(b"\r\n", pos):
                    raise ChunkError("chunk data not followed by CRLF")
                pos += 2
                self._state = _SIZE
            else:
                return pos
        return pos

    def check_partial_line(self, pending: int) -> None:
        """Refuse an unfinished size or trailer line that can no longer fit its limit."""
        if self._state == _SIZE:
            if pending > 16 + self._ext_left + 1:
                raise ChunkError("chunk size line too long")
        elif pending > self._trailer_left + 1:
            raise ChunkError("trailer section too large")


# --- what the request and the response parser share ------------------------------------------

CRLFCRLF: Final = b"\r\n\r\n"
_CRLF: Final = b"\r\n"

# The events of a request parser or of a response parser.
EventT = TypeVar("EventT", RequestEvent, ResponseEvent)


# A head's framing and hop-by-hop fields, read once (`read_framing`): Host (the last one) and how
# many Host fields there were, Content-Length, the transfer codings, the Connection options,
# Upgrade, Expect: 100-continue, and whether llhttp may have taken the message as the
# connection's last (HTTP/1.0, or Connection / Proxy-Connection, as it reads them).
Framing: TypeAlias = tuple[
    bytes | None, int, int | None, list[bytes] | None, list[bytes], bytes | None, bool, bool
]


def read_framing(special: list[tuple[int, bytes]], version: bytes) -> Framing:
    """The framing fields of a head (`_special`, in order); see `Framing`."""
    host: bytes | None = None
    hosts = 0
    content_length: int | None = None
    te: list[bytes] | None = None
    connection: list[bytes] = []
    upgrade: bytes | None = None
    expect_continue = False
    last_for_llhttp = version == V10
    for kind, value in special:
        if kind == K_HOST:
            hosts += 1
            host = value
        elif kind == K_CL:
            content_length = parse_content_length(value, content_length)
        elif kind == K_TE:
            if te is None:
                te = []
            te += list_tokens(value)
        elif kind == K_CONNECTION:
            connection += list_tokens(value)
            last_for_llhttp = True
        elif kind == K_PROXY_CONNECTION:
            last_for_llhttp = True
        elif kind == K_UPGRADE:
            upgrade = value if upgrade is None else upgrade + b", " + value
        elif kind == K_EXPECT:
            if value.lower() != b"100-continue":
                raise HeadError(417, "unsupported Expect value")
            expect_continue = True
    return host, hosts, content_length, te, connection, upgrade, expect_continue, last_for_llhttp


class Http1Parser(Generic[EventT]):
    """What `RequestParser` and `response.ResponseParser` share: llhttp validates each head and
    its callbacks sort the fields (`_read_fields`); bodies are framed here (`_take_body`,
    `_take_chunks`); a feed ends in events, or in one Reject (`_parse`). A subclass names its
    llhttp parser, its table of framing/hop-by-hop fields, the status and words it refuses a
    head with, and how a message ends (`_end`) and what waits for more bytes (`_stash`)."""

    __slots__ = (
        "_buf",
        "_chunked",
        "_head_done",
        "_headers",
        "_limits",
        "_ll",
        "_ll_clean",
        "_message_done",
        "_remaining",
        "_rest",
        "_special",
        "_state",
    )

    _LLHTTP: ClassVar[Any]  # httptools.HttpRequestParser or HttpResponseParser
    _KINDS: ClassVar[dict[bytes, int]]  # the fields that go to _special, by name
    _REFUSE: ClassVar[int]  # the status a refused head is answered with
    _WHAT: ClassVar[str]  # "request" or "response", in the refusals
    _UNDERSCORE: ClassVar[str]  # the refusal of an underscore in a field name
    _LATE_CHECKS: ClassVar[bool]  # an llhttp error after the head waits for our own checks

    _limits: Limits
    _state: int
    _buf: bytearray  # unconsumed bytes when a feed ended mid-line
    _rest: bytearray  # bytes after an upgrade's head
    _remaining: int  # of a Content-Length body
    _chunked: ChunkedDecoder | None
    _headers: Headers  # fields of the head being parsed, in order
    _special: list[tuple[int, bytes]]  # its framing / hop-by-hop fields
    _head_done: bool
    _message_done: bool
    _ll: Any
    _ll_clean: bool

    # httptools callbacks (llhttp calls these while it validates a head)
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        kind = self._KINDS.get(name)
        if kind is None:
            self._headers.append((name, value))
        elif kind != K_DROP:
            self._special.append((kind, value))

    def on_headers_complete(self) -> None:
        self._head_done = True

    def on_message_complete(self) -> None:
        self._message_done = True

    def take_upgrade_rest(self) -> bytes:
        """Raw bytes received after an upgrade's head (tunnelled only after a 101)."""
        rest = bytes(self._rest)
        self._rest.clear()
        return rest

    # internals
    def _run(self, buf: bytes, events: list[EventT]) -> None:
        raise NotImplementedError

    def _die(self, error: HeadError | ChunkError) -> Reject:
        raise NotImplementedError

    def _end(self, events: list[EventT]) -> None:
        """The message ended (EndOfMessage, and the state for what may follow)."""
        raise NotImplementedError

    def _stash(self, buf: bytes, pos: int, wait: bytes | None) -> None:
        """Keep `buf[pos:]` for the next feed; `wait`: the delimiter it waits for, if known."""
        raise NotImplementedError

    def _parse(self, data: bytes, events: list[EventT]) -> list[EventT]:
        """The events of `data`; of all stashed bytes when there are some (`data` added to
        them already); a head or body refused ends them with a Reject."""
        if self._buf:
            buf = bytes(self._buf)
            self._buf.clear()
        else:
            buf = data
        try:
            self._run(buf, events)
        except (HeadError, ChunkError) as exc:
            events.append(self._die(exc))
        return events

    def _take_body(self, buf: bytes, pos: int, events: list[EventT]) -> int:
        """Content-Length body bytes from `buf[pos:]`; returns where they end."""
        take = min(self._remaining, len(buf) - pos)
        events.append(Data(buf[pos : pos + take]))
        self._remaining -= take
        if not self._remaining:
            self._end(events)
        return pos + take

    def _take_chunks(self, buf: bytes, pos: int, events: list[EventT]) -> int:
        """Chunked body bytes from `buf[pos:]`; returns where they end, or -1 when the rest
        waits for more bytes (stashed)."""
        decoder = self._chunked
        assert decoder is not None
        pos = decoder.step(buf, pos, events.append)
        if decoder.done:
            self._chunked = None
            self._end(events)
        elif pos < len(buf):
            self._stash(buf, pos, _CRLF if decoder.waits_for_line else None)
            return -1
        return pos

    def _read_fields(
        self, head: bytes
    ) -> tuple[Headers, list[tuple[int, bytes]], bool, httptools.HttpParserError | None]:
        """llhttp validates `head`; on_header sorts its fields into headers and the framing
        ones. Returns both, whether llhttp finished the message, and the error llhttp raised
        after the head was whole, when the subclass's own checks answer it (`_LATE_CHECKS`)."""
        if not self._ll_clean:
            self._ll = self._LLHTTP(self)
        self._ll_clean = False  # until this head is accepted (see the end of _parse_head)
        headers: Headers = []
        special: list[tuple[int, bytes]] = []
        self._headers = headers
        self._special = special
        self._head_done = self._message_done = False
        late_error: httptools.HttpParserError | None = None
        try:
            self._ll.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._message_done = False  # llhttp is left in tunnel mode: replace it
        except httptools.HttpParserError as exc:
            if not (self._head_done and self._LATE_CHECKS):
                raise HeadError(self._REFUSE, f"malformed {self._WHAT} head: {exc}") from None
            # llhttp objected after the head (e.g. an unknown transfer coding): our checks
            # answer with the more precise status; if they do not, this error stands.
            late_error = exc
        ll_done = self._message_done and late_error is None
        if not self._head_done:
            raise HeadError(self._REFUSE, f"malformed {self._WHAT} head")

        # Whole-head scans keep the per-field work off the common path.
        # `head.find(x) >= 0`, not `x in head`: CPython 3.11's bytes `in` first tries the needle
        # as an integer and formats a TypeError it then discards (~1.8k instructions a test,
        # seven of them per proxied request; callgrind).
        if head.find(b"_") >= 0:
            for name, _ in headers:
                if name.find(b"_") >= 0:
                    raise HeadError(self._REFUSE, self._UNDERSCORE)
        # llhttp keeps trailing OWS in values
        if head.find(b" \r\n") >= 0 or head.find(b"\t\r\n") >= 0:
            headers[:] = [(name, value.rstrip(OWS)) for name, value in headers]
            special[:] = [(kind, value.rstrip(OWS)) for kind, value in special]
        return headers, special, ll_done, late_error


# --- the request parser -----------------------------------------------------------------------

_HEAD: Final = 0
_BODY: Final = 1  # Content-Length body
_CHUNKED: Final = 2
_UPGRADED: Final = 3
_CLOSED: Final = 4  # the last message said the connection ends: later bytes are ignored
_DEAD: Final = 5  # after a Reject


class RequestParser(Http1Parser[RequestEvent]):
    """Parses a client's byte stream into RequestHead / Data / EndOfMessage, or a final Reject.

    Pipelined requests in one feed produce all their events, in order. After a Reject the parser
    is dead and returns [] (docs/hardening.md rule 6). After a head with `upgrade` set it stops
    parsing and keeps the raw bytes for `take_upgrade_rest()`. After a message that ends the
    connection (Connection: close, HTTP/1.0) later bytes are ignored: the proxy closes after
    responding.
    """

    __slots__ = ("_ka", "_scan", "_wait")

    _LLHTTP = httptools.HttpRequestParser
    _KINDS = SPECIAL
    _REFUSE = 400
    _WHAT = "request"
    _UNDERSCORE = "underscore in header name"
    _LATE_CHECKS = True

    def __init__(self, limits: Limits = Limits()) -> None:  # noqa: B008 - frozen, shared default
        self._limits = limits
        self._state = _HEAD
        self._buf = bytearray()  # unconsumed bytes when a feed ended mid-line
        self._wait: bytes | None = None  # delimiter the stashed bytes wait for, if any
        self._scan = 0  # where to resume looking for it
        self._remaining = 0
        self._chunked: ChunkedDecoder | None = None
        self._rest = bytearray()
        self._headers = []
        self._special = []
        self._head_done = False
        self._message_done = False
        self._ka = True  # keep-alive decision of the message whose body is being read
        self._ll = httptools.HttpRequestParser(self)
        self._ll_clean = True

    # public API
    def feed(self, data: bytes) -> list[RequestEvent]:
        state = self._state
        if state >= _UPGRADED:
            if state == _UPGRADED:
                self._rest += data
            return []
        if not data:
            return []
        if self._buf:
            self._buf += data
            wait = self._wait
            if wait is not None and self._buf.find(wait, self._scan) < 0:
                # Never negative: find(wait, -1) would search only the last byte.
                self._scan = max(0, len(self._buf) - len(wait) + 1)
                try:
                    self._check_partial(self._buf, 0)
                except (HeadError, ChunkError) as exc:
                    return [self._die(exc)]
                return []
        return self._parse(data, [])

    def feed_eof(self) -> list[RequestEvent]:
        state = self._state
        if state >= _UPGRADED:
            return []
        if state == _HEAD and not self._buf.strip(b"\r\n"):
            self._state = _CLOSED
            return []
        return [self._die(HeadError(400, "connection closed in the middle of a request"))]

    # internals
    def _die(self, exc: HeadError | ChunkError) -> Reject:
        self._state = _DEAD
        self._buf = bytearray()
        if isinstance(exc, HeadError):
            return Reject(exc.status, exc.reason)
        return Reject(400, str(exc))

    def _stash(self, buf: bytes, pos: int, wait: bytes | None) -> None:
        self._buf[:] = memoryview(buf)[pos:]
        self._wait = wait
        self._scan = 0 if wait is None else max(0, len(self._buf) - len(wait) + 1)

    def _check_partial(self, buf: bytes | bytearray, pos: int) -> None:
        if self._state == _HEAD:
            self._check_partial_head(buf, pos)
        elif self._chunked is not None:
            self._chunked.check_partial_line(len(buf) - pos)

    def _check_partial_head(self, buf: bytes | bytearray, pos: int) -> None:
        limits = self._limits
        if bare_lf_first(buf, pos):
            raise HeadError(400, "bare LF in request head")
        eol = buf.find(_CRLF, pos)
        if eol < 0:
            if len(buf) - pos > limits.max_request_line + 1:
                raise HeadError(414, "request line too long")
            return
        if eol - pos > limits.max_request_line:
            raise HeadError(414, "request line too long")
        if len(buf) - eol - 2 > limits.max_header_bytes:
            raise HeadError(431, "request header section too large")
        if buf.count(_CRLF, eol + 2) > limits.max_headers:
            raise HeadError(431, "too many request header fields")

    def _run(self, buf: bytes, events: list[RequestEvent]) -> None:
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == _HEAD:
                while buf.startswith(_CRLF, pos):  # RFC 9112 §2.2: ignore empty lines
                    pos += 2
                if pos >= end:
                    return
                stop = buf.find(CRLFCRLF, pos)
                if stop < 0:
                    self._check_partial_head(buf, pos)
                    self._stash(buf, pos, CRLFCRLF)
                    return
                stop += 4
                head = self._parse_head(buf, pos, stop)
                events.append(head)
                pos = stop
                if head.upgrade is not None:
                    events.append(EndOfMessage())
                    self._state = _UPGRADED
                    self._rest[:] = memoryview(buf)[pos:]
                    return
                if head.chunked:
                    self._chunked = ChunkedDecoder(self._limits)
                    self._state = _CHUNKED
                elif head.content_length:
                    self._remaining = head.content_length
                    self._state = _BODY
                else:
                    self._end(events)
            elif state == _BODY:
                pos = self._take_body(buf, pos, events)
            elif state == _CHUNKED:
                pos = self._take_chunks(buf, pos, events)
                if pos < 0:
                    return
            else:  # _CLOSED: the proxy closes after this response; nothing more is parsed
                return

    def _end(self, events: list[RequestEvent]) -> None:
        events.append(EndOfMessage())
        self._state = _HEAD if self._ka else _CLOSED

    def _parse_head(self, buf: bytes, start: int, stop: int) -> RequestHead:
        limits = self._limits
        line_end = buf.find(_CRLF, start, stop)
        if line_end - start > limits.max_request_line:
            raise HeadError(414, "request line too long")
        if stop - line_end - 2 > limits.max_header_bytes:
            raise HeadError(431, "request header section too large")
        if buf.count(_CRLF, line_end + 2, stop) - 1 > limits.max_headers:
            raise HeadError(431, "too many request header fields")
        m = _REQUEST_LINE.match(buf, start, stop)
        if m is None:
            raise HeadError(400, "malformed request line")
        method, target, minor = m.groups()
        version = V11 if minor == b"1" else V10

        whole = start == 0 and stop == len(buf)
        head = buf if whole else buf[start:stop]
        headers, special, ll_done, late_error = self._read_fields(head)
        host, hosts, content_length, te, connection, upgrade, expect_continue, last_for_llhttp = (
            read_framing(special, version)
        )

        # Framing (rule 2): one of no body, one Content-Length, or chunked alone.
        chunked = False
        if te is not None:
            if version == V10:
                raise HeadError(400, "Transfer-Encoding on HTTP/1.0")
            if content_length is not None:
                raise HeadError(400, "both Content-Length and Transfer-Encoding")
            if te != [b"chunked"]:
                if not te:
                    raise HeadError(400, "empty Transfer-Encoding")
                if b"chunked" in te[:-1]:
                    raise HeadError(400, "chunked is not the final transfer coding")
                raise HeadError(501, "unsupported transfer coding")
            chunked = True

        # Target and authority (rules 3 and 11).
        if method == b"CONNECT":
            raise HeadError(405, "CONNECT is not supported")
        if hosts > 1:
            raise HeadError(400, "more than one Host header")
        if host is not None and not valid_host(host):
            raise HeadError(400, "invalid Host header")
        if version == V11 and host is None:
            raise HeadError(400, "missing Host header")
        absolute_form = False
        if target[0] == 0x2F:  # "/": origin-form
            if target.find(b"#") >= 0:
                raise HeadError(400, "fragment in request target")
            path = target
            authority = b"" if host is None else host.lower()
        elif target == b"*":
            if method != b"OPTIONS":
                raise HeadError(400, "asterisk-form target is only for OPTIONS")
            path = target
            authority = b"" if host is None else host.lower()
        else:
            m = _ABSOLUTE_FORM.fullmatch(target)
            if m is None:
                raise HeadError(400, "malformed request target")
            scheme, authority, path = m.groups()
            if scheme.lower() != b"http":
                raise HeadError(400, "unsupported scheme in absolute-form target")
            if not valid_host(authority):
                raise HeadError(400, "invalid authority in absolute-form target")
            authority = authority.lower()
            if not path:
                path = b"/"
            elif path[0] != 0x2F:
                path = b"/" + path
            absolute_form = True

        # Connection options (rule 7): remove what it names; close / keep-alive / upgrade.
        keep_alive = version == V11
        wants_upgrade = False
        if connection:
            named: set[bytes] = set()
            for token in connection:
                if token == b"close":
                    keep_alive = False
                elif token == b"upgrade":
                    wants_upgrade = True
                elif token != b"keep-alive":
                    named.add(token)
            if named:
                headers = [h for h in headers if h[0] not in named]

        # Upgrade becomes a tunnel only for a bodiless HTTP/1.1 GET; h2c is never tunnelled.
        if upgrade is not None and not (
            wants_upgrade
            and method == b"GET"
            and version == V11
            and not chunked
            and not content_length
            and b"h2c" not in list_tokens(upgrade)
        ):
            upgrade = None

        if late_error is not None:
            raise HeadError(400, f"malformed request head: {late_error}")
        self._ka = keep_alive
        # llhttp reads the next head only if it finished this one and cannot have taken it as
        # the connection's last (HTTP/1.0, or a close as it reads Connection or
        # Proxy-Connection): after such a message it refuses every byte, the next head included.
        self._ll_clean = ll_done and not last_for_llhttp
        return RequestHead(
            method,
            path,
            authority,
            version,
            headers,
            keep_alive,
            None if chunked else content_length,
            chunked,
            expect_continue,
            upgrade,
            absolute_form,
        )


# The compiled twin takes the public name when it is built (implementation.py); this module's
# parser stays the reference, under its own name, and decides every head the twin leaves to it.
PyRequestParser: Final = RequestParser
if not TYPE_CHECKING and implementation.NATIVE is not None:
    RequestParser = implementation.NATIVE.RequestParser
