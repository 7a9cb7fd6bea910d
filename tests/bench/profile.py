"""Where a request's time goes in the sidecar: cProfile over a fixed request count.

    .venv/bin/python tests/bench/profile.py [--rows outrigger,outrigger-policy]
                                            [--requests 20000] [--top 30]

The same rows and requests as cost.py (rows.py, `Host: upstream`, sequential keep-alive GETs),
with the sidecar run under `python -m cProfile`; when the requests are done the sidecar is
stopped (SIGTERM: it drains and exits, and cProfile writes its stats) and the functions with
the most time of their own are printed, with their share of the total. cProfile adds a fixed
cost per Python call, so read the table for where the calls are, and cost.py for how much a
change saves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pstats
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import rows
from cost import bench_env, send
from processes import BenchError

DEFAULT_ROWS = ("outrigger", "outrigger-policy")
EXIT_TIMEOUT_S = 60.0  # for the sidecar to drain and exit under cProfile


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="sidecar rows from rows.py")
    p.add_argument("--requests", type=int, default=20000, help="profiled requests")
    p.add_argument("--warmup", type=int, default=1000, help="requests before (profiled too)")
    p.add_argument("--top", type=int, default=30, help="functions to print")
    p.add_argument("--outrigger", type=Path, default=rows.OUTRIGGER)
    return p.parse_args(argv)


def profile(row: rows.Row, env: rows.Env, args: argparse.Namespace) -> None:
    out = env.workdir / f"{row.name}.prof"
    python = args.outrigger.with_name("python")
    env.sidecar_wrapper = (str(python), "-m", "cProfile", "-o", str(out))
    started = len(env.group.procs)
    target = row.start(env)
    try:
        send(target, args.warmup + args.requests, 1, env.body)
    finally:
        for proc in env.group.procs[started:][::-1]:
            # SIGTERM to the sidecar alone: it drains, stops its exporter (a tracing row's
            # flush to a dead collector takes seconds) and exits, and cProfile writes; the
            # group's stop would signal the exporter too and kill the sidecar before that.
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=EXIT_TIMEOUT_S)
            env.group.stop(proc)
    if not out.exists():
        raise BenchError(f"{row.name}: cProfile wrote no stats (did the sidecar exit cleanly?)")
    stats = pstats.Stats(str(out))
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    per_request = total * 1e6 / (args.warmup + args.requests)
    print(f"\n{row.name}: {per_request:.1f} profiled µs/request (cProfile's own cost included)")
    entries = sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: item[1][2],
        reverse=True,
    )
    print(f"{'own %':>6} {'calls/req':>9}  function")
    for (filename, line, name), (_, calls, own, _, _) in entries[: args.top]:
        where = f"{Path(filename).name}:{line}" if line else filename
        share = 100 * own / total
        print(f"{share:6.1f} {calls / (args.warmup + args.requests):9.2f}  {name} ({where})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("nginx") is None:
        print("missing tools: nginx", file=sys.stderr)
        return 2
    env = bench_env("outrigger-profile-", args.outrigger)
    workdir = env.workdir
    print(f"{args.requests} requests after {args.warmup}, {time.strftime('%Y-%m-%d %H:%M')}")
    try:
        _, env.upstream_port = rows.start_upstream(env)
        for name in args.rows.split(","):
            profile(rows.by_name()[name], env, args)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        env.group.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
