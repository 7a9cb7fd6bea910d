"""Traces: a SERVER span per inbound request, a CLIENT span per outbound request and, when a
request took more than one attempt, a child span per attempt; exported with OTLP gRPC.

Where it sits: `Tracing.inbound` wraps the handler to the app, `Tracing.client` is the outermost
layer of a service stack (and of passthrough), `Tracing.attempt` sits right under the balancer
(one call per attempt). With tracing off (no endpoint) none of them is built: zero cost.

Hot path. The sampling decision comes first and is all an unsampled request pays for: one pass
over the headers for tracing ones, then either the parent's sampled flag (ParentBased) or, for a
new trace, a random trace id against `TraceIdRatioBased(ratio).bound` (the SDK's sampler
arithmetic, evaluated inline on the id's hex digits, which come from os.urandom in batches:
`_NewTraces`). An unsampled new trace still gets a `sampled=0` context written into the
request, so the next hops agree not to sample it; the span layer does that itself, as bytes.
A sampled request keeps a small record (times, attempts, events) and, when it ends, turns it
into plain span records (tuples of ints, strings and dicts: `record.Record`) with explicit
start and end times. The span ids are chosen up front, because the id written into the
upstream request must be the id of the span that ends up its parent: the CLIENT span when
there was one attempt, that attempt's span when there were several. Spans end when the
response head is known (the body streams afterwards).

Export is another process's work. The records go to a list; a loop callback every 100 ms (or
when a batch is full) marshals the list and writes it, without blocking, to a socket whose other
end is the exporter process (`handoff.py` on this side, `exporter.py` on the other), which
encodes OTLP protobuf (`otlp.py`) and sends it with the SDK's OTLP gRPC exporter. Why: with the
SDK's BatchSpanProcessor and exporter in this process, building an SDK span on the loop (~33 µs
a request) and encoding it in the worker thread (~42 µs a span, under the same GIL) held 100%
sampling to 0.14-0.19x nginx, p99 1.6-2.5 s at 256 connections, 122-226 CPU-µs a request. Now
a request pays ~5 µs for its records and the hand-off, and the same bench (back to back, tests/
bench) gave 0.22-0.28x, p99 54-57 ms, 81-121 CPU-µs a request counting both processes (README,
Benchmarks). Nothing is lost silently:
every span refused on the way (queue full, exporter busy or down, collector failing) is counted
in `outrigger_spans_dropped_total{reason}` (`handoff.py` lists the reasons).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags, TraceState

from sidecar.config import Endpoint
from sidecar.exchange import (
    DownstreamGone,
    EndpointHandler,
    Handler,
    Reply,
    Request,
    Response,
    Result,
)
from sidecar.flags import Flag, ProxyError
from sidecar.policy.breaker import BreakerEvent
from sidecar.policy.classifier import GrpcBody, classify
from sidecar.protocol.grpc import error_code, grpc_status_of, is_grpc
from sidecar.telemetry import otlp_endpoint as otlp_endpoint  # re-exported
from sidecar.telemetry import propagation
from sidecar.telemetry.exporter import ExportLimits
from sidecar.telemetry.exporter import resource as resource  # re-exported
from sidecar.telemetry.handoff import (
    DROP_REASONS,
    Handoff,
    Start,
    process_starter,
    thread_starter,
)
from sidecar.telemetry.propagation import TRACE_HEADERS
from sidecar.telemetry.record import request_attributes

log = logging.getLogger("outrigger.tracing")

_LOW64 = (1 << 64) - 1
_B3_UNSAMPLED = (b"x-b3-sampled", b"0")
_B3_SAMPLED = (b"x-b3-sampled", b"1")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_UNSAMPLED = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
_NO_STATE = TraceState()
_SERVER, _CLIENT, _INTERNAL = SpanKind.SERVER.value, SpanKind.CLIENT.value, SpanKind.INTERNAL.value
_EVENT_FLAGS = {
    Flag.UPSTREAM_OVERFLOW: "outrigger.overflow",
    Flag.UPSTREAM_TIMEOUT: "outrigger.timeout",
}

Attributes = dict[str, Any]
Event = tuple[int, str, Attributes]  # time (ns), name, attributes
# Tracing.finish_server / finish_client: (trace, request, service, response, error)
_Finish = Callable[["_Trace", Request, str, Response | None, BaseException | None], None]

# A sampled request carries its `_Trace` as `Request.trace` (set by the span layer; the attempt
# layer and the breaker's event hook read it): no task, so no context variable, per request.

# -- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TracingSettings:
    service: str  # resource service.name (OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win)
    endpoint: str  # OTLP gRPC, e.g. http://127.0.0.1:4317
    sampling: float = 0.01  # until a snapshot says otherwise
    # None: the standard OTEL_BSP_* / OTEL_EXPORTER_OTLP_TIMEOUT variables or the SDK defaults
    max_queue_size: int | None = None
    schedule_delay_millis: float | None = None
    max_export_batch_size: int | None = None
    export_timeout: float | None = None  # seconds, one export including its retries

    def limits(self) -> ExportLimits:
        return ExportLimits.resolve(
            self.max_queue_size,
            self.schedule_delay_millis,
            self.max_export_batch_size,
            self.export_timeout,
        )


# -- per-request records ------------------------------------------------------------------------


def _new_span_id() -> bytes:
    """A new span id as the 16 hex digits records and headers carry (never all zeros)."""
    return b"%016x" % (random.getrandbits(64) or 1)


_BATCH = 256  # new traces' ids per os.urandom call
# One new trace's 24 random bytes in hex: the trace id (its low 64 bits apart), the span id.
_IDS = re.compile(rb"(.{16}(.{16}))(.{16})", re.DOTALL)
_ZERO_RUN = b"0" * 16


def _id_batch(count: int) -> list[tuple[bytes, bytes, bytes]]:
    """`count` new traces' ids as hex digits: (trace id, its low 64 bits, span id). A run of 16
    zero digits anywhere (which a zero, invalid, id would need) draws again."""
    while True:
        pool = os.urandom(count * 24).hex().encode()
        if _ZERO_RUN not in pool:
            return _IDS.findall(pool)


class _NewTraces:
    """What a new trace is started with: its ids, drawn from the kernel's random source 256
    traces at a time (no syscall per request) as the hex digits the headers carry, and the
    sampling bound on them.

    The decision is TraceIdRatioBased's: sample when the trace id's low 64 bits are below
    `ratio * 2**64`. Compared as 16 fixed-width lower-case hex digits, which order as the
    numbers do, so an unsampled request never turns its ids into ints."""

    __slots__ = ("bound", "ids")

    def __init__(self) -> None:
        # Endless, in C: next() refills from os.urandom every _BATCH ids.
        self.ids: Iterator[tuple[bytes, bytes, bytes]] = itertools.chain.from_iterable(
            map(_id_batch, itertools.repeat(_BATCH))
        )
        self.bound = b""  # the trace id's low 64 bits, in hex, must sort below it to sample

    def set_bound(self, bound: int | None) -> None:
        """`bound`: TraceIdRatioBased's; None: sample nothing."""
        if bound is None or bound <= 0:
            self.bound = b""  # nothing sorts below it
        elif bound > _LOW64:
            self.bound = b"g"  # everything does (hex digits sort below "g")
        else:
            self.bound = b"%016x" % bound


class _Attempt:
    """One attempt of a sampled request. Its span's attributes and status are worked out only
    when the request ends with more than one attempt (`span`): a lone attempt is no span of
    its own, its events go on the CLIENT span."""

    __slots__ = (
        "_reply",
        "_trace",
        "end",
        "endpoint",
        "events",
        "number",
        "result",
        "span_id",
        "start",
    )

    # No `__init__`: the attempt layer sets the slots (`_AttemptLayer.__call__`); a class with
    # a Python `__init__` is called through a second run of the interpreter loop.
    _trace: _Trace | None
    _reply: Reply | None  # `__call__`: the attempt's reply through the layer
    number: int
    endpoint: Endpoint
    span_id: bytes
    start: int  # ns
    end: int  # ns, 0 until it replied
    events: list[Event]
    result: Result | None  # what it replied, once it has

    def __call__(self, result: Result) -> None:
        self.end = time.time_ns()
        self.result = result
        # Let go of the trace and the reply chain: the trace holds this attempt, and a cycle
        # would leave both to the garbage collector.
        trace, reply = self._trace, self._reply
        self._trace = self._reply = None
        if trace is not None:
            trace.current = None
        if isinstance(result, ProxyError) and (event := _error_event(result)) is not None:
            self.events.append(event)  # at the time it happened
        if reply is not None:
            reply(result)

    def span(self) -> tuple[Attributes, str | None]:
        """The attempt span's attributes, and its ERROR status description (None: unset)."""
        endpoint, result = self.endpoint, self.result
        attributes: Attributes = {
            "outrigger.attempt": self.number,
            "server.address": endpoint.host,
            "server.port": endpoint.port,
        }
        if result is None:
            return attributes, None
        if isinstance(result, DownstreamGone):
            attributes["outrigger.outcome"] = "cancelled"
            return attributes, "cancelled"
        outcome = classify(result)
        attributes["outrigger.outcome"] = outcome.kind.value
        if isinstance(result, ProxyError):
            attributes["outrigger.response_flags"] = result.flag.value
            attributes["error.type"] = result.flag.value
            return attributes, str(result)
        attributes["http.response.status_code"] = result.status
        if outcome.success:
            return attributes, None
        attributes["error.type"] = str(result.status)
        return attributes, str(result.status)


class _Trace:
    """A sampled request's record, and its reply through its span layer (`__call__`: one
    object per sampled request, not two)."""

    __slots__ = (
        "attempts",
        "b3_single",
        "current",
        "events",
        "layer",
        "parent_id",
        "reply",
        "req",
        "span_id",
        "start",
        "state",
        "trace_id",
        "trace_state",
    )

    # Made by `_new_trace` (no `__init__`: a class with a Python `__init__` is called through a
    # second run of the interpreter loop, which a plain function is not).
    # Ids as lower-case hex digits (32, 16, 16), as the headers and the records carry them: a
    # new trace's come so from the pool, and turning them into ints costs every sampled request
    # (the exporter does it, off the request path).
    trace_id: bytes
    parent_id: bytes  # the remote parent's span id, b"" for a new trace
    trace_state: TraceState
    state: str  # trace_state as the record carries it
    b3_single: bool
    span_id: bytes  # what the upstream (or app) sees as its parent
    start: int  # ns
    attempts: list[_Attempt]
    current: _Attempt | None
    events: list[Event]

    layer: _SpanLayer  # these three are set by the span layer
    req: Request
    reply: Reply

    def span_context(self, span_id: bytes) -> SpanContext:
        return SpanContext(
            int(self.trace_id, 16), int(span_id, 16), False, _SAMPLED, self.trace_state
        )

    def __call__(self, result: Result) -> None:
        layer, req, reply = self.layer, self.req, self.reply
        req.trace = None
        if isinstance(result, Response):
            body = result.body
            if req.version == b"2" and isinstance(body, GrpcBody) and not body.finished:
                # A gRPC call's span ends with the call (OpenTelemetry's RPC spans): its
                # grpc-status comes in the trailers, after the messages.
                body.when_done(lambda: layer._finish(self, req, layer._service, result, None))
            else:
                finish = layer._finish  # read, then called: see sidecar/policy/stack.py
                finish(self, req, layer._service, result, None)
        else:
            finish = layer._finish
            finish(self, req, layer._service, None, result)
        del self.req, self.reply  # no cycle through the request or the reply chain
        reply(result)

    def event(self, name: str, attributes: Attributes) -> None:
        target = self.current.events if self.current is not None else self.events
        target.append((time.time_ns(), name, attributes))


def _new_trace(
    trace_id: bytes, parent_id: bytes, trace_state: TraceState, b3_single: bool, span_id: bytes
) -> _Trace:
    trace = _Trace()
    trace.trace_id = trace_id
    trace.parent_id = parent_id
    trace.trace_state = trace_state
    # An empty TraceState's truth test is a Python call.
    trace.state = trace_state.to_header() if trace_state is not _NO_STATE and trace_state else ""
    trace.b3_single = b3_single
    trace.span_id = span_id
    trace.start = time.time_ns()
    trace.attempts = []
    trace.current = None
    trace.events = []
    return trace


def _request_attributes(req: Request) -> Attributes:
    attributes = request_attributes(req.method, req.path, req.authority)
    if req.version == b"2" and is_grpc(req.headers):
        # OpenTelemetry's RPC conventions: /package.Service/Method
        service, _, method = req.path.lstrip(b"/").partition(b"/")
        attributes["rpc.system"] = "grpc"
        attributes["rpc.service"] = service.decode("ascii", "replace")
        attributes["rpc.method"] = method.decode("ascii", "replace")
    return attributes


def _error_event(error: ProxyError) -> Event | None:
    name = _EVENT_FLAGS.get(error.flag)
    if name is None:
        return None
    return (
        time.time_ns(),
        name,
        {"outrigger.response_flags": error.flag.value, "message": error.detail},
    )


# -- the layers ---------------------------------------------------------------------------------


class Tracing:
    """One sidecar's tracer: the sampler, the layers it builds, and the export pipeline."""

    def __init__(
        self,
        settings: TracingSettings,
        exporter: SpanExporter | None = None,
        drops: dict[str, int] | None = None,
    ) -> None:
        """`exporter`: export with this object in a thread of this process instead of the
        exporter process (tests; the data plane's side is the same)."""
        self.settings = settings
        self.drops = drops if drops is not None else {}
        self.drops.update(dict.fromkeys(DROP_REASONS, 0))
        limits = settings.limits()
        start: Start
        if exporter is None:
            start = process_starter(settings.service, settings.endpoint, limits)
        else:
            start = thread_starter(exporter, limits, settings.service)
        self._handoff = Handoff(limits, self.drops, start)
        self._new = _NewTraces()
        self.closed = False
        self.set_sampling(settings.sampling)

    # --- configuration ----------------------------------------------------------------------

    @property
    def sampling(self) -> float:
        return self._ratio

    def set_sampling(self, ratio: float) -> None:
        """ParentBased(TraceIdRatioBased(ratio)): the ratio decides only for new traces."""
        self._ratio = ratio
        self._new.set_bound(None if self.closed else TraceIdRatioBased(ratio).bound)

    # The layers are handed out as bound methods: Python calls one of those at about half the
    # cost of an instance with `__call__` (no slot lookup, no argument tuple).

    def client(self, inner: Handler, service: str) -> Handler:
        return _SpanLayer(self, inner, service, self.finish_client).__call__

    def attempt(self, inner: EndpointHandler) -> EndpointHandler:
        return _AttemptLayer(inner).__call__

    def inbound(self, inner: Handler, service: str) -> Handler:
        return _SpanLayer(self, inner, service, self.finish_server).__call__

    def on_breaker_event(self, event: BreakerEvent) -> None:
        """The policy layer's hook: an event on the span of the request that caused it."""
        trace = event.request.trace if event.request is not None else None
        if not isinstance(trace, _Trace):
            return
        attributes: Attributes = {
            "server.address": event.endpoint.host,
            "server.port": event.endpoint.port,
        }
        if event.open_for is not None:
            attributes["outrigger.breaker.open_for"] = event.open_for
        if event.consecutive_trips:
            attributes["outrigger.breaker.consecutive_trips"] = event.consecutive_trips
        trace.event(f"outrigger.breaker.{event.kind.value}", attributes)

    # --- the decision -----------------------------------------------------------------------

    def begin(self, req: Request) -> _Trace | None:
        """The sampling decision for a request that came with tracing headers (the span layer
        decides a new trace's itself); a record when sampled (context written)."""
        headers = req.headers
        traceparent = None
        for name, value in headers:
            if name == b"traceparent":
                traceparent = value
                break
        if traceparent is not None and propagation.unsampled_traceparent(traceparent):
            return None  # ParentBased, the mesh's common case: pass through untouched
        found = propagation.find(headers)
        if found is not None:
            incoming = propagation.extract(found)
            parent = incoming.parent
            if parent is not None:
                if not parent.trace_flags.sampled:
                    return None  # ParentBased: the context passes through untouched
                trace = _new_trace(
                    b"%032x" % parent.trace_id,
                    b"%016x" % parent.span_id,
                    parent.trace_state,
                    incoming.b3_single,
                    _new_span_id(),
                )
                req.headers = propagation.inject(
                    headers, trace.span_context(trace.span_id), b3_single=trace.b3_single
                )
                return trace
            if incoming.deny:
                return None
        # A new trace; the headers there are malformed: replace them.
        trace_hex, low, span_hex = next(self._new.ids)
        if low >= self._new.bound:
            # Unsampled: say so downstream, so the next hops do not start traces of their own.
            req.headers = propagation.inject(
                headers, SpanContext(int(trace_hex, 16), int(span_hex, 16), False, _UNSAMPLED)
            )
            return None
        trace = _new_trace(trace_hex, b"", _NO_STATE, False, span_hex)
        req.headers = propagation.inject(headers, trace.span_context(trace.span_id))
        return trace

    def sampled(self, req: Request, trace_hex: bytes, span_hex: bytes) -> _Trace:
        """A sampled new trace with these ids, for a request with no tracing headers: its
        record, and its context added to the headers (what `propagation.inject` would write:
        tests hold the two to the same bytes)."""
        req.headers += (
            (b"traceparent", b"-".join((b"00", trace_hex, span_hex, b"03"))),
            (b"x-b3-traceid", trace_hex),
            (b"x-b3-spanid", span_hex),
            _B3_SAMPLED,
        )
        return _new_trace(trace_hex, b"", _NO_STATE, False, span_hex)

    # --- spans ------------------------------------------------------------------------------

    def finish_server(
        self,
        trace: _Trace,
        req: Request,
        service: str,
        resp: Response | None,
        error: BaseException | None,
    ) -> None:
        attributes = _request_attributes(req)
        attributes["outrigger.service"] = service
        status, failed = _result_attributes(attributes, req, resp, error, True)
        self._handoff.add(
            (
                trace.trace_id,
                trace.span_id,
                trace.parent_id,
                True,  # remote
                attributes["http.request.method"],  # name
                _SERVER,  # kind
                trace.start,
                time.time_ns(),  # end
                attributes,
                trace.events,
                status if failed else None,  # error
                trace.state,
            )
        )

    def finish_client(
        self,
        trace: _Trace,
        req: Request,
        service: str,
        resp: Response | None,
        error: BaseException | None,
    ) -> None:
        end = time.time_ns()
        attempts = trace.attempts
        if (
            resp is not None
            and resp.status < 400
            and not resp.flags
            and len(attempts) <= 1
            and req.version != b"2"
        ):
            # The common span, sent short: the exporter process builds its attributes and
            # name (`record.read`).
            endpoint = resp.endpoint
            events = trace.events
            if attempts and attempts[0].events:
                events = [*attempts[0].events, *events]
            self._handoff.add(
                (
                    trace.trace_id,
                    trace.span_id,
                    trace.parent_id,
                    True,  # remote
                    "",  # name: from the attributes
                    _CLIENT,  # kind
                    trace.start,
                    end,
                    (
                        req.method,
                        req.path,
                        req.authority,
                        service,
                        max(len(attempts), req.attempts),
                        endpoint.host if endpoint is not None else None,
                        endpoint.port if endpoint is not None else None,
                        resp.status,
                    ),
                    events,
                    None,  # error
                    trace.state,
                )
            )
            return
        if isinstance(error, ProxyError) and (event := _error_event(error)) is not None:
            trace.events.append(event)  # a timeout or an overflow, on the CLIENT span
        attributes = _request_attributes(req)
        attributes["outrigger.service"] = service
        attributes["outrigger.retry.attempts"] = max(len(attempts), req.attempts)
        if resp is not None and resp.endpoint is not None:
            attributes["network.peer.address"] = resp.endpoint.host
            attributes["network.peer.port"] = resp.endpoint.port
        status, failed = _result_attributes(attributes, req, resp, error, False)
        name = f"{attributes['http.request.method']} {service}"
        add = self._handoff.add
        if len(attempts) <= 1:
            # One attempt: the CLIENT span is what the upstream saw as its parent.
            events = trace.events
            if attempts:
                events = [*attempts[0].events, *events]
            client_id = trace.span_id
        else:
            client_id = _new_span_id()
            for attempt in attempts:
                attempt_attributes, attempt_error = attempt.span()
                add(
                    (
                        trace.trace_id,
                        attempt.span_id,
                        client_id,  # parent_id
                        False,  # remote
                        f"attempt {attempt.number}",  # name
                        _INTERNAL,  # kind
                        attempt.start,
                        attempt.end or end,
                        attempt_attributes,  # attributes
                        attempt.events,
                        attempt_error,  # error
                        trace.state,
                    )
                )
            events = trace.events
        add(
            (
                trace.trace_id,
                client_id,  # span_id
                trace.parent_id,
                True,  # remote
                name,
                _CLIENT,  # kind
                trace.start,
                end,
                attributes,
                events,
                status if failed else None,  # error
                trace.state,
            )
        )

    # --- lifecycle --------------------------------------------------------------------------

    @property
    def exporter_pid(self) -> int | None:
        """The exporter process while it runs (None: not started yet, restarting, or a thread)."""
        return self._handoff.pid

    @property
    def exporter_restarts(self) -> int:
        return self._handoff.restarts

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Export what is recorded now (blocking: tests and shutdown only, off the loop)."""
        return self._handoff.force_flush(timeout)

    async def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush and stop the exporter, waiting at most `timeout`; True if it finished."""
        if self.closed:
            return True
        self.closed = True
        self._new.set_bound(None)  # sample nothing more
        return await self._handoff.shutdown(timeout)


def _result_attributes(
    attributes: Attributes,
    req: Request,
    resp: Response | None,
    error: BaseException | None,
    server: bool,
) -> tuple[str, bool]:
    """Status code, flags and error.type; returns (status description, is an error).

    `server` is positional: a call with a keyword argument is not inlined by CPython 3.11."""
    if "rpc.system" in attributes:
        # A gRPC call's status: a trailers-only answer's, its trailers' (the span of a call
        # answered with a body ends with it), or the one the sidecar's own error is sent with.
        code = None
        if resp is not None:
            body = resp.body
            if resp.has_body and isinstance(body, GrpcBody):
                code = body.grpc_status
            else:
                code = grpc_status_of(resp.headers)
        if isinstance(error, ProxyError) and not isinstance(error, DownstreamGone):
            code = error_code(error.flag)
        if code is not None:
            attributes["rpc.grpc.status_code"] = code
    if resp is not None:
        status = resp.status
        attributes["http.response.status_code"] = status
        if resp.flags:
            attributes["outrigger.response_flags"] = ",".join(flag.value for flag in resp.flags)
        # Semconv: a server's 4xx is the client's fault, a client's 4xx is an error.
        if status >= 500 or (status >= 400 and not server):
            attributes["error.type"] = str(status)
            return str(status), True
        return "", False
    if isinstance(error, DownstreamGone):
        attributes["outrigger.response_flags"] = Flag.DOWNSTREAM_DISCONNECT.value
        attributes["error.type"] = Flag.DOWNSTREAM_DISCONNECT.value
        return "cancelled: the client went away", True
    if isinstance(error, ProxyError):
        attributes["http.response.status_code"] = error.status
        attributes["outrigger.response_flags"] = error.flag.value
        attributes["error.type"] = error.flag.value  # a local error: the flag names it
        return str(error), True
    name = type(error).__qualname__ if error is not None else "unknown"
    attributes["error.type"] = name
    return name, True


class _SpanLayer:
    """A request's own span: the SERVER span around the handler to the app, or the CLIENT span,
    outermost in a service stack (its children: the attempts). It makes the sampling decision,
    puts the trace on the request for the layers below, and hands the result to `finish` on
    the way back.

    The common case is inlined here: a request with no tracing headers starts a new trace,
    and unsampled (most of them) it only gets its ids written, as hex digits from the pool."""

    __slots__ = ("_begin", "_finish", "_inner", "_new", "_sampled", "_service")

    def __init__(self, tracing: Tracing, inner: Handler, service: str, finish: _Finish) -> None:
        self._begin = tracing.begin
        self._sampled = tracing.sampled
        self._new = tracing._new
        self._finish = finish
        self._inner = inner
        self._service = service

    def __call__(self, req: Request, reply: Reply) -> None:
        headers = req.headers
        for name, _ in headers:
            if name in TRACE_HEADERS:
                begin = self._begin  # read, then called: see sidecar/policy/stack.py
                trace = begin(req)
                break
        else:
            new = self._new
            trace_hex, low, span_hex = next(new.ids)
            if low >= new.bound:
                # Unsampled: say so downstream, so the next hops do not start traces of their
                # own. What `propagation.inject` would write (tests hold the two to the same
                # bytes), without building a context.
                headers += (
                    (b"traceparent", b"-".join((b"00", trace_hex, span_hex, b"02"))),
                    (b"x-b3-traceid", trace_hex),
                    (b"x-b3-spanid", span_hex),
                    _B3_UNSAMPLED,
                )
                inner = self._inner  # read, then called: see sidecar/policy/stack.py
                inner(req, reply)
                return
            sampled = self._sampled  # read, then called: see sidecar/policy/stack.py
            trace = sampled(req, trace_hex, span_hex)
        inner = self._inner
        if trace is None:
            inner(req, reply)
            return
        req.trace = trace
        trace.layer = self
        trace.req = req
        trace.reply = reply
        inner(req, trace.__call__)


class _AttemptLayer:
    """Records each attempt of a sampled request and writes the attempt's context upstream.

    It sits right under the balancer, above the breaker: it sees every attempt the balancer
    starts with the endpoint picked for it, the breaker's refusal (UH) included, and the
    breaker's events (recorded on the way back, before this layer's reply runs) land on the
    attempt while it is current.
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: EndpointHandler) -> None:
        self._inner = inner

    def __call__(self, req: Request, endpoint: Endpoint, reply: Reply) -> None:
        trace = req.trace
        if not isinstance(trace, _Trace):
            self._inner(req, endpoint, reply)
            return
        number = len(trace.attempts) + 1
        if number == 1:
            span_id = trace.span_id  # the client layer wrote it already
        else:
            span_id = _new_span_id()
            req.headers = propagation.inject(
                req.headers, trace.span_context(span_id), b3_single=trace.b3_single
            )
        attempt = _Attempt()
        attempt._trace = trace
        attempt._reply = reply
        attempt.number = number
        attempt.endpoint = endpoint
        attempt.span_id = span_id
        attempt.start = time.time_ns()
        attempt.end = 0
        attempt.events = []
        attempt.result = None
        trace.attempts.append(attempt)
        trace.current = attempt
        inner = self._inner  # read, then called: see sidecar/policy/stack.py
        inner(req, endpoint, attempt.__call__)
