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
        _non_negative(
            self,
            (
                "max_request_line",
                "max_header_bytes",
                "max_headers",
                "max_chunk_ext_bytes",
                "max_response_header_bytes",
            ),
        )


@dataclass(frozen=True, slots=True)
class H2Limits:
    """What one HTTP/2 client connection may do before it is closed (docs/hardening.md rules
    12-17). The header list is bounded by `Limits.max_header_bytes` (SETTINGS_MAX_HEADER_LIST_SIZE,
    enforced on the decoded size: an HPACK bomb is refused too)."""

    max_concurrent_streams: int = 128  # SETTINGS_MAX_CONCURRENT_STREAMS; one more closes
    # Per `window` seconds: streams the client resets (CVE-2023-44487), PING and SETTINGS frames,
    # DATA frames with no data and no END_STREAM. Past any: GOAWAY ENHANCE_YOUR_CALM, closed.
    max_resets: int = 200
    max_control_frames: int = 1000
    max_empty_frames: int = 100
    window: int = 10

    def __post_init__(self) -> None:
        _non_negative(
            self,
            ("max_concurrent_streams", "max_resets", "max_control_frames", "max_empty_frames"),
        )
        if self.window <= 0:
            raise ValueError(f"H2Limits.window must be positive, got {self.window!r}")


def _non_negative(limits: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(limits, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            kind = type(limits).__name__
            raise ValueError(f"{kind}.{name} must be a non-negative integer, got {value!r}")
