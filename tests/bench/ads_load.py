"""ADS load: N sidecar-like xDS streams spread over several load-generator processes.

A load generator is its own process (`python tests/bench/ads_load.py --address ...`), so the
streams of a benchmark can be spread over several of them and the generator's CPU never stands
in for the control plane's. `LoadFleet` (used by xds_scale.py and k8s_scale.py) starts them,
talks to them over stdin/stdout (one JSON object per line) and merges what they report.

Each stream behaves like a sidecar: the first request carries a node whose metadata names its
namespace (streams are spread over the namespaces given), LDS and CDS wildcard, RDS for
`outbound`, EDS for every cluster CDS names, and an ACK for every response. A stream is synced
once it has ACKed all four types. A stream the control plane ends (an RPC error or a close) is
recorded with the status code and, with `--retry`, reopened after the sidecar's own backoff
(full jitter, 0.25 s doubling to 10 s, reset by a response), as `sidecar/xds/client.py` does.

Commands on stdin: `mark` (forget what was received so far), `report QUIET TIMEOUT` (wait until
every synced stream received a response since the mark and none for QUIET seconds, at most
TIMEOUT seconds; then print, per stream, the wall-clock time of its last ACK of each type).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

ADS_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
SHORT = {LDS: "LDS", RDS: "RDS", CDS: "CDS", EDS: "EDS"}
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- one load generator (its own process) -----------------------------------------------------


@dataclass
class Stream:
    index: int
    namespace: str
    synced_at: float | None = None  # wall clock of the ACK that completed the first sync
    opened: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    first_error: str = ""
    since_mark: dict[str, float] = field(default_factory=dict)  # type -> last ACK time
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    last_response: float = 0.0


_CLUSTER_NAMES: dict[str, list[str]] = {}  # CDS version -> EDS names (every stream shares it)


def cluster_names(response: Any) -> list[str]:
    from envoy.config.cluster.v3 import cluster_pb2

    found = _CLUSTER_NAMES.get(response.version_info)
    if found is None:
        names = []
        for packed in response.resources:
            cluster = cluster_pb2.Cluster()
            packed.Unpack(cluster)
            if cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS:
                names.append(cluster.eds_cluster_config.service_name or cluster.name)
        found = _CLUSTER_NAMES[response.version_info] = sorted(names)
    return found


async def run_stream(channel: grpc.aio.Channel, stream: Stream) -> None:
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    method: Any = channel.stream_stream(
        ADS_METHOD,
        request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
    )
    call = method()
    stream.opened += 1
    node = base_pb2.Node(id=f"bench~{stream.index}", cluster="bench", user_agent_name="bench")
    node.metadata.update({"service": "bench", "namespace": stream.namespace})
    names: dict[str, list[str]] = {LDS: [], CDS: [], RDS: ["outbound"]}
    await call.write(discovery_pb2.DiscoveryRequest(type_url=LDS, node=node))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS))
    await call.write(discovery_pb2.DiscoveryRequest(type_url=RDS, resource_names=["outbound"]))
    acked: set[str] = set()
    while True:
        response = await call.read()
        if response is grpc.aio.EOF:  # type: ignore[attr-defined]
            return
        type_url = response.type_url
        await call.write(
            discovery_pb2.DiscoveryRequest(
                type_url=type_url,
                version_info=response.version_info,
                response_nonce=response.nonce,
                resource_names=names.get(type_url, []),
            )
        )
        now = time.time()
        stream.last_response = now
        label = SHORT.get(type_url, type_url)
        stream.since_mark[label] = now
        stream.counts[label] += 1
        acked.add(type_url)
        if type_url == CDS:
            clusters = cluster_names(response)
            if clusters != names.get(EDS):
                names[EDS] = clusters
                request = discovery_pb2.DiscoveryRequest(type_url=EDS, resource_names=clusters)
                await call.write(request)
        if stream.synced_at is None and acked >= {LDS, CDS, RDS, EDS}:
            stream.synced_at = now


async def keep_stream(channel: grpc.aio.Channel, stream: Stream, retry: bool) -> None:
    attempt = 0
    while True:
        synced_before = stream.synced_at
        try:
            await run_stream(channel, stream)
            stream.errors["closed"] += 1
        except grpc.aio.AioRpcError as exc:
            stream.errors[exc.code().name] += 1
            if not stream.first_error:
                stream.first_error = f"{exc.code().name}: {exc.details()}"
        if not retry:
            return
        if stream.synced_at is not None and stream.synced_at != synced_before:
            attempt = 0
        await asyncio.sleep(random.uniform(0, min(10.0, 0.25 * 2**attempt)))
        attempt += 1


async def generator(args: argparse.Namespace) -> None:
    namespaces = args.namespaces.split(",")
    channels = [
        grpc.aio.insecure_channel(args.address, options=[("outrigger.bench.channel", i)])
        for i in range(args.channels)
    ]
    streams = [
        Stream(i, namespaces[i % len(namespaces)])
        for i in range(args.first, args.first + args.count)
    ]
    tasks = [
        asyncio.create_task(keep_stream(channels[i % len(channels)], s, args.retry))
        for i, s in enumerate(streams)
    ]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def emit(doc: dict[str, Any]) -> None:
        print(json.dumps(doc), flush=True)

    start = time.time()
    deadline = loop.time() + args.sync_timeout

    def settled(s: Stream) -> bool:  # synced, or refused and not coming back
        return s.synced_at is not None or (not args.retry and sum(s.errors.values()) > 0)

    while loop.time() < deadline and not all(settled(s) for s in streams):
        await asyncio.sleep(0.05)
    emit(
        {
            "event": "synced",
            "start": start,
            "streams": len(streams),
            "synced": [s.synced_at for s in streams if s.synced_at is not None],
            "errors": dict(sum((s.errors for s in streams), collections.Counter())),
            "first_errors": sorted({s.first_error for s in streams if s.first_error})[:5],
        }
    )
    while line := (await reader.readline()).decode().strip():
        command, *params = line.split()
        if command == "mark":
            for s in streams:
                s.since_mark.clear()
            emit({"event": "marked"})
        elif command == "report":
            quiet, timeout = float(params[0]), float(params[1])
            live = [s for s in streams if s.synced_at is not None]
            until = loop.time() + timeout
            while loop.time() < until:
                await asyncio.sleep(0.05)
                if all(s.since_mark for s in live) and (
                    time.time() - max((s.last_response for s in live), default=0.0) > quiet
                ):
                    break
            emit(
                {
                    "event": "report",
                    "streams": [dict(s.since_mark) for s in live],
                    "errors": dict(sum((s.errors for s in streams), collections.Counter())),
                    "reconnects": sum(max(0, s.opened - 1) for s in streams),
                }
            )
    for task in tasks:
        task.cancel()
    for channel in channels:
        await channel.close(None)


# -- the fleet (used by the harnesses) --------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def loadavg() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Child:
    """A child process in its own session, stdout read line by line on a thread (so every wait
    for an answer is bounded), stdin for commands; `stop()` ends its process group."""

    def __init__(self, argv: list[str], what: str, *, stderr: Any = None) -> None:
        self.what = what
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line)
        self.lines.put(None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no answer from {self.what} within {timeout:g}s") from None
        if line is None:
            raise RuntimeError(f"{self.what} exited ({self.popen.wait(5)})")
        return line

    def json(self, timeout: float) -> dict[str, Any]:
        """The next JSON line (other lines are skipped), within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.line(max(0.0, deadline - time.monotonic()))
            with contextlib.suppress(json.JSONDecodeError):
                doc: dict[str, Any] = json.loads(line)
                return doc

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        return proc_rss_mib(self.pid)

    def stop(self) -> None:
        """SIGTERM to the process's own group, 5 s, then SIGKILL."""
        if self.popen.poll() is not None:
            return
        os.killpg(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(5)


@dataclass
class Synced:
    seconds: float  # from the first generator's start to the last stream's sync
    synced: int
    streams: int
    errors: dict[str, int]
    first_errors: list[str]


@dataclass
class Push:
    """Per synced stream, the last ACK time of each type after the mark."""

    streams: list[dict[str, float]]
    errors: dict[str, int]
    reconnects: int

    def latencies(self, label: str, since: float) -> list[float]:
        return sorted(s[label] - since for s in self.streams if label in s)

    def count(self, label: str) -> int:
        return sum(1 for s in self.streams if label in s)


class LoadFleet:
    """`processes` load generators sharing `streams` streams; stopped by `close()`."""

    def __init__(
        self,
        address: str,
        streams: int,
        *,
        processes: int = 1,
        channels: int = 10,
        namespaces: tuple[str, ...] = ("default",),
        retry: bool = False,
        sync_timeout: float = 300.0,
    ) -> None:
        self.sync_timeout = sync_timeout
        self.procs: list[Child] = []
        per = [streams // processes + (i < streams % processes) for i in range(processes)]
        first = 0
        for count in per:
            argv = [sys.executable, str(HERE / "ads_load.py"), "--address", address,
                    "--first", str(first), "--count", str(count), "--channels", str(channels),
                    "--namespaces", ",".join(namespaces),
                    "--sync-timeout", str(sync_timeout)]  # fmt: skip
            if retry:
                argv.append("--retry")
            self.procs.append(Child(argv, f"load generator {len(self.procs)}"))
            first += count

    def _send(self, line: str) -> None:
        for proc in self.procs:
            proc.send(line)

    def synced(self) -> Synced:
        docs = [p.json(self.sync_timeout + 60) for p in self.procs]
        start = min(d["start"] for d in docs)
        times = [t for d in docs for t in d["synced"]]
        errors: collections.Counter[str] = collections.Counter()
        for d in docs:
            errors.update(d["errors"])
        return Synced(
            seconds=(max(times) - start) if times else float("nan"),
            synced=len(times),
            streams=sum(d["streams"] for d in docs),
            errors=dict(errors),
            first_errors=sorted({e for d in docs for e in d["first_errors"]})[:5],
        )

    def mark(self) -> None:
        self._send("mark")
        for proc in self.procs:
            proc.json(30)

    def report(self, quiet: float = 1.0, timeout: float = 60.0) -> Push:
        self._send(f"report {quiet} {timeout}")
        docs = [p.json(timeout + 30) for p in self.procs]
        errors: collections.Counter[str] = collections.Counter()
        for d in docs:
            errors.update(d["errors"])
        return Push(
            streams=[s for d in docs for s in d["streams"]],
            errors=dict(errors),
            reconnects=sum(d["reconnects"] for d in docs),
        )

    def cpu_seconds(self) -> float:
        return sum(p.cpu_seconds() for p in self.procs)

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()


def stop_all(
    fleet: LoadFleet | None, children: list[Child | None], work: Path, keep_workdir: bool
) -> None:
    """The harnesses' `finally`: the load generators, then the other children in order, then
    the work folder unless kept."""
    if fleet is not None:
        fleet.close()
    for child in children:
        if child is not None:
            child.stop()
    if not keep_workdir:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--namespaces", default="default")
    parser.add_argument("--sync-timeout", type=float, default=300.0)
    parser.add_argument("--retry", action="store_true")
    asyncio.run(generator(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
