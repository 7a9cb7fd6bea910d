"""Write-side flow control, the same on both ends of the proxy (uvicorn's `FlowControl`).

The transport calls `pause_writing` above its high-water mark and `resume_writing` once it has
drained below the low one; a writer that must not outrun its peer awaits `drain()` (a
coroutine) or leaves a `drain_callback` (a callback writer: called once on the resume). In a tunnel
the other side's reading is paused meanwhile (`tunnel_flow`: pause, resume), so bytes never pile
up in the sidecar. Mixed into `DownstreamProtocol` and `UpstreamConnection`, which own the state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Waiting:
    """Mixed into what a coroutine can wait on (a body, a window, a drain): `_wait()` parks it
    on a fresh future in `_waiter` until `_wake_waiter()` resumes it, or `_fail_waiter(exc)`
    raises in it; both do nothing when nobody waits. The owner sets `_waiter` to None."""

    __slots__ = ("_waiter",)

    _waiter: asyncio.Future[None] | None

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake_waiter(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail_waiter(self, exc: BaseException) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)


class WriteFlow(Waiting):
    __slots__ = ("drain_callback", "tunnel_flow", "write_paused")

    write_paused: bool
    drain_callback: Callable[[], None] | None  # a writer to call back on the resume
    tunnel_flow: tuple[Callable[[], None], Callable[[], None]] | None
    closed: bool  # the connection's own

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.tunnel_flow is not None:
            self.tunnel_flow[0]()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.tunnel_flow is not None:
            self.tunnel_flow[1]()
        self._wake_waiter()  # a writer waiting in drain()
        callback = self.drain_callback
        if callback is not None:
            self.drain_callback = None
            callback()

    async def drain(self) -> None:
        """Return once the transport takes writes again (at once when it does now)."""
        if not self.write_paused or self.closed:
            return
        await self._wait()
