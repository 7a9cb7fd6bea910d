"""Bodies in flight: bytes from one connection waiting to be written to the other.

A `BodyStream` is filled by a Protocol's `data_received` and read by whoever writes it out: the
server takes a response body with `take()` and asks to be called back (`notify`) when nothing
has arrived yet, so a response streams without a coroutine; the forwarder's pump task reads a
request body with `chunks()` (or takes it `whole()` when it is already in hand). It holds at
most `high_water` unread bytes before it asks its producer to pause reading, and asks it to
resume below `low_water`: this is what keeps a 1 GiB upload from growing the sidecar's memory
(uvicorn's flow control, both directions).

A request body of at most `keep_limit` bytes is kept whole so that a retry can send it again
(`replayable`); a larger one is streamed once and forgotten as it goes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from sidecar.exchange import BodyNotReplayable
from sidecar.transport.flow import Waiting

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class BodyReset(Exception):
    """The producing connection closed before the body was complete."""


class _EmptyBody:
    """No body at all: replayable, nothing to read."""

    __slots__ = ()

    replayable = True
    length: int | None = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover - makes this an async generator

    def whole(self) -> bytes:
        return b""

    def take(self) -> bytes:
        return b""

    def notify(self, callback: Callable[[], None]) -> None:
        callback()

    async def read(self) -> bytes:
        return b""

    def when_done(self, callback: Callable[[], None]) -> None:
        callback()

    def discard(self) -> None:
        return None


EMPTY_BODY = _EmptyBody()


class BodyStream(Waiting):
    """Bytes from a producer, read by one consumer at a time, with backpressure."""

    __slots__ = (
        "_chunks",
        "_done_callbacks",
        "_dropped",
        "_error",
        "_finished",
        "_keep",
        "_kept_bytes",
        "_limit",
        "_notify",
        "_on_discard",
        "_on_first_read",
        "_pause",
        "_paused",
        "_read_upto",
        "_reads",
        "_resume",
        "_unread",
        "high_water",
        "length",
        "low_water",
    )

    def __init__(
        self,
        length: int | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
        *,
        keep_limit: int = 0,
        high_water: int = HIGH_WATER,
        low_water: int = LOW_WATER,
        on_first_read: Callable[[], None] | None = None,
        on_discard: Callable[[], None] | None = None,
    ) -> None:
        self.length = length
        self._pause = pause
        self._resume = resume
        self._paused = False
        self.high_water = high_water
        self.low_water = low_water
        self._chunks: list[bytes] = []
        self._dropped = 0  # chunks already released from the front of _chunks
        self._read_upto = 0  # absolute index of the furthest chunk any reader has taken
        self._unread = 0  # bytes fed but not yet taken by the furthest reader
        self._keep = length is not None and length <= keep_limit
        if length is None and keep_limit > 0:
            self._keep = True  # chunked: keep while it stays under the limit
        self._kept_bytes = 0
        self._finished = False
        self._error: BaseException | None = None
        self._waiter = None
        self._notify: Callable[[], None] | None = None  # the taker's callback (notify)
        self._reads = 0
        self._on_first_read = on_first_read
        self._on_discard = on_discard
        self._limit = keep_limit
        self._done_callbacks: list[Callable[[], None]] | None = []

    # --- producer side -------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._unread += len(data)
        if self._keep:
            self._kept_bytes += len(data)
            if self._kept_bytes > self._limit:
                self._keep = False
        if self._unread > self.high_water and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self) -> None:
        self._finished = True
        if self._paused:
            # Nothing more comes for this body: a producer kept paused would only hold up what
            # its connection carries next (a pooled upstream connection's next response).
            self._paused = False
            self._resume()
        self._wake()
        self._run_done_callbacks()

    def fail(self, error: BaseException) -> None:
        if not self._finished:
            self._error = error
            self._finished = True
        self._wake()
        self._run_done_callbacks()

    @property
    def finished(self) -> bool:
        return self._finished and self._error is None

    # --- consumer side -------------------------------------------------------------------

    @property
    def replayable(self) -> bool:
        return self._keep

    def chunks(self) -> AsyncIterator[bytes]:
        self._reads += 1
        if self._reads > 1 and not self._keep:
            raise BodyNotReplayable("the request body was streamed and is not kept for retries")
        if self._reads == 1 and self._on_first_read is not None:
            self._on_first_read()
        return self._read()

    async def _read(self) -> AsyncIterator[bytes]:
        index = 0
        while True:
            position = index - self._dropped
            if position < 0:
                raise BodyNotReplayable("the request body was streamed and is not kept for retries")
            if position < len(self._chunks):
                data = self._chunks[position]
                index += 1
                if index > self._read_upto:
                    self._read_upto = index
                    self._taken(len(data))
                if not self._keep:
                    # Nobody will read these again: let them go.
                    del self._chunks[: index - self._dropped]
                    self._dropped = index
                yield data
                continue
            if self._finished:
                if self._error is not None:
                    raise BodyReset(str(self._error)) from self._error
                return
            await self._wait()

    def whole(self) -> bytes | None:
        """The whole body when it has all arrived and none of it was streamed away (counted as
        a read, as `chunks()` is); None otherwise."""
        if not self._finished or self._error is not None or self._dropped:
            return None
        if self._reads and not self._keep:
            return None  # read once already and not kept
        self._reads += 1
        if self._reads == 1 and self._on_first_read is not None:
            self._on_first_read()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(chunks) > self._read_upto:
            self._read_upto = len(chunks)
            self._taken(self._unread)
        if not self._keep:
            self._dropped = len(chunks)
            chunks.clear()
        return data

    def take(self) -> bytes | None:
        """The single-reader API (response bodies): every byte fed since the last take,
        joined; b"" once the body ended; None when nothing new has arrived (see `notify`).
        Not to be mixed with `chunks()`; a body read this way is not kept for replay."""
        self._keep = False
        chunks = self._chunks
        if chunks:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._dropped += len(chunks)
            self._read_upto = self._dropped
            chunks.clear()
            self._taken(len(data))
            return data
        if self._finished:
            if self._error is not None:
                raise BodyReset(str(self._error)) from self._error
            return b""
        return None

    def notify(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when `take()` has something new (at once if it has now)."""
        if self._chunks or self._finished:
            callback()
        else:
            self._notify = callback

    async def read(self) -> bytes:
        """`take()` for a coroutine: waits while nothing new has arrived."""
        while True:
            data = self.take()
            if data is not None:
                return data
            await self._wait()

    def when_done(self, callback: Callable[[], None]) -> None:
        callbacks = self._done_callbacks
        if callbacks is None:
            callback()
        else:
            callbacks.append(callback)

    def discard(self) -> None:
        if self._on_discard is not None:
            callback, self._on_discard = self._on_discard, None
            # A body that arrived whole has already had its connection pooled or closed by the
            # exchange; that connection may now serve another request, so leave it alone.
            if not self.finished:
                callback()
        self._chunks.clear()
        self._notify = None  # nobody takes a discarded body
        self._run_done_callbacks()

    # --- internals -----------------------------------------------------------------------

    def _taken(self, size: int) -> None:
        self._unread -= size
        if self._paused and self._unread <= self.low_water:
            self._paused = False
            self._resume()

    def _run_done_callbacks(self) -> None:
        callbacks, self._done_callbacks = self._done_callbacks, None
        if callbacks:
            for callback in callbacks:
                callback()

    def _wake(self) -> None:
        waiter = self._waiter  # _wake_waiter inline: this runs for every chunk fed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        callback = self._notify
        if callback is not None:
            self._notify = None
            callback()


class BytesBody:
    """A body already in memory (admin pages, local responses)."""

    __slots__ = ("_data", "_unread")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._unread = True  # for read(): the one reader has not had the bytes yet

    @property
    def replayable(self) -> bool:
        return True

    @property
    def length(self) -> int | None:
        return len(self._data)

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._data:
            yield self._data

    def whole(self) -> bytes:
        return self._data

    def take(self) -> bytes:
        if self._unread:
            self._unread = False
            return self._data
        return b""

    def notify(self, callback: Callable[[], None]) -> None:
        callback()

    async def read(self) -> bytes:
        return self.take()

    def when_done(self, callback: Callable[[], None]) -> None:
        callback()

    def discard(self) -> None:
        return None
