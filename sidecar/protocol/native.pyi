"""Types of the compiled codec (native.pyx): the same API as request.py, response.py and
serialize.py, whose names it takes when it is built (implementation.py)."""

from typing import Final

from .events import Headers, RequestEvent, ResponseEvent
from .limits import Limits

__all__ = [
    "LAST_CHUNK",
    "RequestParser",
    "ResponseParser",
    "chunk",
    "request_head",
    "response_head",
]

LAST_CHUNK: Final[bytes]

class RequestParser:
    def __init__(self, limits: Limits = ...) -> None: ...
    def feed(self, data: bytes) -> list[RequestEvent]: ...
    def feed_eof(self) -> list[RequestEvent]: ...
    def take_upgrade_rest(self) -> bytes: ...

class ResponseParser:
    def __init__(self, request_method: bytes, limits: Limits = ...) -> None: ...
    def reset(self, request_method: bytes) -> None: ...
    @property
    def reusable(self) -> bool: ...
    def feed(self, data: bytes) -> list[ResponseEvent]: ...
    def feed_eof(self) -> list[ResponseEvent]: ...
    def take_upgrade_rest(self) -> bytes: ...

def request_head(
    method: bytes,
    path: bytes,
    authority: bytes,
    headers: Headers,
    *,
    content_length: int | None,
    chunked: bool,
    parsed: bool = False,
) -> bytes: ...
def response_head(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    version: bytes = ...,
    content_length: int | None,
    chunked: bool,
    close: bool,
    parsed: bool = False,
) -> bytes: ...
def chunk(data: bytes) -> bytes: ...
