"""Watch the mesh file: poll, debounce bursts, reload.

The file is polled every `poll_interval` (its stat and a hash of its bytes, so an editor's
rename-over or a same-size rewrite is seen too). A change starts a debounce: the reload runs
once the file has been quiet for `debounce`, or `max_delay` after the first change of a burst
at the latest, so a stream of edits still reaches the sidecars within a second (Istio's
debounce, `PILOT_DEBOUNCE_AFTER` / `PILOT_DEBOUNCE_MAX`).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("outrigger.control_plane.watch")

Fingerprint = tuple[int, int, int, str] | None  # (inode, mtime_ns, size, sha256) or missing


def fingerprint(path: Path) -> Fingerprint:
    try:
        st = path.stat()
        data = path.read_bytes()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())


class FileWatcher:
    """Calls `on_change()` once per debounced burst of changes to `path` (and awaits it when it
    returns an awaitable)."""

    def __init__(
        self,
        path: Path,
        on_change: Callable[[], object],
        *,
        poll_interval: float = 0.1,
        debounce: float = 0.2,
        max_delay: float = 0.6,
    ) -> None:
        self.path = path
        self.on_change = on_change
        self.poll_interval = poll_interval
        self.debounce = debounce
        self.max_delay = max_delay
        self._seen: Fingerprint = fingerprint(path)  # as loaded before run() starts

    def mark_current(self) -> None:
        """Take the file as it is now as already loaded (call after the initial load)."""
        self._seen = fingerprint(self.path)

    async def run(self) -> None:
        """Poll until cancelled."""
        loop = asyncio.get_running_loop()
        first_change: float | None = None
        last_change = 0.0
        while True:
            await asyncio.sleep(self.poll_interval)
            now = loop.time()
            current = await asyncio.to_thread(fingerprint, self.path)
            if current != self._seen:
                self._seen = current
                last_change = now
                if first_change is None:
                    first_change = now
                log.debug("%s changed", self.path)
            if first_change is None:
                continue
            quiet = now - last_change >= self.debounce
            overdue = now - first_change >= self.max_delay
            if quiet or overdue:
                first_change = None
                if current is None:
                    log.warning("mesh file %s is missing; keeping the last good config", self.path)
                    continue
                result = self.on_change()
                if inspect.isawaitable(result):
                    await result
