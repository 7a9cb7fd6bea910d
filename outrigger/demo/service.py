"""A demo service: a tiny asyncio HTTP/1.1 app that may call one downstream through its sidecar.

Run as `python -m outrigger.demo.service --name orders --fd N [--downstream http://payments/
--proxy http://127.0.0.1:P]`. It serves on the listening socket it inherits (fd N, bound by the
orchestrator on port 0, so there is no "find a free port" race), and:

- `GET /...`: calls the downstream (if any) through the sidecar's outbound listener as an
  explicit proxy, copying the trace headers, and answers with the downstream's status;
- `POST /fail?on=1|0`: from now on answer 503 (a switch for the story);
- `POST /delay?ms=N`: add N ms of latency to every answer.

It is not the product: it parses just enough HTTP/1.1 for the sidecar's well-formed requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import socket
import sys
from urllib.parse import parse_qs, urlsplit

import httpx

from mesh.http import reason_phrase

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
    def __init__(self, name: str, downstream: str | None, proxy: str | None) -> None:
        self.name = name
        self.downstream = downstream
        self.failing = False
        self.delay = 0.0
        self.served = 0
        self.client: httpx.AsyncClient | None = None
        if downstream is not None:
            self.client = httpx.AsyncClient(
                proxy=proxy,
                timeout=httpx.Timeout(10.0),
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            )

    async def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        url = urlsplit(target)
        query = parse_qs(url.query)
        if method == "POST" and url.path == "/fail":
            self.failing = query.get("on", ["1"])[0] == "1"
            return 200, f"{self.name} failing={self.failing}\n".encode()
        if method == "POST" and url.path == "/delay":
            self.delay = float(query.get("ms", ["0"])[0]) / 1000.0
            return 200, f"{self.name} delay={self.delay}s\n".encode()
        self.served += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            return 503, f"{self.name}: failing on purpose\n".encode()
        if self.client is None or self.downstream is None:
            return 200, f"{self.name}: ok\n".encode()
        forward = {h: headers[h] for h in TRACE_HEADERS if h in headers}
        try:
            reply = await self.client.get(self.downstream, headers=forward)
        except httpx.HTTPError as exc:
            return 503, f"{self.name}: downstream error {type(exc).__name__}\n".encode()
        return reply.status_code, f"{self.name} <- {reply.text}".encode()

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers: dict[str, str] = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, value = line.split(":", 1)
                        headers[key.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0") or "0")
                if length:
                    await reader.readexactly(length)
                if "chunked" in headers.get("transfer-encoding", ""):
                    status, body = 400, b"chunked bodies are not supported by the demo app\n"
                else:
                    status, body = await self.answer(method, target, headers)
                close = headers.get("connection", "").lower() == "close" or status == 400
                writer.write(
                    f"HTTP/1.1 {status} {reason_phrase(status)}\r\n"
                    f"content-type: text/plain\r\ncontent-length: {len(body)}\r\n"
                    f"x-demo-service: {self.name}\r\n"
                    f"{'connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()
                    + body
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except ValueError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


async def serve(args: argparse.Namespace) -> int:
    sock = socket.socket(fileno=args.fd)
    service = DemoService(args.name, args.downstream, args.proxy)
    server = await asyncio.start_server(service.connection, sock=sock)
    host, port = sock.getsockname()[:2]
    print(f"outrigger demo app {args.name} listening {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    if service.client is not None:
        await service.client.aclose()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m outrigger.demo.service")
    p.add_argument("--name", required=True)
    p.add_argument("--fd", type=int, required=True, help="an inherited listening socket")
    p.add_argument("--downstream", default=None, help="URL to call for each request")
    p.add_argument("--proxy", default=None, help="the sidecar's outbound listener, as a URL")
    return asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
