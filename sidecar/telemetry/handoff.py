"""The sidecar's end of the exporter: span records wait in a list, a loop callback hands them over.

A sampled request ends by appending one record (`record.Record`'s fields, a plain tuple) to
`Handoff.pending`; nothing else happens on the request path. A timer armed by the first record
(every `HANDOFF_INTERVAL` at most, sooner when a batch is full) marshals the list and writes it
to a non-blocking socket whose other end is the exporter process (`exporter.py`), started on
first use with `sys.executable -m sidecar.telemetry.exporter` and the sidecar's environment.

Bounds, and where each refused span is counted (`drops`, `outrigger_spans_dropped_total`):

- queue_full: records waiting here plus records the exporter has not finished with reach the
  queue size (OTEL_BSP_MAX_QUEUE_SIZE): the exporter's queue is full, as the SDK's would be.
  The exporter reports running totals back, so this holds across both processes.
- exporter_busy: the socket did not take a batch (the exporter is not reading fast enough).
  At most one partly written frame is kept, to finish it; later batches are dropped meanwhile.
- exporter_down: the exporter process is not running: it died (the spans it held are lost too)
  and is waiting to be restarted, or the sidecar is shutting down.
- export_failed: the collector failed them (reported by the exporter).

A dead exporter is restarted on the next hand-off after a backoff (0.5 s, doubling to 30 s,
back to 0.5 s once a batch is exported), and reaped: no zombie is left. On shutdown the
sidecar hands over what is pending, closes its side, and the exporter flushes, reports and
exits; one that has not exited by the deadline is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from opentelemetry.sdk.trace.export import SpanExporter

from sidecar.telemetry.exporter import (
    FLUSH,
    FLUSHED,
    SETTLED,
    SPANS,
    ExportLimits,
    FrameReader,
    frame,
    serve,
)
from sidecar.telemetry.record import Fields

log = logging.getLogger("outrigger.tracing")

HANDOFF_INTERVAL = 0.1  # seconds; at most OTEL_BSP_SCHEDULE_DELAY
RESTART_BACKOFF = (0.5, 30.0)  # seconds: first delay, cap
REAP_INTERVAL = 0.05  # seconds between checks that an exiting exporter is gone
DROP_REASONS = ("queue_full", "export_failed", "exporter_busy", "exporter_down")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class Peer(Protocol):
    """What runs the other end of the socket: the exporter process, or a thread (tests)."""

    @property
    def pid(self) -> int | None: ...

    def running(self) -> bool: ...

    def kill(self) -> None: ...


Start = Callable[[], tuple[socket.socket, Peer]]


class ExporterProcess:
    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None  # also reaps it once it has exited

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


class ExporterThread:
    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread

    @property
    def pid(self) -> int | None:
        return None

    def running(self) -> bool:
        return self.thread.is_alive()

    def kill(self) -> None:
        pass  # it stops at end of file, which closing our side gives it


def process_starter(service: str, endpoint: str, limits: ExportLimits) -> Start:
    """Starts `python -m sidecar.telemetry.exporter` with one end of a socket pair."""

    def start() -> tuple[socket.socket, Peer]:
        ours, theirs = socket.socketpair()
        try:
            env = dict(os.environ)
            # The exporter imports this package however the sidecar found it.
            path = env.get("PYTHONPATH")
            env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
            argv = [
                sys.executable,
                "-m",
                "sidecar.telemetry.exporter",
                "--fd",
                str(theirs.fileno()),
                "--service",
                service,
                "--endpoint",
                endpoint,
                *limits.argv(),
            ]
            proc = subprocess.Popen(
                argv,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=2,  # to stderr: the sidecar's stdout is the access log
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours, ExporterProcess(proc)

    return start


def thread_starter(exporter: SpanExporter, limits: ExportLimits, service: str) -> Start:
    """Runs the exporter's loop in a thread of this process, exporting with `exporter`."""

    def start() -> tuple[socket.socket, Peer]:
        ours, theirs = socket.socketpair()
        thread = threading.Thread(
            target=serve,
            args=(theirs, exporter, limits, service),
            name="outrigger-exporter",
            daemon=True,
        )
        thread.start()
        return ours, ExporterThread(thread)

    return start


class _Connection:
    __slots__ = ("closing", "frames", "out", "peer", "sent", "settled", "sock", "totals", "wake")

    def __init__(self, sock: socket.socket, peer: Peer) -> None:
        self.sock = sock
        self.peer = peer
        self.frames = FrameReader()
        self.out = bytearray()  # the rest of a frame the socket did not take at once
        self.sent = 0  # records written to this exporter
        self.settled = 0  # of which it has finished with (exported, failed or refused)
        self.totals = (0, 0, 0)  # its last report
        self.closing = False
        self.wake: asyncio.Future[None] | None = None  # shutdown waits on it


class Handoff:
    def __init__(self, limits: ExportLimits, drops: dict[str, int], start: Start) -> None:
        self.limits = limits
        self.drops = drops
        for reason in DROP_REASONS:
            drops.setdefault(reason, 0)
        self._start = start
        self._interval = min(HANDOFF_INTERVAL, limits.schedule_delay_millis / 1000)
        self._cap = limits.max_queue_size
        self._batch = limits.max_export_batch_size
        self.pending: list[Fields] = []
        self.unsettled = 0  # records the current exporter holds (sent, not reported finished)
        self.closed = False
        self.restarts = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._conn: _Connection | None = None
        self._dead: list[Peer] = []  # exited or killed, not yet reaped
        self._reaper: asyncio.TimerHandle | None = None
        self._backoff = RESTART_BACKOFF[0]
        self._next_start = 0.0
        self._tokens = itertools.count(1)
        self._waiters: dict[int, Callable[[bool], None]] = {}

    @property
    def pid(self) -> int | None:
        """The running exporter process, if any."""
        return self._conn.peer.pid if self._conn is not None else None

    # --- the request path ----------------------------------------------------------------

    def add(self, record: Fields) -> None:
        pending = self.pending
        if len(pending) + self.unsettled >= self._cap:
            self.drops["queue_full"] += 1
            return
        if self.closed:
            self.drops["exporter_down"] += 1
            return
        pending.append(record)
        timer = self._timer
        if timer is None:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._interval, self.hand_over)
        elif len(pending) == self._batch:
            assert self._loop is not None
            timer.cancel()
            self._timer = self._loop.call_soon(self.hand_over)

    # --- the loop callbacks --------------------------------------------------------------

    def hand_over(self) -> None:
        """Write what is pending to the exporter (starting it if need be), or count it dropped."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._reap()
        pending = self.pending
        if not pending:
            return
        self.pending = []
        conn = self._connection()
        if conn is None:
            self.drops["exporter_down"] += len(pending)
            return
        batch = self._batch
        for i in range(0, len(pending), batch):
            chunk = pending[i : i + batch]
            if conn.out or conn is not self._conn:  # still writing the last frame, or lost
                reason = "exporter_busy" if conn is self._conn else "exporter_down"
                self.drops[reason] += len(chunk)
                continue
            try:
                data = frame((SPANS, chunk))  # records are plain tuples already
            except ValueError:  # a value marshal cannot carry: a bug in the record
                log.exception("tracing: cannot encode %d span records", len(chunk))
                self.drops["export_failed"] += len(chunk)
                continue
            written = self._write(conn, data, whole=False)
            if written:
                conn.sent += len(chunk)
                self.unsettled += len(chunk)
            else:
                reason = "exporter_busy" if conn is self._conn else "exporter_down"
                self.drops[reason] += len(chunk)

    def _connection(self) -> _Connection | None:
        conn = self._conn
        if conn is not None or self.closed:
            return conn
        loop = self._loop
        assert loop is not None
        if loop.time() < self._next_start:
            return None
        try:
            sock, peer = self._start()
        except (OSError, subprocess.SubprocessError) as exc:
            self._next_start = loop.time() + self._backoff
            log.warning(
                "tracing: cannot start the exporter (%s); retrying in %gs", exc, self._backoff
            )
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF[1])
            return None
        sock.setblocking(False)
        conn = self._conn = _Connection(sock, peer)
        loop.add_reader(sock.fileno(), self._readable, conn)
        return conn

    def _write(self, conn: _Connection, data: bytes, *, whole: bool) -> bool:
        """Write a frame, keeping what the socket does not take. `whole`: a control frame,
        queued behind a partly written one; else a frame the socket refuses outright is not
        written (False)."""
        if conn.out:
            if not whole:
                return False
            conn.out += data
            return True
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
            if not whole:
                return False
        except OSError:
            self._lost(conn)
            return False
        if sent < len(data):
            conn.out += data[sent:]
            assert self._loop is not None
            self._loop.add_writer(conn.sock.fileno(), self._writable, conn)
        return True

    def _writable(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost(conn)
            return
        del conn.out[:sent]
        if not conn.out:
            assert self._loop is not None
            self._loop.remove_writer(conn.sock.fileno())
            _wake(conn)

    def _readable(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost(conn)
            return
        try:
            for message in conn.frames.feed(data):
                self._message(conn, message)
        except (ValueError, EOFError, TypeError):
            log.exception("tracing: unreadable message from the exporter")
            self._lost(conn)

    def _message(self, conn: _Connection, message: tuple[Any, ...]) -> None:
        if message[0] == SETTLED:
            exported, failed, dropped = message[1:4]
            before = conn.totals
            conn.totals = (exported, failed, dropped)
            done = exported + failed + dropped - sum(before)
            conn.settled += done
            self.unsettled -= done
            self.drops["export_failed"] += failed - before[1]
            self.drops["queue_full"] += dropped - before[2]
            if exported > before[0]:
                self._backoff = RESTART_BACKOFF[0]
        elif message[0] == FLUSHED:
            waiter = self._waiters.pop(message[1], None)
            if waiter is not None:
                waiter(bool(message[2]))

    def _lost(self, conn: _Connection) -> None:
        """The exporter's socket closed: it exited (or is exiting). What it held is lost."""
        if conn is not self._conn:
            return
        self._conn = None
        loop = self._loop
        assert loop is not None
        fd = conn.sock.fileno()
        if fd >= 0:
            loop.remove_reader(fd)
            loop.remove_writer(fd)
        conn.sock.close()
        lost = conn.sent - conn.settled
        if lost > 0:
            self.drops["exporter_down"] += lost
        self.unsettled = 0
        conn.out.clear()
        for waiter in self._waiters.values():
            waiter(False)
        self._waiters.clear()
        self._dead.append(conn.peer)
        if not conn.closing:
            conn.peer.kill()  # it closed its socket: make sure it is gone, then reap it
            self.restarts += 1
            self._next_start = loop.time() + self._backoff
            log.warning(
                "tracing: the exporter process (pid %s) exited; %d spans it held are dropped; "
                "restarting it in %gs",
                conn.peer.pid,
                max(lost, 0),
                self._backoff,
            )
            self._backoff = min(self._backoff * 2, RESTART_BACKOFF[1])
        self._reap()
        _wake(conn)

    def _reap(self) -> None:
        """Collect exited exporters; check again shortly while one is still exiting."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        if self._dead:
            self._dead = [peer for peer in self._dead if peer.running()]
            if self._dead and self._loop is not None and not self._loop.is_closed():
                self._reaper = self._loop.call_later(REAP_INTERVAL, self._reap)

    # --- flush and shutdown --------------------------------------------------------------

    def request_flush(self, timeout: float, done: Callable[[bool], None]) -> None:
        """On the loop: hand everything over, then `done(ok)` once the exporter exported it."""
        self.hand_over()
        conn = self._conn
        if conn is None:
            done(not self.pending)
            return
        token = next(self._tokens)
        self._waiters[token] = done
        if not self._write(conn, frame((FLUSH, token, int(timeout * 1000))), whole=True):
            self._waiters.pop(token, None)
            done(False)

    def force_flush(self, timeout: float) -> bool:
        """Blocking: from another thread while the loop runs, or with the loop stopped."""
        loop = self._loop
        if loop is None:
            return True  # nothing was ever recorded
        result: list[bool] = []
        finished = threading.Event()

        def done(ok: bool) -> None:
            result.append(ok)
            finished.set()

        def on_loop() -> None:
            self.request_flush(timeout, done)

        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop.is_running() and running is not loop:
            loop.call_soon_threadsafe(on_loop)
            finished.wait(timeout)
            return bool(result and result[0])
        # The loop cannot run our callbacks: do their work here, blocking on the socket.
        on_loop()
        return self._pump(timeout, finished) and bool(result and result[0])

    def _pump(self, timeout: float, finished: threading.Event) -> bool:
        import selectors
        import time

        deadline = time.monotonic() + timeout
        while not finished.is_set():
            conn = self._conn
            left = deadline - time.monotonic()
            if conn is None or left <= 0:
                return finished.is_set()
            with selectors.DefaultSelector() as selector:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
                selector.register(conn.sock, events)
                for _, mask in selector.select(left):
                    if mask & selectors.EVENT_WRITE:
                        self._writable(conn)
                    if mask & selectors.EVENT_READ and conn is self._conn:
                        self._readable(conn)
        return True

    async def shutdown(self, timeout: float) -> bool:
        """Hand over what is pending, let the exporter flush and exit; kill it at the deadline."""
        self.closed = True
        loop = self._loop
        if loop is None:
            return True  # never started
        deadline = loop.time() + timeout
        self.hand_over()
        clean = True
        conn = self._conn
        if conn is not None:
            conn.closing = True
            try:
                async with asyncio.timeout_at(deadline):
                    while conn.out and conn is self._conn:
                        await _sleep_on(conn, loop)
                    if conn is self._conn:
                        with contextlib.suppress(OSError):
                            conn.sock.shutdown(socket.SHUT_WR)  # end of file: flush and exit
                    while conn is self._conn:
                        await _sleep_on(conn, loop)
            except TimeoutError:
                clean = False
            self._lost(conn)
        killed = False
        while True:
            self._reap()
            if not self._dead:
                break
            if loop.time() >= deadline:
                if killed:
                    break  # a thread cannot be killed (it is a daemon); a process is gone by now
                clean, killed = False, True
                for peer in self._dead:
                    peer.kill()
                deadline = loop.time() + 1.0  # SIGKILL: gone as soon as it is scheduled
            await asyncio.sleep(0.01)
        if self._reaper is not None:
            self._reaper.cancel()  # what is left is a thread, which ends on its own
            self._reaper = None
        if not clean:
            log.warning("tracing: the exporter did not finish within %gs at shutdown", timeout)
        return clean


def _wake(conn: _Connection) -> None:
    if conn.wake is not None and not conn.wake.done():
        conn.wake.set_result(None)


async def _sleep_on(conn: _Connection, loop: asyncio.AbstractEventLoop) -> None:
    conn.wake = loop.create_future()
    await conn.wake
