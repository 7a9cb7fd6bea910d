"""`outrigger demo --duration N` end to end: the whole mesh starts, the story plays, every step is
checked by the demo itself, and every process it started is gone afterwards."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DURATION = 16  # the story takes ~14 s after start-up
OUTRIGGER = Path(sys.executable).with_name("outrigger")


@pytest.mark.timeout(120)
def test_demo_plays_the_whole_story_and_reports_every_step_happened(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [str(OUTRIGGER), "demo", "--duration", str(DURATION)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=DURATION + 60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    text = out.read_text()
    assert code == 0, text
    assert "outrigger demo summary" in text, text
    steps = re.findall(r"^  step \d+: (.*)$", text, re.M)
    assert len(steps) == 8, text
    for step in steps:
        assert ": happened (" in step, step
    assert "result: every step happened" in text
    m = re.search(r"requests: (\d+)  success: ([\d.]+)%", text)
    assert m is not None, text
    assert int(m[1]) >= DURATION * 50 * 0.8
    # the only failures are the ones the story causes on purpose: ~3-4 s of 504 UT out of 16 s
    assert float(m[2]) >= 70.0, text
    m = re.search(r"ejections: (\d+)  pushes ACKed: (\d+)", text)
    assert m is not None, text
    assert int(m[1]) >= 1 and int(m[2]) >= 3
    # every listener it started is closed: the processes are gone
    listeners = re.findall(r"(?:xDS|HTTP|app|inbound|outbound|admin) 127\.0\.0\.1:(\d+)", text)
    assert len(listeners) == 2 + 4 * 4, text
    for port in listeners:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()


def test_demo_refuses_a_template_that_is_not_a_mesh(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("not: a mesh\n")
    proc = subprocess.run(
        [str(OUTRIGGER), "demo", "--duration", "1", "--mesh", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "services" in proc.stdout + proc.stderr
