"""xDS scale benchmark: N ADS streams against one control plane (not a pytest test).

    .venv/bin/python tests/bench/xds_scale.py [--streams 1000] [--processes 4] [--services 20]
        [--endpoints 2] [--max-streams N] [--retry]

Starts `outrigger control-plane` on a generated mesh file (a subprocess), and `--processes` load
generators (ads_load.py, each its own process, `--channels` gRPC channels each) that open the
N ADS streams between them, each behaving like a sidecar (LDS and CDS wildcard, RDS for
"outbound", EDS for every cluster, ACK everything). It reports how many streams synced and how
the others ended (the gRPC status code and message), the control plane's RSS and its CPU over
5 s of rest, then changes a policy in the mesh file (`--pushes` times) and measures, per stream,
the time from the edit to the ACK of the last response the change caused (p50, p99, max), and
the RSS after the pushes and again 5 s later (settled).
Every figure is printed with the load average beside it. Every wait is bounded; every process
is stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ads_load import Child, LoadFleet, loadavg, pct, stop_all

QUIET_S = 1.0  # a push is over when no stream got a response for this long
SETTLE_S = 5.0  # then the RSS is read again: what the process keeps once idle


def mesh_yaml(services: int, endpoints: int, timeout: str) -> str:
    lines = ["services:"]
    for i in range(services):
        hosts = ", ".join(f'"10.{1 + i // 250}.{i % 250}.{e + 1}:8080"' for e in range(endpoints))
        lines += [
            f"  - name: svc{i}",
            "    namespace: default",
            "    port: 80",
            f"    endpoints: [{hosts}]",
            "    policy:",
            f"      timeout: {timeout}",
            "      retries: {attempts: 2, retry_on: [connect-failure, reset]}",
        ]
    return "\n".join(lines) + "\n"


def harness(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="xds-scale-"))
    mesh = work / "mesh.yaml"
    mesh.write_text(mesh_yaml(args.services, args.endpoints, "2s"))
    print(
        f"xds_scale: {args.streams} streams over {args.processes} load generators x "
        f"{args.channels} channels, {args.services} services; load average {loadavg()}; "
        f"logs in {work}"
    )
    cp_log = (work / "control-plane.log").open("w")
    cp: Child | None = None
    fleet: LoadFleet | None = None
    try:
        cp = Child(
            [
                sys.executable,
                "-m",
                "outrigger.cli",
                "control-plane",
                "--mesh",
                str(mesh),
                "--xds",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                *(["--max-streams", str(args.max_streams)] if args.max_streams else []),
            ],
            "the control plane",
            stderr=cp_log,
        )
        banner = cp.line(60)
        found = re.search(r"on [\d.]+:(\d+), HTTP on [\d.]+:(\d+)", banner)
        if not found:
            raise RuntimeError(f"control plane did not start: {banner!r}; see {work}")
        rss0 = cp.rss_mib()
        cpu0 = cp.cpu_seconds()
        fleet = LoadFleet(
            f"127.0.0.1:{found.group(1)}",
            args.streams,
            processes=args.processes,
            channels=args.channels,
            retry=args.retry,
            sync_timeout=args.sync_timeout,
        )
        synced = fleet.synced()
        print(
            f"{synced.synced}/{synced.streams} streams synced in {synced.seconds:.1f} s "
            f"(control plane CPU {cp.cpu_seconds() - cpu0:.1f} s) [load {loadavg()}]"
        )
        if synced.errors:
            print(
                f"  streams ended by the control plane, by status: {synced.errors}; "
                f"messages: {synced.first_errors}"
            )
        time.sleep(2.0)
        cpu0, t0 = cp.cpu_seconds(), time.monotonic()
        time.sleep(5.0)
        idle = (cp.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        rss = cp.rss_mib()
        per_stream = (rss - rss0) / synced.synced * 1024 if synced.synced else float("nan")
        print(
            f"control plane at rest: RSS {rss:.0f} MiB ({rss0:.0f} before the streams, "
            f"{per_stream:.0f} KiB per synced stream), CPU {idle * 100:.1f}% of a core"
        )
        for round_, timeout in enumerate(("3s", "4s", "5s", "6s", "7s")[: args.pushes], 1):
            fleet.mark()
            cpu0 = cp.cpu_seconds()
            edit = time.time()
            mesh.write_text(mesh_yaml(args.services, args.endpoints, timeout))
            push = fleet.report(QUIET_S, 90)
            lat = sorted(max(s.values()) - edit for s in push.streams if s)
            print(
                f"push {round_} (timeout -> {timeout}): edit -> ACKed by {len(lat)}/"
                f"{len(push.streams)}: p50 {statistics.median(lat) * 1000:.0f} ms, "
                f"p99 {pct(lat, 0.99) * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms; control "
                f"plane CPU {cp.cpu_seconds() - cpu0 - QUIET_S * idle:.2f} s [load {loadavg()}]"
                + (f"; streams ended: {push.errors}" if push.errors else "")
            )
        print(f"control plane RSS after the pushes: {cp.rss_mib():.0f} MiB")
        time.sleep(SETTLE_S)
        print(f"control plane RSS {SETTLE_S:.0f} s later (settled): {cp.rss_mib():.0f} MiB")
        return 0
    finally:
        stop_all(fleet, [cp], work, args.keep_workdir)
        cp_log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="load generator processes")
    parser.add_argument("--channels", type=int, default=10, help="gRPC channels per generator")
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--endpoints", type=int, default=2)
    parser.add_argument("--pushes", type=int, default=3)
    parser.add_argument("--max-streams", type=int, default=0, help="control plane --max-streams")
    parser.add_argument("--retry", action="store_true", help="refused streams retry")
    parser.add_argument("--sync-timeout", type=float, default=180.0)
    parser.add_argument("--keep-workdir", action="store_true")
    return harness(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
