"""The programs the namespace tests run inside their pods (`python -m tests.e2e.pod_programs`).

Apps: `echo` (echoes until the client's EOF, then says `<eof>` and closes: a half-close user),
`tls-echo` (the same behind TLS), `banner` (the server speaks first, as SMTP does), `http` (an
HTTP/1.1 server that fails the first request for each Host with 503 and answers the rest with
the Host it saw). `client` is the app's side: it connects where it is told, with no proxy
settings, sends, half-closes and prints what came back; `get` is an HTTP GET the same way
(http.client, which reads no proxy settings), printing the status, the flags header and the
body. `relay` stands in for the sidecar in the rules' own tests, built only from the
interception and pass-through modules: outbound listener on 127.0.0.1 and ::1 (where REDIRECT
in OUTPUT delivers), inbound on 0.0.0.0 and :: (where REDIRECT in PREROUTING delivers), the
original destination read from each connection and the bytes relayed there.

Every program prints JSON lines: `{"listening": ...}` once ready, then one line per event.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import ssl
import sys
from pathlib import Path
from typing import Any

import uvloop

from sidecar.interception.original_dst import original_destination
from sidecar.telemetry.access_log import AccessLog
from sidecar.transport.tcp import TcpRecord
from tests.sidecar.transport.relay_fixtures import echo_until_eof, relay_listener

WAIT = 5.0


def say(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def serve(handler: Any, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
    server = await asyncio.start_server(handler, None, port, ssl=ssl_context)
    say(listening=port)
    async with server:
        await server.serve_forever()


def accepted(writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    say(accepted=peer[0], local=f"{local[0]}:{local[1]}")


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    accepted(writer)
    await echo_until_eof(reader, writer)


async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    accepted(writer)
    line = await reader.readline()
    writer.write(b"tls:" + line)
    await writer.drain()
    writer.close()


async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    accepted(writer)
    writer.write(b"220 banner.example ready\r\n")
    await writer.drain()
    line = await reader.readline()
    writer.write(b"250 " + line)
    await writer.drain()
    writer.close()


async def client(args: argparse.Namespace) -> None:
    context = None
    if args.tls_ca:
        context = ssl.create_default_context(cafile=args.tls_ca)
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            args.host, args.port, ssl=context, server_hostname=args.sni if context else None
        )
        greeting = await reader.readline() if args.server_first else b""
        writer.write(args.send.encode())
        if context is None:
            writer.write_eof()
        reply = await reader.read(-1)
        local = writer.get_extra_info("sockname")
        writer.close()
    say(greeting=greeting.decode(), reply=reply.decode(), local=f"{local[0]}:{local[1]}")


class HttpApp:
    """HTTP/1.1, one request per connection: for each Host, 503 first, then 200 naming it."""

    def __init__(self) -> None:
        self.count = 0
        self.hosts: set[str] = set()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted(writer)
        request = await reader.readuntil(b"\r\n\r\n")
        host = ""
        for line in request.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "host":
                host = value.strip()
        self.count += 1
        status = "200 OK" if host in self.hosts else "503 Service Unavailable"
        self.hosts.add(host)
        body = json.dumps({"host": host, "request": self.count}).encode()
        say(request=self.count, host=host, status=int(status[:3]))
        response = f"HTTP/1.1 {status}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        writer.write(response.encode() + body)
        await writer.drain()
        writer.close()


def get(args: argparse.Namespace) -> None:
    connection = http.client.HTTPConnection(args.host, args.port, timeout=WAIT)
    headers = {"Host": args.host_header} if args.host_header else {}
    try:
        connection.request("GET", args.path, headers=headers)
        response = connection.getresponse()
        body = response.read().decode(errors="replace")
        flags = response.getheader("x-outrigger-flags") or ""
        say(status=response.status, flags=flags, body=body)
    except (OSError, http.client.HTTPException) as exc:
        say(error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)
    finally:
        connection.close()


class Printed:
    """The relay's observer: one access-log line per connection, when it is over."""

    def __init__(self) -> None:
        self.log = AccessLog()

    def tcp_opened(self, record: TcpRecord) -> None:
        pass

    def tcp_closed(self, record: TcpRecord) -> None:
        self.log.tcp(record)
        self.log.flush()


async def relay(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()

    def destination(transport: asyncio.Transport) -> tuple[str, int] | None:
        return original_destination(transport.get_extra_info("socket"))

    printed = Printed()
    outbound = await loop.create_server(
        relay_listener(destination, direction="outbound", observer=printed),
        ["127.0.0.1", "::1"],
        args.outbound,
    )
    inbound = await loop.create_server(
        relay_listener(destination, direction="inbound", observer=printed), None, args.inbound
    )
    say(listening=[args.outbound, args.inbound])
    async with outbound, inbound:
        await asyncio.gather(outbound.serve_forever(), inbound.serve_forever())


def tls_context(cert_dir: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    directory = Path(cert_dir)
    context.load_cert_chain(directory / "server.pem", directory / "server.key")
    return context


def main() -> None:
    parser = argparse.ArgumentParser(prog="pod_programs")
    sub = parser.add_subparsers(dest="program", required=True)
    for name in ("echo", "tls-echo", "banner", "http"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cert-dir")
    p = sub.add_parser("client")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--send", default="hello")
    p.add_argument("--tls-ca")
    p.add_argument("--sni")
    p.add_argument("--server-first", action="store_true", help="read a greeting line first")
    p = sub.add_parser("get")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--path", default="/")
    p.add_argument("--host-header", help="the Host to send (default: host:port)")
    p = sub.add_parser("relay")
    p.add_argument("--outbound", type=int, default=15001)
    p.add_argument("--inbound", type=int, default=15006)
    args = parser.parse_args()
    if args.program == "echo":
        uvloop.run(serve(echo, args.port))
    elif args.program == "tls-echo":
        uvloop.run(serve(tls_echo, args.port, tls_context(args.cert_dir)))
    elif args.program == "banner":
        uvloop.run(serve(banner, args.port))
    elif args.program == "http":
        uvloop.run(serve(HttpApp(), args.port))
    elif args.program == "get":
        get(args)
    elif args.program == "relay":
        uvloop.run(relay(args))
    else:
        try:
            uvloop.run(client(args))
        except (OSError, TimeoutError) as exc:
            say(error=f"{type(exc).__name__}: {exc}")
            sys.exit(1)


if __name__ == "__main__":
    main()
