"""Giving the memory a burst freed back to the operating system (glibc's `malloc_trim`).

A burst of xDS work (a thousand sidecars connecting, or ACKing a push: at 1,000 services each
EDS ACK names every cluster, ~40 KB on the wire and ~80 KiB parsed) allocates and frees tens of
MiB in grpc-core's threads and ours. glibc keeps most of what was freed in its arenas, so the
resident size after a burst depended on its fragmentation: 184-260 MiB at rest across runs of
`tests/bench/k8s_scale.py` for the same ~180 MiB in use. `malloc_trim(0)` returns the free pages
in 3-5 ms there. `HeapTrimmer` calls it once the work has been quiet for `quiet` seconds (and at
least every `longest` seconds while it never is); where the C library has no `malloc_trim`
(musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("outrigger.control_plane.heap")

QUIET = 2.0  # seconds without activity before a trim
LONGEST = 30.0  # seconds of unbroken activity after which it trims anyway


def glibc_trim() -> Callable[[], object] | None:
    """`malloc_trim(0)` of the process's C library, or None when it has none."""
    try:
        found = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    found.argtypes = [ctypes.c_size_t]
    found.restype = ctypes.c_int
    return lambda: found(0)


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


class HeapTrimmer:
    """`poke()` on activity; the trim runs on the event loop once activity has stopped."""

    def __init__(
        self,
        trim: Callable[[], object] | None = None,
        *,
        quiet: float = QUIET,
        longest: float = LONGEST,
    ) -> None:
        self._trim = trim if trim is not None else glibc_trim()
        self.quiet = quiet
        self.longest = longest
        self.trims = 0
        self._first = 0.0  # loop time of the first poke since the last trim
        self._last = 0.0  # loop time of the last poke
        self._timer: asyncio.TimerHandle | None = None

    def poke(self) -> None:
        """Something allocated and freed: trim once it has been quiet (call on the loop)."""
        if self._trim is None:
            return
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        if self._timer is None:
            self._first = self._last
            self._timer = loop.call_at(self._last + self.quiet, self._due, loop)

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        when = min(self._last + self.quiet, self._first + self.longest)
        if when > now:
            self._timer = loop.call_at(when, self._due, loop)
            return
        self._timer = None
        self.trim()

    def trim(self) -> None:
        """Trim now (logged at debug level with the resident size before and after)."""
        if self._trim is None:
            return
        before, started = _rss_mib(), time.perf_counter()
        self._trim()
        self.trims += 1
        log.debug(
            "malloc_trim: RSS %.0f -> %.0f MiB in %.1f ms",
            before,
            _rss_mib(),
            (time.perf_counter() - started) * 1000,
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
