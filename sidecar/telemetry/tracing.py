"""Traces: a SERVER span per inbound request, a CLIENT span per outbound request and, when a
request took more than one attempt, a child span per attempt; exported with OTLP gRPC.

Where it sits: `Tracing.inbound` wraps the handler to the app, `Tracing.client` is the outermost
layer of a service stack (and of passthrough), `Tracing.attempt` sits right under the balancer
(one call per attempt). With tracing off (no endpoint) none of them is built: zero cost.

Hot path. The sampling decision comes first and is all an unsampled request pays for: one pass
over the headers for tracing ones, then either the parent's sampled flag (ParentBased) or, for a
new trace, a random trace id against `TraceIdRatioBased(ratio).bound` (the SDK's sampler
arithmetic, evaluated inline). An unsampled new trace still gets a `sampled=0` context written
into the request, so the next hops agree not to sample it. A sampled request keeps a small
record (times, attempts, events) and its spans are made when it ends, with explicit start and
end times. The span ids are chosen up front (`_PresetIds` hands them to the SDK), because the id
written into the upstream request must be the id of the span that ends up its parent: the CLIENT
span when there was one attempt, that attempt's span when there were several. Spans end when the
response head is known (the body streams afterwards).

Export never touches the data plane: `BatchSpanProcessor` hands spans to its worker thread
through a bounded queue. `_BoundedProcessor` refuses a span when the queue is full (the SDK
would evict the oldest and log a warning per span) and counts it; `_CountingExporter` counts the
spans of every failed export. Both land in `outrigger_spans_dropped_total{reason}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, TraceIdRatioBased
from opentelemetry.trace import (
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from sidecar.exchange import EndpointHandler, Handler, Request, Response
from sidecar.flags import Flag, ProxyError
from sidecar.policy.breaker import BreakerEvent
from sidecar.policy.classifier import classify
from sidecar.runtime import Endpoint
from sidecar.telemetry import otlp_endpoint as otlp_endpoint  # re-exported
from sidecar.telemetry import propagation
from sidecar.telemetry.propagation import TRACE_HEADERS

log = logging.getLogger("outrigger.tracing")

_LOW64 = (1 << 64) - 1
_SAMPLED = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_UNSAMPLED = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
_NO_STATE = TraceState()
_DEADLINE_SLACK = 1e-6  # as in the breaker: a timer may fire up to the clock resolution early
_EVENT_FLAGS = {
    Flag.UPSTREAM_OVERFLOW: "outrigger.overflow",
    Flag.UPSTREAM_TIMEOUT: "outrigger.timeout",
}

Attributes = dict[str, Any]
Event = tuple[int, str, Attributes]  # time (ns), name, attributes

# The sampled request this task is serving (set by the client layer; the attempt layer and the
# breaker's event hook read it). Each request cycle is its own task, so it never leaks.
_current: ContextVar[_Trace | None] = ContextVar("outrigger_trace", default=None)

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


def resource(service: str, env: Mapping[str, str] = os.environ) -> Resource:
    attributes: dict[str, str] = {"service.name": service}
    if env.get("POD_NAME"):
        attributes["k8s.pod.name"] = env["POD_NAME"]
    if env.get("POD_NAMESPACE"):
        attributes["k8s.namespace.name"] = env["POD_NAMESPACE"]
    # Resource.create lets our attributes override the environment; an operator's explicit
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES should win instead, so merge them last.
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


# -- export -------------------------------------------------------------------------------------


class _CountingExporter(SpanExporter):
    """Counts spans leaving the queue and spans whose export failed (the worker thread only)."""

    def __init__(self, inner: SpanExporter, drops: dict[str, int]) -> None:
        self._inner = inner
        self._drops = drops
        self.taken = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.taken += len(spans)
        try:
            result = self._inner.export(spans)
        except Exception:
            self._drops["export_failed"] += len(spans)
            raise
        if result is not SpanExportResult.SUCCESS:
            self._drops["export_failed"] += len(spans)
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class _BoundedProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that refuses (and counts) a span when its queue is full."""

    def __init__(self, exporter: _CountingExporter, settings: TracingSettings) -> None:
        size = settings.max_queue_size or _env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        batch = settings.max_export_batch_size
        if batch is None:
            batch = min(size, _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512))
        super().__init__(
            exporter,
            max_queue_size=size,
            schedule_delay_millis=settings.schedule_delay_millis,
            max_export_batch_size=batch,
        )
        self._counting = exporter
        self._size = size
        self._drops = exporter._drops
        self.emitted = 0

    def on_end(self, span: ReadableSpan) -> None:
        # `emitted - taken` is what the queue holds (an upper bound while a batch is in hand).
        if self.emitted - self._counting.taken >= self._size:
            self._drops["queue_full"] += 1
            return
        self.emitted += 1
        super().on_end(span)


class _PresetIds(RandomIdGenerator):
    """Hands the SDK the ids we chose (and already propagated) for the next span."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_trace_id(self) -> int:
        preset, self.trace_id = self.trace_id, 0
        return preset or super().generate_trace_id()

    def generate_span_id(self) -> int:
        preset, self.span_id = self.span_id, 0
        return preset or super().generate_span_id()


def _new_span_id() -> int:
    return random.getrandbits(64) or 1


# -- per-request records ------------------------------------------------------------------------


class _Attempt:
    __slots__ = ("attributes", "end", "endpoint", "error", "events", "number", "span_id", "start")

    def __init__(self, number: int, endpoint: Endpoint, span_id: int) -> None:
        self.number = number
        self.endpoint = endpoint
        self.span_id = span_id
        self.start = time.time_ns()
        self.end = 0
        self.events: list[Event] = []
        self.attributes: Attributes = {}
        self.error: str | None = None  # set: the span's status is ERROR with this description


class _Trace:
    __slots__ = (
        "attempts",
        "b3_single",
        "context",
        "current",
        "events",
        "span_id",
        "start",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self, trace_id: int, context: Context | None, trace_state: TraceState, b3_single: bool
    ) -> None:
        self.trace_id = trace_id
        self.context = context  # the remote parent, None for a new trace
        self.trace_state = trace_state
        self.b3_single = b3_single
        self.span_id = _new_span_id()  # what the upstream (or app) sees as its parent
        self.start = time.time_ns()
        self.attempts: list[_Attempt] = []
        self.current: _Attempt | None = None
        self.events: list[Event] = []

    def span_context(self, span_id: int) -> SpanContext:
        return SpanContext(self.trace_id, span_id, False, _SAMPLED, self.trace_state)

    def event(self, name: str, attributes: Attributes) -> None:
        target = self.current.events if self.current is not None else self.events
        target.append((time.time_ns(), name, attributes))


def _split_authority(authority: bytes) -> tuple[str, int | None]:
    text = authority.decode("ascii", "replace")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:]
    else:
        host, _, port = text.partition(":")
    return host, int(port) if port.isdigit() else None


def _request_attributes(req: Request) -> Attributes:
    host, port = _split_authority(req.authority)
    attributes: Attributes = {
        "http.request.method": req.method.decode("ascii", "replace"),
        "url.path": req.path.partition(b"?")[0].decode("ascii", "replace"),
        "server.address": host,
    }
    if port is not None:
        attributes["server.port"] = port
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
        self.settings = settings
        self.drops = drops if drops is not None else {}
        self.drops.update(queue_full=0, export_failed=0)
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=settings.endpoint, timeout=settings.export_timeout)
        self._exporter = _CountingExporter(exporter, self.drops)
        self._processor = _BoundedProcessor(self._exporter, settings)
        self._ids = _PresetIds()
        # The sampling decision is ours (see the module docstring): the SDK records every span.
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,
            resource=resource(settings.service),
            id_generator=self._ids,
            shutdown_on_exit=False,  # shutdown() is bounded; an atexit one might hang
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer("outrigger.sidecar")
        self._bound = 0
        self.set_sampling(settings.sampling)
        self.closed = False

    # --- configuration ----------------------------------------------------------------------

    @property
    def sampling(self) -> float:
        return self._ratio

    def set_sampling(self, ratio: float) -> None:
        """ParentBased(TraceIdRatioBased(ratio)): the ratio decides only for new traces."""
        self._ratio = ratio
        self._bound = TraceIdRatioBased(ratio).bound

    def client(self, inner: Handler, service: str) -> Handler:
        return _ClientLayer(self, inner, service)

    def attempt(self, inner: EndpointHandler) -> EndpointHandler:
        return _AttemptLayer(inner)

    def inbound(self, inner: Handler, service: str) -> Handler:
        return _ServerLayer(self, inner, service)

    def on_breaker_event(self, event: BreakerEvent) -> None:
        """The policy layer's hook: an event on the span of the request that caused it."""
        trace = _current.get()
        if trace is None:
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
        """The sampling decision for a request; a record when sampled (context written)."""
        headers = req.headers
        traceparent = None
        traced = False
        for name, value in headers:
            if name in TRACE_HEADERS:
                traced = True
                if name == b"traceparent" and traceparent is None:
                    traceparent = value
        if traced:
            if traceparent is not None and propagation.unsampled_traceparent(traceparent):
                return None  # ParentBased, the mesh's common case: pass through untouched
            found = propagation.find(headers)
            assert found is not None
            incoming = propagation.extract(found)
            parent = incoming.parent
            if parent is not None:
                if not parent.trace_flags.sampled:
                    return None  # ParentBased: the context passes through untouched
                trace = _Trace(
                    parent.trace_id, incoming.context, parent.trace_state, incoming.b3_single
                )
                req.headers = propagation.inject(
                    headers, trace.span_context(trace.span_id), b3_single=trace.b3_single
                )
                return trace
            if incoming.deny:
                return None
        # A new trace: TraceIdRatioBased's test on the low 64 bits of a random trace id.
        trace_id = random.getrandbits(128) or 1
        if (trace_id & _LOW64) >= self._bound or self.closed:
            # Unsampled: say so downstream, so the next hops do not start traces of their own.
            if traced:  # only malformed tracing headers: replace them
                req.headers = propagation.inject(
                    headers, SpanContext(trace_id, _new_span_id(), False, _UNSAMPLED)
                )
            else:
                propagation.append_unsampled(headers, trace_id, _new_span_id())
            return None
        trace = _Trace(trace_id, None, _NO_STATE, False)
        req.headers = propagation.inject(headers, trace.span_context(trace.span_id))
        return trace

    # --- spans ------------------------------------------------------------------------------

    def _start(
        self,
        trace: _Trace,
        name: str,
        kind: SpanKind,
        span_id: int,
        start: int,
        parent: Context | None,
        attributes: Attributes,
    ) -> Span:
        ids = self._ids
        ids.trace_id = trace.trace_id if parent is None else 0
        ids.span_id = span_id
        try:
            return self._tracer.start_span(
                name, context=parent, kind=kind, attributes=attributes, start_time=start
            )
        finally:
            ids.trace_id = ids.span_id = 0

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
        status, failed = _result_attributes(attributes, req, resp, error, server=True)
        span = self._start(
            trace,
            attributes["http.request.method"],
            SpanKind.SERVER,
            trace.span_id,
            trace.start,
            trace.context,
            attributes,
        )
        _end(span, trace.events, status if failed else None, time.time_ns())

    def finish_client(
        self,
        trace: _Trace,
        req: Request,
        service: str,
        resp: Response | None,
        error: BaseException | None,
    ) -> None:
        end = time.time_ns()
        attributes = _request_attributes(req)
        attributes["outrigger.service"] = service
        attempts = trace.attempts
        attributes["outrigger.retry.attempts"] = max(len(attempts), req.attempts)
        if resp is not None and resp.endpoint is not None:
            attributes["network.peer.address"] = resp.endpoint.host
            attributes["network.peer.port"] = resp.endpoint.port
        status, failed = _result_attributes(attributes, req, resp, error, server=False)
        name = f"{attributes['http.request.method']} {service}"
        if len(attempts) <= 1:
            # One attempt: the CLIENT span is what the upstream saw as its parent.
            events = trace.events
            if attempts:
                events = [*attempts[0].events, *events]
            span = self._start(
                trace, name, SpanKind.CLIENT, trace.span_id, trace.start, trace.context, attributes
            )
            _end(span, events, status if failed else None, end)
            return
        span = self._start(
            trace, name, SpanKind.CLIENT, _new_span_id(), trace.start, trace.context, attributes
        )
        parent = set_span_in_context(span)
        for attempt in attempts:
            child = self._start(
                trace,
                f"attempt {attempt.number}",
                SpanKind.INTERNAL,
                attempt.span_id,
                attempt.start,
                parent,
                attempt.attributes,
            )
            _end(child, attempt.events, attempt.error, attempt.end or end)
        _end(span, trace.events, status if failed else None, end)

    # --- lifecycle --------------------------------------------------------------------------

    def force_flush(self, timeout: float = 5.0) -> bool:
        """Export what is queued now (blocking: tests and shutdown only, off the loop)."""
        return self._provider.force_flush(int(timeout * 1000))

    async def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush and stop the exporter, waiting at most `timeout`; True if it finished."""
        if self.closed:
            return True
        self.closed = True
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def run() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be gone by now
                    loop.call_soon_threadsafe(_set_done, done)

        # A daemon thread, not the default executor: if the collector hangs, exit is not held.
        threading.Thread(target=run, name="outrigger-tracing-shutdown", daemon=True).start()
        try:
            async with asyncio.timeout(timeout):
                await done
        except TimeoutError:
            log.warning("tracing: export did not finish within %gs at shutdown", timeout)
            return False
        return True


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _result_attributes(
    attributes: Attributes,
    req: Request,
    resp: Response | None,
    error: BaseException | None,
    *,
    server: bool,
) -> tuple[str, bool]:
    """Status code, flags and error.type; returns (status description, is an error)."""
    if resp is not None:
        status = resp.status
        attributes["http.response.status_code"] = status
        flags = ",".join(flag.value for flag in resp.flags)
        if flags:
            attributes["outrigger.response_flags"] = flags
        # Semconv: a server's 4xx is the client's fault, a client's 4xx is an error.
        if status >= 500 or (status >= 400 and not server):
            attributes["error.type"] = str(status)
            return str(status), True
        return "", False
    if isinstance(error, ProxyError):
        attributes["http.response.status_code"] = error.status
        attributes["outrigger.response_flags"] = error.flag.value
        attributes["error.type"] = error.flag.value  # a local error: the flag names it
        return str(error), True
    if isinstance(error, asyncio.CancelledError):
        attributes["outrigger.response_flags"] = Flag.DOWNSTREAM_DISCONNECT.value
        attributes["error.type"] = Flag.DOWNSTREAM_DISCONNECT.value
        return "cancelled: the client went away", True
    name = type(error).__qualname__ if error is not None else "unknown"
    attributes["error.type"] = name
    return name, True


def _end(span: Span, events: list[Event], error: str | None, end: int) -> None:
    for at, name, attributes in events:
        span.add_event(name, attributes, at)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end)


class _ServerLayer:
    """The SERVER span around the handler to the app."""

    __slots__ = ("_inner", "_service", "_tracing")

    def __init__(self, tracing: Tracing, inner: Handler, service: str) -> None:
        self._tracing = tracing
        self._inner = inner
        self._service = service

    async def __call__(self, req: Request) -> Response:
        trace = self._tracing.begin(req)
        if trace is None:
            return await self._inner(req)
        token = _current.set(trace)
        try:
            resp = await self._inner(req)
        except BaseException as error:
            self._tracing.finish_server(trace, req, self._service, None, error)
            raise
        finally:
            _current.reset(token)
        self._tracing.finish_server(trace, req, self._service, resp, None)
        return resp


class _ClientLayer:
    """The CLIENT span: outermost layer of a service stack (its children: the attempts)."""

    __slots__ = ("_inner", "_service", "_tracing")

    def __init__(self, tracing: Tracing, inner: Handler, service: str) -> None:
        self._tracing = tracing
        self._inner = inner
        self._service = service

    async def __call__(self, req: Request) -> Response:
        trace = self._tracing.begin(req)
        if trace is None:
            return await self._inner(req)
        token = _current.set(trace)
        try:
            resp = await self._inner(req)
        except BaseException as error:
            if isinstance(error, ProxyError) and (event := _error_event(error)) is not None:
                trace.events.append(event)
            self._tracing.finish_client(trace, req, self._service, None, error)
            raise
        finally:
            _current.reset(token)
        self._tracing.finish_client(trace, req, self._service, resp, None)
        return resp


class _AttemptLayer:
    """Records each attempt of a sampled request and writes the attempt's context upstream.

    It sits right under the balancer, above the breaker: it sees every attempt the balancer
    starts with the endpoint picked for it, the breaker's refusal (UH) included, and the
    breaker's events fire while the attempt is current.
    """

    __slots__ = ("_inner",)

    def __init__(self, inner: EndpointHandler) -> None:
        self._inner = inner

    async def __call__(self, req: Request, endpoint: Endpoint) -> Response:
        trace = _current.get()
        if trace is None:
            return await self._inner(req, endpoint)
        number = len(trace.attempts) + 1
        if number == 1:
            span_id = trace.span_id  # the client layer wrote it already
        else:
            span_id = _new_span_id()
            req.headers = propagation.inject(
                req.headers, trace.span_context(span_id), b3_single=trace.b3_single
            )
        attempt = _Attempt(number, endpoint, span_id)
        attributes = attempt.attributes
        attributes["outrigger.attempt"] = number
        attributes["server.address"] = endpoint.host
        attributes["server.port"] = endpoint.port
        trace.attempts.append(attempt)
        trace.current = attempt
        try:
            resp = await self._inner(req, endpoint)
        except ProxyError as error:
            outcome = classify(error)
            attributes["outrigger.outcome"] = outcome.kind.value
            attributes["outrigger.response_flags"] = error.flag.value
            attributes["error.type"] = error.flag.value
            attempt.error = str(error)
            if (event := _error_event(error)) is not None:
                attempt.events.append(event)
            raise
        except asyncio.CancelledError:
            deadline = req.deadline
            loop = asyncio.get_running_loop()
            if deadline is not None and loop.time() + _DEADLINE_SLACK >= deadline:
                attributes["outrigger.outcome"] = "timeout"
                attributes["error.type"] = Flag.UPSTREAM_TIMEOUT.value
                attempt.error = "the attempt ran out of time"
                attempt.events.append(
                    (time.time_ns(), "outrigger.timeout", {"outrigger.response_flags": "UT"})
                )
            else:
                attributes["outrigger.outcome"] = "cancelled"
                attempt.error = "cancelled"
            raise
        except BaseException as error:
            attributes["outrigger.outcome"] = "error"
            attributes["error.type"] = type(error).__qualname__
            attempt.error = type(error).__qualname__
            raise
        finally:
            attempt.end = time.time_ns()
            trace.current = None
        outcome = classify(resp)
        attributes["outrigger.outcome"] = outcome.kind.value
        attributes["http.response.status_code"] = resp.status
        if not outcome.success:
            attributes["error.type"] = str(resp.status)
            attempt.error = str(resp.status)
        return resp
