from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from control_plane.app import ControlPlane
from control_plane.cache import make_snapshot
from tests.control_plane.ads_fixtures import mesh_resources


@contextlib.asynccontextmanager
async def serving_plane(instance: str | None = None) -> AsyncIterator[ControlPlane]:
    """A control plane on 127.0.0.1 port 0, serving two services, without a mesh file."""
    cp = ControlPlane(None, instance=instance)
    cp.cache.set_snapshot(
        make_snapshot(
            mesh_resources({"payments": [("127.0.0.1", 9001)], "orders": [("127.0.0.1", 9101)]})
        )
    )
    async with asyncio.timeout(5):
        await cp.start("127.0.0.1:0", "127.0.0.1:0")
    try:
        yield cp
    finally:
        async with asyncio.timeout(5):
            await cp.stop(0)


@pytest.fixture
async def plane() -> AsyncIterator[ControlPlane]:
    async with serving_plane() as cp:
        yield cp
