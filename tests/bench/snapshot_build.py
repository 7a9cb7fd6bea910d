"""CPU time to turn a cluster into snapshots, full and after an endpoint change (not a test).

    .venv/bin/python tests/bench/snapshot_build.py [--services 1000] [--endpoints 10]
        [--namespaces 20] [--repeat 5]

In process, no I/O: the cluster k8s_scale.py serves (Services with one EndpointSlice each) is
put in a `ClusterState`, and each step the control plane takes for an update is timed with
`time.process_time` (CPU time, so a loaded machine inflates it far less than wall time):

- cluster -> mesh (`cluster_mesh`), translation (`translate_namespaces`), encoding
  (`make_snapshots`) of the whole cluster: the first snapshot, and any change before
  incremental translation;
- one pod IP changed in one EndpointSlice, then the same three steps as the control plane takes
  them now: `translate_update` from the previous translation (`settled`: kept as encodings) and
  `make_snapshots` given the previous snapshots. The result is checked equal (every type's
  version) to a full build's.

Each figure is the median of `--repeat` runs (min and max beside it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ads_load import REPO, loadavg
from k8s_scale import cluster_objects

T = TypeVar("T")


def cpu(samples: list[float], f: Callable[..., T], *args: Any) -> T:
    started = time.process_time()
    result = f(*args)
    samples.append(time.process_time() - started)
    return result


def show(label: str, samples: list[float]) -> None:
    print(
        f"  {label:<34} {statistics.median(samples) * 1000:7.0f} ms "
        f"(min {min(samples) * 1000:.0f}, max {max(samples) * 1000:.0f})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--namespaces", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from control_plane.cache import make_snapshots, settled
    from control_plane.sources.cluster import ClusterState, cluster_mesh
    from mesh.model import Mesh
    from mesh.translate import translate_namespaces, translate_update

    objects = cluster_objects(args.services, args.endpoints, args.namespaces)
    slices = [o for o in objects if o["kind"] == "EndpointSlice"]
    base = Mesh(source="no mesh file")
    steps: dict[str, list[float]] = {}

    def step(name: str) -> list[float]:
        return steps.setdefault(name, [])

    for run in range(args.repeat):
        state = ClusterState()
        for kind in ("Namespace", "Service", "EndpointSlice"):
            state.replace(kind, [o for o in objects if o["kind"] == kind])
        update = cpu(step("full: cluster -> mesh"), cluster_mesh, state, base)
        default, by_ns = cpu(step("full: translate"), translate_namespaces, update.mesh)
        cpu(step("full: encode"), make_snapshots, default, by_ns)
        translation = translate_update(update.mesh)
        snapshots = make_snapshots(translation.default, translation.by_namespace)
        translation = settled(translation, *snapshots)
        changed: Any = copy.deepcopy(slices[(run * 37) % len(slices)])
        changed["endpoints"][-1]["addresses"] = [f"10.200.0.{run + 1}"]
        state.put("EndpointSlice", changed)
        update = cpu(step("endpoint change: cluster -> mesh"), cluster_mesh, state, base)
        after = cpu(step("endpoint change: translate"), translate_update, update.mesh, translation)
        assert after.endpoints_only, "an endpoint change was translated in full"
        new = cpu(
            step("endpoint change: encode"),
            make_snapshots,
            after.default,
            after.by_namespace,
            snapshots,
        )
        full = make_snapshots(*translate_namespaces(update.mesh))
        versions = {t: r.version for t, r in new[0].types.items()}
        assert versions == {t: r.version for t, r in full[0].types.items()}, "versions differ"
        assert all(new[1][ns].version == s.version for ns, s in full[1].items())
    print(
        f"snapshot_build: {args.services} services x {args.endpoints} endpoints in "
        f"{args.namespaces} namespaces, CPU time, median of {args.repeat} "
        f"[load {loadavg()}]"
    )
    for name, samples in steps.items():
        show(name, samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
