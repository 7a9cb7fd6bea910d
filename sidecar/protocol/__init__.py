"""Sans-IO HTTP/1.1 codec: parsers turn bytes into events, serializers turn the model into bytes.

Never imports asyncio; see docs/hardening.md for the rules it enforces. The parsers and the
head serializers run compiled (native.pyx) when it is built, with the .py modules as the reference
(implementation.py says which runs).
"""

from .events import (
    Data,
    EndOfMessage,
    Headers,
    Reject,
    RequestEvent,
    RequestHead,
    ResponseEvent,
    ResponseHead,
)
from .limits import Limits
from .request import RequestParser
from .response import ResponseParser
from .serialize import LAST_CHUNK, chunk, informational, request_head, response_head

__all__ = [
    "LAST_CHUNK",
    "Data",
    "EndOfMessage",
    "Headers",
    "Limits",
    "Reject",
    "RequestEvent",
    "RequestHead",
    "RequestParser",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
    "chunk",
    "informational",
    "request_head",
    "response_head",
]
