"""What each policy layer costs a request: instructions under callgrind, the stack alone.

    .venv/bin/python tests/bench/layers.py [--configs plain,total,pertry,retry,breaker,full]
                                           [--requests 2000] [--trace]

cost.py measures a whole sidecar, where a layer's few thousand instructions sit among the
transport's and the codec's 75,000. This runs one service's real policy stack
(`build_service_stack`) in process, over a forwarder that answers at once with a 200 whose body
the test ends right after, and counts only the requests: each config runs in its own
`valgrind --tool=callgrind --toggle-collect=functools_reduce` process, and the measured requests
are one `functools.reduce` over them (after 300 unmeasured ones), so start-up, imports and the
event loop are not counted. What a layer costs is its config's figure less `plain` (the
balancer alone, one endpoint as in rows.py). Configs are layer names joined by `+`:

    total    the request timeout (2 s)          pertry   retries with a 1 s per-try timeout
    retry    retries (2 attempts)               budget   retries with a retry budget
    breaker  the endpoint circuit breaker       lr       least_request
    full     all of them: rows.py's BENCH_POLICY

`--trace` adds tracing at 100%, `--trace 0` tracing that samples nothing (what an unsampled
request pays: its ids and its `sampled=0` context); the span layers and records run, the
exporter is a thread that is never reached, as the hand-over to it runs on the loop.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from sidecar import config
from sidecar.exchange import Reply, Request, Response, Result
from sidecar.policy.stack import ServiceState, StackTracing, build_service_stack

ENDPOINT = config.Endpoint("127.0.0.1", 40000)
LAYERS = ("total", "pertry", "retry", "budget", "breaker", "lr")
DEFAULT_CONFIGS = ("plain", "total", "pertry", "retry", "budget", "breaker", "lr", "full")
WARMUP = 300


class _Body:
    """A response body that is done when the test says so."""

    __slots__ = ("_callbacks",)

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def when_done(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def discard(self) -> None:
        self.done()

    def done(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


class _RequestBody:
    replayable = True
    length = 0


def _forward(req: Request, endpoint: config.Endpoint, reply: Reply) -> None:
    body = _Body()
    reply(Response(200, b"OK", [(b"content-length", b"1")], body, endpoint, 1))  # type: ignore[arg-type]


def service_config(name: str) -> config.ServiceConfig:
    parts = set(name.split("+"))
    unknown = parts - {"plain", "full", *LAYERS}
    if unknown:
        raise SystemExit(f"unknown layer(s) {', '.join(sorted(unknown))}; known: {LAYERS}")
    if "full" in parts:
        parts |= {"total", "pertry", "budget", "breaker", "lr"}
    retry = None
    if parts & {"retry", "pertry", "budget"}:
        retry = config.RetryPolicy(
            attempts=2,
            retry_on=frozenset({"connect-failure", "reset", "gateway-error"}),
            retriable_status=frozenset({503}),
            per_try_timeout=1.0 if "pertry" in parts else None,
            backoff=config.Backoff(base=0.025, max=0.25),
            budget=config.RetryBudget(20, 3) if "budget" in parts else None,
        )
    breaker = config.CircuitBreaker(5 if "breaker" in parts else None, 30.0, 50, 8192, 8192)
    return config.ServiceConfig(
        name="upstream",
        namespace="default",
        port=80,
        cluster="upstream",
        endpoints=(ENDPOINT,),
        timeout=2.0 if "total" in parts else None,
        retry=retry,
        breaker=breaker,
        lb=config.LbPolicy.LEAST_REQUEST if "lr" in parts else config.LbPolicy.ROUND_ROBIN,
    )


def _tracing(sampling: float) -> StackTracing:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from sidecar.telemetry.tracing import Tracing, TracingSettings

    settings = TracingSettings("bench", "http://127.0.0.1:1", sampling=sampling)
    return Tracing(settings, exporter=InMemorySpanExporter())


def measure(name: str, requests: int, trace: float | None) -> None:
    """The child: `requests` requests through the stack, inside functools.reduce."""
    import uvloop

    tracing = _tracing(trace) if trace is not None else None
    state = ServiceState("upstream")
    handler = build_service_stack(service_config(name), state, _forward, tracing=tracing)
    results: list[Result] = []
    answer = results.append

    def one(_: object, __: object) -> None:
        req = Request(b"GET", b"/", b"upstream", [(b"host", b"upstream")], _RequestBody())  # type: ignore[arg-type]
        handler(req, answer)
        result = results.pop()
        if isinstance(result, Response):
            result.body.done()  # type: ignore[attr-defined]

    async def run() -> None:
        for _ in range(WARMUP):
            one(None, None)
        functools.reduce(one, range(requests), None)

    uvloop.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument(
        "--trace",
        type=float,
        nargs="?",
        const=1.0,
        default=None,
        metavar="RATIO",
        help="tracing on every config, sampling RATIO (default 1.0: every request)",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        measure(args.child, args.requests, args.trace)
        return 0
    if shutil.which("valgrind") is None:
        print("missing tool: valgrind", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONHASHSEED="0")
    plain: float | None = None
    with tempfile.TemporaryDirectory(prefix="outrigger-layers-") as workdir:
        for name in args.configs.split(","):
            service_config(name)  # refuse an unknown layer before running anything
            out = Path(workdir) / f"callgrind.{name}"
            command = [
                "valgrind",
                "--tool=callgrind",
                "--toggle-collect=functools_reduce",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                name,
                "--requests",
                str(args.requests),
                *(["--trace", str(args.trace)] if args.trace is not None else []),
            ]
            subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
            found = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
            if found is None:
                raise SystemExit(f"callgrind wrote no totals for {name}")
            per_request = int(found.group(1)) / args.requests
            if name == "plain":
                plain = per_request
            extra = f"  (+{per_request - plain:,.0f} over plain)" if plain is not None else ""
            print(f"{name:28} {per_request:9,.0f} instructions/request{extra}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
