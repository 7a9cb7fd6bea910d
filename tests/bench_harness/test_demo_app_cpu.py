"""tests/bench/demo_app_cpu.py: one short real run of the two demo apps under the generator;
what it prints and records is checked, not how much CPU anything took."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import demo_app_cpu
import pytest


def test_a_short_real_run_reports_each_apps_cpu_per_request_at_each_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "runs.json"
    argv = ["--rates", "40,80", "--duration", "1", "--warmup", "0.5", "--json", str(out)]
    assert demo_app_cpu.main(argv) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["rate"] for r in runs] == [40.0, 80.0]
    for run in runs:
        # open loop: every request of the recorded second was sent and answered by orders,
        # which answered each with payments' answer (a 200)
        assert run["answered"] == run["rate"]
        assert run["statuses"] == {"200": run["answered"]} and run["errors"] == {}
        assert set(run["cpu_ms_per_request"]) == {"orders", "payments"}
        for app, ms in run["cpu_ms_per_request"].items():
            assert ms == pytest.approx(1000 * run["cpu_s"][app] / run["answered"], abs=1e-3)
        # orders serves and also calls payments: it cannot have cost less than payments
        assert run["cpu_s"]["orders"] > run["cpu_s"]["payments"] > 0
    printed = capsys.readouterr().out.splitlines()
    header = "| req/s | runs | orders CPU-ms/req | payments CPU-ms/req | orders p50 ms | errors |"
    table = printed[printed.index(header) :]
    assert [row.split(" | ")[0] for row in table[2:]] == ["| 40", "| 80"]
    assert all(row.endswith("| 0 |") for row in table[2:])  # no errors


def test_spread_gives_the_least_the_most_and_the_median_of_several_runs() -> None:
    assert demo_app_cpu.spread([0.5]) == "0.500"
    assert demo_app_cpu.spread([0.7, 0.5, 0.6]) == "0.500-0.700 (median 0.600)"


def test_a_rate_list_must_be_positive_numbers() -> None:
    assert demo_app_cpu.rates("50,100") == [50.0, 100.0]
    for bad in ("", "50,x", "0", "-5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected rates above 0"):
            demo_app_cpu.rates(bad)
