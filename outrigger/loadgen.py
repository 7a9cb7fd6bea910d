"""An open-loop HTTP/1.1 load generator: a fixed request rate over N keep-alive connections, each
request timed from when it was due, and the generator's own event-loop lag reported beside it.

`python -m outrigger.loadgen URL --rate 1000 --connections 16 --duration 10` prints one JSON
object per line: `{"started": ...}` once connected, `{"recording": ...}` when the warm-up ends (a
caller reading the server's CPU over the recorded time reads it then), and last `{"summary": ...}`
(latency percentiles in ms, statuses, errors, loop lag, CPU). With `--interval S` it also prints
`{"interval": ...}` lines holding every outcome ([due, latency, status, error]) and lag sample
([due, how late]) of the last S seconds, for a caller that cuts its own windows (`outrigger
demo`).
In code: `await measure(url, rate, duration, ...)` returns a `Summary`; `LoadGenerator` with a
`Recorder` gives the parts (`connect`, `send`, the outcomes as they come).

The rules (wrk2's), so that the figures are what a user of the server would see:

- Open loop: request i is due at start + i / rate, whatever became of the requests before it.
  A connection carries one request at a time (HTTP/1.1 without pipelining); a request due while
  every connection is busy waits for one; one that is not answered `timeout` seconds after it was
  due is given up and counted as an error (its connection, if it was sent, is closed and replaced).
- Latency is measured from the time a request was *due*, not from when it was written: a late
  send (a stalled loop, no free connection, a slow answer to the one before) is counted, not
  hidden. This is what "coordinated omission" names.
- Loop lag: for each request, how late the send timer fired for it (its due time to the moment
  the generator's loop got to it). One sample per request, so it weighs as the latencies do:
  after a stall every request it held up counts. It is part of the latencies above; when it is
  large the generator, not the server, made them.
- The timer is a Linux timerfd, armed at absolute CLOCK_MONOTONIC times (the clock of
  `time.monotonic`), so requests go out within microseconds of when they are due; the event
  loop's own timers round to 1 ms, which would add up to 1 ms to every latency. Where timerfd is
  missing the loop's timer is used, and the summary says `"timer": "loop"`.
- Percentiles are exact, by nearest rank, over every request that got an HTTP answer (any status);
  requests without one are counted by cause in `errors`.
- Cheap: one `asyncio.Protocol` and one httptools parser per connection, the request bytes built
  once, no object per request but its `Outcome`.

Limits: plain http:// only; GET without a body; a response whose body ends with the connection
(no Content-Length, not chunked) counts as answered when its headers had arrived; a run stopped
early (SIGTERM, `stop`) leaves out the requests still unanswered then.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import signal
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import httptools
import uvloop

from outrigger.parsing import ParsingProtocol

clock = time.monotonic  # CLOCK_MONOTONIC on Linux: the clock timerfd is armed with

# Causes of a request without an HTTP answer.
TIMEOUT = "timeout"  # not answered `timeout` seconds after it was due
CONNECT = "connect"  # the connection it waited for could not be opened
CLOSED = "closed"  # the connection closed (or the answer did not parse) before the answer

SWEEP = 0.05  # seconds between looks for requests whose time ran out


@dataclass(frozen=True, slots=True)
class Outcome:
    intended: float  # monotonic time the request was due
    sent: float  # when it was written; nan: never sent
    done: float  # when its answer was complete (or it was given up)
    status: int  # HTTP status; 0: no answer, see `error`
    error: str = ""

    @property
    def latency(self) -> float:
        """Seconds from when the request was due to its answer."""
        return self.done - self.intended

    @property
    def ok(self) -> bool:
        return 0 < self.status < 500


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least a fraction q of `ordered` (sorted) at or
    below it. q=0.5 of [1, 2, 3, 4] is 2; q=0.99 of 100 values is the 99th."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile: q must be within [0, 1], got {q}")
    rank = max(1, math.ceil(q * len(ordered) - 1e-9))  # 1e-9: 0.99 * 100 is 99.00000000000001
    return ordered[rank - 1]


@dataclass(frozen=True)
class Latency:
    """Percentiles of a set of durations, in seconds."""

    count: int
    p50: float
    p90: float
    p99: float
    p999: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Latency | None:
        if not values:
            return None
        ordered = sorted(values)
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 0.5),
            p90=percentile(ordered, 0.9),
            p99=percentile(ordered, 0.99),
            p999=percentile(ordered, 0.999),
            max=ordered[-1],
            mean=sum(ordered) / len(ordered),
        )

    def ms(self) -> dict[str, float | int]:
        return {k: v if k == "count" else round(v * 1000, 3) for k, v in asdict(self).items()}


class Pacer:
    """When each request is due: request i at `start + i / rate`, for every such time before
    `end`. Pure arithmetic on the times it is given (no clock), so a stall is just a later `now`:
    every request missed meanwhile comes out at once, each with its own due time."""

    def __init__(self, rate: float, start: float, end: float = math.inf) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be above 0 requests/s, got {rate}")
        self.rate = rate
        self.start = start
        self.end = end
        self.issued = 0

    def next_at(self) -> float | None:
        """When the next request is due; None when the schedule is over."""
        at = self.start + self.issued / self.rate
        return at if at < self.end else None

    def due(self, now: float) -> list[float]:
        """The due times, at or before `now`, of the requests not handed out yet (each once)."""
        out: list[float] = []
        while True:
            at = self.start + self.issued / self.rate
            if at > now or at >= self.end:
                return out
            out.append(at)
            self.issued += 1


class Waiting:
    """Requests that are due but have no connection yet, oldest first; given up `timeout` after
    they were due."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._due: deque[float] = deque()

    def __len__(self) -> int:
        return len(self._due)

    def add(self, due: list[float]) -> None:
        self._due.extend(due)

    def take(self) -> float:
        return self._due.popleft()

    def expired(self, now: float) -> list[float]:
        """The requests whose time ran out while they waited, removed."""
        out = []
        while self._due and self._due[0] <= now - self.timeout:
            out.append(self._due.popleft())
        return out


class Recorder:
    """What a run saw after its warm-up: counts, the latency of every answered request and the
    loop-lag samples (8 bytes each, so a long run stays small). With `stream`, `take()` also hands
    over the outcomes and lag samples that arrived since its last call."""

    def __init__(self, stream: bool = False) -> None:
        self.since = -math.inf  # outcomes due before this (the warm-up) are not recorded
        self.stream = stream
        self.requests = 0
        self.statuses: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.latencies = array("d")  # seconds, answered requests
        self.lags = array("d")
        self._new: list[Outcome] = []
        self._new_lags: list[tuple[float, float]] = []  # (when a request was due, how late)

    def outcome(self, outcome: Outcome) -> None:
        if outcome.intended < self.since:
            return
        self.requests += 1
        if outcome.status:
            self.statuses[outcome.status] = self.statuses.get(outcome.status, 0) + 1
            self.latencies.append(outcome.latency)
        else:
            self.errors[outcome.error] = self.errors.get(outcome.error, 0) + 1
        if self.stream:
            self._new.append(outcome)

    def lag(self, at: float, seconds: float) -> None:
        if at < self.since:
            return
        self.lags.append(seconds)
        if self.stream:
            self._new_lags.append((at, seconds))

    def take(self) -> tuple[list[Outcome], list[tuple[float, float]]]:
        new, self._new = self._new, []
        lags, self._new_lags = self._new_lags, []
        return new, lags

    def summary(self, seconds: float, cpu_seconds: float, timer: str) -> Summary:
        return Summary(
            requests=self.requests,
            answered=len(self.latencies),
            seconds=seconds,
            statuses={str(k): v for k, v in sorted(self.statuses.items())},
            errors=dict(self.errors),
            latency=Latency.of(self.latencies),
            loop_lag=Latency.of(self.lags),
            cpu_seconds=cpu_seconds,
            timer=timer,
        )


@dataclass(frozen=True)
class Summary:
    requests: int  # due within the recorded time
    answered: int  # with an HTTP answer, any status
    seconds: float  # recorded time
    statuses: dict[str, int]
    errors: dict[str, int]  # cause -> requests without an answer
    latency: Latency | None  # from when each was due
    loop_lag: Latency | None  # how late the send timer fired, per request
    cpu_seconds: float  # the generator's own
    timer: str  # "timerfd" | "loop"

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "answered": self.answered,
            "seconds": round(self.seconds, 3),
            "rate": round(self.requests / self.seconds, 1) if self.seconds > 0 else None,
            "statuses": self.statuses,
            "errors": self.errors,
            "latency_ms": self.latency.ms() if self.latency else None,
            "loop_lag_ms": self.loop_lag.ms() if self.loop_lag else None,
            "cpu_seconds": round(self.cpu_seconds, 3),
            "cpu_share": round(self.cpu_seconds / self.seconds, 3) if self.seconds > 0 else None,
            "timer": self.timer,
        }


# --- timers -------------------------------------------------------------------------------------


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_TFD_CLOEXEC = 0o2000000  # O_CLOEXEC; TFD_NONBLOCK is O_NONBLOCK


class TimerFd:
    """A one-shot Linux timerfd armed at absolute monotonic times and watched by the loop."""

    name = "timerfd"

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = int(self._libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | _TFD_CLOEXEC))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create")
        self._fd = fd
        self._loop = loop
        self._fire = fire
        loop.add_reader(fd, self._ready)

    def arm(self, when: float) -> None:
        seconds = int(when)
        nanos = max(1, int((when - seconds) * 1e9))  # an all-zero value would disarm it
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, nanos))
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None):
            raise OSError(ctypes.get_errno(), "timerfd_settime")

    def _ready(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return
        self._fire()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class LoopTimer:
    """The loop's own timer (1 ms resolution): where timerfd is not available."""

    name = "loop"

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, when: float) -> None:
        self._handle = self._loop.call_at(self._loop.time() + (when - clock()), self._fire)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


def make_timer(loop: asyncio.AbstractEventLoop, fire: Callable[[], None]) -> TimerFd | LoopTimer:
    try:
        return TimerFd(loop, fire)
    except (OSError, AttributeError):  # not Linux: no timerfd_create in the C library
        return LoopTimer(loop, fire)


# --- the client ---------------------------------------------------------------------------------


class _Connection(ParsingProtocol):
    """One keep-alive connection carrying one request at a time."""

    def __init__(self, gen: LoadGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser = httptools.HttpResponseParser(self)
        self.busy = False
        self.intended = 0.0
        self.sent = 0.0
        self.status = 0  # of the answer being read; 0 until its headers arrived

    # asyncio.Protocol
    def refuse(self) -> None:
        self.gen.finished(self, 0, CLOSED, keep=False)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            # An answer whose body the close ends; anything else is a request without an answer.
            self.gen.finished(self, self.status, "" if self.status else CLOSED, keep=False)
        self.gen.lost(self)

    # httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        self.gen.finished(self, self.parser.get_status_code(), "", self.parser.should_keep_alive())

    def send(self, intended: float, request: bytes) -> None:
        assert self.transport is not None
        self.busy = True
        self.intended = intended
        self.status = 0
        self.sent = clock()
        self.transport.write(request)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class LoadGenerator:
    """Sends GET `url` at `rate` requests/s over `connections` keep-alive connections; every
    outcome and lag sample goes to `recorder`. See the module docstring for the rules."""

    def __init__(
        self,
        url: str,
        rate: float,
        recorder: Recorder,
        connections: int = 16,
        timeout: float = 5.0,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"loadgen: URL must be http://HOST[:PORT]/PATH, got {url!r}")
        if connections < 1:
            raise ValueError(f"loadgen: connections must be at least 1, got {connections}")
        if not timeout > 0:
            raise ValueError(f"loadgen: timeout must be above 0 s, got {timeout}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.rate = rate
        self.recorder = recorder
        self.size = connections
        self.timeout = timeout
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        names = {name.lower() for name, _ in headers}
        head = [f"GET {target} HTTP/1.1"]
        if "host" not in names:
            head.append(f"Host: {parts.netloc}")
        head += [f"{name}: {value}" for name, value in headers]
        if "user-agent" not in names:
            head.append("User-Agent: outrigger-loadgen")
        self.request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        self.waiting = Waiting(timeout)
        self.open: set[_Connection] = set()
        self.idle: list[_Connection] = []
        self.connecting = 0
        self.pacer: Pacer | None = None
        self.timer: TimerFd | LoopTimer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._done: asyncio.Future[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def timer_name(self) -> str:
        return self.timer.name if self.timer is not None else "none"

    async def connect(self) -> int:
        """Open the connections (each bounded by `timeout`); how many opened. Those that did
        not are opened again when requests wait for them."""
        await asyncio.gather(*(self._connect(initial=True) for _ in range(self.size)))
        return len(self.open)

    async def send(
        self,
        duration: float | None,
        stop: asyncio.Event | None = None,
        warmup: float = 0.0,
        recording: Callable[[], None] | None = None,
    ) -> float:
        """Send for `warmup` + `duration` seconds (None: until `stop` is set), recording after
        the warm-up (`recording` is called then), then wait for the last answers (at most
        `timeout`). Returns the seconds recorded."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._done = done
        start = clock()
        self.recorder.since = start + warmup
        marker = loop.call_later(warmup, recording) if recording is not None else None
        end = math.inf if duration is None else start + warmup + duration
        self.pacer = Pacer(self.rate, start, end)
        timer = self.timer = make_timer(loop, self._tick)
        self._arm(start)
        self._sweeper = loop.call_later(SWEEP, self._sweep)
        stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            await asyncio.wait(
                [done] + ([stopped] if stopped is not None else []),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            # the whole schedule was sent: exactly its length; stopped early: until now
            ended = end if done.done() else min(clock(), end)
            if stopped is not None:
                stopped.cancel()
            if marker is not None:
                marker.cancel()
            if self._sweeper is not None:
                self._sweeper.cancel()
            timer.close()
            for conn in list(self.open):
                conn.close()
            for task in list(self._tasks):
                task.cancel()
        return max(0.0, ended - self.recorder.since)

    # --- scheduling ---

    def _arm(self, when: float) -> None:
        assert self.timer is not None
        self.timer.arm(when)

    def _tick(self) -> None:
        assert self.pacer is not None
        now = clock()
        due = self.pacer.due(now)
        for at in due:
            self.recorder.lag(at, now - at)
        self.waiting.add(due)
        self._pump()
        following = self.pacer.next_at()
        if following is not None:
            self._arm(following)
        else:
            self._maybe_done()

    def _pump(self) -> None:
        while self.waiting and self.idle:
            self.idle.pop().send(self.waiting.take(), self.request)
        lacking = min(len(self.waiting), self.size - len(self.open) - self.connecting)
        for _ in range(lacking):
            task = asyncio.ensure_future(self._connect())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, initial: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self.connecting += 1
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self), self.host, self.port),
                self.timeout,
            )
        except (OSError, TimeoutError):
            self.connecting -= 1
            if not initial and self.waiting:
                # the request that asked for this connection gets the error a client would
                intended = self.waiting.take()
                self.recorder.outcome(Outcome(intended, math.nan, clock(), 0, CONNECT))
                self._maybe_done()
            return
        self.connecting -= 1
        self.open.add(conn)
        self.idle.append(conn)
        if not initial:
            self._pump()

    def _sweep(self) -> None:
        now = clock()
        for intended in self.waiting.expired(now):
            self.recorder.outcome(Outcome(intended, math.nan, now, 0, TIMEOUT))
        for conn in list(self.open):
            if conn.busy and conn.intended <= now - self.timeout:
                self.finished(conn, 0, TIMEOUT, keep=False)
        self._maybe_done()
        if self._done is not None and not self._done.done():
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP, self._sweep)

    def _maybe_done(self) -> None:
        if self.pacer is None or self.pacer.next_at() is not None or self.waiting:
            return
        if any(conn.busy for conn in self.open) or self._done is None or self._done.done():
            return
        self._done.set_result(None)

    # --- from the connections ---

    def finished(self, conn: _Connection, status: int, error: str, keep: bool) -> None:
        if not conn.busy:
            return
        conn.busy = False
        self.recorder.outcome(Outcome(conn.intended, conn.sent, clock(), status, error))
        if keep:
            self.idle.append(conn)
            self._pump()
        else:
            conn.close()  # connection_lost removes it, then pumps
        self._maybe_done()

    def lost(self, conn: _Connection) -> None:
        self.open.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        if self._done is not None and not self._done.done():
            self._pump()


async def measure(
    url: str,
    rate: float,
    duration: float,
    connections: int = 16,
    warmup: float = 0.0,
    timeout: float = 5.0,
    headers: Sequence[tuple[str, str]] = (),
) -> Summary:
    """One run: connect, send for `warmup` + `duration` seconds, summarize what came after the
    warm-up (the caller's loop; in a process of its own, use `python -m outrigger.loadgen`)."""
    recorder = Recorder()
    gen = LoadGenerator(url, rate, recorder, connections, timeout, headers)
    cpu = time.process_time()
    await gen.connect()
    seconds = await gen.send(duration, warmup=warmup)
    return recorder.summary(seconds, time.process_time() - cpu, gen.timer_name)


# --- the command --------------------------------------------------------------------------------


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--header must be 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def _outcome_json(o: Outcome) -> list[Any]:
    return [round(o.intended, 6), round(o.latency, 6), o.status, o.error]


def outcome_from_json(item: list[Any]) -> Outcome:
    """An outcome from an `--interval` line (its send time is not carried)."""
    intended, latency, status, error = item
    return Outcome(float(intended), math.nan, float(intended) + float(latency), int(status), error)


async def _command(args: argparse.Namespace) -> Summary:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    recorder = Recorder(stream=args.interval is not None)
    gen = LoadGenerator(
        args.url, args.rate, recorder, args.connections, args.timeout, args.header or ()
    )

    def flush() -> None:
        outcomes, lags = recorder.take()
        line = {
            "interval": {
                "outcomes": [_outcome_json(o) for o in outcomes],
                "lags": [[round(at, 6), round(lag, 6)] for at, lag in lags],
            }
        }
        sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def recording() -> None:
        # the warm-up is over: a caller measuring the server over the recorded time starts now
        print(json.dumps({"recording": {"after_warmup": args.warmup}}), flush=True)

    async def report() -> None:
        while True:
            await asyncio.sleep(args.interval)
            flush()

    cpu = time.process_time()
    opened = await gen.connect()
    print(json.dumps({"started": {"url": args.url, "connections": opened}}), flush=True)
    reporter = asyncio.ensure_future(report()) if args.interval else None
    try:
        seconds = await gen.send(args.duration, stop, args.warmup, recording)
    finally:
        if reporter is not None:
            reporter.cancel()
            flush()
    return recorder.summary(seconds, time.process_time() - cpu, gen.timer_name)


def build_parser() -> argparse.ArgumentParser:
    """Every flag (tests check that what k8s/examples runs is accepted here)."""
    p = argparse.ArgumentParser(
        prog="python -m outrigger.loadgen",
        description="Open-loop HTTP/1.1 load at a fixed rate; latency from each request's due "
        "time; prints JSON lines, the last {'summary': ...}.",
    )
    p.add_argument("url", help="http://HOST:PORT/PATH")
    p.add_argument("--rate", type=float, required=True, help="requests per second")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections (16)")
    p.add_argument("--duration", type=float, default=None, help="seconds (default: until SIGTERM)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds sent first, not recorded")
    p.add_argument("--timeout", type=float, default=5.0, help="give a request up after S (5)")
    p.add_argument(
        "--header", type=_header, action="append", help="'Name: value' (repeat); Host too"
    )
    p.add_argument(
        "--interval",
        type=float,
        default=None,
        help="every S seconds print the outcomes and lag samples of that interval",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = uvloop.run(_command(args))
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    print(json.dumps({"summary": summary.to_json()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
