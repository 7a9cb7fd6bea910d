"""The chart's ClusterRole and Role grant exactly the API calls the control plane makes.

The control plane runs in process with the very arguments the chart's Deployment passes (paths
and listen addresses moved to the test's), its mesh file from the chart's ConfigMap and, in the
modes where the chart makes them, its certificate files from the chart's Secret, against the
strict fake API server seeded with the chart's own Secret and webhook configurations. A whole
scenario runs (listing and watching, a Service with an invalid annotation, so an Event; in
self mode its certificate written and both caBundles patched), and every request it sent is
turned into what RBAC checks (group, resource, verb, namespace, name: the API server's
RequestInfo). Then each request must be allowed by a rule, and each rule (every group, resource,
verb and resourceName it lists) must be needed by a request: nothing missing, nothing spare.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control_plane.app import start_from_args
from control_plane.cache import CLUSTER_TYPE
from outrigger.cli import build_parser
from tests.control_plane.kube_api import (
    Access,
    FakeKubeApi,
    endpoint_slice,
    namespace,
    running_api,
    service,
    until,
    write_kubeconfig,
)
from tests.control_plane.webhooks.self_certs import seed_chart_objects
from tests.helm.chart import NAMESPACE, SCENARIOS, find, objects

# Where the chart mounts files, and the flags that name listen addresses.
MOUNTS = ("--mesh=", "--webhook-cert=", "--webhook-key=")
LISTEN = ("--xds=", "--http=", "--webhook=")


@dataclass(frozen=True)
class Grant:
    group: str
    resource: str
    verb: str
    namespace: str  # "" for a ClusterRole (everywhere), else the Role's namespace
    name: str  # "" when the rule lists no resourceNames

    def allows(self, access: Access) -> bool:
        return (
            (self.group, self.resource, self.verb) == (access.group, access.resource, access.verb)
            and self.namespace in ("", access.namespace)
            and self.name in ("", access.name)
        )


def grants(objs: list[dict[str, Any]]) -> set[Grant]:
    """Every (group, resource, verb, resourceName) the control plane's roles list."""
    found = set()
    for obj in objs:
        if obj["kind"] not in ("ClusterRole", "Role"):
            continue
        scope = obj["metadata"].get("namespace", "") if obj["kind"] == "Role" else ""
        for rule in obj["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [""]:
                            found.add(Grant(group, resource, verb, scope, name))
    return found


def chart_args(objs: list[dict[str, Any]], tmp_path: Path, api: FakeKubeApi) -> list[str]:
    """The Deployment's args, with the chart's mounted files written under tmp_path, loopback
    port-0 addresses, and a kubeconfig for the fake API instead of the service account."""
    (container,) = find(objs, "Deployment")["spec"]["template"]["spec"]["containers"]
    mesh = next(o for o in objs if o["kind"] == "ConfigMap" and "mesh.yaml" in o.get("data", {}))
    files = {"mesh.yaml": mesh["data"]["mesh.yaml"].encode()}
    secrets = [o for o in objs if o["kind"] == "Secret" and o.get("data")]
    for secret in secrets:
        for key in ("tls.crt", "tls.key"):
            files[key] = base64.b64decode(secret["data"][key])
    args = []
    for arg in container["args"]:
        if arg.startswith(MOUNTS):
            flag, value = arg.split("=", 1)
            path = tmp_path / Path(value).name
            path.write_bytes(files[path.name])
            arg = f"{flag}={path}"
        elif arg.startswith(LISTEN):
            arg = arg.split("=", 1)[0] + "=127.0.0.1:0"
        args.append(arg)
    return [*args, f"--kubeconfig={write_kubeconfig(tmp_path / 'kubeconfig', api)}"]


def cluster(api: FakeKubeApi) -> None:
    """What the control plane sees in every scenario, in the namespaces the chart may watch."""
    for ns in ("shop", "payments"):
        api.create(namespace(ns))
        api.create(
            service("orders", ns, annotations={"outrigger.dev/timeout": "2 seconds"})
        )  # invalid: an Event
        api.create(endpoint_slice("orders-1", ns, "orders", ["10.1.0.1"], 8080))


def sorted_lines(items: Iterator[Any] | set[Any]) -> str:
    return "\n".join(sorted(str(i) for i in items))


@pytest.mark.parametrize("scenario", ["default", "self", "custom"])
async def test_the_roles_grant_exactly_what_the_control_plane_asks(
    scenario: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = SCENARIOS[scenario]
    objs = objects(values)
    monkeypatch.setenv("POD_NAMESPACE", NAMESPACE)
    monkeypatch.setenv("POD_NAME", "outrigger-7d9c-abcde")
    async with running_api(token="control-plane-token") as api:
        seed_chart_objects(api, values)
        cluster(api)
        argv = chart_args(objs, tmp_path, api)
        plane = await asyncio.wait_for(start_from_args(build_parser().parse_args(argv)), 30)
        try:
            clusters = "outbound|80||orders.shop.svc.cluster.local"
            snapshot = plane.cache.get("shop")
            assert snapshot is not None and clusters in snapshot.of(CLUSTER_TYPE).resources
            await until("the Events", lambda: len(api.events) == 2)
            await until("every watch", lambda: sum(a.verb == "watch" for a in api.accesses()) >= 3)
        finally:
            await asyncio.wait_for(plane.stop(0), 10)
    asked = set(api.accesses())
    granted = grants(objs)
    refused = {a for a in asked if not any(g.allows(a) for g in granted)}
    spare = {g for g in granted if not any(g.allows(a) for a in asked)}
    assert not refused, f"the chart does not grant:\n{sorted_lines(refused)}"
    assert not spare, f"the chart grants what the control plane never asks:\n{sorted_lines(spare)}"
    if values.get("webhook", {}).get("certificates") == "self":
        verbs = {(a.resource, a.verb) for a in asked if a.name}
        assert {("secrets", "update"), ("mutatingwebhookconfigurations", "patch")} <= verbs
