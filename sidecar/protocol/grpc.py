"""gRPC over HTTP/2 as the sidecar reads it: content-type, grpc-timeout, grpc-status.

Plain functions on header lists (no I/O), shared by the HTTP/2 transport, the gRPC-aware
classifier and the spans. Status codes are gRPC's (`grpc.StatusCode` values).
"""

from __future__ import annotations

from sidecar.flags import Flag

GRPC_CONTENT_TYPE = b"application/grpc"
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14

# retry_on tokens that name a gRPC status (sidecar/policy/retry.py): a service whose retry
# policy has one of them gets its gRPC responses' headers held until the first message (or the
# trailers), so a status that comes before any message can still be retried.
GRPC_RETRY_ON = frozenset(
    ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
)

_GRPC_TIMEOUT_UNITS = {
    ord("H"): 3600.0,
    ord("M"): 60.0,
    ord("S"): 1.0,
    ord("m"): 0.001,
    ord("u"): 0.000001,
    ord("n"): 0.000000001,
}


def grpc_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout value (1 to 8 digits and a unit, gRPC over HTTP/2); None
    when malformed (then it is ignored, as gRPC servers do)."""
    unit = _GRPC_TIMEOUT_UNITS.get(value[-1]) if value else None
    digits = value[:-1]
    if unit is None or not 0 < len(digits) <= 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def grpc_status_of(headers: list[tuple[bytes, bytes]] | None) -> int | None:
    if headers:
        for name, value in headers:
            if name == b"grpc-status":
                return int(value) if value.isdigit() else None
    return None


_NAME_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
_NAME_MAX = 128


def rpc_names(path: bytes) -> tuple[str, str] | None:
    """(service, method) of a gRPC path `/package.Service/Method`; None when the path is not
    of that form (names of letters, digits, `.`, `_`, `-`, at most 128 bytes each)."""
    service, slash, method = path[1:].partition(b"/")
    if (
        path[:1] != b"/"
        or not slash
        or not 0 < len(service) <= _NAME_MAX
        or not 0 < len(method) <= _NAME_MAX
        or not _NAME_BYTES.issuperset(service)
        or not _NAME_BYTES.issuperset(method)
    ):
        return None
    return service.decode("ascii"), method.decode("ascii")


def is_grpc(headers: list[tuple[bytes, bytes]]) -> bool:
    for name, value in headers:
        if name == b"content-type":
            return value.startswith(GRPC_CONTENT_TYPE)
    return False


def error_code(flag: Flag) -> int:
    """The gRPC status a local error with this flag ends a call with: DEADLINE_EXCEEDED for a
    timeout, else UNAVAILABLE (what gRPC clients retry and fail over on)."""
    return GRPC_DEADLINE_EXCEEDED if flag is Flag.UPSTREAM_TIMEOUT else GRPC_UNAVAILABLE


def percent_encode(text: str) -> bytes:
    """grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses")."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)
