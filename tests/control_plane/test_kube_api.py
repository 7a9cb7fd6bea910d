"""The fake API server is strict: the client mistakes it must catch make a test fail."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
from kubernetes_asyncio import client as kube_client

from control_plane.sources.reflector import Reflector, WatchExpired
from tests.control_plane.kube_api import FakeKubeApi, namespace, service


async def started(**kwargs: Any) -> FakeKubeApi:
    api = FakeKubeApi(**kwargs)
    await api.start()
    return api


async def watch_lines(api: FakeKubeApi, query: str, count: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    async with (
        httpx.AsyncClient(timeout=5) as client,
        client.stream("GET", f"{api.url}/api/v1/services?watch=true&{query}") as response,
    ):
        async for line in response.aiter_lines():
            if line:
                lines.append(json.loads(line))
            if len(lines) == count:
                break
    return lines


async def test_lists_look_like_the_api_s_and_come_in_pages() -> None:
    api = await started()
    try:
        for name in ("a", "b", "c"):
            api.create(service(name, "shop"))
        async with httpx.AsyncClient(timeout=5) as client:
            first = (await client.get(f"{api.url}/api/v1/services?limit=2")).json()
            token = first["metadata"]["continue"]
            rest = (await client.get(f"{api.url}/api/v1/services?limit=2&continue={token}")).json()
        assert first["kind"] == "ServiceList" and first["apiVersion"] == "v1"
        assert [i["metadata"]["name"] for i in first["items"] + rest["items"]] == ["a", "b", "c"]
        assert "kind" not in first["items"][0]  # list items carry no kind, as the API's
        assert first["items"][0]["spec"]["clusterIP"].startswith("10.96.")
        assert api.mistakes == []
    finally:
        await api.stop()


async def test_a_watch_streams_history_then_bookmarks_then_410_for_old_versions() -> None:
    api = await started(bookmark_interval=0.05)
    try:
        api.create(service("a", "shop"))
        start = str(api.revision)
        api.create(service("b", "shop"))
        added, bookmark = await watch_lines(
            api, f"resourceVersion={start}&allowWatchBookmarks=true", 2
        )
        assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "b")
        assert added["object"]["kind"] == "Service"
        assert bookmark["type"] == "BOOKMARK"
        assert bookmark["object"]["metadata"]["resourceVersion"] == str(api.revision)
        api.compact()
        (error,) = await watch_lines(api, f"resourceVersion={start}&allowWatchBookmarks=true", 1)
        assert error["type"] == "ERROR"
        assert (error["object"]["code"], error["object"]["reason"]) == (410, "Expired")
        assert api.mistakes == []
    finally:
        await api.stop()


async def test_client_mistakes_are_recorded() -> None:
    api = await started()
    try:
        api.create(namespace("shop"))
        async with httpx.AsyncClient(timeout=5) as client:
            assert (await client.get(f"{api.url}/api/v1/service")).status_code == 404
            no_version = await client.get(f"{api.url}/api/v1/services?watch=true")
            assert no_version.status_code == 400
            typo = await client.get(f"{api.url}/api/v1/services?resourceversion=1")
            assert typo.status_code == 400
            future = await client.get(
                f"{api.url}/api/v1/services?watch=1&allowWatchBookmarks=1&resourceVersion=99999"
            )
            assert future.status_code == 400
            bad_event = await client.post(
                f"{api.url}/apis/events.k8s.io/v1/namespaces/shop/events",
                json={"apiVersion": "events.k8s.io/v1", "kind": "Event", "reason": "X"},
            )
            assert bad_event.status_code == 422
        assert [m.split(": ", 1)[1] for m in api.mistakes] == [
            "no such collection",
            "a watch must start from a list's resourceVersion",
            "unknown query parameters ['resourceversion']",
            "resourceVersion 99999 was never issued",
            "eventTime is required on a new Event",
            "reportingController is required on a new Event",
            "reportingInstance is required on a new Event",
            "action is required on a new Event",
            "regarding must name the object (kind, name)",
            "not a valid events.k8s.io/v1 Event: 'eventTime' is a required property",
        ]
    finally:
        await api.stop()


async def test_watching_again_after_410_without_a_list_is_caught() -> None:
    api = await started()
    api_client = kube_client.ApiClient(kube_client.Configuration(host=api.url))
    try:
        api.create(service("a", "shop"))
        core = kube_client.CoreV1Api(api_client)
        reflector = Reflector(
            "services", core.list_service_for_all_namespaces, lambda items: None,
            lambda kind, obj: None, watch_timeout=(1, 1),
        )  # fmt: skip
        async with asyncio.timeout(5):
            await reflector._list()
            api.create(service("b", "shop"))
            api.compact()  # the list's version is now too old
            for _ in range(2):  # a client that does not relist after 410 Gone
                with contextlib.suppress(WatchExpired):
                    await reflector._watch()
        assert [m.split(": ", 1)[1] for m in api.mistakes] == [
            "watched again from an expired resourceVersion without a list"
        ]
    finally:
        await api_client.close()
        await api.stop()


async def test_named_objects_have_optimistic_concurrency_and_strategic_merge() -> None:
    api = await started()
    secret_path = f"{api.url}/api/v1/namespaces/ns/secrets/tls"
    config_path = f"{api.url}/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/m"
    hook = {
        "clientConfig": {"service": {"name": "cp", "namespace": "ns", "path": "/inject"}},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
    }
    try:
        api.create(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tls", "namespace": "ns"}}
        )
        api.create(
            {
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingWebhookConfiguration",
                "metadata": {"name": "m"},
                "webhooks": [{"name": "a.x.dev", **hook}, {"name": "b.x.dev", **hook}],
            }
        )
        async with httpx.AsyncClient(timeout=5) as client:
            secret = (await client.get(secret_path)).json()
            read = secret["metadata"]["resourceVersion"]
            secret["data"] = {"tls.crt": "Y2VydA=="}
            assert (await client.put(secret_path, json=secret)).status_code == 200
            stale = await client.put(secret_path, json=secret)  # the version read is gone
            assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
            assert api.get("Secret", "ns", "tls")["metadata"]["resourceVersion"] != read
            patch = {"webhooks": [{"name": "b.x.dev", "clientConfig": {"caBundle": "Q0E="}}]}
            merged = await client.patch(
                config_path,
                json=patch,
                headers={"Content-Type": "application/strategic-merge-patch+json"},
            )
            assert merged.status_code == 200
            first, second = merged.json()["webhooks"]
            assert "caBundle" not in first["clientConfig"]
            assert second["clientConfig"] == {**hook["clientConfig"], "caBundle": "Q0E="}
            patch["metadata"] = {"resourceVersion": read}
            late = await client.patch(
                config_path,
                json=patch,
                headers={"Content-Type": "application/strategic-merge-patch+json"},
            )
            assert late.status_code == 409
            assert api.mistakes == []
            del secret["metadata"]["resourceVersion"]
            await client.put(secret_path, json=secret)
            assert (await client.get(f"{api.url}/api/v1/namespaces/ns/secrets")).status_code == 404
            await client.patch(
                config_path,
                json=[{"op": "add", "path": "/x", "value": 1}],
                headers={"Content-Type": "application/json-patch+json"},
            )
        assert [m.split(": ", 1)[1] for m in api.mistakes] == [
            "an update without metadata.resourceVersion (overwrites blindly what another "
            "writer put there)",
            "no such collection",
            "a patch of type application/json-patch+json (the fake applies merge patches only)",
        ]
    finally:
        await api.stop()
