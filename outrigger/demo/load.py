"""The load generator: GET frontend at a steady rate through frontend's sidecar inbound, and keep
what it saw (status, latency) for the view, the story's checks and the summary."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Outcome:
    at: float  # monotonic time of the answer
    status: int  # 0: no answer (connection error, client timeout)
    seconds: float


@dataclass(frozen=True)
class Window:
    requests: int
    ok: int
    statuses: dict[int, int]
    p50: float | None
    p99: float | None

    @property
    def success(self) -> float | None:
        return 100.0 * self.ok / self.requests if self.requests else None


class LoadGenerator:
    def __init__(self, url: str, rate: float, max_in_flight: int = 256) -> None:
        self.url = url
        self.rate = rate
        self.max_in_flight = max_in_flight
        self.outcomes: deque[Outcome] = deque(maxlen=100_000)
        self.sent = 0
        self.ok = 0
        self.skipped = 0  # not sent: max_in_flight reached
        self._tasks: set[asyncio.Task[None]] = set()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(5.0),
            trust_env=False,
            limits=httpx.Limits(max_connections=max_in_flight, max_keepalive_connections=64),
        )

    async def _one(self) -> None:
        start = time.monotonic()
        try:
            reply = await self.client.get(self.url)
            status = reply.status_code
        except httpx.HTTPError:
            status = 0
        end = time.monotonic()
        self.outcomes.append(Outcome(end, status, end - start))
        if 0 < status < 500:
            self.ok += 1

    async def run(self, stop: asyncio.Event) -> None:
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        while not stop.is_set():
            if len(self._tasks) < self.max_in_flight:
                task = asyncio.create_task(self._one())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                self.sent += 1
            else:
                self.skipped += 1
            next_at += interval
            delay = next_at - time.monotonic()
            if delay < -1.0:  # fell far behind (a stalled loop): do not burst to catch up
                next_at = time.monotonic()
            elif delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self.client.aclose()

    def window(self, since: float, until: float | None = None) -> Window:
        """What was answered in [since, until)."""
        end = until if until is not None else float("inf")
        picked = [o for o in self.outcomes if since <= o.at < end]
        statuses: dict[int, int] = {}
        for o in picked:
            statuses[o.status] = statuses.get(o.status, 0) + 1
        ok = sum(1 for o in picked if 0 < o.status < 500)
        lat = sorted(o.seconds for o in picked)
        return Window(
            requests=len(picked),
            ok=ok,
            statuses=statuses,
            p50=lat[len(lat) // 2] if lat else None,
            p99=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
        )
