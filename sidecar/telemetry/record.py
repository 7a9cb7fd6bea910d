"""The span record: one finished span as the data plane hands it to the exporter process.

`tracing.py` builds it, `handoff.py` sends it, `exporter.py` and `otlp.py` read it. It crosses the
socket as a plain tuple (marshal takes no tuple subclass, so the data plane builds `Fields`, never
a `Record`); the exporter's side reads it back with `Record._make`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# What the data plane builds: a plain tuple in `Record`'s field order (constructing the
# NamedTuple is a Python-level call, which every sampled span would pay).
Fields = tuple[
    bytes, bytes, bytes, bool, str, int, int, int, dict[str, Any], list[Any], str | None, str
]


class Record(NamedTuple):
    # Ids as lower-case hex digits (32 for the trace, 16 for a span), as the headers carry
    # them: the data plane never turns them into ints (`int(id, 16)`, `unhexlify(id)` here).
    trace_id: bytes
    span_id: bytes
    parent_id: bytes  # b"": no parent
    remote: bool  # the parent is another process's span
    name: str
    kind: int  # SpanKind value
    start: int  # ns since the epoch
    end: int
    attributes: dict[str, Any]
    events: list[Any]  # [(time ns, name, attributes)]
    error: str | None  # the ERROR status description; None: status unset
    state: str  # W3C tracestate header, or ""
