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


def path_result(
    name: str, through_ms: tuple[float, float, float], hops: list[dict[str, Any]]
) -> dict[str, Any]:
    """A config's result: direct at 0.10/0.15/0.30 ms, through at `through_ms`, `hops` the two
    proxies' CPU (and, for sidecars, stall) records."""
    direct = {"generator": generator(0.10, 0.15, 0.30), "answered_rate": 1000.0}
    through = {"generator": generator(*through_ms), "answered_rate": 1000.0, "sidecars": hops}
    return {
        "config": name,
        "status": "ok",
        "direct": direct,
        "through": through,
        "added_ms": latency.added(
            direct["generator"]["latency_ms"], through["generator"]["latency_ms"]
        ),
    }


def config_result(name: str) -> dict[str, Any]:
    hops = [sidecar("sidecar-client", 0.041), sidecar("sidecar-server", 0.032)]
    result = path_result(name, (0.35, 0.45, 0.70), hops)
    result["sidecar_requests"] = {"client_outbound": 12_000, "server_inbound": 12_000}
    return result


def floor_result(name: str, through_ms: tuple[float, float, float], vcpu: float) -> dict[str, Any]:
    """A floor config's result: two plain proxies, so no stall gauges and no request counters."""
    hops = [
        {"name": n, "cpu_seconds": vcpu, "window_s": 10.0, "vcpu_per_1000_rps": vcpu}
        for n in (f"{name}-client", f"{name}-server")
    ]
    return path_result(name, through_ms, hops)


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


def test_the_floors_are_rows_of_their_own_and_each_sidecar_config_is_compared_with_them() -> None:
    results = [
        config_result("plain"),
        floor_result("nginx", (0.20, 0.25, 0.40), 0.020),
        floor_result("python-floor", (0.25, 0.30, 0.50), 0.016),
    ]
    text = latency.render(results, "machine line", markdown=False)
    lines = text.splitlines()
    [through] = [x for x in lines if x.startswith("nginx") and "through 2 nginx proxies" in x]
    assert "0.020, 0.020" in through  # each proxy's vCPU, measured as the sidecars' is
    assert through.rstrip().endswith("—")  # no loop-stall gauges: not a sidecar
    [added] = [x for x in lines if x.startswith("python-floor") and "added by 2 floor" in x]
    assert [c for c in added.split() if c.startswith("+")] == ["+0.150", "+0.150", "+0.200"]
    # the sidecars (+0.25/+0.30/+0.40 ms, 0.041 and 0.032 vCPU) against each floor
    assert (
        "plain against nginx (same two places, this run): added p50/p90/p99 "
        "+0.250/+0.300/+0.400 ms against +0.100/+0.100/+0.100 ms (difference "
        "+0.150/+0.200/+0.300 ms); vCPU per 1,000 req/s (client, server) 0.041, 0.032 "
        "against 0.020, 0.020 (2.05x, 1.60x)"
    ) in text
    assert "plain against python-floor" in text and "(2.56x, 2.00x)" in text
    # a floor is not compared with a floor, and has no request-counter note
    assert "nginx against" not in text and "python-floor against" not in text
    assert "nginx: the generator had" not in text
    # Istio's line covers every config, floors too
    assert "nginx: added p90 +0.100 ms (0.44x Istio's)" in text
    # without floors in the run, no comparison line
    alone = latency.render([config_result("plain")], "machine line", markdown=False)
    assert "against nginx" not in alone
    markdown = latency.render(results, "machine line", markdown=True)
    assert (
        "| nginx | added by 2 nginx proxies | — | +0.100 ms | +0.100 ms | +0.100 ms |" in markdown
    )


def test_configs_default_to_the_sidecars_then_the_floors_and_unknown_ones_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = latency.parse_args([])
    assert args.config_names == ["plain", "policy", "nginx", "python-floor"]
    assert latency.parse_args(["--configs", "python-floor"]).config_names == ["python-floor"]
    assert latency.CONFIGS["policy"].policy is not None and latency.CONFIGS["plain"].policy is None
    assert {n for n, c in latency.CONFIGS.items() if c.proxies != "sidecar"} == set(latency.FLOORS)
    with pytest.raises(SystemExit):
        latency.parse_args(["--configs", "plain,envoy"])
    assert "unknown ['envoy']" in capsys.readouterr().err


def test_pins_name_the_three_roles_or_none() -> None:
    pins = latency.parse_pins("loadgen=1,sidecars=0,app=1")
    assert pins == latency.Pins(loadgen="1", sidecars="0", app="1")
    assert latency.pin_text(pins) == (
        "pinned (taskset -c): generator→CPU 1, both sidecars→CPU 0, app→CPU 1"
    )
    assert latency.parse_pins("none") is None
    with pytest.raises(argparse.ArgumentTypeError, match="loadgen=CPUS"):
        latency.parse_pins("wrk=1,proxy=0")


def test_a_short_real_run_through_two_sidecars_and_the_floors_reports_every_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("nginx") is None:
        pytest.fail("the latency harness needs nginx (the app): apt-get install nginx; see .ci/run")
    out = tmp_path / "latency.json"
    argv = ["--rate", "200", "--duration", "1.5", "--warmup", "0.5"]
    argv += ["--configs", "plain,nginx,python-floor"]
    argv += ["--output", str(out), "--outrigger", str(Path(sys.executable).with_name("outrigger"))]
    assert latency.main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["complete"] is True
    run, *floors = doc["runs"]
    assert [r["config"] for r in doc["runs"]] == ["plain", "nginx", "python-floor"]
    assert all(r["status"] == "ok" for r in doc["runs"]), [r.get("error") for r in doc["runs"]]
    for path, r in [(p, r) for r in doc["runs"] for p in ("direct", "through")]:
        g = r[path]["generator"]
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
    for floor in floors:  # two proxies of the floor's kind, measured in the same places
        hops = floor["through"]["sidecars"]
        assert [h["name"] for h in hops] == [
            f"{floor['config']}-client",
            f"{floor['config']}-server",
        ]
        assert all(h["vcpu_per_1000_rps"] is not None and h["vcpu_per_1000_rps"] >= 0 for h in hops)
        assert "sidecar_requests" not in floor
    printed = capsys.readouterr().out
    assert "added by 2 sidecars" in printed and "+0.228 ms p90" in printed
    assert "added by 2 nginx proxies" in printed and "added by 2 floor forwarders" in printed
    assert "plain against nginx" in printed and "plain against python-floor" in printed
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
