"""What the demo shows: the live view (rich), the one-line status for a non-interactive run, and
the waterfall of a trace for the end.

Whose latencies are whose, on screen: the load's p50/p99 are exact (every request, timed from
when it was due); the services' are estimates interpolated in their sidecars' histogram buckets.
Beside them, the demo's own CPU use and its load generator's timer lag, so that a demo starved of
CPU is seen as such and not read as a slow mesh."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from outrigger.demo.guard import Verdict
from outrigger.demo.load import Window
from outrigger.demo.scrape import Figures
from outrigger.demo.story import Story
from outrigger.demo.traces import CLIENT, KINDS, STATUS_ERROR, SpanRecord, Trace
from outrigger.demo.usage import DEMO, ROLES, Usage

STARVED_LAG = 0.02  # seconds of timer lag (p99) past which the view says the demo is starved


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
    usage: Usage | None = None  # CPU over the last 2 s


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return ">60s"
    if seconds >= 0.01:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds * 1000:.1f}ms" if seconds >= 0.001 else f"{seconds * 1e6:.0f}µs"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


def cpu_lines(usage: Usage | None) -> list[str]:
    """The demo's own CPU use, then the machine's by role (% of one core)."""
    if usage is None:
        return ["CPU: not measured (no /proc)"]
    parts = ", ".join(f"{name} {pct:.0f}%" for name, pct in usage.parts.items() if name in _OWN)
    own = f"demo itself: {usage.roles.get(DEMO, 0.0):.0f}% of a core ({parts})"
    if usage.machine is None:
        return [own]
    roles = ", ".join(f"{role} {usage.roles.get(role, 0.0):.0f}%" for role in ROLES if role != DEMO)
    others = usage.others or 0.0
    return [
        own,
        f"machine: {usage.cores} cores, {usage.machine:.0f}% busy: {roles}, "
        f"demo {usage.roles.get(DEMO, 0.0):.0f}%, other work {others:.0f}%",
    ]


_OWN = ("view", "load", "traces")  # the demo's own processes, as CpuMeter names them


def _summary_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds >= 0.001 else f"{seconds * 1000:.2f} ms"


def latency_lines(
    seconds: float,
    load: Window,
    frontend: tuple[float | None, float | None],
    usage: Usage | None,
    verdict: Verdict,
) -> list[tuple[str, str]]:
    """The summary's latency block: (line, style) for the time nothing failed (`seconds`), the
    load's and frontend's sidecar's p50/p99, the demo's own lag and CPU, the guard's verdict."""
    ms = _summary_ms
    lines = [
        f"  latency while nothing failed ({seconds:.1f}s, {load.requests} requests):",
        f"    load → frontend: p50 {ms(load.p50)}  p99 {ms(load.p99)}"
        "  (exact, from each request's due time)",
        f"    frontend sidecar inbound: p50 {ms(frontend[0])}  p99 {ms(frontend[1])}"
        "  (interpolated in its histogram's buckets)",
        f"    load generator's timer lag: p50 {ms(load.lag_p50)}  p99 {ms(load.lag_p99)}",
        "    CPU over the whole run (% of one core):",
        *(f"      {line}" for line in cpu_lines(usage)),
    ]
    out = [(line, "") for line in lines]
    if not verdict.judged:
        out.append((f"  latency guard: not judged: {verdict.reason}", ""))
    elif verdict.ok:
        out.append((f"  latency guard: ok: {verdict.reason}", ""))
    else:
        out.append((f"  latency guard: FAILED: {verdict.reason}", "red"))
    return out


def _starved(load: Window) -> bool:
    return load.lag_p99 is not None and load.lag_p99 > STARVED_LAG


def render(frame: Frame, story: Story) -> Group:
    services = Table(
        title="services (last 2 s)",
        caption="p50/p99: load exact (from each request's due time); "
        "services interpolated in histogram buckets",
        expand=True,
    )
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

    own = Text()
    for line in cpu_lines(frame.usage):
        own.append(line + "\n")
    own.append(
        f"load generator's timer lag: p50 {_ms(load.lag_p50)}  p99 {_ms(load.lag_p99)}",
        style="bold red" if _starved(load) else "",
    )
    if _starved(load):
        own.append(
            "\nthe demo is short of CPU: its requests go out late, and the load's latencies "
            "above include that delay (not the mesh's)",
            style="bold red",
        )

    sidecars = Table(title=f"config (mesh file edits: {frame.mesh_edits})", expand=True)
    for col in ("sidecar", "ready", "version ACKed"):
        sidecars.add_column(col)
    for s in frame.sidecars:
        sidecars.add_row(s.name, "yes" if s.ready else "no", (s.version or "-")[:16])

    lines = Text()
    for i, step in enumerate(story.steps, 1):
        style = {"happened": "green", "running": "yellow", "pending": "dim", "skipped": "dim"}.get(
            step.mark, "red"
        )
        lines.append(f"{i}. {step.title}: ", style="bold" if step.started else "dim")
        lines.append(step.mark, style=style)
        if step.evidence:
            lines.append(f"  ({step.evidence})")
        lines.append("\n")
    return Group(
        Panel(lines, title=f"outrigger demo — story ({frame.elapsed:.0f}s)"),
        services,
        Panel(own, title="the demo's own cost (last 2 s, % of one core)"),
        endpoints,
        sidecars,
    )


def status_line(frame: Frame) -> str:
    load = frame.load
    parts = [
        f"[{frame.elapsed:5.1f}s] load {_pct(load.success)} p50 {_ms(load.p50)}"
        f" p99 {_ms(load.p99)} (its lag p99 {_ms(load.lag_p99)})"
    ]
    for row in frame.services:
        f = row.figures
        parts.append(f"{row.name} {f.rate:.0f}/s {_pct(f.success)}")
    ejected = [e.endpoint for e in frame.endpoints if e.ejected]
    parts.append("ejected: " + (",".join(ejected) or "none"))
    versions = {s.version for s in frame.sidecars}
    parts.append(f"versions: {len(versions)}")
    if frame.usage is not None:
        u = frame.usage
        parts.append(
            f"cpu: demo {u.roles.get(DEMO, 0.0):.0f}%"
            + (f" machine {u.machine:.0f}%/{100 * u.cores}%" if u.machine is not None else "")
        )
    return " | ".join(parts)


# --- the waterfall ------------------------------------------------------------------------------

LABEL_WIDTH = 48  # tree guides + service, kind, span name: the columns after it line up
GUIDE_WIDTH = 4  # a rich Tree indents each level by 4 cells
BAR_WIDTH = 24
_BAR_STYLES = ("cyan", "magenta", "blue", "green", "yellow")


def waterfall(trace: Trace, names: Mapping[str, str] | None = None) -> Tree:
    """A trace as a tree of spans (parent_span_id → children), one line per span: service, kind
    and name, start offset and a bar on the trace's time line, duration, status code, then
    attempts (CLIENT), the endpoint and outcome (an attempt), response flags and span events.

    `names` maps an attempt's endpoint "host:port" to a name to show (payments-2)."""
    names = names or {}
    start = trace.start
    total = max(trace.end - start, 1)
    children = trace.children()
    services: list[str] = []
    for span in sorted(trace.spans, key=lambda s: s.start):
        if span.service not in services:
            services.append(span.service)
    styles = {svc: _BAR_STYLES[i % len(_BAR_STYLES)] for i, svc in enumerate(services)}
    legend = Text(
        f"{'service':<9}{'kind':<7}{'span':<{LABEL_WIDTH - GUIDE_WIDTH - 16}}"
        f"{'start':>9} {'':<{BAR_WIDTH + 2}}{'duration':>9} status",
        style="dim",
    )
    tree = Tree(Text(" " * GUIDE_WIDTH) + legend, guide_style="dim")

    def add(node: Tree, span: SpanRecord, depth: int) -> None:
        line = _span_line(span, depth, start, total, names, styles.get(span.service, ""))
        branch = node.add(line)
        for child in children.get(span.span_id, []):
            add(branch, child, depth + 1)

    for root in trace.roots():
        add(tree, root, 1)
    return tree


def _span_line(
    span: SpanRecord, depth: int, start: int, total: int, names: Mapping[str, str], style: str
) -> Text:
    kind = "" if span.is_attempt else KINDS.get(span.kind, "?")
    label = f"{span.service:<9}{kind:<7}{span.name}"
    width = max(LABEL_WIDTH - GUIDE_WIDTH * depth, len(label) + 1)
    offset = span.start - start
    first = min(int(offset / total * BAR_WIDTH), BAR_WIDTH - 1)
    last = max(first + 1, min(round((span.end - start) / total * BAR_WIDTH), BAR_WIDTH))
    attrs = span.attributes
    error = span.status == STATUS_ERROR
    status = attrs.get("http.response.status_code", "-")

    line = Text()
    line.append(f"{label:<{width}}", style="bold" if span.retried else "")
    line.append(f"{offset / 1e6:7.1f}ms ", style="dim")
    line.append("▕" + " " * first)
    line.append("█" * (last - first), style=style)
    line.append(" " * (BAR_WIDTH - last) + "▏")
    line.append(f"{(span.end - span.start) / 1e6:7.1f}ms ")
    line.append(f"{status!s:>6}", style="red" if error else "green")
    details: list[str] = []
    if span.kind == CLIENT:
        details.append(f"attempts {span.attempts}")
    if span.is_attempt:
        endpoint = f"{attrs.get('server.address', '?')}:{attrs.get('server.port', '?')}"
        details.append(f"→ {names.get(endpoint, endpoint)} {attrs.get('outrigger.outcome', '?')}")
    if "outrigger.response_flags" in attrs:
        details.append(f"flags {attrs['outrigger.response_flags']}")
    details += [f"⚑ {name.removeprefix('outrigger.')}" for name, _ in span.events]
    if span.parent and depth == 1:
        details.append("(its parent span did not arrive)")
    if details:
        line.append("  " + "  ".join(details), style="red" if error else "")
    return line
