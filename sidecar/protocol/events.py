"""What the sans-IO codec produces: plain values, no I/O.

Parsers take bytes and return a list of these events, in wire order. A `Reject` is always the
last event of a parser's life: after it, the parser accepts no more input.
"""

from __future__ import annotations

from dataclasses import dataclass

Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class RequestHead:
    method: bytes  # as sent (methods are case-sensitive tokens)
    path: bytes  # origin-form target (absolute-form is reduced to its path and query)
    authority: (
        bytes  # lower-case host[:port] from absolute-form or Host; b"" on HTTP/1.0 without Host
    )
    version: bytes  # b"1.1" or b"1.0"
    headers: Headers  # lower-case names; hop-by-hop and Host removed; values as sent
    keep_alive: bool  # the client wants the connection kept open after this exchange
    content_length: int | None  # None when chunked or no body framing
    chunked: bool
    expect_continue: bool  # Expect: 100-continue
    upgrade: bytes | None  # the Upgrade value when Connection names upgrade (e.g. b"websocket")
    absolute_form: bool  # the target was absolute-form (explicit proxy)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    version: bytes
    headers: Headers  # lower-case names; hop-by-hop removed
    keep_alive: bool  # the connection may be reused after this response
    content_length: int | None
    chunked: bool
    has_body: bool  # False for HEAD, 1xx, 204, 304
    upgrade: bytes | None  # set on a 101 (the Upgrade value)


@dataclass(slots=True)
class Data:
    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    pass


@dataclass(slots=True)
class Reject:
    """The peer sent something we refuse. For a request: answer `status` and close.

    For a response: the proxy answers 502 (flag UPE) and closes the upstream connection.
    """

    status: int
    reason: str


RequestEvent = RequestHead | Data | EndOfMessage | Reject
ResponseEvent = ResponseHead | Data | EndOfMessage | Reject
