"""Pods on one machine: a network namespace each, joined by a veth pair, for tests run as root.

`two_pods()` makes a "client" and a "server" pod: their own namespace (unique names per test,
so parallel runs and leftovers from a killed run never collide), a veth pair between them with
10.0.0.1/24 + fd00::1/64 on the client and 10.0.0.2/24 + fd00::2/64 on the server, loopback
up, and each pod's default route via the other (so that a connection to a virtual address, a
Service's ClusterIP that no interface has, is routed at all and can be redirected). Everything
is removed on the way out, whatever happened: the processes started in the pods (by their own
pid), then the namespaces (the veth pair goes with them).

`Pod.run` runs a command in a pod and waits (bounded); `Pod.start` starts a long-running one
whose output goes to a log file, with `wait_for` (JSON lines) and `wait_for_text` to read it.
Either can switch to another uid with setpriv (util-linux, which Debian always has): `uid=1337`
is the sidecar's user, the one the interception rules leave alone.

Tests that use this are marked `@pytest.mark.root` and call `require_root()`, which skips them,
with the reason, when not root; missing tools (ip, setpriv, iptables-restore) fail loudly, since
CI installs them (.ci/run).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
COMMAND_TIMEOUT = 30.0  # seconds for one command in a pod
START_TIMEOUT = 10.0  # seconds for a started process to say it is ready
POLL = 0.02
TOOLS = {"ip": "iproute2", "setpriv": "util-linux", "iptables-restore": "iptables"}
_names = itertools.count()


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, veth pairs and iptables (CI runs it)")
    missing = [
        f"{tool} (Debian package {pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool)
    ]
    if missing:
        pytest.fail("namespace tests need " + ", ".join(missing) + ": see .ci/run")
    problem = _python_as_proxy_user()
    if problem:
        pytest.fail(problem)


@functools.cache
def _python_as_proxy_user() -> str:
    """Why uid 1337 cannot run this Python with the repo's packages; empty when it can."""
    argv = ["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups",
            PYTHON, "-c", "import sidecar.transport.tcp"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          cwd=REPO, env=_env())  # fmt: skip
    if done.returncode == 0:
        return ""
    return (
        f"uid 1337 (the sidecar's user) cannot run {PYTHON} with this repo: {done.stderr.strip()}"
        " -- the namespace tests run the stand-in sidecar as that user; use a Python (and a"
        " checkout) every user can read"
    )


def sh(argv: list[str], *, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a command on the host; its output, or an error that shows what it said."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr}{done.stdout}"
        )
    return done.stdout


class PodProcess:
    """A process started in a pod; its stdout and stderr go to `log`."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                cwd=REPO, env=env,
            )  # fmt: skip

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.output().splitlines() if line.startswith("{")]

    def wait_for(
        self,
        found: Callable[[list[dict[str, Any]]], bool],
        what: str,
        timeout: float = START_TIMEOUT,
    ) -> list[dict[str, Any]]:
        """The process's JSON lines once `found` holds for them; fails after `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.json_lines()
            if found(lines):
                return lines
            if self.popen.poll() is not None:
                break
            time.sleep(POLL)
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        raise AssertionError(f"{self.name} ({state}): never {what}:\n{self.output()[-3000:]}")

    def wait_for_text(self, text: str, timeout: float = START_TIMEOUT) -> str:
        """The output once it holds `text` (a line a process prints when ready, not JSON)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.output()
            if text in output:
                return output
            if self.popen.poll() is not None:
                break
            time.sleep(POLL)
        state = "running" if self.popen.poll() is None else f"exited {self.popen.returncode}"
        raise AssertionError(
            f"{self.name} ({state}): never printed {text!r}:\n{self.output()[-3000:]}"
        )

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=5)


@dataclass
class Pod:
    name: str  # the network namespace
    ip: str
    ip6: str
    logs: Path
    processes: list[PodProcess] = field(default_factory=list)

    def argv(self, argv: list[str], uid: int | None) -> list[str]:
        user = (
            [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        )
        return ["ip", "netns", "exec", self.name, *user, *argv]

    def run(
        self, argv: list[str], *, uid: int | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            self.argv(argv, uid), capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            cwd=REPO, env=_env(),
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {' '.join(argv)} exited {done.returncode}:\n"
                f"{done.stderr}{done.stdout}"
            )
        return done

    def python(
        self, *args: str, uid: int | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.run([PYTHON, *args], uid=uid, check=check)

    def start(self, name: str, argv: list[str], *, uid: int | None = None) -> PodProcess:
        log = self.logs / f"{self.name}.{name}.{len(self.processes)}.log"
        process = PodProcess(f"{name} in {self.name}", self.argv(argv, uid), log, _env())
        self.processes.append(process)
        return process

    def iptables_save(self, family: int = 4) -> str:
        command = "iptables-save" if family == 4 else "ip6tables-save"
        return self.run([command, "-t", "nat"]).stdout


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # uid 1337 cannot write __pycache__ here
    env["PYTHONPATH"] = str(REPO)
    return env


@contextlib.contextmanager
def two_pods(logs: Path) -> Iterator[tuple[Pod, Pod]]:
    """A client and a server pod joined by a veth pair; removed on the way out."""
    unique = f"or{os.getpid()}n{next(_names)}"
    client = Pod(f"{unique}-client", "10.0.0.1", "fd00::1", logs)
    server = Pod(f"{unique}-server", "10.0.0.2", "fd00::2", logs)
    made: list[str] = []
    veth = (f"{unique}c"[-15:], f"{unique}s"[-15:])  # interface names are at most 15 bytes
    try:
        for pod in (client, server):
            sh(["ip", "netns", "add", pod.name])
            made.append(pod.name)
        sh(["ip", "link", "add", veth[0], "type", "veth", "peer", "name", veth[1]])
        for pod, dev in zip((client, server), veth, strict=True):
            sh(["ip", "link", "set", dev, "netns", pod.name])
            sh(["ip", "-n", pod.name, "link", "set", "lo", "up"])
            sh(["ip", "-n", pod.name, "addr", "add", f"{pod.ip}/24", "dev", dev])
            sh(["ip", "-n", pod.name, "-6", "addr", "add", f"{pod.ip6}/64", "dev", dev, "nodad"])
            sh(["ip", "-n", pod.name, "link", "set", dev, "up"])
        for pod, peer in ((client, server), (server, client)):
            sh(["ip", "-n", pod.name, "route", "add", "default", "via", peer.ip])
        yield client, server
    finally:
        for pod in (client, server):
            for process in pod.processes:
                process.stop()
        for name in made:
            subprocess.run(
                ["ip", "netns", "del", name], capture_output=True, timeout=COMMAND_TIMEOUT
            )
        # a pair never moved into the pods (a failure half-way) is still on the host
        subprocess.run(["ip", "link", "del", veth[0]], capture_output=True, timeout=COMMAND_TIMEOUT)
