"""The demo's per-service percentiles: estimated from two readings of a sidecar's duration
histogram the way Prometheus' histogram_quantile does, never a bare bucket bound."""

from __future__ import annotations

import math

import pytest

from outrigger.demo.scrape import Reading, config_version, figures, parse_prometheus, quantile

INF = math.inf


def test_a_percentile_is_interpolated_within_its_bucket() -> None:
    # 10 observations, all between 5 and 10 ms: the median is assumed to sit halfway
    now = {0.005: 0.0, 0.01: 10.0, INF: 10.0}
    assert quantile(0.5, now, {}) == pytest.approx(0.0075)
    assert quantile(0.99, now, {}) == pytest.approx(0.005 + 0.005 * 0.99)


def test_the_rank_picks_the_bucket_and_the_counts_below_it_shift_the_estimate() -> None:
    # histogram_quantile(0.5, ...) over le=1ms:0, 2.5ms:40, 5ms:100, +Inf:100
    now = {0.001: 0.0, 0.0025: 40.0, 0.005: 100.0, INF: 100.0}
    # rank 50 falls in (2.5, 5] ms, 10 of its 60 observations in: 2.5 + 2.5 * 10 / 60
    assert quantile(0.5, now, {}) == pytest.approx(0.0025 + 0.0025 * 10 / 60)
    # rank 20 falls in (1, 2.5] ms, the first bucket holding any: 1 + 1.5 * 20 / 40
    assert quantile(0.2, now, {}) == pytest.approx(0.00175)


def test_the_first_bucket_starts_at_zero() -> None:
    assert quantile(0.5, {0.0005: 4.0, INF: 4.0}, {}) == pytest.approx(0.00025)


def test_a_rank_beyond_the_last_finite_bucket_is_that_buckets_bound() -> None:
    now = {0.01: 50.0, 0.025: 90.0, INF: 100.0}
    assert quantile(0.99, now, {}) == 0.025


def test_only_observations_between_the_two_readings_count() -> None:
    before = {0.005: 1000.0, 0.01: 1000.0, INF: 1000.0}  # an old slow period: all under 5 ms
    now = {0.005: 1000.0, 0.01: 1010.0, INF: 1010.0}
    assert quantile(0.5, now, before) == pytest.approx(0.0075)
    assert quantile(0.5, before, before) is None  # nothing observed in between


def exposition(counts: dict[str, int], requests: int) -> str:
    lines = [
        "# TYPE outrigger_request_duration_seconds histogram",
        *(
            f'outrigger_request_duration_seconds_bucket{{direction="inbound",le="{le}"}} {n}'
            for le, n in counts.items()
        ),
        f'outrigger_requests_total{{direction="inbound",code="200"}} {requests}',
    ]
    return "\n".join(lines) + "\n"


def test_service_figures_come_from_the_sidecars_exposition() -> None:
    before = Reading(at=10.0, ok=True)
    before.metrics = parse_prometheus(
        exposition({"0.001": 0, "0.0025": 0, "0.005": 0, "+Inf": 0}, 0)
    )
    now = Reading(at=12.0, ok=True)
    now.metrics = parse_prometheus(
        exposition({"0.001": 0, "0.0025": 80, "0.005": 100, "+Inf": 100}, 100)
    )
    f = figures([now], [before])
    assert f.rate == pytest.approx(50.0) and f.success == 100.0
    assert f.p50 == pytest.approx(0.001 + 0.0015 * 50 / 80)
    assert f.p99 == pytest.approx(0.0025 + 0.0025 * 19 / 20)


def test_the_config_version_is_read_from_the_metrics() -> None:
    text = 'outrigger_config_info{version="9dee127f84c9"} 1.0\n'
    assert config_version(parse_prometheus(text)) == "9dee127f84c9"
    assert config_version(parse_prometheus('outrigger_config_info{version=""} 1.0\n')) is None
    assert config_version({}) is None
