"""run.py's table: the sidecar's longest loop stall and collection per run, and the notes that
say when wrk's own accounting does not add up (tests/bench/report.py)."""

from __future__ import annotations

from typing import Any

import report


def wrk(rps: float, mean_us: float, p99_us: float) -> dict[str, Any]:
    return {
        "requests_per_s": rps,
        "p50_us": 900.0,
        "p99_us": p99_us,
        "mean_us": mean_us,
        "errors": 0,
    }


def row(
    name: str, in_flight: float, stall: float | None = None, gc_pause: float = 0.0008
) -> dict[str, Any]:
    run: dict[str, Any] = {
        "connections": 256,
        "wrk": wrk(20_000.0, in_flight / 20_000.0 * 1e6, 30_000.0),
        "mean_in_flight": in_flight,
        "cpu_us_per_request": 50.0,
    }
    if stall is not None:
        run["loop_stall_s"], run["loop_stall_cpu_s"] = stall, stall * 0.9
        run["loop_stall_system_cpu_s"], run["loop_stall_major_faults"] = stall * 0.1, 0
        run["gc_pause_max_s"], run["gc_pause_max_cpu_s"] = gc_pause, gc_pause * 0.5
        run["gc_collections"] = 1234
    return {"name": name, "status": "ok", "runs": [run]}


def test_the_stall_column_shows_the_sidecars_longest_stall_and_its_cpu() -> None:
    cells, _ = report.table_rows([row("nginx", 250.0), row("outrigger", 250.0, stall=0.0512)])
    column = report.HEADER.index("loop stall (CPU; sys)")
    assert cells[0][column] == "—"  # nginx: no event loop of ours to read
    assert cells[1][column] == "51.20ms (46.08ms; sys 5.12ms)"


def test_the_stall_column_names_major_page_faults_when_there_were_some() -> None:
    results = [row("nginx", 250.0), row("outrigger", 250.0, stall=0.067)]
    results[1]["runs"][0]["loop_stall_major_faults"] = 42
    cells, _ = report.table_rows(results)
    column = report.HEADER.index("loop stall (CPU; sys)")
    assert cells[1][column] == "67.00ms (60.30ms; sys 6.70ms; 42 major faults)"


def test_the_gc_column_shows_the_longest_collection_its_cpu_and_the_count() -> None:
    cells, _ = report.table_rows(
        [row("nginx", 250.0), row("outrigger", 250.0, stall=0.0512, gc_pause=0.0042)]
    )
    column = report.HEADER.index("GC max (CPU), count")
    assert cells[0][column] == "—"
    assert cells[1][column] == "4.20ms (2.10ms), 1,234"


def test_more_requests_in_flight_than_connections_is_explained_as_wrks_correction() -> None:
    _, notes = report.table_rows([row("nginx", 250.0), row("outrigger", 283.6, stall=0.3)])
    [note] = notes
    assert note.startswith("outrigger c=256: 283.6 requests in flight on average")
    assert "coordinated omission" in note and "The 256-connection tail" in note


def test_exactly_the_connections_in_flight_is_not_flagged() -> None:
    _, notes = report.table_rows([row("nginx", 256.0), row("outrigger", 256.4)])
    assert notes == []


def test_few_requests_in_flight_is_still_flagged() -> None:
    _, notes = report.table_rows([row("nginx", 250.0), row("haproxy", 20.0)])
    [note] = notes
    assert note.startswith("haproxy c=256: only 20.0 requests in flight")
