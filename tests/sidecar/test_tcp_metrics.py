"""TCP pass-through metrics: what a Prometheus scrape shows while and after connections run."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import Metrics
from sidecar.transport.tcp import TcpRecord

Sample = tuple[str, tuple[tuple[str, str], ...]]


def scrape(metrics: Metrics) -> dict[Sample, float]:
    text = generate_latest(metrics.registry()).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**values: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(values.items()))


TLS = labels(direction="outbound", destination="passthrough", sni="api.example.com")


def tls_record() -> TcpRecord:
    return TcpRecord(
        "outbound",
        "10.0.0.1:40000",
        "93.184.216.34:443",
        protocol="tls",
        server_name="api.example.com",
    )


def test_an_open_connection_counts_as_active_and_its_bytes_show_while_it_lasts() -> None:
    metrics = Metrics("frontend")
    record = tls_record()
    metrics.tcp_opened(record)
    record.bytes_received, record.bytes_sent = 517, 4096
    seen = scrape(metrics)
    assert seen[("outrigger_tcp_connections_active", labels(direction="outbound"))] == 1
    assert seen[("outrigger_tcp_received_bytes_total", TLS)] == 517
    assert seen[("outrigger_tcp_sent_bytes_total", TLS)] == 4096


def test_closed_connections_are_counted_with_their_flags_bytes_and_duration() -> None:
    metrics = Metrics("frontend")
    for received, flags in ((100, ""), (50, ""), (0, "UF")):
        record = tls_record()
        metrics.tcp_opened(record)
        record.bytes_received, record.bytes_sent, record.flags = received, 2 * received, flags
        record.duration = 0.3
        metrics.tcp_closed(record)
    seen = scrape(metrics)
    assert seen[("outrigger_tcp_connections_active", labels(direction="outbound"))] == 0
    closed_ok = tuple(sorted((*TLS, ("flags", "-"))))
    assert seen[("outrigger_tcp_connections_closed_total", closed_ok)] == 2
    closed_uf = tuple(sorted((*TLS, ("flags", "UF"))))
    assert seen[("outrigger_tcp_connections_closed_total", closed_uf)] == 1
    assert seen[("outrigger_tcp_received_bytes_total", TLS)] == 150
    assert seen[("outrigger_tcp_sent_bytes_total", TLS)] == 300
    duration = labels(direction="outbound", destination="passthrough")
    assert seen[("outrigger_tcp_connection_duration_seconds_count", duration)] == 3
    assert (
        seen[("outrigger_tcp_connection_duration_seconds_bucket", (*duration, ("le", "0.25")))] == 0
    )
    assert (
        seen[("outrigger_tcp_connection_duration_seconds_bucket", (*duration, ("le", "0.5")))] == 3
    )
