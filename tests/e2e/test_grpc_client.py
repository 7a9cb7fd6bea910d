"""Stock grpcio as an xDS client (proxyless): `xds:///payments` against our control plane.

The client runs in a subprocess (grpc_xds_client.py) whose environment alone carries
GRPC_XDS_BOOTSTRAP. Backends are grpc.aio servers on 127.0.0.1 port 0 answering
`/outrigger.test.Echo/Who` with their name.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from control_plane.app import ControlPlane

CLIENT_SCRIPT = Path(__file__).with_name("grpc_xds_client.py")


@dataclass
class Backend:
    name: str
    fail_first: int = 0
    calls: int = 0
    port: int = 0
    server: grpc.aio.Server | None = field(default=None, repr=False)

    async def who(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        self.calls += 1
        if self.fail_first > 0:
            self.fail_first -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} fails this call")
        return self.name.encode()

    async def start(self) -> None:
        self.server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            "outrigger.test.Echo", {"Who": grpc.unary_unary_rpc_method_handler(self.who)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()


class GrpcClient:
    """The subprocess: one `call` per line in, one JSON answer per line out."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def call(self, timeout: float = 5.0) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"call {timeout}\n".encode())
        async with asyncio.timeout(timeout + 5):
            await self.proc.stdin.drain()
            line = await self.proc.stdout.readline()
        assert line, "the grpc client exited"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call_until(self, backend: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Call until `backend` answers (a push takes effect); every answer on the way."""
        answers = []
        async with asyncio.timeout(timeout):
            while True:
                answers.append(await self.call())
                if answers[-1].get("backend") == backend:
                    return answers
                await asyncio.sleep(0.05)


def mesh_text(endpoints: list[int], *, retries: bool = True, lb: str = "round_robin") -> str:
    eps = ", ".join(f'"127.0.0.1:{p}"' for p in endpoints)
    policy = f"      load_balancer: {lb}\n"
    if retries:
        policy += '      retries: {attempts: 2, retry_on: [connect-failure, reset, "503"]}\n'
    return f"services:\n  - name: payments\n    endpoints: [{eps}]\n    policy:\n" + policy


@pytest.fixture
async def backends() -> AsyncIterator[dict[str, Backend]]:
    started = {name: Backend(name) for name in ("b1", "b2", "flaky")}
    started["flaky"].fail_first = 1
    async with asyncio.timeout(5):
        for b in started.values():
            await b.start()
    yield started
    async with asyncio.timeout(5):
        for b in started.values():
            assert b.server is not None
            await b.server.stop(0)


async def _start(tmp_path: Path, text: str) -> tuple[ControlPlane, Path]:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(text)
    plane = ControlPlane(mesh)
    async with asyncio.timeout(5):
        await plane.start("127.0.0.1:0", "127.0.0.1:0")
    return plane, mesh


async def _client(tmp_path: Path, xds_port: int) -> GrpcClient:
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(
        json.dumps(
            {
                "xds_servers": [
                    {
                        "server_uri": f"127.0.0.1:{xds_port}",
                        "channel_creds": [{"type": "insecure"}],
                        "server_features": ["xds_v3"],
                    }
                ],
                "node": {
                    "id": "checkout~grpc-client",
                    "cluster": "checkout",
                    "metadata": {"service": "checkout", "namespace": "default"},
                },
            }
        )
    )
    env = dict(os.environ, GRPC_XDS_BOOTSTRAP=str(bootstrap))
    async with asyncio.timeout(10):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(CLIENT_SCRIPT),
            "xds:///payments",
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert json.loads(await proc.stdout.readline()) == {"started": "xds:///payments"}
    return GrpcClient(proc)


async def _stop(client: GrpcClient, plane: ControlPlane) -> None:
    assert client.proc.stdin is not None
    client.proc.stdin.close()
    try:
        async with asyncio.timeout(5):
            await client.proc.wait()
    finally:
        if client.proc.returncode is None:
            client.proc.kill()
            await client.proc.wait()
        async with asyncio.timeout(5):
            await plane.stop(0)


async def test_call_goes_to_the_mesh_endpoint_and_moves_when_the_mesh_changes(
    tmp_path: Path, backends: dict[str, Backend]
) -> None:
    plane, mesh = await _start(tmp_path, mesh_text([backends["b1"].port], retries=False))
    client = await _client(tmp_path, plane.xds_port)
    try:
        first = await client.call()
        assert first == {"ok": True, "backend": "b1"}
        mesh.write_text(mesh_text([backends["b2"].port], retries=False))
        answers = await client.call_until("b2")
        assert all(a.get("backend") in ("b1", "b2") for a in answers), answers
        assert backends["b2"].calls >= 1
        # The grpc client ACKed every type it was pushed.
        [node] = [s for s in plane.ads.streams.values() if s.node_id == "checkout~grpc-client"]
        for type_state in node.types.values():
            assert type_state.version_acked == type_state.version_sent
            assert not type_state.last_nack
    finally:
        await _stop(client, plane)


async def test_call_is_retried_per_the_pushed_retry_policy(
    tmp_path: Path, backends: dict[str, Backend]
) -> None:
    plane, _ = await _start(tmp_path, mesh_text([backends["flaky"].port]))
    client = await _client(tmp_path, plane.xds_port)
    try:
        answer = await client.call()
        assert answer == {"ok": True, "backend": "flaky"}
        assert backends["flaky"].calls == 2  # UNAVAILABLE once, then retried
    finally:
        await _stop(client, plane)


async def test_without_a_retry_policy_unavailable_reaches_the_caller(
    tmp_path: Path, backends: dict[str, Backend]
) -> None:
    plane, _ = await _start(tmp_path, mesh_text([backends["flaky"].port], retries=False))
    client = await _client(tmp_path, plane.xds_port)
    try:
        answer = await client.call()
        assert answer["ok"] is False and answer["code"] == "UNAVAILABLE"
        assert backends["flaky"].calls == 1
    finally:
        await _stop(client, plane)


@pytest.mark.parametrize("lb", ["least_request", "random"])
async def test_grpc_accepts_every_mesh_load_balancer(
    tmp_path: Path, backends: dict[str, Backend], lb: str
) -> None:
    plane, _ = await _start(tmp_path, mesh_text([backends["b1"].port], lb=lb, retries=False))
    client = await _client(tmp_path, plane.xds_port)
    try:
        assert await client.call() == {"ok": True, "backend": "b1"}
        [node] = [s for s in plane.ads.streams.values() if s.node_id == "checkout~grpc-client"]
        assert all(not t.last_nack for t in node.types.values()), node.as_json()
    finally:
        await _stop(client, plane)
