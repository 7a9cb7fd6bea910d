"""The latency two sidecars add at a fixed rate, measured the way Istio publishes it.

    .venv/bin/python tests/bench/latency.py [--rate 1000] [--connections 16] [--duration 10]
                    [--warmup 2] [--configs plain,policy,nginx,python-floor] [--markdown]

Istio's performance page (1.20) reports the latency that two sidecars add, client side and
server side, at 1,000 requests/s over 16 HTTP/1.1 connections with 1 KiB responses: +0.228 ms at
p90 and +0.298 ms at p99, and 0.20 vCPU per 1,000 requests/s per sidecar (Envoy, 2 workers
each, mTLS on). This harness runs the same shape here:

    direct:  generator → app
    through: generator → sidecar A (outbound) → sidecar B (inbound) → app

The app is run.py's upstream (one nginx worker, `return 200` with a 1 KiB body). Sidecar A has a
mesh file with one service `upstream` whose endpoint is sidecar B's inbound listener; the
generator sends `Host: upstream` to A's outbound listener, and B forwards what reaches its inbound
listener to the app (`--app`), as a pod's sidecar does. The generator is `outrigger.loadgen`
(the demo's): open loop on uvloop with a timerfd, each request timed from when it was due, its
own loop lag reported beside the latencies (wrk2 is not packaged here, and neither `h2load
--rate` nor `hey -q` corrects for coordinated omission).

For each config (`plain`: no policy; `policy`: run.py's outrigger-policy row, BENCH_POLICY, on
the service A calls; and two floors in the sidecars' places: `nginx`, two nginx reverse proxies as
run.py's nginx row, and `python-floor`, two floor.py forwarders as run.py's python-floor row) the
harness starts the two proxies, measures the direct path, then the path through them, each run
one generator process: `--warmup` seconds unrecorded, then `--duration` seconds recorded, on the
same connections. The direct run comes right before each config's run, so that the difference
is taken between runs a few seconds apart. Each proxy's CPU (its process tree's
utime + stime from /proc/<pid>/stat) is read when the generator says its warm-up is over and
again at its summary, and normalised: CPU seconds ÷ wall seconds ÷ (answered requests/s ÷ 1,000),
i.e. vCPU per 1,000 req/s, Istio's unit (times 1,000: CPU-µs per request). Under the table each
sidecar config is set against Istio's figures and against the floors of the same run: what two
hops cost on this machine anyway. Each sidecar's longest event-loop stall in that window
is read from its /stats/prometheus (sidecar/loop_lag.py).

Pinning (default `--pin loadgen=1,sidecars=0,app=1`): both sidecars on CPU 0, the generator and
the app on CPU 1, so the sidecars' work never waits behind the generator's. At 1,000 req/s each
sidecar needs a few percent of a core, so they do not crowd each other; the direct path runs
with the same layout (CPU 0 then idle). `--pin none` leaves it to the scheduler.

Nothing here is a pass/fail check: on a shared machine the added latency is noise-prone; read
it with the generator's loop lag (when that is not far below the added latency, the generator,
not the sidecars, made the difference) and each sidecar's stall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import report
import rows
from processes import (
    BenchError,
    LoopPauses,
    Proc,
    ProcessGroup,
    cpu_seconds,
    http_get,
    loadgen_argv,
    loadgen_summary,
    loop_pauses,
    wait_until,
)

RESULTS = Path(__file__).resolve().parent / "results" / "latency.json"
DEFAULT_PIN = "loadgen=1,sidecars=0,app=1"
PERCENTILES = ("p50", "p90", "p99")


@dataclass(frozen=True)
class Config:
    """What stands in the path twice: `sidecar` (an Outrigger pair, with `policy` on the service
    the client side calls), `nginx` (two nginx reverse proxies) or `python-floor` (two floor.py
    forwarders). The last two are floors: what this machine costs for the same two hops."""

    proxies: str
    policy: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        """The table's 'through 2 …' / 'added by 2 …' wording."""
        return {"sidecar": "sidecars", "nginx": "nginx proxies"}.get(
            self.proxies, "floor forwarders"
        )


CONFIGS: dict[str, Config] = {
    "plain": Config("sidecar"),
    "policy": Config("sidecar", rows.BENCH_POLICY),
    "nginx": Config("nginx"),
    "python-floor": Config("python-floor"),
}
FLOORS = ("nginx", "python-floor")
DEFAULT_CONFIGS = "plain,policy,nginx,python-floor"
GENERATOR_SLACK_S = 30.0  # beyond warm-up + duration: connecting, the last answers, start-up

# Istio 1.20's performance page: two sidecars, 1,000 req/s, 16 connections, 1 KiB, HTTP/1.1.
ISTIO = {"p90_added_ms": 0.228, "p99_added_ms": 0.298, "vcpu_per_1000_rps": 0.20}


@dataclass(frozen=True)
class Pins:
    loadgen: str | None
    sidecars: str | None
    app: str | None


def parse_pins(text: str) -> Pins | None:
    if text == "none":
        return None
    try:
        parts = dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        parts = {}
    if set(parts) != {"loadgen", "sidecars", "app"}:
        raise argparse.ArgumentTypeError("expected loadgen=CPUS,sidecars=CPUS,app=CPUS or none")
    return Pins(loadgen=parts["loadgen"], sidecars=parts["sidecars"], app=parts["app"])


def pin_text(pins: Pins | None) -> str:
    if pins is None:
        return "not pinned"
    return (
        f"pinned (taskset -c): generator→CPU {pins.loadgen}, both sidecars→CPU {pins.sidecars}, "
        f"app→CPU {pins.app}"
    )


# --- the arithmetic ---------------------------------------------------------------------------


def added(direct: dict[str, float], through: dict[str, float]) -> dict[str, float]:
    """Per percentile, what the path through the sidecars adds to the direct one (ms)."""
    return {p: round(through[p] - direct[p], 3) for p in PERCENTILES}


def vcpu_per_1000_rps(cpu_s: float, wall_s: float, rate: float) -> float | None:
    """CPU seconds over `wall_s` seconds at `rate` answered req/s, as vCPU per 1,000 req/s."""
    if wall_s <= 0 or rate <= 0:
        return None
    return (cpu_s / wall_s) / (rate / 1000.0)


# --- processes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hop:
    """One of the two proxies in the path: its process (CPU is read over its tree), and for a
    sidecar its ports (the stall gauges, the request counters)."""

    proc: Proc
    sidecar: rows.Sidecar | None = field(default=None)

    @property
    def stats_url(self) -> str | None:
        return self.sidecar.stats_url if self.sidecar else None


@dataclass(frozen=True)
class Pair:
    """A started pair: the generator sends to `url` (with `host`); `hops` is [client, server]."""

    url: str
    host: str | None
    hops: list[Hop]


def start_pair(env: rows.Env, config: Config, cpus: str | None) -> Pair:
    """The server side B (→ the app) first, then the client side A (→ B). For sidecars, B is
    `--inbound` with `--app` the app and A has a mesh file whose service `upstream` is B's
    inbound listener. Checked: GET / through both answers the 1 KiB body."""
    app = env.upstream_port
    if config.proxies == "sidecar":
        server_mesh = rows.mesh_document(app, policy=None, tracing=None)
        server = rows.start_sidecar(env, "sidecar-server", server_mesh, app_port=app, cpus=cpus)
        client_mesh = rows.mesh_document(server.inbound, policy=config.policy, tracing=None)
        client = rows.start_sidecar(env, "sidecar-client", client_mesh, app_port=app, cpus=cpus)
        url = f"http://127.0.0.1:{client.outbound}/"
        wait_until(
            client.proc,
            rows.body_check(url, env.body, host=rows.MESH_SERVICE),
            timeout_s=rows.READY_TIMEOUT_S,
            what="GET / with Host: upstream through both sidecars did not answer the 1 KiB body",
        )
        return Pair(url, rows.MESH_SERVICE, [Hop(client.proc, client), Hop(server.proc, server)])
    start = rows.nginx_proxy if config.proxies == "nginx" else rows.floor_proxy
    b = start(env, f"{config.proxies}-server", app, cpus)
    a = start(env, f"{config.proxies}-client", b.listen[1], cpus)
    assert a.measured is not None and b.measured is not None  # both proxies are processes
    return Pair(a.url, None, [Hop(a.measured), Hop(b.measured)])


def prometheus_values(url: str, name: str) -> dict[str, float]:
    """Every sample of metric `name` on the page, by its label text ("" without labels)."""
    r = http_get(url)
    if r.status != 200:
        raise BenchError(f"{url} answered {r.status}")
    out: dict[str, float] = {}
    for line in r.body.decode().splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, _, value = line.rpartition(" ")
            out[key[len(name) :]] = float(value)
    return out


def requests_counted(sidecar: rows.Sidecar | None, direction: str) -> int:
    """Requests the sidecar counted on `direction` (its outrigger_requests_total)."""
    assert sidecar is not None
    values = prometheus_values(sidecar.stats_url, "outrigger_requests_total")
    return int(sum(v for k, v in values.items() if f'direction="{direction}"' in k))


def run_generator(
    url: str,
    *,
    host: str | None,
    args: argparse.Namespace,
    cpus: str | None,
    sidecars: list[Hop],
    workdir: Path,
) -> dict[str, Any]:
    """One `python -m outrigger.loadgen` run; the proxies' CPU (and sidecars' stalls) over its
    recorded window. Bounded: warm-up + duration + GENERATOR_SLACK_S."""
    python = Path(sys.executable) if args.python is None else args.python
    argv = loadgen_argv(
        str(python),
        url,
        rate=args.rate,
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup,
    )
    if host is not None:
        argv += ["--header", f"Host: {host}"]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    cpu0: list[float] = []
    wall0 = 0.0
    wall = 0.0
    cpu: list[float] = []
    stalls: list[LoopPauses | None] = []

    def recording() -> None:
        nonlocal wall0, cpu0
        wall0 = time.monotonic()
        cpu0 = [cpu_seconds(s.proc.pid) for s in sidecars]
        for s in sidecars:
            if s.stats_url is not None:
                loop_pauses(s.stats_url)  # reset: the next read covers the window

    def summarised() -> None:
        nonlocal wall, cpu, stalls
        wall = time.monotonic() - wall0
        cpu = [cpu_seconds(s.proc.pid) - c for s, c in zip(sidecars, cpu0, strict=True)]
        stalls = [None if s.stats_url is None else loop_pauses(s.stats_url) for s in sidecars]

    summary = loadgen_summary(
        argv,
        timeout_s=args.warmup + args.duration + GENERATOR_SLACK_S,
        stderr_path=workdir / "loadgen.err",
        on_recording=recording,
        on_summary=summarised,
    )
    if not summary.get("latency_ms"):
        raise BenchError(f"no request was answered: {summary}")
    result: dict[str, Any] = {"generator": summary}
    answered_rate = summary["answered"] / summary["seconds"] if summary["seconds"] else 0.0
    result["answered_rate"] = answered_rate
    if sidecars and cpu0:
        result["sidecars"] = [
            {
                "name": s.proc.name,
                "cpu_seconds": round(c, 3),
                "window_s": round(wall, 3),
                "vcpu_per_1000_rps": vcpu_per_1000_rps(c, wall, answered_rate),
                **(stall.to_json() if stall is not None else {}),
            }
            for s, c, stall in zip(sidecars, cpu, stalls, strict=True)
        ]
    return result


def measure_config(
    env: rows.Env, name: str, args: argparse.Namespace, pins: Pins | None
) -> dict[str, Any]:
    """Direct, then through a fresh pair of this config's proxies."""
    started = len(env.group.procs)
    config = CONFIGS[name]
    result: dict[str, Any] = {"config": name, "proxies": config.proxies, "policy": config.policy}
    try:
        gen_cpus = pins.loadgen if pins else None
        app_url = f"http://127.0.0.1:{env.upstream_port}/"
        result["direct"] = run_generator(
            app_url, host=None, args=args, cpus=gen_cpus, sidecars=[], workdir=env.workdir
        )
        pair = start_pair(env, config, pins.sidecars if pins else None)
        client, server = pair.hops
        sidecars = config.proxies == "sidecar"
        if sidecars:
            counted_before = [
                requests_counted(client.sidecar, "outbound"),
                requests_counted(server.sidecar, "inbound"),
            ]
        result["through"] = run_generator(
            pair.url,
            host=pair.host,
            args=args,
            cpus=gen_cpus,
            sidecars=pair.hops,
            workdir=env.workdir,
        )
        if sidecars:
            counted = [
                requests_counted(client.sidecar, "outbound"),
                requests_counted(server.sidecar, "inbound"),
            ]
            result["sidecar_requests"] = {
                "client_outbound": counted[0] - counted_before[0],
                "server_inbound": counted[1] - counted_before[1],
            }
        for s in pair.hops:
            if not s.proc.alive():
                raise BenchError(f"{s.proc.name} died: {s.proc.output_tail()}")
        direct = result["direct"]["generator"]["latency_ms"]
        through = result["through"]["generator"]["latency_ms"]
        result["added_ms"] = added(direct, through)
        result["status"] = "ok"
    except BenchError as exc:
        result.update(status="failed", error=str(exc))
    finally:
        for proc in env.group.procs[started:][::-1]:
            env.group.stop(proc)
    return result


# --- the report -------------------------------------------------------------------------------

HEADER = [
    "config",
    "path",
    "req/s",
    "p50",
    "p90",
    "p99",
    "errors",
    "generator lag p99 / max",
    "vCPU per 1k req/s (client, server side)",
    "loop stall (client, server sidecar)",
]


def _ms(x: float | None, sign: bool = False) -> str:
    if x is None:
        return report.DASH
    return f"{x:+.3f} ms" if sign else f"{x:.3f} ms"


def _run_cells(config: str, path: str, run: dict[str, Any]) -> list[str]:
    g = run["generator"]
    lat, lag = g["latency_ms"], g.get("loop_lag_ms") or {}
    errors = sum(g["errors"].values()) + sum(
        n for code, n in g["statuses"].items() if int(code) >= 500
    )
    sidecars = run.get("sidecars") or []
    vcpu = ", ".join(
        f"{s['vcpu_per_1000_rps']:.3f}" if s["vcpu_per_1000_rps"] is not None else report.DASH
        for s in sidecars
    )
    stall = ", ".join(
        f"{s['loop_stall_s'] * 1000:.1f} ms (CPU {s['loop_stall_cpu_s'] * 1000:.1f}, "
        f"GC max {s['gc_pause_max_s'] * 1000:.1f}, CPU {s['gc_pause_max_cpu_s'] * 1000:.1f})"
        for s in sidecars
        if "loop_stall_s" in s  # sidecars only: the floors have no such gauges
    )
    return [
        config,
        path,
        f"{run['answered_rate']:,.0f}",
        _ms(lat["p50"]),
        _ms(lat["p90"]),
        _ms(lat["p99"]),
        str(errors),
        f"{_ms(lag.get('p99'))} / {_ms(lag.get('max'))}",
        vcpu or report.DASH,
        stall or report.DASH,
    ]


def table(results: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    cells: list[list[str]] = []
    notes: list[str] = []
    for r in results:
        if r["status"] != "ok":
            cells.append([r["config"], "FAILED", *[report.DASH] * (len(HEADER) - 2)])
            notes.append(f"{r['config']}: {r['error']}")
            continue
        cells.append(_run_cells(r["config"], "direct (generator → app)", r["direct"]))
        label = CONFIGS[r["config"]].label
        cells.append(_run_cells(r["config"], f"through 2 {label}", r["through"]))
        add = r["added_ms"]
        cells.append(
            [
                r["config"],
                f"added by 2 {label}",
                report.DASH,
                *(_ms(add[p], sign=True) for p in PERCENTILES),
                *[report.DASH] * (len(HEADER) - 6),
            ]
        )
        counted = r.get("sidecar_requests")
        if counted is not None:
            answered = r["through"]["generator"]["answered"]
            notes.append(
                f"{r['config']}: the generator had {answered} answers recorded; the client "
                f"sidecar counted {counted['client_outbound']} outbound and the server sidecar "
                f"{counted['server_inbound']} inbound requests over the run (warm-up included)"
            )
        lag = generator_lag(r)
        noisy = [p for p in PERCENTILES if 2 * lag[p] >= abs(add[p])]
        if noisy:
            notes.append(
                f"{r['config']}: the generator's own loop lag ("
                + ", ".join(f"{p} {lag[p]:.3f} ms" for p in noisy)
                + f") was at least half the added {', '.join(noisy)}: much of those differences "
                f"can be the generator's (its CPU was busy), not the sidecars'; rerun on a "
                f"quieter machine"
            )
    return cells, notes


def generator_lag(result: dict[str, Any]) -> dict[str, float]:
    """Per percentile, the larger of the generator's loop lag over a config's two runs (ms)."""
    lags = [result[path]["generator"].get("loop_lag_ms") or {} for path in ("direct", "through")]
    return {p: max(lag.get(p, 0.0) for lag in lags) for p in PERCENTILES}


def istio_lines(results: list[dict[str, Any]]) -> list[str]:
    """Each config's added p90/p99 and vCPU against Istio's published figures."""
    out = [
        f"Istio 1.20 (published; Envoy, 2 workers, mTLS): +{ISTIO['p90_added_ms']} ms p90, "
        f"+{ISTIO['p99_added_ms']} ms p99 added by two sidecars; "
        f"{ISTIO['vcpu_per_1000_rps']} vCPU per 1,000 req/s per sidecar."
    ]
    for r in results:
        if r["status"] != "ok":
            continue
        add = r["added_ms"]
        known = [v for v in _vcpus(r) if v is not None]
        istio_cpu = ISTIO["vcpu_per_1000_rps"]
        cpu = (
            f"; vCPU per 1,000 req/s {', '.join(f'{v:.3f}' for v in known)} "
            f"({', '.join(f'{v / istio_cpu:.2f}x' for v in known)} Istio's; aim below 0.25x)"
            if known
            else ""
        )
        out.append(
            f"{r['config']}: added p90 {add['p90']:+.3f} ms "
            f"({add['p90'] / ISTIO['p90_added_ms']:.2f}x Istio's), "
            f"p99 {add['p99']:+.3f} ms ({add['p99'] / ISTIO['p99_added_ms']:.2f}x){cpu}"
        )
    return out


def floor_lines(results: list[dict[str, Any]]) -> list[str]:
    """Each sidecar config against each floor measured in the same run (two nginx proxies, two
    floor.py forwarders in the sidecars' places): what two hops cost on this machine anyway, and
    how much more the sidecars add. vCPU per 1,000 req/s times 1,000 is CPU-µs per request."""
    ok = [r for r in results if r["status"] == "ok"]
    floors = [r for r in ok if r["config"] in FLOORS]
    out = []
    for r in ok:
        if r["config"] in FLOORS:
            continue
        add, vcpu = r["added_ms"], _vcpus(r)
        for f in floors:
            fadd, fvcpu = f["added_ms"], _vcpus(f)
            ratios = ", ".join(
                f"{v / fv:.2f}x" if v is not None and fv else report.DASH
                for v, fv in zip(vcpu, fvcpu, strict=True)
            )
            out.append(
                f"{r['config']} against {f['config']} (same two places, this run): added "
                f"p50/p90/p99 {_percentiles(add)} ms against {_percentiles(fadd)} ms "
                f"(difference {_percentiles({p: add[p] - fadd[p] for p in PERCENTILES})} ms); "
                f"vCPU per 1,000 req/s (client, server) {_vcpu_text(vcpu)} against "
                f"{_vcpu_text(fvcpu)} ({ratios})"
            )
    return out


def _percentiles(ms: dict[str, float]) -> str:
    return "/".join(f"{ms[p]:+.3f}" for p in PERCENTILES)


def _vcpus(result: dict[str, Any]) -> list[float | None]:
    return [s["vcpu_per_1000_rps"] for s in result["through"].get("sidecars", [])]


def _vcpu_text(vcpus: list[float | None]) -> str:
    return ", ".join(report.DASH if v is None else f"{v:.3f}" for v in vcpus)


def render(results: list[dict[str, Any]], header_line: str, *, markdown: bool) -> str:
    cells, notes = table(results)
    comparison = istio_lines(results) + floor_lines(results)
    out = [header_line]
    if markdown:
        out += ["", "| " + " | ".join(HEADER) + " |"]
        out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(HEADER))) + "|")
        out += ["| " + " | ".join(c) + " |" for c in cells]
        out += [""] + [f"- {line}" for line in comparison + notes]
        return "\n".join(out)
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(HEADER)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        )

    out += [line(HEADER), "  ".join("-" * w for w in widths), *(line(c) for c in cells), ""]
    out += [f"* {x}" for x in comparison + notes]
    return "\n".join(out)


def header_line(machine: dict[str, Any], config: dict[str, Any]) -> str:
    return (
        f"{machine['cpu_model']}, {machine['cores']} cores, Linux {machine['kernel']}, Python "
        f"{machine['python']}, nginx {machine['nginx']}, {machine['date']}; "
        f"{config['rate']:g} req/s over {config['connections']} connections, "
        f"{config['duration_s']:g} s recorded after {config['warmup_s']:g} s warm-up, "
        f"{config['body_bytes']} B responses, HTTP/1.1; {config['pin_text']}"
    )


# --- the command ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rate", type=float, default=1000.0, help="requests per second (1000)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    p.add_argument("--duration", type=float, default=10.0, help="recorded seconds per run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds first (2)")
    p.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help=f"comma list of {','.join(CONFIGS)} ({DEFAULT_CONFIGS})",
    )
    p.add_argument("--pin", default=DEFAULT_PIN, help=f"taskset layout or 'none' ({DEFAULT_PIN})")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--outrigger", type=Path, default=rows.OUTRIGGER, help="the sidecar")
    p.add_argument("--python", type=Path, default=None, help="python for the generator (this one)")
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    args.config_names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.config_names if c not in CONFIGS]
    if unknown or not args.config_names:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(CONFIGS)}")
    if not args.rate > 0 or args.connections < 1 or not args.duration > 0 or args.warmup < 0:
        p.error("--rate and --duration must be above 0, --connections at least 1")
    try:
        args.pins = parse_pins(args.pin)
    except argparse.ArgumentTypeError as exc:
        p.error(f"--pin: {exc}")
    return args


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("nginx") is None:
        print("missing tools: nginx (apt-get install nginx)", file=sys.stderr)
        return 2
    pins = args.pins
    if pins is not None and (shutil.which("taskset") is None or (os.cpu_count() or 1) < 2):
        print("taskset missing or fewer than 2 CPUs: running unpinned", file=sys.stderr)
        pins = None
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="outrigger-latency-"))
    env = rows.Env(
        group=ProcessGroup(workdir=workdir),
        workdir=workdir,
        pins=rows.Pins(wrk=None, proxy=None, upstream=pins.app if pins else None),
        body=rows.make_body(),
        outrigger=args.outrigger,
    )
    config: dict[str, Any] = {
        "rate": args.rate,
        "connections": args.connections,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "configs": args.config_names,
        "pins": None if pins is None else vars(pins),
        "pin_text": pin_text(pins),
        "body_bytes": len(env.body),
        "outrigger": str(args.outrigger),
        "istio": ISTIO,
    }
    machine = report.machine()
    print(f"[latency] {pin_text(pins)}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        _, env.upstream_port = rows.start_upstream(env)
        for name in args.config_names:
            print(f"[latency] {name} ...", file=sys.stderr, flush=True)
            results.append(measure_config(env, name, args, pins))
            if results[-1]["status"] != "ok":
                print(f"[latency] {name} FAILED: {results[-1]['error']}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("[latency] interrupted; stopping every process", file=sys.stderr)
    except BenchError as exc:
        interrupted = True
        print(f"[latency] aborted: {exc}", file=sys.stderr)
    finally:
        env.group.close()
        if args.keep_workdir:
            print(f"[latency] configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {"machine": machine, "config": config, "complete": not interrupted, "runs": results},
            indent=2,
        )
        + "\n"
    )
    line = header_line(machine, config)
    if interrupted:
        line += " [INCOMPLETE: run interrupted]"
    print(render(results, line, markdown=args.markdown))
    print(f"\n[latency] JSON: {args.output}", file=sys.stderr)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
