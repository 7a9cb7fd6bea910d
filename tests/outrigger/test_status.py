"""`outrigger status` reads CSDS on the xDS port of every control plane replica (a list, or the
endpoints of its Service through the Kubernetes API) and prints one row per connected sidecar,
naming the replica it is connected to."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane.app import ControlPlane
from control_plane.cache import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE
from control_plane.sources import ObjectRef, SourceProblem, Update
from control_plane.status import fetch_problems, fetch_status
from mesh.model import parse_mesh
from outrigger.cli import build_parser
from outrigger.status import run_status
from tests.control_plane.ads_fixtures import AdsTestClient
from tests.control_plane.conftest import serving_plane
from tests.control_plane.kube_api import endpoint_slice, running_api, write_kubeconfig

Json = dict[str, Any]


def status_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["status", *argv])


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

        args = status_args("--control-plane", address)
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
    args = status_args("--control-plane", "127.0.0.1:1")
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
    args = status_args("--control-plane", address)
    assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 5) == 0
    out = capsys.readouterr().out
    assert "Service shop/payments  InvalidPolicy  outrigger.dev/timeout: must be a duration" in out
    assert out.rstrip().endswith("using 5s (namespace) instead")


PROBLEM = SourceProblem(
    reason="InvalidPolicy",
    message='outrigger.dev/timeout: must be a duration like "250ms", got "soon"; using none',
    regarding=ObjectRef("Service", "payments", "shop"),
    key="outrigger.dev/timeout",
    value="soon",
)


@contextlib.asynccontextmanager
async def two_replicas() -> AsyncIterator[tuple[ControlPlane, ControlPlane]]:
    """Replicas outrigger-a and outrigger-b with a sidecar each (payments~pod-a on a,
    orders~pod-b on b), both reporting the same problem, as replicas of one cluster do."""
    async with (
        serving_plane("outrigger-a") as a,
        serving_plane("outrigger-b") as b,
        contextlib.AsyncExitStack() as stack,
    ):
        for plane, node in ((a, "payments~pod-a"), (b, "orders~pod-b")):
            client = AdsTestClient(
                f"127.0.0.1:{plane.xds_port}", node_id=node, service=node.split("~")[0]
            )
            stack.push_async_callback(client.close)
            await client.send(CLUSTER_TYPE)
            await client.ack(await client.recv())
            await plane.publish(Update(parse_mesh({"services": []}, "m"), (PROBLEM,)))
        yield a, b


def row(out: str, node: str) -> list[str]:
    (line,) = [line for line in out.splitlines() if line.startswith(node)]
    return line.split()


async def test_status_asks_every_replica_and_each_row_names_the_one_its_sidecar_uses(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with two_replicas() as (a, b):
        first, second = f"127.0.0.1:{a.xds_port}", f"127.0.0.1:{b.xds_port}"
        args = status_args("--control-plane", f"{first},{second}")
        assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 10) == 0
        out = capsys.readouterr().out
        assert "CONTROL PLANE" in out.splitlines()[0]
        assert first in row(out, "payments~pod-a") and second not in row(out, "payments~pod-a")
        assert second in row(out, "orders~pod-b")
        assert out.count("must be a duration") == 1  # both report it; shown once
        # /debug/syncz of each replica: its own sidecars, and which replica it is.
        for plane, node in ((a, "payments~pod-a"), (b, "orders~pod-b")):
            async with httpx.AsyncClient(timeout=5) as http:
                nodes = (await http.get(f"http://127.0.0.1:{plane.http_port}/debug/syncz")).json()
            assert [(n["node_id"], n["control_plane"]) for n in nodes] == [(node, plane.instance)]


async def test_a_replica_that_does_not_answer_is_named_and_the_status_is_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with two_replicas() as (a, _):
        args = status_args("--control-plane", f"127.0.0.1:{a.xds_port},127.0.0.1:1")
        assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 15) == 1
        captured = capsys.readouterr()
        assert "payments~pod-a" in captured.out and "orders~pod-b" not in captured.out
        assert captured.err == (
            "outrigger status: cannot ask the control plane at 127.0.0.1:1: UNAVAILABLE "
            "(its sidecars are not shown)\n"
        )


def control_plane_slice(name: str, port: int, pods: dict[str, str], service: str) -> Json:
    """An EndpointSlice of `service` in outrigger-system: pod name -> IP, at `port`."""
    piece = endpoint_slice(
        name, "outrigger-system", service, list(pods.values()), port, port_name="grpc-xds"
    )
    for endpoint, pod in zip(piece["endpoints"], pods, strict=True):
        endpoint["targetRef"] = {"kind": "Pod", "name": pod, "namespace": "outrigger-system"}
    return piece


async def test_status_finds_the_replicas_through_the_control_plane_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with two_replicas() as (a, b), running_api(token="sre-token") as api:
        # A rollout that changed the port puts pods in separate slices; outrigger-c is listed
        # (not ready yet) but nothing answers at its address; another Service is not asked.
        first = {"outrigger-a": "127.0.0.1"}
        second = {"outrigger-b": "127.0.0.1", "outrigger-c": "127.0.0.2"}
        api.create(control_plane_slice("outrigger-1", a.xds_port, first, "outrigger"))
        api.create(control_plane_slice("outrigger-2", b.xds_port, second, "outrigger"))
        api.create(control_plane_slice("other-1", 1, {"other": "127.0.0.3"}, "other"))
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", api)
        args = status_args("--kubernetes", f"--kubeconfig={kubeconfig}")
        assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 15) == 1
        captured = capsys.readouterr()
        assert "outrigger-a" in row(captured.out, "payments~pod-a")
        assert "outrigger-b" in row(captured.out, "orders~pod-b")
        assert captured.err.startswith(
            "outrigger status: cannot ask the control plane outrigger-c at "
            f"127.0.0.2:{b.xds_port}: UNAVAILABLE"
        )
        assert "other" not in captured.err
        path = "/apis/discovery.k8s.io/v1/namespaces/outrigger-system/endpointslices"
        (listed,) = api.requests_to(path)
        assert listed == {"labelSelector": "kubernetes.io/service-name=outrigger"}
        args = status_args("--kubernetes", f"--kubeconfig={kubeconfig}", "--service=nothing")
        assert await asyncio.wait_for(asyncio.to_thread(run_status, args), 15) == 1
        assert capsys.readouterr().err == (
            "outrigger status: Service outrigger-system/nothing has no endpoints with a port "
            "named grpc-xds: is the control plane running? (kubectl -n outrigger-system get "
            "endpointslices -l kubernetes.io/service-name=nothing; --namespace and --service "
            "name another)\n"
        )
