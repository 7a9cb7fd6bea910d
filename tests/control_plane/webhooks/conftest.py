"""The `webhook` fixture: a control plane with its webhooks on HTTPS, torn down after."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from control_plane.app import ControlPlane
from tests.control_plane.webhooks.serving import MESH, Webhook, issue


@pytest.fixture
async def webhook(tmp_path: Path) -> AsyncIterator[Webhook]:
    ca = trustme.CA()
    cert, key, mesh = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "mesh.yaml"
    issue(ca, cert, key)
    mesh.write_text(MESH.format(tag="1.0"))
    plane = ControlPlane(mesh, poll_interval=3600)  # reloads are explicit here
    async with asyncio.timeout(5):
        await plane.start(
            "127.0.0.1:0", None, webhook="127.0.0.1:0", webhook_cert=cert, webhook_key=key
        )
    yield Webhook(plane, ca, cert, key, mesh)
    async with asyncio.timeout(5):
        await plane.stop(0)
