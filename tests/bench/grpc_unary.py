"""gRPC unary calls through one sidecar vs direct: calls/s, p50/p99 latency, sidecar CPU-µs/call.

    .venv/bin/python tests/bench/grpc_unary.py [--calls 4000] [--concurrency 16] [--size 100]

Three processes per row, each started here and stopped at the end: a grpc.aio echo server
(`--serve`), the load client (`--load`: grpc.aio, `--concurrency` calls in flight on one
channel, a fixed number of calls, every call's latency recorded), and for the sidecar row an
`outrigger sidecar` whose outbound listener routes `echo:50051` (declared `protocol: grpc`) to
the server over h2c. Rows: `direct` (client -> server) and `outrigger` (client -> sidecar ->
server). The sidecar's CPU time is read from /proc before and after the calls: CPU-µs per call
is the figure that does not depend on how busy the machine is (the client and the server run
in Python too and share the cores, so calls/s and latency are indicative only).

Nothing here is a pass/fail check; the numbers go into tests/bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from processes import BenchError, ProcessGroup, cpu_seconds, free_port, http_get, wait_until
from rows import OUTRIGGER

METHOD = "/bench.Echo/Unary"
AUTHORITY = "echo:50051"
READY_TIMEOUT_S = 30.0


# --- the server and the load client (run as child processes of this script) -----------------


async def serve(port: int) -> None:
    import grpc
    import grpc.aio

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


async def load(target: str, calls: int, concurrency: int, size: int) -> dict[str, float]:
    import grpc.aio

    options = [("grpc.default_authority", AUTHORITY)]
    latencies: list[float] = []
    payload = b"x" * size
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        unary = channel.unary_unary(METHOD)
        for _ in range(50):  # warm-up: connections, HPACK tables
            await unary(payload, timeout=10)
        remaining = calls

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                answer = await unary(payload, timeout=10)
                latencies.append(time.perf_counter() - started)
                assert answer == payload

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "calls": len(latencies),
        "seconds": elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))],
    }


# --- the harness ----------------------------------------------------------------------------


def run_load(target: str, args: argparse.Namespace) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--load",
            target,
            "--calls",
            str(args.calls),
            "--concurrency",
            str(args.concurrency),
            "--size",
            str(args.size),
        ],
        capture_output=True,
        check=False,
        timeout=300,
    )
    if out.returncode != 0:
        raise BenchError(f"load client failed: {out.stderr.decode()[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="grpc-bench-") as tmp:
        workdir = Path(tmp)
        group = ProcessGroup(workdir)
        try:
            port = free_port()
            server = group.start("server", [sys.executable, __file__, "--serve", str(port)])
            wait_until(
                server,
                lambda: None if "serving" in server.log_path.read_text() else "starting",
                timeout_s=READY_TIMEOUT_S,
                what="the gRPC server",
            )
            mesh = workdir / "mesh.yaml"
            service = {
                "name": "echo",
                "port": 50051,
                "protocol": "grpc",
                "endpoints": [f"127.0.0.1:{port}"],
            }
            mesh.write_text(yaml.safe_dump({"services": [service]}))
            outbound, admin = free_port(), free_port()
            sidecar = group.start(
                "sidecar",
                [
                    str(args.outrigger),
                    "sidecar",
                    "--mesh",
                    str(mesh),
                    "--service",
                    "bench",
                    "--outbound",
                    f"127.0.0.1:{outbound}",
                    "--inbound",
                    f"127.0.0.1:{free_port()}",
                    "--admin",
                    f"127.0.0.1:{admin}",
                ],
            )
            wait_until(
                sidecar,
                lambda: (
                    None
                    if http_get(f"http://127.0.0.1:{admin}/ready").status == 200
                    else "not ready"
                ),
                timeout_s=READY_TIMEOUT_S,
                what="the sidecar",
            )
            rows = [
                ("direct", f"127.0.0.1:{port}", None),
                ("outrigger", f"127.0.0.1:{outbound}", sidecar.pid),
            ]
            print(
                f"{args.calls} unary calls of {args.size} bytes, {args.concurrency} in flight, "
                f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
            )
            print("| row | calls/s | p50 ms | p99 ms | sidecar CPU-µs/call |")
            print("|---|---|---|---|---|")
            for name, target, pid in rows:
                before = cpu_seconds(pid) if pid is not None else 0.0
                result = run_load(target, args)
                cpu = cpu_seconds(pid) - before if pid is not None else None
                per_call = f"{1e6 * cpu / result['calls']:.0f}" if cpu is not None else "-"
                print(
                    f"| {name} | {result['calls'] / result['seconds']:.0f} | "
                    f"{result['p50_ms']:.2f} | {result['p99_ms']:.2f} | {per_call} |"
                )
        finally:
            group.close()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=4000, help="measured calls per row")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight")
    p.add_argument("--size", type=int, default=100, help="message bytes")
    p.add_argument("--outrigger", type=Path, default=OUTRIGGER)
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--load", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.serve is not None:
        asyncio.run(serve(arguments.serve))
    elif arguments.load is not None:
        result = asyncio.run(
            load(arguments.load, arguments.calls, arguments.concurrency, arguments.size)
        )
        print(json.dumps(result))
    else:
        main(arguments)
