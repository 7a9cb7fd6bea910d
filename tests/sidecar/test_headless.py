"""A headless service: requests keep the destination the caller chose, with the service's policy."""

from __future__ import annotations

import asyncio

import httpx

from mesh.model import Mesh, MeshEndpoint, MeshService
from mesh.policy import Policy, Retries
from sidecar.app import Sidecar
from sidecar.settings import SidecarSettings
from sidecar.xds.interpret import snapshot_from_mesh
from tests.sidecar.proxy_fixtures import (
    WAIT,
    Received,
    ok,
    serve,
    settings_namespace,
    upstream,
    url,
)


async def test_a_pod_ip_of_a_headless_service_is_reached_directly_and_retried() -> None:
    answers = [ok(b"busy", status=b"503 Service Unavailable"), ok(b"pod")]

    def respond(req: Received) -> bytes:
        return answers.pop(0) if answers else ok(b"pod")

    async with upstream(serve(respond)) as pod:
        host, port = pod.address.rsplit(":", 1)
        service = MeshService(
            "db",
            "default",
            int(port),
            endpoints=(MeshEndpoint(host, int(port), hostname="db-0"),),
            policy=Policy(retries=Retries(attempts=2)),
            headless=True,
        )
        sidecar = Sidecar(SidecarSettings.from_args(settings_namespace()))
        sidecar.apply(snapshot_from_mesh(Mesh(services=(service,))))
        assert (
            sidecar.config_dump.document()["services"][
                f"outbound|{port}||db.default.svc.cluster.local"
            ]["endpoints"]
            == "original destination"
        )
        async with asyncio.timeout(WAIT):
            await sidecar.start()
        try:
            async with httpx.AsyncClient(timeout=WAIT) as client:
                response = await client.get(url(sidecar), headers={"host": pod.address})
            assert (response.status_code, response.text) == (200, "pod")
            assert len(pod.requests) == 2  # the 503 was retried, to the same pod
            state = sidecar.services.get("db")
            assert state is not None and state.stats.retries == 1
        finally:
            async with asyncio.timeout(WAIT):
                await sidecar.drain()
