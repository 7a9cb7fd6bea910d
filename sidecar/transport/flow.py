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


class WriteFlow:
    __slots__ = ("drain_callback", "drain_waiter", "tunnel_flow", "write_paused")

    write_paused: bool
    drain_waiter: asyncio.Future[None] | None  # a writer waiting in drain()
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
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        callback = self.drain_callback
        if callback is not None:
            self.drain_callback = None
            callback()

    async def drain(self) -> None:
        """Return once the transport takes writes again (at once when it does now)."""
        if not self.write_paused or self.closed:
            return
        self.drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self.drain_waiter
        finally:
            self.drain_waiter = None
