"""Outrigger's benchmark: the sidecar against nginx and HAProxy, same machine, same run.

    .venv/bin/python tests/bench/run.py [--duration 10] [--connections 32,256]
                                        [--rows direct,nginx,...] [--markdown]

One nginx upstream (1 worker, fixed 1 KiB body at `/`) serves every row. For each row (see
rows.py) the harness starts the proxy under test, waits until it really proxies our body,
measures its idle RSS, runs `wrk -t1 -c{N} -d{D}s --latency` for each connection count (after
a short unrecorded warm-up at the same N), reads the proxy's CPU time and peak RSS over each
load window from /proc, opens 1,000 idle TCP connections to it and reads its RSS, then stops it.
Results go to stdout (table) and tests/bench/results/latest.json (everything, with wrk's raw
output). See README.md for how each number is computed.

CPU pinning (the default, `--pin wrk=1,proxy=0,upstream=1`): the machine this was written on
has 2 cores, and wrk, the proxy and the upstream all compete for them. Every row gets the same
layout: the proxy under test alone on CPU 0; the test rig (wrk and the upstream nginx) on CPU 1.
So each proxy is measured with one whole core of its own, which is what a sidecar gets from a
`proxy-cpu: 1` limit, and the rig is identical for every row. The `direct` row (wrk straight to
the upstream, CPU 0 idle) is then the rig's own ceiling: a proxy row close to it is limited by
the rig, not by the proxy. Measured alternative: proxy and upstream sharing CPU 0 with wrk alone
on CPU 1 held nginx to ~33k req/s at 32 connections against ~45k here, because the upstream eats
part of the proxy's core, and a fast proxy loses more to that than a slow one (it would flatter
Outrigger's ratios). CPU-µs per request does not depend on the layout and is the fairer
efficiency number. `--pin none` lets the scheduler decide; any layout can be given explicitly.
Without taskset or with fewer than 2 CPUs the harness runs unpinned and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import report
import rows
import wrk
from processes import (
    BenchError,
    ProcessGroup,
    RssSampler,
    cpu_seconds,
    hwm_kib,
    loop_pauses,
    rss_kib,
)

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"
IDLE_CONNECTIONS = 1000
IDLE_SETTLE_S = 1.0
DEFAULT_PIN = "wrk=1,proxy=0,upstream=1"


def parse_pins(text: str) -> rows.Pins | None:
    if text == "none":
        return None
    parts = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(parts) - {"wrk", "proxy", "upstream"}
    if unknown or len(parts) != 3:
        raise argparse.ArgumentTypeError("expected wrk=CPUS,proxy=CPUS,upstream=CPUS or none")
    return rows.Pins(wrk=parts["wrk"], proxy=parts["proxy"], upstream=parts["upstream"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run (10)")
    p.add_argument("--warmup", type=float, default=2.0, help="unrecorded warm-up seconds (2)")
    p.add_argument("--connections", default="32,256", help="comma list (32,256)")
    p.add_argument(
        "--rows",
        default=",".join(rows.DEFAULT_ROWS),
        help=f"comma list of rows (default {','.join(rows.DEFAULT_ROWS)}); see --list-rows",
    )
    p.add_argument("--list-rows", action="store_true", help="print the row catalogue and exit")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--pin", default=DEFAULT_PIN, help=f"taskset layout or 'none' ({DEFAULT_PIN})")
    p.add_argument("--idle-connections", type=int, default=IDLE_CONNECTIONS)
    p.add_argument(
        "--nginx-keepalive",
        type=int,
        default=rows.NGINX_UPSTREAM_KEEPALIVE,
        help=f"nginx proxy's upstream keepalive ({rows.NGINX_UPSTREAM_KEEPALIVE}); see rows.py",
    )
    p.add_argument(
        "--outrigger", type=Path, default=rows.OUTRIGGER, help="the outrigger executable"
    )
    p.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs and logs")
    args = p.parse_args(argv)
    args.connection_counts = [int(c) for c in args.connections.split(",") if c]
    args.row_names = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.row_names if r not in rows.by_name()]
    if unknown:
        p.error(f"unknown rows {unknown}; known: {', '.join(rows.by_name())}")
    try:
        args.pins = parse_pins(args.pin)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        p.error(f"--pin: {exc}")
    return args


def effective_pins(requested: rows.Pins | None) -> tuple[rows.Pins | None, str | None]:
    if requested is None:
        return None, None
    if shutil.which("taskset") is None:
        return None, "taskset not found: running unpinned"
    if (os.cpu_count() or 1) < 2:
        return None, "fewer than 2 CPUs: running unpinned"
    return requested, None


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE (children inherit it). Returns the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def idle_connections_rss(listen: tuple[str, int], pid: int, count: int) -> dict[str, Any]:
    """Open `count` TCP connections (no request sent) and read the process's RSS."""
    socks: list[socket.socket] = []
    error: str | None = None
    try:
        for _ in range(count):
            try:
                s = socket.create_connection(listen, timeout=2.0)
            except OSError as exc:
                error = f"connection {len(socks) + 1} failed: {exc}"
                break
            socks.append(s)
        time.sleep(IDLE_SETTLE_S)  # let the proxy accept and set up every connection
        rss = rss_kib(pid)
        # A connection the proxy closed while we waited is readable with b"" (EOF).
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1, socket.MSG_PEEK) == b"":
                    closed += 1
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return {
            "requested": count,
            "opened": len(socks),
            "closed_by_peer": closed,
            "rss_kib": rss,
            "error": error,
        }
    finally:
        for s in socks:
            s.close()


def keepalive_probe(listen: tuple[str, int], host: str | None) -> dict[str, Any]:
    """Two GETs on one connection: does the proxy keep client connections open? (wrk reconnects
    silently when it does not, and connection setup then dominates the row.)"""
    conn = http.client.HTTPConnection(*listen, timeout=2.0)
    headers = {"Host": host} if host else {}
    try:
        conn.request("GET", "/", headers=headers)
        first = conn.getresponse()
        first.read()
        sock_before = conn.sock
        conn.request("GET", "/", headers=headers)
        second = conn.getresponse()
        second.read()
        return {
            "first_connection_header": first.getheader("Connection"),
            "first_will_close": first.will_close,
            "second_status": second.status,
            "same_socket": sock_before is not None and conn.sock is sock_before,
        }
    except (OSError, http.client.HTTPException) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        conn.close()


def measure_row(
    row: rows.Row, env: rows.Env, args: argparse.Namespace, script: Path
) -> dict[str, Any]:
    result: dict[str, Any] = {"name": row.name, "description": row.description, "runs": []}
    started = len(env.group.procs)
    try:
        target = row.start(env)
    except BenchError as exc:
        result.update(status="failed", error=str(exc))
        _stop_started(env, started)
        return result
    measured = target.measured
    try:
        result["measured_process"] = measured.name if measured else None
        result["keepalive_probe"] = keepalive_probe(target.listen, target.host)
        if measured is not None:
            time.sleep(0.5)
            result["idle_rss_kib"] = rss_kib(measured.pid)
        wrk_cpus = env.pins.wrk
        for n in args.connection_counts:
            run: dict[str, Any] = {"connections": n}
            result["runs"].append(run)
            try:
                stalls = target.stats_url
                if stalls is not None:
                    loop_pauses(stalls)  # reset: the next read covers the warm-up only
                if args.warmup > 0:
                    wrk.run_wrk(
                        target.url,
                        connections=n,
                        duration_s=args.warmup,
                        script=script,
                        host=target.host,
                        cpus=wrk_cpus,
                    )
                if stalls is not None:
                    run["warmup"] = loop_pauses(stalls).to_json()
                cpu0 = cpu_seconds(measured.pid) if measured else None
                with contextlib.ExitStack() as stack:
                    sampler = stack.enter_context(RssSampler(measured.pid)) if measured else None
                    w = wrk.run_wrk(
                        target.url,
                        connections=n,
                        duration_s=args.duration,
                        script=script,
                        host=target.host,
                        cpus=wrk_cpus,
                    )
                if stalls is not None:
                    run.update(loop_pauses(stalls).to_json())
                if measured is not None and cpu0 is not None:
                    if not measured.alive():
                        raise BenchError(
                            f"{measured.name} died during the load: {measured.output_tail()}"
                        )
                    cpu_s = cpu_seconds(measured.pid) - cpu0
                    run["cpu_seconds"] = cpu_s
                    run["cpu_us_per_request"] = cpu_s * 1e6 / w.requests if w.requests else None
                    run["peak_rss_kib"] = sampler.peak_kib if sampler else None
                run["wrk"] = w.to_json()
                # Little's law: requests in flight on average. Far below N means connections sat
                # idle (reconnecting, or the proxy serialising requests), not that it is fast.
                run["mean_in_flight"] = w.requests_per_s * w.mean_us / 1e6
            except BenchError as exc:
                run["error"] = str(exc)
        if measured is not None and args.idle_connections > 0:
            result["idle_connections"] = idle_connections_rss(
                target.listen, measured.pid, args.idle_connections
            )
            result["hwm_kib"] = hwm_kib(measured.pid)
        result["status"] = "ok"
    except BenchError as exc:
        result.update(status="failed", error=str(exc))
    finally:
        _stop_started(env, started)
    return result


def _stop_started(env: rows.Env, keep: int) -> None:
    """Stop the processes a row started (everything after the first `keep`)."""
    for proc in env.group.procs[keep:][::-1]:
        env.group.stop(proc)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_rows:
        for r in rows.ROWS:
            default = " (default)" if r.name in rows.DEFAULT_ROWS else ""
            print(f"{r.name:24} {r.description}{default}")
        return 0
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if "haproxy" in args.row_names and shutil.which("haproxy") is None:
        missing.append("haproxy")
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install nginx haproxy wrk)")
        return 2

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    nofile = raise_nofile(max(4 * args.idle_connections, 16384))
    pins, pin_note = effective_pins(args.pins)
    if pin_note:
        print(pin_note, file=sys.stderr)

    workdir = Path(tempfile.mkdtemp(prefix="outrigger-bench-"))
    group = ProcessGroup(workdir=workdir)
    env = rows.Env(
        group=group,
        workdir=workdir,
        pins=pins or rows.Pins(wrk=None, proxy=None, upstream=None),
        body=rows.make_body(),
        nginx_keepalive=args.nginx_keepalive,
        outrigger=args.outrigger,
    )
    config: dict[str, Any] = {
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "connections": args.connection_counts,
        "rows": args.row_names,
        "pins": None if pins is None else vars(pins),
        "idle_connections": args.idle_connections,
        "nginx_upstream_keepalive": args.nginx_keepalive,
        "outrigger": str(args.outrigger),
        "body_bytes": len(env.body),
        "rlimit_nofile": list(nofile),
    }
    machine = report.machine()
    results: list[dict[str, Any]] = []
    interrupted = False
    try:
        script = wrk.write_script(workdir)
        upstream, env.upstream_port = rows.start_upstream(env)
        for name in args.row_names:
            row = rows.by_name()[name]
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results.append(measure_row(row, env, args, script))
            if results[-1]["status"] != "ok":
                print(f"[bench] {name} FAILED: {results[-1]['error']}", file=sys.stderr)
            if not upstream.alive():
                raise BenchError(f"upstream nginx died: {upstream.output_tail()}")
    except KeyboardInterrupt:
        interrupted = True
        print("[bench] interrupted; stopping every process", file=sys.stderr)
    except BenchError as exc:
        print(f"[bench] aborted: {exc}", file=sys.stderr)
        interrupted = True
    finally:
        group.close()
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"[bench] configs and logs kept in {workdir}", file=sys.stderr)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {"machine": machine, "config": config, "complete": not interrupted, "rows": results},
            indent=2,
        )
        + "\n"
    )
    header = report.machine_line(machine, config)
    if interrupted:
        header += " [INCOMPLETE: run interrupted]"
    print(report.render(results, header, markdown=args.markdown))
    print(f"\n[bench] JSON: {args.output}", file=sys.stderr)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
