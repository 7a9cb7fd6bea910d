"""Every intercepted connection, through a real in-process sidecar on loopback.

Without iptables nothing is redirected, so the sidecar is given a stand-in for the kernel's
SO_ORIGINAL_DST (`Redirect`: "the connections from now on were going to X"); everything else is
real: the listeners, detection, routing, the pass-through, the metrics and the access log. The
kernel's side is proved in network namespaces (tests/e2e/test_sidecar_interception.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from mesh.model import parse_mesh
from sidecar.app import Sidecar
from sidecar.transport.listener import addresses_to_bind
from sidecar.xds.interpret import snapshot_from_mesh
from tests.sidecar.grpc_fixtures import channel as grpc_channel
from tests.sidecar.grpc_fixtures import echo_server
from tests.sidecar.resilience_fixtures import WAIT, sidecar_settings, wait_for
from tests.sidecar.transport.relay_fixtures import echo_until_eof, tls_contexts

pytestmark = pytest.mark.timeout(30)


class Redirect:
    """The stand-in for SO_ORIGINAL_DST: connections accepted from now on were going here."""

    def __init__(self) -> None:
        self.to: tuple[str, int] | None = None

    def __call__(self, transport: asyncio.Transport) -> tuple[str, int] | None:
        return self.to


@dataclasses.dataclass
class Pod:
    sidecar: Sidecar
    redirect: Redirect

    def address(self, listener: str = "outbound") -> tuple[str, int]:
        return self.sidecar.addresses[listener]

    def tcp_lines(self) -> list[dict[str, Any]]:
        return [
            line
            for line in map(json.loads, self.sidecar.access_log.lines)
            if "bytes_received" in line
        ]

    def tcp_closed(self, flags: str = "") -> int:
        return sum(
            count for key, count in self.sidecar.metrics.tcp_closed_count.items() if key[3] == flags
        )


@contextlib.asynccontextmanager
async def pod(doc: dict[str, Any], *, detect: float = 0.1) -> AsyncIterator[Pod]:
    redirect = Redirect()
    settings = dataclasses.replace(sidecar_settings(), access_log=True, detect_timeout=detect)
    sidecar = Sidecar(settings, destination_of=redirect)
    sidecar.apply(snapshot_from_mesh(parse_mesh(doc, "<test>")))
    async with asyncio.timeout(WAIT):
        await sidecar.start()
    try:
        yield Pod(sidecar, redirect)
    finally:
        async with asyncio.timeout(WAIT):
            await sidecar.drain()


@contextlib.asynccontextmanager
async def serving(handler: Any, **kwargs: Any) -> AsyncIterator[tuple[str, int]]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, **kwargs)
    async with server:
        yield server.sockets[0].getsockname()[:2]


async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that speaks first (SMTP-like)."""
    writer.write(b"220 ready\r\n")
    line = await reader.readline()
    writer.write(b"250 " + line)
    await writer.drain()
    writer.close()


async def talk_first_heard(address: tuple[str, int]) -> tuple[bytes, bytes]:
    """A server-first client: waits for the greeting, then speaks."""
    reader, writer = await asyncio.open_connection(*address)
    greeting = await reader.readline()
    writer.write(b"EHLO me\r\n")
    answer = await reader.read(-1)
    writer.close()
    return greeting, answer


async def echo_through(address: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    writer.write_eof()
    answer = await reader.read(-1)
    writer.close()
    return answer


def service(name: str, address: str, port: int, endpoint: tuple[str, int], **more: Any) -> Any:
    host, endpoint_port = endpoint
    doc = {"name": name, "port": port, "addresses": [address]}
    return {**doc, "endpoints": [f"{host}:{endpoint_port}"], **more}


async def test_http_to_a_virtual_address_is_routed_to_its_service_keeping_the_host() -> None:
    seen: list[bytes] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async with (
        serving(app) as web,
        pod({"services": [service("web", "10.96.0.10", 80, web)]}) as p,
    ):
        p.redirect.to = ("10.96.0.10", 80)
        host, port = p.address()
        async with httpx.AsyncClient(timeout=WAIT) as client:
            # the app knows the service by some name of its own; the address decides
            response = await client.get(
                f"http://{host}:{port}/x", headers={"host": "web.internal.example"}
            )
        assert (response.status_code, response.text) == (200, "ok")
        assert b"host: web.internal.example" in seen[0].lower()
        [(key, count)] = [
            (k, c) for k, c in p.sidecar.metrics.requests().items() if k[0] == "outbound"
        ]
        assert (key[2], key[3], count) == ("web", "200", 1)


async def test_plain_tcp_to_a_virtual_address_goes_to_the_service_untouched() -> None:
    async with (
        serving(echo_until_eof) as echo,
        pod({"services": [service("echo", "10.96.0.11", 7000, echo)]}) as p,
    ):
        p.redirect.to = ("10.96.0.11", 7000)
        payload = bytes(range(256)) * 64
        async with asyncio.timeout(WAIT):
            assert await echo_through(p.address(), payload) == payload + b"<eof>"
            await wait_for(lambda: len(p.tcp_lines()) == 1)
        [line] = p.tcp_lines()
        assert (line["destination"], line["protocol"]) == ("echo", "tcp")
        assert line["upstream"] == f"{echo[0]}:{echo[1]}"
        assert (line["bytes_received"], line["bytes_sent"]) == (len(payload), len(payload) + 5)


async def test_a_server_first_protocol_passes_after_the_detection_window() -> None:
    async with serving(banner) as smtp, pod({"services": []}) as p:
        p.redirect.to = smtp  # nobody's address: allow_any passes it through
        async with asyncio.timeout(WAIT):
            assert await talk_first_heard(p.address()) == (b"220 ready\r\n", b"250 EHLO me\r\n")
            await wait_for(lambda: len(p.tcp_lines()) == 1)
        assert p.tcp_lines()[0]["destination"] == "passthrough"


async def test_a_declared_tcp_port_is_not_detected_so_a_server_speaking_first_never_waits() -> None:
    async with serving(banner) as smtp:
        doc = {"services": [service("mail", "10.96.0.25", 25, smtp, protocol="tcp")]}
        # a detection window longer than every wait here: had it applied, nothing would come
        async with pod(doc, detect=60.0) as p:
            p.redirect.to = ("10.96.0.25", 25)
            async with asyncio.timeout(WAIT):
                assert await talk_first_heard(p.address()) == (b"220 ready\r\n", b"250 EHLO me\r\n")


async def test_tls_passes_through_and_its_server_name_is_logged_and_labelled() -> None:
    server_context, client_context = tls_contexts("secure.shop.svc.cluster.local")

    async def tls_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"tls:" + await reader.readline())
        await writer.drain()
        writer.close()

    async with serving(tls_echo, ssl=server_context) as secure:
        doc = {
            "outbound_policy": "registry_only",
            "services": [
                {
                    **service("secure", "10.96.0.13", 443, secure, protocol="tls"),
                    "namespace": "shop",
                }
            ],
        }
        async with pod(doc) as p:
            # to an address the mesh does not know, under registry_only: the name lets it pass
            p.redirect.to = ("192.0.2.44", 443)
            async with asyncio.timeout(WAIT):
                reader, writer = await asyncio.open_connection(
                    *p.address(),
                    ssl=client_context,
                    server_hostname="secure.shop.svc.cluster.local",
                )
                writer.write(b"hello\n")
                assert await reader.read(-1) == b"tls:hello\n"  # verified end to end
                writer.close()
                await wait_for(lambda: len(p.tcp_lines()) == 1)
            [line] = p.tcp_lines()
            assert (line["protocol"], line["sni"], line["destination"]) == (
                "tls",
                "secure.shop.svc.cluster.local",
                "secure",
            )
            sni = {key[2] for key in p.sidecar.metrics.tcp_bytes}
            assert sni == {"secure.shop.svc.cluster.local"}


async def test_registry_only_closes_tcp_to_an_unknown_destination_and_counts_it() -> None:
    async with (
        serving(echo_until_eof) as echo,
        pod({"outbound_policy": "registry_only", "services": []}) as p,
    ):
        p.redirect.to = echo  # reachable, but no service of the mesh
        async with asyncio.timeout(WAIT):
            assert await echo_through(p.address(), b"let me out") == b""
            # HTTP to it gets its 502 NR
            host, port = p.address()
            async with httpx.AsyncClient(timeout=WAIT) as client:
                response = await client.get(f"http://{host}:{port}/")
        assert response.status_code == 502
        assert response.headers["x-outrigger-flags"] == "NR"
        assert p.tcp_closed("NR") == 1
        [line] = p.tcp_lines()
        assert (line["flags"], line["upstream"]) == ("NR", f"{echo[0]}:{echo[1]}")


async def test_a_connection_redirected_to_the_sidecar_itself_is_refused() -> None:
    async with pod({"services": []}) as p:
        p.redirect.to = p.address("inbound")  # a loop, were it forwarded
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(*p.address())
            assert await reader.read(-1) == b""  # closed at once, before a byte was read
            writer.close()
        assert p.tcp_closed("NR") == 1
        assert p.sidecar.inbound_state.total_connections == 0  # nothing reached it


async def test_a_connection_made_to_the_sidecar_directly_is_http_as_before() -> None:
    async with pod({"services": []}) as p:
        host, port = p.address()
        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.get(f"http://{host}:{port}/", headers={"host": "127.0.0.1:1"})
        assert response.headers["x-outrigger-flags"] == "UF"  # passed through to the Host
        assert p.tcp_lines() == []


async def test_inbound_goes_to_the_original_destination_for_http_and_tcp() -> None:
    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(4)
        if first == b"GET ":
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\napp")
        else:
            writer.write(b"raw:" + first + await reader.read(-1))
        await writer.drain()
        writer.close()

    async with serving(app) as address, pod({"services": []}) as p:
        # --app is 127.0.0.1:1 (nothing there): only the original destination can answer
        p.redirect.to = address
        inbound = p.address("inbound")
        async with httpx.AsyncClient(timeout=WAIT) as client:
            response = await client.get(f"http://{inbound[0]}:{inbound[1]}/")
        assert (response.status_code, response.text) == (200, "app")
        async with asyncio.timeout(WAIT):
            assert await echo_through(inbound, b"\x00\x01binary") == b"raw:\x00\x01binary"
            await wait_for(lambda: len(p.tcp_lines()) == 1)
        assert p.tcp_lines()[0]["destination"] == "inbound"


async def test_a_drain_waits_for_open_tcp_connections_then_resets_them() -> None:
    async with serving(echo_until_eof) as echo:
        doc = {"services": [service("echo", "10.96.0.11", 7000, echo, protocol="tcp")]}
        async with pod(doc) as p:
            p.redirect.to = ("10.96.0.11", 7000)
            async with asyncio.timeout(WAIT):
                reader, writer = await asyncio.open_connection(*p.address())
                writer.write(b"still open")
                assert await reader.readexactly(10) == b"still open"
                clean = await p.sidecar.drain()  # drain_timeout is 1s here
                assert not clean
                assert await reader.read(-1) == b""  # reset (or closed) by the drain
            writer.close()
            assert p.tcp_closed("") == 1


def test_redirect_targets_bind_both_families_on_a_fixed_port() -> None:
    assert addresses_to_bind("127.0.0.1", 15001) == ["127.0.0.1", "::1"]
    assert addresses_to_bind("0.0.0.0", 15006) == ["0.0.0.0", "::"]
    assert addresses_to_bind("127.0.0.1", 0) == ["127.0.0.1"]  # tests: one socket, any port
    assert addresses_to_bind("10.0.0.1", 15006) == ["10.0.0.1"]  # one address asked for


async def test_grpc_to_a_declared_virtual_address_and_detected_inbound() -> None:
    """Outbound: a gRPC client dials a grpc service's virtual address by a name the mesh does
    not know; the address routes it, over HTTP/2 to the endpoint. Inbound: an undeclared port,
    so the first bytes decide (the HTTP/2 preface), and the call goes to the original
    destination over HTTP/2."""
    async with echo_server() as server:
        host, port = server.address.rsplit(":", 1)
        endpoint = (host, int(port))
        doc = {"services": [service("echo", "10.96.0.20", 50051, endpoint, protocol="grpc")]}
        async with pod(doc) as p:
            p.redirect.to = ("10.96.0.20", 50051)
            target = "{}:{}".format(*p.address())
            async with grpc_channel(target, "echo.elsewhere.example:50051") as ch:
                assert await ch.unary_unary("/test.Echo/Unary")(b"ab", timeout=5) == b"ba"
        async with pod({"services": []}) as p:
            p.redirect.to = endpoint  # the app's own address: inbound, detected
            target = "{}:{}".format(*p.address("inbound"))
            async with grpc_channel(target, "echo:50051") as ch:
                assert await ch.unary_unary("/test.Echo/Unary")(b"cd", timeout=5) == b"dc"
    assert [name for name, _ in server.calls] == ["Unary", "Unary"]
