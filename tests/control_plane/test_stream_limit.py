"""At most --max-streams sidecars are served; one more is refused clearly and may come back."""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import AsyncIterator

import grpc
import pytest

from control_plane.app import FILES_BESIDE_STREAMS, ControlPlane, open_files_limit
from control_plane.cache import CLUSTER_TYPE, make_snapshot
from tests.control_plane.ads_fixtures import AdsTestClient, mesh_resources


@pytest.fixture
async def small_plane() -> AsyncIterator[ControlPlane]:
    """A control plane that serves at most two streams."""
    cp = ControlPlane(None, max_streams=2)
    cp.cache.set_snapshot(make_snapshot(mesh_resources({"payments": [("127.0.0.1", 9001)]})))
    async with asyncio.timeout(5):
        await cp.start("127.0.0.1:0", None)
    yield cp
    async with asyncio.timeout(5):
        await cp.stop(0)


async def served(plane: ControlPlane, node_id: str) -> AdsTestClient:
    client = AdsTestClient(f"127.0.0.1:{plane.xds_port}", node_id=node_id)
    await client.send(CLUSTER_TYPE)
    assert (await client.recv()).type_url == CLUSTER_TYPE
    return client


async def test_one_stream_past_the_limit_is_refused_with_resource_exhausted(
    small_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = await served(small_plane, "a~1"), await served(small_plane, "b~1")
    third = AdsTestClient(f"127.0.0.1:{small_plane.xds_port}", node_id="c~1")
    try:
        with caplog.at_level(logging.WARNING, logger="outrigger.control_plane.ads"):
            await third.send(CLUSTER_TYPE)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await third.recv()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "serves 2 xDS streams already (--max-streams)" in (refused.value.details() or "")
        assert "refusing xDS streams (node c~1" in caplog.text
        metrics = small_plane.metrics.render()
        assert b"outrigger_xds_refused_streams_total 1.0" in metrics
        assert b"outrigger_xds_connected_proxies 2.0" in metrics
        # The refused stream held nothing: once one sidecar leaves, the next one is served.
        await first.close()
        async with asyncio.timeout(5):
            while small_plane.ads.admitted != 1:
                await asyncio.sleep(0.01)
        again = await served(small_plane, "c~1")
        await again.close()
    finally:
        await second.close()
        await third.close()


def test_the_open_files_limit_is_raised_to_the_hard_one_and_a_short_one_is_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2 * FILES_BESIDE_STREAMS:
        pytest.skip(f"the hard open files limit ({hard}) is too low to lower the soft one")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2 * FILES_BESIDE_STREAMS, hard))
        raised = open_files_limit(10)
        assert raised == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert raised > 2 * FILES_BESIDE_STREAMS
        with caplog.at_level(logging.WARNING, logger="outrigger.control_plane"):
            open_files_limit(raised)  # needs raised + FILES_BESIDE_STREAMS
        assert f"the open files limit is {raised}, short of" in caplog.text
        assert "lower --max-streams" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
