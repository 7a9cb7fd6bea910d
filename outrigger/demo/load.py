"""The demo's load: `python -m outrigger.loadgen` in a process of its own, sending GET to
frontend's sidecar inbound at a fixed rate, open loop, each request timed from when it was due.
`LoadFeed` keeps what it reports every quarter second (every outcome, the lateness of its send
timer) for the view, the story's checks, the summary and the latency guard.

Its latencies are exact (every request, nearest rank); a window is cut by when requests were
due, so a window's figures are those of the requests the generator owed in it."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from outrigger.demo.processes import json_message
from outrigger.loadgen import Outcome, outcome_from_json, percentile

REPORT_EVERY = 0.25  # seconds between the generator's interval lines
CONNECTIONS = 16


def loadgen_args(url: str, rate: float) -> list[str]:
    """The generator's arguments (after `python -m outrigger.loadgen`)."""
    return [
        url,
        "--rate",
        str(rate),
        "--connections",
        str(CONNECTIONS),
        "--interval",
        str(REPORT_EVERY),
    ]


@dataclass(frozen=True)
class Window:
    requests: int
    ok: int
    statuses: dict[int, int]  # 0: no answer (timeout, connect, closed)
    p50: float | None  # seconds from due to answered, of the answered requests
    p99: float | None
    lag_p50: float | None  # how late the generator's send timer fired
    lag_p99: float | None

    @property
    def success(self) -> float | None:
        return 100.0 * self.ok / self.requests if self.requests else None


class LoadFeed:
    """The generator's reports, bounded (at the default 50 req/s, the last ~1.1 hours)."""

    def __init__(self, keep: int = 200_000) -> None:
        self.outcomes: deque[Outcome] = deque(maxlen=keep)
        self.lags: deque[tuple[float, float]] = deque(maxlen=keep)
        self.started = False

    def feed(self, line: str) -> None:
        """One output line of the generator (called from the thread reading its output)."""
        message = json_message(line)
        if message is None:
            return
        if "interval" in message:
            got = message["interval"]
            self.outcomes.extend(outcome_from_json(item) for item in got["outcomes"])
            self.lags.extend((float(at), float(lag)) for at, lag in got["lags"])
        elif "started" in message:
            self.started = True

    def window(self, since: float, until: float = math.inf) -> Window:
        """The requests due in [since, until) that have been reported."""
        picked = [o for o in list(self.outcomes) if since <= o.intended < until]
        lags = sorted(lag for at, lag in list(self.lags) if since <= at < until)
        return summarize(picked, lags)

    def windows(self, spans: list[tuple[float, float]]) -> Window:
        """The requests due in any of `spans` ([start, end) each)."""
        outcomes, lags = list(self.outcomes), list(self.lags)

        def inside(t: float) -> bool:
            return any(start <= t < end for start, end in spans)

        return summarize(
            [o for o in outcomes if inside(o.intended)],
            sorted(lag for at, lag in lags if inside(at)),
        )


def summarize(outcomes: list[Outcome], lags: list[float]) -> Window:
    statuses: dict[int, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    answered = sorted(o.latency for o in outcomes if o.status)
    return Window(
        requests=len(outcomes),
        ok=sum(1 for o in outcomes if o.ok),
        statuses=statuses,
        p50=percentile(answered, 0.5) if answered else None,
        p99=percentile(answered, 0.99) if answered else None,
        lag_p50=percentile(lags, 0.5) if lags else None,
        lag_p99=percentile(lags, 0.99) if lags else None,
    )
