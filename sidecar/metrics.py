"""Prometheus metrics for the admin port's `/stats/prometheus`.

The hot path only bumps plain ints: each (direction, destination) has a `Series` (counts by
status and flags, and the duration histogram's buckets), found with one dict lookup by the
destination's name; a prometheus-client `Collector` folds them into metric families at scrape
time (the status becomes a label string there, not per request). Measured: a labelled
prometheus-client Counter.inc() costs ~1 µs per call with its lock and label lookup, several
per request; a dict increment costs ~0.1 µs. So the client library renders, we count.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from sidecar.config import Snapshot
from sidecar.gc_pause import BUCKETS as GC_BUCKETS
from sidecar.gc_pause import GENERATIONS, GcPauses, PauseReader
from sidecar.loop_lag import PERIOD, LagReader, LoopLag
from sidecar.policy.stack import ServiceRegistry
from sidecar.protocol.grpc import rpc_names
from sidecar.transport.tcp import TcpRecord

# Seconds; Envoy-like spread from 0.5 ms to 60 s.
BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    60.0,
)

RequestKey = tuple[str, str, str, str, str]  # direction, source, destination, code, flags
# direction, source, destination, rpc_service, rpc_method, grpc_status
GrpcKey = tuple[str, str, str, str, str, str]
TcpKey = tuple[str, str, str]  # direction, destination, sni ("-" when none)

# outrigger_endpoint_breaker_state values (pybreaker's state names); no breaker yet: closed.
BREAKER_STATES = {"closed": 0, "open": 1, "half-open": 2}


class Listener(Protocol):
    """What the connection metrics read of a listener (`transport.server.ServerState`)."""

    @property
    def connections(self) -> Sized: ...  # open now

    @property
    def total_connections(self) -> int: ...  # accepted since start

    @property
    def h2_refused(self) -> Mapping[str, int]: ...  # HTTP/2 connections closed, by reason


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0


# Distinct gRPC methods counted per (direction, destination); calls of any further method,
# and paths that are not `/package.Service/Method`, count as OTHER_METHOD. The path is the
# client's to choose: without a bound, a client could grow the sidecar's memory and every
# scrape without end (docs/hardening.md rule 18).
MAX_GRPC_METHODS = 100
OTHER_METHOD = ("other", "other")


class Series(_Histogram):
    """One (direction, destination): requests by status then flags, and their durations.

    The request path (`Sidecar._completed` in sidecar/app.py) bumps the counts directly. Two
    dicts rather than one keyed by (status, flags): a fresh key tuple per request was a tuple
    made and freed and, at each of the two lookups, compared item by item with the stored one
    (a new tuple is never the stored object); the int and the flags string are compared by
    identity in the common case."""

    __slots__ = ("grpc", "methods", "requests")

    def __init__(self) -> None:
        super().__init__()
        self.requests: dict[int, dict[str, int]] = {}
        # gRPC calls (HTTP/2 streams only) by ((rpc service, rpc method), grpc-status)
        self.grpc: dict[tuple[tuple[str, str], int], int] = {}
        self.methods: dict[bytes, tuple[str, str]] = {}  # path -> its names, bounded

    def add_grpc(self, path: bytes, status: int) -> None:
        method = self.methods.get(path)
        if method is None:
            names = rpc_names(path) if len(self.methods) < MAX_GRPC_METHODS else None
            if names is None:
                method = OTHER_METHOD
            else:
                method = self.methods[path] = names
        key = (method, status)
        self.grpc[key] = self.grpc.get(key, 0) + 1


class Metrics:
    """The counters the request path bumps, and what the collector reads from elsewhere at
    scrape time: each listener's connections, each service's policy state and the applied
    snapshot's endpoints, the spans the tracing export dropped."""

    def __init__(
        self,
        source: str,
        *,
        listeners: Mapping[str, Listener] | None = None,
        services: ServiceRegistry | None = None,
        snapshot: Callable[[], Snapshot | None] | None = None,
        spans_dropped: Callable[[], Mapping[str, int]] | None = None,
        loop_lag: LoopLag | None = None,
        gc_pauses: GcPauses | None = None,
    ) -> None:
        self.source = source
        # the event loop's lateness; each registry (page) reads its own longest stall
        self.loop_lag = loop_lag
        # the collector's pauses; each registry reads its own longest one too
        self.gc_pauses = gc_pauses
        # direction -> destination -> its counts (`series`; the request path keeps the inner
        # dict of its listener's direction)
        self.series: dict[str, dict[str, Series]] = {}
        self.config_version = ""
        self.config_applied = 0
        self.config_rejected = 0
        self.listeners = listeners or {}
        self.services = services
        self.snapshot = snapshot  # the applied config, for the per-endpoint gauges
        # reason -> spans not exported (the tracing export pipeline counts; empty: tracing off)
        self.spans_dropped = spans_dropped
        # Passed-through TCP connections (TcpObserver): closed ones are summed here, open ones
        # are read at scrape time, so a long-lived connection's bytes show while it lasts.
        self.tcp_closed_count: dict[tuple[str, str, str, str], int] = {}  # TcpKey + flags
        self.tcp_bytes: dict[TcpKey, list[int]] = {}  # [received, sent] of closed connections
        self.tcp_durations: dict[tuple[str, str], _Histogram] = {}
        self.tcp_open: dict[int, TcpRecord] = {}
        self.tcp_active: dict[str, int] = {}  # direction -> open now (0 once all closed)

    def direction(self, direction: str) -> dict[str, Series]:
        """The series of one direction, by destination (what a listener counts into)."""
        table = self.series.get(direction)
        if table is None:
            table = self.series[direction] = {}
        return table

    def requests(self) -> dict[RequestKey, int]:
        """Every request count by its labels (direction, source, destination, code, flags)."""
        return {
            (direction, self.source, destination, str(code), flags): count
            for direction, table in self.series.items()
            for destination, series in table.items()
            for code, by_flags in series.requests.items()
            for flags, count in by_flags.items()
        }

    def grpc_calls(self) -> dict[GrpcKey, int]:
        """gRPC calls by (direction, source, destination, rpc_service, rpc_method,
        grpc_status)."""
        return {
            (direction, self.source, destination, service, method, str(code)): count
            for direction, table in self.series.items()
            for destination, series in table.items()
            for ((service, method), code), count in series.grpc.items()
        }

    def durations(self) -> dict[tuple[str, str], _Histogram]:
        return {
            (direction, destination): series
            for direction, table in self.series.items()
            for destination, series in table.items()
        }

    def tcp_opened(self, record: TcpRecord) -> None:
        self.tcp_open[id(record)] = record
        self.tcp_active[record.direction] = self.tcp_active.get(record.direction, 0) + 1

    def tcp_closed(self, record: TcpRecord) -> None:
        if self.tcp_open.pop(id(record), None) is not None:
            self.tcp_active[record.direction] -= 1
        key = _tcp_key(record)
        counted = (*key, record.flags)
        self.tcp_closed_count[counted] = self.tcp_closed_count.get(counted, 0) + 1
        totals = self.tcp_bytes.get(key)
        if totals is None:
            totals = self.tcp_bytes[key] = [0, 0]
        totals[0] += record.bytes_received
        totals[1] += record.bytes_sent
        hkey = (record.direction, record.destination)
        hist = self.tcp_durations.get(hkey)
        if hist is None:
            hist = self.tcp_durations[hkey] = _Histogram()
        hist.counts[bisect_left(BUCKETS, record.duration)] += 1
        hist.total += record.duration

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        lag = self.loop_lag.reader() if self.loop_lag is not None else None
        pauses = self.gc_pauses.reader() if self.gc_pauses is not None else None
        registry.register(_MetricsCollector(self, lag, pauses))
        return registry


def _tcp_key(record: TcpRecord) -> TcpKey:
    return (record.direction, record.destination, record.server_name or "-")


def _counter(
    name: str, doc: str, labels: list[str], values: Iterable[tuple[tuple[str, ...], int]]
) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, count in sorted(values):
        family.add_metric(list(key), count)
    return family


def _histogram(name: str, doc: str, hists: dict[tuple[str, str], _Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["direction", "destination"])
    for (direction, destination), hist in sorted(hists.items()):
        family.add_metric([direction, destination], _buckets(BUCKETS, hist.counts), hist.total)
    return family


def _buckets(bounds: tuple[float, ...], counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative (bound, count) pairs from per-bucket counts whose last is past every bound."""
    running = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip(bounds, counts, strict=False):
        running += count
        buckets.append((repr(bound), running))
    running += counts[-1]
    buckets.append(("+Inf", running))
    return buckets


class _MetricsCollector(Collector):
    def __init__(self, metrics: Metrics, lag: LagReader | None, pauses: PauseReader | None) -> None:
        self.m = metrics
        self.lag = lag
        self.pauses = pauses

    def collect(self) -> Iterator[Metric]:
        m = self.m
        yield _counter(
            "outrigger_requests",
            "Requests handled, by direction, source and destination service, status and flags.",
            ["direction", "source", "destination", "code", "flags"],
            m.requests().items(),
        )
        yield _counter(
            "outrigger_grpc_calls",
            "gRPC calls over HTTP/2, by direction, source and destination service, the "
            "called service and method (at most 100 per destination, then 'other'), and the "
            "grpc-status they ended with (the upstream's, or the sidecar's own for a local error).",
            ["direction", "source", "destination", "rpc_service", "rpc_method", "grpc_status"],
            m.grpc_calls().items(),
        )

        yield _counter(
            "outrigger_h2_refused",
            "HTTP/2 client connections closed for breaking a hardening rule, by listener and "
            "reason (docs/hardening.md rules 12-17).",
            ["listener", "reason"],
            [
                ((name, reason), count)
                for name, listener in m.listeners.items()
                for reason, count in listener.h2_refused.items()
            ],
        )

        yield _histogram(
            "outrigger_request_duration_seconds",
            "Time from the request head to the end of the response.",
            m.durations(),
        )

        conns = CounterMetricFamily(
            "outrigger_connections", "Downstream connections accepted.", labels=["listener"]
        )
        active = GaugeMetricFamily(
            "outrigger_connections_active", "Open downstream connections.", labels=["listener"]
        )
        for name, listener in sorted(m.listeners.items()):
            conns.add_metric([name], listener.total_connections)
            active.add_metric([name], len(listener.connections))
        yield conns
        yield active

        version = GaugeMetricFamily(
            "outrigger_config_info", "The config version applied (value 1).", labels=["version"]
        )
        version.add_metric([m.config_version], 1)
        yield version
        yield CounterMetricFamily(
            "outrigger_config_applied", "Snapshots applied.", value=m.config_applied
        )
        yield CounterMetricFamily(
            "outrigger_config_rejected", "Snapshots refused (NACKed).", value=m.config_rejected
        )
        dropped = CounterMetricFamily(
            "outrigger_spans_dropped",
            "Spans not exported, by reason: queue_full, export_failed (the collector failed"
            " them), exporter_busy (the exporter process fell behind), exporter_down (it died).",
            labels=["reason"],
        )
        spans_dropped = m.spans_dropped() if m.spans_dropped is not None else {}
        for reason, count in sorted(spans_dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        if self.lag is not None:
            lag = self.lag.take()
            yield GaugeMetricFamily(
                "outrigger_event_loop_lag_max_seconds",
                "The longest the event loop ran late (a stall: a long callback, a collection) "
                f"since the previous scrape of this page (a {PERIOD * 1000:g} ms timer).",
                value=lag.longest,
            )
            yield GaugeMetricFamily(
                "outrigger_event_loop_lag_max_cpu_seconds",
                "CPU time the event loop's thread used from the timer tick before that longest lag "
                "to it: about the lag or more, the sidecar held the loop; well below, it was "
                "not running.",
                value=lag.cpu,
            )
            yield GaugeMetricFamily(
                "outrigger_event_loop_lag_max_system_cpu_seconds",
                "The kernel's part of that CPU time (page faults, memory compaction, socket work).",
                value=lag.system_cpu,
            )
            yield GaugeMetricFamily(
                "outrigger_event_loop_lag_max_major_faults",
                "Page faults that read from disk in that same period (paged-out code or files).",
                value=lag.major_faults,
            )
        yield from self._gc()
        yield from self._tcp()
        yield from self._policy()

    def _gc(self) -> Iterator[Metric]:
        gc_pauses = self.m.gc_pauses
        if gc_pauses is None or self.pauses is None:
            return
        family = HistogramMetricFamily(
            "outrigger_gc_pause_seconds",
            "How long each cyclic garbage collection held the event loop, by generation "
            "(2: a full collection).",
            labels=["generation"],
        )
        for generation in range(GENERATIONS):
            family.add_metric(
                [str(generation)],
                _buckets(GC_BUCKETS, gc_pauses.counts[generation]),
                gc_pauses.seconds[generation],
            )
        yield family
        longest, cpu, generation, collections = self.pauses.take()
        yield GaugeMetricFamily(
            "outrigger_gc_pause_max_seconds",
            "The longest garbage collection pause since the previous scrape of this page.",
            value=longest,
        )
        yield GaugeMetricFamily(
            "outrigger_gc_pause_max_cpu_seconds",
            "CPU time the event loop's thread used in that longest pause: well below it, the "
            "machine did not run the sidecar during the collection.",
            value=cpu,
        )
        yield GaugeMetricFamily(
            "outrigger_gc_pause_max_generation",
            "The generation of that longest pause (-1: no collection since the previous scrape).",
            value=generation,
        )
        yield GaugeMetricFamily(
            "outrigger_gc_collections_since_scrape",
            "Garbage collections (any generation) since the previous scrape of this page.",
            value=collections,
        )

    def _tcp(self) -> Iterator[Metric]:
        m = self.m
        labels = ["direction", "destination", "sni"]
        yield _counter(
            "outrigger_tcp_connections_closed",
            "Passed-through TCP connections (TLS, HTTP/2, any non-HTTP/1) that ended, by flags "
            "(UF: connect failed, DC: the client left first).",
            [*labels, "flags"],
            [((*key[:3], key[3] or "-"), count) for key, count in m.tcp_closed_count.items()],
        )
        received: dict[TcpKey, int] = {key: totals[0] for key, totals in m.tcp_bytes.items()}
        sent: dict[TcpKey, int] = {key: totals[1] for key, totals in m.tcp_bytes.items()}
        for record in m.tcp_open.values():
            key = _tcp_key(record)
            received[key] = received.get(key, 0) + record.bytes_received
            sent[key] = sent.get(key, 0) + record.bytes_sent
        active = GaugeMetricFamily(
            "outrigger_tcp_connections_active",
            "Passed-through TCP connections open now.",
            labels=["direction"],
        )
        for direction, count in sorted(m.tcp_active.items()):
            active.add_metric([direction], count)
        yield active
        yield _counter(
            "outrigger_tcp_received_bytes",
            "Bytes from the client of passed-through connections.",
            labels,
            received.items(),
        )
        yield _counter(
            "outrigger_tcp_sent_bytes",
            "Bytes to the client of passed-through connections.",
            labels,
            sent.items(),
        )
        yield _histogram(
            "outrigger_tcp_connection_duration_seconds",
            "Lifetime of passed-through TCP connections, from the relay's start to both closed.",
            m.tcp_durations,
        )

    def _policy(self) -> Iterator[Metric]:
        services = self.m.services
        if services is None:
            return
        fields = (
            ("retries", "Retry attempts started."),
            ("retries_exhausted", "Requests that ran out of retry attempts (URX)."),
            ("budget_exhausted", "Retries refused because the retry budget was spent."),
            ("timeouts", "Requests cut by the total timeout (UT)."),
            ("per_try_timeouts", "Attempts cut by the per-try timeout."),
            ("overflows", "Requests refused by max_requests or max_pending (UO)."),
            ("ejections", "Endpoint ejections by the circuit breaker."),
            ("ejections_suppressed", "Ejections refused by max_ejection_percent."),
        )
        states = list(services)
        for name, doc in fields:
            family = CounterMetricFamily(f"outrigger_{name}", doc, labels=["destination"])
            for state in states:
                family.add_metric([state.name], getattr(state.stats, name))
            yield family
        ejected = GaugeMetricFamily(
            "outrigger_endpoints_ejected", "Endpoints ejected right now.", labels=["destination"]
        )
        for state in states:
            ejected.add_metric([state.name], state.breakers.ejected_count())
        yield ejected
        if self.m.snapshot is None:
            return
        snapshot = self.m.snapshot()
        breaker_state = GaugeMetricFamily(
            "outrigger_endpoint_breaker_state",
            "Circuit breaker per endpoint: 0 closed, 1 open (ejected), 2 half-open (probing).",
            labels=["destination", "endpoint"],
        )
        active = GaugeMetricFamily(
            "outrigger_endpoint_active_requests",
            "Attempts in flight to the endpoint.",
            labels=["destination", "endpoint"],
        )
        for _, cfg in sorted(snapshot.services.items()) if snapshot is not None else ():
            service = services.get(cfg.name)
            for endpoint in cfg.endpoints:
                labels = [cfg.name, str(endpoint)]
                breaker = service.breakers.breaker(endpoint) if service is not None else None
                breaker_state.add_metric(
                    labels, BREAKER_STATES.get(breaker.state, 1) if breaker is not None else 0
                )
                active.add_metric(labels, service.active(endpoint) if service is not None else 0)
        yield breaker_state
        yield active
