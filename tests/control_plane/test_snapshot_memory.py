"""What snapshots keep: bytes, and one object for what every namespace's copy repeats."""

from __future__ import annotations

from control_plane.cache import ROUTE_TYPE, make_snapshots
from mesh.model import parse_mesh
from mesh.translate import translate_namespaces


def test_the_namespaces_outbound_routes_share_their_references() -> None:
    mesh = parse_mesh(
        {
            "services": [
                {"name": f"svc{i}", "namespace": f"ns{i % 3}", "endpoints": [f"10.0.0.{i}:80"]}
                for i in range(1, 7)
            ]
        },
        "mesh.yaml",
    )
    _, snapshots = make_snapshots(*translate_namespaces(mesh))
    first, second = (snapshots[ns].of(ROUTE_TYPE).resources["outbound"] for ns in ("ns0", "ns1"))
    assert first.field != second.field  # each namespace's own bare names
    # (virtual host, cluster): one per service, and the catch-all's PassthroughCluster
    assert len(first.refs) == len(second.refs) == 7
    assert first.refs == second.refs  # the same names in both: held once
    assert all(a is b for a, b in zip(first.refs, second.refs, strict=True))
