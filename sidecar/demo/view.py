"""What the demo shows: the live view (rich), the one-line status for a non-interactive run, and
the final summary."""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sidecar.demo.load import Window
from sidecar.demo.scrape import Figures
from sidecar.demo.story import Story


@dataclass(frozen=True)
class ServiceRow:
    name: str
    figures: Figures
    retries: float  # retries by its callers' sidecars towards it, since the start


@dataclass(frozen=True)
class EndpointRow:
    service: str
    endpoint: str  # a sidecar name: payments-2
    address: str
    seen_by: str  # the caller's sidecar whose /clusters this is
    breaker: str
    ejected: bool
    ejections: int


@dataclass(frozen=True)
class SidecarRow:
    name: str
    version: str | None
    ready: bool


@dataclass(frozen=True)
class Frame:
    elapsed: float
    load: Window  # the load generator's last window (frontend as its callers see it)
    services: list[ServiceRow]
    endpoints: list[EndpointRow]
    sidecars: list[SidecarRow]
    mesh_edits: int


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return ">60s"
    return f"{seconds * 1000:.0f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}µs"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def render(frame: Frame, story: Story) -> Group:
    services = Table(title="services (inbound, last 2 s)", expand=True)
    for col in ("service", "req/s", "success", "p50", "p99", "retries to it"):
        services.add_column(col, justify="left" if col == "service" else "right")
    load = frame.load
    services.add_row(
        "load → frontend",
        f"{load.requests / 2:.0f}",
        _pct(load.success),
        _ms(load.p50),
        _ms(load.p99),
        "",
        style="bold",
    )
    for row in frame.services:
        f = row.figures
        ok = f.success is None or f.success >= 99.0
        services.add_row(
            row.name,
            f"{f.rate:.0f}",
            Text(_pct(f.success), style="green" if ok else "red"),
            _ms(f.p50),
            _ms(f.p99),
            f"{row.retries:.0f}",
        )

    endpoints = Table(title="endpoints (as their callers' sidecars see them)", expand=True)
    for col in ("service", "endpoint", "address", "seen by", "breaker", "ejected", "ejections"):
        endpoints.add_column(col)
    for e in frame.endpoints:
        endpoints.add_row(
            e.service,
            e.endpoint,
            e.address,
            e.seen_by,
            Text(e.breaker, style="red" if e.breaker == "open" else ""),
            Text("EJECTED", style="bold red") if e.ejected else Text("no"),
            str(e.ejections),
        )

    sidecars = Table(title=f"config (mesh file edits: {frame.mesh_edits})", expand=True)
    for col in ("sidecar", "ready", "version ACKed"):
        sidecars.add_column(col)
    for s in frame.sidecars:
        sidecars.add_row(s.name, "yes" if s.ready else "no", (s.version or "-")[:16])

    lines = Text()
    for i, step in enumerate(story.steps, 1):
        style = {"happened": "green", "running": "yellow", "pending": "dim"}.get(step.mark, "red")
        lines.append(f"{i}. {step.title}: ", style="bold" if step.started else "dim")
        lines.append(step.mark, style=style)
        if step.evidence:
            lines.append(f"  ({step.evidence})")
        lines.append("\n")
    return Group(
        Panel(lines, title=f"outrigger demo — story ({frame.elapsed:.0f}s)"),
        services,
        endpoints,
        sidecars,
    )


def status_line(frame: Frame) -> str:
    parts = [f"[{frame.elapsed:5.1f}s] load {_pct(frame.load.success)} p99 {_ms(frame.load.p99)}"]
    for row in frame.services:
        f = row.figures
        parts.append(f"{row.name} {f.rate:.0f}/s {_pct(f.success)}")
    ejected = [e.endpoint for e in frame.endpoints if e.ejected]
    parts.append("ejected: " + (",".join(ejected) or "none"))
    versions = {s.version for s in frame.sidecars}
    parts.append(f"versions: {len(versions)}")
    return " | ".join(parts)
