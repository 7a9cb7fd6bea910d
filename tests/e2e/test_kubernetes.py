"""End to end: `outrigger control-plane --kubernetes` (a real process, with a kubeconfig) against
the fake API server, and a real `outrigger sidecar` process in namespace "shop" routing to apps.

One story, in order, as a developer would live it: create a Service -> the sidecar routes to it;
annotate it -> the policy reaches the sidecar and a retry happens; scale its endpoints -> only EDS
is pushed; write an invalid annotation -> an Event is posted and the rest of the policy stays; the
API server restarts -> the watch resumes and nothing is pushed; history is lost while a Service
is deleted -> 410, relist, and the sidecar stops routing to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.control_plane.kube_api import (
    FakeKubeApi,
    endpoint_slice,
    namespace,
    running_api,
    service,
    write_kubeconfig,
)
from tests.e2e.mesh_processes import (
    ControlPlaneProc,
    Processes,
    SidecarProc,
    get_json,
    start_control_plane,
    start_sidecar,
    wait_until,
)
from tests.sidecar.proxy_fixtures import Received, Upstream, ok, serve, upstream

TOKEN = "e2e-token"
NODE = "frontend~e2e"


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Processes]:
    processes = Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()


class Story:
    def __init__(
        self, api: FakeKubeApi, cp: ControlPlaneProc, sidecar: SidecarProc, http: httpx.AsyncClient
    ) -> None:
        self.api = api
        self.cp = cp
        self.sidecar = sidecar
        self.http = http

    async def call(self, host: str) -> httpx.Response:
        return await self.http.get(f"http://{self.sidecar.outbound}/pay", headers={"host": host})

    async def sync(self) -> dict[str, dict[str, Any]]:
        """Per xDS type (short name), what the control plane sent this sidecar and it ACKed."""
        nodes = await get_json(self.http, f"http://{self.cp.http}/debug/syncz")
        (node,) = [n for n in nodes if n["node_id"] == NODE]
        return {url.rsplit(".", 1)[-1]: state for url, state in node["types"].items()}

    async def settled(self) -> dict[str, str]:
        """The versions the sidecar ACKed, once every type it was sent is ACKed."""

        async def acked() -> dict[str, str] | None:
            types = await self.sync()
            if all(t["version_sent"] == t["version_acked"] for t in types.values()):
                return {name: t["version_acked"] for name, t in types.items()}
            return None

        found: dict[str, str] = await wait_until("the sidecar ACKed everything", acked)
        return found

    async def metric(self, name: str) -> float:
        text = (await self.http.get(f"http://{self.cp.http}/metrics")).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )


def annotate(api: FakeKubeApi, **annotations: str) -> None:
    more = {f"outrigger.dev/{k.replace('_', '-')}": v for k, v in annotations.items()}
    api.edit("Service", "shop", "payments",
             lambda s: s["metadata"].setdefault("annotations", {}).update(more))  # fmt: skip


async def routes(story: Story, host: str, want: Callable[[httpx.Response], bool]) -> None:
    async def check() -> bool:
        return want(await story.call(host))

    await wait_until(f"{host} routed as expected", check)


async def test_a_cluster_drives_a_real_sidecar(tmp_path: Path, procs: Processes) -> None:
    flaky: list[bytes] = []

    def payments_app(req: Received) -> bytes:
        return flaky.pop(0) if flaky else ok(b"payments")

    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("outbound_policy: registry_only\n")
    async with (
        running_api(token=TOKEN) as api,
        upstream(serve(payments_app)) as pay1,
        upstream(serve(payments_app)) as pay2,
        upstream(serve(lambda req: ok(b"orders"))) as orders,
        httpx.AsyncClient(timeout=5) as http,
    ):
        api.create(namespace("shop", {"outrigger.dev/timeout": "5s"}))
        api.create(service("orders", "shop"))
        api.create(slice_for("orders", orders))
        cp = await start_control_plane(
            procs,
            mesh,
            extra=("--kubernetes", "--kubeconfig", str(write_kubeconfig(tmp_path / "kc", api)),
                   "--debounce", "50ms"),
        )  # fmt: skip
        sidecar = await start_sidecar(
            procs, NODE, control_plane=cp.xds, app="127.0.0.1:9",
            extra=("--namespace", "shop", "--initial-fetch-timeout", "0s"),
        )  # fmt: skip
        story = Story(api, cp, sidecar, http)
        await routes(story, "orders", lambda r: r.text == "orders")

        # 1. Create a Service: the sidecar routes to it, by its bare name (own namespace).
        assert (await story.call("payments")).status_code == 502  # registry_only: not yet
        api.create(service("payments", "shop"))
        api.create(slice_for("payments", pay1))
        await routes(story, "payments", lambda r: r.text == "payments")
        assert (await story.call("payments.shop.svc.cluster.local")).text == "payments"

        # 2. Annotate it: the policy reaches the sidecar, and a 503 is retried.
        annotate(api, retry_attempts="2", retry_on="503")
        await wait_until("the retry policy", lambda: policy_of(story, "retry-attempts", "2"))
        flaky.append(ok(b"busy", status=b"503 Service Unavailable"))
        before = len(pay1.requests)
        response = await story.call("payments")
        assert (response.status_code, response.text) == (200, "payments")
        assert len(pay1.requests) == before + 2  # the 503, then the retry
        dump = await get_json(http, f"http://{sidecar.admin}/config_dump")
        policy = dump["services"]["outbound|80||payments.shop.svc.cluster.local"]["policy"]
        assert policy["retry-attempts"] == {"value": "2", "from": "service"}
        assert policy["timeout"] == {"value": "5s", "from": "namespace"}

        # 3. Scale the endpoints: an EDS push only.
        versions = await story.settled()
        api.create(slice_for("payments", pay2, "2"))
        await wait_until("both endpoints", lambda: has_endpoints(story, 2))
        after = await story.settled()
        assert after["ClusterLoadAssignment"] != versions["ClusterLoadAssignment"]
        for kind in ("Listener", "RouteConfiguration", "Cluster"):
            assert after[kind] == versions[kind], kind

        # 4. An invalid annotation: an Event, that key falls back, the rest still applies.
        annotate(api, timeout="2 seconds")
        await wait_until("an Event", lambda: events_about(api, "outrigger.dev/timeout"))
        await wait_until("the problem in status", lambda: problem_listed(story))
        flaky.append(ok(b"busy", status=b"503 Service Unavailable"))
        response = await story.call("payments")
        assert (response.status_code, response.text) == (200, "payments")  # still retried
        assert await policy_of(story, "timeout", "5s")  # the namespace's, not the bad value
        assert await story.metric("outrigger_invalid_annotations_total") >= 1

        # 5. The API server restarts mid-watch: the watch resumes, nothing is pushed.
        versions = await story.settled()
        pushes = await story.metric("outrigger_xds_pushes_total")
        watches = len(api.requests_to("/api/v1/services", watch=True))
        await api.restart()
        await wait_until(
            "the watch resumed",
            lambda: _true(len(api.requests_to("/api/v1/services", watch=True)) > watches),
        )
        await asyncio.sleep(0.5)
        assert await story.settled() == versions
        assert await story.metric("outrigger_xds_pushes_total") == pushes

        # 6. History lost while orders is deleted: 410, relist, and orders is gone.
        await api.stop()
        api.delete("Service", "shop", "orders")
        api.compact()
        await api.start()
        await routes(story, "orders", lambda r: r.status_code == 502)  # registry_only: NR
        assert len(api.requests_to("/api/v1/services", watch=False)) == 2
        assert (await story.call("payments")).text == "payments"


async def _true(value: bool) -> bool:
    return value


def slice_for(name: str, app: Upstream, suffix: str = "1") -> dict[str, Any]:
    """An EndpointSlice of `name` in shop whose one endpoint is `app` (127.0.0.1, its port).

    Apps on different ports are different slices of the same Service, as the EndpointSlice
    controller writes them when pods disagree on a named port's number."""
    port = int(app.address.rsplit(":", 1)[1])
    return endpoint_slice(f"{name}-{suffix}", "shop", name, ["127.0.0.1"], port)


async def policy_of(story: Story, key: str, value: str) -> bool:
    dump = await get_json(story.http, f"http://{story.sidecar.admin}/config_dump")
    service = dump["services"].get("outbound|80||payments.shop.svc.cluster.local")
    return service is not None and service["policy"][key]["value"] == value


async def has_endpoints(story: Story, count: int) -> bool:
    dump = await get_json(story.http, f"http://{story.sidecar.admin}/config_dump")
    service = dump["services"].get("outbound|80||payments.shop.svc.cluster.local") or {}
    return len(service.get("endpoints", [])) == count


async def events_about(api: FakeKubeApi, key: str) -> bool:
    return any(key in e["note"] and e["reason"] == "InvalidPolicy" for e in api.events)


async def problem_listed(story: Story) -> bool:
    problems = await get_json(story.http, f"http://{story.cp.http}/debug/problemz")
    return any(p["key"] == "outrigger.dev/timeout" for p in problems)
