"""The demo's own trace collector: an OTLP/gRPC TraceService on 127.0.0.1, so that, without
Jaeger, the demo can end with the waterfall of one retried request.

It runs in a process of its own (`python -m outrigger.demo.traces`), so that decoding every span
(the demo samples 100%) takes nothing from the demo's event loop. The sidecars export to it
exactly as to any collector (`--otlp-endpoint http://127.0.0.1:PORT`, the port picked by the
kernel, printed on its first line). It tells the demo what it holds in JSON lines on stdout:
`{"trace": ...}` whenever the retried request it would show changed (at most a few dozen times:
the retried traces are few and bounded), and `{"stats": ...}` (spans received and dropped) every
second. `TraceFeed` is the demo's side: it reads those lines.

`TraceStore` is plain bookkeeping (no gRPC, no loop); memory is bounded: the last `max_traces`
traces, plus up to `max_kept` traces that hold a retried request, kept to the end (the story's
retries happen early, the waterfall is printed last), each at most `max_spans` spans. Spans over
a bound are dropped and counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from outrigger.demo.processes import json_message

# OTLP enum values (opentelemetry/proto/trace/v1/trace.proto)
INTERNAL, SERVER, CLIENT = 1, 2, 3
KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}
STATUS_ERROR = 2

Attributes = dict[str, Any]


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One span as it arrived, ids in hex."""

    trace_id: str
    span_id: str
    parent: str  # "": a root
    name: str
    kind: int
    start: int  # ns since the epoch
    end: int
    attributes: Attributes
    events: list[tuple[str, Attributes]]
    status: int
    resource: Attributes

    @property
    def service(self) -> str:
        return str(self.resource.get("service.name", "?"))

    @property
    def attempts(self) -> int:
        value = self.attributes.get("outrigger.retry.attempts", 1)
        return value if isinstance(value, int) else 1

    @property
    def retried(self) -> bool:
        """A request the sidecar sent more than once (its attempts are child spans)."""
        return self.kind == CLIENT and self.attempts > 1

    @property
    def is_attempt(self) -> bool:
        return "outrigger.attempt" in self.attributes


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return bytes(value.bytes_value).hex()
    return getattr(value, kind) if kind else None


def _attributes(kvs: Any) -> Attributes:
    return {kv.key: _value(kv.value) for kv in kvs}


def decode(request: Any) -> Iterator[SpanRecord]:
    """The spans of an ExportTraceServiceRequest."""
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                yield SpanRecord(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent=span.parent_span_id.hex(),
                    name=span.name,
                    kind=span.kind,
                    start=span.start_time_unix_nano,
                    end=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    events=[(e.name, _attributes(e.attributes)) for e in span.events],
                    status=span.status.code,
                    resource=resource,
                )


@dataclass
class Trace:
    trace_id: str
    spans: list[SpanRecord] = field(default_factory=list)

    @property
    def start(self) -> int:
        return min(s.start for s in self.spans)

    @property
    def end(self) -> int:
        return max(s.end for s in self.spans)

    def children(self) -> dict[str, list[SpanRecord]]:
        """Spans by parent span id, each list in start order."""
        by_parent: dict[str, list[SpanRecord]] = {}
        for span in sorted(
            self.spans, key=lambda s: (s.start, s.attributes.get("outrigger.attempt", 0))
        ):
            by_parent.setdefault(span.parent, []).append(span)
        return by_parent

    def roots(self) -> list[SpanRecord]:
        """Spans whose parent is not here: the trace's root, and any whose parent is missing."""
        ids = {s.span_id for s in self.spans}
        return sorted((s for s in self.spans if s.parent not in ids), key=lambda s: s.start)

    def retried(self) -> SpanRecord | None:
        """The first retried CLIENT span that has its attempt spans."""
        children = self.children()
        for span in sorted(self.spans, key=lambda s: s.start):
            if span.retried and len(self.attempts(span, children)) > 1:
                return span
        return None

    def attempts(
        self, span: SpanRecord, children: dict[str, list[SpanRecord]] | None = None
    ) -> list[SpanRecord]:
        kids = (children if children is not None else self.children()).get(span.span_id, [])
        return [s for s in kids if s.is_attempt]

    @property
    def complete(self) -> bool:
        """One root that started the trace, no orphan, and every attempt that got an answer has
        the answering sidecar's span under it (those arrive from other sidecars, maybe later)."""
        roots = self.roots()
        if len(roots) != 1 or roots[0].parent:
            return False
        children = self.children()
        return all(
            s.span_id in children
            for s in self.spans
            if s.is_attempt and "http.response.status_code" in s.attributes
        )


class TraceStore:
    """Spans by trace, bounded (see the module docstring)."""

    def __init__(self, max_traces: int = 1000, max_kept: int = 16, max_spans: int = 256) -> None:
        self.max_traces = max_traces
        self.max_kept = max_kept
        self.max_spans = max_spans
        self._recent: OrderedDict[str, Trace] = OrderedDict()
        self._kept: OrderedDict[str, Trace] = OrderedDict()
        self.received = 0
        self.dropped = 0
        self.kept_changes = 0  # spans added to a kept trace: the one to show may have changed

    def add(self, span: SpanRecord) -> None:
        self.received += 1
        trace_id = span.trace_id
        trace = self._kept.get(trace_id)
        if trace is not None or span.retried:
            self.kept_changes += 1
        if trace is None and span.retried:
            # Keep it, with whatever of it arrived already from the other sidecars.
            trace = self._recent.pop(trace_id, None) or Trace(trace_id)
            self._kept[trace_id] = trace
            while len(self._kept) > self.max_kept:
                self.dropped += len(self._kept.popitem(last=False)[1].spans)
        if trace is None:
            trace = self._recent.get(trace_id)
            if trace is None:
                trace = self._recent[trace_id] = Trace(trace_id)
                while len(self._recent) > self.max_traces:
                    self.dropped += len(self._recent.popitem(last=False)[1].spans)
        if len(trace.spans) >= self.max_spans:
            self.dropped += 1
            return
        trace.spans.append(span)

    def spans(self) -> list[SpanRecord]:
        """Every span held, the kept traces' first."""
        return [s for t in (*self._kept.values(), *self._recent.values()) for s in t.spans]

    def retried(self) -> Trace | None:
        """The trace to show: a retried request's, complete if one is, with a breaker event if
        one has, else the earliest."""
        candidates = [t for t in self._kept.values() if t.retried() is not None]
        if not candidates:
            return None

        def rank(t: Trace) -> tuple[bool, bool]:
            events = any(
                name.startswith("outrigger.breaker.") for s in t.spans for name, _ in s.events
            )
            return t.complete, events

        return max(candidates, key=rank)  # max keeps the first (earliest) of equals


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's TraceService: every exported span goes into the store."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store
        self._arrived = asyncio.Event()

    async def Export(  # the generated service's method name
        self, request: Any, context: Any
    ) -> Any:
        for span in decode(request):
            self.store.add(span)
        self._arrived.set()
        return trace_service_pb2.ExportTraceServiceResponse()

    async def arrived(self) -> None:
        """Until an export arrived since the last call."""
        await self._arrived.wait()
        self._arrived.clear()

    async def until(self, check: Callable[[], bool], timeout: float) -> bool:
        """Wait until `check()` holds after some export, at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not check():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return True


@contextlib.asynccontextmanager
async def receive(store: TraceStore | None = None) -> AsyncIterator[tuple[TraceReceiver, str]]:
    """A TraceService on 127.0.0.1, port picked by the kernel; yields it and its OTLP URL."""
    receiver = TraceReceiver(store if store is not None else TraceStore())
    server = grpc.aio.server()
    add = trace_service_pb2_grpc.add_TraceServiceServicer_to_server
    add(receiver, server)  # type: ignore[no-untyped-call]  # generated code, untyped
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield receiver, f"http://127.0.0.1:{port}"
    finally:
        await server.stop(None)


# --- the receiver as a process, and the demo's side of it --------------------------------------


def span_json(span: SpanRecord) -> dict[str, Any]:
    return asdict(span)


def span_from_json(d: dict[str, Any]) -> SpanRecord:
    return SpanRecord(**{**d, "events": [(name, attrs) for name, attrs in d["events"]]})


def _emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _serve() -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with receive() as (receiver, url):
        print(f"outrigger demo traces listening {url.removeprefix('http://')}", flush=True)
        store = receiver.store
        seen_changes = 0
        shown: tuple[str, int] | None = None
        counted = 0.0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(receiver.arrived(), 1.0)
            if store.kept_changes != seen_changes:
                seen_changes = store.kept_changes
                trace = store.retried()
                if trace is not None and (trace.trace_id, len(trace.spans)) != shown:
                    shown = (trace.trace_id, len(trace.spans))
                    spans = [span_json(span) for span in trace.spans]
                    _emit({"trace": {"trace_id": trace.trace_id, "spans": spans}})
            if time.monotonic() - counted >= 1.0:
                counted = time.monotonic()
                _emit({"stats": {"received": store.received, "dropped": store.dropped}})
    return 0


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m outrigger.demo.traces",
        description="the demo's OTLP/gRPC trace receiver on 127.0.0.1 (a kernel-picked port)",
    ).parse_args(argv)
    return asyncio.run(_serve())


class TraceFeed:
    """What the receiver process said, as the demo keeps it: the retried request's trace to
    show, and the span counts. `feed` takes its output lines (from another thread: each update
    is one assignment)."""

    def __init__(self) -> None:
        self.trace: Trace | None = None
        self.received = 0
        self.dropped = 0
        self.updated = 0  # lines taken

    def feed(self, line: str) -> None:
        message = json_message(line)
        if message is None:
            return
        if "trace" in message:
            got = message["trace"]
            self.trace = Trace(got["trace_id"], [span_from_json(d) for d in got["spans"]])
        elif "stats" in message:
            self.received = int(message["stats"]["received"])
            self.dropped = int(message["stats"]["dropped"])
        self.updated += 1


if __name__ == "__main__":
    sys.exit(main())
