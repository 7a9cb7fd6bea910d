"""The exporter process: span records in on a socket, OTLP gRPC out.

`python -m sidecar.telemetry.exporter --fd N ...` is started by the sidecar (`handoff.py`) when
tracing is on, with the sidecar's environment (OTEL_*, POD_NAME, ...). It queues the data plane's
plain span records in a bounded queue (`SpanSink`: BatchSpanProcessor's policy), encodes each
batch straight to OTLP protobuf (`otlp.py`) and sends it with the SDK's `OTLPSpanExporter`, in a
process of its own: that work no longer shares the proxy's GIL (see `tracing.py`). It runs at a
lower CPU priority (nice +10): when it shares a busy core with the proxy, the proxy wins and the
queue, not the request path, absorbs the shortfall (refused spans are counted).

Wire format, both ways: frames of a 4-byte big-endian length and a `marshal`led tuple.

    sidecar -> exporter   (SPANS, [record, ...])       spans to export
                          (FLUSH, token, timeout_ms)   export what you hold, then answer
    exporter -> sidecar   (SETTLED, exported, failed, dropped)   running totals, after each change
                          (FLUSHED, token, ok)

A record is a tuple of plain values (`record.Record`). The sidecar counts how many records it sent
and the totals tell it how many the exporter has finished with, so the two processes together
never hold more than the queue size (`handoff.py`).

Lifetime: the exporter exits when its socket reaches end of file, after flushing what it holds,
whether the sidecar closed it (shutdown) or died. A watchdog bounds that last flush. SIGINT and
SIGTERM are ignored: a signal to the whole process group must not lose the spans the sidecar is
still flushing on its way out.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import marshal
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from sidecar.telemetry.record import read

log = logging.getLogger("outrigger.exporter")

SPANS, FLUSH, SETTLED, FLUSHED = 1, 2, 3, 4
_HEADER = struct.Struct("!I")
_MAX_FRAME = 256 * 1024 * 1024  # a sanity bound: a longer frame means a broken stream
NICENESS = 10
EXIT_TIMEOUT = 5.0  # seconds the last flush may take once the socket is closed

_FLAGS = TraceFlags(TraceFlags.SAMPLED)
_UNSET = Status(StatusCode.UNSET)
_NO_STATE = TraceState()
_SCOPE = InstrumentationScope("outrigger.sidecar")


def frame(message: tuple[Any, ...]) -> bytes:
    body = marshal.dumps(message)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into messages (the sidecar's side: bytes arrive in any pieces)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> Iterator[tuple[Any, ...]]:
        buffer = self._buffer
        buffer += data
        while len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > _MAX_FRAME:
                raise ValueError(f"a {size}-byte frame")
            end = _HEADER.size + size
            if len(buffer) < end:
                return
            message = marshal.loads(bytes(buffer[_HEADER.size : end]))
            del buffer[:end]
            yield message


def _read(stream: BinaryIO) -> tuple[Any, ...] | None:
    """The next message from a blocking stream; None at end of file."""
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack(head)
    if size > _MAX_FRAME:
        raise ValueError(f"a {size}-byte frame")
    body = stream.read(size)
    if len(body) < size:
        return None
    message: tuple[Any, ...] = marshal.loads(body)
    return message


# -- settings -----------------------------------------------------------------------------------


def _env_number(name: str, default: float, env: Mapping[str, str]) -> float:
    try:
        value = float(env.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


@dataclass(frozen=True, slots=True)
class ExportLimits:
    """The batch processor's settings, resolved once (the sidecar and the exporter share them)."""

    max_queue_size: int
    schedule_delay_millis: float
    max_export_batch_size: int
    export_timeout: float | None  # None: OTEL_EXPORTER_OTLP_TIMEOUT or the exporter's default

    @classmethod
    def resolve(
        cls,
        max_queue_size: int | None = None,
        schedule_delay_millis: float | None = None,
        max_export_batch_size: int | None = None,
        export_timeout: float | None = None,
        env: Mapping[str, str] = os.environ,
    ) -> ExportLimits:
        """Explicit values, else the standard OTEL_BSP_* variables, else the SDK's defaults."""
        size = max_queue_size or int(_env_number("OTEL_BSP_MAX_QUEUE_SIZE", 2048, env))
        delay = schedule_delay_millis or _env_number("OTEL_BSP_SCHEDULE_DELAY", 5000, env)
        batch = max_export_batch_size or int(
            _env_number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, env)
        )
        return cls(size, delay, min(batch, size), export_timeout)

    def argv(self) -> list[str]:
        args = [
            "--max-queue-size",
            str(self.max_queue_size),
            "--schedule-delay-millis",
            repr(self.schedule_delay_millis),
            "--max-export-batch-size",
            str(self.max_export_batch_size),
        ]
        if self.export_timeout is not None:
            args += ["--export-timeout", repr(self.export_timeout)]
        return args


def resource(service: str, env: Mapping[str, str] = os.environ) -> Resource:
    attributes: dict[str, str] = {"service.name": service}
    if env.get("POD_NAME"):
        attributes["k8s.pod.name"] = env["POD_NAME"]
    if env.get("POD_NAMESPACE"):
        attributes["k8s.namespace.name"] = env["POD_NAMESPACE"]
    # Resource.create lets our attributes override the environment; an operator's explicit
    # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES should win instead, so merge them last.
    return Resource.create(attributes).merge(OTELResourceDetector().detect())


# -- records to spans, spans to the collector ---------------------------------------------------


def span(record: Sequence[Any], res: Resource) -> ReadableSpan:
    """The SDK span a record describes (what `Tracer.start_span` + `end` made in-process)."""
    r = read(record)
    trace_state = TraceState.from_header([r.state]) if r.state else _NO_STATE
    parent = None
    trace_id = int(r.trace_id, 16)
    if r.parent_id:
        parent = SpanContext(trace_id, int(r.parent_id, 16), r.remote, _FLAGS, trace_state)
    return ReadableSpan(
        r.name,
        SpanContext(trace_id, int(r.span_id, 16), False, _FLAGS, trace_state),
        parent,
        res,
        r.attributes,
        [Event(event_name, event_attributes, at) for at, event_name, event_attributes in r.events],
        (),
        SpanKind(r.kind),
        None,
        _UNSET if r.error is None else Status(StatusCode.ERROR, r.error),
        r.start,
        r.end,
        _SCOPE,
    )


class Totals:
    """Spans this exporter is done with: exported, failed by the collector, refused (queue full).

    Written by the batch worker and the reading thread, sent after each change."""

    def __init__(self, report: Callable[[tuple[int, int, int]], None]) -> None:
        self._lock = threading.Lock()
        self._report = report
        self.exported = self.failed = self.dropped = 0

    def add(self, exported: int = 0, failed: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.exported += exported
            self.failed += failed
            self.dropped += dropped
            totals = (self.exported, self.failed, self.dropped)
            self._report(totals)  # under the lock: reports go out in order


class SpanSink:
    """A bounded queue and one worker thread, with BatchSpanProcessor's policy: a batch goes out
    when it is full or when the schedule delay has passed; a full queue refuses (and counts) a
    span rather than evicting one; `flush` exports everything queued; `shutdown` flushes, stops.

    The exporter process gives it an `OTLPRecordExporter` and records are encoded straight to
    protobuf (`otlp.py`); any other SpanExporter (tests) gets SDK `ReadableSpan`s."""

    def __init__(
        self, exporter: SpanExporter, limits: ExportLimits, res: Resource, totals: Totals
    ) -> None:
        self._exporter = exporter
        self._limits = limits
        self._resource = res
        self._totals = totals
        self._encoder: Any = None
        if hasattr(exporter, "export_encoded"):
            from sidecar.telemetry.otlp import Encoder

            self._encoder = Encoder(res, _SCOPE.name)
        self._queue: deque[Sequence[Any]] = deque()
        self._in_hand = 0  # records of the batch being exported
        self._cond = threading.Condition()
        self._flushing = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="outrigger-export", daemon=True)
        self._thread.start()

    def take(self, records: Sequence[Sequence[Any]]) -> None:
        with self._cond:
            room = self._limits.max_queue_size - len(self._queue) - self._in_hand
            accepted = records[: max(room, 0)]
            self._queue.extend(accepted)
            if len(self._queue) >= self._limits.max_export_batch_size:
                self._cond.notify_all()
        if len(accepted) < len(records):
            self._totals.add(dropped=len(records) - len(accepted))

    def flush(self, timeout_millis: int) -> bool:
        with self._cond:
            self._flushing = True
            self._cond.notify_all()
            return self._cond.wait_for(
                lambda: not self._queue and not self._in_hand, timeout_millis / 1000
            )

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._exporter.shutdown()

    def _run(self) -> None:
        cond, queue = self._cond, self._queue
        delay = self._limits.schedule_delay_millis / 1000
        size = self._limits.max_export_batch_size
        while True:
            with cond:
                deadline = time.monotonic() + delay
                while not (self._stopping or self._flushing or len(queue) >= size):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    cond.wait(left)
                if not queue:
                    self._flushing = False  # a flush is done once the queue is empty
                    cond.notify_all()
                    if self._stopping:
                        return
                    continue
                batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                self._in_hand = len(batch)
            try:
                self._send(batch)
            finally:
                with cond:
                    self._in_hand = 0
                    cond.notify_all()

    def _send(self, batch: list[Sequence[Any]]) -> None:
        encoder = self._encoder
        items: list[Any] = []
        for record in batch:
            try:
                items.append(encoder.span(record) if encoder else span(record, self._resource))
            except Exception:  # a record we cannot encode is a bug: say so, count it
                log.exception("exporter: cannot encode a span record %r", record[:8])
        failed = len(batch) - len(items)
        if items:
            try:
                if encoder is not None:
                    from sidecar.telemetry.otlp import EncodedSpans

                    result = self._exporter.export_encoded(  # type: ignore[attr-defined]
                        EncodedSpans(encoder, items)
                    )
                else:
                    result = self._exporter.export(items)
            except Exception:
                log.exception("exporter: export raised")
                result = SpanExportResult.FAILURE
            if result is SpanExportResult.SUCCESS:
                self._totals.add(exported=len(items), failed=failed)
                return
            failed = len(batch)
        self._totals.add(failed=failed)


class _Writer:
    """Frames to the sidecar from any thread; a vanished sidecar is not an error here."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        data = frame(message)
        with self._lock, contextlib.suppress(OSError):
            self._sock.sendall(data)


def serve(
    sock: socket.socket,
    exporter: SpanExporter,
    limits: ExportLimits,
    service: str,
    on_eof: Callable[[], None] | None = None,
) -> None:
    """Export what arrives on `sock` until end of file, then flush, report and close it.

    The exporter process runs this in its main thread; with an exporter object handed to
    `Tracing` (tests) it runs in a thread of the sidecar."""
    writer = _Writer(sock)
    totals = Totals(lambda t: writer.send((SETTLED, *t)))
    sink = SpanSink(exporter, limits, resource(service), totals)
    stream = sock.makefile("rb")
    try:
        while True:
            try:
                message = _read(stream)
            except (OSError, ValueError, EOFError, TypeError):
                log.exception("exporter: unreadable input; stopping")
                message = None
            if message is None:
                break
            if message[0] == SPANS:
                sink.take(message[1])
            elif message[0] == FLUSH:
                writer.send((FLUSHED, message[1], sink.flush(int(message[2]))))
    finally:
        if on_eof is not None:
            on_eof()
        try:
            sink.shutdown()  # exports what it holds; the totals go out as it does
        finally:
            stream.close()
            sock.close()


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sidecar.telemetry.exporter")
    p.add_argument("--fd", type=int, required=True, help="the socket to the sidecar")
    p.add_argument("--service", required=True)
    p.add_argument("--endpoint", required=True, help="OTLP gRPC")
    p.add_argument("--max-queue-size", type=int, required=True)
    p.add_argument("--schedule-delay-millis", type=float, required=True)
    p.add_argument("--max-export-batch-size", type=int, required=True)
    p.add_argument("--export-timeout", type=float, default=None)
    p.add_argument("--exit-timeout", type=float, default=EXIT_TIMEOUT)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s outrigger-exporter[%(process)d] %(name)s: %(message)s",
    )
    from sidecar.telemetry.otlp import OTLPRecordExporter

    limits = ExportLimits(
        args.max_queue_size,
        args.schedule_delay_millis,
        args.max_export_batch_size,
        args.export_timeout,
    )
    sock = socket.socket(fileno=args.fd)

    def watchdog() -> None:
        # The last flush may wait on a collector that does not answer: exit regardless.
        timer = threading.Timer(args.exit_timeout, os._exit, (0,))
        timer.daemon = True
        timer.start()

    exporter = OTLPRecordExporter(endpoint=args.endpoint, timeout=args.export_timeout)
    serve(sock, exporter, limits, args.service, on_eof=watchdog)
    return 0


if __name__ == "__main__":
    sys.exit(main())
