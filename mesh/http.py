"""HTTP facts every part of the mesh writes the same way: which methods are idempotent, and the
reason phrase for each status code a component answers with itself.

The sidecar retries and replays by the first (its retry layer and its connection pool), the
control plane translates it into `retriable_request_headers`; the sidecar, its admin pages, the
control plane's HTTP port and the demo apps write the second.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# RFC 9110 §9.2.2, in the order the control plane writes them as `:method` matchers.
IDEMPOTENT_METHODS: Final = ("DELETE", "GET", "HEAD", "OPTIONS", "PUT", "TRACE")
IDEMPOTENT_METHODS_BYTES: Final = frozenset(method.encode() for method in IDEMPOTENT_METHODS)

# RFC 9110's phrases (413 and 414 in its spelling), plus nginx's 499 for a client gone.
REASON_PHRASES: Final[Mapping[int, str]] = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def reason_phrase(status: int) -> str:
    """The phrase for `status`; empty for a code not listed (HTTP/1.1 allows an empty one)."""
    return REASON_PHRASES.get(status, "")
