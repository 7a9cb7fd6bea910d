"""What one request costs the sidecar: CPU-µs, or instructions under callgrind, per request.

    .venv/bin/python tests/bench/cost.py [--rows outrigger,outrigger-policy]
                                         [--requests 20000] [--repeat 3]
    .venv/bin/python tests/bench/cost.py --callgrind [--requests 2000]
    .venv/bin/python tests/bench/cost.py --syscalls [--rows outrigger,python-floor-task]
    .venv/bin/python tests/bench/cost.py --callgrind --wrk-connections 32,256 [--cache-sim]

For comparing two versions of the code on a busy machine, where req/s from `run.py` is noise:
a fixed number of requests, not a fixed duration, so the figure does not depend on how fast
the machine is right now. Same upstream and rows as run.py (rows.py). For each row the harness
starts the sidecar, sends `--warmup` requests, then `--requests` sequential GETs (`Host:
upstream`, keep-alive) over `--connections` connections, one after another, and reads

- CPU time: utime + stime of the sidecar from /proc before and after (10 ms ticks, so use
  enough requests), `--repeat` times on the same process; the table shows the least and the
  median. Other processes on the machine still disturb caches, so compare medians of repeats.
- `--callgrind`: the sidecar (or a floor row's floor.py, woken every 0.5 s by `--wake` so that
  it answers callgrind_control) runs under `valgrind --tool=callgrind`; the counters are zeroed
  after the warm-up (`callgrind_control -z`) and dumped after the requests (`-d`), and the
  figure is instructions executed (Ir) per request. An idle sidecar runs instructions too (its
  20 ms loop-lag tick, the 0.5 s sweeps, the 1 s housekeeping: ~0.7 M/s under callgrind), and
  under valgrind on a busy machine the requests take 10-30 s, so the raw figure moves with the
  machine's load by several thousand per request. Each row therefore first measures `--idle`
  seconds of the idle loop and also reports the figure without that rate over the requests'
  duration: the one to compare between versions. `PYTHONHASHSEED=0` for both modes.
- `--callgrind --wrk-connections 32,256`: the same process under load instead of sequential
  GETs, for what changes with concurrency (batching per loop iteration, per-connection state).
  For each count N a fresh process (under callgrind) gets the warm-up GETs, the idle window,
  then `wrk -t1 -cN` for `--wrk-warmup` + `--wrk-duration` seconds (+ slack); after the
  warm-up the counters are zeroed, `--wrk-duration` seconds later dumped, and the requests in
  between are the upstream nginx's request counter (its stub_status page, read just before and
  after each control command: the midpoints, with the spread printed as ±). So wrk's
  connection set-up and the pool's growth stay outside the window. `--cache-sim` adds
  callgrind's cache and branch simulation and prints L1 misses and mispredicts per request.
- `--syscalls`: `strace -c -f` attached to the process for the measured requests (after the
  warm-up), and the system calls it counted, per request, by kind. Counts, not timings, so they
  repeat; `epoll_pwait` (or `epoll_wait`) per request is the event loop's iterations. Any row
  of rows.py works, the Python floor rows too (that is what they are for: what differs).

Nothing here is a pass/fail check; the numbers go into a branch's report.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import rows
from processes import CLOCK_TICKS, BenchError, ProcessGroup, cpu_seconds

DEFAULT_ROWS = ("outrigger", "outrigger-policy")
CONTROL_TIMEOUT_S = 60.0
CALLGRIND_READY_TIMEOUT_S = 300.0
WRK_SLACK_S = 5.0  # wrk runs this much past the window, so that it still loads the dump
WRK_TIMEOUT_S = 10.0  # wrk's --timeout: a late answer under callgrind is counted, not an error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="sidecar rows from rows.py")
    p.add_argument("--requests", type=int, default=None, help="measured requests per repeat")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured requests first")
    p.add_argument("--repeat", type=int, default=3, help="measurements per row (CPU mode)")
    p.add_argument("--connections", type=int, default=1, help="keep-alive connections, in turn")
    p.add_argument("--callgrind", action="store_true", help="instructions under callgrind")
    p.add_argument(
        "--idle", type=float, default=5.0, help="seconds of idle loop measured (callgrind)"
    )
    p.add_argument("--syscalls", action="store_true", help="system calls under strace -c")
    p.add_argument(
        "--wrk-connections",
        default=None,
        help="comma list: callgrind the process under wrk -t1 -cN (not sequential GETs)",
    )
    p.add_argument("--wrk-warmup", type=float, default=3.0, help="wrk seconds before the window")
    p.add_argument("--wrk-duration", type=float, default=10.0, help="measured wrk seconds")
    p.add_argument(
        "--cache-sim", action="store_true", help="callgrind's cache and branch simulation too"
    )
    p.add_argument("--outrigger", type=Path, default=rows.OUTRIGGER)
    p.add_argument("--keep-workdir", action="store_true", help="keep logs and callgrind dumps")
    args = p.parse_args(argv)
    if args.requests is None:
        args.requests = 2000 if args.callgrind else 20000
    if args.warmup is None:
        args.warmup = 200 if args.callgrind else 2000
    if args.callgrind and args.syscalls:
        p.error("--callgrind and --syscalls measure one at a time")
    if args.callgrind or args.syscalls:
        args.repeat = 1
    if args.cache_sim and not args.callgrind:
        p.error("--cache-sim goes with --callgrind")
    if args.wrk_connections and args.syscalls:
        p.error("--wrk-connections measures instructions or CPU time, not system calls")
    return args


def send(target: rows.Target, count: int, connections: int, body: bytes) -> None:
    """`count` GETs, spread over `connections` keep-alive connections used one after another."""
    host, port = target.listen
    per = [count // connections + (1 if i < count % connections else 0) for i in range(connections)]
    headers = {"Host": target.host} if target.host else {}
    for n in per:
        conn = http.client.HTTPConnection(host, port, timeout=CONTROL_TIMEOUT_S)
        try:
            for _ in range(n):
                conn.request("GET", "/", headers=headers)
                resp = conn.getresponse()
                got = resp.read()
                if resp.status != 200 or got != body:
                    raise BenchError(f"GET / answered {resp.status} with {len(got)} bytes")
        finally:
            conn.close()


def callgrind_control(option: str, pid: int) -> None:
    # The sidecar wakes at least every 0.5 s (its connection sweep), which is when callgrind
    # reads the command; so this returns within about half a second.
    subprocess.run(
        ["callgrind_control", option, str(pid)],
        check=True,
        capture_output=True,
        timeout=CONTROL_TIMEOUT_S,
    )


def callgrind_window(pid: int, out_dir: Path, run: Callable[[], None]) -> tuple[int, float]:
    """Instructions `pid` executed while `run` ran, and the seconds it took."""
    callgrind_control("-z", pid)
    start = time.monotonic()
    run()
    seconds = time.monotonic() - start
    callgrind_control("-d", pid)
    return dumped_instructions(out_dir, pid), seconds


def dumped_instructions(out_dir: Path, pid: int) -> int:
    """Ir of the last dump callgrind wrote for `pid` (its `totals:` line)."""
    return dumped_events(out_dir, pid)["Ir"]


def dumped_events(out_dir: Path, pid: int) -> dict[str, int]:
    """{event: count} of the last dump callgrind wrote for `pid` (`events:` and `totals:`)."""
    dumps = sorted(out_dir.glob(f"callgrind.out.{pid}*"), key=lambda p: p.stat().st_mtime)
    if not dumps:
        raise BenchError(f"callgrind wrote no dump for pid {pid} in {out_dir}")
    return dump_events(dumps[-1].read_text(), str(dumps[-1]))


def dump_events(text: str, name: str) -> dict[str, int]:
    """{event: count} from a callgrind dump's `events:` and `totals:` (or `summary:`) lines."""
    events = re.search(r"^events: (.+)$", text, re.MULTILINE)
    totals = re.search(r"^(?:totals|summary): (.+)$", text, re.MULTILINE)
    if events is None or totals is None:
        raise BenchError(f"{name}: no events or totals line")
    names, counts = events.group(1).split(), [int(n) for n in totals.group(1).split()]
    # callgrind leaves trailing zero counts out
    return dict(zip(names, counts + [0] * (len(names) - len(counts)), strict=True))


def upstream_requests(port: int) -> int:
    """Requests the upstream nginx has answered so far (its stub_status page)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CONTROL_TIMEOUT_S)
    try:
        conn.request("GET", rows.UPSTREAM_STATUS_PATH)
        text = conn.getresponse().read().decode("ascii")
    finally:
        conn.close()
    # "Active connections: 1 \nserver accepts handled requests\n 5 5 17 \n..."
    match = re.search(r"^\s*\d+\s+\d+\s+(\d+)\s*$", text, re.MULTILINE)
    if match is None:
        raise BenchError(f"upstream status page: {text!r}")
    return int(match.group(1))


def counted(mark: Callable[[], None], port: int) -> tuple[float, float]:
    """Run `mark`; the upstream's request count then (midpoint, half-spread), less the status
    requests themselves."""
    before = upstream_requests(port)
    mark()
    after = upstream_requests(port) - 1
    return (before + after) / 2, (after - before) / 2


def user_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


# The events shown per request with --cache-sim (callgrind's names), and their headings
CACHE_EVENTS = {
    "D1mr": "L1d read miss",
    "I1mr": "L1i miss",
    "Bcm": "cond mispr",
    "Bim": "ind mispr",
}


@dataclass(frozen=True)
class LoadWindow:
    """What `load_window` measured: requests (± the counter's spread), seconds, and wrk's late
    answers (past its --timeout: latencies only, not errors)."""

    requests: float
    spread: float
    seconds: float
    late: int


def load_window(
    target: rows.Target,
    env: rows.Env,
    args: argparse.Namespace,
    conns: int,
    begin: Callable[[], None],
    end: Callable[[], None],
) -> LoadWindow:
    """`wrk -t1 -c{conns}` on `target`: `begin` after `--wrk-warmup` seconds, `end`
    `--wrk-duration` seconds later, the upstream's requests counted around each."""
    wrk_s = args.wrk_warmup + args.wrk_duration + WRK_SLACK_S
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{wrk_s:g}s", "--timeout", f"{WRK_TIMEOUT_S:g}s"]
    argv += [*(["-H", f"Host: {target.host}"] if target.host else []), target.url]
    load = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(args.wrk_warmup)
        first, first_spread = counted(begin, env.upstream_port)
        start = time.monotonic()
        time.sleep(args.wrk_duration)
        seconds = time.monotonic() - start
        last, last_spread = counted(end, env.upstream_port)
        if load.poll() is not None:
            raise BenchError(f"wrk ended before the window did: {load.communicate()[0]}")
        out = load.communicate(timeout=wrk_s + CONTROL_TIMEOUT_S)[0]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    # wrk's timeouts are only latencies past --timeout (a slow process under callgrind answers
    # some connections late); an error status or a broken connection is a failure
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+)", out)
    if "Non-2xx" in out or (errors is not None and any(int(n) for n in errors.groups())):
        raise BenchError(f"wrk saw errors:\n{out}")
    late = re.search(r"Socket errors: .* timeout (\d+)", out)
    return LoadWindow(
        last - first, first_spread + last_spread, seconds, int(late.group(1)) if late else 0
    )


def start_measured(row: rows.Row, env: rows.Env) -> tuple[rows.Target, int]:
    """Start `row`; its target and the pid of the process measured."""
    target = row.start(env)
    if target.measured is None:
        raise BenchError(f"{row.name}: no process to measure")
    return target, target.measured.pid


def under_wrk(row: rows.Row, env: rows.Env, args: argparse.Namespace, conns: int) -> str:
    """One row under `wrk -t1 -c{conns}`: instructions per request (--callgrind), else CPU-µs
    per request, user and system (the module docstring)."""
    started = len(env.group.procs)
    try:
        target, pid = start_measured(row, env)
        send(target, args.warmup, 1, env.body)
        head = f"{row.name:20} -c{conns:<4}"
        if not args.callgrind:
            figures = []
            for _ in range(args.repeat):
                cpu: list[tuple[float, float]] = []

                def mark(cpu: list[tuple[float, float]] = cpu) -> None:
                    cpu.append(user_system_seconds(pid))

                window = load_window(target, env, args, conns, mark, mark)
                n = window.requests
                user, system = ((b - a) * 1e6 / n for a, b in zip(*cpu, strict=True))
                figures.append(f"{user:.1f}+{system:.1f} ({n / window.seconds:,.0f}/s)")
            return f"{head} CPU-µs/request user+system: " + "  ".join(figures)
        idle_ir, idle_s = callgrind_window(pid, env.workdir, lambda: time.sleep(args.idle))
        idle_rate = idle_ir / idle_s
        window = load_window(
            target,
            env,
            args,
            conns,
            lambda: callgrind_control("-z", pid),
            lambda: callgrind_control("-d", pid),
        )
        events = dumped_events(env.workdir, pid)
        n, seconds = window.requests, window.seconds
        net = events["Ir"] - idle_rate * seconds
        line = (
            f"{head} {n:8,.0f} requests (±{window.spread:.0f}) in {seconds:.1f} s:"
            f" {events['Ir'] / n:9,.0f} instructions/request,"
            f" {net / n:,.0f} without the idle loop's {idle_rate / 1e3:,.0f}k/s"
        )
        if args.cache_sim:
            line += "; per request " + ", ".join(
                f"{heading} {events[name] / n:,.0f}" for name, heading in CACHE_EVENTS.items()
            )
        if window.late:
            line += f" ({window.late} answered after wrk's {WRK_TIMEOUT_S:g} s)"
        return line
    finally:
        for proc in env.group.procs[started:][::-1]:
            env.group.stop(proc)


def syscalls_per_request(pid: int, run: Callable[[], None], requests: int) -> str:
    """System calls of `pid` (all its threads) while `run` runs, per request, most first."""
    with tempfile.NamedTemporaryFile(prefix="outrigger-strace-", suffix=".txt") as out:
        tracer = subprocess.Popen(
            ["strace", "-c", "-f", "-o", out.name, "-p", str(pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            # strace says it attached on stderr (one line per thread) before it traces
            assert tracer.stderr is not None
            line = tracer.stderr.readline()
            if "attached" not in line:
                raise BenchError(f"strace -p {pid} did not attach: {line.strip()}")
            run()
        finally:
            tracer.send_signal(signal.SIGINT)  # detach and write the summary
            try:
                tracer.wait(timeout=CONTROL_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                tracer.kill()
                raise
        counts = strace_counts(Path(out.name).read_text())
    total = sum(counts.values())
    shown = " ".join(
        f"{name} {n / requests:.2f}"
        for name, n in sorted(counts.items(), key=lambda kv: -kv[1])
        if n / requests >= 0.005
    )
    return f"{total / requests:6.2f} syscalls/request: {shown}"


def strace_counts(summary: str) -> dict[str, int]:
    """{syscall: calls} from `strace -c`'s table (rows: % time, seconds, usecs/call, calls,
    [errors,] syscall)."""
    counts: dict[str, int] = {}
    for line in summary.splitlines():
        fields = line.split()
        if len(fields) in (5, 6) and fields[-1].isidentifier() and fields[-1] != "total":
            try:
                counts[fields[-1]] = int(fields[3])
            except ValueError:
                continue
    return counts


def measure(row: rows.Row, env: rows.Env, args: argparse.Namespace) -> str:
    started = len(env.group.procs)
    try:
        target, pid = start_measured(row, env)
        send(target, args.warmup, args.connections, env.body)
        if args.callgrind:
            n = args.requests
            idle_ir, idle_s = callgrind_window(pid, env.workdir, lambda: time.sleep(args.idle))
            ir, busy_s = callgrind_window(
                pid, env.workdir, lambda: send(target, n, args.connections, env.body)
            )
            idle_rate = idle_ir / idle_s
            net = ir - idle_rate * busy_s
            return (
                f"{row.name:20} {ir / n:12,.0f} instructions/request, {net / n:,.0f} without"
                f" the idle loop's {idle_rate / 1e3:,.0f}k/s over the {busy_s:.1f} s"
            )
        if args.syscalls:
            return f"{row.name:20} " + syscalls_per_request(
                pid, lambda: send(target, args.requests, args.connections, env.body), args.requests
            )
        figures = []
        for _ in range(args.repeat):
            before = cpu_seconds(pid)
            send(target, args.requests, args.connections, env.body)
            figures.append((cpu_seconds(pid) - before) * 1e6 / args.requests)
        shown = " ".join(f"{f:.1f}" for f in figures)
        return (
            f"{row.name:20} CPU-µs/request min {min(figures):.1f}"
            f" median {statistics.median(figures):.1f}  ({shown})"
        )
    finally:
        for proc in env.group.procs[started:][::-1]:
            env.group.stop(proc)


def bench_env(prefix: str, outrigger: Path) -> rows.Env:
    """An unpinned Env in a new work dir, with PYTHONHASHSEED=0 for the children (also for
    profile.py)."""
    os.environ["PYTHONHASHSEED"] = "0"  # the children inherit it
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    return rows.Env(
        group=ProcessGroup(workdir=workdir),
        workdir=workdir,
        pins=rows.Pins(wrk=None, proxy=None, upstream=None),
        body=rows.make_body(),
        outrigger=outrigger,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needed = ["nginx"] + (["valgrind", "callgrind_control"] if args.callgrind else [])
    needed += ["wrk"] if args.wrk_connections else []
    needed += ["strace"] if args.syscalls else []
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        return 2
    env = bench_env("outrigger-cost-", args.outrigger)
    workdir = env.workdir
    if args.callgrind:
        python = args.outrigger.with_name("python")
        env.sidecar_wrapper = (
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={workdir}/callgrind.out.%p",
            *(["--cache-sim=yes", "--branch-sim=yes"] if args.cache_sim else []),
            str(python),
        )
        env.sidecar_ready_timeout_s = CALLGRIND_READY_TIMEOUT_S
    print(
        f"{args.requests} requests after {args.warmup} warm-up, {args.connections} connection(s)"
        f" in turn, {time.strftime('%Y-%m-%d %H:%M')}",
        flush=True,
    )
    try:
        _, env.upstream_port = rows.start_upstream(env)
        for name in args.rows.split(","):
            row = rows.by_name()[name]
            if args.wrk_connections:
                for conns in args.wrk_connections.split(","):
                    print(under_wrk(row, env, args, int(conns)), flush=True)
            else:
                print(measure(row, env, args), flush=True)
    except BenchError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    finally:
        env.group.close()
        if args.keep_workdir:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
