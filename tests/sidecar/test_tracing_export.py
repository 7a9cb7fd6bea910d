"""The exporter's pieces without processes: the wire format between sidecar and exporter, and the
OTLP encoding of span records, held equal to what the SDK's own encoder makes of the same spans.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.telemetry.exporter import (
    SPANS,
    ExportLimits,
    FrameReader,
    SpanSink,
    Totals,
    frame,
    resource,
    span,
)
from sidecar.telemetry.otlp import Encoder

RESOURCE = resource("frontend", {"POD_NAME": "frontend-7d9", "POD_NAMESPACE": "shop"})

values = st.one_of(
    st.text(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
attributes = st.dictionaries(st.text(min_size=1, max_size=20), values, max_size=6)
# A plain CLIENT span's attributes as the data plane sends them (`record.Plain`), which the
# exporter's side builds into the attribute dict and the span name.
plain_attributes = st.tuples(
    st.sampled_from([b"GET", b"POST"]),
    st.sampled_from([b"/", b"/books/1?x=1"]),
    st.sampled_from([b"reviews", b"reviews:8080", b"[::1]:9080"]),
    st.text(min_size=1, max_size=10),
    st.integers(min_value=1, max_value=3),
    st.one_of(st.none(), st.just("10.0.0.7")),
    st.just(9080),
    st.integers(min_value=100, max_value=399),
)
# Ids as the records carry them: lower-case hex digits, 32 for a trace, 16 for a span.
ids = st.integers(min_value=1, max_value=2**64 - 1).map(lambda n: b"%016x" % n)
records = st.tuples(
    st.integers(min_value=1, max_value=2**128 - 1).map(lambda n: b"%032x" % n),
    ids,
    st.one_of(st.just(b""), ids),
    st.booleans(),
    st.text(max_size=30),
    st.sampled_from([0, 1, 2]),  # INTERNAL, SERVER, CLIENT
    st.integers(min_value=0, max_value=2**63),
    st.integers(min_value=0, max_value=2**63),
    st.one_of(attributes, plain_attributes),
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=2**63), st.text(max_size=20), attributes),
        max_size=3,
    ),
    st.one_of(st.none(), st.text(max_size=20)),
    st.sampled_from(["", "vendor=abc", "a=1,b=2"]),
)


def sample_record(**changes: Any) -> tuple[Any, ...]:
    fields: dict[str, Any] = {
        "trace_id": b"%032x" % (random.getrandbits(128) or 1),
        "span_id": b"%016x" % (random.getrandbits(64) or 1),
        "parent_id": b"",
        "remote": True,
        "name": "GET reviews",
        "kind": 2,
        "start": 1_700_000_000_000_000_000,
        "end": 1_700_000_000_002_000_000,
        "attributes": {"http.request.method": "GET", "http.response.status_code": 200},
        "events": [],
        "error": None,
        "state": "",
    }
    fields.update(changes)
    return tuple(fields.values())


@settings(max_examples=200, deadline=None)
@given(st.lists(records, min_size=1, max_size=5))
def test_encoded_records_are_the_sdks_encoding_of_the_same_spans(batch: list[Any]) -> None:
    encoder = Encoder(RESOURCE, "outrigger.sidecar")
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in batch]))
    assert ours == encode_spans([span(r, RESOURCE) for r in batch])


def test_repeated_attributes_come_from_the_cache_and_stay_distinct_by_type() -> None:
    encoder = Encoder(RESOURCE, "outrigger.sidecar")
    batch = [
        sample_record(attributes={"x": True}),
        sample_record(attributes={"x": 1}),  # equal to True as a dict key: must not share
        sample_record(attributes={"x": 1.0}),
        sample_record(attributes={"x": True}),
    ]
    ours = ExportTraceServiceRequest.FromString(encoder.request([encoder.span(r) for r in batch]))
    assert ours == encode_spans([span(r, RESOURCE) for r in batch])


def test_frames_survive_any_split_of_the_stream() -> None:
    messages = [(SPANS, [sample_record(), sample_record(error="503")]), (2, 7, 5000)]
    stream = b"".join(frame(m) for m in messages)
    reader = FrameReader()
    got: list[tuple[Any, ...]] = []
    for i in range(len(stream)):  # one byte at a time
        got += reader.feed(stream[i : i + 1])
    assert [tuple(m) for m in got] == [tuple(m) for m in messages]


def test_sink_refuses_beyond_its_queue_and_counts_it() -> None:
    reports: list[tuple[int, int, int]] = []
    exporter = InMemorySpanExporter()
    limits = ExportLimits(
        max_queue_size=4,
        schedule_delay_millis=60_000.0,
        max_export_batch_size=100,
        export_timeout=None,
    )
    sink = SpanSink(exporter, limits, RESOURCE, Totals(reports.append))
    sink.take([sample_record() for _ in range(6)])
    assert reports[-1] == (0, 0, 2)  # two refused: the queue holds four
    assert sink.flush(5000)
    assert reports[-1] == (4, 0, 2)
    assert len(exporter.get_finished_spans()) == 4
    sink.shutdown()


def test_sink_counts_a_failed_export() -> None:
    class Failing(InMemorySpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.FAILURE

    reports: list[tuple[int, int, int]] = []
    limits = ExportLimits.resolve(schedule_delay_millis=60_000.0, env={})
    sink = SpanSink(Failing(), limits, RESOURCE, Totals(reports.append))
    sink.take([sample_record() for _ in range(3)])
    assert sink.flush(5000)
    assert reports[-1] == (0, 3, 0)
    sink.shutdown()


def test_a_plain_client_record_reads_back_with_its_attributes_and_name() -> None:
    plain = (b"GET", b"/books/1?x=1", b"reviews:9080", "reviews", 1, "10.0.0.7", 9080, 200)
    readable = span(sample_record(name="", attributes=plain), RESOURCE)
    assert readable.name == "GET reviews"
    assert dict(readable.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/books/1",
        "server.address": "reviews",
        "server.port": 9080,
        "outrigger.service": "reviews",
        "outrigger.retry.attempts": 1,
        "network.peer.address": "10.0.0.7",
        "network.peer.port": 9080,
        "http.response.status_code": 200,
    }
