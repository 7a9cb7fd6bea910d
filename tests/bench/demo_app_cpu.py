"""CPU per request of the demo apps (`outrigger.demo.service`), as issue 14 measures it.

    .venv/bin/python tests/bench/demo_app_cpu.py [--rates 50,100] [--duration 10] [--warmup 2]
                                                 [--repeat 1] [--connections 16] [--json PATH]

Starts two demo apps as real subprocesses on 127.0.0.1 (port 0, each prints the port it bound):
`payments` (answers 200) and `orders --downstream http://127.0.0.1:<payments>/` (one httpx GET
to payments per request, its shared `httpx.AsyncClient`, as in `outrigger demo` minus the
sidecars). For each rate, each repeat, one `python -m outrigger.loadgen` run drives orders at
that rate, open loop, `--warmup` seconds unrecorded then `--duration` recorded, on
`--connections` keep-alive connections (the demo's 16). Each app's CPU is read when the
generator says its warm-up is over and again at its summary, and divided by the requests
answered in that window: CPU-ms per request, for orders (server + its httpx call) and payments
(server only).

CPU is the sum over the process's threads of /proc/<pid>/task/<tid>/schedstat's first field
(time on CPU, in ns), so a 10 s window at 50 req/s (500 requests) is not rounded to 10 ms
clock ticks; where schedstat is missing, utime + stime from /proc/<pid>/stat.

The apps are not pinned: at these rates each needs a few percent of a core, and what this
measures is what an app costs when it is mostly idle and wakes for each request (which is the
demo's situation). On a shared machine CPU time moves less than wall time but caches still
matter: repeat (`--repeat`) and report the spread. Nothing here is a pass/fail check.

Bounded: each app must print its listening line within 15 s, each generator run must finish
within warm-up + duration + 30 s; every process is stopped (its group: SIGTERM, 5 s, SIGKILL)
in a `finally`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from processes import BenchError, Proc, ProcessGroup, cpu_seconds, loadgen_argv, loadgen_summary

START_TIMEOUT_S = 15.0
GENERATOR_SLACK_S = 30.0  # beyond warm-up + duration: connecting, the last answers, start-up
APPS = ("orders", "payments")


def task_cpu_seconds(pid: int) -> float:
    """Time on CPU of every thread of `pid`, from schedstat (ns); /proc/<pid>/stat's ticks
    where the kernel has no schedstat."""
    total_ns = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
        for tid in tids:
            total_ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)
    return total_ns / 1e9


def start_app(group: ProcessGroup, name: str, argv: Sequence[str]) -> tuple[Proc, int]:
    """Start a demo app with `--listen 127.0.0.1:0`; wait for the line naming its port."""
    proc = group.start(
        name,
        [
            sys.executable,
            "-m",
            "outrigger.demo.service",
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            *argv,
        ],
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    marker = f"outrigger demo app {name} listening "
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{name} exited with {proc.popen.returncode}: {proc.output_tail()}")
        for line in proc.log_path.read_text(errors="replace").splitlines():
            if line.startswith(marker):
                return proc, int(line.rsplit(":", 1)[1])
        time.sleep(0.05)
    raise BenchError(
        f"{name} did not say it was listening in {START_TIMEOUT_S:.0f}s: {proc.output_tail()}"
    )


def drive(
    url: str, rate: float, args: argparse.Namespace, apps: dict[str, Proc], workdir: Path
) -> dict[str, Any]:
    """One generator run; each app's CPU over its recorded window, per answered request."""
    argv = loadgen_argv(
        sys.executable,
        url,
        rate=rate,
        connections=args.connections,
        duration=args.duration,
        warmup=args.warmup,
    )
    cpu0: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def recording() -> None:
        cpu0.update((name, task_cpu_seconds(p.pid)) for name, p in apps.items())

    def summarised() -> None:
        cpu.update((name, task_cpu_seconds(p.pid) - cpu0[name]) for name, p in apps.items())

    summary = loadgen_summary(
        argv,
        timeout_s=args.warmup + args.duration + GENERATOR_SLACK_S,
        stderr_path=workdir / "loadgen.err",
        on_recording=recording,
        on_summary=summarised,
    )
    answered = int(summary["answered"])
    if not cpu0 or answered == 0:
        raise BenchError(f"no request was answered in the recorded window: {summary}")
    return {
        "rate": rate,
        "answered": answered,
        "statuses": summary["statuses"],
        "errors": summary["errors"],
        "p50_ms": summary["latency_ms"].get("p50"),
        "cpu_s": {name: round(c, 6) for name, c in cpu.items()},
        "cpu_ms_per_request": {name: round(1000.0 * c / answered, 4) for name, c in cpu.items()},
    }


def spread(values: list[float]) -> str:
    """`least-most (median)` of several runs, one value alone."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    ordered = sorted(values)
    median = ordered[len(ordered) // 2]
    return f"{ordered[0]:.3f}-{ordered[-1]:.3f} (median {median:.3f})"


def render(runs: list[dict[str, Any]]) -> str:
    """One row per rate: each app's CPU-ms per request over the runs at that rate."""
    lines = [
        "| req/s | runs | orders CPU-ms/req | payments CPU-ms/req | orders p50 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for rate in sorted({r["rate"] for r in runs}):
        at = [r for r in runs if r["rate"] == rate]
        cells = [spread([r["cpu_ms_per_request"][app] for r in at]) for app in APPS]
        p50 = spread([r["p50_ms"] for r in at if r["p50_ms"] is not None] or [0.0])
        bad = sum(sum(r["errors"].values()) for r in at)
        bad += sum(n for r in at for s, n in r["statuses"].items() if s != "200")
        lines.append(f"| {rate:g} | {len(at)} | {cells[0]} | {cells[1]} | {p50} | {bad} |")
    return "\n".join(lines)


def rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected rates above 0 such as 50,100, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rates", type=rates, default=[50.0, 100.0], help="req/s (50,100)")
    p.add_argument("--duration", type=float, default=10.0, help="recorded seconds per run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded seconds first (2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per rate, alternating rates (1)")
    p.add_argument("--connections", type=int, default=16, help="generator connections (16)")
    p.add_argument("--json", type=Path, default=None, help="also write every run here")
    p.add_argument(
        "--apps-from",
        type=Path,
        default=None,
        help="run the apps (and the generator) from this checkout's source, e.g. an export of "
        "main for a before/after (it goes first on PYTHONPATH)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs: list[dict[str, Any]] = []
    if args.apps_from is not None:
        os.environ["PYTHONPATH"] = str(args.apps_from.resolve())
    with tempfile.TemporaryDirectory(prefix="demo-app-cpu-") as tmp:
        workdir = Path(tmp)
        group = ProcessGroup(workdir)
        try:
            payments, payments_port = start_app(group, "payments", [])
            orders, orders_port = start_app(
                group, "orders", ["--downstream", f"http://127.0.0.1:{payments_port}/"]
            )
            apps = {"orders": orders, "payments": payments}
            url = f"http://127.0.0.1:{orders_port}/"
            for i in range(args.repeat):
                for rate in args.rates:
                    run = drive(url, rate, args, apps, workdir)
                    run["repeat"] = i
                    runs.append(run)
                    print(json.dumps({"run": run}), flush=True)
        except BenchError as exc:
            print(f"demo_app_cpu: {exc}", file=sys.stderr)
            return 1
        finally:
            group.close()
    print(render(runs), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
