"""CPU use of the demo's processes, by role, and of the whole machine, from /proc (Linux).

The view and the summary show it so that a starved demo is visible as such: the demo's own
machinery (this process, the load generator, the trace receiver) beside the mesh (sidecars,
control plane), the apps, and everything else the machine runs. A process's children (a
sidecar's span exporter) count with it. Where /proc is missing every figure is None.

Shares are of one core: 150% is one and a half cores busy.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
DEMO = "demo"  # the roles' names, in the order they are shown
ROLES = (DEMO, "sidecars", "apps", "control plane")


def process_seconds(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds so far: user + system) of a live process."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def machine_seconds() -> tuple[float, float] | None:
    """(busy, all) CPU seconds of every core since boot."""
    try:
        first = (PROC / "stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK, sum(ticks) / TICK


@dataclass(frozen=True)
class Sample:
    at: float
    roles: dict[str, float]  # CPU seconds so far, summed over the role's processes
    parts: dict[str, float]  # CPU seconds so far of each named process
    machine_busy: float | None
    machine_all: float | None


@dataclass(frozen=True)
class Usage:
    """CPU use between two samples, in % of one core."""

    seconds: float
    roles: dict[str, float]
    parts: dict[str, float]
    machine: float | None  # every core together
    cores: int

    @property
    def ours(self) -> float:
        return sum(self.roles.values())

    @property
    def others(self) -> float | None:
        return None if self.machine is None else max(0.0, self.machine - self.ours)


class CpuMeter:
    """Watches named processes by role; `sample()` now and then, `usage()` over a window."""

    def __init__(self, keep: int = 600) -> None:
        self.roles: dict[int, tuple[str, str]] = {}  # pid -> (role, name)
        self.children: dict[int, int] = {}  # child pid -> watched ancestor pid
        self.samples: deque[Sample] = deque(maxlen=keep)
        self._gone: dict[str, float] = {}  # CPU seconds of processes that ended, by role
        self._last: dict[int, float] = {}
        self._scanned = 0.0
        self.cores = os.cpu_count() or 1

    def watch(self, pid: int, role: str, name: str) -> None:
        self.roles[pid] = (role, name)

    def _scan_children(self, pids: Iterable[int]) -> None:
        """Find the descendants of the watched processes (a full pass over /proc)."""
        parents: dict[int, int] = {}
        for pid in pids:
            found = process_seconds(pid)
            if found is not None:
                parents[pid] = found[0]
        watched = set(self.roles)
        changed = True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if pid in watched or pid in self.children:
                    continue
                owner = ppid if ppid in self.roles else self.children.get(ppid)
                if owner is not None:
                    self.children[pid] = owner
                    changed = True

    def sample(self, rescan_every: float = 5.0) -> Sample:
        now = time.monotonic()
        if now - self._scanned >= rescan_every:
            self._scanned = now
            try:
                pids = [int(d) for d in os.listdir(PROC) if d.isdigit()]
            except OSError:
                pids = []
            self._scan_children(pids)
        roles = {role: self._gone.get(role, 0.0) for role in ROLES}
        parts: dict[str, float] = {}
        for pid in [*self.roles, *self.children]:
            owner = self.children.get(pid, pid)
            role, name = self.roles[owner]
            found = process_seconds(pid)
            if found is None:  # ended: keep what it used, so totals never go back
                last = self._last.pop(pid, None)
                if last is not None:
                    self._gone[role] = self._gone.get(role, 0.0) + last
                    roles[role] = roles.get(role, 0.0) + last
                self.children.pop(pid, None)
                continue
            self._last[pid] = found[1]
            roles[role] = roles.get(role, 0.0) + found[1]
            parts[name] = parts.get(name, 0.0) + found[1]
        machine = machine_seconds()
        sample = Sample(
            now,
            roles,
            parts,
            machine[0] if machine else None,
            machine[1] if machine else None,
        )
        self.samples.append(sample)
        return sample

    def usage(self, window: float | None = 2.0, least: float = 0.5) -> Usage | None:
        """Between the newest sample and the oldest one at most `window` seconds older (None:
        the first sample); None until two samples `least` seconds apart (/proc counts CPU in
        hundredths of a second)."""
        if len(self.samples) < 2 or self.samples[-1].at - self.samples[0].at < least:
            return None
        new = self.samples[-1]
        old = self.samples[0]
        if window is not None:
            for s in self.samples:
                if new.at - s.at <= window + 0.05:
                    old = s
                    break
        return between(old, new, self.cores)


def between(old: Sample, new: Sample, cores: int) -> Usage | None:
    seconds = new.at - old.at
    if seconds <= 0:
        return None

    def share(a: float, b: float) -> float:
        return max(0.0, 100.0 * (b - a) / seconds)

    machine = None
    if new.machine_busy is not None and old.machine_busy is not None:
        assert new.machine_all is not None and old.machine_all is not None
        span = new.machine_all - old.machine_all
        if span > 0:
            machine = 100.0 * cores * (new.machine_busy - old.machine_busy) / span
    return Usage(
        seconds=seconds,
        roles={r: share(old.roles.get(r, 0.0), v) for r, v in new.roles.items()},
        parts={n: share(old.parts.get(n, 0.0), v) for n, v in new.parts.items()},
        machine=machine,
        cores=cores,
    )
