"""`outrigger demo --duration N` end to end: the whole mesh starts, the story plays, every step is
checked by the demo itself, the sidecars' traces arrive at the demo's own OTLP receiver and a
retried request is printed as a waterfall, and every process it started is gone afterwards.
It ends with the latencies while nothing failed and the latency guard's verdict. Then the
receiver's store and the waterfall on their own."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from outrigger.demo.traces import CLIENT, INTERNAL, SERVER, SpanRecord, Trace, TraceStore
from outrigger.demo.view import waterfall

DURATION = 16  # the story takes ~14 s after start-up
OUTRIGGER = Path(sys.executable).with_name("outrigger")


# One line of the waterfall: tree guides, service, kind, span name, start, bar, duration, status,
# details (attempts, endpoint and outcome, flags, events).
_LINE = re.compile(
    r"^(?P<guides>[│├└─ ]*)(?P<service>\S+) +(?P<kind>SERVER|CLIENT)? +(?P<name>.+?) +"
    r"(?P<start>[\d.]+)ms ▕[█ ]*▏ +(?P<duration>[\d.]+)ms +(?P<status>\S+)(?:  (?P<details>.*))?$"
)


def waterfall_lines(text: str) -> list[tuple[int, dict[str, str]]]:
    """(depth, fields) per span line of the waterfall printed after the trace's header."""
    lines = text[text.index("\ntrace ") :].splitlines()[3:]  # header, legend
    found = []
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            break
        fields = {k: v or "" for k, v in m.groupdict().items()}
        found.append((len(fields["guides"]) // 4, fields))
    return found


def children(tree: list[tuple[int, dict[str, str]]], i: int) -> list[dict[str, str]]:
    depth, below = tree[i][0], []
    for d, fields in tree[i + 1 :]:
        if d <= depth:
            break
        if d == depth + 1:
            below.append(fields)
    return below


@pytest.mark.timeout(120)
def test_demo_plays_the_whole_story_and_reports_every_step_happened(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_")  # no endpoint: the demo receives the traces itself
    }
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [str(OUTRIGGER), "demo", "--duration", str(DURATION)],
            env=env,
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
    # 3: the latency guard found the load's latencies were not the mesh's (a busy machine); the
    # story itself must have happened either way
    assert code in (0, 3), text
    assert "outrigger demo summary" in text, text
    steps = re.findall(r"^  step \d+: (.*)$", text, re.M)
    assert len(steps) == 9, text  # the 8 of the story, then: a retried request was traced
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
    # latencies while nothing failed: the load's (exact) beside frontend's sidecar's
    # (interpolated), the demo's own CPU and lag, and the guard's verdict, which sets the status
    m = re.search(r"load → frontend: p50 ([\d.]+) ms  p99 ([\d.]+) ms  \(exact", text)
    assert m is not None and 0 < float(m[1]) <= float(m[2]), text
    m = re.search(r"frontend sidecar inbound: p50 ([\d.]+) ms  p99 [\d.]+ ms  \(interpolated", text)
    assert m is not None and float(m[1]) > 0, text
    assert re.search(r"load generator's timer lag: p50 [\d.]+ ms  p99 [\d.]+ ms", text), text
    m = re.search(r"demo itself: (\d+)% of a core \(", text)
    assert m is not None, text
    guard = re.search(r"^  latency guard: (ok|FAILED): (.*)$", text, re.M)
    assert guard is not None, text
    assert (guard[1] == "ok") == (code == 0), text
    # the waterfall of a retried request, every span received (real sidecars, real OTLP gRPC):
    # frontend -> orders -> orders' retried call, one attempt at payments-2 (503), then one at
    # payments-1 (200), each with the payments sidecar's SERVER span under it
    m = re.search(
        r"^trace [0-9a-f]{32}: a request retried by orders \(2 attempts\), (\d+) spans", text, re.M
    )
    assert m is not None, text
    assert "did not arrive" not in text[m.start() : m.end() + 40], text
    tree = waterfall_lines(text)
    assert len(tree) == int(m[1]) == 8, text
    depth, root = tree[0]
    assert (depth, root["service"], root["kind"], root["status"]) == (
        1,
        "frontend",
        "SERVER",
        "200",
    )
    (retried,) = [i for i, (_, f) in enumerate(tree) if "attempts 2" in f["details"]]
    assert (tree[retried][1]["service"], tree[retried][1]["name"]) == ("orders", "GET payments")
    attempts = children(tree, retried)
    assert [(a["service"], a["name"], a["status"]) for a in attempts] == [
        ("orders", "attempt 1", "503"),
        ("orders", "attempt 2", "200"),
    ], text
    assert "→ payments-2 gateway-error" in attempts[0]["details"], text
    assert "→ payments-1 success" in attempts[1]["details"], text
    starts = [i for i, (_, f) in enumerate(tree) if f["name"].startswith("attempt ")]
    for i, status in zip(starts, ("503", "200"), strict=True):
        (server,) = children(tree, i)
        assert (server["service"], server["kind"], server["status"]) == (
            "payments",
            "SERVER",
            status,
        )
    # every listener it started is closed: the processes are gone
    listeners = re.findall(r"(?:xDS|HTTP|app|inbound|outbound|admin|OTLP) 127\.0\.0\.1:(\d+)", text)
    assert len(listeners) == 2 + 4 * 4 + 1, text
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


# --- the trace store and the waterfall, on their own ---------------------------------------------


def span(
    trace: str,
    span_id: str,
    parent: str,
    name: str,
    kind: int,
    start: int,
    end: int,
    service: str,
    **attributes: object,
) -> SpanRecord:
    return SpanRecord(
        trace,
        span_id,
        parent,
        name,
        kind,
        start,
        end,
        dict(attributes),
        [],
        0,
        {"service.name": service},
    )


def retried_trace(trace: str = "t1") -> list[SpanRecord]:
    ms = 1_000_000
    return [
        span(
            trace,
            "a",
            "",
            "GET",
            SERVER,
            0,
            20 * ms,
            "orders",
            **{"http.response.status_code": 200},
        ),
        span(
            trace,
            "b",
            "a",
            "GET payments",
            CLIENT,
            1 * ms,
            19 * ms,
            "orders",
            **{"outrigger.retry.attempts": 2, "http.response.status_code": 200},
        ),
        span(
            trace,
            "c",
            "b",
            "attempt 1",
            INTERNAL,
            1 * ms,
            5 * ms,
            "orders",
            **{
                "outrigger.attempt": 1,
                "server.address": "127.0.0.1",
                "server.port": 7001,
                "outrigger.outcome": "gateway-error",
                "http.response.status_code": 503,
            },
        ),
        span(
            trace,
            "d",
            "c",
            "GET",
            SERVER,
            2 * ms,
            4 * ms,
            "payments",
            **{"http.response.status_code": 503},
        ),
        span(
            trace,
            "e",
            "b",
            "attempt 2",
            INTERNAL,
            6 * ms,
            18 * ms,
            "orders",
            **{
                "outrigger.attempt": 2,
                "server.address": "127.0.0.1",
                "server.port": 7002,
                "outrigger.outcome": "success",
                "http.response.status_code": 200,
            },
        ),
        span(
            trace,
            "f",
            "e",
            "GET",
            SERVER,
            7 * ms,
            17 * ms,
            "payments",
            **{"http.response.status_code": 200},
        ),
    ]


def test_trace_store_keeps_retried_traces_while_dropping_the_oldest_others() -> None:
    store = TraceStore(max_traces=3, max_kept=1)
    spans = retried_trace()
    store.add(spans[0])  # the root arrives first, before anything says "retried"
    for n in range(10):
        store.add(span(f"other{n}", "x", "", "GET", SERVER, 0, 1, "frontend"))
    for s in spans[1:]:
        store.add(s)
    kept = store.retried()
    assert kept is not None and kept.trace_id == "t1"
    assert len(kept.spans) == 5  # its root was evicted with the other old traces (counted)
    assert not kept.complete
    assert store.received == 16
    assert store.dropped == 1 + 7  # the root, and seven whole traces
    assert len(store.spans()) == 5 + 3
    # a second retried trace pushes the first one out of the (one) kept slot
    for s in retried_trace("t2"):
        store.add(s)
    second = store.retried()
    assert second is not None and second.trace_id == "t2" and second.complete


def test_waterfall_draws_the_tree_from_parent_ids_with_attempts_and_endpoints() -> None:
    spans = retried_trace()
    trace = Trace("t1", [spans[i] for i in (5, 3, 1, 4, 0, 2)])  # arrival order does not matter
    assert trace.complete
    console = Console(file=StringIO(), width=160, color_system=None)
    console.print(waterfall(trace, {"127.0.0.1:7001": "payments-2"}))
    text = "\ntrace x\n" + console.file.getvalue()  # type: ignore[attr-defined]
    tree = waterfall_lines(text)
    assert [(d, f["service"], f["name"]) for d, f in tree] == [
        (1, "orders", "GET"),
        (2, "orders", "GET payments"),
        (3, "orders", "attempt 1"),
        (4, "payments", "GET"),
        (3, "orders", "attempt 2"),
        (4, "payments", "GET"),
    ]
    assert tree[1][1]["details"] == "attempts 2"
    assert tree[2][1]["details"] == "→ payments-2 gateway-error"
    assert tree[4][1]["details"] == "→ 127.0.0.1:7002 success"  # no name known: the address
    assert [f["start"] for _, f in tree] == ["0.0", "1.0", "1.0", "2.0", "6.0", "7.0"]
    assert [f["duration"] for _, f in tree] == ["20.0", "18.0", "4.0", "2.0", "12.0", "10.0"]


def children_of(pid: int) -> dict[int, str]:
    """pid -> command line of the processes whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


@pytest.mark.timeout(120)
def test_the_demo_stops_and_says_so_when_its_load_generator_dies(tmp_path: Path) -> None:
    out = tmp_path / "demo.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [str(OUTRIGGER), "demo", "--duration", "60"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            load = None
            while load is None and time.monotonic() < deadline and proc.poll() is None:
                if "▶ traffic flows" in out.read_text():  # the load runs
                    load = next(
                        (
                            p
                            for p, cmd in children_of(proc.pid).items()
                            if "outrigger.loadgen" in cmd
                        ),
                        None,
                    )
                time.sleep(0.2)
            assert load is not None, out.read_text()
            os.kill(load, signal.SIGKILL)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
    text = out.read_text()
    assert code == 1, text
    assert "outrigger demo: the load generator exited (status -9)" in text, text


def test_demo_without_its_extra_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    from outrigger.cli import main

    for name in [
        m for m in sys.modules if m == "rich" or m.startswith(("rich.", "outrigger.demo"))
    ]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "rich", None)  # import rich -> ModuleNotFoundError
    assert main(["demo", "--duration", "1"]) == 2
    assert "pip install 'outrigger[demo]'" in capsys.readouterr().err
