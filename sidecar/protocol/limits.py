"""Size limits the codec enforces (docs/hardening.md rule 4). Every limit is configurable."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what a peer may make the codec hold, with the status each one earns.

    Request side: an over-long request line is 414, an over-long header section or too many
    header fields is 431, too many chunk-extension bytes in one message is 400. Response side:
    an over-long response head is a 502 (the upstream is at fault).
    """

    max_request_line: int = 8192  # bytes in the request line, CRLF excluded -> 414
    max_header_bytes: int = 61440  # bytes after the request line, final CRLF included -> 431
    max_headers: int = 100  # header fields in one request -> 431
    max_chunk_ext_bytes: int = 4096  # chunk-extension bytes, summed over one message -> 400
    max_response_header_bytes: int = 61440  # the whole response head -> 502

    def __post_init__(self) -> None:
        for name in (
            "max_request_line",
            "max_header_bytes",
            "max_headers",
            "max_chunk_ext_bytes",
            "max_response_header_bytes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"Limits.{name} must be a non-negative integer, got {value!r}")
