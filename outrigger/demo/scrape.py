"""Reading the sidecars' admin endpoints (`/stats/prometheus`, `/clusters`) and
turning two readings into per-service figures: requests/s, success %, p50/p99, retries.

The per-service percentiles come from the sidecars' duration histograms, interpolated within
their buckets as Prometheus' `histogram_quantile` does: estimates, as good as the buckets are
narrow (0.5, 1, 2.5, 5, 10, 25 ms ...), and the view says so."""

from __future__ import annotations

import asyncio
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Labels = tuple[tuple[str, str], ...]


def parse_prometheus(text: str) -> dict[str, dict[Labels, float]]:
    """name -> labels (sorted pairs) -> value, for every sample line of a text exposition."""
    out: dict[str, dict[Labels, float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            continue
        labels = tuple(sorted(_LABEL.findall(m[2] or "")))
        try:
            value = float(m[3])
        except ValueError:
            continue
        out.setdefault(m[1], {})[labels] = value
    return out


def config_version(metrics: dict[str, dict[Labels, float]]) -> str | None:
    """The config version the sidecar applied, from `outrigger_config_info{version=...} 1` (the
    same as /config_dump's, which costs the sidecar ~0.8 ms to render; this read is every
    second); None before any."""
    for labels, value in metrics.get("outrigger_config_info", {}).items():
        version = dict(labels).get("version")
        if value == 1 and version:
            return version
    return None


@dataclass
class Reading:
    """One sidecar's admin state at one moment."""

    at: float
    metrics: dict[str, dict[Labels, float]] = field(default_factory=dict)
    clusters: dict[str, Any] = field(default_factory=dict)
    version: str | None = None
    ok: bool = False

    def total(self, name: str, **match: str) -> float:
        return sum(
            v
            for labels, v in self.metrics.get(name, {}).items()
            if all(dict(labels).get(k) == want for k, want in match.items())
        )

    def requests(self, direction: str) -> tuple[float, float]:
        """(all, successful: status < 500) requests of `direction`, since the start."""
        total = ok = 0.0
        for labels, v in self.metrics.get("outrigger_requests_total", {}).items():
            d = dict(labels)
            if d.get("direction") != direction:
                continue
            total += v
            if d.get("code", "").isdigit() and int(d["code"]) < 500:
                ok += v
        return total, ok

    def flagged(self, direction: str, destination: str, code: str, flags: str) -> float:
        return self.total(
            "outrigger_requests_total",
            direction=direction,
            destination=destination,
            code=code,
            flags=flags,
        )

    def buckets(self, direction: str) -> dict[float, float]:
        """Upper bound -> cumulative count of the duration histogram of `direction`."""
        out: dict[float, float] = {}
        for labels, v in self.metrics.get("outrigger_request_duration_seconds_bucket", {}).items():
            d = dict(labels)
            if d.get("direction") != direction:
                continue
            le = math.inf if d.get("le") == "+Inf" else float(d.get("le", "inf"))
            out[le] = out.get(le, 0.0) + v
        return out


def quantile(q: float, now: dict[float, float], before: dict[float, float]) -> float | None:
    """The q-quantile (seconds) of the observations between two readings of a cumulative
    histogram, as Prometheus' `histogram_quantile` computes it: find the bucket holding the
    rank, then interpolate linearly within it, as if its observations were spread evenly between
    the bucket's lower and upper bounds (the first bucket starts at 0). A rank in the +Inf bucket
    gives the highest finite bound. None when nothing was observed."""
    bounds = sorted(now)
    counts = [now[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0 or bounds[-1] != math.inf:
        return None
    rank = q * counts[-1]
    for i, (bound, count) in enumerate(zip(bounds, counts, strict=True)):
        if count < rank:
            continue
        if bound == math.inf:
            return bounds[i - 1] if i > 0 else None
        lower, below = (bounds[i - 1], counts[i - 1]) if i > 0 else (0.0, 0.0)
        inside = count - below
        if inside <= 0:
            return bound
        return lower + (bound - lower) * (rank - below) / inside
    return None


@dataclass(frozen=True)
class Figures:
    """One service over a window: from its sidecars' inbound listeners."""

    rate: float
    success: float | None  # percent; None: no requests
    p50: float | None
    p99: float | None


def figures(now: list[Reading], before: list[Reading]) -> Figures:
    """Figures of a service from its sidecars' readings now and at the start of the window."""
    total = ok = 0.0
    hist_now: dict[float, float] = {}
    hist_before: dict[float, float] = {}
    span = 0.0
    for a, b in zip(now, before, strict=True):
        if not (a.ok and b.ok):
            continue
        ta, oa = a.requests("inbound")
        tb, ob = b.requests("inbound")
        total += ta - tb
        ok += oa - ob
        span = max(span, a.at - b.at)
        for k, v in a.buckets("inbound").items():
            hist_now[k] = hist_now.get(k, 0.0) + v
        for k, v in b.buckets("inbound").items():
            hist_before[k] = hist_before.get(k, 0.0) + v
    return Figures(
        rate=total / span if span > 0 else 0.0,
        success=100.0 * ok / total if total > 0 else None,
        p50=quantile(0.5, hist_now, hist_before),
        p99=quantile(0.99, hist_now, hist_before),
    )


class Scraper:
    """Reads every sidecar's admin port; keeps a short history of readings per sidecar."""

    def __init__(self, admins: dict[str, tuple[str, int]], keep: int = 30) -> None:
        self.admins = admins  # sidecar name (frontend, orders, payments-1, ...) -> admin address
        self.keep = keep
        self.history: dict[str, list[Reading]] = {name: [] for name in admins}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(2.0), trust_env=False)

    async def close(self) -> None:
        await self.client.aclose()

    async def read(self, name: str) -> Reading:
        """One sidecar's admin state now (not kept in the history)."""
        host, port = self.admins[name]
        base = f"http://{host}:{port}"
        reading = Reading(at=time.monotonic())
        try:
            stats, clusters = await asyncio.gather(
                self.client.get(base + "/stats/prometheus"),
                self.client.get(base + "/clusters"),
            )
            reading.metrics = parse_prometheus(stats.text)
            reading.clusters = clusters.json()
            reading.version = config_version(reading.metrics)
            reading.ok = True
        except (httpx.HTTPError, ValueError):
            reading.ok = False
        return reading

    async def poll(self) -> dict[str, Reading]:
        names = list(self.admins)
        readings = await asyncio.gather(*(self.read(n) for n in names))
        for name, reading in zip(names, readings, strict=True):
            history = self.history[name]
            history.append(reading)
            del history[: -self.keep]
        return dict(zip(names, readings, strict=True))

    def latest(self, name: str) -> Reading:
        history = self.history[name]
        return history[-1] if history else Reading(at=0.0)

    def ago(self, name: str, seconds: float) -> Reading:
        """The oldest reading at most `seconds` old (the window start)."""
        history = self.history[name]
        if not history:
            return Reading(at=0.0)
        newest = history[-1].at
        for reading in history:
            if newest - reading.at <= seconds + 0.05:
                return reading
        return history[-1]

    def service_figures(self, sidecars: list[str], window: float = 2.0) -> Figures:
        now = [self.latest(n) for n in sidecars]
        before = [self.ago(n, window) for n in sidecars]
        return figures(now, before)
