"""tests/bench/latency.py: the added-latency arithmetic, the report, and one short real run
through a real pair of sidecars (what it prints is checked, not how fast anything was)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import latency
import pytest

REPO = Path(__file__).resolve().parents[2]


def generator(p50: float, p90: float, p99: float, answered: int = 10_000) -> dict[str, Any]:
    return {
        "requests": answered,
        "answered": answered,
        "seconds": 10.0,
        "statuses": {"200": answered - 2, "503": 2},
        "errors": {"timeout": 1},
        "latency_ms": {"count": answered, "p50": p50, "p90": p90, "p99": p99, "max": 9.0},
        "loop_lag_ms": {"count": answered, "p50": 0.01, "p90": 0.02, "p99": 0.04, "max": 0.5},
    }


def sidecar(name: str, vcpu: float) -> dict[str, Any]:
    return {
        "name": name,
        "cpu_seconds": vcpu,
        "window_s": 10.0,
        "vcpu_per_1000_rps": vcpu,
        "loop_stall_s": 0.0042,
        "loop_stall_cpu_s": 0.0039,
        "gc_pause_max_s": 0.0011,
        "gc_pause_max_cpu_s": 0.0009,
        "gc_collections": 12,
    }


def config_result(name: str) -> dict[str, Any]:
    direct = {"generator": generator(0.10, 0.15, 0.30), "answered_rate": 1000.0}
    through = {
        "generator": generator(0.35, 0.45, 0.70),
        "answered_rate": 1000.0,
        "sidecars": [sidecar("sidecar-client", 0.041), sidecar("sidecar-server", 0.032)],
    }
    return {
        "config": name,
        "status": "ok",
        "direct": direct,
        "through": through,
        "added_ms": latency.added(
            direct["generator"]["latency_ms"], through["generator"]["latency_ms"]
        ),
        "sidecar_requests": {"client_outbound": 12_000, "server_inbound": 12_000},
    }


def test_added_latency_is_through_less_direct_per_percentile() -> None:
    direct = {"p50": 0.10, "p90": 0.15, "p99": 0.30, "max": 2.0}
    through = {"p50": 0.35, "p90": 0.45, "p99": 0.25, "max": 1.0}
    # a percentile through the sidecars may come out lower on a noisy machine: shown as it is
    assert latency.added(direct, through) == {"p50": 0.25, "p90": 0.3, "p99": -0.05}


def test_cpu_is_normalised_to_vcpu_per_thousand_requests_per_second() -> None:
    # 0.4 CPU-s in 10 s at 1,000 req/s: 4% of a core for 1,000 req/s
    assert latency.vcpu_per_1000_rps(0.4, 10.0, 1000.0) == pytest.approx(0.04)
    # the same share at 500 req/s costs twice as much per 1,000 req/s
    assert latency.vcpu_per_1000_rps(0.4, 10.0, 500.0) == pytest.approx(0.08)
    assert latency.vcpu_per_1000_rps(0.4, 0.0, 1000.0) is None
    assert latency.vcpu_per_1000_rps(0.4, 10.0, 0.0) is None


def test_the_report_shows_each_path_what_was_added_and_istios_figures() -> None:
    results = [config_result("plain"), config_result("policy")]
    failed = {"config": "policy", "status": "failed", "error": "sidecar-client readiness: boom"}
    text = latency.render([*results, failed], "machine line", markdown=False)
    lines = text.splitlines()
    assert lines[0] == "machine line"
    assert all(h in lines[1] for h in ("p50", "p90", "p99", "generator lag", "vCPU", "stall"))
    [added_row] = [x for x in lines if x.startswith("plain") and "added by 2 sidecars" in x]
    assert "+0.250 ms" in added_row and "+0.300 ms" in added_row and "+0.400 ms" in added_row
    [through] = [x for x in lines if x.startswith("plain") and "through 2 sidecars" in x]
    assert "0.041, 0.032" in through  # vCPU per 1k req/s, client then server sidecar
    # each sidecar's longest loop stall and collection
    assert "4.2 ms (CPU 3.9, GC max 1.1, CPU 0.9)" in through
    assert "0.040 ms / 0.500 ms" in through  # the generator's own loop lag, p99 / max
    assert " 3 " in through  # errors: 1 without an answer + 2 answered 5xx
    assert "+0.228 ms p90, +0.298 ms p99" in text and "0.2 vCPU per 1,000 req/s" in text
    assert "plain: added p90 +0.300 ms (1.32x Istio's), p99 +0.400 ms (1.34x)" in text
    assert "0.041, 0.032 (0.20x, 0.16x Istio's; aim below 0.25x)" in text
    assert "client sidecar counted 12000 outbound" in text
    assert "policy: sidecar-client readiness: boom" in text
    assert "generator's own loop lag" not in text  # 0.04 ms at p99: below every difference
    markdown = latency.render(results, "machine line", markdown=True)
    assert "| plain | added by 2 sidecars | — | +0.250 ms | +0.300 ms | +0.400 ms |" in markdown


def test_pins_name_the_three_roles_or_none() -> None:
    pins = latency.parse_pins("loadgen=1,sidecars=0,app=1")
    assert pins == latency.Pins(loadgen="1", sidecars="0", app="1")
    assert latency.pin_text(pins) == (
        "pinned (taskset -c): generator→CPU 1, both sidecars→CPU 0, app→CPU 1"
    )
    assert latency.parse_pins("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match="loadgen=CPUS"):
        latency.parse_pins("wrk=1,proxy=0")


def test_a_short_real_run_through_two_sidecars_reports_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("nginx") is None:
        pytest.fail("the latency harness needs nginx (the app): apt-get install nginx; see .ci/run")
    out = tmp_path / "latency.json"
    argv = ["--rate", "200", "--duration", "1.5", "--warmup", "0.5", "--configs", "plain"]
    argv += ["--output", str(out), "--outrigger", str(Path(sys.executable).with_name("outrigger"))]
    assert latency.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    [run] = doc["runs"]
    assert run["status"] == "ok", run.get("error")
    for path in ("direct", "through"):
        g = run[path]["generator"]
        assert g["answered"] == g["requests"] == 300  # 200 req/s for 1.5 s, open loop
        assert g["statuses"] == {"200": 300} and g["errors"] == {}
        assert set(g["latency_ms"]) >= {"p50", "p90", "p99"}
        assert set(g["loop_lag_ms"]) >= {"p50", "p99", "max"}
    assert set(run["added_ms"]) == {"p50", "p90", "p99"}
    sidecars = run["through"]["sidecars"]
    assert [s["name"] for s in sidecars] == ["sidecar-client", "sidecar-server"]
    for s in sidecars:
        assert s["vcpu_per_1000_rps"] is not None and s["vcpu_per_1000_rps"] >= 0
        assert s["loop_stall_s"] >= 0 and s["loop_stall_cpu_s"] >= 0
        assert s["gc_pause_max_cpu_s"] >= 0 and s["gc_collections"] >= 0
    # every request of the run went through both sidecars: warm-up (100) + recorded (300)
    counted = run["sidecar_requests"]
    assert counted == {"client_outbound": 400, "server_inbound": 400}
    printed = capsys.readouterr().out
    assert "added by 2 sidecars" in printed and "+0.228 ms p90" in printed
    assert "pinned" in printed or "not pinned" in printed


def test_a_generator_lagging_as_much_as_the_difference_is_called_out() -> None:
    result = config_result("plain")
    # each percentile against the same percentile of the lag: p90 lagged 0.15 ms (half the
    # added 0.30), p99 0.19 ms (under half the added 0.40): only p90 is called out
    result["direct"]["generator"]["loop_lag_ms"].update(p90=0.15, p99=0.19)
    _, notes = latency.table([result])
    [note] = [n for n in notes if "loop lag" in n]
    assert note.startswith("plain: the generator's own loop lag (p90 0.150 ms) was at least half")
    assert "the added p90: much of those differences can be the generator's" in note
