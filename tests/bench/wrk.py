"""Drive wrk and read its results.

wrk runs as `wrk -t1 -c{N} -d{D}s --latency -s summary.lua [-H 'Host: ...'] URL`. The Lua
script only defines `done()`, which keeps wrk on its fast path (no per-request Lua) and prints
one `BENCH_JSON {...}` line with the exact counters and latency percentiles in microseconds, so
nothing is lost to wrk's rounded, unit-suffixed text. The human-readable `--latency` text is
parsed as well and the two are cross-checked; the raw text is kept in the JSON results.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from processes import BenchError

SUMMARY_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p75_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


@dataclass(frozen=True)
class WrkResult:
    """One wrk run. Latencies in microseconds; `status_errors` = responses with status >= 400
    (wrk's rule), the socket errors are wrk's connect/read/write/timeout counters."""

    connections: int
    duration_s: float
    requests: int
    requests_per_s: float
    p50_us: float
    p75_us: float
    p90_us: float
    p99_us: float
    p999_us: float
    max_us: float
    mean_us: float
    status_errors: int
    connect_errors: int
    read_errors: int
    write_errors: int
    timeout_errors: int
    raw: str

    @property
    def errors(self) -> int:
        return (
            self.status_errors
            + self.connect_errors
            + self.read_errors
            + self.write_errors
            + self.timeout_errors
        )

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["errors"] = self.errors
        return d


def write_script(workdir: Path) -> Path:
    path = workdir / "summary.lua"
    path.write_text(SUMMARY_LUA)
    return path


def run_wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    script: Path,
    host: str | None = None,
    cpus: str | None = None,
) -> WrkResult:
    """Run wrk once (bounded: duration + 30 s) and return its parsed results."""
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration_s:g}s",
        "--latency",
        "--timeout",
        "5s",
        "-s",
        str(script),
    ]
    if host is not None:
        argv += ["-H", f"Host: {host}"]
    argv.append(url)
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=duration_s + 30.0,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {duration_s + 30.0:.0f}s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout}")
    return parse(done.stdout, connections=connections)


def parse(text: str, *, connections: int) -> WrkResult:
    """Parse wrk's output (with our `done()` line). Raises BenchError if anything is missing."""
    m = re.search(r"^BENCH_JSON (\{.*\})$", text, re.MULTILINE)
    if m is None:
        raise BenchError(f"wrk output has no BENCH_JSON line:\n{text}")
    j = json.loads(m.group(1))
    duration_s = j["duration_us"] / 1e6
    if duration_s <= 0:
        raise BenchError(f"wrk reported a zero duration:\n{text}")
    result = WrkResult(
        connections=connections,
        duration_s=duration_s,
        requests=j["requests"],
        requests_per_s=j["requests"] / duration_s,
        p50_us=float(j["p50_us"]),
        p75_us=float(j["p75_us"]),
        p90_us=float(j["p90_us"]),
        p99_us=float(j["p99_us"]),
        p999_us=float(j["p999_us"]),
        max_us=float(j["max_us"]),
        mean_us=float(j["mean_us"]),
        status_errors=j["status"],
        connect_errors=j["connect"],
        read_errors=j["read"],
        write_errors=j["write"],
        timeout_errors=j["timeout"],
        raw=text,
    )
    _cross_check(result, text)
    return result


def _to_us(value: str, unit: str) -> float:
    return float(value) * _UNITS_US[unit]


def parse_text(text: str) -> dict[str, float]:
    """wrk's own text: Requests/sec and the 50/75/90/99 latency distribution (in µs)."""
    out: dict[str, float] = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    if m:
        out["requests_per_s"] = float(m.group(1))
    for pct, value, unit in re.findall(
        r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M
    ):
        out[f"p{pct}_us"] = _to_us(value, unit)
    return out


def _cross_check(result: WrkResult, text: str) -> None:
    """wrk's text and our Lua summary come from the same counters; refuse if they disagree."""
    t = parse_text(text)
    checks = [("requests_per_s", result.requests_per_s), ("p99_us", result.p99_us)]
    for key, ours in checks:
        theirs = t.get(key)
        if theirs is None:
            raise BenchError(f"wrk text output has no {key}:\n{text}")
        # wrk prints 2 decimals with a unit (e.g. 1.23ms): allow rounding, not disagreement.
        if abs(theirs - ours) > max(0.02 * abs(ours), 10.0):
            raise BenchError(f"wrk text says {key}={theirs}, summary says {ours}:\n{text}")
