"""Trace context in HTTP headers: W3C `traceparent`/`tracestate` and B3 (single `b3`, multi
`x-b3-*`), read and written with OpenTelemetry's own propagators.

Reading: one pass over the request's headers picks out the tracing ones (most requests have
none, and then nothing else runs); the propagators parse and validate them. When both formats
are present W3C wins (it is applied last). The common case inside a mesh, a well-formed
version-00 `traceparent` whose sampled flag is clear, is recognised by one regex without the
propagators (`unsampled_traceparent`): W3C would win and its flag says "pass through".

Writing: every tracing header the request came with is removed and the context is written fresh
from integers we hold (`traceparent`, `tracestate` when there is one, `x-b3-*`, and `b3` too
when the request used the single-header form), so a malformed incoming value is never forwarded.
The common case, no tracestate and no single `b3` header, is formatted here without the
propagators (`inject`), to the same bytes.
"""

from __future__ import annotations

import re

from opentelemetry.context import Context
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Headers = list[tuple[bytes, bytes]]

TRACE_HEADERS = frozenset(
    {
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)

_W3C = TraceContextTextMapPropagator()
_B3_MULTI = B3MultiFormat()
_B3_SINGLE = B3SingleFormat()
# B3MultiFormat.extract reads the single `b3` header too (and prefers it); W3C goes last to win.
_EXTRACT = CompositePropagator([_B3_MULTI, _W3C])


_TRACEPARENT_00 = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f][02468ace]")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16


def unsampled_traceparent(value: bytes) -> bool:
    """A valid version-00 traceparent with the sampled flag clear (what extract would say)."""
    m = _TRACEPARENT_00.fullmatch(value)
    return m is not None and m.group(1) != _ZERO_TRACE and m.group(2) != _ZERO_SPAN


class Incoming:
    """The trace context a request arrived with."""

    __slots__ = ("b3_single", "context", "deny", "parent")

    def __init__(
        self, parent: SpanContext | None, context: Context, *, b3_single: bool, deny: bool
    ) -> None:
        self.parent = parent  # a valid remote span context, or None (start a trace)
        self.context = context  # the extracted OpenTelemetry context, the span's parent
        self.b3_single = b3_single  # the client used `b3`: answer in kind
        self.deny = deny  # B3 "don't sample" without ids (`b3: 0`, `x-b3-sampled: 0`)


def find(headers: Headers) -> dict[str, str] | None:
    """The request's tracing headers (first of each), or None when it has none."""
    found: dict[str, str] | None = None
    for name, value in headers:
        if name in TRACE_HEADERS:
            if found is None:
                found = {}
            found.setdefault(name.decode("ascii"), value.decode("latin-1"))
    return found


def extract(found: dict[str, str]) -> Incoming:
    context = _EXTRACT.extract(found)
    span_context = get_current_span(context).get_span_context()
    parent = span_context if span_context.is_valid else None
    deny = parent is None and (
        found.get("b3") == "0" or (found.get("x-b3-sampled") == "0" and "x-b3-traceid" not in found)
    )
    return Incoming(parent, context, b3_single="b3" in found, deny=deny)


def inject(headers: Headers, span_context: SpanContext, *, b3_single: bool = False) -> Headers:
    """`headers` without their tracing headers, plus `span_context` written in every format.

    The common case (no tracestate, no single `b3` header) is written here directly, as the
    propagators would write it (tests hold the two to the same bytes): they cost ~12 µs a call,
    which every sampled request pays."""
    if b3_single or span_context.trace_state or not span_context.is_valid:
        return inject_with_propagators(headers, span_context, b3_single=b3_single)
    trace = b"%032x" % span_context.trace_id
    span = b"%016x" % span_context.span_id
    flags = span_context.trace_flags
    out = [(name, value) for name, value in headers if name not in TRACE_HEADERS]
    out.append((b"traceparent", b"00-%s-%s-%02x" % (trace, span, flags)))
    out.append((b"x-b3-traceid", trace))
    out.append((b"x-b3-spanid", span))
    out.append((b"x-b3-sampled", b"1" if flags & 0x01 else b"0"))
    return out


def inject_with_propagators(
    headers: Headers, span_context: SpanContext, *, b3_single: bool = False
) -> Headers:
    """`inject`, every case through OpenTelemetry's propagators."""
    carrier: dict[str, str] = {}
    context = set_span_in_context(NonRecordingSpan(span_context))
    _W3C.inject(carrier, context)
    _B3_MULTI.inject(carrier, context)
    if b3_single:
        _B3_SINGLE.inject(carrier, context)
    out = [(name, value) for name, value in headers if name not in TRACE_HEADERS]
    out.extend((name.encode("ascii"), value.encode("ascii")) for name, value in carrier.items())
    return out
