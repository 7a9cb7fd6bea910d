"""Kubernetes scale benchmark: a large cluster, a real control plane, many sidecars (not a test).

    .venv/bin/python tests/bench/k8s_scale.py [--services 1000] [--endpoints 10]
        [--namespaces 20] [--streams 1000] [--processes 2] [--changes 5]

Three kinds of process, each its own:

- the fake Kubernetes API server (tests/control_plane/kube_api.py, the strict one the tests
  use) holding `--services` Services in `--namespaces` Namespaces, each with one EndpointSlice of
  `--endpoints` ready endpoints. Its own cost is measured (paged lists timed from here, its CPU
  during the control plane's start and during each change), so it is known not to be the
  bottleneck;
- `outrigger control-plane --kubernetes --kubeconfig ...` (the default 100 ms debounce): the time
  from starting the process to its banner, printed once the first full snapshot is served;
- `--processes` load generators (ads_load.py) opening `--streams` sidecar-like ADS streams
  spread over the namespaces.

Then `--changes` times: one EndpointSlice gets a new pod IP in place of an old one (a pod
restarted), and per stream the time from the API server storing the change to the stream's ACK
of the EDS push is taken (p50, p99, max), with a check that no Listener, Cluster or
RouteConfiguration was pushed; the control plane's RSS is read after the last change and again
5 s later (settled). Each figure is printed with the load average beside it. Every
wait is bounded; every process is stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ads_load import REPO, Child, LoadFleet, loadavg, pct, stop_all

CHANGE_QUIET_S = 1.0  # a push is over when no stream got a response for this long
SETTLE_S = 5.0  # then the RSS is read again: what the process keeps once idle

# -- the fake API server process ---------------------------------------------------------------


def cluster_objects(services: int, endpoints: int, namespaces: int) -> list[dict[str, Any]]:
    """Namespaces, Services (selector, one port `http` 80 -> 8080) and one EndpointSlice each."""
    from tests.control_plane.kube_api import endpoint_slice, namespace, service

    objects = [namespace(f"ns{n}") for n in range(namespaces)]
    for i in range(services):
        ns, index = f"ns{i % namespaces}", i // namespaces
        name = f"svc{index}"
        objects.append(
            service(
                name, ns, [{"name": "http", "port": 80, "targetPort": 8080}], selector={"app": name}
            )
        )
        addresses = [f"10.{1 + i // 250}.{i % 250}.{e + 1}" for e in range(endpoints)]
        objects.append(endpoint_slice(f"{name}-abcde", ns, name, addresses, 8080))
    return objects


async def serve_api(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO))
    from tests.control_plane.kube_api import FakeKubeApi

    api = FakeKubeApi(bookmark_interval=5.0, max_watch=3600.0)
    started = time.process_time()
    for obj in cluster_objects(args.services, args.endpoints, args.namespaces):
        api.create(obj)
    populate = time.process_time() - started
    await api.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(doc: dict[str, Any]) -> None:
        print(json.dumps(doc), flush=True)

    emit({"event": "ready", "port": api.port, "populate_cpu": populate})
    restarts = 0
    while line := (await reader.readline()).decode().strip():
        command, *params = line.split()
        if command == "restart-pod":  # service index: its last endpoint gets a new pod IP
            i = int(params[0])
            restarts += 1
            ns, name = f"ns{i % args.namespaces}", f"svc{i // args.namespaces}"

            def new_ip(obj: Any, n: int = restarts) -> None:
                obj["endpoints"][-1]["addresses"] = [f"10.200.{n // 250}.{n % 250 + 1}"]

            api.edit("EndpointSlice", ns, f"{name}-abcde", new_ip)
            emit({"event": "edited", "at": time.time(), "service": f"{name}.{ns}"})
        elif command == "mistakes":
            emit({"event": "mistakes", "mistakes": api.mistakes})
    await api.stop()


# -- the harness ------------------------------------------------------------------------------


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
        return body


def time_lists(base: str) -> float:
    """Seconds to list the three collections in pages of 500, as the source's reflectors do."""
    started = time.perf_counter()
    paths = ("/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/namespaces")
    for path in paths:
        token = ""
        while True:
            query = "?limit=500" + (f"&continue={token}" if token else "")
            token = json.loads(get(base + path + query))["metadata"].get("continue", "")
            if not token:
                break
    return time.perf_counter() - started


def build_seconds(http: str) -> tuple[float, int] | None:
    """The control plane's `outrigger_snapshot_build_seconds` sum and count over its kinds
    (None: a control plane without the metric)."""
    text = get(f"http://{http}/metrics").decode()
    found = re.findall(r"^outrigger_snapshot_build_seconds_(sum|count)\{[^}]*\} (\S+)$", text, re.M)
    if not found:
        return None
    total = sum(float(v) for k, v in found if k == "sum")
    return total, int(sum(float(v) for k, v in found if k == "count"))


def harness(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="k8s-scale-"))
    print(
        f"k8s_scale: {args.services} services x {args.endpoints} endpoints in "
        f"{args.namespaces} namespaces, {args.streams} streams over {args.processes} "
        f"load generators; load average {loadavg()}; logs in {work}"
    )
    api: Child | None = None
    cp: Child | None = None
    fleet: LoadFleet | None = None
    cp_log = (work / "control-plane.log").open("w")
    try:
        api = Child(
            [
                sys.executable,
                __file__,
                "--api",
                "--services",
                str(args.services),
                "--endpoints",
                str(args.endpoints),
                "--namespaces",
                str(args.namespaces),
            ],
            "the fake API server",
            stderr=(work / "api.log").open("w"),
        )
        ready = api.json(900)
        base = f"http://127.0.0.1:{ready['port']}"
        print(
            f"fake API server: {args.services} Services, {args.services} EndpointSlices "
            f"stored in {ready['populate_cpu']:.1f} s CPU (validated)"
        )
        for run in (1, 2):
            cpu0 = api.cpu_seconds()
            seconds = time_lists(base)
            print(
                f"  list of all three collections, paged by 500 (run {run}): {seconds:.2f} s, "
                f"API CPU {api.cpu_seconds() - cpu0:.2f} s [load {loadavg()}]"
            )
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: bench\n"
            f"clusters:\n- name: bench\n  cluster: {{server: '{base}'}}\n"
            "users:\n- name: bench\n  user: {}\n"
            "contexts:\n- name: bench\n  context: {cluster: bench, user: bench}\n"
        )
        api_cpu0 = api.cpu_seconds()
        started = time.perf_counter()
        cp = Child(
            [
                sys.executable,
                "-m",
                "outrigger.cli",
                "control-plane",
                "--kubernetes",
                "--kubeconfig",
                str(kubeconfig),
                "--xds",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
                *(["--max-streams", str(args.max_streams)] if args.max_streams else []),
            ],
            "the control plane",
            stderr=cp_log,
        )
        banner = cp.line(120)
        first = time.perf_counter() - started
        found = re.search(r"on [\d.]+:(\d+), HTTP on ([\d.]+:\d+)", banner)
        if not found:
            raise RuntimeError(f"control plane did not start: {banner!r}; see {work}")
        xds, http = f"127.0.0.1:{found.group(1)}", found.group(2)
        built = build_seconds(http)
        print(
            f"control plane: start -> first full snapshot served {first:.2f} s "
            + (f"(translate + encode {built[0]:.2f} s of it) " if built else "")
            + f"[load {loadavg()}]; API CPU meanwhile {api.cpu_seconds() - api_cpu0:.2f} s; "
            f"RSS {cp.rss_mib():.0f} MiB, CPU {cp.cpu_seconds():.1f} s"
        )

        cpu0 = cp.cpu_seconds()
        fleet = LoadFleet(
            xds,
            args.streams,
            processes=args.processes,
            channels=args.channels,
            namespaces=tuple(f"ns{n}" for n in range(args.namespaces)),
        )
        synced = fleet.synced()
        print(
            f"{synced.synced}/{synced.streams} streams synced in {synced.seconds:.1f} s "
            f"(control plane CPU {cp.cpu_seconds() - cpu0:.1f} s) [load {loadavg()}]"
            + (f"; failed: {synced.errors} {synced.first_errors}" if synced.errors else "")
        )
        time.sleep(2.0)
        cpu0, t0 = cp.cpu_seconds(), time.monotonic()
        time.sleep(5.0)
        idle = (cp.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        print(f"control plane at rest: RSS {cp.rss_mib():.0f} MiB, CPU {idle * 100:.1f}% of a core")

        rows = []
        for change in range(args.changes):
            time.sleep(1.0)
            fleet.mark()
            before = build_seconds(http)
            cp_cpu0, api_cpu0, gen_cpu0 = cp.cpu_seconds(), api.cpu_seconds(), fleet.cpu_seconds()
            api.send(f"restart-pod {(change * 37) % args.services}")
            edited = api.json(30)
            push = fleet.report(CHANGE_QUIET_S, 60)
            eds = push.latencies("EDS", edited["at"])
            others = {t: push.count(t) for t in ("LDS", "CDS", "RDS")}
            after = build_seconds(http)
            build = f"{(after[0] - before[0]) * 1000:.0f} ms" if before and after else "-"
            rows.append(eds)
            print(
                f"change {change + 1} ({edited['service']}): EDS ACKed by {len(eds)}/"
                f"{len(push.streams)} streams: p50 {statistics.median(eds) * 1000:.0f} ms, "
                f"p99 {pct(eds, 0.99) * 1000:.0f} ms, max {eds[-1] * 1000:.0f} ms; "
                f"other types pushed to {others}; build {build}; CPU: control plane "
                f"{cp.cpu_seconds() - cp_cpu0 - CHANGE_QUIET_S * idle:.2f} s, API "
                f"{api.cpu_seconds() - api_cpu0:.2f} s, generators "
                f"{fleet.cpu_seconds() - gen_cpu0:.2f} s [load {loadavg()}]"
            )
        every = sorted(x for r in rows for x in r)
        if every:
            print(
                f"all changes: p50 {statistics.median(every) * 1000:.0f} ms, "
                f"p99 {pct(every, 0.99) * 1000:.0f} ms, max {every[-1] * 1000:.0f} ms"
            )
        print(f"control plane RSS after the changes: {cp.rss_mib():.0f} MiB")
        time.sleep(SETTLE_S)
        print(f"control plane RSS {SETTLE_S:.0f} s later (settled): {cp.rss_mib():.0f} MiB")
        api.send("mistakes")
        mistakes = api.json(10)["mistakes"]
        if mistakes:
            print(f"the fake API server saw client mistakes: {mistakes[:5]}")
        return 0
    finally:
        stop_all(fleet, [cp, api], work, args.keep_workdir)
        cp_log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--channels", type=int, default=10, help="gRPC channels per generator")
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--max-streams", type=int, default=0, help="control plane --max-streams")
    parser.add_argument("--keep-workdir", action="store_true")
    parser.add_argument("--api", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.api:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_api(args))
        return 0
    return harness(args)


if __name__ == "__main__":
    sys.exit(main())
