"""xDS scale benchmark: N ADS streams against one control plane (not a pytest test).

    .venv/bin/python tests/bench/xds_scale.py [--streams 1000] [--channels 10] [--services 20]

Starts `outrigger control-plane` on a generated mesh file (a subprocess), and a load generator
(another subprocess) that opens N ADS streams with grpc.aio spread over several channels, each
behaving like a sidecar (LDS and CDS wildcard, RDS for "outbound", EDS for every cluster, ACK
everything). Once all N have ACKed the first version it measures the control plane's CPU over
10 s of steady state and its RSS, then changes a policy in the mesh file and measures, per
stream, the time from the edit to the ACK of the last response the change caused (p50, p99,
max). Every wait is bounded; both subprocesses are stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
QUIET_S = 1.0  # a push is over when no stream got a response for this long
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[2]


def mesh_yaml(services: int, timeout: str) -> str:
    lines = ["services:"]
    for i in range(services):
        lines += [
            f"  - name: svc{i}",
            "    namespace: default",
            "    port: 80",
            f'    endpoints: ["127.0.0.1:{20000 + 2 * i}", "127.0.0.1:{20001 + 2 * i}"]',
            "    policy:",
            f"      timeout: {timeout}",
            "      retries: {attempts: 2, retry_on: [connect-failure, reset]}",
        ]
    return "\n".join(lines) + "\n"


# -- the load generator (runs in its own process) ---------------------------------------------


class Stream:
    def __init__(self, index: int) -> None:
        self.index = index
        self.acked = False
        self.last_response = 0.0  # wall clock of the last response's ACK
        self.responses = 0


async def run_stream(channel: grpc.aio.Channel, stream: Stream, mark: dict[str, float]) -> None:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    method: Any = channel.stream_stream(
        ADS_METHOD,
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )
    call = method()
    node = base_pb2.Node(id=f"bench~{stream.index}", cluster="bench", user_agent_name="bench")
    node.metadata.update({"service": "bench", "namespace": "default"})
    names: dict[str, list[str]] = {LDS: [], CDS: [], RDS: ["outbound"]}
    await call.write(discovery_pb2.DiscoveryRequest(type_url=LDS, node=node))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=RDS, resource_names=["outbound"]))
    seen: set[str] = {LDS, CDS, RDS}
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            return
        t = response.type_url
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=t,
                version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=names.get(t, []),
            )
        )
        stream.responses += 1
        stream.last_response = time.time()
        if t == CDS:
            clusters = []
            for packed in response.resources:
                c = cluster_pb2.Cluster()
                packed.Unpack(c)
                clusters.append(c.eds_cluster_config.service_name or c.name)
            if sorted(clusters) != names.get(EDS):
                names[EDS] = sorted(clusters)
                await call.write(
                    discovery_pb2.DiscoveryRequest(type_url=EDS, resource_names=names[EDS])
                )
                seen.add(EDS)
        if not stream.acked and seen == {LDS, CDS, RDS, EDS} and t == EDS:
            stream.acked = True


async def loadgen(address: str, streams: int, channels: int) -> None:
    chans = [
        grpc.aio.insecure_channel(address, options=[("outrigger.bench.channel", i)])
        for i in range(channels)
    ]
    state = [Stream(i) for i in range(streams)]
    mark: dict[str, float] = {}
    tasks = [
        asyncio.create_task(run_stream(chans[i % channels], s, mark)) for i, s in enumerate(state)
    ]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    start = time.time()
    async with asyncio.timeout(120):
        while not all(s.acked for s in state):
            await asyncio.sleep(0.05)
    print(json.dumps({"event": "synced", "seconds": time.time() - start}), flush=True)
    # Commands from the parent: "mark T0" -> report per-stream last-ACK latency after T0.
    while line := (await reader.readline()).decode().strip():
        command, _, arg = line.partition(" ")
        if command != "mark":
            continue
        t0 = float(arg)
        before = {s.index: s.responses for s in state}
        async with asyncio.timeout(60):
            while True:
                await asyncio.sleep(0.1)
                if all(s.responses > before[s.index] for s in state) and (
                    time.time() - max(s.last_response for s in state) > QUIET_S
                ):
                    break
        latencies = sorted(s.last_response - t0 for s in state)
        print(json.dumps({"event": "pushed", "latencies": latencies}), flush=True)
    for task in tasks:
        task.cancel()
    for ch in chans:
        await ch.close(None)


# -- the harness ------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load generator exited ({proc.poll()})")
        with contextlib.suppress(json.JSONDecodeError):
            doc: dict[str, Any] = json.loads(line)
            return doc
    raise TimeoutError("no answer from the load generator")


def pct(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def harness(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="xds-scale-"))
    mesh = work / "mesh.yaml"
    mesh.write_text(mesh_yaml(args.services, "2s"))
    cp_log = (work / "control-plane.log").open("w")
    cp = subprocess.Popen(
        [sys.executable, "-m", "outrigger.cli", "control-plane", "--mesh", str(mesh),
         "--xds", "127.0.0.1:0", "--http", "127.0.0.1:0"],
        stdout=subprocess.PIPE, stderr=cp_log, text=True, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    gen: subprocess.Popen[str] | None = None
    try:
        assert cp.stdout is not None
        banner = cp.stdout.readline()
        found = re.search(r"on [\d.]+:(\d+), HTTP on [\d.]+:(\d+)", banner)
        if not found:
            raise RuntimeError(f"control plane did not start: {banner!r}; see {work}")
        xds_port = int(found.group(1))
        gen = subprocess.Popen(
            [sys.executable, __file__, "--loadgen", f"127.0.0.1:{xds_port}",
             "--streams", str(args.streams), "--channels", str(args.channels)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
            start_new_session=True,
        )  # fmt: skip
        synced = read_json_line(gen, 150)
        print(f"{args.streams} streams synced in {synced['seconds']:.2f} s")
        time.sleep(1.0)
        cpu0, t0 = proc_cpu_seconds(cp.pid), time.monotonic()
        time.sleep(10.0)
        cpu = (proc_cpu_seconds(cp.pid) - cpu0) / (time.monotonic() - t0)
        rss = proc_rss_mib(cp.pid)
        print(f"control plane steady state: CPU {cpu * 100:.1f}% of one core, RSS {rss:.1f} MiB")
        assert gen.stdin is not None
        for round_, timeout in enumerate(("3s", "4s", "5s"), 1):
            edit = time.time()
            gen.stdin.write(f"mark {edit}\n")
            gen.stdin.flush()
            mesh.write_text(mesh_yaml(args.services, timeout))
            pushed = read_json_line(gen, 90)
            lat = pushed["latencies"]
            print(
                f"push {round_} (timeout -> {timeout}): edit -> all {len(lat)} ACKed: "
                f"p50 {statistics.median(lat) * 1000:.0f} ms, p99 {pct(lat, 0.99) * 1000:.0f} ms,"
                f" max {lat[-1] * 1000:.0f} ms"
            )
        print(f"control plane RSS after pushes: {proc_rss_mib(cp.pid):.1f} MiB")
        return 0
    finally:
        for p in (gen, cp):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(5)
        cp_log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--services", type=int, default=20)
    parser.add_argument("--loadgen", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        asyncio.run(loadgen(args.loadgen, args.streams, args.channels))
        return 0
    return harness(args)


if __name__ == "__main__":
    sys.exit(main())
