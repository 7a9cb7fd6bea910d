"""Each sidecar is served the routes of its own namespace; clusters are the same for all."""

from __future__ import annotations

import asyncio
from pathlib import Path

from envoy.config.route.v3 import route_pb2

from control_plane.app import ControlPlane
from control_plane.cache import CLUSTER_TYPE, ROUTE_TYPE
from tests.control_plane.ads_fixtures import AdsTestClient

MESH = """
services:
  - name: payments
    namespace: shop
    endpoints: ["127.0.0.1:9001"]
  - name: payments
    namespace: bank
    endpoints: ["127.0.0.1:9002"]
"""


def bare_payments_cluster(response: object) -> str:
    config = route_pb2.RouteConfiguration()
    (packed,) = response.resources  # type: ignore[attr-defined]
    packed.Unpack(config)
    for vhost in config.virtual_hosts:
        if "payments" in vhost.domains:
            return str(vhost.routes[0].route.cluster)
    return ""


async def test_the_bare_name_follows_the_sidecars_namespace(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(MESH)
    plane = ControlPlane(mesh)
    async with asyncio.timeout(5):
        await plane.start("127.0.0.1:0", None)
    address = f"127.0.0.1:{plane.xds_port}"
    clients = {
        ns: AdsTestClient(address, node_id=f"n-{ns}", namespace=ns)
        for ns in ("shop", "bank", "web")
    }
    try:
        seen: dict[str, tuple[str, str]] = {}
        for ns, client in clients.items():
            await client.send(CLUSTER_TYPE)
            clusters = await client.recv()
            await client.send(ROUTE_TYPE, ["outbound"])
            routes = await client.recv()
            seen[ns] = (clusters.version_info, bare_payments_cluster(routes))
        assert seen["shop"][1] == "outbound|80||payments.shop.svc.cluster.local"
        assert seen["bank"][1] == "outbound|80||payments.bank.svc.cluster.local"
        assert seen["web"][1] == ""  # no bare "payments" in a namespace without one
        assert len({version for version, _ in seen.values()}) == 1  # one CDS version for all
        assert set(plane.cache.versions) == {"", "bank", "shop"}
    finally:
        for client in clients.values():
            await client.close()
        await plane.stop(0)
