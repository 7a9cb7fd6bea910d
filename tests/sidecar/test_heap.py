"""The sidecar process takes its start-up objects out of the cyclic GC once it is ready.

Why (measured in `Sidecar._settle_heap`'s docstring): full collections otherwise walk every
module, descriptor and config object and stall the event loop for milliseconds. These tests pin
when the freeze happens: only in `run()` (the `outrigger sidecar` process), only once listeners
are up and a config is applied, and only once.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import generate_latest

from mesh.model import parse_mesh
from sidecar.app import Sidecar
from sidecar.settings import SidecarSettings
from sidecar.xds.interpret import snapshot_from_mesh
from tests.sidecar.proxy_fixtures import (
    WAIT,
    mesh_doc,
    ok,
    serve,
    settings_namespace,
    upstream,
    url,
)
from tests.sidecar.resilience_fixtures import wait_for


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()  # give this test process's objects back to the collector
    gc.set_threshold(*thresholds)


async def test_run_freezes_after_the_config_arrives_and_proxies_as_before() -> None:
    async with upstream(serve(lambda req: ok(b"paid"))) as payments:
        snapshot = snapshot_from_mesh(
            parse_mesh(mesh_doc({"payments": [payments.address]}), "<test>")
        )
        sidecar = Sidecar(SidecarSettings.from_args(settings_namespace()))
        running = asyncio.get_running_loop().create_task(sidecar.run())
        try:
            await wait_for(lambda: sidecar.listening)
            assert gc.get_freeze_count() == 0, "frozen before any config was applied"

            sidecar.apply(snapshot)  # as the xDS client does when the first snapshot arrives
            frozen = gc.get_freeze_count()
            assert frozen > 1000, f"only {frozen} objects frozen"

            sidecar.apply(snapshot)  # a later push does not freeze again (the old stack is freed)
            assert gc.get_freeze_count() <= frozen

            # What 256 requests in flight hold no longer sets off young collections: 5,000 new
            # objects (CPython's default collects every 700) pass without one, as the metrics
            # page shows.
            page = sidecar.metrics.registry()
            gc.collect(0)  # start from an empty young generation
            generate_latest(page)
            in_flight = [{"request": i} for i in range(5_000)]
            text = generate_latest(page).decode()
            assert "outrigger_gc_collections_since_scrape 0.0" in text.splitlines(), text
            del in_flight

            async with httpx.AsyncClient(timeout=WAIT) as client:
                response = await client.get(url(sidecar, path="/"), headers={"host": "payments"})
            assert (response.status_code, response.text) == (200, "paid")
        finally:
            sidecar.request_drain("test")
            async with asyncio.timeout(WAIT):
                assert await running == 0


async def test_start_alone_leaves_the_heap_alone() -> None:
    """Library use and in-process tests call start(), not run(): no freeze of their process."""
    sidecar = Sidecar(SidecarSettings.from_args(settings_namespace()))
    sidecar.apply(snapshot_from_mesh(parse_mesh(mesh_doc(), "<test>")))
    async with asyncio.timeout(WAIT):
        await sidecar.start()
    try:
        assert sidecar.listening
        assert gc.get_freeze_count() == 0
    finally:
        async with asyncio.timeout(WAIT):
            await sidecar.drain()
