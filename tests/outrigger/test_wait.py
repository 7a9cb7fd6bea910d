"""`outrigger wait`: blocks until the sidecar's readiness answers 200, or says why not."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from outrigger.cli import main


class Readiness(ThreadingHTTPServer):
    """A sidecar health port on 127.0.0.1 that answers 503 `not_ready` times, then 200."""

    def __init__(self, not_ready: int) -> None:
        self.not_ready = not_ready
        self.asked = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/healthz/ready"


class _Handler(BaseHTTPRequestHandler):
    server: Readiness

    def do_GET(self) -> None:
        self.server.asked += 1
        ready = self.path == "/healthz/ready" and self.server.asked > self.server.not_ready
        self.send_response(200 if ready else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def readiness(request: pytest.FixtureRequest) -> Iterator[Readiness]:
    server = Readiness(not_ready=request.param)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server
    server.shutdown()
    thread.join(timeout=5)
    server.server_close()


@pytest.mark.parametrize("readiness", [3], indirect=True)
def test_wait_returns_once_the_sidecar_answers_200(
    readiness: Readiness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["wait", "--url", readiness.url, "--timeout", "10s"]) == 0
    assert readiness.asked == 4
    assert "the sidecar is ready" in capsys.readouterr().out


@pytest.mark.parametrize("readiness", [10**6], indirect=True)
def test_wait_gives_up_after_the_timeout_with_the_last_answer(
    readiness: Readiness, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert main(["wait", "--url", readiness.url, "--timeout", "600ms"]) == 1
    assert time.monotonic() - started < 5
    assert readiness.asked >= 2
    err = capsys.readouterr().err
    assert err == (
        f"outrigger wait: the sidecar was not ready within 600ms ({readiness.url}; "
        "last answer: HTTP 503)\n"
    )


def test_wait_reports_a_sidecar_that_is_not_listening(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/healthz/ready"
        assert main(["wait", "--url", url, "--timeout", "300ms"]) == 1
    assert "last answer: ConnectError" in capsys.readouterr().err


def test_wait_refuses_a_timeout_without_a_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wait", "--timeout", "60"]) == 2
    assert capsys.readouterr().err == (
        'outrigger wait: --timeout must be a duration like "60s" or "500ms", got \'60\'\n'
    )
