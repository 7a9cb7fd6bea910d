"""`outrigger demo`: start the mesh, drive traffic, play the story, show it, stop everything.

Start-up order (each listener on port 0, so nothing clashes with what runs on the machine):

1. the apps' listening sockets, bound here and inherited by the apps (their ports are known at
   once; the sidecars need them for `--app`);
2. the control plane, serving a copy of the shipped demo-mesh.yaml whose services have no endpoints
   yet (it prints its bound xDS and HTTP addresses);
3. one sidecar per app (frontend, orders, payments-1, payments-2), all ports 0; each prints its
   bound outbound, inbound and admin addresses;
4. the apps, told their sidecar's outbound address (their explicit proxy);
5. the mesh copy rewritten with the sidecars' inbound addresses as endpoints; the control plane
   reloads it and pushes; we wait until every sidecar is ready and routes to every endpoint.

Then the load generator (`outrigger.loadgen`, a process of its own) sends to frontend's sidecar,
and the story plays. Every process runs in its own process group; `finally` stops them all
(SIGTERM, bounded wait, SIGKILL of the group).

Traces. With `--otlp-endpoint` (or the standard OTEL_EXPORTER_OTLP_* variables, which the
sidecars inherit) the sidecars send their spans there. Without, the demo first starts its own
OTLP/gRPC trace receiver on 127.0.0.1 (`traces`, a process of its own) and points every sidecar
at it; the story then has one more step (a retried request's trace arrived, with a span per
attempt) and the end prints that trace as a waterfall. The receiver stops after the sidecars,
which flush on SIGTERM.

The demo's own work stays off the measured path: the load and the trace receiver run in their
own processes, this one scrapes the sidecars and redraws the view once a second. The view and the
summary show the demo's own CPU use and its load generator's lag, and the summary ends with the
latency guard (`guard`): exit status 3 when the load's latencies are not the mesh's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.live import Live

from outrigger.demo.guard import Verdict, judge
from outrigger.demo.load import LoadFeed, loadgen_args
from outrigger.demo.meshfile import TEMPLATE, MeshFile
from outrigger.demo.processes import (
    DemoError,
    Process,
    listening_socket,
    outrigger,
    python_module,
    stop_all,
)
from outrigger.demo.scrape import Reading, Scraper, quantile
from outrigger.demo.story import Step, Story
from outrigger.demo.traces import Trace, TraceFeed
from outrigger.demo.usage import DEMO, CpuMeter, Sample, Usage, between
from outrigger.demo.view import (
    EndpointRow,
    Frame,
    ServiceRow,
    SidecarRow,
    latency_lines,
    render,
    status_line,
    waterfall,
)
from sidecar.telemetry import otlp_endpoint

Address = tuple[str, int]

# sidecar name -> (service, the URL its app calls, or None)
TOPOLOGY: dict[str, tuple[str, str | None]] = {
    "frontend": ("frontend", "http://orders/"),
    "orders": ("orders", "http://payments/"),
    "payments-1": ("payments", None),
    "payments-2": ("payments", None),
}
SERVICES = ("frontend", "orders", "payments")
CALLER = {"orders": "frontend", "payments": "orders"}  # whose /clusters shows the service

_CONTROL_PLANE = re.compile(r"on ([\d.]+):(\d+), HTTP on ([\d.]+):(\d+)")

STARTUP_TIMEOUT = 30.0
STEP_TIMEOUT = 8.0  # how long a check may wait for what it looks for
TRACE_SETTLE = 2.0  # at the end: how long to wait for the spans of a retried request
# With the demo's own receiver: export every 250 ms (the SDK's default is 5 s), so the story's
# trace step and an early Ctrl-C find the spans. An operator's own setting wins.
LOCAL_TRACE_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "250"}
REFRESH = 1.0  # seconds between scrapes, and between redraws of the view


@dataclass
class Healthy:
    """A stretch of the story in which nothing is made to fail, with frontend's sidecar read at
    both ends (its inbound histogram over the stretch)."""

    start: float
    before: Reading
    end: float | None = None
    after: Reading | None = None


@dataclass
class Member:
    name: str
    service: str
    app: Address
    inbound: Address
    outbound: Address
    admin: Address


def _fmt(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class Demo:
    def __init__(self, args: argparse.Namespace, console: Console) -> None:
        self.args = args
        self.console = console
        self.processes: list[Process] = []
        self.members: dict[str, Member] = {}
        self.tmp = Path(tempfile.mkdtemp(prefix="outrigger-demo-"))
        template = Path(args.mesh) if args.mesh else TEMPLATE
        try:
            self.mesh = MeshFile(template, self.tmp / "mesh.yaml")
        except (OSError, ValueError) as exc:
            raise DemoError(f"mesh template: {exc}") from exc
        self.story = Story()
        self.scraper: Scraper | None = None
        self.load = LoadFeed()
        self.load_url = ""
        self.load_process: Process | None = None
        self.failure: str | None = None  # what stopped the demo before its end
        self.healthy: list[Healthy] = []
        self.cpu = CpuMeter()
        self.cpu.watch(os.getpid(), DEMO, "view")
        self.cpu_from: Sample | None = None  # when the load started
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(3.0), trust_env=False)
        self.pushes_acked = 0
        self.started_at = time.monotonic()
        self.stop = asyncio.Event()
        # Where traces go: an endpoint given (flag or OTEL_* variables), off (OTEL_SDK_DISABLED,
        # OTEL_TRACES_EXPORTER=none: the sidecars would not trace), or in process.
        self.traces_to = otlp_endpoint(args.otlp_endpoint, None)
        self.traces_off = otlp_endpoint("in-process", None) is None
        self.traces: TraceFeed | None = None  # what the demo's own receiver holds, if it runs
        self.receiver: Process | None = None
        self.local_traces = ""  # its OTLP URL
        self.retry_step: Step | None = None

    # --- start-up ------------------------------------------------------------------------

    def _start(
        self,
        name: str,
        argv: list[str],
        pass_fds: tuple[int, ...] = (),
        env: dict[str, str] | None = None,
        role: str | None = None,
        part: str | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> Process:
        p = Process(name, argv, pass_fds, env, on_line)
        self.processes.append(p)
        if role is not None:
            self.cpu.watch(p.pid, role, part or name)
        return p

    def start_traces(self) -> None:
        """The demo's trace receiver process, unless traces go elsewhere (or nowhere)."""
        if self.traces_to is not None or self.traces_off:
            return
        feed = TraceFeed()
        receiver = Process(
            "trace receiver",
            python_module("outrigger.demo.traces"),
            on_line=feed.feed,
        )
        self.receiver = receiver  # stopped last, after the sidecars (not in self.processes)
        self.cpu.watch(receiver.pid, DEMO, "traces")
        line = receiver.wait_line("outrigger demo traces listening", STARTUP_TIMEOUT)
        self.local_traces = "http://" + line.rsplit(" ", 1)[-1]
        self.traces = feed

    def start_load(self) -> None:
        """The load generator's process, once it has its connections open."""
        self.load_url = f"http://{_fmt(self.members['frontend'].inbound)}/"
        argv = python_module("outrigger.loadgen", *loadgen_args(self.load_url, self.args.rate))
        load = self._start("load", argv, role=DEMO, part="load", on_line=self.load.feed)
        load.wait_line('{"started"', STARTUP_TIMEOUT)
        self.load_process = load

    def load_gone(self) -> str | None:
        """Why the figures stopped, if the load generator exited."""
        load = self.load_process
        if load is None or load.proc.poll() is None:
            return None
        tail = "\n  ".join(list(load.lines)[-5:])
        return f"the load generator exited (status {load.proc.returncode}); its output:\n  {tail}"

    def start_processes(self) -> None:
        sockets = {name: listening_socket() for name in TOPOLOGY}
        try:
            for svc in SERVICES:
                self.mesh.set_endpoints(svc, [])
            self.mesh.write()
            cp = self._start(
                "control-plane",
                outrigger(
                    "control-plane",
                    "--mesh",
                    str(self.mesh.path),
                    "--xds",
                    "127.0.0.1:0",
                    "--http",
                    "127.0.0.1:0",
                ),
                role="control plane",
            )
            m = _CONTROL_PLANE.search(cp.wait_line("outrigger control-plane: xDS", STARTUP_TIMEOUT))
            if m is None:
                raise DemoError("control plane: could not read its bound addresses")
            self.xds = (m[1], int(m[2]))
            self.cp_http = (m[3], int(m[4]))
            sidecars: dict[str, Process] = {}
            for name, (service, _) in TOPOLOGY.items():
                app = sockets[name].getsockname()[:2]
                argv = [
                    "sidecar",
                    "--control-plane",
                    _fmt(self.xds),
                    "--service",
                    service,
                    "--node-id",
                    f"{name}~demo",
                    "--inbound",
                    "127.0.0.1:0",
                    "--outbound",
                    "127.0.0.1:0",
                    "--admin",
                    "127.0.0.1:0",
                    "--app",
                    _fmt(app),
                ]
                env: dict[str, str] = {}
                if self.args.otlp_endpoint:
                    argv += ["--otlp-endpoint", self.args.otlp_endpoint]
                elif self.traces is not None:
                    argv += ["--otlp-endpoint", self.local_traces]
                    env = {k: v for k, v in LOCAL_TRACE_ENV.items() if k not in os.environ}
                sidecars[name] = self._start(
                    f"sidecar {name}", outrigger(*argv), env=env, role="sidecars"
                )
            for name, proc in sidecars.items():
                addrs = proc.addresses("outrigger sidecar listening", STARTUP_TIMEOUT)
                service = TOPOLOGY[name][0]
                self.members[name] = Member(
                    name,
                    service,
                    sockets[name].getsockname()[:2],
                    addrs["inbound"],
                    addrs["outbound"],
                    addrs["admin"],
                )
            apps: list[Process] = []
            for name, (_, downstream) in TOPOLOGY.items():
                sock = sockets[name]
                argv = python_module(
                    "outrigger.demo.service", "--name", name, "--fd", str(sock.fileno())
                )
                if downstream is not None:
                    argv += [
                        "--downstream",
                        downstream,
                        "--proxy",
                        f"http://{_fmt(self.members[name].outbound)}",
                    ]
                apps.append(
                    self._start(f"app {name}", argv, pass_fds=(sock.fileno(),), role="apps")
                )
            for app_proc in apps:
                app_proc.wait_line("outrigger demo app", STARTUP_TIMEOUT)
        finally:
            for sock in sockets.values():
                sock.close()
        for svc in SERVICES:
            self.mesh.set_endpoints(
                svc, [_fmt(m.inbound) for m in self.members.values() if m.service == svc]
            )
        self.mesh.write()

    async def wait_ready(self) -> None:
        """Every sidecar ready, on one config version, routing to every endpoint."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        scraper = Scraper({n: m.admin for n, m in self.members.items()})
        self.scraper = scraper
        while True:
            ready = await asyncio.gather(*(self._ready(m) for m in self.members.values()))
            readings = await scraper.poll()
            versions = {r.version for r in readings.values()}
            routed = all(
                len(self._endpoints_seen(readings[CALLER[svc]], svc))
                == sum(1 for m in self.members.values() if m.service == svc)
                for svc in CALLER
            )
            if all(ready) and len(versions) == 1 and None not in versions and routed:
                self.pushes_acked += 1
                return
            if time.monotonic() > deadline:
                raise DemoError(
                    f"sidecars not ready after {STARTUP_TIMEOUT:.0f}s: ready={ready} "
                    f"versions={versions} routed={routed}"
                )
            await asyncio.sleep(0.2)

    async def _ready(self, m: Member) -> bool:
        try:
            reply = await self.http.get(f"http://{_fmt(m.admin)}/ready")
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    @staticmethod
    def _endpoints_seen(reading: Reading, service: str) -> list[dict[str, Any]]:
        entry = reading.clusters.get(service)
        if not isinstance(entry, dict):
            return []
        endpoints = entry.get("endpoints")
        return [e for e in endpoints if isinstance(e, dict)] if isinstance(endpoints, list) else []

    # --- figures -------------------------------------------------------------------------

    def frame(self) -> Frame:
        assert self.scraper is not None
        scraper = self.scraper
        now = time.monotonic()
        services = []
        for svc in SERVICES:
            names = [n for n, m in self.members.items() if m.service == svc]
            retries = sum(
                scraper.latest(n).total("outrigger_retries_total", destination=svc)
                for n in self.members
            )
            services.append(ServiceRow(svc, scraper.service_figures(names), retries))
        by_address = {_fmt(m.inbound): n for n, m in self.members.items()}
        endpoints = []
        for svc, caller in CALLER.items():
            for e in self._endpoints_seen(scraper.latest(caller), svc):
                address = str(e.get("address", ""))
                endpoints.append(
                    EndpointRow(
                        service=svc,
                        endpoint=by_address.get(address, address),
                        address=address,
                        seen_by=caller,
                        breaker=str(e.get("breaker", "?")),
                        ejected=bool(e.get("ejected")),
                        ejections=int(e.get("ejections", 0)),
                    )
                )
        sidecars = [
            SidecarRow(n, scraper.latest(n).version, scraper.latest(n).ok) for n in self.members
        ]
        # the last 2 s of requests due whose answers are in (reports come every 0.25 s)
        return Frame(
            elapsed=now - self.started_at,
            load=self.load.window(now - 2.5, now - 0.5),
            services=services,
            endpoints=endpoints,
            sidecars=sidecars,
            mesh_edits=self.mesh.writes,
            usage=self.cpu.usage(2.0),
        )

    def total(self, metric: str, **match: str) -> float:
        assert self.scraper is not None
        return sum(self.scraper.latest(n).total(metric, **match) for n in self.members)

    # --- the story -----------------------------------------------------------------------

    def announce(self, step: Step) -> None:
        step.started = time.monotonic()
        self.console.print(f"[bold][{self.story.elapsed():5.1f}s] ▶ {step.title}[/bold]")

    def conclude(self, step: Step, happened: bool, evidence: str) -> None:
        step.happened = happened
        step.evidence = evidence
        mark = "[green]happened[/green]" if happened else "[red]DID NOT HAPPEN[/red]"
        self.console.print(f"[{self.story.elapsed():5.1f}s]   {mark}: {evidence}")

    async def until(self, check: Callable[[], bool], timeout: float = STEP_TIMEOUT) -> bool:
        """Poll `check` after each scrape until true or `timeout` (bounded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return True
            await asyncio.sleep(0.25)
        return check()

    async def app_call(self, name: str, path: str) -> None:
        await self.http.post(f"http://{_fmt(self.members[name].app)}{path}")

    async def push(self, change: Callable[[], None]) -> tuple[bool, str]:
        """Edit the mesh copy; wait until every sidecar ACKs a new version."""
        assert self.scraper is not None
        scraper = self.scraper
        before = {n: scraper.latest(n).version for n in self.members}
        change()
        self.mesh.write()
        start = time.monotonic()

        def acked() -> bool:
            versions = {scraper.latest(n).version for n in self.members}
            return len(versions) == 1 and all(
                scraper.latest(n).version != before[n] for n in self.members
            )

        ok = await self.until(acked)
        version = scraper.latest("frontend").version or "-"
        if ok:
            self.pushes_acked += 1
            return True, f"version {version[:12]} ACKed by all 4 sidecars in " + (
                f"{time.monotonic() - start:.1f}s"
            )
        return False, f"not ACKed by all sidecars: {[scraper.latest(n).version for n in before]}"

    def success_since(self, since: float) -> tuple[float | None, int]:
        w = self.load.window(since)
        return w.success, w.requests

    async def open_healthy(self) -> None:
        """From now on nothing is made to fail (until `close_healthy`)."""
        assert self.scraper is not None
        start = time.monotonic()
        self.healthy.append(Healthy(start, await self.scraper.read("frontend")))

    async def close_healthy(self) -> None:
        assert self.scraper is not None
        if self.healthy and self.healthy[-1].end is None:
            window = self.healthy[-1]
            window.end = time.monotonic()
            window.after = await self.scraper.read("frontend")

    async def hold_success(self, step: Step, seconds: float, bound: float) -> None:
        since = time.monotonic()
        await asyncio.sleep(seconds)
        success, n = self.success_since(since)
        ok = success is not None and success >= bound and n > 0
        self.conclude(step, ok, f"frontend success {success or 0:.1f}% over {n} requests")

    async def play(self) -> None:
        s = self.story
        baseline = s.add("traffic flows: 50 req/s to frontend", "success >= 99%")
        fail = s.add("payments-2 starts failing (its app answers 503)", "orders retries")
        hidden = s.add("retries hide the failures from frontend", "success >= 98%")
        eject = s.add("payments-2's breaker trips: ejected", "/clusters at orders: ejected")
        steady = s.add("with payments-2 ejected, success stays ~100%", "success >= 99%")
        slow = s.add("payments slows (+100ms); the orders timeout tightens to 50ms", "pushed")
        timeouts = s.add("frontend's calls to orders time out: 504 UT", "504 UT at frontend")
        restore = s.add("restore: timeout 2s, payments fast and healthy again", "pushed, ok")
        traced = None
        if self.traces is not None:
            traced = s.add("a retried request's trace arrived: a span per attempt", "its spans")
        self.retry_step = fail
        assert self.scraper is not None

        self.announce(baseline)
        await self.open_healthy()
        await self.hold_success(baseline, 2.0, 99.0)

        self.announce(fail)
        await self.close_healthy()
        retries0 = self.total("outrigger_retries_total", destination="payments")
        await self.app_call("payments-2", "/fail?on=1")
        fail_at = time.monotonic()
        ok = await self.until(
            lambda: self.total("outrigger_retries_total", destination="payments") > retries0
        )
        n503 = self.scraper.latest("payments-2").total(
            "outrigger_requests_total", direction="inbound", code="503"
        )
        retried = self.total("outrigger_retries_total", destination="payments") - retries0
        self.conclude(
            fail, ok, f"payments-2 answered {n503:.0f} x 503; orders retried {retried:.0f}"
        )

        self.announce(hidden)
        await asyncio.sleep(max(0.0, fail_at + 2.0 - time.monotonic()))
        success, n = self.success_since(fail_at)
        self.conclude(
            hidden,
            success is not None and success >= 98.0,
            f"frontend success {success or 0:.1f}% over {n} requests since the failure",
        )

        self.announce(eject)
        p2 = _fmt(self.members["payments-2"].inbound)

        def ejected() -> bool:
            return any(
                e.get("address") == p2 and e.get("ejected")
                for e in self._endpoints_seen(self.scraper.latest("orders"), "payments")  # type: ignore[union-attr]
            )

        ok = await self.until(ejected)
        ejections = self.total("outrigger_ejections_total", destination="payments")
        self.conclude(
            eject, ok, f"orders' /clusters: payments-2 ejected={ok}, ejections {ejections:.0f}"
        )

        self.announce(steady)
        await self.hold_success(steady, 3.0, 99.0)

        self.announce(slow)
        await self.app_call("payments-2", "/fail?on=0")
        for name in ("payments-1", "payments-2"):
            await self.app_call(name, "/delay?ms=100")
        ut0 = self.scraper.latest("frontend").flagged("outbound", "orders", "504", "UT")
        ok, evidence = await self.push(lambda: self.mesh.policy("orders").update(timeout="50ms"))
        self.conclude(slow, ok, evidence)

        self.announce(timeouts)

        def timed_out() -> bool:
            ut = self.scraper.latest("frontend").flagged("outbound", "orders", "504", "UT")  # type: ignore[union-attr]
            return ut > ut0

        ok = await self.until(timed_out)
        await asyncio.sleep(2.0)  # long enough to be seen in the live view
        ut = self.scraper.latest("frontend").flagged("outbound", "orders", "504", "UT") - ut0
        w = self.load.window(time.monotonic() - 2.0)
        self.conclude(
            timeouts,
            ok,
            f"frontend sidecar: {ut:.0f} x 504 UT to orders; load sees {w.statuses.get(504, 0)}"
            " x 504 in the last 2s",
        )

        self.announce(restore)
        for name in ("payments-1", "payments-2"):
            await self.app_call(name, "/delay?ms=0")
        ok, evidence = await self.push(lambda: self.mesh.policy("orders").update(timeout="2s"))
        await asyncio.sleep(0.5)  # answers in flight under the old timeout may still land
        since = time.monotonic()
        await self.open_healthy()  # until the end of the run
        await asyncio.sleep(2.0)
        success, n = self.success_since(since)
        healthy = success is not None and success >= 99.0
        self.conclude(
            restore,
            ok and healthy,
            f"{evidence}; then frontend success {success or 0:.1f}% over {n} requests",
        )

        if traced is not None:
            self.announce(traced)
            await self.check_traced(traced)

    # --- traces (the demo's own receiver) ------------------------------------------------

    def retried_trace(self) -> Trace | None:
        return self.traces.trace if self.traces is not None else None

    def endpoint_names(self) -> dict[str, str]:
        """A sidecar's inbound "host:port" (an attempt's endpoint) -> its name."""
        return {_fmt(m.inbound): n for n, m in self.members.items()}

    async def settle_traces(self, timeout: float) -> None:
        """Once a retry happened, wait (bounded) for a complete trace of a retried request."""
        if self.traces is None or self.retry_step is None or not self.retry_step.happened:
            return

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            trace = self.retried_trace()
            if trace is not None and trace.complete:
                return
            await asyncio.sleep(0.1)

    async def check_traced(self, step: Step) -> None:
        assert self.traces is not None and self.retry_step is not None
        if not self.retry_step.happened:
            # Nothing was retried (that step failed already): no trace to look for.
            step.skipped = True
            step.evidence = "no retry happened, so there is no trace of one"
            self.console.print(f"[{self.story.elapsed():5.1f}s]   skipped: {step.evidence}")
            return
        await self.settle_traces(STEP_TIMEOUT)
        trace = self.retried_trace()
        span = trace.retried() if trace is not None else None
        if trace is None or span is None:
            self.conclude(
                step, False, f"no retried request among the {self.traces.received} spans received"
            )
            return
        names = self.endpoint_names()
        tried = [
            names.get(
                f"{a.attributes.get('server.address')}:{a.attributes.get('server.port')}", "?"
            )
            for a in trace.attempts(span)
        ]
        services = sorted({s.service for s in trace.spans})
        self.conclude(
            step,
            True,
            f"trace {trace.trace_id[:12]}: {span.service} sent {span.name!r} to "
            f"{', then '.join(tried)}; {len(trace.spans)} spans from {', '.join(services)}"
            + ("" if trace.complete else " (some spans missing)"),
        )

    # --- the run -------------------------------------------------------------------------

    async def refresh(self, show: Callable[[Frame], None]) -> None:
        """Scrape, measure CPU, redraw: once every REFRESH seconds."""
        assert self.scraper is not None
        while not self.stop.is_set():
            gone = self.load_gone()
            if gone is not None:
                self.failure = gone
                self.stop.set()
                return
            await self.scraper.poll()
            self.cpu.sample()
            show(self.frame())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), REFRESH)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        self.console.print(f"outrigger demo: starting the mesh in {self.tmp}")
        await asyncio.to_thread(self.start_traces)
        await asyncio.to_thread(self.start_processes)
        await self.wait_ready()
        self._print_members()
        await asyncio.to_thread(self.start_load)
        self.cpu_from = self.cpu.sample()
        self.started_at = time.monotonic()
        self.story = Story()
        tasks: list[asyncio.Task[None]] = []
        interactive = self.args.duration is None
        live: Live | None = None
        last_line = [0.0]

        def show(frame: Frame) -> None:
            if live is not None:
                live.update(render(frame, self.story), refresh=True)
            elif time.monotonic() - last_line[0] >= 5.0:
                last_line[0] = time.monotonic()
                self.console.print(status_line(frame), highlight=False)

        try:
            if interactive:
                # redrawn only when a frame is ready (once a second), never by a thread of its own
                live = Live(console=self.console, auto_refresh=False, transient=False)
                live.start()
            tasks.append(asyncio.create_task(self.refresh(show)))
            await asyncio.sleep(1.0)  # one scrape window before the story starts
            story = asyncio.create_task(self.play())
            await _first(story, self.stop)
            if story.done() and not story.cancelled() and story.exception() is not None:
                raise story.exception()  # type: ignore[misc]
            if self.failure is not None:
                raise DemoError(self.failure)
            end = self.started_at + (self.args.duration or float("inf"))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), max(0.0, end - time.monotonic()))
            await self.close_healthy()
            await asyncio.sleep(0.6)  # the load's last report (every 0.25 s) of that window
        finally:
            self.stop.set()
            if live is not None:
                live.stop()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=3.0)
        await self.settle_traces(TRACE_SETTLE)  # stopped early: spans may still be on their way
        verdict = self.summary()
        if not self.story.all_happened:
            return 1
        return 3 if verdict.judged and not verdict.ok else 0

    def _print_members(self) -> None:
        self.console.print(f"  control plane  xDS {_fmt(self.xds)}  HTTP {_fmt(self.cp_http)}")
        if self.traces is not None:
            otlp = self.local_traces.removeprefix("http://")
            self.console.print(f"  traces         OTLP {otlp} (gRPC, the demo's receiver process)")
        for m in self.members.values():
            self.console.print(
                f"  {m.name:<11} app {_fmt(m.app)}  sidecar inbound {_fmt(m.inbound)}"
                f"  outbound {_fmt(m.outbound)}  admin {_fmt(m.admin)}",
                highlight=False,
            )

    def summary(self) -> Verdict:
        w = self.load.window(0.0)
        statuses = " ".join(f"{k}x{v}" for k, v in sorted(w.statuses.items()))
        out = self.console.print
        out("")
        out("outrigger demo summary", style="bold")
        out(f"  duration: {time.monotonic() - self.started_at:.1f}s", highlight=False)
        out(
            f"  requests: {w.requests}  success: {w.success or 0:.1f}%  statuses: {statuses}",
            highlight=False,
        )
        out(
            f"  retries: {self.total('outrigger_retries_total'):.0f}"
            f"  ejections: {self.total('outrigger_ejections_total'):.0f}"
            f"  pushes ACKed: {self.pushes_acked}",
            highlight=False,
        )
        for i, step in enumerate(self.story.steps, 1):
            out(f"  step {i}: {step.title}: {step.mark} ({step.evidence})", highlight=False)
        result = "every step happened" if self.story.all_happened else "some steps did not happen"
        out(f"  result: {result}", highlight=False)
        verdict = self.latency_summary()
        self.trace_summary()
        return verdict

    def whole_run_usage(self) -> Usage | None:
        if self.cpu_from is None:
            return None
        return between(self.cpu_from, self.cpu.sample(), self.cpu.cores)

    def latency_summary(self) -> Verdict:
        """The load's and frontend's latencies while nothing failed, the demo's own CPU and lag,
        and the guard's verdict on them."""
        spans = [(h.start, h.end) for h in self.healthy if h.end is not None]
        w = self.load.windows(spans)
        now: dict[float, float] = {}
        before: dict[float, float] = {}
        for h in self.healthy:
            if h.after is None or not (h.before.ok and h.after.ok):
                continue
            for bound, count in h.after.buckets("inbound").items():
                now[bound] = now.get(bound, 0.0) + count
            for bound, count in h.before.buckets("inbound").items():
                before[bound] = before.get(bound, 0.0) + count
        frontend = (quantile(0.5, now, before), quantile(0.99, now, before))
        verdict = judge(w.requests, w.success, w.p50, frontend[0], w.lag_p50, w.lag_p99)
        seconds = sum(end - start for start, end in spans)
        for line, style in latency_lines(seconds, w, frontend, self.whole_run_usage(), verdict):
            self.console.print(line, style=style, highlight=False)
        return verdict

    def trace_summary(self) -> None:
        out = self.console.print
        if self.traces_off:
            out("  traces: off (OTEL_SDK_DISABLED or OTEL_TRACES_EXPORTER=none)", highlight=False)
            return
        if self.traces is None:
            out(
                f"  traces: sent to {self.traces_to} (OTLP); find a retried request there: "
                "service orders, span 'GET payments', tag outrigger.retry.attempts=2",
                highlight=False,
            )
            return
        trace = self.retried_trace()
        if trace is None:
            out(
                f"  traces: no retried request was traced ({self.traces.received} spans received)",
                highlight=False,
            )
            return
        span = trace.retried()
        assert span is not None
        out("")
        out(
            f"trace {trace.trace_id}: a request retried by {span.service} "
            f"({span.attempts} attempts), {len(trace.spans)} spans, "
            f"{(trace.end - trace.start) / 1e6:.1f}ms"
            + ("" if trace.complete else " (some spans did not arrive)"),
            style="bold",
            highlight=False,
        )
        out(waterfall(trace, self.endpoint_names()))

    async def close(self) -> None:
        if self.scraper is not None:
            await self.scraper.close()
        await self.http.aclose()


async def _first(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    """Wait for `task` or `stop`, whichever comes first; cancel the task on stop."""
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=2.0)


async def _main(args: argparse.Namespace, console: Console) -> int:
    demo = Demo(args, console)
    try:
        return await demo.run()
    finally:
        await demo.close()
        await asyncio.to_thread(stop_all, demo.processes)
        if demo.receiver is not None:  # after the sidecars: they flush their last spans
            await asyncio.to_thread(stop_all, [demo.receiver])


def run_demo(args: argparse.Namespace) -> int:
    # not a terminal (--duration, CI, a pipe): one line per message, never wrapped; wide enough
    # for the waterfall's lines
    console = Console(highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = max(console.width, 160)
    try:
        return asyncio.run(_main(args, console))
    except DemoError as exc:
        print(f"outrigger demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
