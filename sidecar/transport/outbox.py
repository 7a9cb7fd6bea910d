"""Writes held to the end of the event loop's round of I/O callbacks, then made together.

A proxy that writes as soon as it has something to send spaces its writes by the Python work
between them, and on a loopback or a fast network each write then finds its peer (the client,
the upstream) asleep in epoll_wait: the write pays the peer's wake-up in the kernel, one per
request and direction. Held to the end of the loop's round (uvloop runs `call_soon` callbacks
after the round of I/O callbacks), the writes of one round go out back to back and wake a peer
once per round. An asyncio task per request gives that batching by accident (its writes run as
task steps, after the I/O callbacks); the request path here has no task, so it holds its two
fast-path writes (the request head to the upstream, the whole response to the client) in the
connection's `held` until `Outbox.flush` runs. Measured in tests/bench/README.md ("Under load").

A connection that holds a write releases it before any other write, close or half-close of its
own (`release_held`), so its bytes keep their order; an abort drops it with the rest of the
transport's buffer.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Protocol


class Holder(Protocol):
    """A connection whose held bytes the outbox writes (`release_held`, its method)."""

    held: bytes | None
    closed: bool

    @property
    def transport(self) -> asyncio.Transport | None: ...

    def release_held(self) -> None: ...


class Outbox:
    """The connections holding a write on one loop; `flush` runs once per round."""

    __slots__ = ("call_soon", "flush", "held")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.held: list[Holder] = []
        self.call_soon = loop.call_soon
        self.flush = self._flush  # bound once: scheduled once per round

    def hold(self, holder: Holder) -> None:
        """`holder` has just set its held bytes: write them at the end of this round."""
        held = self.held
        if not held:
            self.call_soon(self.flush)
        held.append(holder)

    def _flush(self) -> None:
        held = self.held
        self.held = []
        for holder in held:
            holder.release_held()


def release_held(holder: Holder) -> None:
    """Write `holder`'s held bytes now: the outbox's flush, and before any other write, close
    or half-close of that connection, so that its bytes keep their order. Both connection
    classes take it as their `release_held` method."""
    data = holder.held
    if data is not None:
        holder.held = None
        transport = holder.transport
        if transport is not None and not holder.closed:
            transport.write(data)


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Outbox] = (
    weakref.WeakKeyDictionary()
)


def outbox(loop: asyncio.AbstractEventLoop) -> Outbox:
    """The loop's outbox (one per loop; looked up once per connection)."""
    box = _outboxes.get(loop)
    if box is None:
        box = _outboxes[loop] = Outbox(loop)
    return box
