"""Child processes of the harness: start, wait for, measure (/proc) and stop them.

Every process is started in its own session (process group) and registered with a
`ProcessGroup`, whose `close()` terminates each one by its own pgid: SIGTERM, a bounded wait,
then SIGKILL. `run.py` closes the group in a `finally`, so Ctrl-C and errors leave nothing
behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_S = 5.0


class BenchError(Exception):
    """A row could not be measured; the message says why (it goes into the table)."""


def free_port() -> int:
    """A port the kernel considers free on 127.0.0.1 right now.

    The servers under test (nginx, HAProxy, the sidecar) take addresses, not sockets, so there is
    a window between closing this socket and the server binding it. Readiness checks verify that
    the process we started is the one answering (it is alive and serves our exact body).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    """A started child: its Popen, its name and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output_tail(self, max_chars: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"
        text = text.strip()
        if not text:
            return "<no output>"
        return text[-max_chars:]


@dataclass
class ProcessGroup:
    """Owns every process the harness starts; `close()` stops them all."""

    workdir: Path
    cpus: str | None = None
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, cpus: str | None = None) -> Proc:
        """Start `argv` pinned to `cpus` (taskset list, e.g. "0"); output goes to a log file."""
        log_path = self.workdir / f"{name}.log"
        full = list(argv)
        if cpus is not None:
            full = ["taskset", "-c", cpus, *full]
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.workdir,
            )
        proc = Proc(name=name, popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        """Terminate one process (and its process group), bounded."""
        if proc in self.procs:
            self.procs.remove(proc)
        _terminate(proc.popen)

    def close(self) -> None:
        while self.procs:
            self.stop(self.procs[-1])


def _terminate(popen: subprocess.Popen[bytes]) -> None:
    pgid = popen.pid  # start_new_session=True: the child leads its own group
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        if popen.poll() is not None:
            # The leader is gone; reap any stragglers left in its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        try:
            popen.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


# --- waiting ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HttpResult:
    status: int
    body: bytes


def http_get(url: str, *, host: str | None = None, timeout_s: float = 2.0) -> HttpResult:
    """One GET with urllib (no proxies from the environment); HTTP errors are results too."""
    req = urllib.request.Request(url)
    if host is not None:
        req.add_header("Host", host)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout_s) as resp:
            return HttpResult(status=resp.status, body=resp.read())
    except urllib.error.HTTPError as exc:
        return HttpResult(status=exc.code, body=exc.read())


def wait_until(
    proc: Proc,
    check: Callable[[], str | None],
    *,
    timeout_s: float,
    what: str,
) -> None:
    """Poll `check` (None = ready, else a reason) until ready; raise BenchError on timeout/exit."""
    deadline = time.monotonic() + timeout_s
    reason = "not checked yet"
    while True:
        if not proc.alive():
            raise BenchError(
                f"{what}: {proc.name} exited with {proc.popen.returncode}: {proc.output_tail()}"
            )
        try:
            result = check()
        except OSError as exc:  # connection refused, reset, timeout ...
            result = f"{type(exc).__name__}: {exc}"
        if result is None:
            return
        reason = result
        if time.monotonic() >= deadline:
            raise BenchError(
                f"{what} (after {timeout_s:.0f}s; last check: {reason}): {proc.output_tail()}"
            )
        time.sleep(0.1)


LOOP_LAG_METRIC = "outrigger_event_loop_lag_max_seconds"
LOOP_LAG_CPU_METRIC = "outrigger_event_loop_lag_max_cpu_seconds"
LOOP_LAG_SYSTEM_METRIC = "outrigger_event_loop_lag_max_system_cpu_seconds"
LOOP_LAG_FAULTS_METRIC = "outrigger_event_loop_lag_max_major_faults"
GC_PAUSE_MAX_METRIC = "outrigger_gc_pause_max_seconds"
GC_PAUSE_CPU_METRIC = "outrigger_gc_pause_max_cpu_seconds"
GC_COLLECTIONS_METRIC = "outrigger_gc_collections_since_scrape"
PAUSE_METRICS = (
    LOOP_LAG_METRIC,
    LOOP_LAG_CPU_METRIC,
    LOOP_LAG_SYSTEM_METRIC,
    LOOP_LAG_FAULTS_METRIC,
    GC_PAUSE_MAX_METRIC,
    GC_PAUSE_CPU_METRIC,
    GC_COLLECTIONS_METRIC,
)


@dataclass(frozen=True)
class LoopPauses:
    """What held a sidecar's event loop since the previous read of its /stats/prometheus (which
    the read resets): its longest stall, the CPU its loop used over that stall's timer period,
    the kernel's part of it and the major page faults in it (sidecar/loop_lag.py), its longest
    garbage collection, the CPU in it and how many collections ran (sidecar/gc_pause.py);
    seconds."""

    # Named as the harness's JSON records name them (tests/bench/report.py reads those).
    loop_stall_s: float
    loop_stall_cpu_s: float
    loop_stall_system_cpu_s: float
    loop_stall_major_faults: int
    gc_pause_max_s: float
    gc_pause_max_cpu_s: float
    gc_collections: int

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def loop_pauses(stats_url: str) -> LoopPauses:
    """Read (and so reset) the sidecar's loop stall and GC pause gauges."""
    r = http_get(stats_url)
    if r.status != 200:
        raise BenchError(f"{stats_url} answered {r.status}")
    values: dict[str, float] = {}
    for line in r.body.decode().splitlines():
        name, _, value = line.partition(" ")
        if name in PAUSE_METRICS:
            values[name] = float(value)
    missing = [name for name in PAUSE_METRICS if name not in values]
    if missing:
        raise BenchError(f"{stats_url} lacks {', '.join(missing)}")
    return LoopPauses(
        values[LOOP_LAG_METRIC],
        values[LOOP_LAG_CPU_METRIC],
        values[LOOP_LAG_SYSTEM_METRIC],
        int(values[LOOP_LAG_FAULTS_METRIC]),
        values[GC_PAUSE_MAX_METRIC],
        values[GC_PAUSE_CPU_METRIC],
        int(values[GC_COLLECTIONS_METRIC]),
    )


# --- the load generator ----------------------------------------------------------------------


def loadgen_argv(
    python: str, url: str, *, rate: float, connections: int, duration: float, warmup: float
) -> list[str]:
    """The command line of `outrigger.loadgen` at a fixed rate (open loop), as the harnesses
    run it."""
    return [
        python,
        "-m",
        "outrigger.loadgen",
        url,
        "--rate",
        f"{rate:g}",
        "--connections",
        str(connections),
        "--duration",
        f"{duration:g}",
        "--warmup",
        f"{warmup:g}",
    ]


def loadgen_summary(
    argv: Sequence[str],
    *,
    timeout_s: float,
    stderr_path: Path,
    on_recording: Callable[[], None],
    on_summary: Callable[[], None],
) -> dict[str, Any]:
    """Run `argv` (`python -m outrigger.loadgen ...`) to its summary, bounded by `timeout_s`:
    `on_recording` is called at its `recording` line (the warm-up is over), `on_summary` as soon
    as the summary line arrives, before the process exits (a caller reads other processes' CPU
    in these two). Returns the summary; BenchError if none came in time."""
    deadline = time.monotonic() + timeout_s
    stderr = stderr_path.open("w+")
    popen = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    summary: dict[str, Any] | None = None
    try:
        assert popen.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(popen.stdout, selectors.EVENT_READ)
            while summary is None:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise BenchError(f"the generator did not finish in time ({' '.join(argv)})")
                line = popen.stdout.readline()
                if not line:
                    stderr.seek(0)
                    raise BenchError(f"the generator exited without a summary: {stderr.read()}")
                message = json.loads(line)
                if "recording" in message:
                    on_recording()
                elif "summary" in message:
                    on_summary()
                    summary = message["summary"]
        popen.wait(timeout=10)
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait(timeout=10)
        if popen.stdout is not None:
            popen.stdout.close()
        stderr.close()
    return summary


# --- /proc measurements ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        kids.extend(int(x) for x in text.split())
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (nginx: master + worker)."""
    seen: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(_children(p))
    return seen


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` and its descendants, all threads, in seconds."""
    total_ticks = 0
    for p in process_tree(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        # Field 2 (comm) may contain spaces; everything after the last ')' is space-separated.
        fields = stat.rsplit(")", 1)[1].split()
        utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
        total_ticks += utime + stime
    return total_ticks / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """Sum of VmRSS over the process tree (shared pages counted once per process)."""
    return sum(_status_kib(p, "VmRSS") for p in process_tree(pid))


def hwm_kib(pid: int) -> int:
    """Sum of VmHWM (lifetime peak RSS) over the process tree."""
    return sum(_status_kib(p, "VmHWM") for p in process_tree(pid))


class RssSampler:
    """Samples the tree's VmRSS every `interval_s` in a thread; `peak_kib` is the max seen."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.peak_kib = 0
        self.samples = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, rss_kib(self._pid))
            self.samples += 1
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
