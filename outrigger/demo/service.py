"""A demo service: a small HTTP/1.1 app that may call one downstream through its sidecar.

Two ways to run it, one app:

- in `outrigger demo`: `python -m outrigger.demo.service --name orders --fd N [--downstream
  http://payments/ --proxy http://127.0.0.1:P]`. It serves on the listening socket it inherits
  (fd N, bound by the orchestrator on port 0, so there is no "find a free port" race) and calls
  its downstream through the sidecar's outbound listener as an explicit proxy;
- standalone, as a container (k8s/examples/shop.yaml): `python -m outrigger.demo.service --name
  orders --listen 0.0.0.0:8080 --downstream http://payments/ [--failure-rate F] [--delay D]`. It
  binds the address itself (port 0: any free port; the line it prints names the one bound) and
  calls its downstream with plain HTTP: in a pod the iptables rules take the call to the sidecar.

What it answers:

- `GET /healthz`: 200 at once, whatever it is set to do (the kubelet's probe: a replica that
  fails its requests but passes its probe stays in the Service, which is what a mesh's breaker
  is for);
- `GET /...`: after the delay, 503 for a `--failure-rate` share of requests (drawn at random per
  request), else the downstream's answer (if any; called with the request's trace headers, so
  the sidecars' spans join up in one trace), else 200;
- `POST /fail?on=1|0` (`?rate=F` for a share): change the failure rate (a switch for the story);
- `POST /delay?ms=N`: add N ms of latency to every answer.

It is not the product, but it is what an app in a mesh is: a server (uvloop, an httptools
parser per connection, a task per request that must wait, none for one that need not) and one
shared httpx client (`outrigger.demo.client`: httpx on its own small HTTP/1.1 transport) that
calls its downstream through its sidecar. Kept cheap so that on a small machine the demo shows
the mesh, not its apps. How much, with tests/bench/demo_app_cpu.py (orders calling payments
directly, driven by `outrigger.loadgen` over 16 connections; CPU from /proc schedstat over 10 s
after 2 s of warm-up; the 2-core demo VM with other work on it, 2026-12-05; 5 runs before, 8
after (orders 11), alternating with before for 2 of them; least-most):

| CPU-ms per request | 50 req/s | 100 req/s |
|---|---|---|
| orders, before (httpx on httpcore, h11, anyio) | 1.15-1.53 | 0.96-1.14 |
| orders, after | 0.61-0.74 | 0.32-0.51 |
| payments, before | 0.16-0.25 | 0.12-0.15 |
| payments, after | 0.12-0.16 | 0.075-0.12 |

What each change bought: the client's own transport, no cookie work and the URL parsed once
took the httpx call from 1.83 M instructions (callgrind) and 1,749 Python calls to 0.42 M and
388, 470-550 CPU-µs in a tight loop to 70-150, and orders at 50 req/s from 1.2-1.5 ms to
0.67-0.69 (`outrigger.demo.client` says what each part was); answering without a task when there
is nothing to wait for took payments from 0.19-0.21 to 0.135-0.14 ms.

Where orders' 0.65 ms at 50 req/s goes: a process that sleeps between requests wakes with cold
caches and pays several times its warm cost (payments: 20 µs of work warm, 0.14 ms at 50 req/s,
0.09 at 400; nginx returning a fixed answer: 72 µs per request at 50 req/s against 33 at 400 on
the same VM), and orders wakes twice per request (its request, then payments' answer: 2 blocking
`epoll_pwait`, 2 reads, 2 writes per request under strace -c, the least for a server that calls
a downstream). Without httpx's models (the same server and transport, the call written by hand;
an experiment, not kept) orders took 0.33-0.41 ms at 50 req/s against 0.61-0.65 with them:
httpx's own request and response objects are the other 0.25-0.3 ms. User time is 85% of it
(utime 0.48 ms, stime 0.08 per request). gc is not a factor: one young collection per ~48 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import signal
import socket
import sys
from collections import deque
from urllib.parse import parse_qs, urlsplit

import httptools
import httpx
import uvloop

from mesh.address import join_host_port, split_host_port
from mesh.http import reason_phrase
from mesh.policy import parse_duration
from outrigger.demo.client import client as demo_client
from outrigger.parsing import ParsingProtocol

HEALTH_PATH = "/healthz"
TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "x-request-id",
)


class DemoService:
    def __init__(
        self,
        name: str,
        downstream: str | None,
        proxy: str | None = None,
        failure_rate: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        self.name = name
        # Parsed once: httpx parses a URL given as a string on every call (with the host's IP
        # address checks: 136 of the call's 524 Python calls once the transport was ours,
        # outrigger.demo.client); an `httpx.URL` is taken as it is.
        self.downstream = None if downstream is None else httpx.URL(downstream)
        self.failure_rate = failure_rate
        self.delay = delay
        self.served = 0
        self.via = f"{name} <- ".encode()
        self.client: httpx.AsyncClient | None = None
        if downstream is not None:
            self.client = demo_client(proxy)

    def answer_now(
        self, method: str, target: str, headers: dict[str, str]
    ) -> tuple[int, bytes] | None:
        """The answer when it needs no waiting (a switch, the probe, an app with no downstream
        and no delay), or None: `answer` awaits it."""
        if method == "POST":
            return self.control(target)
        if target == HEALTH_PATH:
            return 200, f"{self.name}: ok\n".encode()
        if self.delay or self.client is not None:
            return None
        self.served += 1
        if self.failure_rate and random.random() < self.failure_rate:  # [0, 1): 1.0 always
            return 503, f"{self.name}: failing on purpose\n".encode()
        return 200, f"{self.name}: ok\n".encode()

    async def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        now = self.answer_now(method, target, headers)
        if now is not None:
            return now
        self.served += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failure_rate and random.random() < self.failure_rate:  # [0, 1): 1.0 always
            return 503, f"{self.name}: failing on purpose\n".encode()
        if self.client is None or self.downstream is None:
            return 200, f"{self.name}: ok\n".encode()
        forward = {h: headers[h] for h in TRACE_HEADERS if h in headers}
        try:
            reply = await self.client.get(self.downstream, headers=forward)
        except httpx.HTTPError as exc:
            return 503, f"{self.name}: downstream error {type(exc).__name__}\n".encode()
        return reply.status_code, self.via + reply.content

    def control(self, target: str) -> tuple[int, bytes]:
        """The story's switches: POST /fail?on=1|0 (or ?rate=F), POST /delay?ms=N."""
        url = urlsplit(target)
        query = parse_qs(url.query)
        if url.path == "/fail":
            if "rate" in query:
                rate = parse_rate(query["rate"][0])
                if rate is None:
                    return 400, b"fail: rate must be a number from 0 to 1, e.g. /fail?rate=0.5\n"
                self.failure_rate = rate
            else:
                self.failure_rate = 1.0 if query.get("on", ["1"])[0] == "1" else 0.0
            return 200, f"{self.name} failure_rate={self.failure_rate:g}\n".encode()
        if url.path == "/delay":
            try:
                self.delay = float(query.get("ms", ["0"])[0]) / 1000.0
            except ValueError:
                return 400, b"delay: ms must be a number, e.g. /delay?ms=100\n"
            return 200, f"{self.name} delay={self.delay}s\n".encode()
        return 400, b"POST /fail?on=1|0, /fail?rate=F or /delay?ms=N\n"

    def respond(self, status: int, body: bytes, close: bool) -> bytes:
        return (
            f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
            f"content-type: text/plain\r\ncontent-length: {len(body)}\r\n"
            f"x-demo-service: {self.name}\r\n"
            f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n"
        ).encode() + body


class Connection(ParsingProtocol):
    """One client connection: httptools parses the requests, each is answered in turn by a
    task (it may wait for the downstream), in the order they came."""

    def __init__(self, service: DemoService) -> None:
        self.service = service
        self.parser: httptools.HttpRequestParser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.target = b""
        self.headers: dict[str, str] = {}
        self.queue: deque[tuple[str, str, dict[str, str], bool]] = deque()
        self.task: asyncio.Task[None] | None = None

    def refuse(self) -> None:
        assert self.transport is not None
        self.transport.write(self.service.respond(400, b"bad request\n", close=True))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue.clear()
        if self.task is not None:
            self.task.cancel()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.target = b""
        self.headers = {}

    def on_url(self, url: bytes) -> None:
        self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode("latin-1")
        keep = self.parser.should_keep_alive()
        target = self.target.decode("latin-1")
        if self.task is None and self.transport is not None and not self.transport.is_closing():
            # Nothing before it is waiting: answered here if it can be, without a task
            # (payments, the probe, the switches).
            now = self.service.answer_now(method, target, self.headers)
            if now is not None:
                self.transport.write(self.service.respond(*now, close=not keep))
                if not keep:
                    self.transport.close()
                return
        self.queue.append((method, target, self.headers, keep))
        if self.task is None:
            self.task = asyncio.ensure_future(self._answer_all())

    async def _answer_all(self) -> None:
        while self.queue and self.transport is not None and not self.transport.is_closing():
            method, target, headers, keep = self.queue.popleft()
            status, body = await self.service.answer(method, target, headers)
            self.transport.write(self.service.respond(status, body, close=not keep))
            if not keep:
                self.transport.close()
        self.task = None


async def serve(args: argparse.Namespace) -> int:
    service = DemoService(args.name, args.downstream, args.proxy, args.failure_rate, args.delay)
    loop = asyncio.get_running_loop()
    if args.fd is not None:
        sock = socket.socket(fileno=args.fd)
        server = await loop.create_server(lambda: Connection(service), sock=sock)
    else:
        host, port = args.listen
        server = await loop.create_server(lambda: Connection(service), host or None, port)
    host, port = server.sockets[0].getsockname()[:2]
    # What start-up allocated (~22,000 objects, httpx's modules) stays out of the collector's
    # full passes. Measured over 3,000 calls: one young collection per ~48 requests and no full
    # one, so this changed nothing measurable; it keeps a rare full pass small.
    gc.freeze()
    print(f"outrigger demo app {args.name} listening {join_host_port(host, port)}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    if service.client is not None:
        await service.client.aclose()
    return 0


# -- the command line ---------------------------------------------------------------------------


def listen_address(text: str) -> tuple[str, int]:
    """--listen: HOST:PORT, [IPv6]:PORT or :PORT (every address); port 0 picks a free one."""
    host, port = split_host_port(text) or ("", None)
    if port is None:
        raise argparse.ArgumentTypeError(
            f"must be HOST:PORT, e.g. 0.0.0.0:8080 or 127.0.0.1:0, got {text!r}"
        )
    return host, port


def parse_rate(text: str) -> float | None:
    """A share from 0 to 1 (`--failure-rate`, `POST /fail?rate=`); None when it is not one."""
    try:
        rate = float(text)
    except ValueError:
        return None
    return rate if 0.0 <= rate <= 1.0 else None  # NaN is not in range either


def failure_rate(text: str) -> float:
    """--failure-rate: the share of requests answered 503."""
    rate = parse_rate(text)
    if rate is None:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, e.g. 0.25, got {text!r}")
    return rate


def delay(text: str) -> float:
    """--delay: a duration such as 100ms or 1.5s; 0s for none."""
    seconds = parse_duration(text)
    if seconds is None:
        raise argparse.ArgumentTypeError(f"must be a duration such as 100ms or 1.5s, got {text!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """Every flag (tests check that what k8s/examples runs is accepted here)."""
    p = argparse.ArgumentParser(
        prog="python -m outrigger.demo.service",
        description="The demo's app: answers GET (calling --downstream, if any, with the "
        "request's trace headers), fails a share of requests with 503, GET /healthz always 200.",
    )
    p.add_argument("--name", required=True, help="named in its answers and its start-up line")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--listen",
        type=listen_address,
        help="bind HOST:PORT itself, e.g. 0.0.0.0:8080 in a container (port 0: any free port)",
    )
    where.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    p.add_argument(
        "--downstream",
        default=None,
        help="URL to GET for each request, e.g. http://payments/ (in a pod, plain HTTP: the "
        "iptables rules take it to the sidecar)",
    )
    p.add_argument(
        "--proxy",
        default=None,
        help="call the downstream through this proxy, the sidecar's outbound listener as a URL "
        "(outrigger demo; not needed in a pod)",
    )
    p.add_argument(
        "--failure-rate",
        type=failure_rate,
        default=0.0,
        help="answer 503 to this share of requests, from 0 (default) to 1 (all)",
    )
    p.add_argument(
        "--delay", type=delay, default=0.0, help="add this latency to every answer, e.g. 100ms"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    return uvloop.run(serve(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
