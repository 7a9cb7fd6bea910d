"""The results table (plain text or Markdown) and the machine line.

Only measured values are printed: a cell whose measurement is missing or failed shows `—`,
and a failed row shows its reason under the table.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

DASH = "—"


def _first_line(argv: list[str]) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else None


def _version(argv: list[str], pattern: str) -> str | None:
    line = _first_line(argv)
    if line is None:
        return None
    m = re.search(pattern, line)
    return m.group(1) if m else line


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Hardware", "Processor")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "haproxy": _version(["haproxy", "-v"], r"version (\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "executable": sys.executable,
    }


def machine_line(m: dict[str, Any], config: dict[str, Any]) -> str:
    pins = config["pins"]
    pin_text = (
        "not pinned"
        if pins is None
        else f"pinned wrk→CPU {pins['wrk']}, proxy→CPU {pins['proxy']}, "
        f"upstream→CPU {pins['upstream']}"
    )
    return (
        f"{m['cpu_model']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"nginx {m['nginx']}, HAProxy {m['haproxy']}, wrk {m['wrk']}, {m['date']}; "
        f"wrk -t1 -d{config['duration_s']:g}s (+{config['warmup_s']:g}s warm-up), {pin_text}"
    )


def _lat(us: float | None) -> str:
    if us is None:
        return DASH
    if us < 1000:
        return f"{us:.0f}µs"
    if us < 1_000_000:
        return f"{us / 1000:.2f}ms"
    return f"{us / 1e6:.2f}s"


def _ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None or base == 0:
        return DASH
    return f"{x / base:.2f}x"


def _mib(kib: int | None) -> str:
    return DASH if not kib else f"{kib / 1024:.1f}"


def _num(x: float | None, fmt: str) -> str:
    return DASH if x is None else format(x, fmt)


def _probe_text(r: dict[str, Any]) -> str:
    p = r.get("keepalive_probe") or {}
    if "error" in p:
        return f"keep-alive probe failed: {p['error']}"
    if p.get("same_socket"):
        return "keep-alive probe: connection reused"
    header = p.get("first_connection_header")
    return f"keep-alive probe: connection NOT reused, Connection: {header}"


HEADER = [
    "row",
    "conns",
    "req/s",
    "req/s ÷ nginx",
    "p50",
    "p99",
    "p99 ÷ nginx",
    "errors",
    "loop stall (CPU; sys)",
    "GC max (CPU), count",
    "CPU-µs/req",
    "RSS idle MiB",
    "RSS peak MiB",
    "RSS +1k idle conns MiB",
]


def table_rows(results: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """Cells for every (row, conns) run, and notes for the failures."""
    nginx = next((r for r in results if r["name"] == "nginx" and r["status"] == "ok"), None)
    base: dict[int, dict[str, Any]] = {}
    if nginx is not None:
        base = {run["connections"]: run for run in nginx["runs"] if run.get("wrk")}
    cells: list[list[str]] = []
    notes: list[str] = []
    for r in results:
        if r["status"] != "ok":
            cells.append([r["name"], DASH, "FAILED", *[DASH] * (len(HEADER) - 3)])
            notes.append(f"{r['name']}: {r['error']}")
            continue
        idle_conn = r.get("idle_connections") or {}
        for run in r["runs"]:
            w = run.get("wrk")
            if w is None:
                cells.append(
                    [r["name"], str(run["connections"]), "FAILED", *[DASH] * (len(HEADER) - 3)]
                )
                notes.append(f"{r['name']} c={run['connections']}: {run['error']}")
                continue
            b = base.get(run["connections"], {}).get("wrk")
            in_flight = run.get("mean_in_flight")
            if in_flight is not None and in_flight < 0.5 * run["connections"]:
                notes.append(
                    f"{r['name']} c={run['connections']}: only {in_flight:.1f} requests in flight "
                    f"on average (req/s * mean latency); wrk's latency excludes reconnects, so "
                    f"connections were idle or being re-opened ({_probe_text(r)})"
                )
            # 2% over: a full run rounds to exactly N in flight (the last responses' timing).
            if in_flight is not None and in_flight > 1.02 * run["connections"]:
                notes.append(
                    f"{r['name']} c={run['connections']}: {in_flight:.1f} requests in flight on "
                    f"average (req/s * mean latency), more than the connections: wrk's latency "
                    f"histogram holds more samples than requests. wrk corrects for coordinated "
                    f"omission: each request slower than twice runtime/(requests/connections) "
                    f"adds samples at that latency less 1, 2, ... intervals, so a few slow "
                    f"requests or one stall weigh in the mean and p99 as if the load were "
                    f'open-loop ("The 256-connection tail" in tests/bench/README.md)'
                )
            stall = run.get("loop_stall_s")
            stall_text = DASH
            if stall is not None:
                stall_text = f"{_lat(stall * 1e6)} ({_lat(run['loop_stall_cpu_s'] * 1e6)}"
                system = run.get("loop_stall_system_cpu_s")
                if system is not None:
                    stall_text += f"; sys {_lat(system * 1e6)}"
                if run.get("loop_stall_major_faults"):
                    stall_text += f"; {run['loop_stall_major_faults']:,} major faults"
                stall_text += ")"
            gc_max = run.get("gc_pause_max_s")
            gc_text = DASH
            if gc_max is not None:
                gc_cpu = _lat(run["gc_pause_max_cpu_s"] * 1e6)
                gc_text = f"{_lat(gc_max * 1e6)} ({gc_cpu}), {run['gc_collections']:,}"
            cells.append(
                [
                    r["name"],
                    str(run["connections"]),
                    f"{w['requests_per_s']:,.0f}",
                    _ratio(w["requests_per_s"], b["requests_per_s"] if b else None),
                    _lat(w["p50_us"]),
                    _lat(w["p99_us"]),
                    _ratio(w["p99_us"], b["p99_us"] if b else None),
                    str(w["errors"]),
                    stall_text,
                    gc_text,
                    _num(run.get("cpu_us_per_request"), ".1f"),
                    _mib(r.get("idle_rss_kib")),
                    _mib(run.get("peak_rss_kib")),
                    _mib(idle_conn.get("rss_kib")),
                ]
            )
    return cells, notes


def render(results: list[dict[str, Any]], header_line: str, *, markdown: bool) -> str:
    cells, notes = table_rows(results)
    out: list[str] = []
    if markdown:
        out.append(header_line)
        out.append("")
        out.append("| " + " | ".join(HEADER) + " |")
        out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(HEADER))) + "|")
        out.extend("| " + " | ".join(c) + " |" for c in cells)
        if notes:
            out.append("")
            out.extend(f"- {n}" for n in notes)
    else:
        widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(HEADER)]

        def line(values: list[str]) -> str:
            return "  ".join(
                v.ljust(w) if i == 0 else v.rjust(w)
                for i, (v, w) in enumerate(zip(values, widths, strict=True))
            )

        out.append(header_line)
        out.append(line(HEADER))
        out.append("  ".join("-" * w for w in widths))
        out.extend(line(c) for c in cells)
        if notes:
            out.append("")
            out.extend(f"* {n}" for n in notes)
    return "\n".join(out)
