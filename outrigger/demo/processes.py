"""The processes the demo starts: each in its own process group, its bound ports read from the
line it prints, and all of them stopped (SIGTERM, then SIGKILL) within bounded waits."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ADDRESS = re.compile(r"(\w+)=([\d.]+):(\d+)")


class DemoError(Exception):
    """A process of the demo did not start, or a step could not be run."""


FIRST_LINES = 1000  # what `wait_line` searches: start-up lines


class Process:
    """One child process; a thread keeps its first and last output lines (for `wait_line` and
    error messages) and hands every line to `on_line`, if given (in that thread)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        pass_fds: tuple[int, ...] = (),
        env: Mapping[str, str] | None = None,  # added to this process's environment
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.name = name
        self.on_line = on_line
        self.lines: deque[str] = deque(maxlen=200)
        self._first: list[str] = []
        self._seen = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            pass_fds=pass_fds,
            start_new_session=True,  # its own process group: stopped as a whole
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        self._reader = threading.Thread(target=self._read, name=f"out-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip()
            if self.on_line is not None:
                self.on_line(line)
            with self._seen:
                self.lines.append(line)
                if len(self._first) < FIRST_LINES:
                    self._first.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> str:
        """The first output line containing `pattern`; DemoError after `timeout` or on exit."""
        deadline = time.monotonic() + timeout
        checked = 0
        with self._seen:
            while True:
                for line in self._first[checked:]:
                    if pattern in line:
                        return line
                checked = len(self._first)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n  ".join(list(self.lines)[-10:])
                    raise DemoError(f"{self.name} did not print {pattern!r}; output:\n  {tail}")
                self._seen.wait(min(left, 0.2))

    def addresses(self, pattern: str, timeout: float = 20.0) -> dict[str, tuple[str, int]]:
        line = self.wait_line(pattern, timeout)
        return {m[1]: (m[2], int(m[3])) for m in ADDRESS.finditer(line)}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)


def json_message(line: str) -> dict[str, Any] | None:
    """A JSON object a helper process printed as one line (the load generator, the trace
    receiver), or None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def stop_all(processes: list[Process], grace: float = 5.0) -> None:
    """SIGTERM every process group, wait at most `grace`, then SIGKILL what is left."""
    for p in processes:
        if p.proc.poll() is None:
            p.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(max(0.0, deadline - time.monotonic()))
    for p in processes:
        # the group too: a child the process started would otherwise survive it
        p.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(2.0)
        if p.proc.stdout is not None:
            p.proc.stdout.close()


def listening_socket() -> socket.socket:
    """A socket bound on 127.0.0.1 port 0 and listening, inheritable by a child."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def outrigger(*args: str) -> list[str]:
    """argv running this same `outrigger` (the console script beside this Python, else -m)."""
    script = Path(sys.executable).with_name("outrigger")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "outrigger.cli", *args]


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
