"""`outrigger status` reads CSDS on the xDS port and prints one row per connected sidecar."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from control_plane.app import ControlPlane
from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE
from control_plane.sources import ObjectRef, SourceProblem, Update
from control_plane.status import fetch_problems, fetch_status
from mesh.model import parse_mesh
from outrigger.status import run_status
from tests.control_plane.ads_fixtures import AdsTestClient


async def test_status_lists_each_sidecar_with_versions_and_last_nack(
    plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{plane.xds_port}"
    a = AdsTestClient(address, node_id="payments~pod-a", service="payments")
    b = AdsTestClient(address, node_id="orders~pod-b", service="orders")
    try:
        await a.send(LISTENER_TYPE)
        lds = await a.recv()
        await a.ack(lds)
        await a.send(CLUSTER_TYPE)
        cds = await a.recv()
        await a.send(CLUSTER_TYPE, nonce=cds.nonce, error="unsupported lb_policy MAGLEV")
        await b.send(ENDPOINT_TYPE, ["orders"])
        await b.recv()
        await a.send(ENDPOINT_TYPE, ["payments"])  # answered after the NACK was processed
        await a.recv()

        proxies = await asyncio.wait_for(asyncio.to_thread(fetch_status, address), 5)
        by_node = {p.node_id: p for p in proxies}
        assert set(by_node) == {"payments~pod-a", "orders~pod-b"}
        pa = by_node["payments~pod-a"]
        assert pa.service == "payments"
        assert pa.types["LDS"].status == "SYNCED"
        assert pa.types["LDS"].version_acked == lds.version_info == pa.types["LDS"].version_sent
        assert pa.types["CDS"].status == "NACKED"
        assert pa.types["CDS"].last_nack == "unsupported lb_policy MAGLEV"
        assert pa.types["EDS"].status == "STALE"  # sent, not ACKed yet
        assert by_node["orders~pod-b"].types["EDS"].status == "STALE"

        args = argparse.Namespace(control_plane=address)
        assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 5) == 0
        out = capsys.readouterr().out
        assert "payments~pod-a" in out and "orders~pod-b" in out
        assert "CDS: unsupported lb_policy MAGLEV" in out
        assert f"SYNCED {lds.version_info[:8]}/{lds.version_info[:8]}" in out
    finally:
        await a.close()
        await b.close()


async def test_status_against_no_control_plane_fails_with_a_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(control_plane="127.0.0.1:1")
    assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 10) == 1
    assert "cannot ask the control plane at 127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err


async def test_status_shows_the_invalid_annotations_the_control_plane_works_around(
    plane: ControlPlane, capsys: pytest.CaptureFixture[str]
) -> None:
    problem = SourceProblem(
        reason="InvalidPolicy",
        message='outrigger.dev/timeout: must be a duration like "250ms", "1.5s", "2s" or "1m", '
        'got "soon"; using 5s (namespace) instead',
        regarding=ObjectRef("Service", "payments", "shop"),
        key="outrigger.dev/timeout",
        value="soon",
    )
    await plane.publish(Update(parse_mesh({"services": []}, "m"), (problem,)))
    address = f"127.0.0.1:{plane.xds_port}"
    (found,) = await asyncio.wait_for(asyncio.to_thread(fetch_problems, address), 5)
    assert (found.object, found.key, found.value) == ("Service shop/payments", problem.key, "soon")
    args = argparse.Namespace(control_plane=address)
    assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 5) == 0
    out = capsys.readouterr().out
    assert "Service shop/payments  InvalidPolicy  outrigger.dev/timeout: must be a duration" in out
    assert out.rstrip().endswith("using 5s (namespace) instead")
